//! The event store: cqrs-es aggregates kept in PostgreSQL, each stream with a
//! snapshot of its state replaced at every commit.
//!
//! Commands run through [`Store::execute`], which builds the command from the
//! freshly loaded state, appends the resulting events with optimistic
//! concurrency, and on a conflict reloads and builds again. Whatever a command
//! was decided on is therefore exactly the state its events were appended to:
//! that is what keeps lockout and single-use codes exact under parallel requests.
//!
//! A load is one read (the snapshot). Appends go through a committer (see
//! [`committer`]) that writes the appends of concurrent requests together,
//! in one statement and one transaction, each stream still all or nothing:
//! on a busy verifier most of PostgreSQL's cost is per statement and per
//! commit, not per row, so sharing them is what lets verifications keep up
//! with plain inserts. postgres-es, which this replaces, spent a round trip
//! on `BEGIN`, one per event, one on the snapshot and one on `COMMIT` for
//! each command, and committed the events before it checked that its
//! snapshot update found its row.

mod cache;
mod committer;
mod read;

pub use cache::Cache;
pub use read::{read_streams, StreamKey, StreamRows};

use std::error::Error as StdError;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use rand::Rng;
use sqlx::PgPool;
use twofold_domain::TenantScoped;

use committer::{Append, Committer, Outcome};

use crate::personal::{DataKey, Keys, Personal};

/// Attempts before giving up on a stream that keeps changing under us.
const MAX_ATTEMPTS: usize = 200;

/// Why the store could not do its part (not a refusal by the domain).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL cannot be reached; nothing was written.
    #[error("the event store is unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error("the event store failed")]
    Unexpected(#[source] anyhow::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if is_connection_problem(&err) {
            StoreError::Unavailable(err.into())
        } else {
            StoreError::Unexpected(err.into())
        }
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(err: serde_json::Error) -> Self {
        StoreError::Unexpected(err.into())
    }
}

/// A command that did not produce events.
#[derive(Debug, thiserror::Error)]
pub enum ExecError<E: StdError> {
    /// The domain refused the command.
    #[error(transparent)]
    Refused(E),
    /// A stream the command was decided under (named in `reads`) has moved
    /// since it was read: read it again and run the command again.
    #[error("a stream the command read has changed")]
    ReadMoved,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A stream's state and the sequence of the last event folded into it
/// (0 for a stream with no events).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Versioned<A> {
    pub state: A,
    pub sequence: i64,
    /// The sequence of the stream's latest snapshot (0 for none).
    pub snapshot_sequence: i64,
}

/// State to decide a command on, and whether it is known to be current.
#[derive(Debug, Clone)]
pub struct Basis<A> {
    pub versioned: Versioned<A>,
    /// Read from PostgreSQL for this request, rather than remembered from an
    /// earlier one (which the append's check may find stale).
    pub fresh: bool,
}

impl<A> Basis<A> {
    pub fn state(&self) -> &A {
        &self.versioned.state
    }

    /// That this command was decided with this stream at this sequence.
    pub fn read<B: Aggregate>(&self, id: impl Into<String>) -> Read {
        Read {
            aggregate_type: B::TYPE,
            aggregate_id: id.into(),
            sequence: self.versioned.sequence,
        }
    }
}

/// A stream a command was decided under without writing it, at the
/// sequence read: the command's events are appended only if it is still there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub sequence: i64,
}

/// A new snapshot is written with the commit that takes a stream this many
/// events past its last one, so a read folds fewer than this many events.
pub const SNAPSHOT_EVERY: i64 = 12;

pub struct Store<A> {
    pool: PgPool,
    /// Started at the first append (it needs the tokio runtime).
    committer: Arc<OnceLock<Committer>>,
    /// Recent states, when this store remembers them.
    cache: Option<Arc<Cache<String, Versioned<A>>>>,
    /// Seals and opens the personal data in user streams' events.
    personal: Option<Personal>,
}

impl<A> Clone for Store<A> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            committer: self.committer.clone(),
            cache: self.cache.clone(),
            personal: self.personal.clone(),
        }
    }
}

