//! Applying events to the read models in PostgreSQL, once each, with the
//! builder's position stored in the same transaction as the update.

use std::collections::BTreeMap;

use anyhow::Context;
use sqlx::{Connection, FromRow, PgConnection, PgPool, Row};
use twofold_domain::user::UserEvent;

use crate::audit::AuditEntry;
use crate::directory::UserRow;
use crate::overview::{self, Counts};
use twofold_platform::envelope::COLUMNS;
use twofold_platform::personal::Personal;

use crate::record::{EventRecord, RecordExt, Typed};

/// The read-model builders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builder {
    Directory,
    Audit,
}

impl Builder {
    pub const ALL: [Builder; 2] = [Builder::Directory, Builder::Audit];

    pub fn name(&self) -> &'static str {
        match self {
            Builder::Directory => "directory",
            Builder::Audit => "audit",
        }
    }

    /// Applies `record` unless this builder has already applied it (or a later
    /// event of the same stream), after any earlier events of its stream not
    /// applied yet. Returns whether anything was applied.
    pub async fn apply(
        &self,
        pool: &PgPool,
        personal: &Personal,
        record: &EventRecord,
    ) -> anyhow::Result<bool> {
        let target = StreamTarget::of(record);
        let mut conn = pool.acquire().await?;
        Ok(!self
            .catch_up(&mut conn, personal, &[target])
            .await?
            .is_empty())
    }

    /// Brings each named stream up to the sequence named, in one transaction:
    /// every event after this builder's position for the stream, up to and
    /// including that sequence, is read from the event store and applied in
    /// order, and the position moves with the update. Events already applied
    /// are not applied again, and a message naming an event that comes before
    /// one already applied is a no-op, so neither redelivery nor the order
    /// messages arrive in changes the read models. Returns what was applied.
    pub async fn catch_up(
        &self,
        conn: &mut PgConnection,
        personal: &Personal,
        targets: &[StreamTarget],
    ) -> anyhow::Result<Vec<EventRecord>> {
        let mut applied = catch_up(conn, personal, &[*self], targets, 0).await?;
        Ok(applied
            .pop()
            .map(|(_, records)| records)
            .unwrap_or_default())
    }

    /// Folds `records` (this builder's, in commit order) into what it
    /// writes, with the streams' new positions (the last of their events
    /// applied) and the builder's progress, all added to `batch`, which
    /// writes every builder's share in one statement. Returns the records
    /// as applied.
    async fn prepare(
        &self,
        tx: &mut PgConnection,
        personal: &Personal,
        mut records: Vec<EventRecord>,
        batch: &mut BatchWrite,
    ) -> anyhow::Result<Vec<EventRecord>> {
        let mut moved: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for r in &records {
            moved.insert((&r.aggregate_type, &r.aggregate_id), r.sequence);
        }
        for ((aggregate_type, aggregate_id), sequence) in moved {
            batch.positions.0.push(self.name());
            batch.positions.1.push(aggregate_type.to_string());
            batch.positions.2.push(aggregate_id.to_string());
            batch.positions.3.push(sequence);
        }
        let last = records
            .iter()
            .max_by_key(|r| r.global_position)
            .context("records is not empty")?;
        batch.progress.0.push(self.name());
        batch.progress.1.push(last.global_position);
        batch.progress.2.push(last.recorded_at);
        match self {
            Builder::Directory => {
                // The directory holds what admins search and read, opened;
                // an erasure's own event clears it again. (The audit history
                // keeps the sealed form, which its hash chain is over.)
                let (rows, counts) = fold_directory(&mut *tx, personal, &mut records).await?;
                let rows = rows.into_values().filter(|r| !r.user_id.is_empty());
                batch.directory = Some((rows.collect(), counts));
            }
            Builder::Audit => {
                batch.audit = Some(records.iter().filter_map(AuditEntry::from_record).collect());
            }
        }
        Ok(records)
    }
}

