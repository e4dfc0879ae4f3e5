//! What admins and auditors read: the Overview (live, at a past moment, day
//! by day), delivery figures, the user directory, and the audit history with
//! its exports.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use futures::{Stream, StreamExt};
use serde::Serialize;
use sqlx::postgres::PgRow;
use twofold_platform::audit_signing::PublishedKeys;
use twofold_platform::personal::{Keys, Personal};
use twofold_projections::audit::{AuditEntry, EntryRows, ExportFilter, Exporter, Format, Prepared};
use twofold_projections::checkpoints::{self, Checkpoint, CheckpointPolicy};
use twofold_projections::directory::{DirectoryQuery, UserRow};
use twofold_projections::overview::{DailyPoint, Overview};
use twofold_projections::queries::{self, AuditQuery, DeliveryStats};
use twofold_projections::{as_of, days, retention};

use crate::session::ReaderSession;
use crate::{App, AppError, Origin};
use twofold_domain::user::{AuditedRead, ReadFilter, UserCommand};
use twofold_domain::TenantId;

/// An audit query's filter as the audit history records a read of it.
pub(crate) fn read_filter(q: &AuditQuery) -> ReadFilter {
    let f = ExportFilter::from(q);
    ReadFilter {
        event_type: f.event_type,
        user_id: f.user_id,
        actor: f.actor,
        from: f.from,
        to: f.to,
    }
}

/// About how many bytes of an audit export are sent at once.
pub const EXPORT_CHUNK: usize = 64 * 1024;

/// A chunk of an export as text (its lines are JSON or CSV: UTF-8).
fn text(chunk: Vec<u8>) -> Result<String, std::io::Error> {
    String::from_utf8(chunk).map_err(std::io::Error::other)
}

/// Audit entries an export reads ahead at once.
const READ_AHEAD: usize = 512;

/// Batches read and not yet written: how many are prepared at once (beside
/// the one the writer waits for).
const BATCHES_AHEAD: usize = 4;

/// A batch of entries as the writer takes it: being prepared on a thread of
/// the blocking pool, or the error that ended the reading.
type Coming = Result<tokio::task::JoinHandle<anyhow::Result<Prepared>>, anyhow::Error>;

