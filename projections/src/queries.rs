//! What the admin API asks of the read models.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::Deserialize;
use sqlx::{FromRow, PgPool, Postgres, QueryBuilder};

use crate::audit::AuditEntry;
use crate::directory::{DirectoryQuery, UserRow};
use crate::overview::{self, Counts, LowOnCodes, Overview, RecentEnrollment};

/// The live Overview of a tenant: its stored counts, and the users it names
/// by two indexed lookups (or, while an upgrade has not filled the counts in
/// yet, from every directory row).
pub async fn overview(pool: &PgPool, tenant_id: &str) -> anyhow::Result<Overview> {
    if crate::overview_counts::pending(pool).await? {
        return Ok(overview::compute(&users(pool, tenant_id).await?));
    }
    let counts = stored_counts(pool, tenant_id).await?;
    // Usernames compare as bytes, as the Overview's own sort compares them.
    let low: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT user_id, username, backup_codes_left FROM rm_users \
         WHERE tenant_id = $1 AND backup_codes_left <= $3 AND NOT service_account \
         ORDER BY backup_codes_left, username COLLATE \"C\" LIMIT $2",
    )
    .bind(tenant_id)
    .bind(overview::LOW_ON_CODES_NAMED as i64)
    .bind(overview::LOW_BACKUP_CODES as i32)
    .fetch_all(pool)
    .await?;
    // Newest first; ties go by username.
    let recent: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT user_id, username, enrolled_at FROM rm_users \
         WHERE tenant_id = $1 AND two_factor = 'enrolled' AND NOT service_account AND enrolled_at IS NOT NULL \
         ORDER BY enrolled_at DESC, username COLLATE \"C\" LIMIT $2",
    )
    .bind(tenant_id)
    .bind(overview::RECENT_ENROLLMENTS as i64)
    .fetch_all(pool)
    .await?;
    Ok(overview::from_counts(
        &counts,
        low.into_iter()
            .map(|(user_id, username, left)| LowOnCodes {
                user_id,
                username,
                left: u32::try_from(left).unwrap_or(0),
            })
            .collect(),
        recent
            .into_iter()
            .map(|(user_id, username, at)| RecentEnrollment {
                user_id,
                username,
                at,
            })
            .collect(),
    ))
}

async fn stored_counts(pool: &PgPool, tenant_id: &str) -> anyhow::Result<Counts> {
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT key, value FROM rm_overview_counts WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_all(pool)
            .await?;
    Ok(counts.into_iter().collect())
}

/// The live Overview's counts of a tenant (see [`overview::tally`]).
pub async fn overview_counts(pool: &PgPool, tenant_id: &str) -> anyhow::Result<Counts> {
    if crate::overview_counts::pending(pool).await? {
        let rows = users(pool, tenant_id).await?;
        return Ok(crate::overview_counts::of(&rows)
            .remove(tenant_id)
            .unwrap_or_default());
    }
    stored_counts(pool, tenant_id).await
}

pub const MAX_PER_PAGE: u32 = 200;

/// One page of the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectoryAnswer {
    pub rows: Vec<UserRow>,
    /// The users matching, exact unless `total_capped`; then the least it
    /// can be: one more than `count_limit`, or on a page past that, one
    /// more than the rows up to the end of this page (so whether a next
    /// page exists reads the same either way: `total > page * per_page`).
    pub total: i64,
    pub total_capped: bool,
}