/// What one batch writes, for every builder in it, sent as one statement
/// (`WITH users AS (INSERT ...), counts AS (...), audit AS (...), moved AS
/// (...) INSERT INTO projection_progress ...`): a live batch is a claim, a
/// read, this and the commit.
#[derive(Default)]
struct BatchWrite {
    /// The directory's rows and how they move the Overview counts.
    directory: Option<(Vec<UserRow>, TenantCounts)>,
    audit: Option<Vec<AuditEntry>>,
    /// Per builder and stream, the new position: builder, type, id, sequence.
    positions: (Vec<&'static str>, Vec<String>, Vec<String>, Vec<i64>),
    /// The lane whose progress rows the batch moves (see [`catch_up`]).
    lane: i16,
    /// Per builder, its progress: builder, last position, its event's time.
    progress: (
        Vec<&'static str>,
        Vec<i64>,
        Vec<chrono::DateTime<chrono::Utc>>,
    ),
}

impl BatchWrite {
    fn sql(&self) -> String {
        let mut parts = Vec::new();
        let mut n = 1;
        if self.directory.is_some() {
            parts.push(format!("users AS ({})", users_insert_sql(n, true)));
            n += USER_PARAMS;
            parts.push(format!("counts AS ({})", counts_upsert_sql(n)));
            n += COUNT_PARAMS;
        }
        if self.audit.is_some() {
            parts.push(format!("audit AS ({})", audit_insert_sql(n)));
            n += AUDIT_PARAMS;
        }
        let p = params(n, 4);
        parts.push(format!(
            "moved AS ( \
               INSERT INTO projection_positions (projection, aggregate_type, aggregate_id, sequence) \
               SELECT * FROM unnest({}::text[], {}::text[], {}::text[], {}::bigint[]) \
               ON CONFLICT (projection, aggregate_type, aggregate_id) DO UPDATE SET sequence = EXCLUDED.sequence)",
            p[0], p[1], p[2], p[3]
        ));
        let p = params(n + 4, 4);
        format!(
            "WITH {} \
             INSERT INTO projection_progress (projection, lane, last_position, last_event_at, last_applied_at) \
             SELECT p, {}::smallint, l, e, now() FROM unnest({}::text[], {}::bigint[], {}::timestamptz[]) AS x(p, l, e) \
             ON CONFLICT (projection, lane) DO UPDATE SET \
               last_position = GREATEST(projection_progress.last_position, EXCLUDED.last_position), \
               last_event_at = EXCLUDED.last_event_at, last_applied_at = now()",
            parts.join(", "),
            p[0], p[1], p[2], p[3]
        )
    }