/// [`queries::audit_rows`] read on a task of its own, batches of entries
/// ahead, each batch prepared on the blocking pool (`prepare`), several
/// batches at once, so that all but the chain's hashing (on the writer's
/// thread, `write_entries`) spreads over the cores: on the runtime's
/// workers, reading, opening and writing ran mostly on one core while the
/// other idled (a task woken by a send runs next on the sender's worker).
/// With `opening` (an export that shows personal data opened), each
/// batch's preparing opens its sealed values (see [`Opening`]). Stops when
/// the entries are no longer wanted.
fn read_ahead(
    pool: sqlx::PgPool,
    tenant: String,
    q: AuditQuery,
    format: Format,
    opening: Option<Personal>,
) -> tokio::sync::mpsc::Receiver<Coming> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Coming>(BATCHES_AHEAD);
    let opening = opening.map(|personal| {
        Arc::new(Opening {
            personal,
            pool: pool.clone(),
            runtime: tokio::runtime::Handle::current(),
            read: Mutex::default(),
        })
    });
    tokio::spawn(async move {
        let mut rows = queries::audit_rows(&pool, &tenant, &q);
        let mut batch = Vec::with_capacity(READ_AHEAD);
        loop {
            let (end, row) = match rows.next().await {
                None => (true, None),
                Some(Ok(row)) => (false, Some(row)),
                Some(Err(e)) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            batch.extend(row);
            if batch.len() < READ_AHEAD && !end {
                continue;
            }
            let rows = std::mem::replace(&mut batch, Vec::with_capacity(READ_AHEAD));
            if !rows.is_empty() {
                let opening = opening.clone();
                let preparing =
                    tokio::task::spawn_blocking(move || prepare(format, &rows, opening.as_deref()));
                if tx.send(Ok(preparing)).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
        }
    });
    rx
}

/// What opens an export's personal data: the data keys of the users its
/// entries name, read as the batches being prepared name them.
struct Opening {
    personal: Personal,
    pool: sqlx::PgPool,
    runtime: tokio::runtime::Handle,
    read: Mutex<KeysRead>,
}

/// The data keys an export has read (an erased user's stays absent), and
/// the users they were looked for.
#[derive(Default)]
struct KeysRead {
    keys: Keys,
    asked: HashSet<String>,
}

impl Opening {
    /// The keys of the users in `named`, those no batch looked for before
    /// read in one statement. Called from the blocking pool. A user two
    /// batches name at once may be read by both (a user is counted as
    /// looked for once the read is done, so no batch opens with a key still
    /// being read).
    fn keys_of(&self, named: &HashSet<&str>) -> anyhow::Result<Keys> {
        let read = || self.read.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: Vec<String> = {
            let read = read();
            named
                .iter()
                .filter(|id| !read.asked.contains(**id))
                .map(|id| id.to_string())
                .collect()
        };
        if !wanted.is_empty() {
            let keys = self
                .runtime
                .block_on(self.personal.read_keys(&self.pool, &wanted))?;
            let mut read = read();
            read.keys.extend(keys);
            read.asked.extend(wanted);
        }
        Ok(read().keys.only(named.iter().copied()))
    }
}

/// The lines of a batch of audit rows, ready to be chained; with
/// `opening`, each sealed entry's personal data opened beside it.
fn prepare(format: Format, rows: &[PgRow], opening: Option<&Opening>) -> anyhow::Result<Prepared> {
    let mut decoder = EntryRows::default();
    let entries = rows
        .iter()
        .map(|row| decoder.entry(row))
        .collect::<Result<Vec<_>, _>>()?;
    let keys = match opening {
        Some(opening) => {
            let named = entries
                .iter()
                .filter(|entry| entry.is_sealed())
                .flat_map(|entry| entry.key_ids())
                .collect();
            Some(opening.keys_of(&named)?)
        }
        None => None,
    };
    let mut prepared = Prepared::new(format, rows.len());
    for entry in &entries {
        let opened = match &keys {
            Some(keys) => entry.opened(keys)?,
            None => None,
        };
        prepared.push(entry, opened.as_deref())?;
    }
    Ok(prepared)
}

/// How writing an export's entries ended short of its trailer.
enum Cut {
    /// Reading or preparing the entries failed.
    Failed,
    /// The client went away.
    Gone,
    /// The client kept its connection and took nothing for too long.
    Stalled,
}

/// An export's place among those streaming at once, while it has it: the
/// response holds it (see `App::audit_export_in`).
type Place = Mutex<Option<tokio::sync::OwnedSemaphorePermit>>;

/// Where an export's writer hands its chunks to the response.
#[derive(Clone)]
struct Handover {
    tx: tokio::sync::mpsc::Sender<Result<String, std::io::Error>>,
    /// How long a chunk may wait for the client to take the ones before it.
    idle: Duration,
    place: Weak<Place>,
}

impl Handover {
    async fn send(&self, item: Result<String, std::io::Error>) -> Result<(), Cut> {
        match tokio::time::timeout(self.idle, self.tx.send(item)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Cut::Gone),
            Err(_) => {
                // A client that keeps its connection open and reads nothing
                // (a download paused, a pipe nobody empties) would hold the
                // place for good: the export stops here, without its trailer
                // (so what the client has fails verification), and gives the
                // place up while the response lingers.
                if let Some(place) = self.place.upgrade() {
                    drop(place.lock().unwrap_or_else(|p| p.into_inner()).take());
                }
                metrics::counter!("twofold_audit_exports_stalled_total").increment(1);
                tracing::warn!(
                    idle_secs = self.idle.as_secs(),
                    "an audit export's client took nothing for too long; export cut short"
                );
                Err(Cut::Stalled)
            }
        }
    }
}

/// Chains and writes the entries of `batches` into chunks of about
/// [`EXPORT_CHUNK`] bytes sent to `tx`, `chunk` left holding the last one
/// unsent. Runs on a thread of the blocking pool, apart from the runtime's
/// workers (see `read_ahead`): what is left of an entry here is its hash
/// and copying its line.
fn write_entries(
    exporter: &mut Exporter,
    mut batches: tokio::sync::mpsc::Receiver<Coming>,
    runtime: &tokio::runtime::Handle,
    handover: &Handover,
    chunk: &mut Vec<u8>,
) -> Result<(), Cut> {
    let failed = |e: anyhow::Error| {
        tracing::error!(error = %format!("{e:#}"), "audit export failed");
        Cut::Failed
    };
    while let Some(coming) = batches.blocking_recv() {
        let prepared = runtime
            .block_on(coming.map_err(failed)?)
            .map_err(|e| failed(e.into()))?
            .map_err(failed)?;
        for i in 0..prepared.len() {
            exporter
                .write_prepared_one(&prepared, i, chunk)
                .map_err(failed)?;
            if chunk.len() >= EXPORT_CHUNK {
                let full = text(std::mem::replace(chunk, new_chunk()));
                runtime.block_on(handover.send(full))?;
            }
        }
    }
    Ok(())
}

