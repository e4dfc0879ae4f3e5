//! The report: one object per scenario, and the same as a table.

use serde::Serialize;
use serde_json::Value;

use crate::watch::{shown_load, shown_share, Window};

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
    /// When the whole run went on and how busy the machine was.
    pub run: Window,
    /// The same for each part of it (the scenarios started together).
    pub parts: Vec<Window>,
    pub scenarios: Vec<Scenario>,
}

pub fn table(report: &Report) -> String {
    let mut out = String::new();
    out.push_str(&machine(report));
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
    out.push_str(&growth(report));
    out.push_str(&parts(report));
    out
}

/// The run's machine and when it ran, as a line over the table.
fn machine(report: &Report) -> String {
    let m = &report.machine;
    let w = &report.run;
    format!(
        "Run {} to {} UTC on {} ({} cores, {} GiB); load average {} at the start, {} at the end; cores {} busy, {} stolen by the hypervisor; PostgreSQL through {}.\n\n",
        w.from.format("%Y-%m-%d %H:%M:%S"),
        w.to.format("%H:%M:%S"),
        m["cpu"].as_str().unwrap_or("an unknown CPU"),
        m["cores"],
        m["memory_gib"],
        shown_load(w.load_average_at_start),
        shown_load(w.load_average_at_end),
        shown_share(w.cpu_busy, 0),
        shown_share(w.cpu_steal, 1),
        report.settings["postgresql"]["connection"]
            .as_str()
            .unwrap_or("an unknown connection"),
    )
}

/// When each part of the run went on, and how busy the machine was.
fn parts(report: &Report) -> String {
    if report.parts.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nWhen each part ran (UTC), the one-minute load average as it started and ended, and the share of all cores busy and stolen meanwhile (the benchmark's own processes included):\n\n| part | ran | load average | cores busy | stolen |\n|---|---|---|---|---|\n",
    );
    for w in &report.parts {
        out.push_str(&w.row());
    }
    out
}

/// The scale scenario's reads as curves over tenant size: a row per read,
/// a column per size (its value: p99 or rows/s), and how much the largest
/// size's value is of the smallest's. Empty without two sizes.
fn growth(report: &Report) -> String {
    // (read, users) -> scenario, in the order the reads were measured.
    let mut reads: Vec<&str> = Vec::new();
    let mut sizes: Vec<u64> = Vec::new();
    let mut at = std::collections::HashMap::new();
    for s in &report.scenarios {
        let users = s.details.pointer("/set_up/users").and_then(Value::as_u64);
        let (Some(users), Some((_, read))) = (users, s.name.split_once(": ")) else {
            continue;
        };
        if !reads.contains(&read) {
            reads.push(read);
        }
        if !sizes.contains(&users) {
            sizes.push(users);
        }
        at.insert((read, users), s);
    }
    sizes.sort_unstable();
    let (Some(&small), Some(&large)) = (sizes.first(), sizes.last()) else {
        return String::new();
    };
    if small == large {
        return String::new();
    }
    let mut out = format!(
        "\nHow the scale reads grow with the tenant (value at each size; the last column is the largest size's value over the smallest's):\n\n| read | {} | ×{} / ×1 |\n|---|{}---|\n",
        sizes
            .iter()
            .map(|u| format!("{}k users", u / 1000))
            .collect::<Vec<_>>()
            .join(" | "),
        large / small,
        "---|".repeat(sizes.len())
    );
    for read in reads {
        let cells: Vec<String> = sizes
            .iter()
            .map(|u| {
                at.get(&(read, *u))
                    .map_or("—".to_string(), |s| format!("{:.1} {}", s.value, s.unit))
            })
            .collect();
        let grew = match (at.get(&(read, small)), at.get(&(read, large))) {
            (Some(a), Some(b)) if a.value > 0.0 => format!("{:.2}", b.value / a.value),
            _ => "—".to_string(),
        };
        out.push_str(&format!("| {read} | {} | {grew} |\n", cells.join(" | ")));
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scenario(name: &str, users: u64, value: f64) -> Scenario {
        Scenario {
            name: name.into(),
            value,
            unit: "ms (p99)".into(),
            baseline: None,
            baseline_unit: None,
            ratio: None,
            target: "p99 <= 20 ms".into(),
            met: true,
            details: json!({"set_up": {"users": users}}),
        }
    }

    #[test]
    fn the_scale_reads_are_tabled_as_curves_over_tenant_size() {
        let report = Report {
            machine: json!({}),
            settings: json!({"postgresql": {"connection": "its Unix socket"}}),
            run: crate::watch::Watch::start("whole run").finish(),
            parts: Vec::new(),
            scenarios: vec![
                scenario("scale, 10k users / 0.2M events: GET /overview", 10_000, 2.0),
                scenario("scale, 10k users / 0.2M events: directory", 10_000, 4.0),
                scenario(
                    "scale, 100k users / 2.0M events: GET /overview",
                    100_000,
                    3.0,
                ),
                scenario("scale, 100k users / 2.0M events: directory", 100_000, 12.0),
            ],
        };
        let growth = growth(&report);
        assert!(
            growth.contains("| read | 10k users | 100k users | ×10 / ×1 |"),
            "{growth}"
        );
        assert!(
            growth.contains("| GET /overview | 2.0 ms (p99) | 3.0 ms (p99) | 1.50 |"),
            "{growth}"
        );
        assert!(
            growth.contains("| directory | 4.0 ms (p99) | 12.0 ms (p99) | 3.00 |"),
            "{growth}"
        );
        // One size is no curve.
        let one = Report {
            scenarios: report.scenarios[..2].to_vec(),
            ..report
        };
        assert_eq!(super::growth(&one), "");
    }

    #[test]
    fn the_table_says_when_the_run_and_each_part_ran_and_how_busy_the_machine_was() {
        let part = crate::watch::Watch::start("relay").finish();
        let report = Report {
            machine: json!({"cpu": "Test CPU", "cores": 2, "memory_gib": 23.5}),
            settings: json!({"postgresql": {"connection": "its Unix socket"}}),
            run: crate::watch::Watch::start("whole run").finish(),
            parts: vec![part.clone()],
            scenarios: vec![],
        };
        let table = table(&report);
        let first = table.lines().next().unwrap();
        assert!(first.starts_with("Run 20"), "{first}");
        assert!(
            first.contains("UTC on Test CPU (2 cores, 23.5 GiB); load average "),
            "{first}"
        );
        assert!(
            first.ends_with("stolen by the hypervisor; PostgreSQL through its Unix socket."),
            "{first}"
        );
        assert!(table.contains("| part | ran | load average | cores busy | stolen |"));
        assert!(table.contains(&part.row()), "{table}");
        // Without parts, no table of them.
        let bare = Report {
            parts: vec![],
            ..report
        };
        assert!(!super::table(&bare).contains("| part |"));
    }
}
