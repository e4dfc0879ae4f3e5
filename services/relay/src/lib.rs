//! The relay: drains the outbox (filled by a trigger in the same transaction
//! as each event) into JetStream. Each event is published with `Nats-Msg-Id`
//! = `aggregate_type:aggregate_id:sequence`, so JetStream drops a duplicate
//! within its window, and its outbox row is deleted only after the publish
//! was acknowledged. While NATS is down nothing is lost: the outbox grows and
//! drains when NATS is back.
//!
//! One relay publishes at a time (a PostgreSQL advisory lock), in outbox
//! order, which keeps each aggregate's events in order; others stand by and
//! take over if it stops.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use async_nats::jetstream::{self, stream};
use serde_json::json;
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use twofold_platform::Config;

/// Advisory lock key held by the publishing relay ("twofold relay").
const LOCK_KEY: i64 = 0x7477_6f66_6f6c_6472;
/// Outbox rows published per round.
const BATCH: i64 = 500;
/// JetStream drops a re-published event within this window.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    prefix: String,
}

/// The stream the relay publishes to, created (or updated) by code.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
) -> anyhow::Result<()> {
    js.get_or_create_stream(stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{prefix}.events.>")],
        duplicate_window: DUPLICATE_WINDOW,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow!("creating the JetStream stream {name}: {e}"))?;
    Ok(())
}

impl Relay {
    pub async fn connect(pool: PgPool, config: &Config) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(&config.nats_url)
            .await
            .with_context(|| format!("connecting to NATS at {}", config.nats_url))?;
        let js = jetstream::new(client);
        Ok(Self {
            pool,
            js,
            prefix: config.nats_subject_prefix.clone(),
        })
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Publishes one batch of the outbox, oldest first; returns how many
    /// events were published and removed.
    pub async fn process_next(&self) -> anyhow::Result<usize> {
        let rows = sqlx::query(
            "SELECT o.id, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, \
               e.payload::text AS payload, e.metadata::text AS metadata, e.global_position, e.recorded_at \
             FROM outbox o JOIN events e ON e.global_position = o.global_position \
             ORDER BY o.id LIMIT $1",
        )
        .bind(BATCH)
        .fetch_all(&self.pool)
        .await
        .context("reading the outbox")?;
        if (rows.len() as i64) < BATCH {
            // Counting scans the outbox: only when it is nearly drained.
            metrics::gauge!("twofold_relay_outbox_backlog")
                .set(self.backlog().await.unwrap_or(0) as f64);
        }
        if rows.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        // Send the whole batch, then wait for the acks in order.
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let aggregate_type: String = row.get("aggregate_type");
            let aggregate_id: String = row.get("aggregate_id");
            let sequence: i64 = row.get("sequence");
            let event_type: String = row.get("event_type");
            let metadata: String = row.get("metadata");
            let tenant = serde_json::from_str::<serde_json::Value>(&metadata)
                .ok()
                .and_then(|m| {
                    m.get("tenant_id")
                        .and_then(|t| t.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "none".to_string());
            // The stored JSON goes out as it is: no parsing and re-encoding.
            let payload: String = row.get("payload");
            let recorded_at: chrono::DateTime<chrono::Utc> = row.get("recorded_at");
            let head = json!({
                "aggregate_type": aggregate_type,
                "aggregate_id": aggregate_id,
                "sequence": sequence,
                "event_type": event_type,
                "event_version": row.get::<String, _>("event_version"),
                "global_position": row.get::<i64, _>("global_position"),
                "recorded_at": recorded_at,
            })
            .to_string();
            let body = format!(
                "{},\"payload\":{payload},\"metadata\":{metadata}}}",
                head.trim_end_matches('}')
            );
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                format!("{aggregate_type}:{aggregate_id}:{sequence}").as_str(),
            );
            let subject = format!(
                "{}.events.{tenant}.{aggregate_type}.{event_type}",
                self.prefix
            );
            let ack = self
                .js
                .publish_with_headers(subject, headers, body.into_bytes().into())
                .await
                .map_err(|e| anyhow!("publishing to JetStream: {e}"))?;
            pending.push((row.get::<i64, _>("id"), ack));
        }
        let mut acked = Vec::with_capacity(pending.len());
        for (id, ack) in pending {
            match ack.await {
                Ok(_) => acked.push(id),
                // Later rows wait for this one: order matters more than speed.
                Err(e) => {
                    self.delete(&acked).await?;
                    return Err(anyhow!("JetStream did not acknowledge a publish: {e}"));
                }
            }
        }
        self.delete(&acked).await?;
        metrics::counter!("twofold_relay_published_total").increment(acked.len() as u64);
        metrics::histogram!("twofold_relay_publish_batch_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(acked.len())
    }

    async fn delete(&self, ids: &[i64]) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await
            .context("removing published rows from the outbox")?;
        Ok(())
    }

    pub async fn backlog(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Publishes until `shutdown` resolves: holds the advisory lock (standing
    /// by while another relay holds it), wakes on each commit's NOTIFY, and
    /// backs off while NATS or PostgreSQL is unreachable.
    pub async fn run_until_stopped(
        self,
        stream: &str,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let mut lock = self
            .pool
            .acquire()
            .await
            .context("a connection for the relay lock")?;
        loop {
            let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LOCK_KEY)
                .fetch_one(&mut *lock)
                .await?;
            if held {
                break;
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        tracing::info!("relay publishing");
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("twofold_outbox").await?;
        let mut stream_ready = false;
        let mut backoff = Duration::from_millis(100);
        loop {
            if !stream_ready {
                match ensure_stream(&self.js, stream, &self.prefix).await {
                    Ok(()) => stream_ready = true,
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "JetStream not ready"),
                }
            }
            let result = if stream_ready {
                self.process_next().await
            } else {
                Ok(0)
            };
            let wait = match result {
                Ok(n) if n as i64 == BATCH => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    Duration::from_secs(1)
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "relay round failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = listener.recv() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(LOCK_KEY)
            .execute(&mut *lock)
            .await;
        Ok(())
    }
}
