//! The audit history: every event of a tenant as a timeline entry (time,
//! actor, IP, reason, what happened), searchable, and exported as NDJSON or
//! CSV with a hash chain and a trailer signed by the server's audit key, so an
//! auditor can tell whether an export is complete, unaltered and from this
//! server (`twofold audit verify --public-key`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use twofold_domain::Ctx;
use twofold_platform::audit_signing::{AuditSigner, VerifyingKeys, ALGORITHM};
use twofold_platform::json::push_str_field;
use twofold_platform::personal::{holds_sealed, Keys, Personal, SEALED_PREFIX};

use crate::queries::AuditQuery;
use crate::record::{EventRecord, RecordExt};

/// Payload fields that hold hashes or sealed secrets: not secrets in plaintext,
/// but nothing an auditor needs, so they stay out of the history.
const WITHHELD: &[&str] = &["token_hash", "password_hash", "sealed", "hashes", "hash"];

/// One entry of the history. Field order is the canonical form the hash
/// chain is computed over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub position: i64,
    pub tenant_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub at: DateTime<Utc>,
    pub actor_kind: String,
    pub actor_id: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub reason: Option<String>,
    /// The user the event is about, when it is about one.
    pub user_id: Option<String>,
    pub details: Value,
}

impl AuditEntry {
    pub fn from_record(record: &EventRecord) -> Option<Self> {
        let tenant_id = record.owning_tenant()?;
        let payload: Map<String, Value> =
            serde_json::from_str(record.payload.get()).unwrap_or_default();
        // The event's fields become its details in place: moved out of the
        // parsed payload rather than copied (a rebuild makes a million).
        let mut details = match payload.into_iter().next() {
            Some((_, Value::Object(inner))) => inner,
            _ => Map::new(),
        };
        let user_id = match record.aggregate_type.as_str() {
            "user" => Some(record.aggregate_id.clone()),
            _ => details
                .get("user_id")
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        let ctx = details.remove("ctx").and_then(|c| Ctx::deserialize(c).ok());
        if let Some(Value::Array(list)) = details.remove("hashes") {
            // Say how many codes were issued, not their hashes.
            details.insert("count".into(), Value::from(list.len()));
        }
        for withheld in WITHHELD {
            details.remove(*withheld);
        }
        // A session an admin opened as the user (Login As) names the admin.
        if let Some(admin) = ctx.as_ref().and_then(|c| c.impersonated_by) {
            details.insert("impersonated_by".into(), Value::from(admin.to_string()));
        }
        let (actor_kind, actor_id) = match ctx.as_ref() {
            Some(c) => actor_fields(&c.actor),
            None => ("system", None),
        };
        let (at, ip, user_agent, reason) = match ctx {
            Some(c) => (c.at, c.ip, c.user_agent, c.reason),
            None => (record.recorded_at, None, None, None),
        };
        Some(Self {
            position: record.global_position,
            tenant_id,
            aggregate_type: record.aggregate_type.clone(),
            aggregate_id: record.aggregate_id.clone(),
            sequence: record.sequence,
            event_type: record.event_type.clone(),
            at,
            actor_kind: actor_kind.to_string(),
            actor_id,
            ip,
            user_agent,
            reason,
            user_id,
            details: Value::Object(details),
        })
    }

    /// The data keys the entry's sealed values name.
    pub fn key_ids(&self) -> Vec<String> {
        let details = self.details.to_string();
        let entry = EntryRef::of(self, &details);
        entry.key_ids().into_iter().map(str::to_string).collect()
    }

    /// The entry as shown: its personal data opened with `keys`, or
    /// `[erased]` where the key is gone.
    pub fn open(&mut self, keys: &Keys) {
        for v in [&mut self.ip, &mut self.user_agent].into_iter().flatten() {
            *v = Personal::open_str(v, keys);
        }
        Personal::open_value(&mut self.details, keys);
    }
}

/// An actor's `kind` and `id`, as it serializes (read off the enum rather
/// than through a JSON value: a rebuild does this a million times).
fn actor_fields(actor: &twofold_domain::Actor) -> (&'static str, Option<String>) {
    use twofold_domain::Actor;
    match actor {
        Actor::User(id) => ("user", Some(id.to_string())),
        Actor::Admin(id) => ("admin", Some(id.to_string())),
        Actor::Operator => ("operator", None),
        Actor::System => ("system", None),
    }
}

/// An entry as an export reads it: borrowed from its database row (the
/// columns of [`ENTRY_COLUMNS`], by index), with `details` as the JSON text
/// the row holds. Every writer of the history stores serde_json's text of
/// an entry's details (`bind_audit`, `AuditCopy`), which is what
/// [`AuditEntry`] serializes them as, so an export hashes and writes that
/// text as it is instead of parsing it only to write it again; a row whose
/// text was altered in the database hashes differently, as any altered
/// value does.
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    pub position: i64,
    pub tenant_id: &'a str,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    pub at: DateTime<Utc>,
    pub actor_kind: &'a str,
    pub actor_id: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub user_id: Option<&'a str>,
    /// The details as JSON text.
    pub details: &'a str,
}

impl<'a> EntryRef<'a> {
    /// The entry of a row of [`ENTRY_COLUMNS`], read by index (by name,
    /// each column is a lookup per row), with or without checking each
    /// column's type (see [`EntryRows`]).
    fn decode(row: &'a sqlx::postgres::PgRow, check: bool) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        macro_rules! column {
            ($i:expr) => {
                if check {
                    row.try_get($i)?
                } else {
                    row.try_get_unchecked($i)?
                }
            };
        }
        Ok(Self {
            position: column!(0),
            tenant_id: column!(1),
            aggregate_type: column!(2),
            aggregate_id: column!(3),
            sequence: column!(4),
            event_type: column!(5),
            at: column!(6),
            actor_kind: column!(7),
            actor_id: column!(8),
            ip: column!(9),
            user_agent: column!(10),
            reason: column!(11),
            user_id: column!(12),
            // A `json` column's value is its text, in either wire format.
            details: row.try_get_unchecked(13)?,
        })
    }

    /// The entry with its details as stored in `details` (their text).
    fn of(entry: &'a AuditEntry, details: &'a str) -> Self {
        Self {
            position: entry.position,
            tenant_id: &entry.tenant_id,
            aggregate_type: &entry.aggregate_type,
            aggregate_id: &entry.aggregate_id,
            sequence: entry.sequence,
            event_type: &entry.event_type,
            at: entry.at,
            actor_kind: &entry.actor_kind,
            actor_id: entry.actor_id.as_deref(),
            ip: entry.ip.as_deref(),
            user_agent: entry.user_agent.as_deref(),
            reason: entry.reason.as_deref(),
            user_id: entry.user_id.as_deref(),
            details,
        }
    }

    /// Appends the entry's canonical JSON to `out`: the bytes serde writes
    /// for the [`AuditEntry`], fields in its order.
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        use twofold_platform::json::{push_field, push_raw_field, push_time_field};
        push_field(out, true, "position", &self.position)?;
        push_str_field(out, false, "tenant_id", self.tenant_id)?;
        push_str_field(out, false, "aggregate_type", self.aggregate_type)?;
        push_str_field(out, false, "aggregate_id", self.aggregate_id)?;
        push_field(out, false, "sequence", &self.sequence)?;
        push_str_field(out, false, "event_type", self.event_type)?;
        push_time_field(out, false, "at", &self.at)?;
        push_str_field(out, false, "actor_kind", self.actor_kind)?;
        push_str_field(out, false, "actor_id", self.actor_id)?;
        push_str_field(out, false, "ip", self.ip)?;
        push_str_field(out, false, "user_agent", self.user_agent)?;
        push_str_field(out, false, "reason", self.reason)?;
        push_str_field(out, false, "user_id", self.user_id)?;
        push_raw_field(out, false, "details", self.details);
        out.push(b'}');
        Ok(())
    }

    /// Whether the entry holds sealed personal data: its IP or user agent
    /// is sealed, or a key or string of its details holds the sealed prefix
    /// (which a search of the details' JSON text finds: the prefix has no
    /// character JSON escapes).
    pub fn is_sealed(&self) -> bool {
        self.fields_sealed() || holds_sealed(self.details)
    }

    /// Whether its IP or user agent is sealed.
    fn fields_sealed(&self) -> bool {
        [self.ip, self.user_agent]
            .into_iter()
            .flatten()
            .any(|v| v.starts_with(SEALED_PREFIX))
    }

    /// The data keys the entry's sealed values name, as the row holds them.
    pub fn key_ids(&self) -> Vec<&'a str> {
        let mut ids: Vec<&'a str> = [Some(self.details), self.ip, self.user_agent]
            .into_iter()
            .flatten()
            .flat_map(Personal::key_ids_in)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// What an export shows beside a sealed entry, as JSON text: its IP,
    /// user agent and details opened (`{details, ip, user_agent}`); the
    /// details are parsed only when they hold sealed values.
    pub fn opened(&self, keys: &Keys) -> anyhow::Result<Option<Vec<u8>>> {
        // The details searched once, for both questions.
        let details_sealed = holds_sealed(self.details);
        if !details_sealed && !self.fields_sealed() {
            return Ok(None);
        }
        let open = |v: Option<&str>| v.map(|v| Personal::open_str(v, keys));
        // Keys in sorted order, as serde_json writes a map.
        let mut out = Vec::with_capacity(self.details.len() + 192);
        out.extend_from_slice(b"{\"details\":");
        if details_sealed {
            let mut details: Value = serde_json::from_str(self.details)?;
            Personal::open_value(&mut details, keys);
            serde_json::to_writer(&mut out, &details)?;
        } else {
            out.extend_from_slice(self.details.as_bytes());
        }
        push_str_field(&mut out, false, "ip", open(self.ip).as_deref())?;
        push_str_field(
            &mut out,
            false,
            "user_agent",
            open(self.user_agent).as_deref(),
        )?;
        out.push(b'}');
        Ok(Some(out))
    }
}

