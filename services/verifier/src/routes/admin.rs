//! Admin endpoints: users and the tenant's two-factor settings.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use twofold_domain::tenant::TwoFactorSettings;
use twofold_domain::user::{User, UserCommand, UserError};
use twofold_domain::values::{Email, Phone, Role};
use twofold_domain::{Ctx, UserId};

use crate::backup_codes;

use crate::accounts::{self, NewUser};
use crate::error::ApiError;
use crate::extract::{ApiJson, RequestMeta, SignedInAdmin};
use crate::state::AppState;

/// `POST /v1/tenants/{tenant}/users`
pub async fn create_user(
    State(state): State<AppState>,
    meta: RequestMeta,
    admin: SignedInAdmin,
    ApiJson(body): ApiJson<NewUser>,
) -> Result<Response, ApiError> {
    let ctx = meta.ctx(state.now(), admin.actor());
    let user_id = accounts::create_user(&state, admin.0.tenant_id, body, ctx).await?;
    Ok((StatusCode::CREATED, Json(json!({ "user_id": user_id }))).into_response())
}

/// `GET /v1/tenants/{tenant}/settings`
pub async fn get_settings(
    State(state): State<AppState>,
    admin: SignedInAdmin,
) -> Result<Json<TwoFactorSettings>, ApiError> {
    Ok(Json(
        state
            .tenant(&admin.0.tenant_id.to_string())
            .await?
            .1
            .settings,
    ))
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
    State(state): State<AppState>,
    meta: RequestMeta,
    admin: SignedInAdmin,
    ApiJson(body): ApiJson<ChangeSettings>,
) -> Result<Json<TwoFactorSettings>, ApiError> {
    let mut ctx = meta.ctx(state.now(), admin.actor());
    ctx.reason = body.reason.filter(|r| !r.trim().is_empty());
    Ok(Json(
        accounts::change_settings(&state, admin.0.tenant_id, body.settings, ctx).await?,
    ))
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
pub struct UpdateUser {
    #[serde(default)]
    roles: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    email: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    phone: Option<Option<String>>,
    #[serde(default)]
    service_account: Option<bool>,
    /// Switches 2FA on or off for this user (scope "per user").
    #[serde(default)]
    two_factor_switched_on: Option<bool>,
    #[serde(default)]
    reason: Option<String>,
}

/// The user named in the path, in the admin's tenant.
async fn target(
    state: &AppState,
    admin: &SignedInAdmin,
    raw_user: &str,
) -> Result<(UserId, User), ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "user_not_found", "No such user.");
    let user_id: UserId = raw_user.parse().map_err(|_| not_found())?;
    let user = state
        .user_in(admin.0.tenant_id, user_id)
        .await?
        .ok_or_else(not_found)?;
    Ok((user_id, user))
}

fn admin_ctx(
    state: &AppState,
    meta: &RequestMeta,
    admin: &SignedInAdmin,
    reason: Option<String>,
) -> Ctx {
    let mut ctx = meta.ctx(state.now(), admin.actor());
    ctx.reason = reason.filter(|r| !r.trim().is_empty());
    ctx
}

