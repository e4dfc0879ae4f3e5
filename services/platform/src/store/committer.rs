//! Group commit: the appends of concurrent requests, written together.
//!
//! One task per store takes whatever appends are waiting, writes them in a
//! single statement (one round trip, one transaction, one WAL flush), and
//! answers each its own outcome; while that statement runs, the next batch
//! gathers. At one request at a time a batch is that one append, so nothing
//! waits for company.
//!
//! Each stream is still all or nothing. An append's first event claims the
//! stream's next sequence (`ON CONFLICT DO NOTHING` on the events' key);
//! its other events are written only if that claim succeeded. A claim that
//! finds the sequence taken means another writer moved the stream first:
//! nothing of that append is written, and its request reloads and decides
//! again. (A claim waits for a concurrent claim of the same sequence to
//! commit or roll back, so of two writers decided on the same state exactly
//! one wins.) A batch holds at most one append per stream; a second one for
//! the same stream was decided on the same state as the first and is told
//! so at once.
//!
//! An append may also name streams it read but does not write (a user's
//! command decided under the tenant's settings): it is written only if they
//! are still at the sequences it read.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot};

use super::{is_connection_problem, StoreError};

/// Most appends written in one statement.
const MAX_BATCH: usize = 128;
/// Appends waiting for a batch before senders wait too.
const QUEUE: usize = 4096;

/// One request's append: its events and the state they lead to.
pub(super) struct Append {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    /// The sequence the command was decided on (0 for a new stream).
    pub expected: i64,
    pub event_types: Vec<String>,
    pub event_versions: Vec<String>,
    pub payloads: Vec<String>,
    pub metadata: String,
    /// The state after the events, when a new snapshot is due.
    pub snapshot: Option<String>,
    /// Streams read, not written, and the sequence each was read at.
    pub read: Vec<(&'static str, String, i64)>,
}

/// What became of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Written,
    /// Another writer moved the stream first: reload and decide again.
    Conflict,
    /// A stream the command read has moved since: read it again.
    ReadMoved,
}

type Reply = oneshot::Sender<Result<Outcome, StoreError>>;

#[derive(Clone)]
pub(super) struct Committer {
    queue: mpsc::Sender<(Append, Reply)>,
}