/// The chain's start: the hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where a tenant's audit history was pruned up to by its retention setting
/// (`audit_retention_days`): the entries up to `position` left the read
/// models; `count` of them, the chain's hash `head` at the last one. Always
/// the place of a signed checkpoint (signed at `signed_at`), so the head an
/// unfiltered export starts from after pruning is one the server signed
/// before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Pruned {
    pub position: i64,
    pub count: i64,
    pub head: String,
    pub signed_at: DateTime<Utc>,
}

/// Reads one answer's rows as entries, checking the columns' types on its
/// first row only: every row of an answer shares that answer's columns (one
/// row description), and checking thirteen types again on every row was a
/// tenth of the verifier's CPU in a tenant-wide export, to find nothing new.
#[derive(Debug, Default)]
pub struct EntryRows {
    checked: bool,
}

impl EntryRows {
    /// The entry of the answer's next row.
    pub fn entry<'r>(
        &mut self,
        row: &'r sqlx::postgres::PgRow,
    ) -> Result<EntryRef<'r>, sqlx::Error> {
        let entry = EntryRef::decode(row, !self.checked)?;
        self.checked = true;
        Ok(entry)
    }
}

/// The columns an [`AuditEntry`] is read from.
pub const ENTRY_COLUMNS: &str = "position, tenant_id, aggregate_type, aggregate_id, sequence, \
     event_type, at, actor_kind, actor_id, ip, user_agent, reason, user_id, details";

/// `tenant`'s audit entries after position `after` up to `upto`, in chain
/// (position) order: what a checkpoint pass extends the chain over and what
/// a pruning checks against the checkpoint it prunes up to.
pub fn entries_between<'e>(
    conn: &'e mut sqlx::PgConnection,
    tenant: &'e str,
    after: i64,
    upto: i64,
) -> futures::stream::BoxStream<'e, Result<AuditEntry, sqlx::Error>> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT {ENTRY_COLUMNS} FROM rm_audit \
             WHERE tenant_id = $1 AND position > $2 AND position <= $3 ORDER BY position"
        )
    });
    sqlx::query_as::<_, AuditEntry>(SQL.as_str())
        .bind(tenant)
        .bind(after)
        .bind(upto)
        .fetch(conn)
}

/// Links `entry` to the chain ending in `prev`.
pub fn chain(prev: &str, entry: &AuditEntry) -> anyhow::Result<String> {
    let hash = link(prev, &serde_json::to_vec(entry)?)?;
    Ok(std::str::from_utf8(&hash)?.to_string())
}

/// The hash (hex) linking an entry, as its canonical JSON, to the chain
/// ending in `prev`.
fn link(prev: &str, canonical: &[u8]) -> anyhow::Result<[u8; 64]> {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(canonical);
    let mut hash = [0u8; 64];
    hex::encode_to_slice(h.finalize(), &mut hash)?;
    Ok(hash)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Ndjson,
    Csv,
}

/// The version of the trailer's signed fields (part of what is signed).
pub const TRAILER_VERSION: u32 = 1;

/// What an export was asked for, as given (times as RFC 3339): its trailer
/// signs it, so an export cannot pass for one of a wider query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportFilter {
    pub event_type: Option<String>,
    pub user_id: Option<String>,
    pub actor: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

impl From<&AuditQuery> for ExportFilter {
    fn from(q: &AuditQuery) -> Self {
        let time = |t: &Option<DateTime<Utc>>| {
            t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        };
        Self {
            event_type: q.event_type.clone(),
            user_id: q.user_id.clone(),
            actor: q.actor.clone(),
            from: time(&q.from),
            to: time(&q.to),
        }
    }
}

/// Entries' lines made ready apart from the chain, on any thread and in any
/// order: each entry's canonical JSON (what the chain hashes) and its line
/// but for the chain's `prev` and `hash`. [`Exporter::write_prepared`] then
/// links them in order, which is all an export's work that must go one
/// entry after another.
#[derive(Debug)]
pub struct Prepared {
    format: Format,
    /// Every entry's parts, one after another.
    bytes: Vec<u8>,
    lines: Vec<PreparedLine>,
}

/// Where one entry's parts are in [`Prepared::bytes`].
#[derive(Debug)]
struct PreparedLine {
    position: i64,
    canonical: std::ops::Range<usize>,
    /// The line before `prev`: NDJSON's is the canonical JSON but its
    /// closing brace.
    head: std::ops::Range<usize>,
    /// NDJSON's line after `hash` (`opened` when there is one), less its
    /// closing brace.
    rest: std::ops::Range<usize>,
}

impl Prepared {
    /// Room for about `entries` of `format`'s lines.
    pub fn new(format: Format, entries: usize) -> Self {
        Self {
            format,
            bytes: Vec::with_capacity(entries * 1024),
            lines: Vec::with_capacity(entries),
        }
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Adds `entry`'s parts, with `opened` (JSON text) beside it in NDJSON.
    pub fn push(&mut self, entry: &EntryRef<'_>, opened: Option<&[u8]>) -> anyhow::Result<()> {
        let start = self.bytes.len();
        entry.write_json(&mut self.bytes)?;
        let canonical = start..self.bytes.len();
        let (head, rest) = match self.format {
            Format::Ndjson => {
                if self.bytes.last() != Some(&b'}') {
                    bail!("an entry's JSON is not an object");
                }
                let head = start..self.bytes.len() - 1;
                let at = self.bytes.len();
                if let Some(opened) = opened {
                    self.bytes.extend_from_slice(b",\"opened\":");
                    self.bytes.extend_from_slice(opened);
                }
                (head, at..self.bytes.len())
            }
            Format::Csv => {
                let at = self.bytes.len();
                csv_cells(
                    [
                        Some(entry.position.to_string().as_str()),
                        Some(entry.tenant_id),
                        Some(entry.aggregate_type),
                        Some(entry.aggregate_id),
                        Some(&entry.sequence.to_string()),
                        Some(entry.event_type),
                        Some(
                            &entry
                                .at
                                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                        ),
                        Some(entry.actor_kind),
                        entry.actor_id,
                        entry.ip,
                        entry.user_agent,
                        entry.reason,
                        entry.user_id,
                        Some(entry.details),
                    ],
                    false,
                    &mut self.bytes,
                )?;
                let end = self.bytes.len();
                (at..end, end..end)
            }
        };
        self.lines.push(PreparedLine {
            position: entry.position,
            canonical,
            head,
            rest,
        });
        Ok(())
    }
}

/// Writes entries one by one, carrying the chain along.
pub struct Exporter {
    format: Format,
    prev: String,
    count: u64,
    tenant_id: String,
    filter: ExportFilter,
    first_position: Option<i64>,
    last_position: Option<i64>,
    pruned: Option<Pruned>,
}

#[derive(Serialize, Deserialize)]
struct NdjsonLine {
    #[serde(flatten)]
    entry: AuditEntry,
    prev: String,
    hash: String,
    /// The entry's personal data opened (or `[erased]`), beside the sealed
    /// form the hash is over; not part of the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    opened: Option<Value>,
}

#[derive(Serialize, Deserialize)]
struct Trailer {
    trailer: TrailerBody,
}

/// The closing line. Exports from before signing carry only `count` and
/// `head`; they verify without `--public-key` and never with one.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrailerBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tenant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    filter: Option<ExportFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    first_position: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_position: Option<i64>,
    /// Where the tenant's history was pruned up to when this was exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pruned: Option<Pruned>,
    count: u64,
    head: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    algorithm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
}

