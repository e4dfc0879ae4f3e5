//! The user: credentials, factors, lockout, and the sign-ins with their
//! challenges and sessions.
//!
//! Sign-ins live on the user's own event stream rather than in an aggregate of
//! their own: failures count per user across challenges, a TOTP step and a
//! backup code may be used once, and lockout must hold under parallel guessing.
//! One stream gives all of that from the event store's optimistic concurrency
//! alone. Snapshots keep a user with a long history as fast to load as a new one,
//! and finished challenges and expired sessions are pruned from the state.

mod aggregate;
pub mod challenge;
mod commands;
mod error;
mod events;
pub mod lockout;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;

pub use aggregate::{BackupCodeSlot, DeviceState, SessionState, TotpFactor, TwoFactorState, User};
pub use challenge::{Challenge, ChallengePurpose};
pub use commands::{
    ChallengeRef, CompleteEnrollment, NewBackupCodes, NewChallenge, NewDevice, NewSession,
    PresentedDevice, Proof, ReplacementCode, SignIn, UserCommand, VerifyCode,
};
pub use error::UserError;
pub use events::{
    AuditedRead, GuessBudget, NewContact, ProofKind, ReadFilter, RejectionReason, SecondFactorUse,
    SessionEndReason, SkipReason, UserEvent,
};
pub use lockout::Lockout;

/// What a personal value reads as once its user was erased.
pub const ERASED: &str = "[erased]";

/// Backup codes issued at enrollment and on regeneration.
pub const BACKUP_CODE_COUNT: usize = 8;
/// Active sessions kept per user; starting one more ends the oldest.
pub const MAX_ACTIVE_SESSIONS: usize = 50;
/// Open challenges kept per user; issuing one more drops the oldest.
pub const MAX_OPEN_CHALLENGES: usize = 20;
/// Remembered devices and trusted IPs kept per user; the oldest make room.
pub const MAX_REMEMBERED: usize = 20;
/// How long a step-up (a current factor confirmed) allows sensitive changes.
pub const STEP_UP_VALID_SECS: i64 = 10 * 60;
/// How long a session an admin opens as a user (Login As) lasts at most.
pub const LOGIN_AS_SESSION: chrono::Duration = chrono::Duration::hours(1);
/// With "no limit" on attempts, wrong codes beyond this many slow guessing down.
pub const FREE_FAILURES_WITHOUT_LIMIT: u32 = 5;
/// The longest wait the slow-down imposes.
pub const MAX_SLOWDOWN_SECS: i64 = 15 * 60;
