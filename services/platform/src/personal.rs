//! Personal data in user events, sealed under the user's own data key, so
//! that erasing a user is deleting one key (crypto-shredding).
//!
//! The domain's events keep plain values; the event store seals them as it
//! writes a user's events: every string under a personal field (`username`,
//! `email`, `phone`, `ip`, `user_agent`, a new contact, the `previous` one)
//! becomes `sealed:1:<user id>:<base64 of nonce || XChaCha20-Poly1305>`,
//! bound to the user. The user's data key lives in `data_keys`, itself
//! sealed under a server key (whose id is kept beside it) the way TOTP
//! seeds are. Readers open what they read; once the key is gone a sealed
//! value opens as [`ERASED`]. The event store, the outbox's JetStream copies
//! and the audit history only ever hold the sealed form.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::PgExecutor;
use twofold_domain::secrets::SealedSecret;

use crate::crypto::Keyring;
use crate::envelope::Envelope;
use crate::store::Cache;

pub use twofold_domain::user::ERASED;

/// How a sealed value starts: the format's version, then the data key's id
/// (the user's id) and the sealed bytes.
pub const SEALED_PREFIX: &str = "sealed:1:";

/// Finds [`SEALED_PREFIX`] in a text (built once: an export searches every
/// entry's text for it).
static SEALED_FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(SEALED_PREFIX));

/// Whether `text` holds [`SEALED_PREFIX`] anywhere.
pub fn holds_sealed(text: &str) -> bool {
    SEALED_FINDER.find(text.as_bytes()).is_some()
}

/// The payload fields whose strings are personal.
const PERSONAL: &[&str] = &[
    "username",
    "email",
    "phone",
    "ip",
    "user_agent",
    "previous",
    "Email",
    "Phone",
];

/// The fields of a user's state (a snapshot) whose strings are personal
/// beyond those of [`PERSONAL`]: the addresses the user signed in from.
const PERSONAL_IN_STATE: &[&str] = &["trusted_ips"];

/// Events written unsealed: they carry nothing of the user's (the erasure
/// itself, whose context is the admin's, must stay readable after it).
const UNSEALED_EVENTS: &[&str] = &["UserErased"];

/// Data keys a process remembers for sealing (the write path only).
const REMEMBERED_KEYS: usize = 16_384;

/// A user's 256-bit data key. Never printed.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self(key)
    }
}

/// Seals and opens personal data; cheap to clone.
#[derive(Clone)]
pub struct Personal {
    keys: Keyring,
    /// Data keys used to seal recently, by user id. Readers never use it:
    /// they read the keys afresh, so an erasure shows at once everywhere.
    sealing: Arc<Cache<String, DataKey>>,
}

impl std::fmt::Debug for Personal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Personal(..)")
    }
}

fn wrap_context(user_id: &str) -> Vec<u8> {
    format!("twofold/data-key/{user_id}").into_bytes()
}

fn value_context(user_id: &str) -> Vec<u8> {
    format!("twofold/personal/{user_id}").into_bytes()
}

/// A new data key for a user, and its wrapped form for `data_keys`.
pub struct NewDataKey {
    pub key: DataKey,
    pub server_key_id: String,
    pub wrapped: String,
}

impl Personal {
    pub fn new(keys: Keyring) -> Self {
        Self {
            keys,
            sealing: Arc::new(Cache::new(REMEMBERED_KEYS)),
        }
    }

    /// A fresh data key for `user_id`, wrapped under the current server key.
    pub fn new_key(&self, user_id: &str) -> anyhow::Result<NewDataKey> {
        let key = DataKey::generate();
        let SealedSecret { key_id, sealed } = self.keys.seal(&key.0, &wrap_context(user_id))?;
        Ok(NewDataKey {
            key,
            server_key_id: key_id,
            wrapped: sealed,
        })
    }

    /// Unwraps a key read from `data_keys` (`None` if it does not open:
    /// its server key is no longer configured, or the row was tampered with).
    pub fn unwrap(&self, user_id: &str, server_key_id: &str, wrapped: &str) -> Option<DataKey> {
        let sealed = SealedSecret {
            key_id: server_key_id.to_string(),
            sealed: wrapped.to_string(),
        };
        let bytes = self.keys.open(&sealed, &wrap_context(user_id)).ok()?;
        <[u8; 32]>::try_from(bytes).ok().map(DataKey)
    }

    /// The key remembered for sealing `user_id`'s events.
    pub fn remembered(&self, user_id: &str) -> Option<DataKey> {
        self.sealing.get(&user_id.to_string())
    }

    pub fn remember(&self, user_id: &str, key: DataKey) {
        self.sealing.put(user_id.to_string(), key);
    }

    pub fn forget(&self, user_id: &str) {
        self.sealing.remove(&user_id.to_string());
    }

