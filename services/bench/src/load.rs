//! Load shapes: a closed loop (each client sends its next request when the
//! last one answered) and an open loop (requests start on a fixed schedule,
//! whether or not earlier ones have answered, so a slow answer cannot hide
//! the requests it delays).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{json, Value};

use crate::report::percentile;

/// What a closed or open loop measured: successes per second and the sorted
/// latencies of the successes, in ms.
pub struct Measured {
    pub rate: f64,
    pub latencies: Vec<f64>,
    pub failures: u64,
    /// Why requests failed, with counts.
    pub reasons: BTreeMap<String, u64>,
    pub seconds: f64,
}

/// A request's outcome: `Err` says why it failed (a status, an error).
pub type Outcome = Result<(), String>;

impl Measured {
    fn from_parts(mut latencies: Vec<f64>, reasons: BTreeMap<String, u64>, seconds: f64) -> Self {
        latencies.sort_by(|a, b| a.total_cmp(b));
        Self {
            rate: latencies.len() as f64 / seconds.max(1e-9),
            latencies,
            failures: reasons.values().sum(),
            reasons,
            seconds,
        }
    }

    /// Several measurements as one: latencies and failures pooled, rate over
    /// the time they took together.
    pub fn merge(parts: Vec<Measured>) -> Self {
        let seconds = parts.iter().map(|m| m.seconds).sum();
        let mut latencies = Vec::new();
        let mut reasons = BTreeMap::new();
        for m in parts {
            latencies.extend(m.latencies);
            for (reason, n) in m.reasons {
                *reasons.entry(reason).or_insert(0) += n;
            }
        }
        Self::from_parts(latencies, reasons, seconds)
    }

    /// p50, p95, p99 and the sample count, for the report.
    pub fn details(&self) -> Value {
        json!({
            "p50_ms": percentile(&self.latencies, 50.0),
            "p95_ms": percentile(&self.latencies, 95.0),
            "p99_ms": percentile(&self.latencies, 99.0),
            "samples": self.latencies.len(),
            "failures": self.failures,
            "failure_reasons": self.reasons,
            "seconds": self.seconds,
        })
    }
}

/// `clients` tasks each call `op(client, i)` for i = 0, 1, … until `seconds`
/// pass or `op` answers `None` (nothing left for that client).
pub async fn closed_loop<F, Fut>(clients: usize, seconds: f64, op: F) -> Measured
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Option<Outcome>> + Send,
{
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let tasks = (0..clients).map(|c| {
        let op = op.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut reasons = BTreeMap::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match op(c, i).await {
                    Some(Ok(())) => latencies.push(t.elapsed().as_secs_f64() * 1000.0),
                    Some(Err(reason)) => *reasons.entry(reason).or_insert(0) += 1,
                    None => break,
                }
                i += 1;
            }
            (latencies, reasons)
        })
    });
    let mut latencies = Vec::new();
    let mut reasons = BTreeMap::new();
    for (l, r) in join_all(tasks).await.into_iter().flatten() {
        latencies.extend(l);
        for (reason, n) in r {
            *reasons.entry(reason).or_insert(0) += n;
        }
    }
    Measured::from_parts(latencies, reasons, started.elapsed().as_secs_f64())
}

/// Starts `op(i)` at `rate` per second for `seconds`, each in its own task,
/// and measures each latency from the moment it was due (not from when it
/// actually started), so that a stalled system shows as latency.
pub async fn open_loop<F, Fut>(rate: f64, seconds: f64, op: F) -> Measured
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let started = tokio::time::Instant::now();
    let total = (rate * seconds).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-9));
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let outcome = op(i).await;
            (outcome, due.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut latencies = Vec::new();
    let mut reasons = BTreeMap::new();
    for (outcome, ms) in join_all(tasks).await.into_iter().flatten() {
        match outcome {
            Ok(()) => latencies.push(ms),
            Err(reason) => *reasons.entry(reason).or_insert(0) += 1,
        }
    }
    Measured::from_parts(latencies, reasons, started.elapsed().as_secs_f64())
}

/// An answer's status as an outcome: 200 is a success.
pub fn status_outcome(answer: anyhow::Result<(u16, serde_json::Value)>) -> Outcome {
    match answer {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!(
            "{status} {}",
            body["error"]["code"].as_str().unwrap_or("")
        )),
        Err(e) => Err(format!("request failed: {e}")),
    }
}
