//! The one error type of the HTTP API: a status, a stable machine-readable
//! `code`, and a human message; the application layer's errors map onto it.
//! Internals are logged, never returned.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use twofold_app::AppError;

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

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "No such endpoint.")
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

impl From<AppError> for ApiError {
    fn from(err: AppError) -> Self {
        let mut api = Self::new(status_of(&err), err.code(), err.message());
        api.details = err.details();
        api
    }
}

/// The HTTP status of an application error.
pub fn status_of(err: &AppError) -> StatusCode {
    use StatusCode as S;
    match err {
        AppError::TenantNotFound | AppError::UserNotFound | AppError::ChallengeNotFound => {
            S::NOT_FOUND
        }
        AppError::UserErased => S::GONE,
        AppError::InvalidCredentials | AppError::Unauthenticated | AppError::InvalidCode { .. } => {
            S::UNAUTHORIZED
        }
        AppError::Forbidden
        | AppError::SecondFactorRequired
        | AppError::NoUsableMethod
        | AppError::PasswordChangeRequired => S::FORBIDDEN,
        AppError::Locked => S::LOCKED,
        AppError::CodeLimitReached { .. } | AppError::ExportsBusy { .. } => S::TOO_MANY_REQUESTS,
        AppError::UsernameTaken | AppError::WouldLockYouOut => S::CONFLICT,
        AppError::InvalidField(_)
        | AppError::InvalidQuery(_)
        | AppError::UnknownSmsProvider { .. } => S::UNPROCESSABLE_ENTITY,
        AppError::BadInput { .. } => S::BAD_REQUEST,
        AppError::Refused(e) => user_error_status(e),
        AppError::Tenant(_) => match err.code() {
            "tenant_not_found" => S::NOT_FOUND,
            "tenant_exists" => S::CONFLICT,
            "forbidden" => S::FORBIDDEN,
            _ => S::UNPROCESSABLE_ENTITY,
        },
        AppError::Unavailable(_) => S::SERVICE_UNAVAILABLE,
        AppError::Unexpected(_) => S::INTERNAL_SERVER_ERROR,
    }
}

fn user_error_status(err: &twofold_domain::user::UserError) -> StatusCode {
    use twofold_domain::user::UserError as E;
    use StatusCode as S;
    match err {
        E::AlreadyExists | E::NothingToResend | E::MethodNotAvailable | E::AlreadyEnrolled => {
            S::CONFLICT
        }
        E::NoEnrollmentInProgress | E::NotLocked | E::TwoFactorUnavailable => S::CONFLICT,
        E::NotEnrolled | E::WrongChallengePurpose | E::EnrollmentRequired => S::CONFLICT,
        E::NotFound | E::ChallengeNotFound | E::SessionNotFound | E::DeviceNotFound => S::NOT_FOUND,
        E::ChallengeExpired => S::GONE,
        E::LockedOut => S::LOCKED,
        E::ResendLimitReached | E::TooManyAttempts { .. } => S::TOO_MANY_REQUESTS,
        E::ProofDoesNotFitChallenge | E::OneContactAtATime => S::BAD_REQUEST,
        E::ResetLinkInvalid => S::GONE,
        E::NoEmailForLink => S::CONFLICT,
        E::ReasonRequired => S::UNPROCESSABLE_ENTITY,
        E::StepUpRequired | E::CannotChangeOwnFactor | E::LoginAsNotAllowed => S::FORBIDDEN,
        E::NotAReader => S::FORBIDDEN,
        E::CurrentPasswordWrong => S::UNAUTHORIZED,
        E::WrongBackupCodeCount { .. } => S::INTERNAL_SERVER_ERROR,
    }
}