/// The fields a trailer's signature covers, in this order.
#[derive(Serialize)]
struct SignedFields<'a> {
    version: u32,
    tenant_id: &'a str,
    filter: &'a ExportFilter,
    first_position: Option<i64>,
    last_position: Option<i64>,
    /// Signed only when there is one, so exports from before retention
    /// verify as they did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pruned: Option<&'a Pruned>,
    count: u64,
    head: &'a str,
}

/// The canonical bytes a trailer's signature is over: a fixed label line,
/// then the signed fields as compact JSON (fixed field order, JSON string
/// escaping, so no two different trailers give the same bytes).
fn signed_message(fields: &SignedFields<'_>) -> anyhow::Result<Vec<u8>> {
    let mut message = b"twofold audit export\n".to_vec();
    serde_json::to_writer(&mut message, fields)?;
    Ok(message)
}

pub const CSV_HEADER: &str = "position,tenant_id,aggregate_type,aggregate_id,sequence,event_type,at,actor_kind,actor_id,ip,user_agent,reason,user_id,details,prev,hash\n";

/// A cell a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab,
/// carriage return; OWASP's CSV injection list) is written with a leading
/// `'`, and so is one that starts with `'` itself, so [`unguard`] restores
/// every value exactly and the hash chain still verifies. An empty value is
/// written as a lone `'` too: an empty cell stands for no value (`null`),
/// which CSV could not otherwise tell from an empty string.
fn guard(cell: &str) -> std::borrow::Cow<'_, str> {
    match cell.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r' | '\'') | None => format!("'{cell}").into(),
        _ => cell.into(),
    }
}

/// The value a guarded cell stands for.
fn unguard(cell: &str) -> &str {
    cell.strip_prefix('\'').unwrap_or(cell)
}

/// One CSV record (quoted only where needed, guarded against spreadsheet
/// formulas), newline-terminated; an empty field is an empty cell.
fn csv_line(fields: &[&str]) -> anyhow::Result<String> {
    let mut out = Vec::new();
    csv_record(
        fields.iter().map(|f| (!f.is_empty()).then_some(*f)),
        &mut out,
    )?;
    Ok(String::from_utf8(out)?)
}

/// One CSV record appended to `out`: a field that is `None` as an empty
/// cell, a value [`guard`]ed (so an empty string is a lone `'`). The bytes
/// the csv crate's writer gives, written by the same state machine without
/// a writer and its buffer per record.
fn csv_record<'a>(
    fields: impl IntoIterator<Item = Option<&'a str>>,
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    csv_cells(fields, true, out)
}

/// [`csv_record`]'s cells, ended by the record's terminator (`end`) or by a
/// delimiter, for the record's other cells to follow: each cell is written
/// on its own, so a record written in parts is the record written at once.
fn csv_cells<'a>(
    fields: impl IntoIterator<Item = Option<&'a str>>,
    end: bool,
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    use csv_core::WriteResult;
    let mut writer = csv_core::WriterBuilder::new()
        .terminator(csv_core::Terminator::Any(b'\n'))
        .build();
    // Makes room for `room` bytes at the end of `out`, calls `write` on it
    // and keeps what it wrote. Each call below is given the most it can
    // write (a field: every byte a doubled quote, and the quotes around it).
    let mut append = |room: usize, write: &mut dyn FnMut(&mut [u8]) -> (WriteResult, usize)| {
        let at = out.len();
        out.resize(at + room, 0);
        let (result, written) = write(&mut out[at..]);
        out.truncate(at + written);
        match result {
            WriteResult::InputEmpty => Ok(()),
            WriteResult::OutputFull => Err(anyhow!("a CSV record outgrew the room made for it")),
        }
    };
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            append(2, &mut |o| writer.delimiter(o))?;
        }
        let field = field.map(guard).unwrap_or_default();
        append(2 * field.len() + 2, &mut |o| {
            let (result, _, written) = writer.field(field.as_bytes(), o);
            (result, written)
        })?;
    }
    match end {
        true => append(4, &mut |o| writer.terminator(o)),
        false => append(2, &mut |o| writer.delimiter(o)),
    }
}

impl Exporter {
    /// An export of `tenant_id`'s entries matching `filter`.
    pub fn new(format: Format, tenant_id: &str, filter: ExportFilter) -> Self {
        Self::after_pruning(format, tenant_id, filter, None)
    }

    /// An export of a history pruned up to `pruned` (see [`Pruned`]): the
    /// trailer names the mark, and an unfiltered export's chain goes on from
    /// the pruned head (a filtered one's starts from 64 zeros as ever).
    pub fn after_pruning(
        format: Format,
        tenant_id: &str,
        filter: ExportFilter,
        pruned: Option<Pruned>,
    ) -> Self {
        let prev = match &pruned {
            Some(p) if filter == ExportFilter::default() => p.head.clone(),
            _ => GENESIS.to_string(),
        };
        Self {
            format,
            prev,
            count: 0,
            tenant_id: tenant_id.to_string(),
            filter,
            first_position: None,
            last_position: None,
            pruned,
        }
    }

    /// Whether the lines show personal data opened beside the sealed form
    /// (NDJSON; CSV shows the sealed form only), so whether an exporter's
    /// caller need open it.
    pub fn shows_opened(&self) -> bool {
        self.format == Format::Ndjson
    }

    pub fn header(&self) -> String {
        match self.format {
            Format::Ndjson => String::new(),
            Format::Csv => CSV_HEADER.to_string(),
        }
    }

    pub fn line(&mut self, entry: AuditEntry) -> anyhow::Result<String> {
        self.line_opened(entry, None)
    }

    /// [`Exporter::line`], with the entry's personal data opened beside it
    /// (NDJSON only; CSV shows the sealed form the hash is over).
    pub fn line_opened(
        &mut self,
        entry: AuditEntry,
        opened: Option<Value>,
    ) -> anyhow::Result<String> {
        let mut out = Vec::new();
        self.write_line(&entry, opened.as_ref(), &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    /// [`Exporter::line_opened`], appended to `out`.
    pub fn write_line(
        &mut self,
        entry: &AuditEntry,
        opened: Option<&Value>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        let details = serde_json::to_string(&entry.details)?;
        let opened = opened.map(serde_json::to_vec).transpose()?;
        self.write_entry(&EntryRef::of(entry, &details), opened.as_deref(), out)
    }

    /// Appends `entry`'s line to `out`, with `opened` (JSON text) beside it
    /// in NDJSON.
    pub fn write_entry(
        &mut self,
        entry: &EntryRef<'_>,
        opened: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        let mut prepared = Prepared::new(self.format, 1);
        prepared.push(entry, opened)?;
        self.write_prepared(&prepared, out)
    }

    /// Appends the lines of `prepared` to `out`, in its order, carrying the
    /// chain along: what is left of writing an entry once its line is
    /// prepared (one hash, and copying).
    pub fn write_prepared(&mut self, prepared: &Prepared, out: &mut Vec<u8>) -> anyhow::Result<()> {
        for i in 0..prepared.len() {
            self.write_prepared_one(prepared, i, out)?;
        }
        Ok(())
    }

    /// [`Exporter::write_prepared`] for the `i`th entry of `prepared` alone,
    /// for a caller sending `out` on as it fills.
    pub fn write_prepared_one(
        &mut self,
        prepared: &Prepared,
        i: usize,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        if prepared.format != self.format {
            bail!("an entry prepared for another format");
        }
        let line = prepared.lines.get(i).context("no such prepared entry")?;
        let bytes = |range: &std::ops::Range<usize>| &prepared.bytes[range.clone()];
        let hash = link(&self.prev, bytes(&line.canonical))?;
        let hash = std::str::from_utf8(&hash)?;
        out.extend_from_slice(bytes(&line.head));
        match self.format {
            Format::Ndjson => {
                // An `NdjsonLine`: the entry's fields, then `prev`, `hash`
                // and `opened`, as serde writes the flattened struct.
                out.extend_from_slice(b",\"prev\":");
                serde_json::to_writer(&mut *out, &self.prev)?;
                out.extend_from_slice(b",\"hash\":");
                serde_json::to_writer(&mut *out, hash)?;
                out.extend_from_slice(bytes(&line.rest));
                out.extend_from_slice(b"}\n");
            }
            Format::Csv => csv_cells([Some(self.prev.as_str()), Some(hash)], true, out)?,
        }
        self.prev.clear();
        self.prev.push_str(hash);
        self.count += 1;
        self.first_position.get_or_insert(line.position);
        self.last_position = Some(line.position);
        Ok(())
    }

    /// The closing line: the tenant, the filter, the first and last
    /// position, how many entries and the chain's head, signed with the
    /// current audit key, so a cut-off, re-trailed or forged export is told
    /// from a complete one.
    pub fn trailer(&self, signer: &AuditSigner) -> anyhow::Result<String> {
        let fields = SignedFields {
            version: TRAILER_VERSION,
            tenant_id: &self.tenant_id,
            filter: &self.filter,
            first_position: self.first_position,
            last_position: self.last_position,
            pruned: self.pruned.as_ref(),
            count: self.count,
            head: &self.prev,
        };
        let signed = signer.sign(&signed_message(&fields)?);
        Ok(match self.format {
            Format::Ndjson => {
                let mut s = serde_json::to_string(&Trailer {
                    trailer: TrailerBody {
                        version: Some(TRAILER_VERSION),
                        tenant_id: Some(self.tenant_id.clone()),
                        filter: Some(self.filter.clone()),
                        first_position: self.first_position,
                        last_position: self.last_position,
                        pruned: self.pruned.clone(),
                        count: self.count,
                        head: self.prev.clone(),
                        key_id: Some(signed.key_id),
                        algorithm: Some(ALGORITHM.to_string()),
                        signature: Some(signed.signature),
                    },
                })?;
                s.push('\n');
                s
            }
            Format::Csv => {
                let position = |p: Option<i64>| p.map(|p| p.to_string()).unwrap_or_default();
                let mut cells = vec![
                    "#trailer".to_string(),
                    self.count.to_string(),
                    self.prev.clone(),
                    TRAILER_VERSION.to_string(),
                    self.tenant_id.clone(),
                    serde_json::to_string(&self.filter)?,
                    position(self.first_position),
                    position(self.last_position),
                    signed.key_id,
                    ALGORITHM.to_string(),
                    signed.signature,
                ];
                cells.extend(
                    self.pruned
                        .as_ref()
                        .map(serde_json::to_string)
                        .transpose()?,
                );
                csv_line(&cells.iter().map(String::as_str).collect::<Vec<_>>())?
            }
        })
    }
}

/// The columns of a CSV trailer row: `#trailer`, count, head, then the
/// signed fields (version, tenant_id, filter as JSON, first and last
/// position), key_id, algorithm, signature; and, after a pruning, the
/// pruned mark as JSON.
const CSV_TRAILER_COLUMNS: usize = 11;

/// What `twofold audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub head: String,
    pub first_position: Option<i64>,
    pub last_position: Option<i64>,
    /// What the trailer names (none in an export from before signing).
    pub tenant_id: Option<String>,
    pub filter: Option<ExportFilter>,
    /// The key the trailer names as its signer.
    pub key_id: Option<String>,
    /// Whether the signature was checked against the keys given (and matched).
    pub signature_checked: bool,
    /// Where the tenant's history was pruned up to when it was exported
    /// (the trailer names it).
    pub pruned: Option<Pruned>,
    /// For [`verify_extends`] and checkpoints: per watched position, how
    /// many entries up to it and the chain's hash there.
    watched: BTreeMap<i64, (u64, String)>,
}

impl Verified {
    /// How many entries of the chain up to `position` (counting those
    /// pruned before the export, whose chain it goes on from) and the
    /// chain's hash there, when the export has an entry at `position` and
    /// it was watched ([`verify_watching`]).
    pub fn at(&self, position: i64) -> Option<(u64, &str)> {
        self.watched
            .get(&position)
            .map(|(count, hash)| (count + self.before(), hash.as_str()))
    }

