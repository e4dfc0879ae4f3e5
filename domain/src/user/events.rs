//! What happened to a user: the audit record of their account and sign-ins.
//! Shipped event shapes are versioned (`event_version`), never silently changed.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::context::Ctx;
use crate::ids::{ChallengeId, SessionId, TenantId, UserId};
use crate::secrets::{PasswordHash, SealedSecret, SecretHash};
use crate::user::challenge::ChallengePurpose;
use crate::values::{Email, Method, Phone, Role, Username};
use uuid::Uuid;

/// Why a sign-in opened a session without a second factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The tenant's master toggle is off.
    TwoFactorDisabled,
    /// Service accounts sign in for API access and are exempt.
    ServiceAccount,
    /// None of the tenant's allowed methods is set up for this user.
    NoMethodAvailable,
    /// Offered to set up an authenticator (having no usable method) where
    /// enrollment is optional, the user chose to skip it for now.
    EnrollmentSkipped,
    /// An admin opened this session as the user ("Login As"), with a reason.
    LoginAs,
    /// The tenant's scope does not ask this user (role, switch or opt-in).
    NotRequired,
    /// Unrecognized-devices mode: the remembered-device token matched.
    KnownDevice,
    /// Unrecognized-devices mode: the IP of an earlier 2FA sign-in.
    KnownIp,
}

/// What an admin or an auditor read, as recorded by [`UserEvent::AuditRead`]
/// on the reader's own stream. Ids and filters are as the reader gave them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum AuditedRead {
    /// A user's detail (`GET /users/{id}`).
    UserDetail { user_id: String },
    /// A user's audit timeline (`GET /users/{id}/history`).
    UserHistory { user_id: String },
    /// A user's console page: their detail and timeline together.
    UserPage { user_id: String },
    /// The audit history searched on the console's Audit page.
    AuditSearch { filter: ReadFilter },
    /// The audit history exported (`GET /audit`, the console's export).
    AuditExport { filter: ReadFilter, format: String },
}

/// An audit search or export's filter, as given (times as RFC 3339).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFilter {
    pub event_type: Option<String>,
    pub user_id: Option<String>,
    pub actor: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// How a challenge was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProofKind {
    Totp,
    Email,
    Sms,
    BackupCode,
}

impl From<Method> for ProofKind {
    fn from(m: Method) -> Self {
        match m {
            Method::Totp => ProofKind::Totp,
            Method::Email => ProofKind::Email,
            Method::Sms => ProofKind::Sms,
        }
    }
}

impl ProofKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ProofKind::Totp => "totp",
            ProofKind::Email => "email",
            ProofKind::Sms => "sms",
            ProofKind::BackupCode => "backup_code",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionReason {
    WrongCode,
    /// A TOTP time step that was already accepted once.
    ReusedTimeStep,
}

