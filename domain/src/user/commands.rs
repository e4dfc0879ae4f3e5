//! What can be asked of a user. Everything slow or secret (argon2, decrypting
//! the TOTP seed, recomputing a code) is done by the service first; the command
//! carries the outcome.

use chrono::{DateTime, Utc};

use crate::context::Ctx;
use crate::ids::{ChallengeId, SessionId, TenantId, UserId};
use crate::secrets::{PasswordHash, SealedSecret, SecretHash};
use crate::tenant::TwoFactorSettings;
use crate::user::SessionEndReason;
use crate::values::{Email, Method, Phone, Role, Username};

#[derive(Debug, Clone, PartialEq)]
pub enum UserCommand {
    Register {
        user_id: UserId,
        tenant_id: TenantId,
        username: Username,
        email: Option<Email>,
        phone: Option<Phone>,
        roles: Vec<Role>,
        service_account: bool,
        password_hash: PasswordHash,
        ctx: Ctx,
    },
    SignIn(SignIn),
    VerifyCode(VerifyCode),
    ResendCode {
        challenge: ChallengeRef,
        ctx: Ctx,
    },
    SwitchMethod {
        challenge: ChallengeRef,
        method: Method,
        ctx: Ctx,
    },
    EndSession {
        session_id: SessionId,
        reason: SessionEndReason,
        ctx: Ctx,
    },
    StartTotpEnrollment {
        sealed: SealedSecret,
        ctx: Ctx,
    },
    ConfirmTotpEnrollment {
        /// The TOTP time step the presented code matched, if any.
        matched_step: Option<u64>,
        backup_codes: Vec<SecretHash>,
        ctx: Ctx,
    },
    RegenerateBackupCodes {
        backup_codes: Vec<SecretHash>,
        ctx: Ctx,
    },
    Unlock {
        ctx: Ctx,
    },
}

/// The password step of a sign-in, with what to open next.
#[derive(Debug, Clone, PartialEq)]
pub struct SignIn {
    /// Outcome of the argon2id check done by the service.
    pub password_ok: bool,
    /// The tenant's settings as of this sign-in.
    pub settings: TwoFactorSettings,
    /// Used when a second factor is asked for.
    pub challenge: NewChallenge,
    /// Used when no second factor is asked for.
    pub session: NewSession,
    pub ctx: Ctx,
}

/// A code presented for a challenge.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyCode {
    pub challenge: ChallengeRef,
    pub proof: Proof,
    pub settings: TwoFactorSettings,
    pub session: NewSession,
    pub ctx: Ctx,
}

/// Names an open challenge and proves the caller holds its token.
#[derive(Debug, Clone, PartialEq)]
pub struct ChallengeRef {
    pub id: ChallengeId,
    pub token_hash: SecretHash,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewChallenge {
    pub id: ChallengeId,
    pub token_hash: SecretHash,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewSession {
    pub id: SessionId,
    pub token_hash: SecretHash,
    /// Filled in by the aggregate from the tenant's session duration when absent.
    pub expires_at: Option<DateTime<Utc>>,
}

/// What the service found out about a presented code.
#[derive(Debug, Clone, PartialEq)]
pub enum Proof {
    /// An authenticator code: the time step (within one step of drift) it
    /// matched, or `None` when it matched none.
    Totp { matched_step: Option<u64> },
    /// An email or SMS code, recomputed for the challenge's current generation
    /// and compared in constant time.
    Delivered { matches: bool },
    /// A backup code, as its keyed hash.
    Backup { hash: SecretHash },
}