    /// The mark the export's chain starts from: an unfiltered export's
    /// after a pruning.
    pub fn chain_start(&self) -> Option<&Pruned> {
        self.pruned
            .as_ref()
            .filter(|_| self.filter.as_ref() == Some(&ExportFilter::default()))
    }

    /// Entries of the chain before the export's first: those pruned.
    pub fn before(&self) -> u64 {
        self.chain_start().map_or(0, |p| p.count.max(0) as u64)
    }

    /// Entries of the chain up to the export's last.
    pub fn chained(&self) -> u64 {
        self.before() + self.entries
    }
}

/// Checks an export's chain: every entry's hash follows from the one before,
/// and the trailer names the count and the head. Any altered, removed, added
/// or reordered line fails it. Says nothing of where the export came from:
/// see [`verify_signed`].
pub fn verify(text: &str) -> anyhow::Result<Verified> {
    verify_with(text, None)
}

/// [`verify`], and the trailer's signature with the key it names among
/// `keys`: the export is then complete for its filter and came from the
/// server holding that key.
pub fn verify_signed(text: &str, keys: &VerifyingKeys) -> anyhow::Result<Verified> {
    verify_with(text, Some(keys))
}

/// [`verify`] (or [`verify_signed`] with `keys`) of a later export, and
/// that it extends `earlier`, an export of the same tenant and filter (its
/// `to` aside) taken before: the later one's first entries are exactly the
/// earlier one's, so nothing the earlier export showed was removed or
/// altered since.
pub fn verify_extends(
    text: &str,
    keys: Option<&VerifyingKeys>,
    earlier: &Verified,
) -> anyhow::Result<Verified> {
    let later = verify_watching(text, keys, earlier.last_position.into_iter().collect())?;
    if earlier.tenant_id.is_none() || earlier.tenant_id != later.tenant_id {
        bail!("the two exports are not of the same tenant (or one is from before signing)");
    }
    let without_to = |f: &Option<ExportFilter>| f.clone().map(|f| ExportFilter { to: None, ..f });
    if without_to(&earlier.filter) != without_to(&later.filter) {
        bail!("the two exports were taken with different filters, so one cannot extend the other");
    }
    let Some(position) = earlier.last_position else {
        return Ok(later);
    };
    if let Some(pruned) = later.pruned.as_ref().filter(|p| {
        position <= p.position
            || (later.chain_start().is_none()
                && earlier.pruned.as_ref() != Some(*p)
                && earlier
                    .first_position
                    .is_some_and(|first| first <= p.position))
    }) {
        if later.chain_start().is_none() {
            bail!(
                "the later export was taken after the entries up to position {} were pruned by the retention setting, and the earlier one holds entries from before: a filtered export cannot show that nothing it held was removed; check unfiltered exports against the checkpoints",
                pruned.position
            );
        }
        if position < pruned.position {
            bail!(
                "the earlier export ends at position {position}, and the entries up to position {} were pruned by the retention setting since: the later export cannot show them; check it against the checkpoints (--checkpoints) instead",
                pruned.position
            );
        }
        if (pruned.count.max(0) as u64, pruned.head.as_str())
            != (earlier.chained(), earlier.head.as_str())
        {
            bail!(
                "the later export's chain starts from a pruned head at position {position} that is not the earlier one's head: entries were removed, added or altered since"
            );
        }
        return Ok(later);
    }
    let Some((count, hash)) = later.at(position) else {
        bail!(
            "the later export has no entry at position {position}, the earlier one's last: it was removed from the history, or the later export ends before it"
        );
    };
    if count != earlier.chained() {
        bail!(
            "the later export has {count} entries up to position {position} where the earlier one had {}: entries were removed or added since",
            earlier.chained()
        );
    }
    if hash != earlier.head {
        bail!(
            "the later export's chain at position {position} is not the earlier one's head: an entry was altered since"
        );
    }
    Ok(later)
}

fn verify_with(text: &str, keys: Option<&VerifyingKeys>) -> anyhow::Result<Verified> {
    verify_watching(text, keys, BTreeSet::new())
}

/// [`verify`] (or [`verify_signed`] with `keys`), keeping the entry count
/// and the chain's hash at each position of `watch` (see [`Verified::at`]).
pub fn verify_watching(
    text: &str,
    keys: Option<&VerifyingKeys>,
    watch: BTreeSet<i64>,
) -> anyhow::Result<Verified> {
    let walk = Walk::new(watch);
    if text.starts_with("position,") {
        verify_csv(text, keys, walk)
    } else {
        verify_ndjson(text, keys, walk)
    }
}

/// The chain walked so far.
struct Walk {
    prev: String,
    /// The `prev` of the first entry: where the export's chain starts
    /// (64 zeros, or a pruned head the trailer names).
    start: Option<String>,
    seen: u64,
    first_position: Option<i64>,
    last_position: Option<i64>,
    tenants: BTreeSet<String>,
    /// The first break in the chain. The walk goes on past it so that
    /// entries out of position order are named as reordered, which says
    /// more than the break they cause.
    broken: Option<anyhow::Error>,
    /// Positions whose entry count and hash are kept (see [`Verified::at`]).
    watch: BTreeSet<i64>,
    watched: BTreeMap<i64, (u64, String)>,
}

impl Walk {
    fn new(watch: BTreeSet<i64>) -> Self {
        Self {
            watch,
            watched: BTreeMap::new(),
            prev: GENESIS.to_string(),
            start: None,
            seen: 0,
            first_position: None,
            last_position: None,
            tenants: BTreeSet::new(),
            broken: None,
        }
    }

