//! The signed-in user's own account over HTTP: profile, authenticator
//! enrollment, step-up and the changes it allows.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use twofold_app::me::{ContactChange, Profile};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::extract::{ApiJson, RequestMeta, SignedIn};
use crate::openapi::{
    AnyErrors, BackupCodes, BodyErrors, ChallengeIssued, Enrollment, ErrorBody, SessionErrors,
    ShownBackupCodes, TenantPath, TotpConfirmed,
};
use crate::routes::auth::{challenge_json, enrollment_json};
use crate::ApiState;

/// The signed-in user's account
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/me", tag = "self-service", params(TenantPath),
    security(("session" = [])),
    responses((status = 200, body = crate::openapi::Profile), AnyErrors, SessionErrors)
)]
pub async fn profile(SignedIn(session): SignedIn) -> Json<Profile> {
    Json(twofold_app::me::profile(&session))
}

/// Start enrolling an authenticator app
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/me/totp", tag = "self-service", params(TenantPath),
    security(("session" = [])),
    responses(
        (status = 201, description = "the authenticator to scan or type in", body = Enrollment),
        AnyErrors, SessionErrors,
        (status = 409, description = "already enrolled", body = ErrorBody),
    )
)]
pub async fn start_totp(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedIn(session): SignedIn,
) -> Result<Response, ApiError> {
    let enrollment = api.app.start_totp(&session, &origin).await?;
    Ok((StatusCode::CREATED, Json(enrollment_json(&enrollment))).into_response())
}

/// The pending enrollment's QR code
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/me/totp/qr.png", tag = "self-service", params(TenantPath),
    security(("session" = [])),
    responses(
        (status = 200, description = "a PNG", content_type = "image/png", body = Vec<u8>),
        AnyErrors, SessionErrors,
        (status = 409, description = "no enrollment in progress", body = ErrorBody),
    )
)]
pub async fn totp_qr(
    State(api): State<ApiState>,
    SignedIn(session): SignedIn,
) -> Result<Response, ApiError> {
    let enrollment = api.app.pending_totp(&session)?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        enrollment.qr_png,
    )
        .into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmBody {
    code: String,
}

/// Activate the authenticator with a code from it
///
/// Answers the 8 backup codes, shown this once.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/me/totp/confirm", tag = "self-service", params(TenantPath),
    security(("session" = [])), request_body = ConfirmBody,
    responses(
        (status = 200, body = TotpConfirmed),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 401, description = "`invalid_code` with `attempts_remaining`; `unauthenticated`", body = ErrorBody),
        (status = 409, description = "no enrollment in progress", body = ErrorBody),
        (status = 423, description = "`account_locked`", body = ErrorBody),
        (status = 429, description = "`too_many_attempts`", body = ErrorBody),
    )
)]
pub async fn confirm_totp(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedIn(session): SignedIn,
    ApiJson(body): ApiJson<ConfirmBody>,
) -> Result<Json<Value>, ApiError> {
    let codes = api.app.confirm_totp(&session, &body.code, &origin).await?;
    Ok(Json(
        json!({ "two_factor": "enrolled", "backup_codes": codes }),
    ))
}

/// Ask for a step-up challenge
///
/// A challenge for a current factor before a sensitive change; answered at
/// `/challenge/verify`, it allows such changes in this session for 10 minutes.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/me/step-up", tag = "self-service", params(TenantPath),
    security(("session" = [])),
    responses(
        (status = 200, description = "`{\"status\": \"challenge\", challenge}`", body = ChallengeIssued),
        AnyErrors, SessionErrors,
        (status = 403, description = "`second_factor_unavailable`: no factor to step up with; `password_change_required`", body = ErrorBody),
        (status = 423, description = "`account_locked`", body = ErrorBody),
        (status = 429, description = "a code budget spent (`retry_after_secs`)", body = ErrorBody),
    )
)]
pub async fn step_up(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedIn(session): SignedIn,
) -> Result<Json<Value>, ApiError> {
    let challenge = api.app.step_up(&session, &origin).await?;
    Ok(Json(
        json!({ "status": "challenge", "challenge": challenge_json(&challenge) }),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoluntaryBody {
    enabled: bool,
}

/// Opt in to (or, after a step-up, out of) two-factor sign-in
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/me/two-factor", tag = "self-service", params(TenantPath),
    security(("session" = [])), request_body = VoluntaryBody,
    responses(
        (status = 204, description = "done"),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 403, description = "`step_up_required` (opting out), `password_change_required`", body = ErrorBody),
        (status = 409, description = "`two_factor_unavailable` or nothing enrolled", body = ErrorBody),
    )
)]
pub async fn set_voluntary(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedIn(session): SignedIn,
    ApiJson(body): ApiJson<VoluntaryBody>,
) -> Result<StatusCode, ApiError> {
    api.app
        .set_voluntary(&session, body.enabled, &origin)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The backup codes again, each with whether it was used (step-up)
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/me/backup-codes", tag = "self-service", params(TenantPath),
    security(("session" = [])),
    responses(
        (status = 200, body = ShownBackupCodes),
        AnyErrors, SessionErrors,
        (status = 403, description = "`step_up_required`, `password_change_required`", body = ErrorBody),
        (status = 409, description = "not enrolled", body = ErrorBody),
    )
)]
pub async fn backup_codes(
    State(api): State<ApiState>,
    SignedIn(session): SignedIn,
) -> Result<Json<Value>, ApiError> {
    let codes = api.app.own_backup_codes(&session)?;
    Ok(Json(json!({ "backup_codes": codes })))
}

