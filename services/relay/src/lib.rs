//! The relay: drains the outbox (filled by a trigger in the same transaction
//! as each event) into JetStream. Each event is published with `Nats-Msg-Id`
//! = `aggregate_type:aggregate_id:sequence`, so JetStream drops a duplicate
//! within its window, and its outbox row is deleted only after the publish
//! was acknowledged. While NATS is down nothing is lost: the outbox grows and
//! drains when NATS is back.
//!
//! One relay publishes at a time (a PostgreSQL advisory lock, held on a
//! connection of its own), in outbox order, which keeps each aggregate's
//! events in order; others stand by and take over if it stops. Before each
//! batch the publishing relay checks on that connection that it still holds
//! the lock: a relay whose connection died (a database outage) stops
//! publishing and goes back to taking the lock, so after an outage one relay
//! publishes, not two. Batches overlap: while one batch's acks come in
//! and its rows are deleted, the next is read and published. Each read
//! leaves out the rows still in flight, and takes the rest in outbox order,
//! so an event that committed late is published before any later event of
//! its aggregate (which could only be written after it committed).
//!
//! A publish that fails leaves its row, and the rows after it, for the next
//! round; events published after it in the meantime stay published, so after
//! a failure an aggregate's event can reach the stream after a later one.
//! The projector does not depend on that order (it applies a stream up to
//! the event it is given); the dispatcher handles each event on its own.
//!
//! No NOTIFY wakes the relay: a transaction that notifies holds a lock from
//! its commit until its WAL is flushed, which would make every commit wait
//! for the one before it. The relay polls the outbox instead: every
//! `relay_poll_ms` while it is empty (an index probe of an empty table), and
//! 2 ms after the start of a round that published something.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use sqlx::{Connection, PgConnection, PgPool, Row};
use tokio::sync::Mutex;
use twofold_platform::envelope::{Envelope, COLUMNS, PUBLISHED_AT};
use twofold_platform::telemetry::{Telemetry, WorkerStart};
use twofold_platform::Config;

/// Advisory lock key held by the publishing relay ("twofold relay").
const LOCK_KEY: i64 = 0x7477_6f66_6f6c_6472;
/// Outbox rows read and published at once (each holds up to 100 events, one
/// statement's worth).
pub const BATCH_ROWS: i64 = 20;
/// Batches published and not yet acknowledged and deleted.
const IN_FLIGHT: usize = 2;
/// Most events in a batch: the trigger writes at most 100 per outbox row.
const BATCH_EVENTS: usize = BATCH_ROWS as usize * 100;
/// How far apart an outbox row's positions may lie, per position, for the
/// row to be read with one walk of the index (see [`Relay::read`]).
pub const SPAN: i64 = 4;
/// The wait before the next look at the outbox after a round that published.
const BUSY_POLL: Duration = Duration::from_millis(2);
/// JetStream drops a re-published event within this window.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

pub struct Relay {
    pool: PgPool,
    /// Metrics and health, when built as a worker ([`Relay::build`]).
    telemetry: Option<Telemetry>,
    stream: String,
    /// The connection the outbox is read on (see `Relay::read`).
    reader: Mutex<Option<PgConnection>>,
    js: jetstream::Context,
    prefix: String,
    poll_interval: Duration,
    limits: StreamLimits,
    /// The lock this relay publishes under, when it runs as a worker.
    fence: Mutex<Fence>,
    /// Events this relay published (and saw acknowledged).
    published: Arc<AtomicU64>,
    /// When the outbox backlog gauge was last counted.
    backlog_counted: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How often the backlog gauge is counted at most. Counting is a statement
/// of its own; once a round, it was a round trip more between an event's
/// commit and its publication, and 200 counts a second while idle.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// The advisory lock a publishing relay holds, on a connection of its own.
enum Fence {
    /// Not taken (a relay driven step by step, by tests and benchmarks).
    None,
    Held(PgConnection),
    /// Lost: the connection failed or no longer holds the lock.
    Lost,
}

/// Why a batch was not published: this relay no longer holds its lock.
#[derive(Debug, thiserror::Error)]
#[error("the relay lost its lock")]
pub struct LockLost;

/// How long the lock check may take before the lock counts as lost.
const LOCK_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How much the stream keeps: it carries events to the workers, the event
/// store keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub max_age: Duration,
    /// -1: no limit.
    pub max_bytes: i64,
    pub replicas: usize,
}

impl StreamLimits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_age: Duration::from_secs(config.nats_stream_max_age_secs.max(1)),
            max_bytes: match config.nats_stream_max_bytes {
                0 => -1,
                n => i64::try_from(n).unwrap_or(i64::MAX),
            },
            replicas: config.nats_stream_replicas.max(1),
        }
    }
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self::from_config(&Config::default())
    }
}

