//! What admins and auditors read over HTTP: the Overview, delivery figures,
//! the user directory, timelines and audit exports.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use twofold_app::AppError;
use twofold_projections::audit::Format;
use twofold_projections::directory::DirectoryQuery;
use twofold_projections::queries::AuditQuery;

use crate::error::ApiError;
use crate::extract::{RequestMeta, SignedInReader};
use crate::openapi::{
    AnyErrors, AuditCheckpoints, AuditKeys, DailyAnswer, DeliveryAnswer, DirectoryPage, ErrorBody,
    HistoryAnswer, OverviewAnswer, SessionErrors, TenantPath, UserPath,
};
use crate::ApiState;

/// The query string, or 422 `invalid_query` naming what is wrong with it.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| AppError::InvalidQuery(e.body_text()).into())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OverviewQuery {
    /// The figures as they stood then (RFC 3339), folded from the events.
    #[param(value_type = Option<String>, format = DateTime)]
    as_of: Option<DateTime<Utc>>,
}

/// The Overview: enrollment, lockouts, backup codes, methods
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/overview", tag = "read models",
    params(TenantPath, OverviewQuery), security(("session" = [])),
    responses(
        (status = 200, body = OverviewAnswer),
        AnyErrors, SessionErrors,
        (status = 422, description = "`invalid_query`", body = ErrorBody),
    )
)]
pub async fn overview(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    q: Result<Query<OverviewQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let figures = api.app.overview(&reader, q.as_of).await?;
    Ok(Json(json!({ "as_of": q.as_of, "overview": figures })))
}

/// Code delivery per method and provider
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/overview/delivery", tag = "read models",
    params(TenantPath), security(("session" = [])),
    responses((status = 200, body = DeliveryAnswer), AnyErrors, SessionErrors)
)]
pub async fn delivery(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "delivery": api.app.delivery(&reader).await? }),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DailyQuery {
    /// The first day, `YYYY-MM-DD`.
    #[param(value_type = String, format = Date)]
    from: NaiveDate,
    /// The last day (at most 366 days after `from`).
    #[param(value_type = String, format = Date)]
    to: NaiveDate,
}

/// The Overview's figures at the end of each day
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/overview/daily", tag = "read models",
    params(TenantPath, DailyQuery), security(("session" = [])),
    responses(
        (status = 200, body = DailyAnswer),
        AnyErrors, SessionErrors,
        (status = 422, description = "`invalid_query`", body = ErrorBody),
    )
)]
pub async fn daily(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    q: Result<Query<DailyQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    Ok(Json(
        json!({ "days": api.app.daily(&reader, q.from, q.to).await? }),
    ))
}

/// The user directory, paged
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/users", tag = "read models",
    params(
        TenantPath,
        ("status" = Option<String>, Query, description = "`enrolled`, `pending` or `not_started`"),
        ("two_factor" = Option<String>, Query, description = "`on` or `off`"),
        ("role" = Option<String>, Query, description = "Users with this role"),
        ("locked" = Option<bool>, Query, description = "Locked out or not"),
        ("method" = Option<String>, Query, description = "`totp`, `email` or `sms`: users with that method set up"),
        ("q" = Option<String>, Query, description = "Part of the username"),
        ("backup_codes" = Option<String>, Query, description = "`none` or `low` (2 or fewer left)"),
        ("page" = Option<u32>, Query, description = "From 1"),
        ("per_page" = Option<u32>, Query, description = "Rows per page"),
    ),
    security(("session" = [])),
    responses(
        (status = 200, body = DirectoryPage),
        AnyErrors, SessionErrors,
        (status = 422, description = "`invalid_query`", body = ErrorBody),
    )
)]
pub async fn directory(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    q: Result<Query<DirectoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let page = api.app.directory(&reader, &query(q)?).await?;
    Ok(Json(page).into_response())
}

/// A user's audit timeline, with the delivery of each of their codes
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/users/{user}/history", tag = "read models",
    params(UserPath), security(("session" = [])),
    responses((status = 200, body = HistoryAnswer), AnyErrors, SessionErrors)
)]
pub async fn user_history(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    RequestMeta(origin): RequestMeta,
    Path((_, user)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let entries = api.app.user_history(&reader, &origin, &user).await?;
    Ok(Json(json!({ "entries": entries })))
}

/// The public keys audit exports are signed with
///
/// For `twofold audit verify --public-key`.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/audit/keys", tag = "read models",
    params(TenantPath), security(("session" = [])),
    responses((status = 200, body = AuditKeys), AnyErrors, SessionErrors)
)]
pub async fn audit_keys(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
) -> Json<Value> {
    Json(json!(api.app.audit_keys(&reader)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointsQuery {
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

/// The signed checkpoints of the tenant's audit chain
///
/// For `twofold audit verify --checkpoints`: each signs the chain's count and
/// head at a position.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/audit/checkpoints", tag = "read models",
    params(
        TenantPath,
        ("from" = Option<String>, Query, format = DateTime, description = "Signed from this moment (RFC 3339)"),
        ("to" = Option<String>, Query, format = DateTime, description = "Signed up to this moment (RFC 3339)"),
    ),
    security(("session" = [])),
    responses(
        (status = 200, body = AuditCheckpoints),
        AnyErrors, SessionErrors,
        (status = 422, description = "`invalid_query`", body = ErrorBody),
    )
)]
pub async fn audit_checkpoints(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    q: Result<Query<CheckpointsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let checkpoints = api.app.audit_checkpoints(&reader, q.from, q.to).await?;
    Ok(Json(json!({ "checkpoints": checkpoints })))
}

/// The tenant's audit history, streamed and signed
///
/// Hash-chained entries and a closing signed trailer (`twofold audit verify`).
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/audit", tag = "read models",
    params(
        TenantPath,
        ("event_type" = Option<String>, Query, description = "Only this event type"),
        ("user_id" = Option<String>, Query, description = "Only about this user"),
        ("actor" = Option<String>, Query, description = "Only by this actor (a user's or admin's id)"),
        ("from" = Option<String>, Query, format = DateTime, description = "From this moment (RFC 3339)"),
        ("to" = Option<String>, Query, format = DateTime, description = "Up to this moment (RFC 3339)"),
        ("format" = Option<String>, Query, description = "`ndjson` (the default) or `csv`"),
    ),
    security(("session" = [])),
    responses(
        (status = 200, description = "one entry a line, then the trailer",
            content(
                (String = "application/x-ndjson"),
                (String = "text/csv; charset=utf-8"),
            )),
        AnyErrors, SessionErrors,
        (status = 422, description = "`invalid_query`", body = ErrorBody),
        (status = 429, description = "`exports_busy`: as many exports are streaming as this server runs at once (`audit_exports_at_once`)", body = ErrorBody),
    )
)]
pub async fn audit_export(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    RequestMeta(origin): RequestMeta,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (format, lines) = api.app.audit_export(&reader, &origin, query(q)?).await?;
    let content_type = match format {
        Format::Ndjson => "application/x-ndjson",
        Format::Csv => "text/csv; charset=utf-8",
    };
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(lines),
    )
        .into_response())
}
