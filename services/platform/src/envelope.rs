//! One committed event as every reader sees it: the event store's row with
//! its payload as raw JSON. The relay publishes it (serialized, the payload
//! copied as stored), the dispatcher and the projector read it back, and the
//! rebuild and `as_of` reports load it from PostgreSQL.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::Row;
use twofold_domain::Ctx;

/// The columns of `events` an [`Envelope`] is read from (`FromRow`).
pub const COLUMNS: &str = "global_position, aggregate_type, aggregate_id, sequence, event_type, \
     event_version, payload, metadata, recorded_at";

/// The newest major event version this build writes and reads.
pub const EVENT_VERSION_MAJOR: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// The event's place in the whole store (commit order).
    pub global_position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The event's place in its aggregate's stream, from 1.
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    /// The tenant the store recorded the event under, when its aggregate
    /// belongs to one.
    pub tenant_id: Option<String>,
    pub recorded_at: DateTime<Utc>,
    /// The event as stored: `{"<event_type>": {…}}`, its personal data
    /// sealed (see [`crate::personal`]).
    pub payload: Box<RawValue>,
    /// The payload with its personal data opened, once a reader that holds
    /// the keys has opened it (`Personal::open_envelopes`); never sent.
    #[serde(skip)]
    pub opened: Option<Box<RawValue>>,
}

/// An [`Envelope`]'s fields as borrowed from a row, written as its JSON.
struct Fields<'a> {
    global_position: i64,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    event_type: &'a str,
    event_version: &'a str,
    tenant_id: Option<&'a str>,
    recorded_at: DateTime<Utc>,
    /// The payload's JSON text.
    payload: &'a str,
}

impl Fields<'_> {
    /// What serde writes for the [`Envelope`], fields in its order.
    fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        use crate::json::{push_field, push_raw_field, push_str_field, push_time_field};
        let mut out = Vec::with_capacity(256 + self.payload.len());
        push_field(&mut out, true, "global_position", &self.global_position)?;
        push_str_field(&mut out, false, "aggregate_type", self.aggregate_type)?;
        push_str_field(&mut out, false, "aggregate_id", self.aggregate_id)?;
        push_field(&mut out, false, "sequence", &self.sequence)?;
        push_str_field(&mut out, false, "event_type", self.event_type)?;
        push_str_field(&mut out, false, "event_version", self.event_version)?;
        push_str_field(&mut out, false, "tenant_id", self.tenant_id)?;
        push_time_field(&mut out, false, "recorded_at", &self.recorded_at)?;
        push_raw_field(&mut out, false, "payload", self.payload);
        out.push(b'}');
        Ok(out)
    }
}

/// See [`Envelope::msg_id`].
fn msg_id(aggregate_type: &str, aggregate_id: &str, sequence: i64) -> String {
    format!("{aggregate_type}:{aggregate_id}:{sequence}")
}

/// See [`Envelope::subject`].
fn subject(
    prefix: &str,
    tenant_id: Option<&str>,
    aggregate_type: &str,
    event_type: &str,
) -> String {
    format!(
        "{prefix}.events.{}.{aggregate_type}.{event_type}",
        tenant_id.unwrap_or("none")
    )
}

/// The part of the stored metadata the envelope carries.
#[derive(Deserialize)]
struct Metadata {
    tenant_id: Option<String>,
}

impl<'r> sqlx::FromRow<'r, PgRow> for Envelope {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let Json(metadata): Json<Option<Metadata>> = row.try_get("metadata")?;
        let Json(payload): Json<Box<RawValue>> = row.try_get("payload")?;
        Ok(Self {
            global_position: row.try_get("global_position")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            tenant_id: metadata.and_then(|m| m.tenant_id),
            recorded_at: row.try_get("recorded_at")?,
            payload,
            opened: None,
        })
    }
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        self.global_position == other.global_position
            && self.aggregate_type == other.aggregate_type
            && self.aggregate_id == other.aggregate_id
            && self.sequence == other.sequence
            && self.event_type == other.event_type
            && self.event_version == other.event_version
            && self.tenant_id == other.tenant_id
            && self.recorded_at == other.recorded_at
            && self.payload.get() == other.payload.get()
    }
}

