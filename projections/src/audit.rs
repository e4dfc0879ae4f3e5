//! The audit history: every event of a tenant as a timeline entry (time,
//! actor, IP, reason, what happened), searchable, and exported as NDJSON or
//! CSV with a hash chain so an auditor can tell whether an export is complete
//! and unaltered (`twofold audit verify`).

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use twofold_domain::Ctx;

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
        let inner = payload.values().next().and_then(Value::as_object);
        let ctx = inner
            .and_then(|i| i.get("ctx"))
            .and_then(|c| Ctx::deserialize(c).ok());
        let mut details = Map::new();
        if let Some(inner) = inner {
            for (k, v) in inner {
                if k == "ctx" {
                    continue;
                }
                if k == "hashes" {
                    // Say how many codes were issued, not their hashes.
                    if let Some(list) = v.as_array() {
                        details.insert("count".into(), Value::from(list.len()));
                    }
                    continue;
                }
                if WITHHELD.contains(&k.as_str()) {
                    continue;
                }
                details.insert(k.clone(), v.clone());
            }
        }
        // A session an admin opened as the user (Login As) names the admin.
        if let Some(admin) = ctx.as_ref().and_then(|c| c.impersonated_by) {
            details.insert("impersonated_by".into(), Value::from(admin.to_string()));
        }
        let (actor_kind, actor_id) = match ctx.as_ref().map(|c| serde_json::to_value(&c.actor)) {
            Some(Ok(actor)) => (
                actor["kind"].as_str().unwrap_or("system").to_string(),
                actor["id"].as_str().map(str::to_string),
            ),
            _ => ("system".to_string(), None),
        };
        let user_id = match record.aggregate_type.as_str() {
            "user" => Some(record.aggregate_id.clone()),
            _ => inner
                .and_then(|i| i.get("user_id"))
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        Some(Self {
            position: record.global_position,
            tenant_id,
            aggregate_type: record.aggregate_type.clone(),
            aggregate_id: record.aggregate_id.clone(),
            sequence: record.sequence,
            event_type: record.event_type.clone(),
            at: ctx.as_ref().map_or(record.recorded_at, |c| c.at),
            actor_kind,
            actor_id,
            ip: ctx.as_ref().and_then(|c| c.ip.clone()),
            user_agent: ctx.as_ref().and_then(|c| c.user_agent.clone()),
            reason: ctx.and_then(|c| c.reason),
            user_id,
            details: Value::Object(details),
        })
    }

    fn canonical(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string(self)?)
    }
}

/// The chain's start: the hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Links `entry` to the chain ending in `prev`.
pub fn chain(prev: &str, entry: &AuditEntry) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(entry.canonical()?.as_bytes());
    Ok(hex::encode(h.finalize()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Ndjson,
    Csv,
}

/// Writes entries one by one, carrying the chain along.
pub struct Exporter {
    format: Format,
    prev: String,
    count: u64,
}

#[derive(Serialize, Deserialize)]
struct NdjsonLine {
    #[serde(flatten)]
    entry: AuditEntry,
    prev: String,
    hash: String,
}

#[derive(Serialize, Deserialize)]
struct Trailer {
    trailer: TrailerBody,
}

#[derive(Serialize, Deserialize)]
struct TrailerBody {
    count: u64,
    head: String,
}

pub const CSV_HEADER: &str = "position,tenant_id,aggregate_type,aggregate_id,sequence,event_type,at,actor_kind,actor_id,ip,user_agent,reason,user_id,details,prev,hash\n";

/// A cell a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab,
/// carriage return; OWASP's CSV injection list) is written with a leading
/// `'`, and so is one that starts with `'` itself, so [`unguard`] restores
/// every value exactly and the hash chain still verifies.
fn guard(cell: &str) -> std::borrow::Cow<'_, str> {
    match cell.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r' | '\'') => format!("'{cell}").into(),
        _ => cell.into(),
    }
}

/// The value a guarded cell stands for.
fn unguard(cell: &str) -> &str {
    cell.strip_prefix('\'').unwrap_or(cell)
}

/// One CSV record (quoted only where needed, guarded against spreadsheet
/// formulas), newline-terminated.
fn csv_line(fields: &[&str]) -> anyhow::Result<String> {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    writer.write_record(fields.iter().map(|f| guard(f).into_owned()))?;
    let bytes = writer
        .into_inner()
        .map_err(|e| anyhow::anyhow!("writing a CSV record: {}", e.error()))?;
    Ok(String::from_utf8(bytes)?)
}

impl Exporter {
    pub fn new(format: Format) -> Self {
        Self {
            format,
            prev: GENESIS.to_string(),
            count: 0,
        }
    }

    pub fn header(&self) -> String {
        match self.format {
            Format::Ndjson => String::new(),
            Format::Csv => CSV_HEADER.to_string(),
        }
    }

    pub fn line(&mut self, entry: AuditEntry) -> anyhow::Result<String> {
        let hash = chain(&self.prev, &entry)?;
        let prev = std::mem::replace(&mut self.prev, hash.clone());
        self.count += 1;
        Ok(match self.format {
            Format::Ndjson => {
                let mut s = serde_json::to_string(&NdjsonLine { entry, prev, hash })?;
                s.push('\n');
                s
            }
            Format::Csv => {
                let opt = |o: &Option<String>| o.clone().unwrap_or_default();
                csv_line(&[
                    &entry.position.to_string(),
                    &entry.tenant_id,
                    &entry.aggregate_type,
                    &entry.aggregate_id,
                    &entry.sequence.to_string(),
                    &entry.event_type,
                    &entry
                        .at
                        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    &entry.actor_kind,
                    &opt(&entry.actor_id),
                    &opt(&entry.ip),
                    &opt(&entry.user_agent),
                    &opt(&entry.reason),
                    &opt(&entry.user_id),
                    &serde_json::to_string(&entry.details)?,
                    &prev,
                    &hash,
                ])?
            }
        })
    }