/// One page of the directory, and how many users match, counted up to
/// `count_limit` (counting every one of 90,000 matches costs more than
/// the page itself).
pub async fn directory(
    pool: &PgPool,
    tenant_id: &str,
    q: &DirectoryQuery,
    count_limit: u32,
) -> anyhow::Result<DirectoryAnswer> {
    let per_page = i64::from(q.per_page.unwrap_or(50).clamp(1, MAX_PER_PAGE));
    // In i64: a page number near u32::MAX times the page size overflows u32.
    let offset = (i64::from(q.page.unwrap_or(1).max(1)) - 1) * per_page;
    let count_limit = i64::from(count_limit);
    // The page's ids come from an index (in username order, filtered, past
    // the offset) and only their rows from the table; one row past the page
    // says whether more follow.
    let mut page = QueryBuilder::new(
        "SELECT row FROM rm_users WHERE user_id = ANY(ARRAY(SELECT user_id FROM rm_users WHERE ",
    );
    push_filters(&mut page, tenant_id, q);
    page.push(" ORDER BY username LIMIT ")
        .push_bind(per_page + 1)
        .push(" OFFSET ")
        .push_bind(offset)
        .push(")) ORDER BY username");
    // Planned for its values each time (a generic plan cannot tell a rare
    // role or a selective `q` from a common one).
    let rows: Vec<sqlx::types::Json<UserRow>> = page
        .build_query_scalar()
        .persistent(false)
        .fetch_all(pool)
        .await?;
    let mut rows: Vec<UserRow> = rows.into_iter().map(|r| r.0).collect();
    let more = rows.len() as i64 > per_page;
    rows.truncate(per_page as usize);
    let through_page = offset + rows.len() as i64;
    let (total, total_capped) = if !more && (!rows.is_empty() || offset == 0) {
        // The last page: everything before it and on it is the total.
        (through_page, false)
    } else if more && through_page >= count_limit {
        (through_page + 1, true)
    } else {
        let mut count = QueryBuilder::new("SELECT count(*) FROM (SELECT 1 FROM rm_users WHERE ");
        push_filters(&mut count, tenant_id, q);
        count
            .push(" LIMIT ")
            .push_bind(count_limit + 1)
            .push(") AS matching");
        let counted: i64 = count
            .build_query_scalar()
            .persistent(false)
            .fetch_one(pool)
            .await?;
        (counted, counted > count_limit)
    };
    Ok(DirectoryAnswer {
        rows,
        total,
        total_capped,
    })
}

/// The directory query's filters, only those given: each then has the plan
/// its index serves, which one statement for every combination would not.
fn push_filters<'a>(b: &mut QueryBuilder<'a, Postgres>, tenant_id: &'a str, q: &'a DirectoryQuery) {
    b.push("tenant_id = ").push_bind(tenant_id);
    if let Some(status) = q.status.as_deref() {
        b.push(" AND two_factor = ").push_bind(status);
    }
    match q.two_factor.as_deref() {
        Some("on") => b.push(" AND two_factor = 'enrolled'"),
        Some(_) => b.push(" AND two_factor <> 'enrolled'"),
        None => b,
    };
    if let Some(role) = q.role.as_deref() {
        b.push(" AND ").push_bind(role).push(" = ANY(roles)");
    }
    if let Some(locked) = q.locked {
        b.push(" AND locked = ").push_bind(locked);
    }
    if let Some(method) = q.method.as_deref() {
        b.push(" AND ").push_bind(method).push(" = ANY(methods)");
    }
    if let Some(part) = q.q.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        // Matched literally: LIKE's wildcards in the text are escaped.
        let escaped = part
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        b.push(" AND username LIKE '%' || lower(")
            .push_bind(escaped)
            .push(") || '%'");
    }
    let max_codes = match q.backup_codes.as_deref() {
        Some("none") => Some(0),
        Some("low") => Some(crate::overview::LOW_BACKUP_CODES as i32),
        _ => None,
    };
    if let Some(max) = max_codes {
        b.push(" AND backup_codes_left <= ").push_bind(max);
    }
}

pub async fn user(
    pool: &PgPool,
    tenant_id: &str,
    user_id: &str,
) -> anyhow::Result<Option<UserRow>> {
    let row: Option<sqlx::types::Json<UserRow>> =
        sqlx::query_scalar("SELECT row FROM rm_users WHERE tenant_id = $1 AND user_id = $2")
            .bind(tenant_id)
            .bind(user_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|r| r.0))
}

/// Filters of the audit search.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub event_type: Option<String>,
    pub user_id: Option<String>,
    /// The actor's id (an admin's or user's id).
    pub actor: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// `ndjson` (default) or `csv`.
    pub format: Option<String>,
}