    async fn execute(&self, tx: &mut PgConnection) -> anyhow::Result<()> {
        let sql = self.sql();
        let mut query = sqlx::query(&sql);
        if let Some((rows, counts)) = &self.directory {
            let rows: Vec<&UserRow> = rows.iter().collect();
            query = bind_counts(bind_users(query, &rows)?, counts);
        }
        if let Some(entries) = &self.audit {
            query = bind_audit(query, entries)?;
        }
        query
            .bind(&self.positions.0)
            .bind(&self.positions.1)
            .bind(&self.positions.2)
            .bind(&self.positions.3)
            .bind(self.lane)
            .bind(&self.progress.0)
            .bind(&self.progress.1)
            .bind(&self.progress.2)
            .execute(&mut *tx)
            .await
            .context("writing the read models")?;
        Ok(())
    }
}

/// [`Builder::catch_up`] for several builders at once, in one transaction
/// (one commit, one WAL flush): each stream's positions are claimed for
/// every builder in one statement, its events are read once, from the
/// lowest of them, and each builder applies those after its own position.
/// The builders' progress is recorded in `lane`'s rows: batches applied at
/// the same time from different lanes do not wait on each other's. Returns
/// what each builder applied (the directory's with personal data opened,
/// the audit's sealed, as each holds them).
pub async fn catch_up(
    conn: &mut PgConnection,
    personal: &Personal,
    builders: &[Builder],
    targets: &[StreamTarget],
    lane: i16,
) -> anyhow::Result<Vec<(Builder, Vec<EventRecord>)>> {
    // The furthest sequence asked of each stream, in stream order.
    let mut upto: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for t in targets {
        let e = upto
            .entry((t.aggregate_type.as_str(), t.aggregate_id.as_str()))
            .or_insert(0);
        *e = (*e).max(t.sequence);
    }
    let names: Vec<&str> = builders.iter().map(Builder::name).collect();
    let types: Vec<&str> = upto.keys().map(|(t, _)| *t).collect();
    let ids: Vec<&str> = upto.keys().map(|(_, i)| *i).collect();
    let upto: Vec<i64> = upto.values().copied().collect();
    let mut tx = conn
        .begin()
        .await
        .context("starting a projection transaction")?;
    // Per builder and stream, in that order: its position, claimed and
    // locked (so two batches or projector instances never apply the same
    // events), and the events after the lowest of the stream's positions up
    // to the one asked for, each with the builders that have not applied it.
    // The claim is an upsert that leaves the position as it is: a stream a
    // builder has not seen yet gets its row at 0, so a second batch naming
    // it waits for the first to commit and then reads the position the
    // first wrote (`FOR UPDATE` on a row that is not there yet locks
    // nothing, and both would apply the same events). Every batch locks in
    // the same order (builders as listed, streams sorted), so batches do not
    // deadlock. The events are looked up by key: `OFFSET 0` keeps PostgreSQL
    // from turning the lookup into a join, which its general plan (used for
    // a statement run often) answers by reading every event.
    let rows = sqlx::query(&format!(
        "WITH claimed AS ( \
           INSERT INTO projection_positions AS p (projection, aggregate_type, aggregate_id, sequence) \
           SELECT b.projection, t.aggregate_type, t.aggregate_id, 0 \
           FROM unnest($1::text[]) WITH ORDINALITY AS b(projection, bn) \
           CROSS JOIN unnest($2::text[], $3::text[]) WITH ORDINALITY AS t(aggregate_type, aggregate_id, n) \
           ORDER BY b.bn, t.n \
           ON CONFLICT (projection, aggregate_type, aggregate_id) DO UPDATE SET sequence = p.sequence \
           RETURNING p.projection, p.aggregate_type, p.aggregate_id, p.sequence), \
         low AS ( \
           SELECT aggregate_type, aggregate_id, min(sequence) AS sequence, \
             array_agg(projection) AS projections, array_agg(sequence) AS positions \
           FROM claimed GROUP BY aggregate_type, aggregate_id) \
         SELECT e.*, ARRAY( \
             SELECT x.projection FROM unnest(c.projections, c.positions) AS x(projection, position) \
             WHERE x.position < e.sequence) AS builders \
         FROM unnest($2::text[], $3::text[], $4::bigint[]) AS t(aggregate_type, aggregate_id, upto) \
         JOIN low c ON c.aggregate_type = t.aggregate_type AND c.aggregate_id = t.aggregate_id \
         CROSS JOIN LATERAL ( \
           SELECT {COLUMNS} FROM events e \
           WHERE e.aggregate_type = t.aggregate_type AND e.aggregate_id = t.aggregate_id \
             AND e.sequence > c.sequence AND e.sequence <= t.upto OFFSET 0) e \
         ORDER BY e.global_position",
    ))
    .bind(&names)
    .bind(&types)
    .bind(&ids)
    .bind(&upto)
    .fetch_all(&mut *tx)
    .await?;
    let mut each: Vec<(Builder, Vec<EventRecord>)> =
        builders.iter().map(|b| (*b, Vec::new())).collect();
    for row in &rows {
        let record = EventRecord::from_row(row)?;
        let wanted: Vec<String> = row.try_get("builders")?;
        for (builder, records) in each.iter_mut() {
            if wanted.iter().any(|w| w == builder.name()) {
                records.push(record.clone());
            }
        }
    }
    let mut applied = Vec::with_capacity(each.len());
    let mut batch = BatchWrite {
        lane,
        ..BatchWrite::default()
    };
    for (builder, records) in each {
        let records = if records.is_empty() {
            records
        } else {
            builder
                .prepare(&mut tx, personal, records, &mut batch)
                .await?
        };
        applied.push((builder, records));
    }
    if !batch.progress.0.is_empty() {
        batch.execute(&mut tx).await?;
    }
    // Also when nothing was new: ending the transaction releases the locks
    // (a dropped transaction would keep them until the connection is next
    // used).
    tx.commit()
        .await
        .context("committing a projection update")?;
    for (builder, records) in &applied {
        if !records.is_empty() {
            metrics::counter!("twofold_projection_events_applied_total", "builder" => builder.name())
                .increment(records.len() as u64);
        }
    }
    Ok(applied)
}

/// A stream a message asks a builder to bring up to `sequence`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTarget {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
}