    /// An event's payload (JSON) with its personal strings sealed under
    /// `key`, the data key of `user_id`.
    pub fn seal_payload(
        &self,
        user_id: &str,
        key: &DataKey,
        event_type: &str,
        payload: String,
    ) -> anyhow::Result<String> {
        if UNSEALED_EVENTS.contains(&event_type) {
            return Ok(payload);
        }
        seal_fields(user_id, key, &payload, &|k| PERSONAL.contains(&k))
    }

    /// A user's state as a snapshot holds it (JSON) with its personal
    /// strings sealed under `key`, the data key of `user_id`: what the
    /// events seal, and the addresses the user signed in from. A snapshot is
    /// opened as events are ([`Personal::open_text`]).
    pub fn seal_state(&self, user_id: &str, key: &DataKey, state: &str) -> anyhow::Result<String> {
        seal_fields(user_id, key, state, &|k| {
            PERSONAL.contains(&k) || PERSONAL_IN_STATE.contains(&k)
        })
    }

    /// The ids of the data keys the sealed values in `text` name.
    pub fn key_ids(text: &str) -> Vec<String> {
        let mut ids: Vec<String> = Self::key_ids_in(text).map(str::to_string).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The ids of the data keys the sealed values in `text` name, as
    /// they stand in it (a key's id once for each value it seals).
    pub fn key_ids_in(text: &str) -> impl Iterator<Item = &str> {
        SEALED_FINDER.find_iter(text.as_bytes()).filter_map(|at| {
            let rest = &text[at + SEALED_PREFIX.len()..];
            rest.split_once(':').map(|(id, _)| id)
        })
    }

    /// The data keys of `user_ids` as they stand in `data_keys` now (an
    /// erased user's is absent).
    pub async fn read_keys<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        user_ids: &[String],
    ) -> Result<Keys, sqlx::Error> {
        if user_ids.is_empty() {
            return Ok(Keys::default());
        }
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT user_id, server_key_id, wrapped FROM data_keys WHERE user_id = ANY($1)",
        )
        .bind(user_ids)
        .fetch_all(executor)
        .await?;
        Ok(self.keys_of_rows(rows))
    }

    /// The data keys of `data_keys` rows (user id, server key id, wrapped
    /// key), for a caller that reads them with other rows in one statement.
    pub fn keys_of_rows(&self, rows: impl IntoIterator<Item = (String, String, String)>) -> Keys {
        Keys(
            rows.into_iter()
                .filter_map(|(id, kid, wrapped)| {
                    let key = self.unwrap(&id, &kid, &wrapped)?;
                    Some((id, key))
                })
                .collect(),
        )
    }

    /// `text` (JSON) with every sealed string opened with `keys`, or
    /// [`ERASED`] where its key is not among them. Works on the text, not a
    /// parsed tree (a rebuild opens every event): a sealed value is a whole
    /// JSON string of base64, id and prefix characters, and a quote
    /// starting one is never escaped (an escaped quote is inside another
    /// string, and an unescaped closing quote is never followed by a letter).
    pub fn open_text<'t>(text: &'t str, keys: &Keys) -> Cow<'t, str> {
        const OPENING: &str = "\"sealed:1:";
        if !text.contains(OPENING) {
            return Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len());
        let mut done = 0;
        let mut from = 0;
        while let Some(found) = text[from..].find(OPENING) {
            let at = from + found;
            from = at + 1;
            if text[..at].ends_with('\\') {
                continue;
            }
            let Some(len) = text[at + 1..].find('"') else {
                break;
            };
            let sealed = &text[at + 1..at + 1 + len];
            if !sealed
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=:-".contains(&b))
            {
                continue;
            }
            out.push_str(&text[done..at]);
            let opened = keys.open(sealed);
            match serde_json::to_string(&opened) {
                Ok(quoted) => out.push_str(&quoted),
                Err(_) => out.push_str("\"\""),
            }
            done = at + 1 + len + 1;
            from = done;
        }
        out.push_str(&text[done..]);
        Cow::Owned(out)
    }

    /// Opens every sealed string in `value`, in place.
    pub fn open_value(value: &mut Value, keys: &Keys) {
        match value {
            Value::String(s) if s.starts_with(SEALED_PREFIX) => *s = keys.open(s),
            Value::Array(items) => items.iter_mut().for_each(|v| Self::open_value(v, keys)),
            Value::Object(map) => map.values_mut().for_each(|v| Self::open_value(v, keys)),
            _ => {}
        }
    }

    /// One value as shown: opened, or [`ERASED`].
    pub fn open_str(value: &str, keys: &Keys) -> String {
        if value.starts_with(SEALED_PREFIX) {
            keys.open(value)
        } else {
            value.to_string()
        }
    }

    /// Opens the payloads of `envelopes` (their `opened`), reading the keys
    /// they name in one query.
    pub async fn open_envelopes<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        envelopes: &mut [Envelope],
    ) -> Result<(), sqlx::Error> {
        let ids = Self::envelopes_key_ids(envelopes);
        if ids.is_empty() {
            return Ok(());
        }
        let keys = self.read_keys(executor, &ids).await?;
        Self::open_envelopes_with(envelopes, &keys);
        Ok(())
    }

    /// The ids of the data keys the sealed values of `envelopes` name
    /// (sorted, each once); only user streams are sealed.
    pub fn envelopes_key_ids(envelopes: &[Envelope]) -> Vec<String> {
        let mut ids: Vec<String> = envelopes
            .iter()
            .filter(|e| e.aggregate_type == "user")
            .flat_map(|e| Self::key_ids(e.payload.get()))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Opens the payloads of `envelopes` (their `opened`) with `keys`.
    pub fn open_envelopes_with(envelopes: &mut [Envelope], keys: &Keys) {
        for envelope in envelopes.iter_mut().filter(|e| e.aggregate_type == "user") {
            if let Cow::Owned(opened) = Self::open_text(envelope.payload.get(), keys) {
                envelope.opened = RawValue::from_string(opened).ok();
            }
        }
    }
}