/// The stream the relay publishes to, created by code with the default
/// limits (see [`ensure_stream_with`]).
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
) -> anyhow::Result<()> {
    ensure_stream_with(js, name, prefix, &StreamLimits::default()).await
}

/// The stream the relay publishes to, created with `limits`, or brought to
/// them when it exists with others (the rest of its configuration kept).
pub async fn ensure_stream_with(
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
    limits: &StreamLimits,
) -> anyhow::Result<()> {
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{prefix}.events.>")],
            duplicate_window: DUPLICATE_WINDOW.min(limits.max_age),
            storage: stream::StorageType::File,
            max_age: limits.max_age,
            max_bytes: limits.max_bytes,
            num_replicas: limits.replicas,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("creating the JetStream stream {name}: {e}"))?;
    let current = stream
        .info()
        .await
        .map_err(|e| anyhow!("reading the JetStream stream {name}: {e}"))?
        .config
        .clone();
    if current.max_age != limits.max_age
        || current.max_bytes != limits.max_bytes
        || current.num_replicas != limits.replicas
    {
        js.update_stream(stream::Config {
            max_age: limits.max_age,
            max_bytes: limits.max_bytes,
            num_replicas: limits.replicas,
            duplicate_window: current.duplicate_window.min(limits.max_age),
            ..current
        })
        .await
        .map_err(|e| anyhow!("setting the JetStream stream {name}'s limits: {e}"))?;
        tracing::info!(stream = name, ?limits, "stream limits set");
    }
    Ok(())
}

/// The events of some outbox rows, as they go out.
pub struct Batch {
    pub events: Vec<Outgoing>,
    /// The outbox rows they came from, in order.
    pub rows: Vec<i64>,
}

/// One event, as it goes out.
pub struct Outgoing {
    pub outbox_id: i64,
    pub subject: String,
    /// `aggregate_type:aggregate_id:sequence`
    pub msg_id: String,
    /// The serialized [`Envelope`].
    pub body: Vec<u8>,
}

/// A batch published and waiting for its acknowledgements.
struct Flight {
    /// The outbox row of each message, in order.
    ids: Vec<i64>,
    acks: Vec<PublishAckFuture>,
    /// The outbox rows, in order.
    rows: Vec<i64>,
    started: Instant,
}

/// What a round of publishing came to.
struct Settled {
    published: usize,
    failure: Option<anyhow::Error>,
}