impl StreamTarget {
    /// `record`'s stream, up to `record`.
    pub fn of(record: &EventRecord) -> Self {
        Self {
            aggregate_type: record.aggregate_type.clone(),
            aggregate_id: record.aggregate_id.clone(),
            sequence: record.sequence,
        }
    }
}

/// Folds the users' events into their rows: each row read once and updated
/// with all its events in order. The rows and the data keys that open the
/// events' personal data are read in one statement, and `records` are
/// opened with those keys. (No lock on the rows: the users' stream
/// positions, locked first, already keep other instances of the builder off.)
/// Also returns how the tenants' Overview counts move: what the rows add now
/// less what they added before.
async fn fold_directory(
    tx: &mut PgConnection,
    personal: &Personal,
    records: &mut [EventRecord],
) -> anyhow::Result<(BTreeMap<String, UserRow>, TenantCounts)> {
    for record in records.iter() {
        // An event of a newer shape than this build knows is not folded by
        // guesswork (it may parse and mean something else).
        if !record.version_is_known() {
            anyhow::bail!(
                "{} of version {}, newer than this projector reads",
                record.event_type,
                record.event_version
            );
        }
    }
    let mut ids: Vec<&str> = records
        .iter()
        .filter(|r| r.aggregate_type == "user")
        .map(|r| r.aggregate_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok((BTreeMap::new(), TenantCounts::new()));
    }
    let key_ids = Personal::envelopes_key_ids(records);
    type Found = (
        String,
        Option<sqlx::types::Json<UserRow>>,
        Option<String>,
        Option<String>,
    );
    let found: Vec<Found> = sqlx::query_as(
        "SELECT user_id, row, NULL::text, NULL::text FROM rm_users WHERE user_id = ANY($1) \
         UNION ALL \
         SELECT user_id, NULL::jsonb, server_key_id, wrapped FROM data_keys WHERE user_id = ANY($2)",
    )
    .bind(&ids)
    .bind(&key_ids)
    .fetch_all(&mut *tx)
    .await
    .context("reading the users' rows and data keys")?;
    let mut rows: BTreeMap<String, UserRow> = BTreeMap::new();
    let mut keys = Vec::new();
    for (id, row, key_id, wrapped) in found {
        match (row, key_id, wrapped) {
            (Some(row), _, _) => {
                rows.insert(id, row.0);
            }
            (None, Some(key_id), Some(wrapped)) => keys.push((id, key_id, wrapped)),
            _ => {}
        }
    }
    Personal::open_envelopes_with(records, &personal.keys_of_rows(keys));
    let mut events: Vec<(&str, UserEvent)> = Vec::new();
    for record in records.iter() {
        if let Typed::User(event) = record.typed()? {
            events.push((&record.aggregate_id, *event));
        }
    }
    // Only the rows that events change are written (and counted).
    let changed: std::collections::BTreeSet<&str> = events.iter().map(|(id, _)| *id).collect();
    rows.retain(|id, _| changed.contains(id.as_str()));
    let mut moved = TenantCounts::new();
    for row in rows.values() {
        overview::count(moved.entry(row.tenant_id.clone()).or_default(), row, -1);
    }
    for (id, event) in &events {
        // Events of a user whose registration this builder never saw leave
        // a row with no id, which is not written (and counts for nothing).
        rows.entry(id.to_string()).or_default().apply(event);
    }
    for row in rows.values() {
        overview::count(moved.entry(row.tenant_id.clone()).or_default(), row, 1);
    }
    Ok((rows, moved))
}

