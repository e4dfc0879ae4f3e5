//! Admin endpoints: users and the tenant's two-factor settings.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use twofold_domain::tenant::TwoFactorSettings;

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
