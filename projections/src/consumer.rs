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
use async_nats::jetstream::{self, AckKind};
use futures::FutureExt;
use sqlx::{Connection, PgConnection, PgPool};
use twofold_platform::dead_letters::{deliveries, last_delivery, DeadLetters, MAX_DELIVER};
use twofold_platform::envelope::parse_msg_id;
use twofold_platform::jetstream::{durable_consumer, Batches};
use twofold_platform::personal::Personal;
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
        let personal = Personal::new(config.keyring()?);
        let mut consumers = Vec::new();
        for builder in Builder::ALL {
            let consumer = twofold_platform::retrying("binding a projector consumer", || {
                Consumer::bind(&js, pool.clone(), personal.clone(), &source, builder)
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

    /// Runs every builder's consumer until `shutdown` resolves, and keeps
    /// `twofold_projection_unapplied_events{builder}` current.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) {
        let shutdown = shutdown.shared();
        let pool = self.consumers.first().map(|c| c.pool.clone());
        let gauge = async {
            let Some(pool) = pool else { return };
            let mut every = tokio::time::interval(UNAPPLIED_EVERY);
            loop {
                every.tick().await;
                for builder in Builder::ALL {
                    match unapplied_events(&pool, builder).await {
                        Ok(n) => metrics::gauge!("twofold_projection_unapplied_events", "builder" => builder.name())
                            .set(n as f64),
                        Err(e) => tracing::debug!(error = %format!("{e:#}"), "counting unapplied events"),
                    }
                }
            }
        };
        let consumers = futures::future::join_all(
            self.consumers
                .into_iter()
                .map(|c| c.run_until_stopped(shutdown.clone())),
        );
        tokio::select! {
            _ = consumers => {}
            _ = gauge => {}
            _ = shutdown.clone() => {}
        }
        drop(self.telemetry);
    }
}

/// How often the projector counts the events its builders have not applied.
const UNAPPLIED_EVERY: Duration = Duration::from_secs(10);

/// Events in the store that `builder` has not applied yet: the event count
/// against the sum of its stream positions (each stream's events are
/// numbered from 1, so a stream applied up to `n` accounts for `n`). Unlike
/// the progress position, this sees an event that is missing behind later
/// ones (held by a projector that died, until its ack wait runs out).
pub async fn unapplied_events(pool: &PgPool, builder: Builder) -> anyhow::Result<i64> {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM events) \
              - (SELECT coalesce(sum(sequence), 0)::bigint FROM projection_positions WHERE projection = $1)",
    )
    .bind(builder.name())
    .fetch_one(pool)
    .await
    .context("counting unapplied events")
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
    /// Opens the personal data the directory shows.
    personal: Personal,
    /// Where messages that cannot be applied go.
    dead_letters: DeadLetters,
    ack_wait: Duration,
}

/// Most messages applied in one transaction (and pulled ahead).
const BATCH: usize = 500;

impl Consumer {
    /// Binds to (creating if needed) the builder's durable consumer.
    pub async fn connect(
        pool: PgPool,
        personal: Personal,
        source: &Source,
        builder: Builder,
    ) -> anyhow::Result<Self> {
        let client = async_nats::connect(&source.nats_url)
            .await
            .with_context(|| format!("connecting to NATS at {}", source.nats_url))?;
        Self::bind(&jetstream::new(client), pool, personal, source, builder).await
    }