/// Per tenant, Overview counts (see [`overview::tally`]).
pub type TenantCounts = BTreeMap<String, Counts>;

/// Adds `moved` to the tenants' stored Overview counts (those that moved at
/// all), in key order, so two batches never wait on each other's rows.
pub async fn add_counts(tx: &mut PgConnection, moved: &TenantCounts) -> anyhow::Result<()> {
    if moved.values().all(|c| c.values().all(|v| *v == 0)) {
        return Ok(());
    }
    let sql = counts_upsert_sql(1);
    bind_counts(sqlx::query(&sql), moved)
        .execute(&mut *tx)
        .await
        .context("moving the Overview counts")?;
    Ok(())
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Parameters of [`counts_upsert_sql`].
const COUNT_PARAMS: usize = 3;

/// The upsert that adds to the Overview counts, its parameters from `$n`
/// (bound by [`bind_counts`]).
fn counts_upsert_sql(n: usize) -> String {
    let p = params(n, COUNT_PARAMS);
    format!(
        "INSERT INTO rm_overview_counts AS c (tenant_id, key, value) \
         SELECT * FROM unnest({}::text[], {}::text[], {}::bigint[]) ORDER BY 1, 2 \
         ON CONFLICT (tenant_id, key) DO UPDATE SET value = c.value + EXCLUDED.value",
        p[0], p[1], p[2]
    )
}

/// `$n`, `$n+1`, ...: `count` statement parameters from `$n`.
fn params(n: usize, count: usize) -> Vec<String> {
    (n..n + count).map(|i| format!("${i}")).collect()
}

fn bind_counts<'q>(query: Query<'q>, moved: &TenantCounts) -> Query<'q> {
    let mut tenants = Vec::new();
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for (tenant, counts) in moved {
        for (key, value) in counts.iter().filter(|(_, v)| **v != 0) {
            tenants.push(tenant.clone());
            keys.push(key.clone());
            values.push(*value);
        }
    }
    query.bind(tenants).bind(keys).bind(values)
}

pub fn two_factor_str(row: &UserRow) -> &'static str {
    match row.status() {
        twofold_domain::user::TwoFactorState::NotStarted => "not_started",
        twofold_domain::user::TwoFactorState::Pending => "pending",
        twofold_domain::user::TwoFactorState::Enrolled => "enrolled",
    }
}

/// Parameters of [`audit_insert_sql`].
const AUDIT_PARAMS: usize = 14;

/// The insert of audit entries (those not there yet), its parameters from
/// `$n` (bound by [`bind_audit`]).
fn audit_insert_sql(n: usize) -> String {
    let p = params(n, AUDIT_PARAMS);
    format!(
        "INSERT INTO rm_audit (position, tenant_id, aggregate_type, aggregate_id, sequence, event_type, at, \
           actor_kind, actor_id, ip, user_agent, reason, user_id, details) \
         SELECT p, t, ty, a, s, e, at, k, ai, ip, ua, r, u, d::json FROM UNNEST({}::bigint[], {}::text[], \
           {}::text[], {}::text[], {}::bigint[], {}::text[], {}::timestamptz[], {}::text[], {}::text[], \
           {}::text[], {}::text[], {}::text[], {}::text[], {}::text[]) \
           AS x(p, t, ty, a, s, e, at, k, ai, ip, ua, r, u, d) \
         ON CONFLICT (position) DO NOTHING",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13]
    )
}