/// Data keys by user id, to open with.
#[derive(Debug, Clone, Default)]
pub struct Keys(HashMap<String, DataKey>);

impl Keys {
    pub fn one(user_id: &str, key: Option<DataKey>) -> Self {
        Self(key.map(|k| (user_id.to_string(), k)).into_iter().collect())
    }

    /// Adds `other`'s keys.
    pub fn extend(&mut self, other: Keys) {
        self.0.extend(other.0);
    }

    /// The keys of `user_ids` among these (an erased user's stays absent):
    /// what opens a part of what these open, handed to another thread
    /// without the rest.
    pub fn only<'a>(&self, user_ids: impl IntoIterator<Item = &'a str>) -> Keys {
        Self(
            user_ids
                .into_iter()
                .filter_map(|id| Some((id.to_string(), self.0.get(id)?.clone())))
                .collect(),
        )
    }

    fn open(&self, sealed: &str) -> String {
        self.try_open(sealed).unwrap_or_else(|| ERASED.to_string())
    }

    fn try_open(&self, sealed: &str) -> Option<String> {
        let rest = sealed.strip_prefix(SEALED_PREFIX)?;
        let (user_id, blob) = rest.split_once(':')?;
        let key = self.0.get(user_id)?;
        let mut blob = B64.decode(blob).ok()?;
        if blob.len() < 24 {
            return None;
        }
        // Opened where it was decoded: the plaintext becomes the string.
        let nonce = *XNonce::from_slice(&blob[..24]);
        blob.drain(..24);
        XChaCha20Poly1305::new(&key.0.into())
            .decrypt_in_place(&nonce, &value_context(user_id), &mut blob)
            .ok()?;
        String::from_utf8(blob).ok()
    }
}

/// `json` with every string under a field `personal` names sealed under
/// `key`, the data key of `user_id`.
fn seal_fields(
    user_id: &str,
    key: &DataKey,
    json: &str,
    personal: &impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let mut value: Value = serde_json::from_str(json)?;
    let cipher = XChaCha20Poly1305::new(&key.0.into());
    let context = value_context(user_id);
    let mut seal = |plain: &str| -> anyhow::Result<String> {
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: &context,
                },
            )
            .map_err(|_| anyhow::anyhow!("sealing personal data failed"))?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        Ok(format!("{SEALED_PREFIX}{user_id}:{}", B64.encode(blob)))
    };
    walk_fields(&mut value, personal, &mut |v| seal_strings(v, &mut seal))?;
    Ok(serde_json::to_string(&value)?)
}