/// The tenant's matching entries in commit order, streamed from the database.
pub fn audit<'a>(
    pool: &'a PgPool,
    tenant_id: &'a str,
    q: &'a AuditQuery,
) -> BoxStream<'a, Result<AuditEntry, sqlx::Error>> {
    audit_rows(pool, tenant_id, q)
        .map(|row| AuditEntry::from_row(&row?))
        .boxed()
}

/// [`audit`]'s rows as read (the columns of `ENTRY_COLUMNS`), for a reader
/// that borrows the entries from them (`EntryRef`).
pub fn audit_rows<'a>(
    pool: &'a PgPool,
    tenant_id: &'a str,
    q: &'a AuditQuery,
) -> BoxStream<'a, Result<sqlx::postgres::PgRow, sqlx::Error>> {
    // With a user, their entries and their deliveries' as two indexed
    // lookups: one `user_id = $3 OR …` scanned the whole tenant.
    use crate::audit::ENTRY_COLUMNS as COLUMNS;
    const FILTERS: &str = "($2::text IS NULL OR event_type = $2) \
         AND ($4::text IS NULL OR actor_id = $4) \
         AND ($5::timestamptz IS NULL OR at >= $5) \
         AND ($6::timestamptz IS NULL OR at <= $6)";
    static BY_USER: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {COLUMNS} FROM rm_audit WHERE tenant_id = $1 AND user_id = $3 AND {FILTERS} \
             UNION ALL \
             SELECT {COLUMNS} FROM rm_audit WHERE tenant_id = $1 AND aggregate_type = 'delivery' \
               AND user_id IS DISTINCT FROM $3 AND aggregate_id IN ( \
                 SELECT c.aggregate_id FROM rm_audit c WHERE c.tenant_id = $1 \
                 AND c.event_type IN ('DeliveryClaimed', 'NoticeClaimed') AND c.user_id = $3) \
               AND {FILTERS} \
             ORDER BY position"
        )
    });
    static ALL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {COLUMNS} FROM rm_audit WHERE tenant_id = $1 AND $3::text IS NULL AND {FILTERS} \
             ORDER BY position"
        )
    });
    let sql: &'static str = if q.user_id.is_some() { &BY_USER } else { &ALL };
    sqlx::query(sql)
        .bind(tenant_id)
        .bind(q.event_type.as_deref())
        .bind(q.user_id.as_deref())
        .bind(q.actor.as_deref())
        .bind(q.from)
        .bind(q.to)
        .fetch(pool)
        .boxed()
}

/// Delivery figures per method and provider, from the audit history's
/// delivery events: sent, failed, fallbacks, and send latency percentiles.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct DeliveryStats {
    pub method: String,
    pub provider: String,
    pub sent: i64,
    pub failed: i64,
    pub fell_back: i64,
    pub fallback_rate: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

