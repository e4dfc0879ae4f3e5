//! Counting wrong codes into a lockout: a small pure state machine.
//!
//! ```text
//!            wrong code (n + 1 < limit)
//!           ┌───────────────┐
//!           ▼               │
//!     ┌──────────────┐      │        wrong code (n + 1 >= limit)       ┌────────┐
//!     │ Open { n }   │──────┴─────────────────────────────────────────▶│ Locked │
//!     └──────────────┘                                                 └────────┘
//!        ▲      │ code verified: n = 0                                      │
//!        │      ▼                                                           │
//!        └──────┴──────────────────── admin unlock: n = 0 ◀─────────────────┘
//! ```
//!
//! Failures count per user, across challenges, methods and IP addresses; a
//! resend or a method switch leaves the count alone.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Lockout {
    Open { failures: u32 },
    Locked { failures: u32 },
}

impl Default for Lockout {
    fn default() -> Self {
        Lockout::Open { failures: 0 }
    }
}

/// What one more wrong code does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Counted; the user may try again.
    Counted { failures: u32 },
    /// Counted, and this failure locks the user out.
    LocksOut { failures: u32 },
}

impl Lockout {
    pub fn is_locked(&self) -> bool {
        matches!(self, Lockout::Locked { .. })
    }

    pub fn failures(&self) -> u32 {
        match self {
            Lockout::Open { failures } | Lockout::Locked { failures } => *failures,
        }
    }

    /// The transition for one more wrong code under `limit` consecutive failures.
    pub fn on_failure(&self, limit: u32) -> AfterFailure {
        let failures = self.failures().saturating_add(1);
        if failures >= limit.max(1) {
            AfterFailure::LocksOut { failures }
        } else {
            AfterFailure::Counted { failures }
        }
    }

    /// Tries left before the lockout, under `limit`.
    pub fn remaining(&self, limit: u32) -> u32 {
        if self.is_locked() {
            0
        } else {
            limit.saturating_sub(self.failures())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_th_failure_locks() {
        let mut state = Lockout::default();
        for n in 1..3 {
            assert_eq!(state.on_failure(3), AfterFailure::Counted { failures: n });
            state = Lockout::Open { failures: n };
        }
        assert_eq!(state.on_failure(3), AfterFailure::LocksOut { failures: 3 });
    }

    #[test]
    fn remaining_counts_down_to_zero() {
        assert_eq!(Lockout::default().remaining(3), 3);
        assert_eq!(Lockout::Open { failures: 2 }.remaining(3), 1);
        assert_eq!(Lockout::Locked { failures: 3 }.remaining(3), 0);
    }
}