impl<A: Aggregate<Services = ()> + TenantScoped + Clone> Store<A> {
    /// A store that reads every command's state from PostgreSQL.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            committer: Arc::new(OnceLock::new()),
            cache: None,
            personal: None,
        }
    }

    /// This store, sealing the personal data of the user streams it writes
    /// under each user's data key and opening what it reads (see
    /// [`crate::personal`]). Without it user events are written as they are.
    pub fn sealing(mut self, personal: Personal) -> Self {
        self.personal = Some(personal);
        self
    }

    /// What seals this store's streams, when they are users'.
    fn personal(&self) -> Option<&Personal> {
        self.personal.as_ref().filter(|_| A::TYPE == "user")
    }

    /// The data key to seal `id`'s new events with: remembered, else read,
    /// else made (for a user registered before keys were kept). `None` for
    /// an erased user, who has none and gets none.
    async fn sealing_key(&self, id: &str) -> Result<Option<DataKey>, StoreError> {
        let Some(personal) = self.personal() else {
            return Ok(None);
        };
        if let Some(key) = personal.remembered(id) {
            return Ok(Some(key));
        }
        let made = personal.new_key(id).map_err(StoreError::Unexpected)?;
        let row: Option<(String, String)> = sqlx::query_as(
            "WITH made AS ( \
               INSERT INTO data_keys (user_id, server_key_id, wrapped) \
               SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM events \
                 WHERE aggregate_type = 'user' AND aggregate_id = $1 AND event_type = 'UserErased') \
               ON CONFLICT (user_id) DO NOTHING RETURNING server_key_id, wrapped) \
             SELECT server_key_id, wrapped FROM made \
             UNION ALL SELECT server_key_id, wrapped FROM data_keys WHERE user_id = $1",
        )
        .bind(id)
        .bind(&made.server_key_id)
        .bind(&made.wrapped)
        .fetch_optional(&self.pool)
        .await?;
        let key = row.and_then(|(kid, wrapped)| personal.unwrap(id, &kid, &wrapped));
        if let Some(key) = &key {
            personal.remember(id, key.clone());
        }
        Ok(key)
    }

    /// The keys to open a stream's events with, from a data key as read
    /// (remembered for sealing, or forgotten when the read found none).
    fn opening_keys(&self, id: &str, data_key: Option<&(String, String)>) -> Keys {
        let Some(personal) = self.personal() else {
            return Keys::default();
        };
        let key = data_key.and_then(|(kid, wrapped)| personal.unwrap(id, kid, wrapped));
        match &key {
            Some(key) => personal.remember(id, key.clone()),
            None => personal.forget(id),
        }
        Keys::one(id, key)
    }

    /// A store that remembers the states it reads and writes, and decides a
    /// command on the remembered state when it has one. That state may be
    /// stale when other processes write the same streams; the append's
    /// optimistic check then refuses it and the command is decided again on
    /// a fresh read, so the outcome is the same as without the memory. A
    /// refusal or a command with nothing to do is not checked by an append,
    /// so those are always confirmed on a fresh read. Remembers up to
    /// `streams` streams (0: none, like [`Store::new`]).
    pub fn remembering(pool: PgPool, streams: usize) -> Self {
        Self {
            cache: (streams > 0).then(|| Arc::new(Cache::new(streams))),
            ..Self::new(pool)
        }
    }

    /// The aggregate's current state (a default one when the stream is empty),
    /// read from PostgreSQL.
    pub async fn load(&self, id: &str) -> Result<A, StoreError> {
        Ok(self.load_versioned(id).await?.state)
    }

    pub async fn load_versioned(&self, id: &str) -> Result<Versioned<A>, StoreError> {
        let key = StreamKey::Id {
            aggregate_type: A::TYPE,
            aggregate_id: id,
        };
        let rows = read_streams(&self.pool, &[key]).await?;
        self.from_rows(id, rows.into_iter().next().flatten()).await
    }

    /// The remembered state, if this store remembers and has it.
    pub fn remembered(&self, id: &str) -> Option<Basis<A>> {
        let versioned = self.cache.as_ref()?.get(&id.to_string())?;
        Some(Basis {
            versioned,
            fresh: false,
        })
    }

    /// Drops the remembered state (it proved stale).
    pub fn forget(&self, id: &str) {
        if let Some(cache) = &self.cache {
            cache.remove(&id.to_string());
        }
    }

    /// State to decide a command on: remembered, or else read (and remembered).
    pub async fn basis(&self, id: &str) -> Result<Basis<A>, StoreError> {
        match self.remembered(id) {
            Some(basis) => Ok(basis),
            None => self.fresh(id).await,
        }
    }

    async fn fresh(&self, id: &str) -> Result<Basis<A>, StoreError> {
        let versioned = self.load_versioned(id).await?;
        Ok(self.read_now(id, versioned))
    }

    /// A state the caller has just read from PostgreSQL (perhaps together with
    /// other streams), remembered for later commands.
    pub fn read_now(&self, id: &str, versioned: Versioned<A>) -> Basis<A> {
        if let Some(cache) = &self.cache {
            // An empty stream is not remembered: it is about to be created.
            if versioned.sequence > 0 {
                cache.put(id.to_string(), versioned.clone());
            }
        }
        Basis {
            versioned,
            fresh: true,
        }
    }

    /// The state of a stream as read (by the caller, perhaps together with
    /// other streams): none is an empty stream; the snapshot with the events
    /// after it folded in. A snapshot that no longer decodes (the state's
    /// shape changed since it was written) is set aside and the stream
    /// replayed from its events, which are the record.
    pub async fn from_rows(
        &self,
        id: &str,
        rows: Option<StreamRows>,
    ) -> Result<Versioned<A>, StoreError> {
        let Some(rows) = rows else {
            return Ok(Versioned::default());
        };
        let keys = self.opening_keys(id, rows.data_key.as_ref());
        let mut folded: Versioned<A> = match &rows.snapshot {
            None => Versioned::default(),
            Some((sequence, payload)) => {
                match serde_json::from_str(&Personal::open_text(payload, &keys)) {
                    Ok(state) => Versioned {
                        state,
                        sequence: *sequence,
                        snapshot_sequence: *sequence,
                    },
                    Err(e) => {
                        tracing::warn!(aggregate = A::TYPE, %id, error = %e, "snapshot does not decode; replaying the stream");
                        return self.replay(id).await;
                    }
                }
            }
        };
        for (sequence, payload) in rows.events {
            folded
                .state
                .apply(serde_json::from_str(&Personal::open_text(&payload, &keys))?);
            folded.sequence = sequence;
        }
        Ok(folded)
    }

    /// The state folded from every event of the stream, ignoring the snapshot.
    pub async fn replay(&self, id: &str) -> Result<Versioned<A>, StoreError> {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT sequence, payload::text FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
        )
        .bind(A::TYPE)
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let keys = match self.personal() {
            Some(personal) => personal.read_keys(&self.pool, &[id.to_string()]).await?,
            None => Keys::default(),
        };
        let mut folded: Versioned<A> = Versioned::default();
        for (sequence, payload) in rows {
            folded
                .state
                .apply(serde_json::from_str(&Personal::open_text(&payload, &keys))?);
            folded.sequence = sequence;
        }
        // The snapshot that did not decode is replaced at the next commit.
        folded.snapshot_sequence = 0;
        Ok(folded)
    }

    /// Builds a command from the current state, runs it, and appends its events;
    /// returns them. Retries from a fresh read when another writer got there first.
    pub async fn execute<F>(&self, id: &str, build: F) -> Result<Vec<A::Event>, ExecError<A::Error>>
    where
        F: FnMut(&A) -> Result<A::Command, ExecError<A::Error>>,
    {
        self.execute_with(id, None, &[], build).await
    }

    /// [`Store::execute`], deciding first on `basis` (state the caller has
    /// just read or remembered, saving a read), and only if the streams in
    /// `reads` are still where the caller read them (else `ReadMoved`).
    pub async fn execute_with<F>(
        &self,
        id: &str,
        basis: Option<Basis<A>>,
        reads: &[Read],
        build: F,
    ) -> Result<Vec<A::Event>, ExecError<A::Error>>
    where
        F: FnMut(&A) -> Result<A::Command, ExecError<A::Error>>,
    {
        Ok(self.execute_at(id, basis, reads, build).await?.0)
    }

    /// [`Store::execute_with`], answering also the sequence of the last
    /// event appended (the stream's sequence once the command is in).
    pub async fn execute_at<F>(
        &self,
        id: &str,
        basis: Option<Basis<A>>,
        reads: &[Read],
        mut build: F,
    ) -> Result<(Vec<A::Event>, i64), ExecError<A::Error>>
    where
        F: FnMut(&A) -> Result<A::Command, ExecError<A::Error>>,
    {
        let mut next = basis;
        for attempt in 0..MAX_ATTEMPTS {
            let Basis {
                versioned:
                    Versioned {
                        mut state,
                        sequence,
                        snapshot_sequence,
                    },
                fresh,
            } = match next.take() {
                Some(given) => given,
                None => self.basis(id).await?,
            };
            // Anything not confirmed by an append is confirmed on a fresh read.
            let decided = match build(&state) {
                Ok(command) => {
                    // The sink applies each event to the state as the
                    // aggregate writes it: afterwards `state` is the new snapshot.
                    let sink = EventSink::default();
                    match state.handle(command, &(), &sink).await {
                        Ok(()) => Ok(sink.collect().await),
                        Err(refusal) => Err(ExecError::Refused(refusal)),
                    }
                }
                Err(e) => Err(e),
            };
            let events = match decided {
                Ok(events) if !events.is_empty() => events,
                Ok(_) | Err(ExecError::Refused(_)) if !fresh => {
                    self.forget(id);
                    next = Some(self.fresh(id).await?);
                    continue;
                }
                Ok(events) => return Ok((events, sequence)),
                Err(e) => return Err(e),
            };
            let new_sequence = sequence + events.len() as i64;
            let snapshot = new_sequence - snapshot_sequence >= SNAPSHOT_EVERY;
            let key = self.sealing_key(id).await?;
            if self.personal().is_some() && key.is_none() {
                // Erased since this state was read: decide on a fresh read.
                self.forget(id);
                next = Some(self.fresh(id).await?);
                continue;
            }
            let mut append = Self::prepare(id, sequence, &events, &state, snapshot, reads)?;
            self.seal(id, key.as_ref(), &mut append)?;
            match self.append(append).await? {
                Outcome::Written => {
                    if let Some(cache) = &self.cache {
                        let versioned = Versioned {
                            state,
                            sequence: new_sequence,
                            snapshot_sequence: if snapshot {
                                new_sequence
                            } else {
                                snapshot_sequence
                            },
                        };
                        cache.put(id.to_string(), versioned);
                    }
                    return Ok((events, new_sequence));
                }
                Outcome::ReadMoved => return Err(ExecError::ReadMoved),
                Outcome::Conflict => {
                    self.forget(id);
                    metrics::counter!("twofold_store_conflicts_total", "aggregate" => A::TYPE)
                        .increment(1);
                    let pause = rand::thread_rng().gen_range(0..=(1 + attempt.min(20) as u64));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
        Err(StoreError::Unexpected(anyhow::anyhow!(
            "stream {id} kept conflicting after {MAX_ATTEMPTS} attempts"
        ))
        .into())
    }

    /// Seals the personal data of an append's payloads and snapshot under `key`.
    fn seal(&self, id: &str, key: Option<&DataKey>, append: &mut Append) -> Result<(), StoreError> {
        let (Some(personal), Some(key)) = (self.personal(), key) else {
            return Ok(());
        };
        for (payload, event_type) in append.payloads.iter_mut().zip(&append.event_types) {
            let plain = std::mem::take(payload);
            *payload = personal
                .seal_payload(id, key, event_type, plain)
                .map_err(StoreError::Unexpected)?;
        }
        if let Some(state) = &mut append.snapshot {
            *state = personal
                .seal_state(id, key, state)
                .map_err(StoreError::Unexpected)?;
        }
        Ok(())
    }

    /// Writes an append through the committer (shared with concurrent requests).
    async fn append(&self, append: Append) -> Result<Outcome, StoreError> {
        self.committer
            .get_or_init(|| Committer::start(&self.pool))
            .append(append)
            .await
    }

    /// `events` to append after `expected`, with a new snapshot (`state`)
    /// when `snapshot` says one is due, as the committer's statement writes them.
    fn prepare(
        id: &str,
        expected: i64,
        events: &[A::Event],
        state: &A,
        snapshot: bool,
        reads: &[Read],
    ) -> Result<Append, StoreError> {
        let mut append = Append {
            aggregate_type: A::TYPE,
            aggregate_id: id.to_string(),
            expected,
            event_types: Vec::with_capacity(events.len()),
            event_versions: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            // The tenant goes with every event, so the relay can route it and
            // the projections can scope it without reading the stream.
            metadata: match state.tenant() {
                Some(tenant) => serde_json::json!({ "tenant_id": tenant.to_string() }),
                None => serde_json::json!({}),
            }
            .to_string(),
            snapshot: if snapshot {
                Some(serde_json::to_string(state)?)
            } else {
                None
            },
            read: reads
                .iter()
                .map(|r| (r.aggregate_type, r.aggregate_id.clone(), r.sequence))
                .collect(),
        };
        for event in events {
            append.event_types.push(event.event_type());
            append.event_versions.push(event.event_version());
            append.payloads.push(serde_json::to_string(event)?);
        }
        Ok(append)
    }

    /// Starts a new stream with the events of `command` (decided on the empty
    /// state) and takes `claim` in the same transaction: both are written or
    /// neither, so a crash between them cannot leave a claim without its
    /// stream. Registration is rare, so this bypasses the group committer.
    pub async fn create_claiming(
        &self,
        id: &str,
        command: A::Command,
        claim: Claim<'_>,
    ) -> Result<Vec<A::Event>, CreateError<A::Error>> {
        let mut state = A::default();
        let sink = EventSink::default();
        state
            .handle(command, &(), &sink)
            .await
            .map_err(CreateError::Refused)?;
        let events = sink.collect().await;
        let snapshot = events.len() as i64 >= SNAPSHOT_EVERY;
        let mut append = Self::prepare(id, 0, &events, &state, snapshot, &[])?;
        // The user's data key is made with the user, in the same transaction.
        let made = match self.personal() {
            Some(personal) => Some(personal.new_key(id).map_err(StoreError::Unexpected)?),
            None => None,
        };
        self.seal(id, made.as_ref().map(|m| &m.key), &mut append)?;
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let claimed = match claim {
            Claim::Username {
                tenant_id,
                username,
                user_id,
            } => sqlx::query(
                "INSERT INTO usernames (tenant_id, username, user_id) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(tenant_id)
            .bind(username)
            .bind(user_id),
        }
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?
        .rows_affected();
        if claimed == 0 {
            return Err(CreateError::Taken);
        }
        let (written, _) = committer::write(&mut tx, std::slice::from_ref(&append))
            .await
            .map_err(StoreError::from)?;
        if written.is_empty() {
            // The stream already had events: nothing of this is kept.
            return Err(CreateError::Exists);
        }
        if let Some(made) = &made {
            sqlx::query(
                "INSERT INTO data_keys (user_id, server_key_id, wrapped) VALUES ($1, $2, $3)",
            )
            .bind(id)
            .bind(&made.server_key_id)
            .bind(&made.wrapped)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        if let (Some(personal), Some(made)) = (self.personal(), made) {
            personal.remember(id, made.key);
        }
        Ok(events)
    }

    /// Erases a user: appends the events of `build` (decided on a fresh
    /// read; they are written unsealed, so they must carry nothing personal)
    /// and, in the same transaction, deletes the user's data key (whatever
    /// was sealed under it, here, in NATS or in exports, can no longer be
    /// opened), their snapshots (which hold the state in the clear: the
    /// stream is replayed from its events from now on) and their username
    /// claim. Retries on a conflict.
    pub async fn erase<F>(
        &self,
        id: &str,
        mut build: F,
    ) -> Result<Vec<A::Event>, ExecError<A::Error>>
    where
        F: FnMut(&A) -> Result<A::Command, ExecError<A::Error>>,
    {
        for _ in 0..MAX_ATTEMPTS {
            self.forget(id);
            let Versioned {
                mut state,
                sequence,
                ..
            } = self.load_versioned(id).await?;
            let command = build(&state)?;
            let sink = EventSink::default();
            state
                .handle(command, &(), &sink)
                .await
                .map_err(ExecError::Refused)?;
            let events = sink.collect().await;
            if events.is_empty() {
                return Ok(events);
            }
            let append = Self::prepare(id, sequence, &events, &state, false, &[])?;
            let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
            let (written, _) = committer::write(&mut tx, std::slice::from_ref(&append))
                .await
                .map_err(StoreError::from)?;
            if written.is_empty() {
                continue;
            }
            for sql in [
                "DELETE FROM data_keys WHERE user_id = $1",
                "DELETE FROM snapshots WHERE aggregate_type = 'user' AND aggregate_id = $1",
                "DELETE FROM usernames WHERE user_id::text = $1",
            ] {
                sqlx::query(sql)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
            }
            tx.commit().await.map_err(StoreError::from)?;
            if let Some(personal) = &self.personal {
                personal.forget(id);
            }
            self.forget(id);
            return Ok(events);
        }
        Err(StoreError::Unexpected(anyhow::anyhow!(
            "stream {id} kept conflicting after {MAX_ATTEMPTS} attempts"
        ))
        .into())
    }
}

/// A unique name taken together with the first events of a stream.
#[derive(Debug, Clone, Copy)]
pub enum Claim<'a> {
    /// A username in a tenant, for the user's stream.
    Username {
        tenant_id: uuid::Uuid,
        username: &'a str,
        user_id: uuid::Uuid,
    },
}

/// Why [`Store::create_claiming`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum CreateError<E: StdError> {
    #[error(transparent)]
    Refused(E),
    /// The claim is held by another stream.
    #[error("the name is taken")]
    Taken,
    /// The stream already exists.
    #[error("the stream already exists")]
    Exists,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether an error (or one it wraps) says PostgreSQL could not be reached.
pub fn is_connection_problem(err: &(dyn StdError + 'static)) -> bool {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(sqlx_err) = e.downcast_ref::<sqlx::Error>() {
            if matches!(
                sqlx_err,
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            ) {
                return true;
            }
        }
        current = e.source();
    }
    false
}