    fn entry(&mut self, prev: &str, entry: &AuditEntry, hash: &str) -> anyhow::Result<()> {
        let n = self.seen;
        if let Some(last) = self.last_position {
            if entry.position <= last {
                bail!(
                    "entry {n}: its position {} is not after the one before ({last}): the entries were reordered",
                    entry.position
                );
            }
        }
        if self.broken.is_none() {
            if self.first_position.is_some() && prev != self.prev {
                self.broken = Some(anyhow!(
                    "entry {n}: it does not follow the entry before it (a line is missing or out of order)"
                ));
            } else if chain(prev, entry)? != hash {
                self.broken = Some(anyhow!(
                    "entry {n}: its content does not match its hash (the line was altered)"
                ));
            }
        }
        if self.first_position.is_none() {
            // Checked against the start the trailer implies in `finish`.
            self.start = Some(prev.to_string());
        }
        self.prev = hash.to_string();
        self.first_position.get_or_insert(entry.position);
        self.last_position = Some(entry.position);
        self.tenants.insert(entry.tenant_id.clone());
        if self.watch.contains(&entry.position) {
            self.watched.insert(entry.position, (n, hash.to_string()));
        }
        Ok(())
    }

    /// The end of an export without a trailer.
    fn incomplete(self) -> anyhow::Result<Verified> {
        Err(self
            .broken
            .unwrap_or_else(|| anyhow!("the export has no trailer: it is incomplete")))
    }

    /// The trailer against what was walked, and its signature against `keys`.
    fn finish(mut self, t: TrailerBody, keys: Option<&VerifyingKeys>) -> anyhow::Result<Verified> {
        if let Some(broken) = self.broken {
            return Err(broken);
        }
        // An unfiltered signed export after a pruning goes on from the
        // pruned head; every other export starts from 64 zeros.
        let start = match (&t.pruned, &t.filter, t.version) {
            (Some(p), Some(f), Some(_)) if *f == ExportFilter::default() => p.head.clone(),
            _ => GENESIS.to_string(),
        };
        match self.start.take() {
            None => self.prev = start,
            Some(first) if first != start => match &t.pruned {
                Some(p) if start == p.head => bail!(
                    "entry 1: it does not follow the pruned head the trailer names (position {}): a line is missing before it, or the mark was altered",
                    p.position
                ),
                _ => bail!("entry 1: it does not start the chain (a line is missing before it)"),
            },
            Some(_) => {}
        }
        if t.count != self.seen {
            bail!(
                "the trailer counts {} entries but the export has {}",
                t.count,
                self.seen
            );
        }
        if t.head != self.prev {
            bail!("the trailer's head does not match the last entry's hash");
        }
        let mut verified = Verified {
            entries: self.seen,
            head: self.prev,
            first_position: self.first_position,
            last_position: self.last_position,
            tenant_id: None,
            filter: None,
            key_id: None,
            signature_checked: false,
            pruned: None,
            watched: self.watched,
        };
        let Some(version) = t.version else {
            if keys.is_some() {
                bail!("the trailer is not signed, so where the export came from cannot be checked");
            }
            return Ok(verified);
        };
        if version != TRAILER_VERSION {
            bail!("the trailer's version {version} is not one this tool knows");
        }
        let (Some(tenant_id), Some(filter)) = (t.tenant_id, t.filter) else {
            bail!("a malformed trailer: it names no tenant or no filter");
        };
        if (t.first_position, t.last_position) != (self.first_position, self.last_position) {
            let show = |p: Option<i64>| p.map_or("none".to_string(), |p| p.to_string());
            bail!(
                "the trailer covers positions {} to {} but the entries run from {} to {}",
                show(t.first_position),
                show(t.last_position),
                show(self.first_position),
                show(self.last_position)
            );
        }
        if self.tenants.iter().any(|t| *t != tenant_id) {
            bail!("an entry belongs to another tenant than the trailer's {tenant_id}");
        }
        if let Some(keys) = keys {
            let (Some(key_id), Some(signature)) = (&t.key_id, &t.signature) else {
                bail!("the trailer is not signed, so where the export came from cannot be checked");
            };
            if t.algorithm.as_deref() != Some(ALGORITHM) {
                bail!("the trailer is not signed with ed25519");
            }
            let message = signed_message(&SignedFields {
                version,
                tenant_id: &tenant_id,
                filter: &filter,
                first_position: t.first_position,
                last_position: t.last_position,
                pruned: t.pruned.as_ref(),
                count: t.count,
                head: &t.head,
            })?;
            keys.check(key_id, &message, signature)
                .map_err(|problem| anyhow!("{problem}"))?;
            verified.signature_checked = true;
        }
        verified.tenant_id = Some(tenant_id);
        verified.filter = Some(filter);
        verified.pruned = t.pruned;
        verified.key_id = t.key_id;
        Ok(verified)
    }
}

fn verify_ndjson(
    text: &str,
    keys: Option<&VerifyingKeys>,
    mut walk: Walk,
) -> anyhow::Result<Verified> {
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if let Ok(trailer) = serde_json::from_str::<Trailer>(line) {
            if text.lines().skip(i + 1).any(|l| !l.trim().is_empty()) {
                bail!("lines follow the trailer");
            }
            return walk.finish(trailer.trailer, keys);
        }
        walk.seen += 1;
        let parsed: NdjsonLine = serde_json::from_str(line)
            .with_context(|| format!("entry {}: not an audit entry", walk.seen))?;
        walk.entry(&parsed.prev, &parsed.entry, &parsed.hash)?;
    }
    walk.incomplete()
}

