//! `twofold projections rebuild`: replays the event store (the source of
//! truth) into fresh read models, in one transaction, so readers see either
//! the old models or the complete new ones.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context;
use sqlx::PgPool;

use crate::audit::AuditEntry;
use crate::directory::UserRow;
use crate::record::{load_batch, EventRecord, Typed};
use crate::store::{insert_audit, upsert_user, Builder};

const BATCH: i64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rebuilt {
    pub events: u64,
    pub users: u64,
    pub seconds: f64,
}

/// Replays every event; `progress` is told the running count after each batch.
pub async fn rebuild(pool: &PgPool, mut progress: impl FnMut(u64)) -> anyhow::Result<Rebuilt> {
    let started = Instant::now();
    let mut tx = pool.begin().await.context("starting the rebuild")?;
    sqlx::query("TRUNCATE rm_users, rm_audit, projection_positions, projection_progress")
        .execute(&mut *tx)
        .await?;
    let mut users: HashMap<String, UserRow> = HashMap::new();
    let mut positions: HashMap<(String, String), i64> = HashMap::new();
    let mut after = 0i64;
    let mut count = 0u64;
    let mut last: Option<EventRecord> = None;
    loop {
        let batch = load_batch(pool, after, BATCH).await?;
        let Some(tail) = batch.last() else { break };
        after = tail.global_position;
        let mut entries = Vec::with_capacity(batch.len());
        for record in &batch {
            if let Typed::User(event) = record.typed()? {
                users
                    .entry(record.aggregate_id.clone())
                    .or_default()
                    .apply(&event);
            }
            entries.extend(AuditEntry::from_record(record));
            positions.insert(
                (record.aggregate_type.clone(), record.aggregate_id.clone()),
                record.sequence,
            );
        }
        insert_audit(&mut tx, &entries).await?;
        count += batch.len() as u64;
        progress(count);
        last = batch.into_iter().last();
    }
    for row in users.values().filter(|r| !r.user_id.is_empty()) {
        upsert_user(&mut tx, row).await?;
    }
    for builder in Builder::ALL {
        let (types, ids): (Vec<String>, Vec<String>) = positions.keys().cloned().unzip();
        let seqs: Vec<i64> = positions.values().copied().collect();
        sqlx::query(
            "INSERT INTO projection_positions (projection, aggregate_type, aggregate_id, sequence) \
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::bigint[])",
        )
        .bind(builder.name())
        .bind(types)
        .bind(ids)
        .bind(seqs)
        .execute(&mut *tx)
        .await?;
        if let Some(last) = &last {
            sqlx::query(
                "INSERT INTO projection_progress (projection, last_position, last_event_at, last_applied_at) \
                 VALUES ($1, $2, $3, now())",
            )
            .bind(builder.name())
            .bind(last.global_position)
            .bind(last.recorded_at)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit()
        .await
        .context("committing the rebuilt read models")?;
    Ok(Rebuilt {
        events: count,
        users: users.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
    })
}