/// Calls `f` on the value of every personal field, at any depth.
fn walk_fields(
    value: &mut Value,
    personal: &impl Fn(&str) -> bool,
    f: &mut impl FnMut(&mut Value) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if personal(k.as_str()) {
                    f(v)?;
                } else {
                    walk_fields(v, personal, f)?;
                }
            }
        }
        Value::Array(items) => {
            for v in items {
                walk_fields(v, personal, f)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Seals every string in `value`.
fn seal_strings(
    value: &mut Value,
    seal: &mut impl FnMut(&str) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    match value {
        Value::String(s) => *s = seal(s)?,
        Value::Array(items) => {
            for v in items {
                seal_strings(v, seal)?;
            }
        }
        Value::Object(map) => {
            for v in map.values_mut() {
                seal_strings(v, seal)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personal_fields_are_sealed_and_open_with_the_key_only() {
        let personal = Personal::new(Keyring::generate("k1"));
        let made = personal.new_key("u1").unwrap();
        let payload = r#"{"UserRegistered":{"username":"ann","email":"ann@x.test","roles":["staff"],"ctx":{"ip":"10.0.0.1","user_agent":"Fox/1","reason":"hired"}}}"#;
        let sealed = personal
            .seal_payload("u1", &made.key, "UserRegistered", payload.to_string())
            .unwrap();
        for plain in ["ann@x.test", "10.0.0.1", "Fox/1", "\"ann\""] {
            assert!(!sealed.contains(plain), "{plain} in {sealed}");
        }
        assert!(sealed.contains("hired") && sealed.contains("staff"));
        assert_eq!(Personal::key_ids(&sealed), ["u1"]);
        let key = personal
            .unwrap("u1", &made.server_key_id, &made.wrapped)
            .unwrap();
        let opened: Value =
            serde_json::from_str(&Personal::open_text(&sealed, &Keys::one("u1", Some(key))))
                .unwrap();
        assert_eq!(opened, serde_json::from_str::<Value>(payload).unwrap());
        let erased: Value =
            serde_json::from_str(&Personal::open_text(&sealed, &Keys::default())).unwrap();
        assert_eq!(erased["UserRegistered"]["email"], ERASED);
        assert_eq!(erased["UserRegistered"]["ctx"]["user_agent"], ERASED);
        assert_eq!(erased["UserRegistered"]["ctx"]["reason"], "hired");
        // A key wrapped for one user does not open as another's.
        assert!(personal
            .unwrap("u2", &made.server_key_id, &made.wrapped)
            .is_none());
    }

    #[test]
    fn a_users_state_is_sealed_with_the_addresses_it_trusts_and_opens_whole() {
        let personal = Personal::new(Keyring::generate("k1"));
        let made = personal.new_key("u1").unwrap();
        let state = r#"{"id":"u1","username":"ann","email":"ann@x.test","phone":null,"roles":["staff"],"trusted_ips":["10.0.0.1","2001:db8::7"],"pending_contact":["c1",{"Phone":"+4915100000"}],"sign_ins":3}"#;
        let sealed = personal.seal_state("u1", &made.key, state).unwrap();
        for plain in [
            "\"ann\"",
            "ann@x.test",
            "10.0.0.1",
            "2001:db8::7",
            "+4915100000",
        ] {
            assert!(!sealed.contains(plain), "{plain} in {sealed}");
        }
        assert!(sealed.contains("staff") && sealed.contains("\"sign_ins\":3"));
        let keys = Keys::one("u1", Some(made.key.clone()));
        let opened: Value = serde_json::from_str(&Personal::open_text(&sealed, &keys)).unwrap();
        assert_eq!(opened, serde_json::from_str::<Value>(state).unwrap());
        // An event's fields alone leave the trusted addresses as they are.
        let as_event = personal
            .seal_payload("u1", &made.key, "X", state.to_string())
            .unwrap();
        assert!(as_event.contains("10.0.0.1"));
    }

    #[test]
    fn a_value_that_looks_sealed_is_sealed_again_and_opens_as_typed() {
        let personal = Personal::new(Keyring::generate("k1"));
        let made = personal.new_key("u1").unwrap();
        let fake = r#"{"E":{"ctx":{"user_agent":"sealed:1:u1:AAAA"}}}"#;
        let sealed = personal
            .seal_payload("u1", &made.key, "E", fake.to_string())
            .unwrap();
        let opened = Personal::open_text(&sealed, &Keys::one("u1", Some(made.key)));
        assert_eq!(
            serde_json::from_str::<Value>(&opened).unwrap(),
            serde_json::from_str::<Value>(fake).unwrap()
        );
    }

    #[test]
    fn opening_leaves_escaped_look_alikes_and_odd_characters_alone() {
        let personal = Personal::new(Keyring::generate("k1"));
        let made = personal.new_key("u1").unwrap();
        let payload = r#"{"E":{"reason":"quote \"sealed:1:u1:AAAA\" here","ctx":{"ip":"x\"y\\","user_agent":"Zoë \u0001"}}}"#;
        let sealed = personal
            .seal_payload("u1", &made.key, "E", payload.to_string())
            .unwrap();
        let opened = Personal::open_text(&sealed, &Keys::one("u1", Some(made.key)));
        assert_eq!(
            serde_json::from_str::<Value>(&opened).unwrap(),
            serde_json::from_str::<Value>(payload).unwrap()
        );
        let erased: Value =
            serde_json::from_str(&Personal::open_text(&sealed, &Keys::default())).unwrap();
        assert_eq!(erased["E"]["reason"], "quote \"sealed:1:u1:AAAA\" here");
        assert_eq!(erased["E"]["ctx"]["ip"], ERASED);
    }
}
