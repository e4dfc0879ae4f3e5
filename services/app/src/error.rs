//! The application layer's error: what went wrong, with a stable
//! machine-readable code and a message for humans. Adapters choose how to
//! show it (an HTTP status, a line on a page, a CLI message); internals are
//! logged here, never put in a message.

use serde_json::{json, Value};
use twofold_domain::tenant::TenantError;
use twofold_domain::user::UserError;
use twofold_domain::values::ValueError;
use twofold_platform::store::{is_connection_problem, CreateError, ExecError, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("No such tenant.")]
    TenantNotFound,
    #[error("No such user.")]
    UserNotFound,
    #[error("This user was erased: nothing of theirs can be shown or changed.")]
    UserErased,
    #[error("No such challenge, or it is already finished.")]
    ChallengeNotFound,
    #[error("The username or password is wrong.")]
    InvalidCredentials,
    #[error("A valid session token is required (Authorization: Bearer <token>).")]
    Unauthenticated,
    #[error("This needs the admin role.")]
    Forbidden,
    #[error("Admin actions need a session that passed a second factor: confirm with a code (POST /me/step-up, then /challenge/verify), or sign in again.")]
    SecondFactorRequired,
    #[error(
        "This account is locked after too many wrong codes. Ask an administrator to unlock it."
    )]
    Locked,
    #[error("A user with this username already exists in the tenant.")]
    UsernameTaken,
    /// A session whose user must change a one-time password first.
    #[error("Change your password first: it was set for you and works only until you do (POST /me/password).")]
    PasswordChangeRequired,
    /// A sign-in that needs a second factor the user has no way to give.
    #[error("Your organization requires a second factor, and none you could use is set up. Ask an administrator to add your email address or phone number.")]
    NoUsableMethod,
    /// A settings change after which the admin saving it could not pass the
    /// admin's second-factor check.
    #[error("These settings would lock you out: you have no method they allow. Set up an authenticator or an allowed contact first, or allow a method you have.")]
    WouldLockYouOut,
    /// A wrong (or reused) code; `attempts_remaining` where failures count.
    #[error("{message}")]
    InvalidCode {
        message: String,
        attempts_remaining: Option<u32>,
    },
    #[error("{0}")]
    InvalidField(ValueError),
    /// An hourly budget of codes sent (for the account, its email address or
    /// phone, or the client's address) is spent.
    #[error("Too many codes were sent in the last hour. Try again later, or use your authenticator app or a recovery code.")]
    CodeLimitReached { retry_after_secs: i64 },
    /// Settings that name an SMS provider this deployment does not have.
    #[error("Invalid two-factor settings: sms_provider must name a configured SMS provider ({}).", if configured.is_empty() { "none is configured".to_string() } else { configured.join(", ") })]
    UnknownSmsProvider { configured: Vec<String> },
    /// Input of the wrong shape, named by `code` (`invalid_code_format`, ...).
    #[error("{message}")]
    BadInput { code: &'static str, message: String },
    /// As many tenant-wide audit exports as this server streams at once are
    /// streaming.
    #[error("Too many audit exports are being downloaded from this server right now (it streams at most {running} at once). Try again when one has finished.")]
    ExportsBusy { running: usize },
    /// A report's query parameters do not fit.
    #[error("{0}")]
    InvalidQuery(String),
    #[error(transparent)]
    Refused(UserError),
    #[error(transparent)]
    Tenant(TenantError),
    #[error(
        "twofold cannot reach its database right now. Nothing was changed; try again shortly."
    )]
    Unavailable(#[source] anyhow::Error),
    #[error("Something went wrong on our side. Try again.")]
    Unexpected(#[source] anyhow::Error),
}

impl AppError {
    pub fn bad_input(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadInput {
            code,
            message: message.into(),
        }
    }

    /// Something that should not happen: logged with its detail, answered
    /// without it.
    pub fn unexpected(err: impl Into<anyhow::Error>) -> Self {
        let err = err.into();
        tracing::error!(error = %format!("{err:#}"), "unexpected failure");
        Self::Unexpected(err)
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TenantNotFound => "tenant_not_found",
            Self::UserNotFound => "user_not_found",
            Self::UserErased => "user_erased",
            Self::ChallengeNotFound => "challenge_not_found",
            Self::InvalidCredentials => "invalid_credentials",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::SecondFactorRequired => "second_factor_required",
            Self::Locked => "account_locked",
            Self::UsernameTaken => "username_taken",
            Self::NoUsableMethod => "second_factor_unavailable",
            Self::PasswordChangeRequired => "password_change_required",
            Self::WouldLockYouOut => "would_lock_you_out",
            Self::InvalidCode { .. } => "invalid_code",
            Self::InvalidField(_) => "invalid_field",
            Self::CodeLimitReached { .. } => "code_limit_reached",
            Self::UnknownSmsProvider { .. } => "invalid_settings",
            Self::BadInput { code, .. } => code,
            Self::InvalidQuery(_) => "invalid_query",
            Self::ExportsBusy { .. } => "exports_busy",
            Self::Refused(e) => user_error_code(e),
            Self::Tenant(e) => match e {
                TenantError::NotFound => "tenant_not_found",
                TenantError::AlreadyExists => "tenant_exists",
                TenantError::InvalidName => "invalid_field",
                TenantError::InvalidSettings(_) => "invalid_settings",
                TenantError::NotAnAdmin => "forbidden",
            },
            Self::Unavailable(_) => "service_unavailable",
            Self::Unexpected(_) => "internal_error",
        }
    }

    /// The message for humans: never an internal detail.
    pub fn message(&self) -> String {
        match self {
            Self::Refused(e) => sentence(&e.to_string()),
            Self::Tenant(TenantError::NotFound) => "No such tenant.".to_string(),
            Self::Tenant(TenantError::AlreadyExists) => "The tenant already exists.".to_string(),
            Self::Tenant(TenantError::InvalidName) => {
                "The tenant name must be 1 to 100 characters, without ':'.".to_string()
            }
            Self::Tenant(TenantError::InvalidSettings(e)) => {
                format!("Invalid two-factor settings: {}", e.message)
            }
            Self::Tenant(TenantError::NotAnAdmin) => Self::Forbidden.to_string(),
            other => other.to_string(),
        }
    }

    /// Fields beside code and message (`field`, `attempts_remaining`, ...).
    pub fn details(&self) -> Option<Value> {
        match self {
            Self::InvalidField(e) => Some(json!({ "field": e.field })),
            Self::UnknownSmsProvider { configured } => {
                Some(json!({ "field": "sms_provider", "configured": configured }))
            }
            Self::Tenant(TenantError::InvalidName) => Some(json!({ "field": "name" })),
            Self::Tenant(TenantError::InvalidSettings(e)) => Some(json!({ "field": e.field })),
            Self::InvalidCode {
                attempts_remaining: Some(n),
                ..
            } => Some(json!({ "attempts_remaining": n })),
            Self::SecondFactorRequired => Some(json!({ "step_up": "/me/step-up" })),
            Self::Refused(UserError::TooManyAttempts { retry_after_secs })
            | Self::CodeLimitReached { retry_after_secs } => {
                Some(json!({ "retry_after_secs": retry_after_secs }))
            }
            _ => None,
        }
    }
}