impl Relay {
    /// The relay worker: starts its metrics and health server on
    /// `metrics_addr`, then connects, waiting for PostgreSQL (and migrating
    /// it) and NATS as long as they are not there.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let start = WorkerStart::begin(config, "relay").await?;
        let mut relay = Self::on(start.pool, start.nats, config);
        relay.telemetry = Some(start.telemetry);
        Ok(relay)
    }

    /// Where the worker's metrics and health are served, when built as one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.telemetry.as_ref().map(Telemetry::local_addr)
    }

    /// A relay on `pool` (no metrics server: the in-process form tests and
    /// benchmarks use). The NATS connection is made in the background.
    pub async fn connect(pool: PgPool, config: &Config) -> anyhow::Result<Self> {
        let client = twofold_platform::jetstream::connect(config).await?;
        Ok(Self::on(pool, client, config))
    }

    fn on(pool: PgPool, client: async_nats::Client, config: &Config) -> Self {
        // async-nats holds a publish back while this many acks are awaited;
        // with fewer than the batches in flight plus the one being sent, the
        // relay would wait on itself.
        let js = jetstream::ContextBuilder::new()
            .max_ack_inflight((IN_FLIGHT + 1) * BATCH_EVENTS)
            .build(client);
        Self {
            pool,
            telemetry: None,
            stream: config.nats_stream.clone(),
            reader: Mutex::new(None),
            js,
            prefix: config.nats_subject_prefix.clone(),
            poll_interval: Duration::from_millis(config.relay_poll_ms),
            limits: StreamLimits::from_config(config),
            fence: Mutex::new(Fence::None),
            published: Arc::new(AtomicU64::new(0)),
            backlog_counted: std::sync::Mutex::new(None),
        }
    }

    /// A running count of the events this relay published.
    pub fn published(&self) -> Arc<AtomicU64> {
        self.published.clone()
    }

    /// Checks, on the lock's own connection, that this relay still holds
    /// its lock (when it took one): a relay whose connection died has lost
    /// it, and another relay may hold it now. A lost lock's connection is
    /// closed, so a lock it might still hold is released.
    async fn check_fence(&self) -> anyhow::Result<()> {
        let mut fence = self.fence.lock().await;
        let conn = match &mut *fence {
            Fence::None => return Ok(()),
            Fence::Lost => return Err(LockLost.into()),
            Fence::Held(conn) => conn,
        };
        let held = tokio::time::timeout(
            LOCK_CHECK_TIMEOUT,
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                 AND pid = pg_backend_pid() AND granted)",
            )
            .fetch_one(conn),
        )
        .await;
        match held {
            Ok(Ok(true)) => Ok(()),
            _ => {
                *fence = Fence::Lost;
                Err(LockLost.into())
            }
        }
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The events of up to `BATCH_ROWS` outbox rows, oldest first, leaving
    /// out the rows `in_flight`.
    ///
    /// A row's positions (sorted) are read with one walk of the positions'
    /// index from its first to its last, keeping those it names, when they
    /// lie close together, as one statement's do: at most [`SPAN`] times as
    /// far apart as there are of them (events of other transactions in
    /// between are skipped). Otherwise each event is looked up by its
    /// position (`OFFSET 0` keeps PostgreSQL from turning the lookup into a
    /// join, which its general plan, used for a statement run often, makes a
    /// scan of every event). The walk costs PostgreSQL about half what 100
    /// lookups do. Read on a connection of the relay's own, which tells
    /// PostgreSQL not to memoize the lookups: every position is distinct, so
    /// the memo only costs (it doubled the read's time).
    pub async fn read(&self, in_flight: &[i64]) -> anyhow::Result<Batch> {
        let mut reader = self.reader.lock().await;
        let mut conn = match reader.take() {
            Some(conn) => conn,
            None => {
                let mut conn = PgConnection::connect_with(&self.pool.connect_options())
                    .await
                    .context("connecting to PostgreSQL to read the outbox")?;
                sqlx::query("SET enable_memoize = off")
                    .execute(&mut conn)
                    .await?;
                conn
            }
        };
        let rows = sqlx::query(&format!(
            "SELECT n.id AS outbox_id, e.* \
             FROM (SELECT id, positions, \
                     positions[cardinality(positions)] - positions[1] < {SPAN} * cardinality(positions) AS close \
                   FROM outbox WHERE id <> ALL($2) ORDER BY id LIMIT $1) n \
             CROSS JOIN LATERAL ( \
               SELECT {COLUMNS} FROM events \
               WHERE n.close \
                 AND global_position BETWEEN n.positions[1] AND n.positions[cardinality(n.positions)] \
                 AND (global_position = ANY(n.positions)) IS TRUE \
               UNION ALL \
               SELECT l.* FROM unnest(n.positions) AS p(position) \
               CROSS JOIN LATERAL ( \
                 SELECT {COLUMNS} FROM events WHERE global_position = p.position OFFSET 0) l \
               WHERE NOT n.close) e \
             ORDER BY n.id, e.global_position"
        ))
        .bind(BATCH_ROWS)
        .bind(in_flight)
        .fetch_all(&mut conn)
        .await
        .context("reading the outbox")?;
        *reader = Some(conn);
        drop(reader);
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            // The stored payload goes out as it is (raw JSON): copied, not
            // parsed and encoded again; the columns read by index.
            let (subject, msg_id, body) = Envelope::message_of_row(row, 1, &self.prefix)?;
            out.push(Outgoing {
                outbox_id: row.try_get(0)?,
                subject,
                msg_id,
                body,
            });
        }
        let mut rows: Vec<i64> = out.iter().map(|o| o.outbox_id).collect();
        rows.dedup();
        Ok(Batch { events: out, rows })
    }

    async fn publish(&self, batch: Batch) -> Result<Flight, (Flight, anyhow::Error)> {
        let mut flight = Flight {
            ids: Vec::with_capacity(batch.events.len()),
            acks: Vec::with_capacity(batch.events.len()),
            rows: batch.rows,
            started: Instant::now(),
        };
        // One time for the batch: it goes out at once.
        let published = published_at();
        for out in batch.events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", out.msg_id.as_str());
            headers.insert(PUBLISHED_AT, published.as_str());
            match self
                .js
                .publish_with_headers(out.subject, headers, out.body.into())
                .await
            {
                Ok(ack) => {
                    flight.ids.push(out.outbox_id);
                    flight.acks.push(ack);
                }
                Err(e) => {
                    // Only rows whose every event went out count as sent.
                    let cut = flight.rows.iter().position(|r| *r == out.outbox_id);
                    flight.rows.truncate(cut.unwrap_or(flight.rows.len()));
                    return Err((flight, anyhow!("publishing to JetStream: {e}")));
                }
            }
        }
        Ok(flight)
    }

    /// Waits for a batch's acks in order and deletes the outbox rows whose
    /// events were all acknowledged.
    async fn settle(&self, flight: Flight) -> Settled {
        let mut failed_row = None;
        let mut failure = None;
        for (id, ack) in flight.ids.iter().zip(flight.acks) {
            match ack.await {
                Ok(_) => {}
                Err(e) => {
                    failed_row = Some(*id);
                    failure = Some(anyhow!("JetStream did not acknowledge a publish: {e}"));
                    break;
                }
            }
        }
        // Rows are published in order: those before the first failure are
        // complete (a row not fully published was cut short by a failure).
        let complete: Vec<i64> = match failed_row {
            Some(failed) => flight
                .rows
                .iter()
                .copied()
                .take_while(|r| *r != failed)
                .collect(),
            None => flight.rows.clone(),
        };
        let published = flight
            .ids
            .iter()
            .filter(|id| complete.binary_search(id).is_ok())
            .count();
        if let Err(e) = self.delete(&complete).await {
            return Settled {
                published: 0,
                failure: Some(e),
            };
        }
        metrics::counter!("twofold_relay_published_total").increment(published as u64);
        self.published
            .fetch_add(published as u64, Ordering::Relaxed);
        metrics::histogram!("twofold_relay_publish_batch_seconds")
            .record(flight.started.elapsed().as_secs_f64());
        Settled { published, failure }
    }

    /// Publishes one batch, oldest first, and waits for it; returns how many
    /// events were published and removed.
    pub async fn process_next(&self) -> anyhow::Result<usize> {
        let batch = self.read(&[]).await?;
        if batch.events.is_empty() {
            return Ok(0);
        }
        let settled = match self.publish(batch).await {
            Ok(flight) => self.settle(flight).await,
            Err((flight, e)) => {
                let settled = self.settle(flight).await;
                return Err(settled.failure.unwrap_or(e));
            }
        };
        match settled.failure {
            Some(e) => Err(e),
            None => Ok(settled.published),
        }
    }

    /// Reads the next batch (leaving out `in_flight`) and publishes it.
    /// `None` when the outbox has nothing else; on a failure, what was
    /// published before it.
    async fn read_and_publish(
        &self,
        in_flight: &[i64],
    ) -> Result<Option<Flight>, (Option<Flight>, anyhow::Error)> {
        // The lock is checked (on its own connection) while the batch is
        // read; nothing is published unless both succeeded.
        let (fence, batch) = tokio::join!(self.check_fence(), self.read(in_flight));
        fence.map_err(|e| (None, e))?;
        let batch = batch.map_err(|e| (None, e))?;
        if batch.rows.is_empty() {
            return Ok(None);
        }
        self.publish(batch)
            .await
            .map(Some)
            .map_err(|(flight, e)| (Some(flight), e))
    }

    /// Publishes until the outbox is empty, overlapping batches: returns how
    /// many events were published. Stops at the first failure, after
    /// settling what is in flight (rows not acknowledged stay for later).
    pub async fn drain(&self) -> anyhow::Result<usize> {
        self.drain_at_most(usize::MAX).await
    }

    /// [`Relay::drain`], reading no more once `limit` events are out.
    pub async fn drain_at_most(&self, limit: usize) -> anyhow::Result<usize> {
        let mut flights: VecDeque<Flight> = VecDeque::new();
        let mut published = 0;
        let mut sent = 0;
        let mut failure: Option<anyhow::Error> = None;
        loop {
            let in_flight: Vec<i64> = flights
                .iter()
                .flat_map(|f| f.rows.iter().copied())
                .collect();
            let oldest = if flights.len() >= IN_FLIGHT {
                flights.pop_front()
            } else {
                None
            };
            // The oldest batch settles (acks, delete) while the next one is
            // read and published.
            let (settled, next) = tokio::join!(
                async {
                    match oldest {
                        Some(f) => Some(self.settle(f).await),
                        None => None,
                    }
                },
                self.read_and_publish(&in_flight)
            );
            if let Some(s) = settled {
                published += s.published;
                if let Some(e) = s.failure {
                    failure.get_or_insert(e);
                }
            }
            let last = match next {
                // A short batch was the end of the outbox.
                Ok(Some(flight)) => {
                    let short = (flight.rows.len() as i64) < BATCH_ROWS;
                    sent += flight.ids.len();
                    flights.push_back(flight);
                    short || sent >= limit
                }
                Ok(None) => true,
                Err((flight, e)) => {
                    flights.extend(flight);
                    failure.get_or_insert(e);
                    true
                }
            };
            if last || failure.is_some() {
                break;
            }
        }
        while let Some(f) = flights.pop_front() {
            let s = self.settle(f).await;
            published += s.published;
            if let Some(e) = s.failure {
                failure.get_or_insert(e);
            }
        }
        if published < 100 * BATCH_ROWS as usize && self.backlog_due() {
            // Counting scans the outbox: only when it is nearly drained.
            metrics::gauge!("twofold_relay_outbox_backlog")
                .set(self.backlog().await.unwrap_or(0) as f64);
        }
        match failure {
            Some(e) => Err(e.context(format!("after publishing {published} events"))),
            None => Ok(published),
        }
    }

    /// Whether the backlog gauge is due a count (see [`BACKLOG_EVERY`]); if
    /// so, the count is taken as done now.
    fn backlog_due(&self) -> bool {
        let now = std::time::Instant::now();
        let mut last = self
            .backlog_counted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|at| now.duration_since(at) >= BACKLOG_EVERY);
        if due {
            *last = Some(now);
        }
        due
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

    /// Takes the advisory lock on a connection of its own (not the pool's:
    /// the lock lives and dies with it), or says another relay holds it.
    async fn try_lock(&self) -> anyhow::Result<Option<PgConnection>> {
        let mut conn = tokio::time::timeout(
            LOCK_CHECK_TIMEOUT,
            PgConnection::connect_with(&self.pool.connect_options()),
        )
        .await
        .map_err(|_| anyhow!("timed out"))
        .and_then(|c| c.map_err(anyhow::Error::from))
        .context("a connection for the relay lock")?;
        let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut conn)
            .await
            .context("taking the relay lock")?;
        Ok(held.then_some(conn))
    }

    /// Publishes until `shutdown` resolves: holds the advisory lock (standing
    /// by while another relay holds it), polls the outbox while it is empty,
    /// and backs off while NATS or PostgreSQL is unreachable. Before each
    /// batch it checks it still holds the lock; when it does not (its
    /// connection died in a database outage), it stops publishing and goes
    /// back to taking the lock. It never gives up: only `shutdown` ends it.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        loop {
            let lock = loop {
                let wait = match self.try_lock().await {
                    Ok(Some(conn)) => break conn,
                    Ok(None) => Duration::from_secs(1),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "relay cannot take its lock; retrying");
                        Duration::from_secs(2)
                    }
                };
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            };
            *self.fence.lock().await = Fence::Held(lock);
            tracing::info!("relay publishing");
            if self.publish_while_locked(&mut shutdown).await {
                break;
            }
            tracing::warn!("relay lost its lock (its database connection failed); standing by");
        }
        if let Fence::Held(mut lock) = std::mem::replace(&mut *self.fence.lock().await, Fence::None)
        {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(LOCK_KEY)
                .execute(&mut lock)
                .await;
        }
        Ok(())
    }

    /// Publishes while the lock holds: `true` when `shutdown` came, `false`
    /// when the lock was lost.
    async fn publish_while_locked(
        &self,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        let mut stream_ready = false;
        let mut backoff = Duration::from_millis(100);
        loop {
            let round = Instant::now();
            if !stream_ready {
                match ensure_stream_with(&self.js, &self.stream, &self.prefix, &self.limits).await {
                    Ok(()) => stream_ready = true,
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "JetStream not ready"),
                }
            }
            let result = if stream_ready {
                self.drain().await
            } else {
                // Even while NATS is away, a lost lock is noticed.
                self.check_fence()
                    .await
                    .and(Err(anyhow!("JetStream not ready")))
            };
            let wait = match result {
                // Events are coming: look again soon, for the ones committed
                // while this round was out; else every poll interval. Either
                // wait counts from the round's start, not its end: its acks
                // and deletes do not add to the time an event committed
                // meanwhile waits.
                Ok(published) => {
                    backoff = Duration::from_millis(100);
                    let every = if published > 0 {
                        BUSY_POLL.min(self.poll_interval)
                    } else {
                        self.poll_interval
                    };
                    every.saturating_sub(round.elapsed())
                }
                Err(e) if e.downcast_ref::<LockLost>().is_some() => return false,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "relay round failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff
                }
            };
            tokio::select! {
                _ = shutdown.as_mut() => return true,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Now by the wall clock, in microseconds since the Unix epoch: the
/// `Twofold-Published-At` header, which the projector reads the lag's hops
/// from (it compares it with the events' commit times, also wall clock).
fn published_at() -> String {
    use twofold_platform::clock::{Clock, SystemClock};
    SystemClock.now().timestamp_micros().to_string()
}