impl Committer {
    /// Starts the committer's task (on the current tokio runtime); it
    /// connects as `pool` does, on a connection of its own.
    pub fn start(pool: &PgPool) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(run((*pool.connect_options()).clone(), pending));
        Self { queue }
    }

    pub async fn append(&self, append: Append) -> Result<Outcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Unexpected(anyhow::anyhow!("the committer stopped"));
        self.queue
            .send((append, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// How long a batch waits for PostgreSQL to take a new connection before
/// its requests are told it is unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The committer's own connection, set up for its one statement.
///
/// Not from the pool: sqlx pings a pooled connection each time it is handed
/// back (a round trip per batch), and PostgreSQL would plan the statement
/// afresh at every execution, since a plan for the batch's actual array
/// sizes always looks cheaper to it than the general one; replanning costs
/// more than running the statement. The general plan is the right one for
/// every batch size (index lookups per stream), so this connection asks for it.
async fn connect(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

async fn run(options: PgConnectOptions, mut pending: mpsc::Receiver<(Append, Reply)>) {
    let mut connection: Option<PgConnection> = None;
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut streams = HashSet::with_capacity(batch.len());
        let mut writing = Vec::with_capacity(batch.len());
        for (append, reply) in batch {
            if streams.insert((append.aggregate_type, append.aggregate_id.clone())) {
                writing.push((append, reply));
            } else {
                let _ = reply.send(Ok(Outcome::Conflict));
            }
        }
        metrics::histogram!("twofold_store_batch_appends").record(writing.len() as f64);
        let (appends, replies): (Vec<Append>, Vec<Reply>) = writing.into_iter().unzip();
        let result = match connection.take() {
            Some(conn) => Ok(conn),
            None => connect(&options).await,
        };
        let result = match result {
            Ok(mut conn) => {
                let written = write(&mut conn, &appends).await;
                // A connection that failed is dropped; the next batch opens another.
                match &written {
                    Err(e) if is_connection_problem(e) => {}
                    _ => connection = Some(conn),
                }
                written
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((written, moved)) => {
                for (i, (append, reply)) in appends.iter().zip(replies).enumerate() {
                    let key = (
                        append.aggregate_type.to_string(),
                        append.aggregate_id.clone(),
                    );
                    let outcome = if written.contains(&key) {
                        Outcome::Written
                    } else if moved.contains(&(i as i32)) {
                        Outcome::ReadMoved
                    } else {
                        Outcome::Conflict
                    };
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                let conflict = matches!(
                    &e,
                    sqlx::Error::Database(d)
                        if matches!(d.code().as_deref(), Some(DEADLOCK | UNIQUE_VIOLATION))
                );
                let unavailable = is_connection_problem(&e);
                let reason = format!("{e:#}");
                for reply in replies {
                    let answer = if conflict {
                        Ok(Outcome::Conflict)
                    } else if unavailable {
                        Err(StoreError::Unavailable(anyhow::anyhow!(reason.clone())))
                    } else {
                        Err(StoreError::Unexpected(anyhow::anyhow!(reason.clone())))
                    };
                    let _ = reply.send(answer);
                }
            }
        }
    }
}

/// Two batches from different processes met on the same streams in opposite
/// orders; PostgreSQL aborted one. Its requests decide again.
const DEADLOCK: &str = "40P01";
/// A unique key taken (none should be, claims aside): the batch is tried again.
const UNIQUE_VIOLATION: &str = "23505";

/// The statement: each append whose reads still hold claims its stream's
/// next sequence with its first event; the appends whose claims succeeded
/// write their other events and, when due, their snapshots. Answers a row
/// per stream written and one per append whose reads had moved
/// (`aggregate_type` NULL, its index).
const WRITE: &str = "\
WITH reads_moved AS (
    SELECT DISTINCT r.i
    FROM unnest($1::int[], $2::text[], $3::text[], $4::bigint[])
        AS r(i, aggregate_type, aggregate_id, sequence)
    WHERE EXISTS (
        SELECT 1 FROM events e
        WHERE e.aggregate_type = r.aggregate_type
          AND e.aggregate_id = r.aggregate_id
          AND e.sequence > r.sequence)
), claimed AS (
    -- Claims in one order (by stream) in every batch, so two batches never
    -- wait on each other's claims.
    INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
    SELECT h.aggregate_type, h.aggregate_id, h.sequence, h.event_type, h.event_version,
           h.payload::json, h.metadata::json
    FROM unnest($5::int[], $6::text[], $7::text[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::text[])
        AS h(i, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
    WHERE h.i NOT IN (SELECT i FROM reads_moved)
    ORDER BY h.aggregate_type, h.aggregate_id
    ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING
    RETURNING aggregate_type, aggregate_id
), rest AS (
    -- Drawn after the claims, so each stream's positions follow its sequence.
    INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
    SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
           e.payload::json, e.metadata::json
    FROM unnest($13::text[], $14::text[], $15::bigint[], $16::text[], $17::text[], $18::text[], $19::text[])
        AS e(aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
    JOIN claimed USING (aggregate_type, aggregate_id)
    ORDER BY e.aggregate_type, e.aggregate_id, e.sequence
), snapshotted AS (
    INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
    SELECT s.aggregate_type, s.aggregate_id, s.last_sequence, 1, s.payload::json
    FROM unnest($20::text[], $21::text[], $22::bigint[], $23::text[])
        AS s(aggregate_type, aggregate_id, last_sequence, payload)
    JOIN claimed USING (aggregate_type, aggregate_id)
    ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
    SET last_sequence = EXCLUDED.last_sequence,
        current_snapshot = snapshots.current_snapshot + 1,
        payload = EXCLUDED.payload
    WHERE snapshots.last_sequence < EXCLUDED.last_sequence
)
-- The outbox rows come from the trigger on events, in this transaction.
SELECT aggregate_type, aggregate_id, NULL::int AS i FROM claimed
UNION ALL
SELECT NULL, NULL, i FROM reads_moved";

/// The streams written, and the indexes of the appends whose reads had moved.
type Written = (HashSet<(String, String)>, HashSet<i32>);

/// The batch as the statement's columns.
#[derive(Default)]
struct Columns<'a> {
    read_i: Vec<i32>,
    read_types: Vec<&'a str>,
    read_ids: Vec<&'a str>,
    read_sequences: Vec<i64>,
    claim_i: Vec<i32>,
    claims: Events<'a>,
    rest: Events<'a>,
    snapshot_types: Vec<&'a str>,
    snapshot_ids: Vec<&'a str>,
    snapshot_sequences: Vec<i64>,
    snapshots: Vec<&'a str>,
}

#[derive(Default)]
struct Events<'a> {
    types: Vec<&'a str>,
    ids: Vec<&'a str>,
    sequences: Vec<i64>,
    event_types: Vec<&'a str>,
    event_versions: Vec<&'a str>,
    payloads: Vec<&'a str>,
    metadata: Vec<&'a str>,
}

impl<'a> Events<'a> {
    fn push(&mut self, a: &'a Append, k: usize) {
        self.types.push(a.aggregate_type);
        self.ids.push(&a.aggregate_id);
        self.sequences.push(a.expected + 1 + k as i64);
        self.event_types.push(&a.event_types[k]);
        self.event_versions.push(&a.event_versions[k]);
        self.payloads.push(&a.payloads[k]);
        self.metadata.push(&a.metadata);
    }
}

pub(super) async fn write(
    conn: &mut PgConnection,
    appends: &[Append],
) -> Result<Written, sqlx::Error> {
    let mut c = Columns::default();
    for (i, a) in appends.iter().enumerate() {
        let i = i as i32;
        for (kind, id, sequence) in &a.read {
            c.read_i.push(i);
            c.read_types.push(kind);
            c.read_ids.push(id);
            c.read_sequences.push(*sequence);
        }
        if a.payloads.is_empty() {
            continue;
        }
        c.claim_i.push(i);
        c.claims.push(a, 0);
        for k in 1..a.payloads.len() {
            c.rest.push(a, k);
        }
        if let Some(snapshot) = &a.snapshot {
            c.snapshot_types.push(a.aggregate_type);
            c.snapshot_ids.push(&a.aggregate_id);
            c.snapshot_sequences
                .push(a.expected + a.payloads.len() as i64);
            c.snapshots.push(snapshot);
        }
    }
    let rows: Vec<(Option<String>, Option<String>, Option<i32>)> = sqlx::query_as(WRITE)
        .bind(&c.read_i)
        .bind(&c.read_types)
        .bind(&c.read_ids)
        .bind(&c.read_sequences)
        .bind(&c.claim_i)
        .bind(&c.claims.types)
        .bind(&c.claims.ids)
        .bind(&c.claims.sequences)
        .bind(&c.claims.event_types)
        .bind(&c.claims.event_versions)
        .bind(&c.claims.payloads)
        .bind(&c.claims.metadata)
        .bind(&c.rest.types)
        .bind(&c.rest.ids)
        .bind(&c.rest.sequences)
        .bind(&c.rest.event_types)
        .bind(&c.rest.event_versions)
        .bind(&c.rest.payloads)
        .bind(&c.rest.metadata)
        .bind(&c.snapshot_types)
        .bind(&c.snapshot_ids)
        .bind(&c.snapshot_sequences)
        .bind(&c.snapshots)
        .fetch_all(conn)
        .await?;
    let mut written = HashSet::new();
    let mut moved = HashSet::new();
    for row in rows {
        match row {
            (Some(kind), Some(id), _) => {
                written.insert((kind, id));
            }
            (_, _, Some(i)) => {
                moved.insert(i);
            }
            _ => {}
        }
    }
    Ok((written, moved))
}
