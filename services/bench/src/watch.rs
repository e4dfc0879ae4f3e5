//! What the machine was doing while a part of the run went on: when it ran,
//! the load average as it started and ended, and how busy all cores were
//! meanwhile (and how much of their time the hypervisor gave to other
//! machines), so a reader of the report can tell an idle machine's figures
//! from a busy or shared one's. Read from `/proc` (absent elsewhere: then
//! only the times are known).

use chrono::{DateTime, Utc};
use procfs::{Current, CurrentSI, KernelStats, LoadAverage};
use serde::Serialize;

/// All cores' time so far, in ticks.
#[derive(Debug, Clone, Copy)]
struct Ticks {
    total: u64,
    /// Neither idle nor waiting for I/O (steal included: it is time the
    /// machine did not get, not time it had nothing to do).
    busy: u64,
    steal: u64,
}

fn ticks() -> Option<Ticks> {
    let t = KernelStats::current().ok()?.total;
    let steal = t.steal.unwrap_or(0);
    let busy = t.user + t.nice + t.system + t.irq.unwrap_or(0) + t.softirq.unwrap_or(0) + steal;
    let total = busy + t.idle + t.iowait.unwrap_or(0);
    Some(Ticks { total, busy, steal })
}

fn load_average() -> Option<f32> {
    LoadAverage::current().ok().map(|l| l.one)
}

/// A part of the run being watched.
pub struct Watch {
    part: String,
    from: DateTime<Utc>,
    load: Option<f32>,
    ticks: Option<Ticks>,
}

/// How the machine was while a part ran.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Which scenarios (their `--only` names) or `whole run`.
    pub part: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The one-minute load average as the part started.
    pub load_average_at_start: Option<f32>,
    /// The one-minute load average as it ended.
    pub load_average_at_end: Option<f32>,
    /// The share of all cores' time that was busy meanwhile, 0 to 1
    /// (the benchmark's own processes included).
    pub cpu_busy: Option<f64>,
    /// The share the hypervisor gave to other machines, 0 to 1.
    pub cpu_steal: Option<f64>,
}

impl Watch {
    pub fn start(part: &str) -> Self {
        Self {
            part: part.to_string(),
            from: crate::wall_now(),
            load: load_average(),
            ticks: ticks(),
        }
    }

    pub fn finish(self) -> Window {
        let shares = match (self.ticks, ticks()) {
            (Some(a), Some(b)) if b.total > a.total => {
                let total = (b.total - a.total) as f64;
                Some((
                    b.busy.saturating_sub(a.busy) as f64 / total,
                    b.steal.saturating_sub(a.steal) as f64 / total,
                ))
            }
            _ => None,
        };
        Window {
            part: self.part,
            from: self.from,
            to: crate::wall_now(),
            load_average_at_start: self.load,
            load_average_at_end: load_average(),
            cpu_busy: shares.map(|s| s.0),
            cpu_steal: shares.map(|s| s.1),
        }
    }
}

impl Window {
    /// A row of the report's table of parts.
    pub fn row(&self) -> String {
        let (load, share) = (shown_load, |s| shown_share(s, 0));
        format!(
            "| {} | {}–{} | {} → {} | {} | {} |\n",
            self.part,
            self.from.format("%Y-%m-%d %H:%M:%S"),
            self.to.format("%H:%M:%S"),
            load(self.load_average_at_start),
            load(self.load_average_at_end),
            share(self.cpu_busy),
            share(self.cpu_steal),
        )
    }
}

/// A load average as the report shows it (`?` when unknown).
pub fn shown_load(load: Option<f32>) -> String {
    load.map_or("?".to_string(), |l| format!("{l:.2}"))
}

/// A share (0 to 1) as the report shows it: a percentage with `decimals`
/// decimals (`?` when unknown).
pub fn shown_share(share: Option<f64>, decimals: usize) -> String {
    share.map_or("?".to_string(), |s| format!("{:.*}%", decimals, s * 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_kept_busy_show_in_the_busy_share_and_the_times_are_ordered() {
        let watch = Watch::start("spin");
        // Every core busy for 300 ms: 30 ticks each at the usual 100 a
        // second, enough that tick rounding does not matter.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
        std::thread::scope(|s| {
            for _ in 0..cores {
                s.spawn(|| {
                    let mut x = 0u64;
                    while std::time::Instant::now() < until {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                });
            }
        });
        let w = watch.finish();
        assert!(w.to >= w.from);
        let busy = w.cpu_busy.expect("Linux has /proc/stat");
        assert!((0.75..=1.0).contains(&busy), "busy share {busy}");
        assert!((0.0..=busy).contains(&w.cpu_steal.unwrap()));
        assert!(w.load_average_at_start.is_some() && w.load_average_at_end.is_some());
        let row = w.row();
        assert!(row.starts_with("| spin | "), "{row}");
    }
}
