//! The signed-in user's own account over HTTP: profile, authenticator
//! enrollment, step-up and the changes it allows.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use twofold_app::me::{ContactChange, Profile};

use crate::error::ApiError;
use crate::extract::{ApiJson, RequestMeta, SignedIn};
use crate::routes::auth::{challenge_json, enrollment_json};
use crate::ApiState;

/// `GET /v1/tenants/{tenant}/me`
pub async fn profile(SignedIn(session): SignedIn) -> Json<Profile> {
    Json(twofold_app::me::profile(&session))
}

/// `POST /v1/tenants/{tenant}/me/totp`: starts enrolling an authenticator app.
pub async fn start_totp(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedIn(session): SignedIn,
) -> Result<Response, ApiError> {
    let enrollment = api.app.start_totp(&session, &origin).await?;
    Ok((StatusCode::CREATED, Json(enrollment_json(&enrollment))).into_response())
}

/// `GET /v1/tenants/{tenant}/me/totp/qr.png`: the pending enrollment's QR code.
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmBody {
    code: String,
}

/// `POST /v1/tenants/{tenant}/me/totp/confirm`: activates the authenticator;
/// answers the 8 backup codes, shown this once.
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

/// `POST /v1/tenants/{tenant}/me/step-up`: a challenge for a current factor
/// before a sensitive change; answer it at `/challenge/verify`.
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoluntaryBody {
    enabled: bool,
}

/// `POST /v1/tenants/{tenant}/me/two-factor`
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

/// `GET /v1/tenants/{tenant}/me/backup-codes`: the codes again (after a step-up).
pub async fn backup_codes(
    State(api): State<ApiState>,
    SignedIn(session): SignedIn,
) -> Result<Json<Value>, ApiError> {
    let codes = api.app.own_backup_codes(&session)?;
    Ok(Json(json!({ "backup_codes": codes })))
}

/// `POST /v1/tenants/{tenant}/me/backup-codes`: new codes (after a step-up).
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContactBody {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    phone: Option<String>,
}

/// `PATCH /v1/tenants/{tenant}/me`: change where codes go (after a step-up).
/// Clearing applies at once (204); a new address or number answers 202 with
/// the challenge whose code went there: it is used once that code comes
/// back at `/challenge/verify`.
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

/// `DELETE /v1/tenants/{tenant}/me/totp`: remove the authenticator (after a step-up).
pub async fn remove_totp(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedIn(session): SignedIn,
) -> Result<StatusCode, ApiError> {
    api.app.remove_totp(&session, &origin).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferredBody {
    method: Option<String>,
}

/// `POST /v1/tenants/{tenant}/me/preferred-method` `{method}`: the method asked
/// first at sign-in (`null`: the tenant's default).
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordBody {
    current_password: secrecy::SecretString,
    new_password: secrecy::SecretString,
}

/// `POST /v1/tenants/{tenant}/me/password`: a new password (the current one,
/// and a step-up where 2FA asks this user for one); other sessions end.
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
