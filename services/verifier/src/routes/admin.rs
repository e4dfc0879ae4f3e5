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
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::extract::{ApiJson, RequestMeta, SignedInAdmin, SignedInReader};
use crate::openapi::{
    AnyErrors, BackupCodes, BodyErrors, ErrorBody, LoginAsSession, PasswordReset, SessionErrors,
    TenantPath, TwoFactorSettings as SettingsSchema, UserCreated, UserPath, UsersSignedOut,
};
use crate::ApiState;

/// Create a user
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/users", tag = "admin", params(TenantPath),
    security(("session" = [])), request_body = crate::openapi::NewUser,
    responses(
        (status = 201, body = UserCreated),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 409, description = "`username_taken`", body = ErrorBody),
        (status = 422, description = "`invalid_field` with `field`, `invalid_body`", body = ErrorBody),
    )
)]
pub async fn create_user(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    ApiJson(body): ApiJson<NewUser>,
) -> Result<Response, ApiError> {
    let user_id = api.app.admin_create_user(&admin, body, &origin).await?;
    Ok((StatusCode::CREATED, Json(json!({ "user_id": user_id }))).into_response())
}

/// The tenant's two-factor settings
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/settings", tag = "admin", params(TenantPath),
    security(("session" = [])),
    responses((status = 200, body = SettingsSchema), AnyErrors, SessionErrors)
)]
pub async fn get_settings(
    State(api): State<ApiState>,
    SignedInAdmin(admin): SignedInAdmin,
) -> Result<Json<TwoFactorSettings>, ApiError> {
    Ok(Json(api.app.settings(&admin).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeSettings {
    #[schema(value_type = SettingsSchema)]
    settings: TwoFactorSettings,
    /// Required (`422 reason_required` without it).
    #[serde(default)]
    #[schema(required = false)]
    reason: Option<String>,
}

/// Change the tenant's two-factor settings, with a reason
#[utoipa::path(
    put, path = "/v1/tenants/{tenant}/settings", tag = "admin", params(TenantPath),
    security(("session" = [])), request_body = ChangeSettings,
    responses(
        (status = 200, description = "the settings as stored", body = SettingsSchema),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 409, description = "`would_lock_you_out`", body = ErrorBody),
        (status = 422, description = "`invalid_settings` with `field`, `reason_required`, `invalid_body`", body = ErrorBody),
    )
)]
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    /// Recorded in the event; required (`422 reason_required` without it).
    #[serde(default)]
    #[schema(required = false)]
    reason: Option<String>,
}

/// What to change (absent: as is; `null` clears a contact or the preferred method).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserBody {
    #[serde(default)]
    #[schema(required = false, value_type = Vec<String>)]
    roles: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(required = false, value_type = Option<String>)]
    email: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(required = false, value_type = Option<String>)]
    phone: Option<Option<String>>,
    #[serde(default)]
    #[schema(required = false, value_type = bool)]
    service_account: Option<bool>,
    #[serde(default)]
    #[schema(required = false, value_type = bool)]
    two_factor_switched_on: Option<bool>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(required = false, value_type = Option<String>)]
    preferred_method: Option<Option<String>>,
    /// Required (`422 reason_required` without it).
    #[serde(default)]
    #[schema(required = false)]
    reason: Option<String>,
}

/// Erase a user, with a reason
///
/// Deletes the user's data key: their personal data in events, read models
/// and exports can no longer be read, and the account is gone. Needs a
/// fresh step-up.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/users/{user}/erase", tag = "admin",
    params(UserPath), security(("session" = [])), request_body = ReasonBody,
    responses(
        (status = 204, description = "erased"),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 403, description = "`step_up_required`, `cannot_change_own_factor` (yourself), `forbidden`, `second_factor_required`", body = ErrorBody),
        (status = 410, description = "`user_erased` (already)", body = ErrorBody),
        (status = 422, description = "`reason_required`, `invalid_body`", body = ErrorBody),
    )
)]
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

/// A user, as admins and auditors see them
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/users/{user}", tag = "admin", params(UserPath),
    security(("session" = [])),
    responses((status = 200, body = crate::openapi::UserDetail), AnyErrors, SessionErrors)
)]
pub async fn get_user(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    RequestMeta(origin): RequestMeta,
    Path((_, user)): Path<(String, String)>,
) -> Result<Json<UserDetail>, ApiError> {
    Ok(Json(api.app.user_detail(&reader, &origin, &user).await?))
}

/// Change a user, with a reason
///
/// A new email or phone (a factor) ends their sessions and remembered devices.
#[utoipa::path(
    patch, path = "/v1/tenants/{tenant}/users/{user}", tag = "admin", params(UserPath),
    security(("session" = [])), request_body = UpdateUserBody,
    responses(
        (status = 204, description = "changed"),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 403, description = "`cannot_change_own_factor`, `forbidden`, `second_factor_required`", body = ErrorBody),
        (status = 409, description = "`two_factor_unavailable`, `method_not_available`", body = ErrorBody),
        (status = 422, description = "`reason_required`, `invalid_field` with `field`, `invalid_body`", body = ErrorBody),
    )
)]
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

