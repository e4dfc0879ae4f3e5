//! What admins and auditors read: the Overview (live, at a past moment, day by
//! day), the user directory, and the audit history with its exports.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, NaiveDate, Utc};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use twofold_projections::audit::{Exporter, Format};
use twofold_projections::directory::DirectoryQuery;
use twofold_projections::queries::{self, AuditQuery};
use twofold_projections::{overview, record};

use crate::error::ApiError;
use crate::extract::SignedInAdmin;
use crate::state::AppState;

fn bad_query(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_query", message)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverviewQuery {
    as_of: Option<DateTime<Utc>>,
}

/// `GET /v1/tenants/{tenant}/overview[?as_of=2026-03-01T00:00:00Z]`
pub async fn overview(
    State(state): State<AppState>,
    admin: SignedInAdmin,
    query: Result<Query<OverviewQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| bad_query(e.body_text()))?;
    let tenant = admin.0.tenant_id.to_string();
    let figures = match q.as_of {
        // A past moment is answered from the events, the source of truth.
        Some(at) => overview::as_of(&record::load_tenant(&state.pool, &tenant).await?, at),
        None => queries::overview(&state.pool, &tenant).await?,
    };
    Ok(Json(json!({ "as_of": q.as_of, "overview": figures })))
}

/// `GET /v1/tenants/{tenant}/overview/delivery`: sent, failed, fallbacks and
/// latency percentiles per method and provider.
pub async fn delivery(
    State(state): State<AppState>,
    admin: SignedInAdmin,
) -> Result<Json<serde_json::Value>, ApiError> {
    let stats = queries::delivery(&state.pool, &admin.0.tenant_id.to_string()).await?;
    Ok(Json(json!({ "delivery": stats })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailyQuery {
    from: NaiveDate,
    to: NaiveDate,
}

/// The longest daily series answered at once.
const MAX_DAYS: i64 = 366;

/// `GET /v1/tenants/{tenant}/overview/daily?from=2026-03-01&to=2026-03-31`
pub async fn daily(
    State(state): State<AppState>,
    admin: SignedInAdmin,
    query: Result<Query<DailyQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| bad_query(e.body_text()))?;
    if q.to < q.from || (q.to - q.from).num_days() >= MAX_DAYS {
        return Err(bad_query(
            "`from` must not be after `to`, and at most 366 days apart.",
        ));
    }
    let records = record::load_tenant(&state.pool, &admin.0.tenant_id.to_string()).await?;
    Ok(Json(
        json!({ "days": overview::daily(&records, q.from, q.to) }),
    ))
}

/// `GET /v1/tenants/{tenant}/users?status=&two_factor=&role=&locked=&method=&page=&per_page=`
pub async fn directory(
    State(state): State<AppState>,
    admin: SignedInAdmin,
    query: Result<Query<DirectoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| bad_query(e.body_text()))?;
    if let Some(s) = q.status.as_deref() {
        if !matches!(s, "enrolled" | "pending" | "not_started") {
            return Err(bad_query(
                "`status` is one of enrolled, pending, not_started.",
            ));
        }
    }
    if let Some(m) = q.method.as_deref() {
        if !matches!(m, "totp" | "email" | "sms") {
            return Err(bad_query("`method` is one of totp, email, sms."));
        }
    }
    if let Some(t) = q.two_factor.as_deref() {
        if !matches!(t, "on" | "off") {
            return Err(bad_query("`two_factor` is on or off."));
        }
    }
    let (users, total) =
        queries::directory(&state.pool, &admin.0.tenant_id.to_string(), &q).await?;
    Ok(Json(json!({
        "users": users,
        "total": total,
        "page": q.page.unwrap_or(1).max(1),
        "per_page": q.per_page.unwrap_or(50).clamp(1, queries::MAX_PER_PAGE),
    })))
}

/// `GET /v1/tenants/{tenant}/users/{user}/history`: the user's timeline.
pub async fn user_history(
    State(state): State<AppState>,
    admin: SignedInAdmin,
    Path((_, raw_user)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = admin.0.tenant_id.to_string();
    let q = AuditQuery {
        user_id: Some(raw_user),
        ..AuditQuery::default()
    };
    let entries: Vec<_> = queries::audit(&state.pool, &tenant, &q)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    Ok(Json(json!({ "entries": entries })))
}

/// `GET /v1/tenants/{tenant}/audit?event_type=&user_id=&actor=&from=&to=&format=ndjson|csv`:
/// streamed, with a hash chain and a closing trailer (`twofold audit verify`).
pub async fn audit_export(
    State(state): State<AppState>,
    admin: SignedInAdmin,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| bad_query(e.body_text()))?;
    let format = match q.format.as_deref().unwrap_or("ndjson") {
        "ndjson" => Format::Ndjson,
        "csv" => Format::Csv,
        _ => return Err(bad_query("`format` is ndjson or csv.")),
    };
    let tenant = admin.0.tenant_id.to_string();
    let pool = state.pool.clone();
    // The stream owns what it reads from, so it can outlive this handler.
    let body = async_stream(pool, tenant, q, format);
    let content_type = match format {
        Format::Ndjson => "application/x-ndjson",
        Format::Csv => "text/csv; charset=utf-8",
    };
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(body),
    )
        .into_response())
}

fn async_stream(
    pool: sqlx::PgPool,
    tenant: String,
    q: AuditQuery,
    format: Format,
) -> impl futures::Stream<Item = Result<String, std::io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(64);
    tokio::spawn(async move {
        let mut exporter = Exporter::new(format);
        let header = exporter.header();
        if !header.is_empty() && tx.send(Ok(header)).await.is_err() {
            return;
        }
        let mut entries = queries::audit(&pool, &tenant, &q);
        while let Some(entry) = entries.next().await {
            let line = entry
                .map_err(anyhow::Error::from)
                .and_then(|e| exporter.line(e))
                .map_err(|e| {
                    // The trailer is never written, so the cut-off export fails verification.
                    tracing::error!(error = %e, "audit export failed");
                    std::io::Error::other("audit export failed")
                });
            let failed = line.is_err();
            if tx.send(line).await.is_err() || failed {
                return;
            }
        }
        let trailer = exporter
            .trailer()
            .map_err(|_| std::io::Error::other("audit export failed"));
        let _ = tx.send(trailer).await;
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}
