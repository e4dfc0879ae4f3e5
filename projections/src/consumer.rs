//! The live projector: one JetStream durable pull consumer ([`Consumer`])
//! for every builder, run by the [`Projector`] worker. Each message names an
//! event (`Nats-Msg-Id` = `aggregate_type:aggregate_id:sequence`, as the
//! relay publishes it); each builder brings that event's stream up to it
//! from PostgreSQL, the source of truth (the event and any before it not yet
//! applied), and the message is acked only after the update committed. The
//! messages that have arrived are applied together, by every builder, in one
//! transaction; the worker applies [`LANES`] batches at a time, never two
//! holding the same stream ([`Lanes`]). A projector killed mid-batch gets
//! the unacked messages again and skips what it applied; a message that
//! arrives after a later one of its stream finds nothing to do.
//!
//! Versions before this one had a durable consumer per builder
//! (`projector-directory`, `projector-audit`): [`Consumer::bind`] starts the
//! one consumer where the slower of them had acked everything, and deletes
//! them.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Context};
use async_nats::jetstream::{self, consumer::DeliverPolicy, AckKind};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Notify;
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
    /// `Consumer::process_lane`).
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

    /// Waits at most `wait` for messages `lane` may take from `lanes`
    /// (which [`Consumer::feed`] fills), takes those there are (up to
    /// `max`), applies them for every builder in one transaction, recording
    /// the builders' progress in the lane's rows, and acks them after it
    /// committed.
    ///
    /// A message that names no event is parked at once. When the batch
    /// fails while PostgreSQL answers, its messages are applied one by one:
    /// the one that fails is tried again after a delay, and parked on its
    /// last delivery. While PostgreSQL is away the batch is held and tried
    /// again when it is back.
    pub async fn process_lane(
        &self,
        lanes: &Lanes,
        lane: usize,
        max: usize,
        wait: Duration,
    ) -> anyhow::Result<Step> {
        let batch = lanes.next(lane, max, wait).await;
        let step = self.process(batch, lane as i16).await;
        lanes.done(lane);
        step
    }

    /// Queues the messages the consumer delivers for the lanes, as long as
    /// it runs, waiting while the queue is full.
    pub async fn feed(&self, lanes: &Lanes) {
        loop {
            match self.batches.next(BATCH, Duration::from_secs(1)).await {
                Ok(batch) => {
                    for message in batch {
                        lanes.send(message).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "projector cannot read its messages; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Applies `batch` (see [`Consumer::process_lane`]).
    async fn process(&self, batch: Vec<jetstream::Message>, lane: i16) -> anyhow::Result<Step> {
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
                .keeping_alive(&held, self.apply(&Builder::ALL, &targets, lane))
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
                    step.applied = self.one_by_one(messages, targets, lane).await?;
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
        lane: i16,
    ) -> anyhow::Result<Vec<Applied>> {
        let mut all = Vec::new();
        for (message, target) in messages.iter().zip(targets) {
            let target = std::slice::from_ref(&target);
            let mut result = self.apply_held(message, &Builder::ALL, target, lane).await;
            if result.is_err() {
                let mut failed = None;
                for builder in Builder::ALL {
                    match self.apply_held(message, &[builder], target, lane).await {
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
        lane: i16,
    ) -> anyhow::Result<Vec<Applied>> {
        loop {
            let applied = self
                .dead_letters
                .keeping_alive(&[message], self.apply(builders, target, lane))
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
        lane: i16,
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
        let applied = catch_up(&mut conn, &self.personal, builders, targets, lane).await;
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

    /// Runs until `shutdown` resolves; errors are logged and retried.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) {
        self.run_noting(shutdown, |_| {}).await
    }

    /// [`Consumer::run_until_stopped`], handing each step to `note`.
    /// [`LANES`] lanes apply batches at the same time, each taking what has
    /// arrived when it is free, so messages that arrive while one batch
    /// commits do not wait for it; batches applied at the same time never
    /// hold the same stream (see [`Lanes`]) and write different progress
    /// rows, so they never wait on each other's locks.
    pub async fn run_noting(&self, shutdown: impl Future<Output = ()>, note: impl Fn(Step)) {
        let lanes: Lanes = Lanes::new(LANES);
        let step = |lane| {
            let (lanes, note) = (&lanes, &note);
            async move {
                loop {
                    match self
                        .process_lane(lanes, lane, BATCH, Duration::from_secs(1))
                        .await
                    {
                        Ok(step) => note(step),
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "projector step failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown => {}
            _ = self.feed(&lanes) => {}
            _ = futures::future::join_all((0..LANES).map(step)) => {}
        }
    }
}

/// Lanes the live projector applies batches from at the same time.
pub const LANES: usize = 2;

/// The messages [`Consumer::feed`] has taken from the subscription, waiting
/// for a lane: one queue that every lane takes from when it is free (so a
/// message waits only while every lane is busy), where a lane passes over
/// the messages of a stream another lane's batch holds (so two batches never
/// apply the same stream; those wait for that batch to be done). At most
/// [`Lanes::ROOM`] wait; the feed waits for room beyond that.
pub struct Lanes<M = jetstream::Message> {
    waiting: std::sync::Mutex<Waiting<M>>,
    /// Told when messages arrive or a lane's batch is done.
    changed: Notify,
    /// Told when a lane took messages.
    room: Notify,
}

/// A stream: its aggregate type and id.
type Stream = (String, String);

struct Waiting<M> {
    /// Messages not taken yet, in arrival order, each with its stream (none
    /// for a message that names no event: its batch parks it).
    queue: VecDeque<(Option<Stream>, M)>,
    /// Per lane, the streams of the batch it is applying.
    busy: Vec<HashSet<Stream>>,
}

impl Lanes {
    /// Queues `message` for a lane, waiting while the queue is full.
    async fn send(&self, message: jetstream::Message) {
        let stream = target_of(&message).map(|t| (t.aggregate_type, t.aggregate_id));
        self.put(stream, message).await
    }
}

impl<M> Lanes<M> {
    /// Most messages waiting for a lane: two batches' worth.
    pub const ROOM: usize = 2 * BATCH;

    pub fn new(lanes: usize) -> Self {
        Self {
            waiting: std::sync::Mutex::new(Waiting {
                queue: VecDeque::new(),
                busy: vec![HashSet::new(); lanes.max(1)],
            }),
            changed: Notify::new(),
            room: Notify::new(),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting<M>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `message` of `stream` to the queue, waiting while it is full.
    async fn put(&self, stream: Option<Stream>, message: M) {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut waiting = self.waiting();
                if waiting.queue.len() < Self::ROOM {
                    waiting.queue.push_back((stream, message));
                    break;
                }
            }
            room.await;
        }
        self.changed.notify_waiters();
    }

    /// Waits at most `wait` for messages `lane` may take, then takes those
    /// there are, in order, up to `max`: every waiting message but those of
    /// streams another lane's batch holds. Their streams are `lane`'s until
    /// [`Lanes::done`]. Empty when none came.
    async fn next(&self, lane: usize, max: usize, wait: Duration) -> Vec<M> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let batch = self.take(lane, max);
            if !batch.is_empty() {
                self.room.notify_waiters();
                return batch;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return batch;
            }
        }
    }

    fn take(&self, lane: usize, max: usize) -> Vec<M> {
        let mut waiting = self.waiting();
        let Waiting { queue, busy } = &mut *waiting;
        let mut batch = Vec::new();
        let mut passed = VecDeque::new();
        while batch.len() < max {
            let Some((stream, message)) = queue.pop_front() else {
                break;
            };
            let elsewhere = stream.as_ref().is_some_and(|s| {
                busy.iter()
                    .enumerate()
                    .any(|(other, streams)| other != lane && streams.contains(s))
            });
            if elsewhere {
                passed.push_back((stream, message));
                continue;
            }
            if let Some(stream) = stream {
                busy[lane].insert(stream);
            }
            batch.push(message);
        }
        // What was passed over comes before what was not looked at.
        passed.append(queue);
        *queue = passed;
        batch
    }

    /// `lane`'s batch is done (applied, left for redelivery or parked): its
    /// streams are free for any lane.
    fn done(&self, lane: usize) {
        self.waiting().busy[lane].clear();
        self.changed.notify_waiters();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(id: &str) -> Option<Stream> {
        Some(("user".into(), id.into()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_free_lane_takes_every_waiting_message_but_the_streams_another_lane_holds() {
        let lanes: Lanes<i32> = Lanes::new(LANES);
        let wait = Duration::from_secs(1);
        // Nothing there: empty once the wait is over.
        let started = tokio::time::Instant::now();
        assert!(lanes.next(0, 10, wait).await.is_empty());
        assert_eq!(started.elapsed(), wait);
        lanes.put(stream("a"), 1).await;
        lanes.put(stream("b"), 2).await;
        lanes.put(stream("a"), 3).await;
        // In order, up to the most asked; the rest wait.
        assert_eq!(lanes.next(0, 2, wait).await, [1, 2]);
        assert_eq!(lanes.next(0, 10, wait).await, [3]);
        lanes.done(0);
        // While lane 0's batch holds a, lane 1 passes over a's messages and
        // takes the rest; lane 0 may take a's.
        lanes.put(stream("a"), 4).await;
        assert_eq!(lanes.next(0, 10, wait).await, [4]);
        lanes.put(stream("a"), 6).await;
        lanes.put(stream("c"), 7).await;
        lanes.put(None, 8).await;
        lanes.put(stream("a"), 9).await;
        assert_eq!(lanes.next(1, 10, wait).await, [7, 8]);
        assert_eq!(lanes.next(0, 10, wait).await, [6, 9]);
        lanes.done(0);
        lanes.done(1);
        // Lane 1 waits for a until lane 0's batch is done.
        lanes.put(stream("a"), 10).await;
        assert_eq!(lanes.next(0, 10, wait).await, [10]);
        lanes.put(stream("a"), 11).await;
        let (got, ()) = tokio::join!(lanes.next(1, 10, wait), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            lanes.done(0);
        });
        assert_eq!(got, [11]);
        assert_eq!(started.elapsed(), wait + Duration::from_millis(10));
        // A full batch leaves what it passed over ahead of what it did not
        // look at.
        for (s, n) in [("a", 12), ("b", 13), ("c", 14)] {
            lanes.put(stream(s), n).await;
        }
        assert_eq!(lanes.next(0, 1, wait).await, [13]);
        lanes.done(1);
        assert_eq!(lanes.next(0, 10, wait).await, [12, 14]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_feed_waits_for_room_while_the_queue_is_full() {
        let lanes: Lanes<usize> = Lanes::new(LANES);
        let wait = Duration::from_secs(1);
        for n in 0..Lanes::<usize>::ROOM {
            lanes.put(None, n).await;
        }
        assert!(tokio::time::timeout(wait, lanes.put(None, 0))
            .await
            .is_err());
        let (taken, ()) = tokio::join!(lanes.next(0, 1, wait), lanes.put(None, 0));
        assert_eq!(taken, [0]);
        assert_eq!(lanes.waiting().queue.len(), Lanes::<usize>::ROOM);
    }
}
