//! A circuit breaker per SMS provider. After `failures` failures or timeouts
//! in a row the provider's circuit opens: its codes are not tried and go by
//! email at once. After `cooldown` one code is let through as a probe: its
//! success closes the circuit, its failure opens it for another cooldown.
//!
//! ```text
//!            n-th failure in a row                cooldown passed
//!   closed ───────────────────────────▶ open ─────────────────────▶ half-open
//!     ▲                                  ▲      (one probe sent)       │
//!     │            probe succeeded       │      probe failed           │
//!     └──────────────────────────────────┼─────────────────────────────┘
//!                                        └─────────────────────────────┘
//! ```
//!
//! Time is the dispatcher's clock. State per instance, shown in the gauge
//! `twofold_sms_circuit_open{provider}` (1 while open or half-open).

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, TimeDelta, Utc};

/// Whether a send may go to the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The circuit is closed: send.
    Closed,
    /// The cooldown passed: this send is the probe.
    Probe,
    /// Open: do not try.
    Open,
}

#[derive(Debug, Default)]
struct Circuit {
    failures: u32,
    opened_at: Option<DateTime<Utc>>,
    /// When the probe in flight was let through (one at a time; a probe that
    /// never reports, e.g. cut off by a shutdown, is replaced after a cooldown).
    probe_at: Option<DateTime<Utc>>,
}

pub struct Breakers {
    failures: u32,
    cooldown: TimeDelta,
    circuits: Mutex<HashMap<String, Circuit>>,
}

impl Breakers {
    /// Opens after `failures` in a row (0: never), probes after `cooldown`.
    pub fn new(failures: u32, cooldown: TimeDelta) -> Self {
        Self {
            failures,
            cooldown,
            circuits: Mutex::new(HashMap::new()),
        }
    }

    fn with<T>(&self, provider: &str, f: impl FnOnce(&mut Circuit) -> T) -> T {
        let mut circuits = self.circuits.lock().unwrap_or_else(|p| p.into_inner());
        f(circuits.entry(provider.to_string()).or_default())
    }

    /// Whether a send to `provider` may go now.
    pub fn admit(&self, provider: &str, now: DateTime<Utc>) -> Admit {
        self.with(provider, |c| {
            let Some(opened) = c.opened_at else {
                return Admit::Closed;
            };
            let probing = c.probe_at.is_some_and(|p| now < p + self.cooldown);
            if probing || now < opened + self.cooldown {
                return Admit::Open;
            }
            c.probe_at = Some(now);
            Admit::Probe
        })
    }

    /// The provider took a message: the circuit closes.
    pub fn succeeded(&self, provider: &str) {
        self.with(provider, |c| *c = Circuit::default());
        metrics::gauge!("twofold_sms_circuit_open", "provider" => provider.to_string()).set(0.0);
    }

    /// The provider failed or timed out at `now`.
    pub fn failed(&self, provider: &str, now: DateTime<Utc>) {
        let open = self.with(provider, |c| {
            c.failures = c.failures.saturating_add(1);
            if c.probe_at.take().is_some() || (self.failures > 0 && c.failures >= self.failures) {
                c.opened_at = Some(now);
            }
            c.opened_at.is_some()
        });
        metrics::gauge!("twofold_sms_circuit_open", "provider" => provider.to_string())
            .set(if open { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap() + TimeDelta::seconds(s)
    }

    #[test]
    fn opens_after_failures_in_a_row_and_probes_after_the_cooldown() {
        let b = Breakers::new(3, TimeDelta::seconds(30));
        b.failed("p", t(0));
        b.failed("p", t(1));
        b.succeeded("p");
        // A success in between: the count starts over.
        b.failed("p", t(2));
        b.failed("p", t(3));
        assert_eq!(b.admit("p", t(4)), Admit::Closed);
        b.failed("p", t(5));
        assert_eq!(b.admit("p", t(6)), Admit::Open);
        assert_eq!(b.admit("q", t(6)), Admit::Closed, "per provider");
        assert_eq!(b.admit("p", t(35)), Admit::Probe);
        assert_eq!(b.admit("p", t(35)), Admit::Open, "one probe at a time");
        // The probe fails: open for another cooldown.
        b.failed("p", t(36));
        assert_eq!(b.admit("p", t(60)), Admit::Open);
        assert_eq!(b.admit("p", t(66)), Admit::Probe);
        b.succeeded("p");
        assert_eq!(b.admit("p", t(67)), Admit::Closed);
    }

    #[test]
    fn a_probe_that_never_reports_is_replaced_after_a_cooldown() {
        let b = Breakers::new(1, TimeDelta::seconds(30));
        b.failed("p", t(0));
        assert_eq!(b.admit("p", t(30)), Admit::Probe);
        assert_eq!(b.admit("p", t(59)), Admit::Open);
        assert_eq!(b.admit("p", t(60)), Admit::Probe);
    }

    #[test]
    fn zero_failures_never_opens() {
        let b = Breakers::new(0, TimeDelta::seconds(30));
        for s in 0..100 {
            b.failed("p", t(s));
        }
        assert_eq!(b.admit("p", t(100)), Admit::Closed);
    }
}
