//! What can be asked of a user. Everything slow or secret (argon2, decrypting
//! the TOTP seed, recomputing a code) is done by the service first; the command
//! carries the outcome.

use chrono::{DateTime, Utc};

use crate::context::Ctx;
use crate::ids::{ChallengeId, SessionId, TenantId, UserId};
use crate::secrets::{PasswordHash, SealedSecret, SecretHash};
use crate::tenant::TwoFactorSettings;
use crate::user::{AuditedRead, SessionEndReason};
use crate::values::{Email, Method, Phone, Role, Username};
use uuid::Uuid;

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
    /// This user, an admin or an auditor, reads `read` (recorded in the
    /// audit history before the answer is given).
    RecordAuditRead {
        read: AuditedRead,
        ctx: Ctx,
    },
    /// A session was used, under the tenant's idle timeout: it ends if it
    /// sat idle that long, and its last use is recorded now and then.
    TouchSession {
        session_id: SessionId,
        idle_timeout_secs: i64,
        ctx: Ctx,
    },
    /// An admin opens a session as this user ("Login As", to test what they
    /// see): only where the tenant allows it, never as an admin, never past a
    /// lockout, with a reason; the session is short and marked.
    StartLoginAs {
        session: NewSession,
        settings: TwoFactorSettings,
        ctx: Ctx,
    },
    /// The user changes their password: the current one must be right, and
    /// `step_up` names the session that must have confirmed a factor (when
    /// the tenant's 2FA asks this user for one). The user's other sessions end.
    ChangePassword {
        current_ok: bool,
        new_hash: PasswordHash,
        session_id: SessionId,
        step_up: Option<SessionId>,
        ctx: Ctx,
    },
    /// An admin (or the operator) sets a one-time password the user must
    /// change at their next sign-in (which still asks the second factor);
    /// every session ends.
    ResetPassword {
        new_hash: PasswordHash,
        ctx: Ctx,
    },
    /// An admin sends the user a link to choose a new password (by email,
    /// through the dispatcher); it works once, until `expires_at`.
    IssueResetLink {
        reset_id: uuid::Uuid,
        expires_at: DateTime<Utc>,
        ctx: Ctx,
    },
    /// The user chose a new password through a reset link: every session
    /// ends, and the next sign-in asks the second factor as always.
    ResetPasswordByLink {
        reset_id: uuid::Uuid,
        new_hash: PasswordHash,
        ctx: Ctx,
    },
    /// The password must be changed before anything else (a one-time
    /// password handed out at tenant creation).
    RequirePasswordChange {
        ctx: Ctx,
    },
    /// At an enrollment offered at sign-in, go on without it (only where the
    /// tenant's enrollment is optional).
    SkipEnrollment {
        challenge: ChallengeRef,
        settings: TwoFactorSettings,
        session: NewSession,
        ctx: Ctx,
    },
    /// The method to ask first (among those the user has set up); `None`
    /// leaves it to the tenant's default.
    SetPreferredMethod {
        method: Option<Method>,
        ctx: Ctx,
    },
    /// Stops trusting one remembered device (its next sign-in asks for a
    /// second factor again).
    ForgetDevice {
        device_id: Uuid,
        ctx: Ctx,
    },
    StartTotpEnrollment {
        sealed: SealedSecret,
        ctx: Ctx,
    },
    ConfirmTotpEnrollment {
        /// The TOTP time step the presented code matched, if any.
        matched_step: Option<u64>,
        backup_codes: NewBackupCodes,
        ctx: Ctx,
    },
    RegenerateBackupCodes {
        backup_codes: NewBackupCodes,
        /// The user's own session, which must have stepped up recently; `None`
        /// when an admin acts.
        step_up: Option<SessionId>,
        ctx: Ctx,
    },
    Unlock {
        ctx: Ctx,
    },
    /// Required enrollment at sign-in: the code from the new authenticator
    /// both activates it and answers the sign-in's challenge.
    CompleteEnrollment(CompleteEnrollment),
    /// Asks a signed-in user for a current factor before a sensitive change.
    StartStepUp {
        session_id: SessionId,
        challenge: NewChallenge,
        settings: TwoFactorSettings,
        ctx: Ctx,
    },
    /// Admin changes to a user's profile; `None` leaves a field as it is.
    Update {
        roles: Option<Vec<Role>>,
        email: Option<Option<Email>>,
        phone: Option<Option<Phone>>,
        service_account: Option<bool>,
        ctx: Ctx,
    },
    /// The user changes the email or phone their codes go to.
    /// The user changes where codes go (after a step-up). Clearing applies
    /// at once; a new address or number is only used once a code sent to it
    /// comes back (one at a time).
    ChangeContact {
        email: Option<Option<Email>>,
        phone: Option<Option<Phone>>,
        step_up: SessionId,
        /// The challenge that verifies a new address or number.
        challenge: NewChallenge,
        settings: TwoFactorSettings,
        ctx: Ctx,
    },
    /// An admin switches 2FA on or off for this user (scope "per user").
    SwitchTwoFactor {
        on: bool,
        tenant_enabled: bool,
        ctx: Ctx,
    },
    /// The user opts in or out (scope "voluntary"); opting out needs a step-up.
    SetVoluntaryTwoFactor {
        on: bool,
        tenant_enabled: bool,
        step_up: SessionId,
        ctx: Ctx,
    },
    /// An admin resets the user's enrollment; they enroll again.
    ResetEnrollment {
        ctx: Ctx,
    },
    /// The user removes their own authenticator.
    RemoveAuthenticator {
        step_up: SessionId,
        ctx: Ctx,
    },
    /// Ends every session of the user (and, with `forget_devices`, every
    /// remembered device).
    RevokeSessions {
        forget_devices: bool,
        ctx: Ctx,
    },
    /// Erases the user: an admin's, with a reason (the store makes their
    /// personal data unreadable as it appends the event).
    Erase {
        ctx: Ctx,
    },
}