    /// [`Consumer::connect`] on a JetStream connection already made.
    pub async fn bind(
        js: &jetstream::Context,
        pool: PgPool,
        personal: Personal,
        source: &Source,
        builder: Builder,
    ) -> anyhow::Result<Self> {
        let name = format!("{}-{}", source.durable_prefix, builder.name());
        let consumer = durable_consumer(
            js,
            &source.stream,
            jetstream::consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: source.filter_subject.clone(),
                ack_wait: source.ack_wait,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await?;
        Ok(Self {
            dead_letters: DeadLetters::new(pool.clone(), &name, source.ack_wait),
            ack_wait: source.ack_wait,
            pool,
            personal,
            connections: std::sync::Mutex::new(Vec::new()),
            builder,
            batches: Batches::new(consumer, BATCH),
        })
    }

    /// Waits at most `wait` for a message, then takes whatever else has
    /// arrived (up to `max` in all), applies them in one transaction, and
    /// acks them after it committed; returns the events applied.
    ///
    /// A message that names no event is parked at once. When the batch
    /// fails while PostgreSQL answers, its messages are applied one by one:
    /// the one that fails is tried again after a delay, and parked on its
    /// last delivery. While PostgreSQL is away the batch is held and tried
    /// again when it is back.
    pub async fn process_next(
        &self,
        max: usize,
        wait: Duration,
    ) -> anyhow::Result<Vec<EventRecord>> {
        let batch = self.batches.next(max, wait).await?;
        let mut messages = Vec::with_capacity(batch.len());
        let mut targets = Vec::with_capacity(batch.len());
        for message in batch {
            match target_of(&message) {
                Some(target) => {
                    messages.push(message);
                    targets.push(target);
                }
                None => {
                    self.dead_letters
                        .park(&message, "a message without an event id")
                        .await?
                }
            }
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let applied = loop {
            let held: Vec<&jetstream::Message> = messages.iter().collect();
            let applied = self
                .dead_letters
                .keeping_alive(&held, self.apply(&targets))
                .await;
            match applied {
                Ok(applied) => break applied,
                Err(_) if !self.dead_letters.database_answers().await => {
                    self.dead_letters.hold_until_database_answers(&held).await;
                }
                Err(e) => {
                    self.dead_letters.log().warn("batch", |skipped| {
                        tracing::warn!(builder = self.builder.name(), error = %format!("{e:#}"), skipped, "a batch failed; applying its messages one by one");
                    });
                    return self.one_by_one(messages, targets).await;
                }
            }
        };
        self.record_lag(&applied);
        for message in &messages {
            message
                .ack()
                .await
                .map_err(|e| anyhow!("acking a message: {e}"))?;
        }
        if let Some(last) = messages.last() {
            if let Ok(info) = last.info() {
                metrics::gauge!("twofold_projection_pending_events", "builder" => self.builder.name())
                    .set(info.pending as f64);
            }
        }
        Ok(applied)
    }

    /// Applies each message on its own: acks what applies, leaves what
    /// fails for a later delivery, parks what failed on its last.
    async fn one_by_one(
        &self,
        messages: Vec<jetstream::Message>,
        targets: Vec<StreamTarget>,
    ) -> anyhow::Result<Vec<EventRecord>> {
        let mut all = Vec::new();
        for (message, target) in messages.iter().zip(targets) {
            let result = loop {
                let applied = self
                    .dead_letters
                    .keeping_alive(&[message], self.apply(std::slice::from_ref(&target)))
                    .await;
                match applied {
                    Err(_) if !self.dead_letters.database_answers().await => {
                        self.dead_letters
                            .hold_until_database_answers(&[message])
                            .await
                    }
                    result => break result,
                }
            };
            match result {
                Ok(applied) => {
                    self.record_lag(&applied);
                    all.extend(applied);
                    message
                        .ack()
                        .await
                        .map_err(|e| anyhow!("acking a message: {e}"))?;
                }
                Err(e) if last_delivery(message, MAX_DELIVER) => {
                    let reason = format!("failed on all {MAX_DELIVER} deliveries; last: {e:#}");
                    self.dead_letters.park(message, &reason).await?;
                }
                Err(e) => {
                    self.dead_letters.log().warn("retry", |skipped| {
                        tracing::warn!(builder = self.builder.name(), error = %format!("{e:#}"), skipped, "an event cannot be applied; will be tried again");
                    });
                    let n = deliveries(message).clamp(1, 16) as u32 - 1;
                    let after = self.ack_wait.saturating_mul(1 << n);
                    message
                        .ack_with(AckKind::Nak(Some(after)))
                        .await
                        .map_err(|e| anyhow!("nak: {e}"))?;
                }
            }
        }
        Ok(all)
    }

    /// Brings the targets' streams up to them, in one transaction.
    async fn apply(&self, targets: &[StreamTarget]) -> anyhow::Result<Vec<EventRecord>> {
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
        let applied = self
            .builder
            .catch_up(&mut conn, &self.personal, targets)
            .await;
        // A connection that failed is dropped; the next batch opens another.
        if applied.is_ok() {
            self.connections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
        }
        applied
    }

    fn record_lag(&self, applied: &[EventRecord]) {
        let now = wall_clock();
        let lag =
            metrics::histogram!("twofold_projection_lag_seconds", "builder" => self.builder.name());
        for record in applied {
            let seconds = (now - record.recorded_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            lag.record(seconds.max(0.0));
        }
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

/// The stream and sequence a message names (its `Nats-Msg-Id`).
fn target_of(message: &jetstream::Message) -> Option<StreamTarget> {
    let id = message.headers.as_ref()?.get("Nats-Msg-Id")?.to_string();
    let (aggregate_type, aggregate_id, sequence) = parse_msg_id(&id)?;
    Some(StreamTarget {
        aggregate_type,
        aggregate_id,
        sequence,
    })
}

/// Lag is measured against the wall clock, as the commit time was.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}