    /// The closing line: how many entries and the chain's head, so a cut-off
    /// export is told from a complete one.
    pub fn trailer(&self) -> anyhow::Result<String> {
        Ok(match self.format {
            Format::Ndjson => {
                let mut s = serde_json::to_string(&Trailer {
                    trailer: TrailerBody {
                        count: self.count,
                        head: self.prev.clone(),
                    },
                })?;
                s.push('\n');
                s
            }
            Format::Csv => format!("#trailer,{},{}\n", self.count, self.prev),
        })
    }
}

/// What `twofold audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub head: String,
}

/// Checks an export: every entry's hash follows from the one before, and the
/// trailer names the count and the head. Any altered, removed, added or
/// reordered line fails it.
pub fn verify(text: &str) -> anyhow::Result<Verified> {
    if text.starts_with("position,") {
        verify_csv(text)
    } else {
        verify_ndjson(text)
    }
}

fn check_link(
    n: u64,
    prev: &str,
    expected_prev: &str,
    entry: &AuditEntry,
    hash: &str,
) -> anyhow::Result<String> {
    if prev != expected_prev {
        bail!(
            "entry {n}: it does not follow the entry before it (a line is missing or out of order)"
        );
    }
    let recomputed = chain(prev, entry)?;
    if recomputed != hash {
        bail!("entry {n}: its content does not match its hash (the line was altered)");
    }
    Ok(recomputed)
}

fn check_trailer(count: u64, head: &str, seen: u64, last: &str) -> anyhow::Result<Verified> {
    if count != seen {
        bail!("the trailer counts {count} entries but the export has {seen}");
    }
    if head != last {
        bail!("the trailer's head does not match the last entry's hash");
    }
    Ok(Verified {
        entries: seen,
        head: last.to_string(),
    })
}

fn verify_ndjson(text: &str) -> anyhow::Result<Verified> {
    let mut prev = GENESIS.to_string();
    let mut seen = 0u64;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if let Ok(trailer) = serde_json::from_str::<Trailer>(line) {
            if text.lines().skip(i + 1).any(|l| !l.trim().is_empty()) {
                bail!("lines follow the trailer");
            }
            return check_trailer(trailer.trailer.count, &trailer.trailer.head, seen, &prev);
        }
        seen += 1;
        let parsed: NdjsonLine = serde_json::from_str(line)
            .with_context(|| format!("entry {seen}: not an audit entry"))?;
        prev = check_link(seen, &parsed.prev, &prev, &parsed.entry, &parsed.hash)?;
    }
    bail!("the export has no trailer: it is incomplete")
}

fn verify_csv(text: &str) -> anyhow::Result<Verified> {
    if !text.starts_with(CSV_HEADER) {
        bail!("the CSV header is not an audit export's");
    }
    // The trailer has fewer columns than an entry, hence `flexible`.
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut records = reader.records();
    let mut prev = GENESIS.to_string();
    let mut seen = 0u64;
    while let Some(record) = records.next() {
        let f = record.with_context(|| format!("entry {}: not a CSV record", seen + 1))?;
        if f.get(0) == Some("#trailer") {
            if records.next().is_some() {
                bail!("lines follow the trailer");
            }
            let count = f
                .get(1)
                .and_then(|c| c.parse().ok())
                .context("a malformed trailer")?;
            let head = f.get(2).context("a malformed trailer")?;
            return check_trailer(count, head, seen, &prev);
        }
        seen += 1;
        if f.len() != 16 {
            bail!("entry {seen}: expected 16 columns, found {}", f.len());
        }
        let f: Vec<&str> = f.iter().map(unguard).collect();
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
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
            actor_id: opt(f[8]),
            ip: opt(f[9]),
            user_agent: opt(f[10]),
            reason: opt(f[11]),
            user_id: opt(f[12]),
            details: serde_json::from_str(f[13])
                .with_context(|| format!("entry {seen}: bad details"))?,
        };
        prev = check_link(seen, f[14], &prev, &entry, f[15])?;
    }
    bail!("the export has no trailer: it is incomplete")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    #[test]
    fn csv_cells_a_spreadsheet_would_run_are_neutralised_and_still_verify() {
        let mut e = Exporter::new(Format::Csv);
        let mut out = e.header();
        let mut evil = entry(1);
        evil.user_agent = Some("=HYPERLINK(\"http://evil.example\",\"click\")".into());
        evil.reason = Some("'quoted already".into());
        let mut plus = entry(2);
        plus.reason = Some("+1 and @you and -2".into());
        plus.ip = Some("\tfoo".into());
        out.push_str(&e.line(evil).unwrap());
        out.push_str(&e.line(plus).unwrap());
        out.push_str(&e.trailer().unwrap());
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
        let mut e = Exporter::new(format);
        let mut out = e.header();
        for i in 1..=n {
            out.push_str(&e.line(entry(i)).unwrap());
        }
        out.push_str(&e.trailer().unwrap());
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
}