fn user_error_code(err: &UserError) -> &'static str {
    match err {
        UserError::AlreadyExists => "user_exists",
        UserError::NotFound => "user_not_found",
        UserError::ChallengeNotFound => "challenge_not_found",
        UserError::ChallengeExpired => "challenge_expired",
        UserError::LockedOut => "account_locked",
        UserError::ResendLimitReached => "resend_limit_reached",
        UserError::NothingToResend => "nothing_to_resend",
        UserError::MethodNotAvailable => "method_not_available",
        UserError::ProofDoesNotFitChallenge => "wrong_code_kind",
        UserError::SessionNotFound => "session_not_found",
        UserError::OneContactAtATime => "one_contact_at_a_time",
        UserError::ResetLinkInvalid => "reset_link_invalid",
        UserError::NoEmailForLink => "no_email",
        UserError::DeviceNotFound => "device_not_found",
        UserError::EnrollmentRequired => "enrollment_required",
        UserError::LoginAsNotAllowed => "login_as_not_allowed",
        UserError::CurrentPasswordWrong => "invalid_credentials",
        UserError::AlreadyEnrolled => "already_enrolled",
        UserError::NoEnrollmentInProgress => "no_enrollment_in_progress",
        UserError::WrongBackupCodeCount { .. } => "internal_error",
        UserError::NotLocked => "not_locked",
        UserError::ReasonRequired => "reason_required",
        UserError::TooManyAttempts { .. } => "too_many_attempts",
        UserError::StepUpRequired => "step_up_required",
        UserError::TwoFactorUnavailable => "two_factor_unavailable",
        UserError::CannotChangeOwnFactor => "cannot_change_own_factor",
        UserError::NotEnrolled => "not_enrolled",
        UserError::WrongChallengePurpose => "wrong_challenge_purpose",
        UserError::NotAReader => "forbidden",
    }
}