/// `GET /v1/tenants/{tenant}/users/{user}`
pub async fn get_user(
    State(state): State<AppState>,
    admin: SignedInAdmin,
    Path((_, raw_user)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (user_id, u) = target(&state, &admin, &raw_user).await?;
    let now = state.now();
    // Last sign-in comes from the directory read model (it may lag a little).
    let last_sign_in = twofold_projections::queries::user(
        &state.pool,
        &admin.0.tenant_id.to_string(),
        &user_id.to_string(),
    )
    .await?
    .and_then(|row| row.last_sign_in);
    Ok(Json(json!({
        "user_id": user_id,
        "username": u.username.as_ref().map(|n| n.as_str()),
        "email": u.email.as_ref().map(|e| e.as_str()),
        "phone": u.phone.as_ref().map(|p| p.as_str()),
        "roles": u.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "service_account": u.service_account,
        "two_factor": u.two_factor,
        "two_factor_switched_on": u.two_factor_switched_on,
        "two_factor_opted_in": u.two_factor_opted_in,
        "backup_codes_left": u.backup_codes_left(),
        "locked": u.lockout.is_locked(),
        "failures": u.lockout.failures(),
        "active_sessions": u.sessions.values().filter(|s| now < s.expires_at).count(),
        "remembered_devices": u.devices.len(),
        "last_sign_in": last_sign_in,
    })))
}

/// `PATCH /v1/tenants/{tenant}/users/{user}`
pub async fn update_user(
    State(state): State<AppState>,
    meta: RequestMeta,
    admin: SignedInAdmin,
    Path((_, raw_user)): Path<(String, String)>,
    ApiJson(body): ApiJson<UpdateUser>,
) -> Result<StatusCode, ApiError> {
    let (user_id, _) = target(&state, &admin, &raw_user).await?;
    let roles = body
        .roles
        .map(|r| {
            r.iter()
                .map(|r| Role::parse(r))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
        .map_err(ApiError::invalid_value)?;
    let email = body
        .email
        .map(|e| {
            e.filter(|s| !s.is_empty())
                .map(|s| Email::parse(&s))
                .transpose()
        })
        .transpose()
        .map_err(ApiError::invalid_value)?;
    let phone = body
        .phone
        .map(|p| {
            p.filter(|s| !s.is_empty())
                .map(|s| Phone::parse(&s))
                .transpose()
        })
        .transpose()
        .map_err(ApiError::invalid_value)?;
    let ctx = admin_ctx(&state, &meta, &admin, body.reason);
    let tenant_enabled = admin.0.tenant.settings.enabled;
    // Check the switch first, so a refused switch leaves the profile untouched.
    if body.two_factor_switched_on == Some(true) && !tenant_enabled {
        return Err(UserError::TwoFactorUnavailable.into());
    }
    if roles.is_some() || email.is_some() || phone.is_some() || body.service_account.is_some() {
        state
            .users
            .execute(&user_id.to_string(), |_| {
                Ok(UserCommand::Update {
                    roles: roles.clone(),
                    email: email.clone(),
                    phone: phone.clone(),
                    service_account: body.service_account,
                    ctx: ctx.clone(),
                })
            })
            .await?;
    }
    if let Some(on) = body.two_factor_switched_on {
        state
            .users
            .execute(&user_id.to_string(), |_| {
                Ok(UserCommand::SwitchTwoFactor {
                    on,
                    tenant_enabled,
                    ctx: ctx.clone(),
                })
            })
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Runs one admin command on the user in the path.
async fn admin_command(
    state: &AppState,
    meta: &RequestMeta,
    admin: &SignedInAdmin,
    raw_user: &str,
    reason: Option<String>,
    command: impl Fn(Ctx) -> UserCommand,
) -> Result<(), ApiError> {
    let (user_id, _) = target(state, admin, raw_user).await?;
    let ctx = admin_ctx(state, meta, admin, reason);
    state
        .users
        .execute(&user_id.to_string(), |_| Ok(command(ctx.clone())))
        .await?;
    Ok(())
}

/// `POST /v1/tenants/{tenant}/users/{user}/reset-enrollment`: the user enrolls
/// again; their sessions and remembered devices end.
pub async fn reset_enrollment(
    State(state): State<AppState>,
    meta: RequestMeta,
    admin: SignedInAdmin,
    Path((_, raw_user)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    admin_command(&state, &meta, &admin, &raw_user, body.reason, |ctx| {
        UserCommand::ResetEnrollment { ctx }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/tenants/{tenant}/users/{user}/unlock`
pub async fn unlock(
    State(state): State<AppState>,
    meta: RequestMeta,
    admin: SignedInAdmin,
    Path((_, raw_user)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    admin_command(&state, &meta, &admin, &raw_user, body.reason, |ctx| {
        UserCommand::Unlock { ctx }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/tenants/{tenant}/users/{user}/revoke-sessions`
pub async fn revoke_sessions(
    State(state): State<AppState>,
    meta: RequestMeta,
    admin: SignedInAdmin,
    Path((_, raw_user)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    admin_command(&state, &meta, &admin, &raw_user, body.reason, |ctx| {
        UserCommand::RevokeSessions {
            forget_devices: true,
            ctx,
        }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/tenants/{tenant}/users/{user}/backup-codes`: new codes for a user
/// who lost theirs, shown to the admin once to hand over.
pub async fn regenerate_backup_codes(
    State(state): State<AppState>,
    meta: RequestMeta,
    admin: SignedInAdmin,
    Path((_, raw_user)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (user_id, _) = target(&state, &admin, &raw_user).await?;
    let (codes, hashes) = backup_codes::issue(&state.keys, user_id.as_uuid().as_bytes());
    admin_command(&state, &meta, &admin, &raw_user, body.reason, |ctx| {
        UserCommand::RegenerateBackupCodes {
            backup_codes: hashes.clone(),
            step_up: None,
            ctx,
        }
    })
    .await?;
    Ok(Json(json!({ "backup_codes": codes })))
}

/// `POST /v1/tenants/{tenant}/sessions/revoke-all`: ends every session of the
/// tenant (remembered devices stay).
pub async fn revoke_all_sessions(
    State(state): State<AppState>,
    meta: RequestMeta,
    admin: SignedInAdmin,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ctx = admin_ctx(&state, &meta, &admin, body.reason);
    if ctx.reason.is_none() {
        return Err(UserError::ReasonRequired.into());
    }
    let users: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT user_id FROM usernames WHERE tenant_id = $1 ORDER BY user_id")
            .bind(admin.0.tenant_id.as_uuid())
            .fetch_all(&state.pool)
            .await?;
    let mut revoked_users = 0;
    for user in users {
        let events = state
            .users
            .execute(&user.to_string(), |_| {
                Ok(UserCommand::RevokeSessions {
                    forget_devices: false,
                    ctx: ctx.clone(),
                })
            })
            .await?;
        if !events.is_empty() {
            revoked_users += 1;
        }
    }
    Ok(Json(json!({ "users_signed_out": revoked_users })))
}
