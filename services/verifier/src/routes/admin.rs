//! Admin endpoints over HTTP: users and the tenant's two-factor settings.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use twofold_app::accounts::NewUser;
use twofold_app::admin::{UserAction, UserDetail, UserUpdate};
use twofold_app::AppError;
use twofold_domain::tenant::TwoFactorSettings;

use crate::error::ApiError;
use crate::extract::{ApiJson, RequestMeta, SignedInAdmin, SignedInReader};
use crate::ApiState;

/// `POST /v1/tenants/{tenant}/users`
pub async fn create_user(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    ApiJson(body): ApiJson<NewUser>,
) -> Result<Response, ApiError> {
    let user_id = api.app.admin_create_user(&admin, body, &origin).await?;
    Ok((StatusCode::CREATED, Json(json!({ "user_id": user_id }))).into_response())
}

/// `GET /v1/tenants/{tenant}/settings`
pub async fn get_settings(
    State(api): State<ApiState>,
    SignedInAdmin(admin): SignedInAdmin,
) -> Result<Json<TwoFactorSettings>, ApiError> {
    Ok(Json(api.app.settings(&admin).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeSettings {
    settings: TwoFactorSettings,
    #[serde(default)]
    reason: Option<String>,
}

/// `PUT /v1/tenants/{tenant}/settings`
pub async fn put_settings(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    ApiJson(body): ApiJson<ChangeSettings>,
) -> Result<Json<TwoFactorSettings>, ApiError> {
    let stored = api
        .app
        .put_settings(&admin, body.settings, body.reason, &origin)
        .await?;
    Ok(Json(stored))
}

/// A JSON field that may be absent (leave as is), `null` (clear) or a value.
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserBody {
    #[serde(default)]
    roles: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    email: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    phone: Option<Option<String>>,
    #[serde(default)]
    service_account: Option<bool>,
    #[serde(default)]
    two_factor_switched_on: Option<bool>,
    #[serde(default, deserialize_with = "double_option")]
    preferred_method: Option<Option<String>>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/tenants/{tenant}/users/{user}/erase` `{reason}`: 204; 403
/// `step_up_required` without a fresh step-up, 422 without a reason.
pub async fn erase_user(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    Path((_, user)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    api.app
        .erase_user(&admin, &user, body.reason, &origin)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/tenants/{tenant}/users/{user}`
pub async fn get_user(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    RequestMeta(origin): RequestMeta,
    Path((_, user)): Path<(String, String)>,
) -> Result<Json<UserDetail>, ApiError> {
    Ok(Json(api.app.user_detail(&reader, &origin, &user).await?))
}

/// `PATCH /v1/tenants/{tenant}/users/{user}`
pub async fn update_user(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    Path((_, user)): Path<(String, String)>,
    ApiJson(body): ApiJson<UpdateUserBody>,
) -> Result<StatusCode, ApiError> {
    let update = UserUpdate {
        roles: body.roles,
        email: body.email,
        phone: body.phone,
        service_account: body.service_account,
        two_factor_switched_on: body.two_factor_switched_on,
        preferred_method: body.preferred_method,
        reason: body.reason,
    };
    api.app.update_user(&admin, &user, update, &origin).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/tenants/{tenant}/users/{user}/{reset-enrollment|unlock|revoke-sessions}`
pub async fn act_on_user(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    Path((_, user, action)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    let action = match action.as_str() {
        "reset-enrollment" => UserAction::ResetEnrollment,
        "unlock" => UserAction::Unlock,
        "revoke-sessions" => UserAction::RevokeSessions,
        _ => return Err(ApiError::not_found()),
    };
    api.app
        .act_on_user(&admin, &user, action, body.reason, &origin)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/tenants/{tenant}/users/{user}/devices/{device}/forget`: one
/// remembered device forgotten (its next sign-in asks a second factor).
pub async fn forget_device(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    Path((_, user, device)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    let device = device.parse().map_err(|_| ApiError::not_found())?;
    api.app
        .act_on_user(
            &admin,
            &user,
            UserAction::ForgetDevice(device),
            body.reason,
            &origin,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/tenants/{tenant}/users/{user}/backup-codes`
pub async fn regenerate_backup_codes(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    Path((_, user)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let codes = api
        .app
        .regenerate_backup_codes_for(&admin, &user, body.reason, &origin)
        .await?;
    Ok(Json(json!({ "backup_codes": codes })))
}

/// `POST /v1/tenants/{tenant}/sessions/revoke-all`
pub async fn revoke_all_sessions(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let signed_out = api
        .app
        .revoke_all_sessions(&admin, body.reason, &origin)
        .await?;
    Ok(Json(json!({ "users_signed_out": signed_out })))
}

/// `POST /v1/tenants/{tenant}/users/{user}/login-as` `{reason}`: a short
/// session as the user (Login As), where the tenant allows it, after a
/// step-up; every event of that session names the admin.
pub async fn login_as(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    Path((_, user)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    use secrecy::ExposeSecret;
    let s = api
        .app
        .login_as(&admin, &user, body.reason, &origin)
        .await?;
    Ok(Json(json!({
        "session": { "token": s.session_token.expose_secret(), "expires_at": s.expires_at },
        "impersonated_by": admin.0.user_id,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetBody {
    #[serde(default)]
    reason: Option<String>,
    /// `email`: a link by email instead of a one-time password.
    #[serde(default)]
    via: Option<String>,
}

/// `POST /v1/tenants/{tenant}/users/{user}/reset-password` `{reason, via?}`:
/// a one-time password to hand over, to be changed at the next sign-in; with
/// `"via": "email"`, a link to choose one, emailed to the user (202).
pub async fn reset_password(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    Path((_, user)): Path<(String, String)>,
    ApiJson(body): ApiJson<ResetBody>,
) -> Result<Response, ApiError> {
    match body.via.as_deref() {
        None | Some("one_time_password") => {
            let password = api
                .app
                .reset_password(&admin, &user, body.reason, &origin)
                .await?;
            Ok(Json(json!({ "one_time_password": password })).into_response())
        }
        Some("email") => {
            let expires_at = api
                .app
                .send_reset_link(&admin, &user, body.reason, &origin)
                .await?;
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "status": "link_sent", "expires_at": expires_at })),
            )
                .into_response())
        }
        Some(_) => {
            Err(AppError::bad_input("invalid_via", "`via` is one_time_password or email.").into())
        }
    }
}