/// New backup codes (step-up)
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/me/backup-codes", tag = "self-service", params(TenantPath),
    security(("session" = [])),
    responses(
        (status = 200, description = "the new codes, shown once", body = BackupCodes),
        AnyErrors, SessionErrors,
        (status = 403, description = "`step_up_required`, `password_change_required`", body = ErrorBody),
        (status = 409, description = "not enrolled", body = ErrorBody),
    )
)]
pub async fn regenerate_backup_codes(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedIn(session): SignedIn,
) -> Result<Json<Value>, ApiError> {
    let codes = api
        .app
        .regenerate_own_backup_codes(&session, &origin)
        .await?;
    Ok(Json(json!({ "backup_codes": codes })))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactBody {
    /// A new address, or `null` to clear it.
    #[serde(default)]
    #[schema(required = false)]
    email: Option<String>,
    /// A new number, or `null` to clear it.
    #[serde(default)]
    #[schema(required = false)]
    phone: Option<String>,
}

/// Change where codes go (step-up)
///
/// Clearing applies at once (204); a new address or number answers 202 with
/// the challenge whose code went there: it is used once that code comes
/// back at `/challenge/verify`.
#[utoipa::path(
    patch, path = "/v1/tenants/{tenant}/me", tag = "self-service", params(TenantPath),
    security(("session" = [])), request_body = ContactBody,
    responses(
        (status = 202, description = "`{\"status\": \"verification_sent\", challenge}`", body = ChallengeIssued),
        (status = 204, description = "cleared"),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 400, description = "`one_contact_at_a_time`, `malformed_json`", body = ErrorBody),
        (status = 403, description = "`step_up_required`, `password_change_required`", body = ErrorBody),
        (status = 409, description = "the change is not possible now", body = ErrorBody),
        (status = 422, description = "`invalid_field` with `field`, `invalid_body`", body = ErrorBody),
        (status = 429, description = "a code budget spent (`retry_after_secs`)", body = ErrorBody),
    )
)]
pub async fn change_contact(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedIn(session): SignedIn,
    ApiJson(body): ApiJson<ContactBody>,
) -> Result<Response, ApiError> {
    let change = ContactChange {
        email: body.email,
        phone: body.phone,
    };
    Ok(match api.app.change_contact(&session, change, &origin).await? {
        Some(challenge) => (
            StatusCode::ACCEPTED,
            Json(json!({ "status": "verification_sent", "challenge": challenge_json(&challenge) })),
        )
            .into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// Remove the authenticator (step-up); every session ends
#[utoipa::path(
    delete, path = "/v1/tenants/{tenant}/me/totp", tag = "self-service", params(TenantPath),
    security(("session" = [])),
    responses(
        (status = 204, description = "removed"),
        AnyErrors, SessionErrors,
        (status = 403, description = "`step_up_required`, `password_change_required`", body = ErrorBody),
        (status = 409, description = "not enrolled, or the tenant requires it", body = ErrorBody),
    )
)]
pub async fn remove_totp(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedIn(session): SignedIn,
) -> Result<StatusCode, ApiError> {
    api.app.remove_totp(&session, &origin).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreferredBody {
    /// `totp`, `email`, `sms`, or `null` for the tenant's default.
    method: Option<String>,
}

/// Choose the method asked first at sign-in
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/me/preferred-method", tag = "self-service", params(TenantPath),
    security(("session" = [])), request_body = PreferredBody,
    responses(
        (status = 204, description = "done"),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 409, description = "`method_not_available`: not set up", body = ErrorBody),
    )
)]
pub async fn set_preferred_method(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedIn(session): SignedIn,
    ApiJson(body): ApiJson<PreferredBody>,
) -> Result<StatusCode, ApiError> {
    api.app
        .set_preferred_method(&session, body.method.as_deref(), &origin)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordBody {
    #[schema(value_type = String)]
    current_password: secrecy::SecretString,
    /// 8 characters to 1024 bytes.
    #[schema(value_type = String)]
    new_password: secrecy::SecretString,
}

/// Change the password
///
/// Needs the current one, and a step-up where 2FA asks this user for one;
/// the user's other sessions end.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/me/password", tag = "self-service", params(TenantPath),
    security(("session" = [])), request_body = PasswordBody,
    responses(
        (status = 204, description = "changed"),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 401, description = "`current_password_wrong`, `unauthenticated`", body = ErrorBody),
        (status = 403, description = "`step_up_required`", body = ErrorBody),
        (status = 422, description = "`invalid_field` (the new password's length), `invalid_body`", body = ErrorBody),
    )
)]
pub async fn change_password(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedIn(session): SignedIn,
    ApiJson(body): ApiJson<PasswordBody>,
) -> Result<StatusCode, ApiError> {
    api.app
        .change_password(
            &session,
            &body.current_password,
            &body.new_password,
            &origin,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
