//! `twofold projections rebuild`: replays the event store (the source of
//! truth) into fresh read models, in one transaction, so readers see either
//! the old models or the complete new ones.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context;
use sqlx::PgPool;
use twofold_platform::personal::Personal;

use crate::audit::AuditEntry;
use crate::directory::UserRow;
use crate::record::{load_batch, EventRecord, RecordExt, Typed};
use crate::store::{write_users, AuditCopy, Builder};

const BATCH: i64 = 10_000;

/// The next batch, opened (the directory reads personal data opened; the
/// audit history keeps the sealed form).
async fn load_owned(
    pool: PgPool,
    personal: Personal,
    after: i64,
) -> anyhow::Result<Vec<EventRecord>> {
    let mut batch = load_batch(&pool, after, BATCH).await?;
    personal.open_envelopes(&pool, &mut batch).await?;
    Ok(batch)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rebuilt {
    pub events: u64,
    pub users: u64,
    pub seconds: f64,
}

/// Replays every event; `progress` is told the running count after each batch.
pub async fn rebuild(
    pool: &PgPool,
    personal: &Personal,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<Rebuilt> {
    let started = Instant::now();
    let mut tx = pool.begin().await.context("starting the rebuild")?;
    // The Overview's checkpoints are folded by the code being rebuilt with.
    sqlx::query(
        "TRUNCATE rm_users, rm_audit, projection_positions, projection_progress, overview_checkpoints, \
           overview_days, rm_overview_counts",
    )
        .execute(&mut *tx)
        .await?;
    // Secondary indexes are built once at the end rather than row by row;
    // their definitions are read back from the catalog, so the migrations
    // stay the one place that defines them.
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname::text, indexdef FROM pg_indexes \
         WHERE schemaname = current_schema() AND tablename IN ('rm_audit', 'rm_users') \
           AND indexname NOT LIKE '%_pkey'",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (name, _) in &indexes {
        sqlx::query(&format!("DROP INDEX {name}"))
            .execute(&mut *tx)
            .await?;
    }
    // Entries pruned by a tenant's retention setting stay out.
    let pruned: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT tenant_id, position FROM audit_pruned")
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
    let mut users: HashMap<String, UserRow> = HashMap::new();
    // Each stream's last sequence, by aggregate type and id.
    let mut positions: HashMap<String, HashMap<String, i64>> = HashMap::new();
    let mut count = 0u64;
    let mut last: Option<EventRecord> = None;
    // Reading the next batch, folding this one and writing the one before
    // overlap: a writer task owns the transaction while batches stream in.
    let (to_writer, mut batches) = tokio::sync::mpsc::channel::<Vec<AuditEntry>>(2);
    let writer = tokio::spawn(async move {
        let mut copy = AuditCopy::start(&mut tx).await?;
        while let Some(entries) = batches.recv().await {
            copy.write(&entries).await?;
        }
        copy.finish().await?;
        anyhow::Ok(tx)
    });
    let mut next = tokio::spawn(load_owned(pool.clone(), personal.clone(), 0));
    loop {
        let batch = next.await.context("loading events")??;
        let Some(tail) = batch.last() else { break };
        next = tokio::spawn(load_owned(
            pool.clone(),
            personal.clone(),
            tail.global_position,
        ));
        let mut entries = Vec::with_capacity(batch.len());
        for record in &batch {
            if let Typed::User(event) = record.typed()? {
                match users.get_mut(&record.aggregate_id) {
                    Some(row) => row.apply(&event),
                    None => users
                        .entry(record.aggregate_id.clone())
                        .or_default()
                        .apply(&event),
                }
            }
            entries.extend(
                AuditEntry::from_record(record)
                    .filter(|e| pruned.get(&e.tenant_id).is_none_or(|&p| e.position > p)),
            );
            // Looked up by reference: a stream's id is copied once, not per event.
            let streams = match positions.get_mut(&record.aggregate_type) {
                Some(streams) => streams,
                None => positions.entry(record.aggregate_type.clone()).or_default(),
            };
            match streams.get_mut(&record.aggregate_id) {
                Some(sequence) => *sequence = record.sequence,
                None => {
                    streams.insert(record.aggregate_id.clone(), record.sequence);
                }
            }
        }
        if to_writer.send(entries).await.is_err() {
            break; // the writer failed; its error is reported below
        }
        count += batch.len() as u64;
        progress(count);
        last = batch.into_iter().last();
    }
    drop(to_writer);
    let mut tx = writer.await.context("the rebuild writer stopped")??;
    let rows: Vec<&UserRow> = users.values().filter(|r| !r.user_id.is_empty()).collect();
    write_users(&mut tx, &rows).await?;
    crate::overview_counts::replace(&mut tx, &crate::overview_counts::of(rows.iter().copied()))
        .await?;
    // The indexes dropped above, built again over the complete tables, with
    // room to sort in memory.
    sqlx::query("SET LOCAL maintenance_work_mem = '256MB'")
        .execute(&mut *tx)
        .await?;
    for (name, definition) in &indexes {
        sqlx::query(definition)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("building the index {name} again"))?;
    }
    let (mut types, mut ids, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
    for (aggregate_type, streams) in &positions {
        for (id, sequence) in streams {
            types.push(aggregate_type.as_str());
            ids.push(id.as_str());
            seqs.push(*sequence);
        }
    }
    for builder in Builder::ALL {
        sqlx::query(
            "INSERT INTO projection_positions (projection, aggregate_type, aggregate_id, sequence) \
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::bigint[])",
        )
        .bind(builder.name())
        .bind(&types)
        .bind(&ids)
        .bind(&seqs)
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
    // The planner's statistics of the new rows, and the directory's
    // visibility map (its pages are read from covering indexes alone once
    // the table's pages are marked all-visible), now rather than when
    // autovacuum comes round to them.
    for statement in ["VACUUM (ANALYZE) rm_users", "ANALYZE rm_audit"] {
        sqlx::query(statement)
            .execute(pool)
            .await
            .with_context(|| format!("{statement} after the rebuild"))?;
    }
    Ok(Rebuilt {
        events: count,
        users: users.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
    })
}
