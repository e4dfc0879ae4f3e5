//! The live projector: one JetStream durable pull consumer per builder
//! ([`Consumer`]), run together by the [`Projector`] worker. Each
//! message names an event (`Nats-Msg-Id` = `aggregate_type:aggregate_id:sequence`,
//! as the relay publishes it); the builder brings that event's stream up to it
//! from PostgreSQL, the source of truth (the event and any before it not yet
//! applied), and acks only after the update committed. The messages that
//! have arrived are applied together, in one transaction. A builder killed
//! mid-batch gets the unacked messages again and skips what it applied; a
//! message that arrives after a later one of its stream finds nothing to do.

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Context};
use async_nats::jetstream;
use futures::FutureExt;
use sqlx::{Connection, PgConnection, PgPool};
use twofold_platform::envelope::parse_msg_id;
use twofold_platform::jetstream::{durable_consumer, Batches};
use twofold_platform::telemetry::{Telemetry, WorkerStart};
use twofold_platform::Config;

use crate::record::EventRecord;
use crate::store::{Builder, StreamTarget};

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

impl Source {
    /// The projector's consumers as configured (`projector-<builder>`).
    pub fn from_config(config: &Config) -> Self {
        Self {
            nats_url: config.nats_url.clone(),
            stream: config.nats_stream.clone(),
            filter_subject: format!("{}.events.>", config.nats_subject_prefix),
            durable_prefix: "projector".to_string(),
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// The projector worker: a [`Consumer`] per builder, its metrics and health.
pub struct Projector {
    consumers: Vec<Consumer>,
    telemetry: Telemetry,
}

impl Projector {
    /// Starts the metrics and health server on `metrics_addr`, then waits
    /// for PostgreSQL (migrating it), NATS and the relay's stream, and binds
    /// every builder's consumer.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let start = WorkerStart::begin(config, "projector").await?;
        let (source, js) = (Source::from_config(config), jetstream::new(start.nats));
        let (telemetry, pool) = (start.telemetry, start.pool);
        let mut consumers = Vec::new();
        for builder in Builder::ALL {
            let consumer = twofold_platform::retrying("binding a projector consumer", || {
                Consumer::bind(&js, pool.clone(), &source, builder)
            })
            .await;
            telemetry
                .readiness()
                .add_consumer(consumer.batches.consumer());
            consumers.push(consumer);
        }
        Ok(Self {
            consumers,
            telemetry,
        })
    }

    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.telemetry.local_addr()
    }

    /// Runs every builder's consumer until `shutdown` resolves.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) {
        let shutdown = shutdown.shared();
        futures::future::join_all(
            self.consumers
                .into_iter()
                .map(|c| c.run_until_stopped(shutdown.clone())),
        )
        .await;
        drop(self.telemetry);
    }
}

/// One builder's durable consumer, applying what arrives.
pub struct Consumer {
    pool: PgPool,
    /// The builder's own connections, one per batch being applied (see
    /// `Consumer::process_next`).
    connections: std::sync::Mutex<Vec<PgConnection>>,
    builder: Builder,
    /// The builder's durable consumer, up to `BATCH` messages pulled ahead.
    batches: Batches,
}

/// Most messages applied in one transaction (and pulled ahead).
const BATCH: usize = 500;

impl Consumer {
    /// Binds to (creating if needed) the builder's durable consumer.
    pub async fn connect(pool: PgPool, source: &Source, builder: Builder) -> anyhow::Result<Self> {
        let client = async_nats::connect(&source.nats_url)
            .await
            .with_context(|| format!("connecting to NATS at {}", source.nats_url))?;
        Self::bind(&jetstream::new(client), pool, source, builder).await
    }

    /// [`Consumer::connect`] on a JetStream connection already made.
    pub async fn bind(
        js: &jetstream::Context,
        pool: PgPool,
        source: &Source,
        builder: Builder,
    ) -> anyhow::Result<Self> {
        let name = format!("{}-{}", source.durable_prefix, builder.name());
        let consumer = durable_consumer(
            js,
            &source.stream,
            jetstream::consumer::pull::Config {
                durable_name: Some(name),
                filter_subject: source.filter_subject.clone(),
                ack_wait: source.ack_wait,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await?;
        Ok(Self {
            pool,
            connections: std::sync::Mutex::new(Vec::new()),
            builder,
            batches: Batches::new(consumer, BATCH),
        })
    }

    /// Waits at most `wait` for a message, then takes whatever else has
    /// arrived (up to `max` in all), applies them in one transaction, and
    /// acks them after it committed; returns the events applied.
    pub async fn process_next(
        &self,
        max: usize,
        wait: Duration,
    ) -> anyhow::Result<Vec<EventRecord>> {
        let batch = self.batches.next(max, wait).await?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut targets = Vec::with_capacity(batch.len());
        for message in &batch {
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string());
            match id.as_deref().and_then(parse_msg_id) {
                Some((aggregate_type, aggregate_id, sequence)) => targets.push(StreamTarget {
                    aggregate_type,
                    aggregate_id,
                    sequence,
                }),
                None => {
                    tracing::warn!(subject = %message.subject, "a message without an event id; skipped")
                }
            }
        }
        // On a connection of the builder's own: a pooled one is pinged each
        // time it is handed back, a round trip per batch.
        let idle = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => PgConnection::connect_with(&self.pool.connect_options())
                .await
                .context("connecting to PostgreSQL")?,
        };
        let applied = self.builder.catch_up(&mut conn, &targets).await;
        // A connection that failed is dropped; the next batch opens another.
        if applied.is_ok() {
            self.connections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
        }
        let applied = applied?;
        let now = wall_clock();
        let lag =
            metrics::histogram!("twofold_projection_lag_seconds", "builder" => self.builder.name());
        for record in &applied {
            let seconds = (now - record.recorded_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            lag.record(seconds.max(0.0));
        }
        for message in &batch {
            message
                .ack()
                .await
                .map_err(|e| anyhow!("acking a message: {e}"))?;
        }
        if let Some(last) = batch.last() {
            if let Ok(info) = last.info() {
                metrics::gauge!("twofold_projection_pending_events", "builder" => self.builder.name())
                    .set(info.pending as f64);
            }
        }
        Ok(applied)
    }

    /// Runs until `shutdown` resolves; errors are logged and retried. Two
    /// batches are applied at a time, so messages that arrive while one
    /// commits do not wait for it (the streams' locked positions keep two
    /// batches from applying the same events).
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) {
        let step = || async {
            loop {
                if let Err(e) = self.process_next(BATCH, Duration::from_secs(1)).await {
                    tracing::warn!(builder = self.builder.name(), error = %format!("{e:#}"), "projector step failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        tokio::select! {
            _ = shutdown => {}
            _ = futures::future::join(step(), step()) => {}
        }
    }
}

/// Lag is measured against the wall clock, as the commit time was.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}
