//! The report: one object per scenario, and the same as a table.

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// The baseline measured in the same run, when the target is a ratio.
    pub baseline: Option<f64>,
    pub baseline_unit: Option<String>,
    pub ratio: Option<f64>,
    /// e.g. `ratio >= 0.9`, `p99 <= 20 ms`.
    pub target: String,
    pub met: bool,
    /// Percentiles and other figures that matter.
    pub details: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Value,
    pub settings: Value,
    pub scenarios: Vec<Scenario>,
}

pub fn table(report: &Report) -> String {
    let mut out = String::new();
    out.push_str(
        "| scenario | value | baseline | ratio | target | met | latency p50 / p95 / p99 |\n|---|---|---|---|---|---|---|\n",
    );
    for s in &report.scenarios {
        let baseline = match (&s.baseline, &s.baseline_unit) {
            (Some(b), Some(u)) => format!("{b:.1} {u}"),
            _ => "—".to_string(),
        };
        let ratio = s.ratio.map_or("—".to_string(), |r| format!("{r:.2}"));
        out.push_str(&format!(
            "| {} | {:.1} {} | {} | {} | {} | {} | {} |\n",
            s.name,
            s.value,
            s.unit,
            baseline,
            ratio,
            s.target,
            if s.met { "yes" } else { "NO" },
            percentiles(&s.details)
        ));
    }
    out
}

/// "p50 / p95 / p99 ms" of a scenario's latencies (its own, or those under
/// `latency`), or a dash.
fn percentiles(details: &Value) -> String {
    let of = |d: &Value| -> Option<String> {
        let p = |k: &str| d.get(k).and_then(Value::as_f64);
        Some(format!(
            "{:.1} / {:.1} / {:.1} ms",
            p("p50_ms")?,
            p("p95_ms")?,
            p("p99_ms")?
        ))
    };
    of(details)
        .or_else(|| details.get("latency").and_then(of))
        .unwrap_or_else(|| "—".to_string())
}

/// Percentile `p` (0..=100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