pub async fn delivery(pool: &PgPool, tenant_id: &str) -> anyhow::Result<Vec<DeliveryStats>> {
    // Delivery entries only, by the partial index on them (not every entry
    // of the tenant).
    // A fallback or a failure belongs to its request's method (from its claim)
    // and, for SMS, to the provider the tenant's settings named when it
    // happened (a `DeliveryFellBack` names none itself); a fallback's rate is
    // its share of that method and provider's requests.
    Ok(sqlx::query_as(
        "WITH claims AS ( \
           SELECT DISTINCT ON (aggregate_id) aggregate_id, details::jsonb ->> 'method' AS method \
           FROM rm_audit WHERE tenant_id = $1 AND aggregate_type = 'delivery' AND event_type = 'DeliveryClaimed' \
           ORDER BY aggregate_id, position), \
         outcomes AS ( \
           SELECT a.event_type, \
             CASE WHEN a.event_type = 'CodeDelivered' THEN a.details::jsonb ->> 'method' ELSE c.method END AS method, \
             CASE WHEN a.event_type = 'CodeDelivered' THEN a.details::jsonb ->> 'provider' \
                  WHEN c.method = 'sms' THEN COALESCE(( \
                    SELECT s.details::jsonb -> 'settings' ->> 'sms_provider' FROM rm_audit s \
                    WHERE s.tenant_id = $1 AND s.event_type = 'TwoFactorSettingsChanged' AND s.position < a.position \
                    ORDER BY s.position DESC LIMIT 1), '-') \
                  ELSE 'smtp' END AS provider, \
             (a.details::jsonb ->> 'latency_ms')::float8 AS latency \
           FROM rm_audit a JOIN claims c USING (aggregate_id) \
           WHERE a.tenant_id = $1 AND a.aggregate_type = 'delivery' \
             AND a.event_type IN ('CodeDelivered', 'DeliveryFailed', 'DeliveryFellBack')) \
         SELECT method, provider, \
           count(*) FILTER (WHERE event_type = 'CodeDelivered') AS sent, \
           count(*) FILTER (WHERE event_type = 'DeliveryFailed') AS failed, \
           count(*) FILTER (WHERE event_type = 'DeliveryFellBack') AS fell_back, \
           COALESCE(count(*) FILTER (WHERE event_type = 'DeliveryFellBack')::float8 \
             / NULLIF(count(*), 0), 0) AS fallback_rate, \
           percentile_cont(0.5) WITHIN GROUP (ORDER BY latency) AS latency_p50_ms, \
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency) AS latency_p95_ms, \
           percentile_cont(0.99) WITHIN GROUP (ORDER BY latency) AS latency_p99_ms \
         FROM outcomes GROUP BY method, provider ORDER BY method, provider",
    )
    .bind(tenant_id)
    .fetch_all(pool)
    .await?)
}

/// Every user row of a tenant (for figures the Overview does not keep, such
/// as a settings change's effect).
pub async fn users(pool: &PgPool, tenant_id: &str) -> anyhow::Result<Vec<UserRow>> {
    let rows: Vec<sqlx::types::Json<UserRow>> =
        sqlx::query_scalar("SELECT row FROM rm_users WHERE tenant_id = $1 ORDER BY username")
            .bind(tenant_id)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// The tenant's admins' rows (by the partial index on them).
pub async fn admins(pool: &PgPool, tenant_id: &str) -> anyhow::Result<Vec<UserRow>> {
    let rows: Vec<sqlx::types::Json<UserRow>> = sqlx::query_scalar(
        "SELECT row FROM rm_users WHERE tenant_id = $1 AND 'admin' = ANY(roles) ORDER BY username",
    )
    .bind(tenant_id)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// How far one read-model builder has got, against the event store's head.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Freshness {
    pub builder: String,
    /// The last event position it applied (0 before the first).
    pub applied_position: i64,
    /// The newest event position in the store.
    pub head_position: i64,
    /// When the last event it applied was committed, and when it applied it.
    pub last_event_at: Option<DateTime<Utc>>,
    pub last_applied_at: Option<DateTime<Utc>>,
}

/// Each builder's progress (the furthest of its lanes): the read models are
/// current when every builder has applied up to the head.
pub async fn freshness(pool: &PgPool) -> anyhow::Result<Vec<Freshness>> {
    Ok(sqlx::query_as(
        "WITH head AS (SELECT coalesce(max(global_position), 0) AS head FROM events) \
         SELECT b.builder, coalesce(p.last_position, 0) AS applied_position, head.head AS head_position, \
                p.last_event_at, p.last_applied_at \
         FROM unnest($1::text[]) AS b(builder) CROSS JOIN head \
         LEFT JOIN ( \
           SELECT projection, max(last_position) AS last_position, \
                  max(last_event_at) AS last_event_at, max(last_applied_at) AS last_applied_at \
           FROM projection_progress GROUP BY projection) p ON p.projection = b.builder \
         ORDER BY b.builder",
    )
    .bind(
        crate::store::Builder::ALL
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>(),
    )
    .fetch_all(pool)
    .await?)
}