/// A CSV trailer row as the trailer it stands for.
fn csv_trailer(f: &[&str]) -> anyhow::Result<TrailerBody> {
    let malformed = || anyhow!("a malformed trailer");
    let mut t = TrailerBody {
        version: None,
        tenant_id: None,
        filter: None,
        first_position: None,
        last_position: None,
        pruned: None,
        count: f
            .get(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(malformed)?,
        head: f.get(2).ok_or_else(malformed)?.to_string(),
        key_id: None,
        algorithm: None,
        signature: None,
    };
    match f.len() {
        3 => Ok(t),
        n if n == CSV_TRAILER_COLUMNS || n == CSV_TRAILER_COLUMNS + 1 => {
            let position = |s: &str| -> anyhow::Result<Option<i64>> {
                (!s.is_empty())
                    .then(|| s.parse().map_err(|_| malformed()))
                    .transpose()
            };
            t.version = Some(f[3].parse().map_err(|_| malformed())?);
            t.tenant_id = Some(f[4].to_string());
            t.filter = Some(serde_json::from_str(f[5]).map_err(|_| malformed())?);
            t.first_position = position(f[6])?;
            t.last_position = position(f[7])?;
            t.key_id = Some(f[8].to_string());
            t.algorithm = Some(f[9].to_string());
            t.signature = Some(f[10].to_string());
            t.pruned = f
                .get(11)
                .map(|p| serde_json::from_str(p).map_err(|_| malformed()))
                .transpose()?;
            Ok(t)
        }
        _ => Err(malformed()),
    }
}

fn verify_csv(
    text: &str,
    keys: Option<&VerifyingKeys>,
    mut walk: Walk,
) -> anyhow::Result<Verified> {
    if !text.starts_with(CSV_HEADER) {
        bail!("the CSV header is not an audit export's");
    }
    // The trailer has other columns than an entry, hence `flexible`.
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut records = reader.records();
    while let Some(record) = records.next() {
        let raw = record.with_context(|| format!("entry {}: not a CSV record", walk.seen + 1))?;
        let f: Vec<&str> = raw.iter().map(unguard).collect();
        if f.first() == Some(&"#trailer") {
            if records.next().is_some() {
                bail!("lines follow the trailer");
            }
            return walk.finish(csv_trailer(&f)?, keys);
        }
        walk.seen += 1;
        let seen = walk.seen;
        if f.len() != 16 {
            bail!("entry {seen}: expected 16 columns, found {}", f.len());
        }
        // An empty cell is no value; an empty string is a lone `'` (see
        // `guard`). Exports from before that wrote an empty string as an
        // empty cell, and such an entry does not verify from them.
        let opt = |i: usize| (!raw[i].is_empty()).then(|| f[i].to_string());
        let entry = AuditEntry {
            position: f[0]
                .parse()
                .with_context(|| format!("entry {seen}: bad position"))?,
            tenant_id: f[1].to_string(),
            aggregate_type: f[2].to_string(),
            aggregate_id: f[3].to_string(),
            sequence: f[4]
                .parse()
                .with_context(|| format!("entry {seen}: bad sequence"))?,
            event_type: f[5].to_string(),
            at: f[6]
                .parse()
                .with_context(|| format!("entry {seen}: bad time"))?,
            actor_kind: f[7].to_string(),
            actor_id: opt(8),
            ip: opt(9),
            user_agent: opt(10),
            reason: opt(11),
            user_id: opt(12),
            details: serde_json::from_str(f[13])
                .with_context(|| format!("entry {seen}: bad details"))?,
        };
        walk.entry(f[14], &entry, f[15])?;
    }
    walk.incomplete()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    /// A line as serde writes an `NdjsonLine` and the csv crate a record,
    /// hashed as SHA-256 of the previous hash, a newline and the entry's
    /// JSON: the bytes exports were written as before they were written
    /// straight into a buffer.
    fn serde_line(format: Format, prev: &str, entry: &AuditEntry, opened: Option<Value>) -> String {
        let canonical = serde_json::to_string(entry).unwrap();
        let hash = hex::encode(Sha256::digest(format!("{prev}\n{canonical}")));
        match format {
            Format::Ndjson => {
                let line = NdjsonLine {
                    entry: entry.clone(),
                    prev: prev.to_string(),
                    hash,
                    opened,
                };
                serde_json::to_string(&line).unwrap() + "\n"
            }
            Format::Csv => {
                let at = entry
                    .at
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                // No value is an empty cell; a value is guarded.
                let fields = [
                    Some(entry.position.to_string()),
                    Some(entry.tenant_id.clone()),
                    Some(entry.aggregate_type.clone()),
                    Some(entry.aggregate_id.clone()),
                    Some(entry.sequence.to_string()),
                    Some(entry.event_type.clone()),
                    Some(at),
                    Some(entry.actor_kind.clone()),
                    entry.actor_id.clone(),
                    entry.ip.clone(),
                    entry.user_agent.clone(),
                    entry.reason.clone(),
                    entry.user_id.clone(),
                    Some(serde_json::to_string(&entry.details).unwrap()),
                    Some(prev.to_string()),
                    Some(hash),
                ];
                let mut writer = csv::WriterBuilder::new()
                    .terminator(csv::Terminator::Any(b'\n'))
                    .from_writer(Vec::new());
                writer
                    .write_record(
                        fields
                            .iter()
                            .map(|f| f.as_deref().map(guard).unwrap_or_default().into_owned()),
                    )
                    .unwrap();
                String::from_utf8(writer.into_inner().unwrap()).unwrap()
            }
        }
    }

    /// Whether `entry` holds sealed data, by walking its values: what the
    /// text search of [`EntryRef::is_sealed`] must agree with.
    fn sealed_by_walk(entry: &AuditEntry) -> bool {
        fn holds_sealed(value: &Value) -> bool {
            match value {
                Value::String(s) => s.contains(SEALED_PREFIX),
                Value::Array(items) => items.iter().any(holds_sealed),
                Value::Object(map) => map
                    .iter()
                    .any(|(k, v)| k.contains(SEALED_PREFIX) || holds_sealed(v)),
                _ => false,
            }
        }
        [&entry.ip, &entry.user_agent]
            .into_iter()
            .flatten()
            .any(|v| v.starts_with(SEALED_PREFIX))
            || holds_sealed(&entry.details)
    }

    /// The opened form by way of a parsed value: what the text path of
    /// [`EntryRef::opened`] must write.
    fn opened_as_value(entry: &AuditEntry, keys: &Keys) -> Option<Value> {
        if !sealed_by_walk(entry) {
            return None;
        }
        let open = |v: &Option<String>| v.as_deref().map(|v| Personal::open_str(v, keys));
        let mut details = entry.details.clone();
        Personal::open_value(&mut details, keys);
        Some(json!({
            "ip": open(&entry.ip),
            "user_agent": open(&entry.user_agent),
            "details": details,
        }))
    }

    /// Entries with what quoting, escaping and guarding act on.
    fn odd_entries() -> Vec<(AuditEntry, Option<Value>)> {
        let mut odd = entry(2);
        odd.aggregate_id = "#not a comment".into();
        odd.actor_id = Some("@admin".into());
        odd.ip = None;
        odd.user_agent = Some("Mozilla \"x\",\r\n\tnext line, 'quoted' é ☃".into());
        odd.reason = Some("-1 said \"no\"".into());
        odd.user_id = None;
        odd.details = json!({
            "\"key\"": "\u{1}\u{7f}\\ \"", "n": 1.5, "neg": -3, "big": u64::MAX,
            "list": [null, true, "sealed:1:u:abc", {"deep": ["a,b", "c\nd"]}],
            "empty": {}, "none": [], "unicode": "日本語 \u{2028}",
        });
        let mut bare = entry(3);
        bare.details = json!({});
        (bare.ip, bare.user_agent, bare.actor_id) = (None, None, None);
        let opened =
            json!({"ip": null, "user_agent": "opened \"ua\"", "details": {"email": "[erased]"}});
        let mut again = odd.clone();
        (again.position, again.sequence) = (4, 4);
        // Empty strings, which CSV must tell from no value.
        again.reason = Some(String::new());
        again.user_agent = Some(String::new());
        again.ip = Some("'".into());
        vec![
            (entry(1), None),
            (odd, Some(opened)),
            (bare, None),
            (again, None),
        ]
    }

    #[test]
    fn lines_are_the_bytes_serde_and_the_csv_crate_write() {
        // A pruned head that JSON and CSV would both quote.
        let mark = Pruned {
            position: 0,
            count: 0,
            head: "a \"head\", odd".into(),
            signed_at: Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).unwrap(),
        };
        for format in [Format::Ndjson, Format::Csv] {
            for pruned in [None, Some(mark.clone())] {
                let mut e = Exporter::after_pruning(format, "t", ExportFilter::default(), pruned);
                let mut prev = e.prev.clone();
                for (entry, opened) in odd_entries() {
                    let shown = opened.clone().filter(|_| format == Format::Ndjson);
                    let expected = serde_line(format, &prev, &entry, shown);
                    assert_eq!(e.line_opened(entry.clone(), opened).unwrap(), expected);
                    prev = chain(&prev, &entry).unwrap();
                    assert!(expected.contains(&prev), "{format:?}: {expected}");
                }
            }
            // And the whole export, written into one buffer, verifies.
            let mut e = Exporter::new(format, "t", ExportFilter::default());
            let mut out = e.header().into_bytes();
            for (entry, opened) in odd_entries() {
                e.write_line(&entry, opened.as_ref(), &mut out).unwrap();
            }
            out.extend_from_slice(e.trailer(&signer()).unwrap().as_bytes());
            let text = String::from_utf8(out).unwrap();
            assert_eq!(
                verify_signed(&text, &keys()).unwrap().entries,
                4,
                "{format:?}"
            );
        }
    }

    #[test]
    fn a_batch_prepared_at_once_writes_the_lines_written_one_by_one() {
        for format in [Format::Ndjson, Format::Csv] {
            let mut one_by_one = Exporter::new(format, "t", ExportFilter::default());
            let expected: String = odd_entries()
                .into_iter()
                .map(|(entry, opened)| one_by_one.line_opened(entry, opened).unwrap())
                .collect();
            // Prepared in two batches, as an export's reading makes them.
            let mut batched = Exporter::new(format, "t", ExportFilter::default());
            let mut out = Vec::new();
            for part in odd_entries().chunks(3) {
                let mut prepared = Prepared::new(format, part.len());
                for (entry, opened) in part {
                    let details = serde_json::to_string(&entry.details).unwrap();
                    let opened = opened.as_ref().map(|v| serde_json::to_vec(v).unwrap());
                    prepared
                        .push(&EntryRef::of(entry, &details), opened.as_deref())
                        .unwrap();
                }
                batched.write_prepared(&prepared, &mut out).unwrap();
            }
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{format:?}");
            assert_eq!(
                batched.trailer(&signer()).unwrap(),
                one_by_one.trailer(&signer()).unwrap()
            );
            // An exporter takes no entries prepared for the other format.
            let other = match format {
                Format::Ndjson => Format::Csv,
                Format::Csv => Format::Ndjson,
            };
            let (entry, _) = &odd_entries()[0];
            let details = serde_json::to_string(&entry.details).unwrap();
            let mut prepared = Prepared::new(other, 1);
            prepared.push(&EntryRef::of(entry, &details), None).unwrap();
            assert!(batched.write_prepared(&prepared, &mut Vec::new()).is_err());
        }
    }

    #[test]
    fn sealed_means_the_sealed_prefix_is_in_the_details_text() {
        for details in [
            json!({}),
            json!({"a": "sealed:1:u:x"}),
            json!({"a": ["x", {"b": "..sealed:1:"}]}),
            json!({"sealed:1:k": 1}),
            json!({"sealed": 1}),
            json!({"a": "sealed:1", "b": ":1:"}),
            json!({"a": "sealed", "sealed": ":1:"}),
            json!({"n": 1.5, "list": [false, null]}),
        ] {
            let mut e = entry(1);
            (e.ip, e.user_agent) = (None, None);
            e.details = details.clone();
            let text = details.to_string();
            assert_eq!(sealed_by_walk(&e), text.contains(SEALED_PREFIX), "{text}");
            assert_eq!(
                EntryRef::of(&e, &text).is_sealed(),
                sealed_by_walk(&e),
                "{text}"
            );
        }
    }

    #[test]
    fn an_entry_read_as_text_is_sealed_names_keys_and_opens_as_the_parsed_entry_does() {
        let sealed = format!("{SEALED_PREFIX}u1:AAAA");
        let mut cases = Vec::new();
        for (ip, details) in [
            (None, json!({})),
            (
                Some(sealed.clone()),
                json!({"n": 1.5, "list": [false, null]}),
            ),
            (
                None,
                json!({"email": sealed, "other": format!("{SEALED_PREFIX}u2:BB")}),
            ),
            (
                Some("203.0.113.9".to_string()),
                json!({"deep": [{"x": sealed}], "plain": "é \"q\""}),
            ),
        ] {
            let mut e = entry(1);
            e.ip = ip;
            e.user_agent = Some(format!("{SEALED_PREFIX}u3:CC"));
            e.details = details;
            cases.push(e.clone());
            e.user_agent = None;
            cases.push(e);
        }
        for e in cases {
            let text = serde_json::to_string(&e.details).unwrap();
            let r = EntryRef::of(&e, &text);
            assert_eq!(r.is_sealed(), sealed_by_walk(&e), "{e:?}");
            let mut all = text.clone();
            for v in [&e.ip, &e.user_agent].into_iter().flatten() {
                all.push(' ');
                all.push_str(v);
            }
            assert_eq!(r.key_ids(), Personal::key_ids(&all), "{e:?}");
            let keys = Keys::default();
            let expected = opened_as_value(&e, &keys).map(|v| serde_json::to_vec(&v).unwrap());
            assert_eq!(r.opened(&keys).unwrap(), expected, "{e:?}");
            let mut json = Vec::new();
            r.write_json(&mut json).unwrap();
            assert_eq!(json, serde_json::to_vec(&e).unwrap());
        }
    }

    #[test]
    fn an_actors_fields_are_what_it_serializes_as() {
        use twofold_domain::{Actor, UserId};
        let id: UserId = "6f1c1d52-4b8e-4a4e-9d7a-3f0c2b1a0e99".parse().unwrap();
        for actor in [
            Actor::User(id),
            Actor::Admin(id),
            Actor::Operator,
            Actor::System,
        ] {
            let json = serde_json::to_value(&actor).unwrap();
            let (kind, id) = actor_fields(&actor);
            assert_eq!(json["kind"], kind, "{json}");
            assert_eq!(json["id"].as_str().map(str::to_string), id, "{json}");
        }
    }

    #[test]
    fn csv_cells_a_spreadsheet_would_run_are_neutralised_and_still_verify() {
        let mut e = Exporter::new(Format::Csv, "t", ExportFilter::default());
        let mut out = e.header();
        let mut evil = entry(1);
        evil.user_agent = Some("=HYPERLINK(\"http://evil.example\",\"click\")".into());
        evil.reason = Some("'quoted already".into());
        let mut plus = entry(2);
        plus.reason = Some("+1 and @you and -2".into());
        plus.ip = Some("\tfoo".into());
        out.push_str(&e.line(evil).unwrap());
        out.push_str(&e.line(plus).unwrap());
        out.push_str(&e.trailer(&signer()).unwrap());
        for line in out.lines().skip(1) {
            for cell in line.split(',') {
                let cell = cell.trim_start_matches('"');
                assert!(
                    !cell.starts_with(['=', '+', '-', '@', '\t']),
                    "unguarded cell {cell:?} in {line}"
                );
            }
        }
        assert!(out.contains("'=HYPERLINK"));
        assert_eq!(verify(&out).unwrap().entries, 2);
    }

    /// One signing key for every test here, so exports verify against it.
    fn signer() -> AuditSigner {
        static SIGNER: std::sync::OnceLock<AuditSigner> = std::sync::OnceLock::new();
        SIGNER.get_or_init(|| AuditSigner::generate("a1")).clone()
    }

    fn keys() -> VerifyingKeys {
        VerifyingKeys::parse(&serde_json::to_string(&signer().published()).unwrap()).unwrap()
    }

    fn entry(n: i64) -> AuditEntry {
        AuditEntry {
            position: n,
            tenant_id: "t".into(),
            aggregate_type: "user".into(),
            aggregate_id: "u".into(),
            sequence: n,
            event_type: "CodeRejected".into(),
            at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, n as u32).unwrap(),
            actor_kind: "user".into(),
            actor_id: Some("u".into()),
            ip: Some("192.0.2.1".into()),
            user_agent: Some("agent, \"quoted\"".into()),
            reason: None,
            user_id: Some("u".into()),
            details: json!({"failures": n, "note": "a,b\nc"}),
        }
    }

    fn export(format: Format, n: i64) -> String {
        let mut e = Exporter::new(format, "t", ExportFilter::default());
        let mut out = e.header();
        for i in 1..=n {
            out.push_str(&e.line(entry(i)).unwrap());
        }
        out.push_str(&e.trailer(&signer()).unwrap());
        out
    }

    #[test]
    fn intact_exports_verify_in_both_formats() {
        for format in [Format::Ndjson, Format::Csv] {
            let v = verify(&export(format, 5)).unwrap();
            assert_eq!(v.entries, 5);
        }
        assert_eq!(verify(&export(Format::Ndjson, 0)).unwrap().entries, 0);
    }

    #[test]
    fn an_altered_line_fails() {
        for format in [Format::Ndjson, Format::Csv] {
            let text = export(format, 5);
            let altered = text.replacen("192.0.2.1", "192.0.2.9", 1);
            assert_ne!(altered, text);
            assert!(verify(&altered).is_err(), "{format:?}");
        }
    }

    #[test]
    fn a_removed_line_fails() {
        for format in [Format::Ndjson, Format::Csv] {
            let text = export(format, 5);
            for n in [1, 3, 5] {
                assert!(
                    verify(&splice_out(&text, format, n)).is_err(),
                    "{format:?} {n}"
                );
            }
        }
    }

    #[test]
    fn a_cut_off_export_fails() {
        for format in [Format::Ndjson, Format::Csv] {
            let text = export(format, 5);
            let marker = match format {
                Format::Csv => "#trailer",
                Format::Ndjson => "{\"trailer\"",
            };
            let cut = text.rsplit_once(marker).unwrap().0;
            assert!(verify(cut).is_err(), "{format:?}");
        }
    }

    /// The export text with the `n`th entry's record taken out.
    fn splice_out(text: &str, format: Format, n: usize) -> String {
        match format {
            Format::Ndjson => text
                .lines()
                .enumerate()
                .filter(|(i, _)| *i != n - 1)
                .map(|(_, l)| format!("{l}\n"))
                .collect(),
            Format::Csv => {
                // Where each record starts, as the csv reader sees them.
                let mut reader = csv::ReaderBuilder::new()
                    .flexible(true)
                    .from_reader(text.as_bytes());
                reader.headers().unwrap();
                let mut starts = Vec::new();
                let mut record = csv::StringRecord::new();
                loop {
                    let at = reader.position().byte() as usize;
                    if !reader.read_record(&mut record).unwrap() {
                        break;
                    }
                    starts.push(at);
                }
                starts.push(text.len());
                let (from, to) = (starts[n - 1], starts[n]);
                format!("{}{}", &text[..from], &text[to..])
            }
        }
    }

    /// The export's lines without its trailer, and a trailer claiming them
    /// (count and head recomputed), signed with `sign`'s key or not at all.
    fn retrailed(text: &str, keep: usize, sign: Option<&AuditSigner>) -> String {
        let lines: Vec<&str> = text.lines().take(keep).collect();
        let last: NdjsonLine = serde_json::from_str(lines[keep - 1]).unwrap();
        let first: NdjsonLine = serde_json::from_str(lines[0]).unwrap();
        let mut e = Exporter::new(Format::Ndjson, "t", ExportFilter::default());
        e.count = keep as u64;
        e.prev = last.hash;
        e.first_position = Some(first.entry.position);
        e.last_position = Some(last.entry.position);
        let trailer = match sign {
            Some(signer) => e.trailer(signer).unwrap(),
            None => serde_json::to_string(&json!({"trailer": {
                "count": keep, "head": e.prev}}))
            .unwrap(),
        };
        format!("{}\n{}\n", lines.join("\n"), trailer.trim_end())
    }

    #[test]
    fn a_signed_export_verifies_with_its_key_and_names_what_it_covers() {
        for format in [Format::Ndjson, Format::Csv] {
            let v = verify_signed(&export(format, 5), &keys()).unwrap();
            assert!(v.signature_checked, "{format:?}");
            assert_eq!(v.key_id.as_deref(), Some("a1"));
            assert_eq!(v.tenant_id.as_deref(), Some("t"));
            assert_eq!((v.first_position, v.last_position), (Some(1), Some(5)));
            // Without keys only the chain is checked.
            assert!(!verify(&export(format, 5)).unwrap().signature_checked);
        }
        assert_eq!(
            verify_signed(&export(Format::Ndjson, 0), &keys())
                .unwrap()
                .entries,
            0
        );
    }

    #[test]
    fn a_cut_export_with_a_rewritten_trailer_fails_on_the_signature() {
        let text = export(Format::Ndjson, 5);
        let forger = AuditSigner::generate("a1");
        let err = verify_signed(&retrailed(&text, 3, Some(&forger)), &keys()).unwrap_err();
        assert!(
            err.to_string().starts_with("the signature does not match"),
            "{err}"
        );
        // The chain alone cannot tell.
        assert!(verify(&retrailed(&text, 3, Some(&forger))).is_ok());
        let err = verify_signed(&retrailed(&text, 3, None), &keys()).unwrap_err();
        assert!(err.to_string().contains("not signed"), "{err}");
        let stranger = AuditSigner::generate("x9");
        let err = verify_signed(&retrailed(&text, 3, Some(&stranger)), &keys()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "signed by key x9, not among the keys given"
        );
        // The original trailer's signature does not cover fewer entries.
        let original = text.lines().last().unwrap();
        let mut cut: Vec<&str> = text.lines().take(3).collect();
        cut.push(original);
        let err = verify_signed(&(cut.join("\n") + "\n"), &keys()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the trailer counts 5 entries but the export has 3"
        );
    }

    #[test]
    fn a_trailer_naming_another_filter_or_tenant_fails_on_the_signature() {
        let text = export(Format::Ndjson, 2);
        let wider = text.replacen(
            "\"filter\":{\"event_type\":null",
            "\"filter\":{\"event_type\":\"X\"",
            1,
        );
        assert_ne!(wider, text);
        let err = verify_signed(&wider, &keys()).unwrap_err();
        assert!(
            err.to_string().starts_with("the signature does not match"),
            "{err}"
        );
        let other_tenant = text.replace("\"tenant_id\":\"t\"", "\"tenant_id\":\"u\"");
        assert!(verify_signed(&other_tenant, &keys()).is_err());
    }

    #[test]
    fn swapped_entries_are_called_reordered() {
        for format in [Format::Ndjson, Format::Csv] {
            let mut e = Exporter::new(format, "t", ExportFilter::default());
            let mut text = e.header();
            for n in 1..=4 {
                let mut plain = entry(n);
                plain.details = json!({ "failures": n });
                text.push_str(&e.line(plain).unwrap());
            }
            text.push_str(&e.trailer(&signer()).unwrap());
            let mut lines: Vec<&str> = text.lines().collect();
            let at = usize::from(format == Format::Csv) + 1;
            lines.swap(at, at + 1);
            let err = verify(&(lines.join("\n") + "\n")).unwrap_err();
            assert!(err.to_string().contains("reordered"), "{format:?}: {err}");
        }
    }

    /// An export of `positions` (entries numbered by position).
    fn export_of(positions: &[i64], alter: Option<i64>) -> String {
        let mut e = Exporter::new(Format::Ndjson, "t", ExportFilter::default());
        let mut out = e.header();
        for &p in positions {
            let mut entry = entry(p);
            if alter == Some(p) {
                entry.reason = Some("rewritten".into());
            }
            out.push_str(&e.line(entry).unwrap());
        }
        out.push_str(&e.trailer(&signer()).unwrap());
        out
    }

    #[test]
    fn a_later_export_extends_an_earlier_one_unless_history_changed_between() {
        let earlier = verify_signed(&export_of(&[1, 2, 3], None), &keys()).unwrap();
        let later = export_of(&[1, 2, 3, 4, 5], None);
        assert_eq!(
            verify_extends(&later, Some(&keys()), &earlier)
                .unwrap()
                .entries,
            5
        );
        let removed = export_of(&[1, 3, 4, 5], None);
        let err = verify_extends(&removed, Some(&keys()), &earlier).unwrap_err();
        assert!(
            err.to_string().contains("entries were removed or added"),
            "{err}"
        );
        let last_removed = export_of(&[1, 2, 4, 5], None);
        let err = verify_extends(&last_removed, Some(&keys()), &earlier).unwrap_err();
        assert!(err.to_string().contains("no entry at position 3"), "{err}");
        let altered = export_of(&[1, 2, 3, 4], Some(2));
        let err = verify_extends(&altered, Some(&keys()), &earlier).unwrap_err();
        assert!(err.to_string().contains("altered since"), "{err}");
        let mut e = Exporter::new(
            Format::Ndjson,
            "t",
            ExportFilter {
                event_type: Some("CodeRejected".into()),
                ..ExportFilter::default()
            },
        );
        let mut other = String::new();
        for p in 1..=4 {
            other.push_str(&e.line(entry(p)).unwrap());
        }
        other.push_str(&e.trailer(&signer()).unwrap());
        let err = verify_extends(&other, Some(&keys()), &earlier).unwrap_err();
        assert!(err.to_string().contains("different filters"), "{err}");
    }

    /// The mark of a history pruned up to `position` (entries 1 to it).
    fn mark_at(position: i64) -> Pruned {
        let mut head = GENESIS.to_string();
        for p in 1..=position {
            head = chain(&head, &entry(p)).unwrap();
        }
        Pruned {
            position,
            count: position,
            head,
            signed_at: Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).unwrap(),
        }
    }

    /// An unfiltered export of tenant `t` after a pruning up to `mark`.
    pub(crate) fn export_after(
        signer: &AuditSigner,
        format: Format,
        mark: &Pruned,
        entries: impl IntoIterator<Item = AuditEntry>,
    ) -> String {
        let mut e =
            Exporter::after_pruning(format, "t", ExportFilter::default(), Some(mark.clone()));
        let mut out = e.header();
        for entry in entries {
            out.push_str(&e.line(entry).unwrap());
        }
        out.push_str(&e.trailer(signer).unwrap());
        out
    }

    fn pruned_export(format: Format, mark: &Pruned, positions: &[i64]) -> String {
        export_after(&signer(), format, mark, positions.iter().map(|&p| entry(p)))
    }

    #[test]
    fn an_export_after_a_pruning_goes_on_from_the_pruned_head_in_both_formats() {
        let mark = mark_at(3);
        for format in [Format::Ndjson, Format::Csv] {
            let text = pruned_export(format, &mark, &[4, 5, 6]);
            let v = verify_watching(&text, Some(&keys()), [5].into()).unwrap();
            assert_eq!(v.pruned.as_ref(), Some(&mark));
            assert_eq!((v.entries, v.chained()), (3, 6));
            // Counted and hashed as the whole chain is.
            let whole = verify_watching(&export(format, 6), None, [5].into()).unwrap();
            assert_eq!(v.at(5), whole.at(5));
            assert_eq!(v.head, whole.head);
            // A mark altered in the trailer breaks the chain or the signature.
            let forged = text.replace(&mark.head, GENESIS);
            assert!(verify_signed(&forged, &keys()).is_err(), "{format:?}");
            // The first entry after the mark removed.
            let skip = usize::from(format == Format::Csv);
            let cut: String = text
                .lines()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, l)| format!("{l}\n"))
                .collect();
            let err = verify(&cut).unwrap_err();
            assert!(err.to_string().contains("pruned head"), "{err}");
        }
        // Empty after the mark: its head is the mark's.
        let empty = pruned_export(Format::Ndjson, &mark, &[]);
        assert_eq!(verify_signed(&empty, &keys()).unwrap().head, mark.head);
    }

    #[test]
    fn an_export_from_before_a_pruning_is_extended_when_it_reaches_the_mark() {
        let earlier = verify_signed(&export_of(&[1, 2, 3, 4], None), &keys()).unwrap();
        let later = pruned_export(Format::Ndjson, &mark_at(3), &[4, 5, 6]);
        let v = verify_extends(&later, Some(&keys()), &earlier).unwrap();
        assert_eq!(v.entries, 3);
        let at_mark = verify_signed(&export_of(&[1, 2, 3], None), &keys()).unwrap();
        assert!(verify_extends(&later, Some(&keys()), &at_mark).is_ok());
        let shorter = verify_signed(&export_of(&[1, 2], None), &keys()).unwrap();
        let err = verify_extends(&later, Some(&keys()), &shorter).unwrap_err();
        assert!(
            err.to_string()
                .contains("were pruned by the retention setting since"),
            "{err}"
        );
        // History changed before the mark: the pruned head is not the
        // earlier export's.
        let altered = verify_signed(&export_of(&[1, 2, 3], Some(2)), &keys()).unwrap();
        let err = verify_extends(&later, Some(&keys()), &altered).unwrap_err();
        assert!(
            err.to_string().contains("not the earlier one's head"),
            "{err}"
        );
    }
}