/// A remembered-device token the client presented at sign-in.
#[derive(Debug, Clone, PartialEq)]
pub struct PresentedDevice {
    pub id: Uuid,
    pub token_hash: SecretHash,
}

/// The device to remember when this sign-in completes its second factor.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDevice {
    pub id: Uuid,
    pub token_hash: SecretHash,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompleteEnrollment {
    pub challenge: ChallengeRef,
    pub matched_step: Option<u64>,
    pub backup_codes: NewBackupCodes,
    pub settings: TwoFactorSettings,
    pub session: NewSession,
    pub device: NewDevice,
    pub ctx: Ctx,
}

/// The password step of a sign-in, with what to open next.
#[derive(Debug, Clone, PartialEq)]
pub struct SignIn {
    /// Outcome of the argon2id check done by the service.
    pub password_ok: bool,
    /// Seconds until the client address's hourly budget of wrong passwords
    /// (kept by the service, across accounts) allows another try, when spent.
    pub address_retry_after: Option<i64>,
    /// The tenant's settings as of this sign-in.
    pub settings: TwoFactorSettings,
    /// Used when a second factor is asked for.
    pub challenge: NewChallenge,
    /// Used when no second factor is asked for.
    pub session: NewSession,
    /// A remembered-device token sent with the sign-in, if any.
    pub device: Option<PresentedDevice>,
    /// A fresh sealed seed, used when the tenant requires enrollment and the
    /// user has no authenticator yet.
    pub enrollment_seed: Option<SealedSecret>,
    pub ctx: Ctx,
}

/// A code presented for a challenge.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyCode {
    pub challenge: ChallengeRef,
    pub proof: Proof,
    pub settings: TwoFactorSettings,
    pub session: NewSession,
    /// Remembered when a sign-in completes (not for a step-up).
    pub device: NewDevice,
    /// A code to take the place of a backup code used here, when the tenant
    /// keeps the user's 8 (`replace_backup_codes_on_use`).
    pub replacement: Option<ReplacementCode>,
    pub ctx: Ctx,
}

/// Backup codes to issue: their keyed hashes, to check them by, and the
/// codes themselves sealed, to show them to their user again.
#[derive(Debug, Clone, PartialEq)]
pub struct NewBackupCodes {
    pub hashes: Vec<SecretHash>,
    pub sealed: Option<SealedSecret>,
}

impl FromIterator<SecretHash> for NewBackupCodes {
    fn from_iter<I: IntoIterator<Item = SecretHash>>(hashes: I) -> Self {
        hashes.into_iter().collect::<Vec<_>>().into()
    }
}

impl From<Vec<SecretHash>> for NewBackupCodes {
    fn from(hashes: Vec<SecretHash>) -> Self {
        Self {
            hashes,
            sealed: None,
        }
    }
}

/// A new backup code for the slot of one being used, and the user's codes
/// sealed again with it in that slot.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplacementCode {
    pub hash: SecretHash,
    pub sealed: Option<SealedSecret>,
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