/// An empty chunk of an export, with room for the line that fills it.
fn new_chunk() -> Vec<u8> {
    Vec::with_capacity(EXPORT_CHUNK + EXPORT_CHUNK / 4)
}

/// The longest daily series answered at once.
pub const MAX_DAYS: i64 = 366;

/// One page of the directory.
#[derive(Debug, Serialize)]
pub struct DirectoryPage {
    pub users: Vec<UserRow>,
    /// Exact unless `total_capped`: then a lower bound (see
    /// `queries::DirectoryAnswer`).
    pub total: i64,
    pub total_capped: bool,
    pub page: u32,
    pub per_page: u32,
}

fn one_of(value: Option<&str>, allowed: &[&str], message: &str) -> Result<(), AppError> {
    match value {
        Some(v) if !allowed.contains(&v) => Err(AppError::InvalidQuery(message.to_string())),
        _ => Ok(()),
    }
}

impl App {
    /// The Overview now (from the read model) or as it stood at `as_of`
    /// (from the day before's checkpoint and the events after it).
    #[tracing::instrument(skip_all)]
    pub async fn overview(
        &self,
        reader: &ReaderSession,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Overview, AppError> {
        self.overview_in(reader.tenant_id(), as_of).await
    }

    pub(crate) async fn overview_in(
        &self,
        tenant_id: TenantId,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Overview, AppError> {
        let tenant = tenant_id.to_string();
        Ok(match as_of {
            Some(at) => {
                as_of::overview_at(
                    &self.pool,
                    &self.personal,
                    &self.overview_checkpoints,
                    &tenant,
                    at,
                    self.now(),
                )
                .await?
            }
            None => queries::overview(&self.pool, &tenant).await?,
        })
    }

    /// The Overview at the end of each day from `from` to `to`.
    #[tracing::instrument(skip_all)]
    pub async fn daily(
        &self,
        reader: &ReaderSession,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<DailyPoint>, AppError> {
        if to < from || (to - from).num_days() >= MAX_DAYS {
            return Err(AppError::InvalidQuery(
                "`from` must not be after `to`, and at most 366 days apart.".to_string(),
            ));
        }
        let tenant = reader.tenant_id().to_string();
        let live = queries::overview_counts(&self.pool, &tenant).await?;
        Ok(days::daily(
            &self.pool,
            &self.personal,
            &self.overview_checkpoints,
            &tenant,
            (from, to),
            self.now(),
            &live,
        )
        .await?)
    }

    /// Sent, failed, fallbacks and latency percentiles per method and provider.
    #[tracing::instrument(skip_all)]
    pub async fn delivery(&self, reader: &ReaderSession) -> Result<Vec<DeliveryStats>, AppError> {
        Ok(queries::delivery(&self.pool, &reader.tenant_id().to_string()).await?)
    }

    /// A page of the user directory, filtered.
    #[tracing::instrument(skip_all)]
    pub async fn directory(
        &self,
        reader: &ReaderSession,
        q: &DirectoryQuery,
    ) -> Result<DirectoryPage, AppError> {
        one_of(
            q.status.as_deref(),
            &["enrolled", "pending", "not_started"],
            "`status` is one of enrolled, pending, not_started.",
        )?;
        one_of(
            q.method.as_deref(),
            &["totp", "email", "sms"],
            "`method` is one of totp, email, sms.",
        )?;
        one_of(
            q.two_factor.as_deref(),
            &["on", "off"],
            "`two_factor` is on or off.",
        )?;
        let answer = queries::directory(
            &self.pool,
            &reader.tenant_id().to_string(),
            q,
            self.directory_count_limit,
        )
        .await?;
        Ok(DirectoryPage {
            users: answer.rows,
            total: answer.total,
            total_capped: answer.total_capped,
            page: q.page.unwrap_or(1).max(1),
            per_page: q.per_page.unwrap_or(50).clamp(1, queries::MAX_PER_PAGE),
        })
    }

    /// Records in the audit history, on the reader's own stream, that they
    /// read `read` (who, what, when, from where). Done before the answer
    /// is given: a read that cannot be recorded is not answered.
    pub(crate) async fn record_read(
        &self,
        reader: &ReaderSession,
        origin: &Origin,
        read: AuditedRead,
    ) -> Result<(), AppError> {
        let ctx = reader.0.ctx(origin, self.now());
        self.users
            .execute(&reader.0.user_id.to_string(), |_| {
                Ok(UserCommand::RecordAuditRead {
                    read: read.clone(),
                    ctx: ctx.clone(),
                })
            })
            .await?;
        Ok(())
    }

    /// A user's audit timeline; the read is recorded.
    #[tracing::instrument(skip_all)]
    pub async fn user_history(
        &self,
        reader: &ReaderSession,
        origin: &Origin,
        raw_user: &str,
    ) -> Result<Vec<AuditEntry>, AppError> {
        self.record_read(
            reader,
            origin,
            AuditedRead::UserHistory {
                user_id: raw_user.to_string(),
            },
        )
        .await?;
        self.user_history_in(reader, raw_user).await
    }

    pub(crate) async fn user_history_in(
        &self,
        reader: &ReaderSession,
        raw_user: &str,
    ) -> Result<Vec<AuditEntry>, AppError> {
        let tenant = reader.tenant_id().to_string();
        let q = AuditQuery {
            user_id: Some(raw_user.to_string()),
            ..AuditQuery::default()
        };
        let mut entries: Vec<_> = queries::audit(&self.pool, &tenant, &q)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        self.open_entries(&mut entries).await?;
        Ok(entries)
    }

    /// Opens the personal data of audit entries for display (`[erased]`
    /// where the user was erased), reading their keys in one query.
    pub(crate) async fn open_entries(&self, entries: &mut [AuditEntry]) -> Result<(), AppError> {
        let mut ids: Vec<String> = entries.iter().flat_map(AuditEntry::key_ids).collect();
        if ids.is_empty() {
            return Ok(());
        }
        ids.sort();
        ids.dedup();
        let keys = self.personal.read_keys(&self.pool, &ids).await?;
        for entry in entries {
            entry.open(&keys);
        }
        Ok(())
    }

    /// The public keys audit exports are signed with (the current one and
    /// those still published so older exports verify).
    pub fn audit_keys(&self, _reader: &ReaderSession) -> PublishedKeys {
        self.keys.audit_signer().published()
    }

    /// The tenant's signed checkpoints of its audit chain, signed from
    /// `from` to `to`.
    #[tracing::instrument(skip_all)]
    pub async fn audit_checkpoints(
        &self,
        reader: &ReaderSession,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<Checkpoint>, AppError> {
        Ok(checkpoints::list(&self.pool, &reader.tenant_id().to_string(), from, to).await?)
    }

    /// Extends every tenant's audit chain and signs the checkpoints due now
    /// (the verifier does this every minute; tests call it after moving
    /// the clock).
    #[tracing::instrument(skip_all)]
    pub async fn record_audit_checkpoints(
        &self,
        policy: &CheckpointPolicy,
    ) -> anyhow::Result<Vec<Checkpoint>> {
        checkpoints::record_due(&self.pool, self.keys.audit_signer(), self.now(), policy).await
    }

    /// Prunes each tenant's audit entries older than its
    /// `audit_retention_days` (by the clock) from the read models, up to its
    /// last signed checkpoint before them; tenants without the setting keep
    /// everything. A tenant whose rows fail the check is logged and skipped.
    /// Returns the prunings done.
    pub async fn prune_audit(&self) -> anyhow::Result<Vec<retention::Pruning>> {
        let now = self.now();
        let tenants: Vec<String> = sqlx::query_scalar("SELECT tenant_id FROM audit_chain")
            .fetch_all(&self.pool)
            .await?;
        let mut done = Vec::new();
        for tenant in tenants {
            let Some(days) = self
                .tenants
                .load(&tenant)
                .await?
                .settings
                .audit_retention_days
            else {
                continue;
            };
            let cutoff = now - chrono::Duration::days(days.into());
            match retention::prune(&self.pool, &tenant, cutoff, now).await {
                Ok(pruning) => done.extend(pruning),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "pruning the audit history"),
            }
        }
        Ok(done)
    }

    /// The tenant's audit history as an export: a header, one hash-chained
    /// line per entry and a closing trailer signed with the audit key,
    /// streamed. A failure cuts the export short without its trailer, so it
    /// fails verification. The export is recorded as the reader's read.
    pub async fn audit_export(
        &self,
        reader: &ReaderSession,
        origin: &Origin,
        q: AuditQuery,
    ) -> Result<
        (
            Format,
            impl Stream<Item = Result<String, std::io::Error>> + Send + 'static,
        ),
        AppError,
    > {
        // Bad input is refused before anything is recorded.
        let format = q.format.clone().unwrap_or_else(|| "ndjson".to_string());
        let exported = self.audit_export_in(reader.tenant_id(), q.clone())?;
        self.record_read(
            reader,
            origin,
            AuditedRead::AuditExport {
                filter: read_filter(&q),
                format,
            },
        )
        .await?;
        Ok(exported)
    }

    pub(crate) fn audit_export_in(
        &self,
        tenant_id: TenantId,
        q: AuditQuery,
    ) -> Result<
        (
            Format,
            impl Stream<Item = Result<String, std::io::Error>> + Send + 'static,
        ),
        AppError,
    > {
        let format = match q.format.as_deref().unwrap_or("ndjson") {
            "ndjson" => Format::Ndjson,
            "csv" => Format::Csv,
            _ => {
                return Err(AppError::InvalidQuery(
                    "`format` is ndjson or csv.".to_string(),
                ))
            }
        };
        // Refused, not queued, when as many are streaming as this server
        // allows: each holds a connection while it reads, and queued exports
        // would hold their requests open with nothing to show. The response
        // holds the place: its lines end only once the task writing them has
        // (a dropped response stops the task at its next send), or the
        // writer gives it up when the client stops reading.
        let permit = Arc::clone(&self.audit_exports)
            .try_acquire_owned()
            .map_err(|_| {
                metrics::counter!("twofold_audit_exports_refused_total").increment(1);
                AppError::ExportsBusy {
                    running: self.audit_exports_at_once,
                }
            })?;
        let place: Arc<Place> = Arc::new(Mutex::new(Some(permit)));
        let pool = self.pool.clone();
        let tenant = tenant_id.to_string();
        let signer = self.keys.audit_signer().clone();
        let personal = self.personal.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
        let handover = Handover {
            tx,
            idle: self.audit_export_idle,
            place: Arc::downgrade(&place),
        };
        // The export owns what it reads from, so it can outlive the request.
        tokio::spawn(async move {
            let failed = || std::io::Error::other("audit export failed");
            let pruned = match retention::mark(&pool, &tenant).await {
                Ok(pruned) => pruned,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "audit export failed");
                    let _ = handover.send(Err(failed())).await;
                    return;
                }
            };
            let mut exporter =
                Exporter::after_pruning(format, &tenant, ExportFilter::from(&q), pruned.clone());
            // Lines are gathered into chunks of about EXPORT_CHUNK bytes: one
            // message and one HTTP chunk per line cost more than the line.
            let mut chunk = new_chunk();
            chunk.extend_from_slice(exporter.header().as_bytes());
            let opening = exporter.shows_opened().then(|| personal.clone());
            let batches = read_ahead(pool.clone(), tenant.clone(), q.clone(), format, opening);
            let (sender, runtime) = (handover.clone(), tokio::runtime::Handle::current());
            let written = tokio::task::spawn_blocking(move || {
                let cut = write_entries(&mut exporter, batches, &runtime, &sender, &mut chunk);
                (exporter, chunk, cut)
            })
            .await;
            let (exporter, mut chunk) = match written {
                Ok((exporter, chunk, Ok(()))) => (exporter, chunk),
                Ok((_, _, Err(Cut::Gone | Cut::Stalled))) => return,
                Ok((_, _, Err(Cut::Failed))) | Err(_) => {
                    let _ = handover.send(Err(failed())).await;
                    return;
                }
            };
            // A pruning while the entries were read may have removed some
            // the mark above does not account for: cut the export short
            // (no trailer, so it fails verification) rather than sign it.
            match retention::mark(&pool, &tenant).await {
                Ok(current) if current == pruned => {}
                _ => {
                    tracing::warn!(
                        "the audit history was pruned during an export; export cut short"
                    );
                    let _ = handover.send(Err(failed())).await;
                    return;
                }
            }
            let last = exporter.trailer(&signer).map(|trailer| {
                chunk.extend_from_slice(trailer.as_bytes());
                chunk
            });
            let _ = handover
                .send(last.map_err(|_| failed()).and_then(text))
                .await;
        });
        let lines = futures::stream::unfold(Some((rx, place)), |state| async move {
            let (mut rx, place) = state?;
            match rx.recv().await {
                Some(item) => Some((item, Some((rx, place)))),
                // Its writer gave the place up (`Handover::send`): the export
                // ends in an error, not as if it were whole.
                None if place.lock().unwrap_or_else(|p| p.into_inner()).is_none() => {
                    let cut = std::io::Error::other("audit export cut short: its client stalled");
                    Some((Err(cut), None))
                }
                None => None,
            }
        });
        Ok((format, lines))
    }
}
