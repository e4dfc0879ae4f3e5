//! Retention: a tenant's audit entries older than its `audit_retention_days`
//! leave the read models (the audit history, timelines, exports); the events
//! stay. A pruning only ever goes up to a signed checkpoint, and only after
//! the rows it removes are checked to chain to the head that checkpoint
//! signed, so it cannot hide an altered or removed row: the mark it leaves
//! (`audit_pruned`) is a head the server signed before, and later exports'
//! chains go on from it.

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::PgPool;

use crate::audit::{chain, entries_between, Pruned, GENESIS};

/// Where `tenant`'s history was pruned up to, if it was.
pub async fn mark(
    executor: impl sqlx::PgExecutor<'_>,
    tenant: &str,
) -> anyhow::Result<Option<Pruned>> {
    sqlx::query_as("SELECT position, count, head, signed_at FROM audit_pruned WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_optional(executor)
        .await
        .context("reading where the audit history was pruned up to")
}

/// What one pruning removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruning {
    pub tenant_id: String,
    /// The new mark.
    pub pruned: Pruned,
    /// Rows removed from the audit history now.
    pub entries: u64,
}

/// Removes `tenant`'s audit entries recorded before `cutoff` from the read
/// model, up to the last signed checkpoint before the first entry to keep;
/// none when no checkpoint lies past the last mark. Fails, pruning nothing,
/// when the rows to remove do not chain to the head that checkpoint signed
/// (they were altered or removed since).
pub async fn prune(
    pool: &PgPool,
    tenant: &str,
    cutoff: DateTime<Utc>,
    now: DateTime<Utc>,
) -> anyhow::Result<Option<Pruning>> {
    let mut tx = pool.begin().await?;
    // The chain's lock: no checkpoint pass extends it meanwhile.
    let chained: Option<i64> =
        sqlx::query_scalar("SELECT position FROM audit_chain WHERE tenant_id = $1 FOR UPDATE")
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await
            .context("locking a tenant's audit chain")?;
    let Some(chained) = chained else {
        return Ok(None);
    };
    let (from, count, head) = match mark(&mut *tx, tenant).await? {
        Some(p) => (p.position, p.count, p.head),
        None => (0, 0, GENESIS.to_string()),
    };
    let to: Option<Pruned> = sqlx::query_as(
        "SELECT position, count, head, at AS signed_at FROM audit_checkpoints \
         WHERE tenant_id = $1 AND position > $2 AND position <= $3 \
           AND position < coalesce((SELECT min(position) FROM rm_audit \
                 WHERE tenant_id = $1 AND position > $2 AND at >= $4), $3 + 1) \
         ORDER BY position DESC LIMIT 1",
    )
    .bind(tenant)
    .bind(from)
    .bind(chained)
    .bind(cutoff)
    .fetch_optional(&mut *tx)
    .await
    .context("finding the checkpoint to prune up to")?;
    let Some(to) = to else {
        return Ok(None);
    };
    let (mut walked, mut at) = (count, head);
    let mut entries = 0u64;
    {
        let mut rows = entries_between(&mut tx, tenant, from, to.position);
        while let Some(entry) = rows.try_next().await? {
            at = chain(&at, &entry)?;
            walked += 1;
            entries += 1;
        }
    }
    if (walked, at.as_str()) != (to.count, to.head.as_str()) {
        bail!(
            "not pruning the audit history of tenant {tenant}: its entries up to position {} do not chain to the head the checkpoint signed at {} (an entry was altered, removed or added since)",
            to.position,
            to.signed_at
        );
    }
    sqlx::query("DELETE FROM rm_audit WHERE tenant_id = $1 AND position > $2 AND position <= $3")
        .bind(tenant)
        .bind(from)
        .bind(to.position)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO audit_pruned (tenant_id, position, count, head, signed_at, pruned_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id) DO UPDATE SET \
           position = $2, count = $3, head = $4, signed_at = $5, pruned_at = $6",
    )
    .bind(tenant)
    .bind(to.position)
    .bind(to.count)
    .bind(&to.head)
    .bind(to.signed_at)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await.context("committing a pruning")?;
    metrics::counter!("twofold_audit_pruned_entries_total").increment(entries);
    tracing::info!(
        tenant,
        position = to.position,
        entries,
        "audit entries pruned by the retention setting"
    );
    Ok(Some(Pruning {
        tenant_id: tenant.to_string(),
        pruned: to,
        entries,
    }))
}