/// One of the one-click actions on a user, with a reason.
async fn act_on_user(
    api: ApiState,
    origin: twofold_app::Origin,
    admin: twofold_app::AdminSession,
    user: String,
    action: UserAction,
    body: ReasonBody,
) -> Result<StatusCode, ApiError> {
    api.app
        .act_on_user(&admin, &user, action, body.reason, &origin)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Reset a user's enrollment, with a reason
///
/// The user enrolls again; sessions, devices and a lockout end. Not on oneself.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/users/{user}/reset-enrollment", tag = "admin",
    params(UserPath), security(("session" = [])), request_body = ReasonBody,
    responses(
        (status = 204, description = "done"),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 403, description = "`cannot_change_own_factor`, `forbidden`, `second_factor_required`", body = ErrorBody),
        (status = 409, description = "nothing to reset", body = ErrorBody),
        (status = 422, description = "`reason_required`, `invalid_body`", body = ErrorBody),
    )
)]
pub async fn reset_enrollment(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    Path((_, user)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    act_on_user(api, origin, admin, user, UserAction::ResetEnrollment, body).await
}

/// End a user's lockout, with a reason
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/users/{user}/unlock", tag = "admin",
    params(UserPath), security(("session" = [])), request_body = ReasonBody,
    responses(
        (status = 204, description = "unlocked"),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 409, description = "not locked", body = ErrorBody),
        (status = 422, description = "`reason_required`, `invalid_body`", body = ErrorBody),
    )
)]
pub async fn unlock(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    Path((_, user)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    act_on_user(api, origin, admin, user, UserAction::Unlock, body).await
}

/// End a user's sessions and remembered devices, with a reason
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/users/{user}/revoke-sessions", tag = "admin",
    params(UserPath), security(("session" = [])), request_body = ReasonBody,
    responses(
        (status = 204, description = "done"),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 422, description = "`reason_required`, `invalid_body`", body = ErrorBody),
    )
)]
pub async fn revoke_sessions(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    Path((_, user)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    act_on_user(api, origin, admin, user, UserAction::RevokeSessions, body).await
}

/// Forget one remembered device, with a reason
///
/// Its next sign-in asks a second factor.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/users/{user}/devices/{device}/forget", tag = "admin",
    params(UserPath, ("device" = String, Path, description = "The device's id (a UUID)")),
    security(("session" = [])), request_body = ReasonBody,
    responses(
        (status = 204, description = "forgotten"),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 404, description = "no such device, user or tenant", body = ErrorBody),
        (status = 422, description = "`reason_required`, `invalid_body`", body = ErrorBody),
    )
)]
pub async fn forget_device(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    SignedInAdmin(admin): SignedInAdmin,
    Path((_, user, device)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    let device = device.parse().map_err(|_| ApiError::not_found())?;
    act_on_user(
        api,
        origin,
        admin,
        user,
        UserAction::ForgetDevice(device),
        body,
    )
    .await
}

/// New backup codes for a user, to hand over, with a reason
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/users/{user}/backup-codes", tag = "admin",
    params(UserPath), security(("session" = [])), request_body = ReasonBody,
    responses(
        (status = 200, description = "the new codes, shown once", body = BackupCodes),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 409, description = "the user is not enrolled", body = ErrorBody),
        (status = 422, description = "`reason_required`, `invalid_body`", body = ErrorBody),
    )
)]
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

/// End every session of the tenant, with a reason
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/sessions/revoke-all", tag = "admin", params(TenantPath),
    security(("session" = [])), request_body = ReasonBody,
    responses(
        (status = 200, body = UsersSignedOut),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 422, description = "`reason_required`, `invalid_body`", body = ErrorBody),
    )
)]
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

/// Open a short session as the user ("Login As"), with a reason
///
/// Where the tenant allows it, after a step-up; every event of that session
/// names the admin.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/users/{user}/login-as", tag = "admin",
    params(UserPath), security(("session" = [])), request_body = ReasonBody,
    responses(
        (status = 200, body = LoginAsSession),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 403, description = "`login_as_not_allowed`, `step_up_required`, `forbidden`, `second_factor_required`", body = ErrorBody),
        (status = 422, description = "`reason_required`, `invalid_body`", body = ErrorBody),
        (status = 423, description = "`account_locked`", body = ErrorBody),
    )
)]
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetBody {
    /// Required (`422 reason_required` without it).
    #[serde(default)]
    #[schema(required = false)]
    reason: Option<String>,
    /// `one_time_password` (the default), or `email`: a link by email instead.
    #[serde(default)]
    #[schema(required = false)]
    via: Option<String>,
}

/// Reset a user's password, with a reason
///
/// A one-time password to hand over, to be changed at the next sign-in; with
/// `"via": "email"`, a link to choose one, emailed to the user (202).
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/users/{user}/reset-password", tag = "admin",
    params(UserPath), security(("session" = [])), request_body = ResetBody,
    responses(
        (status = 200, description = "`{one_time_password}`, shown once", body = PasswordReset),
        (status = 202, description = "`{\"status\": \"link_sent\", expires_at}`", body = PasswordReset),
        AnyErrors, BodyErrors, SessionErrors,
        (status = 400, description = "`invalid_via`, `malformed_json`", body = ErrorBody),
        (status = 409, description = "`no_email_for_link`", body = ErrorBody),
        (status = 422, description = "`reason_required`, `invalid_body`", body = ErrorBody),
        (status = 429, description = "a code budget spent (`retry_after_secs`)", body = ErrorBody),
    )
)]
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