fn bind_audit<'q>(query: Query<'q>, entries: &[AuditEntry]) -> anyhow::Result<Query<'q>> {
    let col = |f: fn(&AuditEntry) -> Option<String>| entries.iter().map(f).collect::<Vec<_>>();
    let details = entries
        .iter()
        .map(|e| serde_json::to_string(&e.details))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(query
        .bind(entries.iter().map(|e| e.position).collect::<Vec<_>>())
        .bind(col(|e| Some(e.tenant_id.clone())))
        .bind(col(|e| Some(e.aggregate_type.clone())))
        .bind(col(|e| Some(e.aggregate_id.clone())))
        .bind(entries.iter().map(|e| e.sequence).collect::<Vec<_>>())
        .bind(col(|e| Some(e.event_type.clone())))
        .bind(entries.iter().map(|e| e.at).collect::<Vec<_>>())
        .bind(col(|e| Some(e.actor_kind.clone())))
        .bind(col(|e| e.actor_id.clone()))
        .bind(col(|e| e.ip.clone()))
        .bind(col(|e| e.user_agent.clone()))
        .bind(col(|e| e.reason.clone()))
        .bind(col(|e| e.user_id.clone()))
        // As text, written as the rebuild's COPY writes it: the same bytes either way.
        .bind(details))
}

/// The rebuild's bulk path: one `COPY rm_audit ... (FORMAT binary)` for all
/// the entries, encoded straight into one reused buffer and sent in chunks,
/// so PostgreSQL ingests while the next rows are encoded. Binary rather than
/// CSV: no quoting of every field and of the details' JSON, and PostgreSQL
/// reads numbers and times without parsing text. The stored values are those
/// the live path's `bind_audit` binds: `details` is exactly
/// `serde_json::to_string(&entry.details)` (a `json` value's binary form is
/// its text, kept verbatim), `at` whole microseconds.
pub struct AuditCopy<'c> {
    copy: sqlx::postgres::PgCopyIn<&'c mut PgConnection>,
    buf: Vec<u8>,
}

/// What [`AuditCopy`] sends at once: large enough that a message is cheap,
/// small enough that PostgreSQL starts on a batch before it is all encoded.
const COPY_CHUNK: usize = 256 * 1024;

