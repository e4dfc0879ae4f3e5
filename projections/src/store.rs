//! Applying events to the read models in PostgreSQL, once each, with the
//! builder's position stored in the same transaction as the update.

use anyhow::Context;
use sqlx::{PgPool, Postgres, Transaction};

use crate::audit::AuditEntry;
use crate::directory::UserRow;
use crate::record::{EventRecord, Typed};

/// The read-model builders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builder {
    Directory,
    Audit,
}

impl Builder {
    pub const ALL: [Builder; 2] = [Builder::Directory, Builder::Audit];

    pub fn name(&self) -> &'static str {
        match self {
            Builder::Directory => "directory",
            Builder::Audit => "audit",
        }
    }

    /// Applies `record` unless this builder has already applied it (or a later
    /// event of the same stream). Returns whether it was applied.
    pub async fn apply(&self, pool: &PgPool, record: &EventRecord) -> anyhow::Result<bool> {
        let mut tx = pool
            .begin()
            .await
            .context("starting a projection transaction")?;
        let seen: Option<i64> = sqlx::query_scalar(
            "SELECT sequence FROM projection_positions \
             WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3 FOR UPDATE",
        )
        .bind(self.name())
        .bind(&record.aggregate_type)
        .bind(&record.aggregate_id)
        .fetch_optional(&mut *tx)
        .await?;
        if seen.is_some_and(|s| s >= record.sequence) {
            return Ok(false);
        }
        match self {
            Builder::Directory => apply_directory(&mut tx, record).await?,
            Builder::Audit => apply_audit(&mut tx, record).await?,
        }
        sqlx::query(
            "INSERT INTO projection_positions (projection, aggregate_type, aggregate_id, sequence) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (projection, aggregate_type, aggregate_id) DO UPDATE SET sequence = EXCLUDED.sequence",
        )
        .bind(self.name())
        .bind(&record.aggregate_type)
        .bind(&record.aggregate_id)
        .bind(record.sequence)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO projection_progress (projection, last_position, last_event_at, last_applied_at) \
             VALUES ($1, $2, $3, now()) \
             ON CONFLICT (projection) DO UPDATE SET \
               last_position = GREATEST(projection_progress.last_position, EXCLUDED.last_position), \
               last_event_at = EXCLUDED.last_event_at, last_applied_at = now()",
        )
        .bind(self.name())
        .bind(record.global_position)
        .bind(record.recorded_at)
        .execute(&mut *tx)
        .await?;
        tx.commit()
            .await
            .context("committing a projection update")?;
        metrics::counter!("twofold_projection_events_applied_total", "builder" => self.name())
            .increment(1);
        Ok(true)
    }
}

async fn apply_directory(
    tx: &mut Transaction<'static, Postgres>,
    record: &EventRecord,
) -> anyhow::Result<()> {
    let Typed::User(event) = record.typed()? else {
        return Ok(());
    };
    let current: Option<sqlx::types::Json<UserRow>> =
        sqlx::query_scalar("SELECT row FROM rm_users WHERE user_id = $1 FOR UPDATE")
            .bind(&record.aggregate_id)
            .fetch_optional(&mut **tx)
            .await?;
    let mut row = current.map(|j| j.0).unwrap_or_default();
    row.apply(&event);
    if row.user_id.is_empty() {
        // Events of a user whose registration this builder never saw.
        return Ok(());
    }
    upsert_user(tx, &row).await
}

pub async fn upsert_user(
    tx: &mut Transaction<'static, Postgres>,
    row: &UserRow,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO rm_users (user_id, tenant_id, username, two_factor, locked, service_account, roles, methods, last_sign_in_at, row) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (user_id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, username = EXCLUDED.username, \
           two_factor = EXCLUDED.two_factor, locked = EXCLUDED.locked, service_account = EXCLUDED.service_account, \
           roles = EXCLUDED.roles, methods = EXCLUDED.methods, last_sign_in_at = EXCLUDED.last_sign_in_at, row = EXCLUDED.row",
    )
    .bind(&row.user_id)
    .bind(&row.tenant_id)
    .bind(&row.username)
    .bind(two_factor_str(row))
    .bind(row.locked)
    .bind(row.service_account)
    .bind(row.roles.iter().cloned().collect::<Vec<_>>())
    .bind(row.methods().iter().map(|m| m.to_string()).collect::<Vec<_>>())
    .bind(row.last_sign_in.as_ref().map(|l| l.at))
    .bind(sqlx::types::Json(row))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub fn two_factor_str(row: &UserRow) -> &'static str {
    match row.two_factor {
        twofold_domain::user::TwoFactorState::NotStarted => "not_started",
        twofold_domain::user::TwoFactorState::Pending => "pending",
        twofold_domain::user::TwoFactorState::Enrolled => "enrolled",
    }
}

