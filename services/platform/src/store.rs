//! The event store: cqrs-es aggregates persisted by postgres-es, with snapshots.
//!
//! Commands run through [`Store::execute`], which builds the command from the
//! freshly loaded aggregate, appends the resulting events with optimistic
//! concurrency, and on a conflict reloads and builds again. Whatever a command
//! was decided on is therefore exactly the state its events were appended to:
//! that is what keeps lockout and single-use codes exact under parallel requests.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::time::Duration;

use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateContext, AggregateError, EventStore};
use postgres_es::PostgresEventRepository;
use rand::Rng;
use sqlx::PgPool;
use twofold_domain::TenantScoped;

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

/// A command that did not produce events.
#[derive(Debug, thiserror::Error)]
pub enum ExecError<E: StdError> {
    /// The domain refused the command.
    #[error(transparent)]
    Refused(E),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Store<A: Aggregate<Services = ()>> {
    inner: PersistedEventStore<PostgresEventRepository, A>,
}

impl<A: Aggregate<Services = ()> + Clone + TenantScoped> Store<A> {
    /// Every commit also replaces the stream's snapshot, so a load is one
    /// read however long the history.
    ///
    /// cqrs-es 0.5's periodic snapshots (`new_snapshot_store`) lose an event
    /// with postgres-es 0.5 when one commit crosses the snapshot boundary with
    /// more than one event: the snapshot state stops at the boundary but is
    /// stored with the commit's last sequence, so the events in between are
    /// never applied again. A snapshot per commit has no boundary to cross.
    pub fn new(pool: PgPool) -> Self {
        let repo = PostgresEventRepository::new(pool);
        Self {
            inner: PersistedEventStore::new_aggregate_store(repo),
        }
    }

    /// The aggregate's current state (a default one when the stream is empty).
    pub async fn load(&self, id: &str) -> Result<A, StoreError> {
        let mut context = self.inner.load_aggregate(id).await.map_err(classify)?;
        Ok(std::mem::take(context.aggregate()))
    }

    /// Builds a command from the current state, runs it, and appends its events;
    /// returns them. Retries from a fresh load when another writer got there first.
    pub async fn execute<F>(
        &self,
        id: &str,
        mut build: F,
    ) -> Result<Vec<A::Event>, ExecError<A::Error>>
    where
        F: FnMut(&A) -> Result<A::Command, ExecError<A::Error>>,
    {
        for attempt in 0..MAX_ATTEMPTS {
            let mut context = self.inner.load_aggregate(id).await.map_err(classify)?;
            let command = build(context.aggregate())?;
            let sink = cqrs_es::event_sink::EventSink::default();
            // Decide on a copy: the sink applies events as they are written, while
            // commit applies them once more to the context to take a snapshot, so
            // the context must stay as loaded or snapshots would double-apply.
            let mut working = context.aggregate().clone();
            working
                .handle(command, &(), &sink)
                .await
                .map_err(ExecError::Refused)?;
            let events = sink.collect().await;
            if events.is_empty() {
                return Ok(events);
            }
            // The working copy has the events applied, so even a stream's first
            // event (which names the tenant) yields it.
            let mut metadata = HashMap::new();
            if let Some(tenant) = working.tenant() {
                metadata.insert("tenant_id".to_string(), tenant.to_string());
            }
            match self.inner.commit(events, context, metadata).await {
                Ok(committed) => return Ok(committed.into_iter().map(|e| e.payload).collect()),
                Err(AggregateError::AggregateConflict) => {
                    metrics::counter!("twofold_store_conflicts_total", "aggregate" => A::TYPE)
                        .increment(1);
                    let pause = rand::thread_rng().gen_range(0..=(1 + attempt.min(20) as u64));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(other) => return Err(classify(other).into()),
            }
        }
        Err(StoreError::Unexpected(anyhow::anyhow!(
            "stream {id} kept conflicting after {MAX_ATTEMPTS} attempts"
        ))
        .into())
    }
}

/// Sorts a cqrs-es error into "PostgreSQL is down" and everything else.
fn classify<E: StdError>(err: AggregateError<E>) -> StoreError {
    let boxed: Box<dyn StdError + Send + Sync> = match err {
        AggregateError::DatabaseConnectionError(e) => {
            return StoreError::Unavailable(anyhow::anyhow!(e.to_string()))
        }
        AggregateError::UnexpectedError(e) | AggregateError::DeserializationError(e) => e,
        AggregateError::AggregateConflict => {
            return StoreError::Unexpected(anyhow::anyhow!("aggregate conflict"))
        }
        AggregateError::UserError(e) => {
            return StoreError::Unexpected(anyhow::anyhow!("unexpected refusal: {e}"))
        }
    };
    if is_connection_problem(boxed.as_ref()) {
        StoreError::Unavailable(anyhow::anyhow!(boxed.to_string()))
    } else {
        StoreError::Unexpected(anyhow::anyhow!(boxed.to_string()))
    }
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