/// A `ctx` inside an event's variant, whichever variant it is.
#[derive(Deserialize)]
struct CtxOf {
    ctx: Option<Ctx>,
}

impl Envelope {
    /// The envelope as JSON, the payload copied as stored. (Serialized here,
    /// in the platform crate, which is optimized even in dev builds: the
    /// relay does this for every event.)
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }

    /// A row of [`COLUMNS`], starting at column `first`, as the relay sends
    /// it: its subject under `prefix`, its `Nats-Msg-Id` and the bytes
    /// [`Envelope::to_json`] writes for it, read by column index and written
    /// straight from the row, the payload's text copied once (the store
    /// validated it as JSON when it took it) instead of decoded into an
    /// envelope first.
    pub fn message_of_row(
        row: &PgRow,
        first: usize,
        prefix: &str,
    ) -> Result<(String, String, Vec<u8>), sqlx::Error> {
        let aggregate_type: &str = row.try_get(first + 1)?;
        let aggregate_id: &str = row.try_get(first + 2)?;
        let sequence: i64 = row.try_get(first + 3)?;
        let event_type: &str = row.try_get(first + 4)?;
        let Json(metadata): Json<Option<Metadata>> = row.try_get(first + 7)?;
        let tenant_id = metadata.and_then(|m| m.tenant_id);
        // A `json` column's value is its text, in either wire format.
        let payload: &str = row.try_get_unchecked(first + 6)?;
        let fields = Fields {
            global_position: row.try_get(first)?,
            aggregate_type,
            aggregate_id,
            sequence,
            event_type,
            event_version: row.try_get(first + 5)?,
            tenant_id: tenant_id.as_deref(),
            recorded_at: row.try_get(first + 8)?,
            payload,
        };
        let subject = subject(prefix, tenant_id.as_deref(), aggregate_type, event_type);
        let msg_id = msg_id(aggregate_type, aggregate_id, sequence);
        let body = fields
            .to_json()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        Ok((subject, msg_id, body))
    }

    /// Whether this build reads the event's version: the major version
    /// ([`EVENT_VERSION_MAJOR`]) is one it knows (a newer minor only adds
    /// what older readers may leave out).
    pub fn version_is_known(&self) -> bool {
        let major = self.event_version.split('.').next().unwrap_or("");
        major.parse::<u32>().is_ok_and(|m| m <= EVENT_VERSION_MAJOR)
    }

    /// The payload as read: opened when it has been, else as stored.
    pub fn readable(&self) -> &str {
        self.opened.as_ref().unwrap_or(&self.payload).get()
    }

    /// The payload as the aggregate's event type (opened, when it has been).
    pub fn event<E: DeserializeOwned>(&self) -> serde_json::Result<E> {
        serde_json::from_str(self.readable())
    }

    /// The event's `ctx` (time, actor, IP, reason), without decoding the rest
    /// of the event.
    pub fn ctx(&self) -> Option<Ctx> {
        let variant: std::collections::BTreeMap<&str, CtxOf> =
            serde_json::from_str(self.readable()).ok()?;
        variant.into_values().next()?.ctx
    }

    /// `aggregate_type:aggregate_id:sequence`, JetStream's `Nats-Msg-Id`
    /// (a republished event within the duplicate window is dropped).
    pub fn msg_id(&self) -> String {
        msg_id(&self.aggregate_type, &self.aggregate_id, self.sequence)
    }

    /// `<prefix>.events.<tenant or none>.<aggregate_type>.<event_type>`.
    pub fn subject(&self, prefix: &str) -> String {
        subject(
            prefix,
            self.tenant_id.as_deref(),
            &self.aggregate_type,
            &self.event_type,
        )
    }
}

/// The header the relay stamps each message with: when it published it,
/// in microseconds since the Unix epoch by its wall clock (which the
/// projector's lag breakdown reads; nothing depends on it).
pub const PUBLISHED_AT: &str = "Twofold-Published-At";

