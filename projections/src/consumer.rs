//! The live projector: one JetStream durable pull consumer ([`Consumer`])
//! for every builder, run by the [`Projector`] worker. Each message names an
//! event (`Nats-Msg-Id` = `aggregate_type:aggregate_id:sequence`, as the
//! relay publishes it); each builder brings that event's stream up to it
//! from PostgreSQL, the source of truth (the event and any before it not yet
//! applied), and the message is acked only after the update committed. The
//! messages that have arrived are applied together, by every builder, in one
//! transaction. A projector killed mid-batch gets the unacked messages again
//! and skips what it applied; a message that arrives after a later one of
//! its stream finds nothing to do.
//!
//! Versions before this one had a durable consumer per builder
//! (`projector-directory`, `projector-audit`): [`Consumer::bind`] starts the
//! one consumer where the slower of them had acked everything, and deletes
//! them.

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Context};
use async_nats::jetstream::{self, consumer::DeliverPolicy, AckKind};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use sqlx::{Connection, PgConnection, PgPool};
use twofold_platform::dead_letters::{deliveries, last_delivery, DeadLetters, MAX_DELIVER};
use twofold_platform::envelope::{parse_msg_id, PUBLISHED_AT};
use twofold_platform::jetstream::{durable_consumer, Batches};
use twofold_platform::personal::Personal;
use twofold_platform::telemetry::{Telemetry, WorkerStart};
use twofold_platform::Config;

use crate::record::EventRecord;
use crate::store::{catch_up, Builder, StreamTarget};

/// Where the projector reads from.
#[derive(Debug, Clone)]
pub struct Source {
    pub nats_url: String,
    /// The JetStream stream the relay publishes to.
    pub stream: String,
    /// Subject filter, e.g. `twofold.events.>`.
    pub filter_subject: String,
    /// The durable consumer's name (`projector`); the consumers of versions
    /// before it were `<durable>-<builder>`.
    pub durable: String,
    /// How long JetStream waits for an ack before redelivering.
    pub ack_wait: Duration,
}

impl Source {
    /// The projector's consumer as configured (`projector`).
    pub fn from_config(config: &Config) -> Self {
        Self {
            nats_url: config.nats_url.clone(),
            stream: config.nats_stream.clone(),
            filter_subject: format!("{}.events.>", config.nats_subject_prefix),
            durable: "projector".to_string(),
            ack_wait: Duration::from_secs(30),
        }
    }

    /// The per-builder consumers of versions before the shared one.
    pub fn legacy_durables(&self) -> Vec<String> {
        Builder::ALL
            .iter()
            .map(|b| format!("{}-{}", self.durable, b.name()))
            .collect()
    }
}

/// The projector worker: the builders' [`Consumer`], its metrics and health.
pub struct Projector {
    consumer: Consumer,
    telemetry: Telemetry,
}

