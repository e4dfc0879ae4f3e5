//! The one error type of the HTTP API: a status, a stable machine-readable
//! `code`, and a human message. Internals are logged, never returned.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use twofold_domain::tenant::TenantError;
use twofold_domain::user::UserError;
use twofold_domain::values::ValueError;
use twofold_platform::store::{ExecError, StoreError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra fields merged into the error object (e.g. `field`, `attempts_remaining`).
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn tenant_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "tenant_not_found", "No such tenant.")
    }

    pub fn invalid_credentials() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "The username or password is wrong.",
        )
    }

    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "A valid session token is required (Authorization: Bearer <token>).",
        )
    }

    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "This needs the admin role.",
        )
    }

    pub fn locked() -> Self {
        Self::new(
            StatusCode::LOCKED,
            "account_locked",
            "This account is locked after too many wrong codes. Ask an administrator to unlock it.",
        )
    }

    pub fn invalid_value(err: ValueError) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            err.to_string(),
        )
        .with_details(json!({ "field": err.field }))
    }

    pub fn unexpected(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "unexpected failure");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "Something went wrong on our side. Try again.",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let (Some(Value::Object(extra)), Value::Object(obj)) = (self.details, &mut error) {
            obj.extend(extra);
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let (code, message) = match &rejection {
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => (
                "body_too_large",
                "The request body is too large.".to_string(),
            ),
            JsonRejection::MissingJsonContentType(_) => (
                "unsupported_media_type",
                "Send JSON with Content-Type: application/json.".to_string(),
            ),
            JsonRejection::JsonSyntaxError(_) => (
                "malformed_json",
                "The request body is not valid JSON.".to_string(),
            ),
            // serde's message names the field and the expected type, nothing internal.
            JsonRejection::JsonDataError(e) => ("invalid_body", e.body_text()),
            _ => (
                "invalid_body",
                "The request body could not be read.".to_string(),
            ),
        };
        let status = match code {
            "body_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
            "unsupported_media_type" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "malformed_json" => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        Self::new(status, code, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(e) => {
                tracing::error!(error = %e, "event store unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    "twofold cannot reach its database right now. Nothing was changed; try again shortly.",
                )
            }
            StoreError::Unexpected(e) => Self::unexpected(e),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        if twofold_platform::store::is_connection_problem(err.as_ref()) {
            return StoreError::Unavailable(err).into();
        }
        Self::unexpected(format!("{err:#}"))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        anyhow::Error::from(err).into()
    }
}

impl From<UserError> for ApiError {
    fn from(err: UserError) -> Self {
        use StatusCode as S;
        let (status, code) = match &err {
            UserError::AlreadyExists => (S::CONFLICT, "user_exists"),
            UserError::NotFound => (S::NOT_FOUND, "user_not_found"),
            UserError::ChallengeNotFound => (S::NOT_FOUND, "challenge_not_found"),
            UserError::ChallengeExpired => (S::GONE, "challenge_expired"),
            UserError::LockedOut => return Self::locked(),
            UserError::ResendLimitReached => (S::TOO_MANY_REQUESTS, "resend_limit_reached"),
            UserError::NothingToResend => (S::CONFLICT, "nothing_to_resend"),
            UserError::MethodNotAvailable => (S::CONFLICT, "method_not_available"),
            UserError::ProofDoesNotFitChallenge => (S::BAD_REQUEST, "wrong_code_kind"),
            UserError::SessionNotFound => (S::NOT_FOUND, "session_not_found"),
            UserError::AlreadyEnrolled => (S::CONFLICT, "already_enrolled"),
            UserError::NoEnrollmentInProgress => (S::CONFLICT, "no_enrollment_in_progress"),
            UserError::WrongBackupCodeCount { .. } => return Self::unexpected(err),
            UserError::NotLocked => (S::CONFLICT, "not_locked"),
            UserError::ReasonRequired => (S::UNPROCESSABLE_ENTITY, "reason_required"),
            UserError::TooManyAttempts { retry_after_secs } => {
                return Self::new(
                    S::TOO_MANY_REQUESTS,
                    "too_many_attempts",
                    capitalize(&err.to_string()),
                )
                .with_details(json!({ "retry_after_secs": retry_after_secs }))
            }
            UserError::StepUpRequired => (S::FORBIDDEN, "step_up_required"),
            UserError::TwoFactorUnavailable => (S::CONFLICT, "two_factor_unavailable"),
            UserError::CannotChangeOwnFactor => (S::FORBIDDEN, "cannot_change_own_factor"),
            UserError::NotEnrolled => (S::CONFLICT, "not_enrolled"),
            UserError::WrongChallengePurpose => (S::CONFLICT, "wrong_challenge_purpose"),
        };
        Self::new(status, code, capitalize(&err.to_string()))
    }
}

impl From<TenantError> for ApiError {
    fn from(err: TenantError) -> Self {
        match err {
            TenantError::NotFound => Self::tenant_not_found(),
            TenantError::AlreadyExists => Self::new(
                StatusCode::CONFLICT,
                "tenant_exists",
                "The tenant already exists.",
            ),
            TenantError::InvalidName => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                "The tenant name must be 1 to 100 characters, without ':'.",
            )
            .with_details(json!({"field": "name"})),
            TenantError::InvalidSettings(e) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_settings",
                format!("Invalid two-factor settings: {}", e.message),
            )
            .with_details(json!({"field": e.field})),
            TenantError::NotAnAdmin => Self::forbidden(),
        }
    }
}

impl<E> From<ExecError<E>> for ApiError
where
    E: std::error::Error + Into<ApiError>,
{
    fn from(err: ExecError<E>) -> Self {
        match err {
            ExecError::Refused(e) => e.into(),
            // Only commands that name what they read can see this, and their
            // handlers read again; reaching here is a bug, not the caller's.
            ExecError::ReadMoved => {
                ApiError::unexpected("a command's reads moved and it was not retried")
            }
            ExecError::Store(e) => e.into(),
        }
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => format!("{}{}.", f.to_uppercase(), c.as_str()),
        None => String::new(),
    }
}