/// The stream and sequence a [`Envelope::msg_id`] names:
/// `user:6f1c…:12` → (`user`, `6f1c…`, 12).
pub fn parse_msg_id(id: &str) -> Option<(String, String, i64)> {
    let (rest, sequence) = id.rsplit_once(':')?;
    let (kind, aggregate) = rest.split_once(':')?;
    Some((
        kind.to_string(),
        aggregate.to_string(),
        sequence.parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use twofold_domain::Actor;

    fn envelope(payload: &str) -> Envelope {
        Envelope {
            global_position: 42,
            aggregate_type: "user".into(),
            aggregate_id: "6f1c0d3e-0000-4000-8000-000000000001".into(),
            sequence: 7,
            event_type: "UserLockedOut".into(),
            event_version: "1.0".into(),
            tenant_id: Some("6f1c0d3e-0000-4000-8000-0000000000aa".into()),
            recorded_at: Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap(),
            payload: RawValue::from_string(payload.to_string()).unwrap(),
            opened: None,
        }
    }

    #[test]
    fn an_envelope_written_from_its_fields_is_the_json_serde_writes() {
        let stored = r#"{"UserLockedOut": {"until":null,  "note":"a \"q\" é\n"}}"#;
        for tenant in [None, Some("6f1c0d3e-0000-4000-8000-0000000000aa")] {
            let mut e = envelope(stored);
            e.tenant_id = tenant.map(str::to_string);
            e.aggregate_id = "odd \"id\"\\".into();
            let fields = Fields {
                global_position: e.global_position,
                aggregate_type: &e.aggregate_type,
                aggregate_id: &e.aggregate_id,
                sequence: e.sequence,
                event_type: &e.event_type,
                event_version: &e.event_version,
                tenant_id: e.tenant_id.as_deref(),
                recorded_at: e.recorded_at,
                payload: e.payload.get(),
            };
            assert_eq!(
                String::from_utf8(fields.to_json().unwrap()).unwrap(),
                String::from_utf8(e.to_json().unwrap()).unwrap()
            );
        }
    }

    #[test]
    fn an_envelope_survives_the_wire_with_its_payload_as_stored() {
        // Spacing and key order of the stored JSON are kept byte for byte.
        let stored = r#"{"UserLockedOut": {"until":null,  "ctx":{"at":"2026-03-01T12:00:00Z","actor":{"kind":"system"}}}}"#;
        let sent = envelope(stored);
        let wire = serde_json::to_string(&sent).unwrap();
        assert!(wire.contains(stored), "{wire}");
        let back: Envelope = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, sent);
        assert_eq!(back.payload.get(), stored);
    }

    #[test]
    fn the_ctx_is_read_from_whichever_variant_holds_it() {
        let e = envelope(
            r#"{"UserLockedOut":{"until":null,"ctx":{"at":"2026-03-01T12:00:00Z","actor":{"kind":"system"}}}}"#,
        );
        let ctx = e.ctx().unwrap();
        assert_eq!(ctx.at, Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap());
        assert_eq!(ctx.actor, Actor::System);
        assert_eq!(envelope(r#"{"Other":{"n":1}}"#).ctx(), None);
    }

    #[test]
    fn a_newer_major_version_is_not_known() {
        let mut e = envelope("{}");
        assert!(e.version_is_known());
        e.event_version = "1.3".into();
        assert!(e.version_is_known());
        for v in ["2.0", "x", ""] {
            e.event_version = v.into();
            assert!(!e.version_is_known(), "{v}");
        }
    }

    #[test]
    fn ids_and_subjects_follow_the_relay_scheme() {
        let mut e = envelope("{}");
        assert_eq!(e.msg_id(), "user:6f1c0d3e-0000-4000-8000-000000000001:7");
        assert_eq!(
            parse_msg_id(&e.msg_id()),
            Some((e.aggregate_type.clone(), e.aggregate_id.clone(), 7))
        );
        assert_eq!(parse_msg_id("nonsense"), None);
        assert_eq!(
            e.subject("twofold"),
            "twofold.events.6f1c0d3e-0000-4000-8000-0000000000aa.user.UserLockedOut"
        );
        e.tenant_id = None;
        assert_eq!(e.subject("p"), "p.events.none.user.UserLockedOut");
    }
}
