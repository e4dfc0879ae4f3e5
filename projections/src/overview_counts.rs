//! The live Overview's counts per tenant (`rm_overview_counts`): moved by the
//! directory builder as rows change (`store::add_counts`), written whole by
//! a rebuild, and filled in once from the directory rows after the upgrade
//! that introduced them.

use anyhow::Context;
use sqlx::{PgConnection, PgPool};

use crate::directory::UserRow;
use crate::overview;
use crate::store::{add_counts, TenantCounts};

const UPGRADE: &str = "overview_counts";

/// Whether the counts are still to be filled in after the upgrade.
pub async fn pending<'e>(executor: impl sqlx::PgExecutor<'e>) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM read_model_upgrades WHERE name = $1)")
            .bind(UPGRADE)
            .fetch_one(executor)
            .await?,
    )
}

/// The counts of `rows`, per tenant.
pub fn of<'a>(rows: impl IntoIterator<Item = &'a UserRow>) -> TenantCounts {
    let mut counts = TenantCounts::new();
    for row in rows {
        overview::count(counts.entry(row.tenant_id.clone()).or_default(), row, 1);
    }
    counts
}

/// Replaces every tenant's counts with `counts` and marks the upgrade done.
pub async fn replace(tx: &mut PgConnection, counts: &TenantCounts) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM rm_overview_counts")
        .execute(&mut *tx)
        .await?;
    add_counts(&mut *tx, counts).await?;
    sqlx::query("DELETE FROM read_model_upgrades WHERE name = $1")
        .bind(UPGRADE)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Fills the counts in from the directory rows if the upgrade left them to
/// be (a no-op otherwise). The counts table is locked first, so a builder
/// moving counts meanwhile waits and then moves the filled-in figures.
pub async fn upgrade(pool: &PgPool) -> anyhow::Result<()> {
    if !pending(pool).await? {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE rm_overview_counts IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    // Another projector may have filled them in while this one waited.
    if !pending(&mut *tx).await? {
        return Ok(());
    }
    let rows: Vec<sqlx::types::Json<UserRow>> = sqlx::query_scalar("SELECT row FROM rm_users")
        .fetch_all(&mut *tx)
        .await?;
    let counts = of(rows.iter().map(|r| &r.0));
    replace(&mut tx, &counts).await?;
    tx.commit()
        .await
        .context("committing the Overview counts filled in")?;
    tracing::info!(tenants = counts.len(), "filled in the Overview counts");
    Ok(())
}
