//! The live projector: one JetStream durable pull consumer ([`Consumer`])
//! for every builder, run by the [`Projector`] worker. Each message names an
//! event (`Nats-Msg-Id` = `aggregate_type:aggregate_id:sequence`, as the
//! relay publishes it); each builder brings that event's stream up to it
//! from PostgreSQL, the source of truth (the event and any before it not yet
//! applied), and the message is acked only after the update committed. The
//! messages that have arrived are applied together, by every builder, in one
//! transaction; the worker splits them by stream between [`LANES`] lanes
//! ([`Lanes`]) that apply their batches at the same time. A projector
//! killed mid-batch gets the unacked messages again and skips what it
//! applied; a message that arrives after a later one of its stream finds
//! nothing to do.
//!
//! Versions before this one had a durable consumer per builder
//! (`projector-directory`, `projector-audit`): [`Consumer::bind`] starts the
//! one consumer where the slower of them had acked everything, and deletes
//! them.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use anyhow::{anyhow, Context};
use async_nats::jetstream::{self, consumer::DeliverPolicy, AckKind};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::mpsc;
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

    /// Waits at most `wait` for a message in `lane` of `lanes` (which
    /// [`Consumer::feed`] fills), then takes whatever else it holds (up to
    /// `max` in all), applies them for every builder in one transaction,
    /// recording the builders' progress in the lane's rows, and acks them
    /// after it committed.
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
        self.process(batch, lane as i16).await
    }

    /// Hands each message the consumer delivers to its stream's lane, as
    /// long as it runs; a lane that is full holds the others until it has
    /// room.
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

    /// [`Consumer::run_until_stopped`], handing each step to `note`. The
    /// messages are split by stream between [`LANES`] lanes, each applying
    /// its batches while the others apply theirs, so messages that arrive
    /// while one batch commits do not wait for it, and batches applied at
    /// the same time never touch the same stream's positions or the same
    /// progress rows (and so never wait on each other's locks).
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

/// A consumer's messages split by stream ([`Consumer::feed`]): all of a
/// stream's messages go to the same lane, each lane holding at most a
/// batch's worth.
pub struct Lanes<M = jetstream::Message> {
    senders: Vec<mpsc::Sender<M>>,
    receivers: Vec<tokio::sync::Mutex<mpsc::Receiver<M>>>,
}

impl Lanes {
    /// Puts `message` in its stream's lane (the first, for a message that
    /// names no event: its batch parks it).
    async fn send(&self, message: jetstream::Message) {
        let lane = self.lane_of(target_of(&message).as_ref());
        self.put(lane, message).await
    }
}

impl<M> Lanes<M> {
    pub fn new(lanes: usize) -> Self {
        let (senders, receivers) = (0..lanes.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(BATCH);
                (tx, tokio::sync::Mutex::new(rx))
            })
            .unzip();
        Self { senders, receivers }
    }

    /// The lane of the stream `target` names (the same for each of its
    /// events); the first for none.
    fn lane_of(&self, target: Option<&StreamTarget>) -> usize {
        target.map_or(0, |t| {
            // SipHash with fixed keys: the same lane for a stream each time.
            let mut hasher = std::hash::DefaultHasher::new();
            (&t.aggregate_type, &t.aggregate_id).hash(&mut hasher);
            (hasher.finish() % self.senders.len() as u64) as usize
        })
    }

    /// Adds `message` to `lane`, waiting while it is full.
    async fn put(&self, lane: usize, message: M) {
        // The receivers live as long as the senders.
        let _ = self.senders[lane].send(message).await;
    }

    /// Waits at most `wait` for a message in `lane`, then takes whatever
    /// else it holds, up to `max` in all; empty when nothing came.
    async fn next(&self, lane: usize, max: usize, wait: Duration) -> Vec<M> {
        let mut messages = self.receivers[lane].lock().await;
        let mut batch = Vec::new();
        if let Ok(Some(first)) = tokio::time::timeout(wait, messages.recv()).await {
            batch.push(first);
            while batch.len() < max {
                match messages.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        batch
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

    fn target(id: &str, sequence: i64) -> StreamTarget {
        StreamTarget {
            aggregate_type: "user".into(),
            aggregate_id: id.into(),
            sequence,
        }
    }

    #[test]
    fn a_streams_events_share_a_lane_and_the_streams_spread_over_the_lanes() {
        let lanes: Lanes = Lanes::new(LANES);
        let mut per_lane = [0; LANES];
        for n in 0..1000 {
            let id = format!("u{n}");
            let lane = lanes.lane_of(Some(&target(&id, 1)));
            for sequence in 2..5 {
                assert_eq!(lanes.lane_of(Some(&target(&id, sequence))), lane);
            }
            per_lane[lane] += 1;
        }
        assert!(per_lane.iter().all(|n| *n > 400), "{per_lane:?}");
        // Another type's stream of the same id is another stream.
        let spread = (0..64)
            .map(|n| {
                let id = format!("t{n}");
                let tenant = StreamTarget {
                    aggregate_type: "tenant".into(),
                    ..target(&id, 1)
                };
                lanes.lane_of(Some(&tenant)) == lanes.lane_of(Some(&target(&id, 1)))
            })
            .filter(|same| !same)
            .count();
        assert!(spread > 0);
        assert_eq!(lanes.lane_of(None), 0);
        assert_eq!(Lanes::<()>::new(1).lane_of(Some(&target("u1", 1))), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_gives_what_it_holds_in_order_up_to_the_most_asked() {
        let lanes: Lanes<i32> = Lanes::new(LANES);
        let wait = Duration::from_secs(1);
        // Nothing there: empty once the wait is over.
        let started = tokio::time::Instant::now();
        assert!(lanes.next(0, 10, wait).await.is_empty());
        assert_eq!(started.elapsed(), wait);
        for n in 1..=5 {
            lanes.put(1, n).await;
        }
        lanes.put(0, 9).await;
        assert_eq!(lanes.next(1, 3, wait).await, [1, 2, 3]);
        assert_eq!(lanes.next(1, 10, wait).await, [4, 5]);
        assert_eq!(lanes.next(0, 10, wait).await, [9]);
        // A message put while a lane waits ends the wait.
        let (got, ()) = tokio::join!(lanes.next(0, 10, wait), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            lanes.put(0, 7).await;
        });
        assert_eq!(got, [7]);
        // A full lane holds the sender until it has room.
        for n in 0..BATCH as i32 {
            lanes.put(1, n).await;
        }
        let blocked = tokio::time::timeout(wait, lanes.put(1, -1)).await;
        assert!(blocked.is_err());
        assert_eq!(lanes.next(1, BATCH, wait).await.len(), BATCH);
    }
}