/// A domain message (`the challenge has expired`) as a sentence.
fn sentence(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => format!("{}{}.", f.to_uppercase(), c.as_str()),
        None => String::new(),
    }
}

impl From<UserError> for AppError {
    fn from(err: UserError) -> Self {
        match err {
            UserError::LockedOut => Self::Locked,
            UserError::ChallengeNotFound => Self::ChallengeNotFound,
            UserError::NotFound => Self::UserNotFound,
            UserError::NotAReader => Self::Forbidden,
            // A programming error, not the caller's.
            UserError::WrongBackupCodeCount { .. } => Self::unexpected(anyhow::Error::new(err)),
            other => Self::Refused(other),
        }
    }
}

impl From<TenantError> for AppError {
    fn from(err: TenantError) -> Self {
        match err {
            TenantError::NotFound => Self::TenantNotFound,
            TenantError::NotAnAdmin => Self::Forbidden,
            other => Self::Tenant(other),
        }
    }
}

impl From<ValueError> for AppError {
    fn from(err: ValueError) -> Self {
        Self::InvalidField(err)
    }
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(e) => {
                tracing::error!(error = %e, "event store unavailable");
                Self::Unavailable(e)
            }
            StoreError::Unexpected(e) => Self::unexpected(e),
        }
    }
}

impl From<anyhow::Error> for AppError {
    fn from(err: anyhow::Error) -> Self {
        if is_connection_problem(err.as_ref()) {
            return StoreError::Unavailable(err).into();
        }
        Self::unexpected(err)
    }
}

impl From<sqlx::Error> for AppError {
    fn from(err: sqlx::Error) -> Self {
        anyhow::Error::from(err).into()
    }
}

impl<E> From<ExecError<E>> for AppError
where
    E: std::error::Error + Into<AppError>,
{
    fn from(err: ExecError<E>) -> Self {
        match err {
            ExecError::Refused(e) => e.into(),
            // Only commands that name what they read can see this, and they
            // go through the loop that reads again; reaching here is a bug.
            ExecError::ReadMoved => Self::unexpected(anyhow::anyhow!(
                "a command's reads moved and it was not retried"
            )),
            ExecError::Store(e) => e.into(),
        }
    }
}

impl From<CreateError<UserError>> for AppError {
    fn from(err: CreateError<UserError>) -> Self {
        match err {
            CreateError::Refused(e) => e.into(),
            CreateError::Taken => Self::UsernameTaken,
            CreateError::Exists => Self::Refused(UserError::AlreadyExists),
            CreateError::Store(e) => e.into(),
        }
    }
}