/// 2000-01-01T00:00:00Z, PostgreSQL's epoch for times in binary form, in
/// microseconds since the Unix epoch.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl<'c> AuditCopy<'c> {
    pub async fn start(conn: &'c mut PgConnection) -> anyhow::Result<Self> {
        let copy = conn
            .copy_in_raw(
                "COPY rm_audit (position, tenant_id, aggregate_type, aggregate_id, sequence, event_type, at, \
                   actor_kind, actor_id, ip, user_agent, reason, user_id, details) FROM STDIN WITH (FORMAT binary)",
            )
            .await?;
        let mut buf = Vec::with_capacity(COPY_CHUNK + 64 * 1024);
        // Signature, flags, no header extension.
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        Ok(Self { copy, buf })
    }

    pub async fn write(&mut self, entries: &[AuditEntry]) -> anyhow::Result<()> {
        for e in entries {
            self.encode(e)?;
            if self.buf.len() >= COPY_CHUNK {
                self.copy.send(self.buf.as_slice()).await?;
                self.buf.clear();
            }
        }
        Ok(())
    }

    pub async fn finish(mut self) -> anyhow::Result<()> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.copy.send(self.buf.as_slice()).await?;
        self.copy.finish().await?;
        Ok(())
    }

    fn encode(&mut self, e: &AuditEntry) -> anyhow::Result<()> {
        let buf = &mut self.buf;
        buf.extend_from_slice(&14i16.to_be_bytes());
        put_i64(buf, e.position);
        put_text(buf, &e.tenant_id)?;
        put_text(buf, &e.aggregate_type)?;
        put_text(buf, &e.aggregate_id)?;
        put_i64(buf, e.sequence);
        put_text(buf, &e.event_type)?;
        put_i64(buf, e.at.timestamp_micros() - PG_EPOCH_MICROS);
        put_text(buf, &e.actor_kind)?;
        for field in [&e.actor_id, &e.ip, &e.user_agent, &e.reason, &e.user_id] {
            match field {
                Some(s) => put_text(buf, s)?,
                None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        // The length goes before the JSON, known once it is written.
        let at = buf.len();
        buf.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut *buf, &e.details)?;
        let len = field_len(buf.len() - at - 4)?;
        buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

fn field_len(len: usize) -> anyhow::Result<i32> {
    i32::try_from(len).context("an audit field longer than COPY takes")
}

fn put_i64(buf: &mut Vec<u8>, value: i64) {
    buf.extend_from_slice(&8i32.to_be_bytes());
    buf.extend_from_slice(&value.to_be_bytes());
}

fn put_text(buf: &mut Vec<u8>, text: &str) -> anyhow::Result<()> {
    buf.extend_from_slice(&field_len(text.len())?.to_be_bytes());
    buf.extend_from_slice(text.as_bytes());
    Ok(())
}

/// Inserts many directory rows at once (the rebuild's bulk path; a live
/// batch writes its rows with [`BatchWrite`]).
pub async fn write_users(tx: &mut PgConnection, rows: &[&UserRow]) -> anyhow::Result<()> {
    let sql = users_insert_sql(1, false);
    for chunk in rows.chunks(5_000) {
        bind_users(sqlx::query(&sql), chunk)?
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Parameters of [`users_insert_sql`].
const USER_PARAMS: usize = 11;

/// The insert of directory rows, its parameters from `$n` (bound by
/// [`bind_users`]); with `replace`, a row already there is replaced.
fn users_insert_sql(n: usize, replace: bool) -> String {
    let p = params(n, USER_PARAMS);
    let on_conflict = if replace {
        " ON CONFLICT (user_id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, username = EXCLUDED.username, \
           two_factor = EXCLUDED.two_factor, locked = EXCLUDED.locked, service_account = EXCLUDED.service_account, \
           roles = EXCLUDED.roles, methods = EXCLUDED.methods, last_sign_in_at = EXCLUDED.last_sign_in_at, row = EXCLUDED.row, \
           enrolled_at = EXCLUDED.enrolled_at"
    } else {
        ""
    };
    format!(
        "INSERT INTO rm_users (user_id, tenant_id, username, two_factor, locked, service_account, roles, methods, last_sign_in_at, row, enrolled_at) \
         SELECT u, t, n, f, l, s, ARRAY(SELECT jsonb_array_elements_text(r)), ARRAY(SELECT jsonb_array_elements_text(m)), a, w, e \
         FROM UNNEST({}::text[], {}::text[], {}::text[], {}::text[], {}::boolean[], {}::boolean[], {}::jsonb[], {}::jsonb[], {}::timestamptz[], {}::jsonb[], {}::timestamptz[]) \
           AS x(u, t, n, f, l, s, r, m, a, w, e){on_conflict}",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10]
    )
}

fn bind_users<'q>(query: Query<'q>, rows: &[&UserRow]) -> anyhow::Result<Query<'q>> {
    Ok(query
        .bind(rows.iter().map(|r| r.user_id.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.tenant_id.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.username.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| two_factor_str(r)).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.locked).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.service_account).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| serde_json::json!(r.roles))
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| serde_json::json!(r.methods()))
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.last_sign_in.as_ref().map(|l| l.at))
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(serde_json::to_value)
                .collect::<Result<Vec<_>, _>>()?,
        )
        .bind(rows.iter().map(|r| r.enrolled_at).collect::<Vec<_>>()))
}
