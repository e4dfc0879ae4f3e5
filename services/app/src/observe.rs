//! Metrics taken from the events a use case produced, so every adapter
//! counts the same way.

use twofold_domain::user::UserEvent;
use twofold_domain::values::Method;

/// A sign-in's outcome: `invalid_credentials`, `locked`, `challenged`, `signed_in`.
pub fn sign_in(outcome: &'static str) {
    metrics::counter!("twofold_sign_ins_total", "outcome" => outcome).increment(1);
}

pub fn challenge_issued(method: Method) {
    metrics::counter!("twofold_challenges_issued_total", "method" => method.as_str()).increment(1);
}

pub fn enrollment(method: Method) {
    metrics::counter!("twofold_enrollments_total", "method" => method.as_str()).increment(1);
}

pub fn user_created() {
    metrics::counter!("twofold_users_created_total").increment(1);
}

/// A verification's events: codes verified, rejected, expired, lockouts.
pub fn verification(events: &[UserEvent]) {
    for event in events {
        let (method, outcome) = match event {
            UserEvent::CodeVerified { method, .. } => (method.as_str(), "verified"),
            UserEvent::BackupCodeUsed { .. } => ("backup_code", "verified"),
            UserEvent::ChallengeExpired { .. } => ("any", "expired"),
            UserEvent::CodeRejected { proof, .. } => (proof.as_str(), "rejected"),
            UserEvent::UserLockedOut { .. } => {
                metrics::counter!("twofold_lockouts_total").increment(1);
                continue;
            }
            _ => continue,
        };
        metrics::counter!("twofold_verifications_total", "method" => method, "outcome" => outcome)
            .increment(1);
    }
}

/// A verification refused because the account is locked.
pub fn verification_locked() {
    metrics::counter!("twofold_verifications_total", "method" => "any", "outcome" => "locked")
        .increment(1);
}