impl Projector {
    /// Starts the metrics and health server on `metrics_addr`, then waits
    /// for PostgreSQL (migrating it), NATS and the relay's stream, and binds
    /// the builders' consumer.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let start = WorkerStart::begin(config, "projector").await?;
        let (source, js) = (Source::from_config(config), jetstream::new(start.nats));
        let (telemetry, pool) = (start.telemetry, start.pool);
        let personal = Personal::new(config.keyring()?);
        twofold_platform::retrying("filling in the Overview counts", || {
            crate::overview_counts::upgrade(&pool)
        })
        .await;
        let consumer = twofold_platform::retrying("binding the projector's consumer", || {
            Consumer::bind(&js, pool.clone(), personal.clone(), &source)
        })
        .await;
        telemetry
            .readiness()
            .add_consumer(consumer.batches.consumer());
        Ok(Self {
            consumer,
            telemetry,
        })
    }

    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.telemetry.local_addr()
    }

    /// Runs the consumer until `shutdown` resolves, and keeps
    /// `twofold_projection_unapplied_events{builder}` current.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) {
        let shutdown = shutdown.shared();
        let pool = self.consumer.pool.clone();
        let gauge = async {
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
        tokio::select! {
            _ = self.consumer.run_until_stopped(shutdown.clone()) => {}
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

/// The builders' durable consumer, applying what arrives.
pub struct Consumer {
    pool: PgPool,
    /// The consumer's own connections, one per batch being applied (see
    /// `Consumer::process_next`).
    connections: std::sync::Mutex<Vec<PgConnection>>,
    /// The durable consumer, up to `BATCH` messages pulled ahead.
    batches: Batches,
    /// Opens the personal data the directory shows.
    personal: Personal,
    /// Where messages that cannot be applied go.
    dead_letters: DeadLetters,
    ack_wait: Duration,
}

/// Most messages applied in one transaction (and pulled ahead).
const BATCH: usize = 500;

/// What a step applied, and when: the times are the wall clock's, as the
/// events' `recorded_at` and the relay's publish time are.
#[derive(Debug, Default)]
pub struct Step {
    /// When the messages were taken from the subscription.
    pub received: Option<DateTime<Utc>>,
    /// The events the messages named, with the relay's publish time (the
    /// `Twofold-Published-At` header) when they carry one.
    pub messages: Vec<(StreamTarget, Option<DateTime<Utc>>)>,
    /// What each builder applied, and when its transaction committed.
    pub applied: Vec<Applied>,
}

/// A builder's events applied in one committed transaction.
#[derive(Debug)]
pub struct Applied {
    pub builder: Builder,
    pub records: Vec<EventRecord>,
    pub committed: DateTime<Utc>,
}

impl Step {
    /// Every builder's records, the builder named with each.
    pub fn records(&self) -> impl Iterator<Item = (Builder, &EventRecord)> {
        self.applied
            .iter()
            .flat_map(|a| a.records.iter().map(move |r| (a.builder, r)))
    }
}

impl Consumer {
    /// Binds to (creating if needed) the builders' durable consumer.
    pub async fn connect(
        pool: PgPool,
        personal: Personal,
        source: &Source,
    ) -> anyhow::Result<Self> {
        let client = async_nats::connect(&source.nats_url)
            .await
            .with_context(|| format!("connecting to NATS at {}", source.nats_url))?;
        Self::bind(&jetstream::new(client), pool, personal, source).await
    }

    /// [`Consumer::connect`] on a JetStream connection already made. When
    /// the consumer is not there yet but the per-builder consumers of an
    /// earlier version are, it starts after the last message both of them
    /// had acked (and every one before it), so nothing is lost and little is
    /// delivered twice (which the builders skip); then those are deleted.
    pub async fn bind(
        js: &jetstream::Context,
        pool: PgPool,
        personal: Personal,
        source: &Source,
    ) -> anyhow::Result<Self> {
        let name = source.durable.clone();
        let stream = js.get_stream(&source.stream).await.map_err(|e| {
            anyhow!(
                "the stream {} is not there yet (start the relay): {e}",
                source.stream
            )
        })?;
        let legacy = source.legacy_durables();
        let deliver_policy = match stream.consumer_info(&name).await {
            Ok(info) => info.config.deliver_policy,
            Err(_) => {
                let mut floor: Option<u64> = None;
                for old in &legacy {
                    if let Ok(info) = stream.consumer_info(old).await {
                        let acked = info.ack_floor.stream_sequence;
                        floor = Some(floor.map_or(acked, |f| f.min(acked)));
                    }
                }
                match floor {
                    Some(acked) => {
                        tracing::info!(consumer = %name, from = acked + 1, "taking over from the per-builder consumers");
                        DeliverPolicy::ByStartSequence {
                            start_sequence: acked + 1,
                        }
                    }
                    None => DeliverPolicy::All,
                }
            }
        };
        let consumer = durable_consumer(
            js,
            &source.stream,
            jetstream::consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: source.filter_subject.clone(),
                ack_wait: source.ack_wait,
                max_ack_pending: 10_000,
                deliver_policy,
                ..Default::default()
            },
        )
        .await?;
        for old in &legacy {
            if stream.delete_consumer(old).await.is_ok() {
                tracing::info!(consumer = %old, "deleted the per-builder consumer of an earlier version");
            }
        }
        Ok(Self {
            dead_letters: DeadLetters::new(pool.clone(), &name, source.ack_wait),
            ack_wait: source.ack_wait,
            pool,
            personal,
            connections: std::sync::Mutex::new(Vec::new()),
            batches: Batches::new(consumer, BATCH),
        })
    }

    /// Waits at most `wait` for a message, then takes whatever else has
    /// arrived (up to `max` in all), applies them for every builder in one
    /// transaction, and acks them after it committed.
    ///
    /// A message that names no event is parked at once. When the batch
    /// fails while PostgreSQL answers, its messages are applied one by one:
    /// the one that fails is tried again after a delay, and parked on its
    /// last delivery. While PostgreSQL is away the batch is held and tried
    /// again when it is back.
    pub async fn process_next(&self, max: usize, wait: Duration) -> anyhow::Result<Step> {
        let batch = self.batches.next(max, wait).await?;
        let mut step = Step {
            received: (!batch.is_empty()).then(wall_clock),
            ..Step::default()
        };
        let mut messages = Vec::with_capacity(batch.len());
        let mut targets = Vec::with_capacity(batch.len());
        for message in batch {
            match target_of(&message) {
                Some(target) => {
                    step.messages.push((target.clone(), published_at(&message)));
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
            return Ok(step);
        }
        let applied = loop {
            let held: Vec<&jetstream::Message> = messages.iter().collect();
            let applied = self
                .dead_letters
                .keeping_alive(&held, self.apply(&Builder::ALL, &targets))
                .await;
            match applied {
                Ok(applied) => break applied,
                Err(_) if !self.dead_letters.database_answers().await => {
                    self.dead_letters.hold_until_database_answers(&held).await;
                }
                Err(e) => {
                    self.dead_letters.log().warn("batch", |skipped| {
                        tracing::warn!(error = %format!("{e:#}"), skipped, "a batch failed; applying its messages one by one");
                    });
                    step.applied = self.one_by_one(messages, targets).await?;
                    return Ok(step);
                }
            }
        };
        step.applied = applied;
        for message in &messages {
            message
                .ack()
                .await
                .map_err(|e| anyhow!("acking a message: {e}"))?;
        }
        if let Some(last) = messages.last() {
            if let Ok(info) = last.info() {
                for builder in Builder::ALL {
                    metrics::gauge!("twofold_projection_pending_events", "builder" => builder.name())
                        .set(info.pending as f64);
                }
            }
        }
        Ok(step)
    }

    /// Applies each message on its own: acks what applies, leaves what
    /// fails for a later delivery, parks what failed on its last. A message
    /// that fails for every builder together is applied builder by builder,
    /// so one builder that cannot apply an event does not hold it from the
    /// others (which skip it on the next delivery).
    async fn one_by_one(
        &self,
        messages: Vec<jetstream::Message>,
        targets: Vec<StreamTarget>,
    ) -> anyhow::Result<Vec<Applied>> {
        let mut all = Vec::new();
        for (message, target) in messages.iter().zip(targets) {
            let target = std::slice::from_ref(&target);
            let mut result = self.apply_held(message, &Builder::ALL, target).await;
            if result.is_err() {
                let mut failed = None;
                for builder in Builder::ALL {
                    match self.apply_held(message, &[builder], target).await {
                        Ok(applied) => all.extend(applied),
                        Err(e) => {
                            failed.get_or_insert(
                                e.context(format!("the {} builder", builder.name())),
                            );
                        }
                    }
                }
                result = match failed {
                    Some(e) => Err(e),
                    None => Ok(Vec::new()),
                };
            }
            match result {
                Ok(applied) => {
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
                        tracing::warn!(error = %format!("{e:#}"), skipped, "an event cannot be applied; will be tried again");
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

    /// [`Consumer::apply`] for one message, held while PostgreSQL is away.
    async fn apply_held(
        &self,
        message: &jetstream::Message,
        builders: &[Builder],
        target: &[StreamTarget],
    ) -> anyhow::Result<Vec<Applied>> {
        loop {
            let applied = self
                .dead_letters
                .keeping_alive(&[message], self.apply(builders, target))
                .await;
            match applied {
                Err(_) if !self.dead_letters.database_answers().await => {
                    self.dead_letters
                        .hold_until_database_answers(&[message])
                        .await
                }
                result => return result,
            }
        }
    }

    /// Brings the targets' streams up to them for `builders`, in one
    /// transaction, and records the lag of what was applied.
    async fn apply(
        &self,
        builders: &[Builder],
        targets: &[StreamTarget],
    ) -> anyhow::Result<Vec<Applied>> {
        // On a connection of the consumer's own: a pooled one is pinged
        // each time it is handed back, a round trip per batch.
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
        let applied = catch_up(&mut conn, &self.personal, builders, targets).await;
        // A connection that failed is dropped; the next batch opens another.
        if applied.is_ok() {
            self.connections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
        }
        let committed = wall_clock();
        let applied: Vec<Applied> = applied?
            .into_iter()
            .map(|(builder, records)| Applied {
                builder,
                records,
                committed,
            })
            .collect();
        for a in &applied {
            let lag = metrics::histogram!("twofold_projection_lag_seconds", "builder" => a.builder.name());
            for record in &a.records {
                let seconds = (committed - record.recorded_at)
                    .num_microseconds()
                    .unwrap_or(0) as f64
                    / 1e6;
                lag.record(seconds.max(0.0));
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
                    tracing::warn!(error = %format!("{e:#}"), "projector step failed; retrying");
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

/// When the relay published the message, if it said.
fn published_at(message: &jetstream::Message) -> Option<DateTime<Utc>> {
    let micros: i64 = message
        .headers
        .as_ref()?
        .get(PUBLISHED_AT)?
        .as_str()
        .parse()
        .ok()?;
    DateTime::from_timestamp_micros(micros)
}

/// Lag is measured against the wall clock, as the commit time was.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> DateTime<Utc> {
    Utc::now()
}
