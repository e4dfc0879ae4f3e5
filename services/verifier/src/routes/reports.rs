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
use crate::ApiState;

/// The query string, or 422 `invalid_query` naming what is wrong with it.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| AppError::InvalidQuery(e.body_text()).into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverviewQuery {
    as_of: Option<DateTime<Utc>>,
}

/// `GET /v1/tenants/{tenant}/overview[?as_of=2026-03-01T00:00:00Z]`
pub async fn overview(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    q: Result<Query<OverviewQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let figures = api.app.overview(&reader, q.as_of).await?;
    Ok(Json(json!({ "as_of": q.as_of, "overview": figures })))
}

/// `GET /v1/tenants/{tenant}/overview/delivery`
pub async fn delivery(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "delivery": api.app.delivery(&reader).await? }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailyQuery {
    from: NaiveDate,
    to: NaiveDate,
}

/// `GET /v1/tenants/{tenant}/overview/daily?from=2026-03-01&to=2026-03-31`
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

/// `GET /v1/tenants/{tenant}/users?status=&two_factor=&role=&locked=&method=&page=&per_page=`
pub async fn directory(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    q: Result<Query<DirectoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let page = api.app.directory(&reader, &query(q)?).await?;
    Ok(Json(page).into_response())
}

/// `GET /v1/tenants/{tenant}/users/{user}/history`: the user's timeline.
pub async fn user_history(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    RequestMeta(origin): RequestMeta,
    Path((_, user)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let entries = api.app.user_history(&reader, &origin, &user).await?;
    Ok(Json(json!({ "entries": entries })))
}

/// `GET /v1/tenants/{tenant}/audit/keys`: the public keys export trailers
/// are signed with, for `twofold audit verify --public-key`.
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

/// `GET /v1/tenants/{tenant}/audit/checkpoints?from=&to=`: the signed
/// checkpoints of the tenant's audit chain, for `twofold audit verify
/// --checkpoints`.
pub async fn audit_checkpoints(
    State(api): State<ApiState>,
    SignedInReader(reader): SignedInReader,
    q: Result<Query<CheckpointsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let checkpoints = api.app.audit_checkpoints(&reader, q.from, q.to).await?;
    Ok(Json(json!({ "checkpoints": checkpoints })))
}

/// `GET /v1/tenants/{tenant}/audit?event_type=&user_id=&actor=&from=&to=&format=ndjson|csv`:
/// streamed, with a hash chain and a closing signed trailer (`twofold audit verify`).
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
