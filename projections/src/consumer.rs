//! The live projector: one JetStream durable pull consumer per builder. Each
//! message names an event (`Nats-Msg-Id` = `aggregate_type:aggregate_id:sequence`,
//! as the relay publishes it); the event is read from PostgreSQL, the source of
//! truth, applied once, and acked only after the update committed. A builder
//! killed mid-batch gets the unacked messages again and skips what it applied.

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Context};
use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use sqlx::PgPool;

use crate::record::EventRecord;
use crate::store::Builder;

/// Where the projector reads from.
#[derive(Debug, Clone)]
pub struct Source {
    pub nats_url: String,
    /// The JetStream stream the relay publishes to.
    pub stream: String,
    /// Subject filter, e.g. `twofold.events.>`.
    pub filter_subject: String,
    /// Prefix of the durable consumers' names (`<prefix>-<builder>`).
    pub durable_prefix: String,
    /// How long JetStream waits for an ack before redelivering.
    pub ack_wait: Duration,
}

pub struct Projector {
    pool: PgPool,
    builder: Builder,
    consumer: PullConsumer,
}

impl Projector {
    /// Binds to (creating if needed) the builder's durable consumer.
    pub async fn connect(pool: PgPool, source: &Source, builder: Builder) -> anyhow::Result<Self> {
        let client = async_nats::connect(&source.nats_url)
            .await
            .with_context(|| format!("connecting to NATS at {}", source.nats_url))?;
        let js = jetstream::new(client);
        let stream = js.get_stream(&source.stream).await.map_err(|e| {
            anyhow!(
                "the stream {} is not there yet (start the relay): {e}",
                source.stream
            )
        })?;
        let name = format!("{}-{}", source.durable_prefix, builder.name());
        let consumer = stream
            .get_or_create_consumer(
                &name,
                jetstream::consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: source.filter_subject.clone(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: source.ack_wait,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow!("creating the consumer {name}: {e}"))?;
        Ok(Self {
            pool,
            builder,
            consumer,
        })
    }

    /// Fetches and applies up to `max` messages, waiting at most `wait` for
    /// them; returns how many were handled.
    pub async fn process_next(&self, max: usize, wait: Duration) -> anyhow::Result<usize> {
        let mut messages = self
            .consumer
            .fetch()
            .max_messages(max)
            .expires(wait)
            .messages()
            .await
            .map_err(|e| anyhow!("fetching from JetStream: {e}"))?;
        let mut handled = 0;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| anyhow!("receiving from JetStream: {e}"))?;
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string());
            match id.as_deref().map(parse_id) {
                Some(Some((kind, aggregate, sequence))) => {
                    if let Some(record) = load(&self.pool, &kind, &aggregate, sequence).await? {
                        self.builder.apply(&self.pool, &record).await?;
                        let lag =
                            (wall_clock() - record.recorded_at).num_milliseconds() as f64 / 1000.0;
                        metrics::histogram!("twofold_projection_lag_seconds", "builder" => self.builder.name())
                            .record(lag.max(0.0));
                    }
                }
                _ => {
                    tracing::warn!(subject = %message.subject, "a message without an event id; skipped")
                }
            }
            message
                .ack()
                .await
                .map_err(|e| anyhow!("acking a message: {e}"))?;
            handled += 1;
        }
        if let Ok(info) = self.consumer.clone().info().await {
            metrics::gauge!("twofold_projection_pending_events", "builder" => self.builder.name())
                .set(info.num_pending as f64);
        }
        Ok(handled)
    }

    /// Runs until `shutdown` resolves; errors are logged and retried.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                result = self.process_next(500, Duration::from_secs(1)) => {
                    if let Err(e) = result {
                        tracing::warn!(builder = self.builder.name(), error = %format!("{e:#}"), "projector step failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }
}

/// Lag is measured against the wall clock, as the commit time was.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

/// `user:6f1c…:12` → ("user", "6f1c…", 12).
fn parse_id(id: &str) -> Option<(String, String, i64)> {
    let (rest, sequence) = id.rsplit_once(':')?;
    let (kind, aggregate) = rest.split_once(':')?;
    Some((
        kind.to_string(),
        aggregate.to_string(),
        sequence.parse().ok()?,
    ))
}

async fn load(
    pool: &PgPool,
    kind: &str,
    aggregate: &str,
    sequence: i64,
) -> anyhow::Result<Option<EventRecord>> {
    Ok(sqlx::query_as(&format!(
        "{} WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
        crate::record::SELECT
    ))
    .bind(kind)
    .bind(aggregate)
    .bind(sequence)
    .fetch_optional(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_ids_parse() {
        assert_eq!(
            super::parse_id("user:abc-def:12"),
            Some(("user".into(), "abc-def".into(), 12))
        );
        assert_eq!(super::parse_id("nonsense"), None);
    }
}