/// Whether and how a session's sign-in used a second factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "two_factor")]
pub enum SecondFactorUse {
    Used { method: ProofKind },
    Skipped { reason: SkipReason },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEndReason {
    SignedOut,
    /// The user reached the cap of active sessions; the oldest made room.
    Evicted,
    Revoked,
    /// Unused for longer than the tenant's idle timeout.
    Idle,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    UserRegistered {
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
    PasswordRejected {
        ctx: Ctx,
    },
    /// The right password, but the account is locked.
    SignInRefusedLocked {
        ctx: Ctx,
    },
    SecondFactorSkipped {
        reason: SkipReason,
        ctx: Ctx,
    },
    ChallengeIssued {
        challenge_id: ChallengeId,
        method: Method,
        methods: Vec<Method>,
        token_hash: SecretHash,
        expires_at: DateTime<Utc>,
        resend_limit: Option<u32>,
        #[serde(default)]
        purpose: ChallengePurpose,
        ctx: Ctx,
    },
    CodeResent {
        challenge_id: ChallengeId,
        method: Method,
        generation: u32,
        resends: u32,
        ctx: Ctx,
    },
    ChallengeMethodSwitched {
        challenge_id: ChallengeId,
        from: Method,
        to: Method,
        generation: u32,
        ctx: Ctx,
    },
    CodeRejected {
        challenge_id: ChallengeId,
        proof: ProofKind,
        reason: RejectionReason,
        failures: u32,
        ctx: Ctx,
    },
    UserLockedOut {
        failures: u32,
        ended_sessions: Vec<SessionId>,
        ctx: Ctx,
    },
    ChallengeExpired {
        challenge_id: ChallengeId,
        ctx: Ctx,
    },
    CodeVerified {
        challenge_id: ChallengeId,
        method: Method,
        totp_step: Option<u64>,
        ctx: Ctx,
    },
    BackupCodeUsed {
        challenge_id: ChallengeId,
        slot: usize,
        remaining: usize,
        ctx: Ctx,
    },
    SessionStarted {
        session_id: SessionId,
        token_hash: SecretHash,
        expires_at: DateTime<Utc>,
        second_factor: SecondFactorUse,
        ctx: Ctx,
    },
    SessionEnded {
        session_id: SessionId,
        reason: SessionEndReason,
        ctx: Ctx,
    },
    /// The user gave a new email address or phone number: a code goes there
    /// (the `ChallengeIssued` that follows), and it is used only once the
    /// code comes back (`ContactVerified`).
    ContactVerificationStarted {
        challenge_id: ChallengeId,
        contact: NewContact,
        ctx: Ctx,
    },
    /// The code sent to a new contact came back: it is the user's now.
    ContactVerified {
        challenge_id: ChallengeId,
        contact: NewContact,
        /// The address or number it replaced (told of the change too).
        #[serde(default)]
        previous: Option<String>,
        ctx: Ctx,
    },
    /// A session in use (recorded at most every tenth of the idle timeout,
    /// and only where the tenant has one).
    SessionUsed {
        session_id: SessionId,
        ctx: Ctx,
    },
    TotpEnrollmentStarted {
        sealed: SealedSecret,
        ctx: Ctx,
    },
    EnrollmentCodeRejected {
        ctx: Ctx,
    },
    EnrollmentCompleted {
        method: Method,
        totp_step: u64,
        ctx: Ctx,
    },
    BackupCodesIssued {
        hashes: Vec<SecretHash>,
        ctx: Ctx,
    },
    /// The user's backup codes, sealed under the server key (bound to the
    /// user), so they can be shown again; verification keeps using hashes.
    BackupCodesSealed {
        sealed: SealedSecret,
        ctx: Ctx,
    },
    /// A used backup code's slot holds a new code (the tenant keeps 8).
    BackupCodeReplaced {
        slot: usize,
        hash: SecretHash,
        ctx: Ctx,
    },
    UserUnlocked {
        ctx: Ctx,
    },
    /// After a sign-in completed its second factor: the device's token (hashed)
    /// and, in `ctx.ip`, the address now trusted.
    DeviceRemembered {
        device_id: Uuid,
        token_hash: SecretHash,
        ctx: Ctx,
    },
    StepUpCompleted {
        session_id: SessionId,
        challenge_id: ChallengeId,
        ctx: Ctx,
    },
    /// The method the user wants asked first (`None`: the tenant's default).
    PreferredMethodSet {
        method: Option<Method>,
        ctx: Ctx,
    },
    /// A new password (its argon2id hash), set by the user or by an admin.
    PasswordChanged {
        password_hash: PasswordHash,
        ctx: Ctx,
    },
    /// A link to choose a new password went out (its token is derived from
    /// `reset_id` by the server key, never stored).
    PasswordResetLinkIssued {
        reset_id: Uuid,
        expires_at: DateTime<Utc>,
        ctx: Ctx,
    },
    /// The password must be changed before the user can do anything else.
    PasswordChangeRequired {
        ctx: Ctx,
    },
    /// A sign-in refused unlooked-at because the account's password-guessing
    /// budget asks to wait (whether the password was right is not checked).
    SignInThrottled {
        retry_after_secs: i64,
        /// Which budget was spent: the account's or the client address's.
        #[serde(default)]
        budget: GuessBudget,
        ctx: Ctx,
    },
    /// A sign-in that would need a second factor the user has no way to give
    /// (no usable method, none they could set up): refused, never let through.
    SignInRefusedNoMethod {
        ctx: Ctx,
    },
    /// The user chose not to set up an authenticator at this sign-in
    /// (optional enrollment); the challenge is closed.
    EnrollmentSkipped {
        challenge_id: ChallengeId,
        ctx: Ctx,
    },
    /// A remembered device is no longer trusted (the user or an admin forgot it).
    DeviceForgotten {
        device_id: Uuid,
        ctx: Ctx,
    },
    UserUpdated {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        roles: Option<Vec<Role>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        email: Option<Option<Email>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        phone: Option<Option<Phone>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service_account: Option<bool>,
        ctx: Ctx,
    },
    TwoFactorSwitched {
        on: bool,
        ctx: Ctx,
    },
    VoluntaryTwoFactorChanged {
        on: bool,
        ctx: Ctx,
    },
    EnrollmentReset {
        ctx: Ctx,
    },
    AuthenticatorRemoved {
        ctx: Ctx,
    },
    /// Sessions ended at once (revocation, reset, factor change); with
    /// `devices_forgotten`, remembered devices and trusted IPs too.
    SessionsRevoked {
        session_ids: Vec<SessionId>,
        devices_forgotten: bool,
        ctx: Ctx,
    },
    /// An admin erased the user (with a reason): their personal data can no
    /// longer be read, and the account is gone. Carries nothing of the user's.
    UserErased {
        ctx: Ctx,
    },
    /// This user, an admin or an auditor, read another's data or the audit
    /// history (recorded before the answer is given).
    AuditRead {
        read: AuditedRead,
        ctx: Ctx,
    },
}

impl UserEvent {
    pub fn ctx(&self) -> &Ctx {
        match self {
            UserEvent::UserRegistered { ctx, .. }
            | UserEvent::PasswordRejected { ctx }
            | UserEvent::SignInRefusedLocked { ctx }
            | UserEvent::SecondFactorSkipped { ctx, .. }
            | UserEvent::ChallengeIssued { ctx, .. }
            | UserEvent::CodeResent { ctx, .. }
            | UserEvent::ChallengeMethodSwitched { ctx, .. }
            | UserEvent::CodeRejected { ctx, .. }
            | UserEvent::UserLockedOut { ctx, .. }
            | UserEvent::ChallengeExpired { ctx, .. }
            | UserEvent::CodeVerified { ctx, .. }
            | UserEvent::BackupCodeUsed { ctx, .. }
            | UserEvent::SessionStarted { ctx, .. }
            | UserEvent::SessionEnded { ctx, .. }
            | UserEvent::SessionUsed { ctx, .. }
            | UserEvent::ContactVerificationStarted { ctx, .. }
            | UserEvent::ContactVerified { ctx, .. }
            | UserEvent::PasswordResetLinkIssued { ctx, .. }
            | UserEvent::TotpEnrollmentStarted { ctx, .. }
            | UserEvent::EnrollmentCodeRejected { ctx }
            | UserEvent::EnrollmentCompleted { ctx, .. }
            | UserEvent::BackupCodesIssued { ctx, .. }
            | UserEvent::BackupCodesSealed { ctx, .. }
            | UserEvent::BackupCodeReplaced { ctx, .. }
            | UserEvent::UserUnlocked { ctx }
            | UserEvent::DeviceRemembered { ctx, .. }
            | UserEvent::StepUpCompleted { ctx, .. }
            | UserEvent::DeviceForgotten { ctx, .. }
            | UserEvent::SignInRefusedNoMethod { ctx }
            | UserEvent::SignInThrottled { ctx, .. }
            | UserEvent::PasswordChanged { ctx, .. }
            | UserEvent::PasswordChangeRequired { ctx }
            | UserEvent::EnrollmentSkipped { ctx, .. }
            | UserEvent::PreferredMethodSet { ctx, .. }
            | UserEvent::UserUpdated { ctx, .. }
            | UserEvent::TwoFactorSwitched { ctx, .. }
            | UserEvent::VoluntaryTwoFactorChanged { ctx, .. }
            | UserEvent::EnrollmentReset { ctx }
            | UserEvent::AuthenticatorRemoved { ctx }
            | UserEvent::SessionsRevoked { ctx, .. }
            | UserEvent::UserErased { ctx }
            | UserEvent::AuditRead { ctx, .. } => ctx,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            UserEvent::UserRegistered { .. } => "UserRegistered",
            UserEvent::PasswordRejected { .. } => "PasswordRejected",
            UserEvent::SignInRefusedLocked { .. } => "SignInRefusedLocked",
            UserEvent::SecondFactorSkipped { .. } => "SecondFactorSkipped",
            UserEvent::ChallengeIssued { .. } => "ChallengeIssued",
            UserEvent::CodeResent { .. } => "CodeResent",
            UserEvent::ChallengeMethodSwitched { .. } => "ChallengeMethodSwitched",
            UserEvent::CodeRejected { .. } => "CodeRejected",
            UserEvent::UserLockedOut { .. } => "UserLockedOut",
            UserEvent::ChallengeExpired { .. } => "ChallengeExpired",
            UserEvent::CodeVerified { .. } => "CodeVerified",
            UserEvent::BackupCodeUsed { .. } => "BackupCodeUsed",
            UserEvent::SessionStarted { .. } => "SessionStarted",
            UserEvent::SessionEnded { .. } => "SessionEnded",
            UserEvent::TotpEnrollmentStarted { .. } => "TotpEnrollmentStarted",
            UserEvent::EnrollmentCodeRejected { .. } => "EnrollmentCodeRejected",
            UserEvent::EnrollmentCompleted { .. } => "EnrollmentCompleted",
            UserEvent::BackupCodesIssued { .. } => "BackupCodesIssued",
            UserEvent::BackupCodesSealed { .. } => "BackupCodesSealed",
            UserEvent::BackupCodeReplaced { .. } => "BackupCodeReplaced",
            UserEvent::UserUnlocked { .. } => "UserUnlocked",
            UserEvent::DeviceRemembered { .. } => "DeviceRemembered",
            UserEvent::StepUpCompleted { .. } => "StepUpCompleted",
            UserEvent::DeviceForgotten { .. } => "DeviceForgotten",
            UserEvent::SessionUsed { .. } => "SessionUsed",
            UserEvent::ContactVerificationStarted { .. } => "ContactVerificationStarted",
            UserEvent::ContactVerified { .. } => "ContactVerified",
            UserEvent::PasswordResetLinkIssued { .. } => "PasswordResetLinkIssued",
            UserEvent::SignInRefusedNoMethod { .. } => "SignInRefusedNoMethod",
            UserEvent::SignInThrottled { .. } => "SignInThrottled",
            UserEvent::PasswordChanged { .. } => "PasswordChanged",
            UserEvent::PasswordChangeRequired { .. } => "PasswordChangeRequired",
            UserEvent::EnrollmentSkipped { .. } => "EnrollmentSkipped",
            UserEvent::PreferredMethodSet { .. } => "PreferredMethodSet",
            UserEvent::UserUpdated { .. } => "UserUpdated",
            UserEvent::TwoFactorSwitched { .. } => "TwoFactorSwitched",
            UserEvent::VoluntaryTwoFactorChanged { .. } => "VoluntaryTwoFactorChanged",
            UserEvent::EnrollmentReset { .. } => "EnrollmentReset",
            UserEvent::AuthenticatorRemoved { .. } => "AuthenticatorRemoved",
            UserEvent::SessionsRevoked { .. } => "SessionsRevoked",
            UserEvent::UserErased { .. } => "UserErased",
            UserEvent::AuditRead { .. } => "AuditRead",
        }
    }
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        self.name().to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// A new email address or phone number, waiting for its code to come back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewContact {
    Email(Email),
    Phone(Phone),
}

impl NewContact {
    /// The method whose code goes to it.
    pub fn method(&self) -> Method {
        match self {
            Self::Email(_) => Method::Email,
            Self::Phone(_) => Method::Sms,
        }
    }

    /// The address or number.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Email(e) => e.as_str(),
            Self::Phone(p) => p.as_str(),
        }
    }
}

/// The password-guessing budget a throttled sign-in ran into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuessBudget {
    /// Wrong passwords in a row for this account, from any address.
    #[default]
    Account,
    /// Wrong passwords from the client's address in the hour, across accounts.
    Address,
}