async fn apply_audit(
    tx: &mut Transaction<'static, Postgres>,
    record: &EventRecord,
) -> anyhow::Result<()> {
    let Some(entry) = AuditEntry::from_record(record) else {
        return Ok(());
    };
    insert_audit(tx, &[entry]).await
}

/// Inserts entries in one statement (rebuild sends thousands at once).
pub async fn insert_audit(
    tx: &mut Transaction<'static, Postgres>,
    entries: &[AuditEntry],
) -> anyhow::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&AuditEntry) -> Option<String>| entries.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO rm_audit (position, tenant_id, aggregate_type, aggregate_id, sequence, event_type, at, \
           actor_kind, actor_id, ip, user_agent, reason, user_id, details) \
         SELECT p, t, ty, a, s, e, at, k, ai, ip, ua, r, u, d::json FROM UNNEST($1::bigint[], $2::text[], \
           $3::text[], $4::text[], $5::bigint[], $6::text[], $7::timestamptz[], $8::text[], $9::text[], \
           $10::text[], $11::text[], $12::text[], $13::text[], $14::text[]) \
           AS x(p, t, ty, a, s, e, at, k, ai, ip, ua, r, u, d) \
         ON CONFLICT (position) DO NOTHING",
    )
    .bind(entries.iter().map(|e| e.position).collect::<Vec<_>>())
    .bind(col(|e| Some(e.tenant_id.clone())))
    .bind(col(|e| Some(e.aggregate_type.clone())))
    .bind(col(|e| Some(e.aggregate_id.clone())))
    .bind(entries.iter().map(|e| e.sequence).collect::<Vec<_>>())
    .bind(col(|e| Some(e.event_type.clone())))
    .bind(entries.iter().map(|e| e.at).collect::<Vec<_>>())
    .bind(col(|e| Some(e.actor_kind.clone())))
    .bind(col(|e| e.actor_id.clone()))
    .bind(col(|e| e.ip.clone()))
    .bind(col(|e| e.user_agent.clone()))
    .bind(col(|e| e.reason.clone()))
    .bind(col(|e| e.user_id.clone()))
    // As text, written as the rebuild's COPY writes it: the same bytes either way.
    .bind(
        entries
            .iter()
            .map(|e| serde_json::to_string(&e.details))
            .collect::<Result<Vec<_>, _>>()?,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes entries with COPY: the rebuild's bulk path.
pub async fn copy_audit(
    tx: &mut Transaction<'static, Postgres>,
    entries: &[AuditEntry],
) -> anyhow::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    // CSV: an unquoted empty field is NULL, so every present value is quoted.
    fn q(s: &str) -> String {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
    fn opt(s: &Option<String>) -> String {
        s.as_deref().map(q).unwrap_or_default()
    }
    let mut buf = String::with_capacity(entries.len() * 400);
    for e in entries {
        buf.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            e.position,
            q(&e.tenant_id),
            q(&e.aggregate_type),
            q(&e.aggregate_id),
            e.sequence,
            q(&e.event_type),
            e.at.to_rfc3339(),
            q(&e.actor_kind),
            opt(&e.actor_id),
            opt(&e.ip),
            opt(&e.user_agent),
            opt(&e.reason),
            opt(&e.user_id),
            q(&serde_json::to_string(&e.details)?)
        ));
    }
    let mut copy = tx
        .copy_in_raw(
            "COPY rm_audit (position, tenant_id, aggregate_type, aggregate_id, sequence, event_type, at, \
               actor_kind, actor_id, ip, user_agent, reason, user_id, details) FROM STDIN WITH (FORMAT csv)",
        )
        .await?;
    copy.send(buf.into_bytes()).await?;
    copy.finish().await?;
    Ok(())
}

/// Inserts many directory rows at once (the rebuild's bulk path).
pub async fn insert_users(
    tx: &mut Transaction<'static, Postgres>,
    rows: &[&UserRow],
) -> anyhow::Result<()> {
    for chunk in rows.chunks(5_000) {
        sqlx::query(
            "INSERT INTO rm_users (user_id, tenant_id, username, two_factor, locked, service_account, roles, methods, last_sign_in_at, row) \
             SELECT u, t, n, f, l, s, ARRAY(SELECT jsonb_array_elements_text(r)), ARRAY(SELECT jsonb_array_elements_text(m)), a, w \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::boolean[], $6::boolean[], $7::jsonb[], $8::jsonb[], $9::timestamptz[], $10::jsonb[]) \
               AS x(u, t, n, f, l, s, r, m, a, w)",
        )
        .bind(chunk.iter().map(|r| r.user_id.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.tenant_id.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.username.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| two_factor_str(r)).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.locked).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.service_account).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| serde_json::json!(r.roles)).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| serde_json::json!(r.methods())).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.last_sign_in.as_ref().map(|l| l.at)).collect::<Vec<_>>())
        .bind(chunk.iter().map(serde_json::to_value).collect::<Result<Vec<_>, _>>()?)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
