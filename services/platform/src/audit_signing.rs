//! The audit signing keys: Ed25519 keys by id that sign the trailer of every
//! audit export (the current one signs; older ones stay published so exports
//! they signed still verify), and the public side an auditor checks with.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The only algorithm exports are signed with.
pub const ALGORITHM: &str = "ed25519";

const HINT: &str = "set TWOFOLD_AUDIT_SIGNING_KEYS=<id>=<64 hex digits> and TWOFOLD_AUDIT_SIGNING_KEY_ID=<id> (generate a seed with: twofold keygen --audit)";

/// The signing keys by id; the current one signs. Never printed.
#[derive(Clone)]
pub struct AuditSigner {
    current_id: String,
    keys: BTreeMap<String, SigningKey>,
}

impl std::fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AuditSigner(current={}, ids={:?})",
            self.current_id,
            self.keys.keys()
        )
    }
}

/// A signature as an export's trailer carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSignature {
    pub key_id: String,
    /// Base64 of the 64-byte Ed25519 signature.
    pub signature: String,
}

/// One public key as `GET /audit/keys` and `twofold audit public-key` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedKey {
    pub key_id: String,
    pub algorithm: String,
    /// Base64 of the 32-byte Ed25519 public key.
    pub public_key: String,
    pub current: bool,
}

/// The published keys, as one JSON document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedKeys {
    pub keys: Vec<PublishedKey>,
}

impl AuditSigner {
    /// The configured seeds (64 hex digits each) and the id of the one that signs.
    pub fn from_config(
        seeds: &BTreeMap<String, SecretString>,
        current_id: &str,
    ) -> anyhow::Result<Self> {
        if seeds.is_empty() {
            bail!("no audit signing key is configured: {HINT}");
        }
        let mut keys = BTreeMap::new();
        for (id, seed) in seeds {
            if id.is_empty() || id.contains([',', '=', ' ']) {
                bail!("audit signing key id {id:?} must be non-empty, without ',', '=' or spaces");
            }
            let bytes = hex::decode(seed.expose_secret().trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    anyhow!("audit signing key {id:?} must be exactly 64 hex digits: {HINT}")
                })?;
            keys.insert(id.clone(), SigningKey::from_bytes(&bytes));
        }
        Self::from_keys(keys, current_id)
    }

    /// Keys already derived (from the server keys, see `Keyring`).
    pub(crate) fn from_seeds(
        seeds: impl IntoIterator<Item = (String, [u8; 32])>,
        current_id: &str,
    ) -> anyhow::Result<Self> {
        let keys = seeds
            .into_iter()
            .map(|(id, seed)| (id, SigningKey::from_bytes(&seed)))
            .collect();
        Self::from_keys(keys, current_id)
    }

    fn from_keys(keys: BTreeMap<String, SigningKey>, current_id: &str) -> anyhow::Result<Self> {
        if !keys.contains_key(current_id) {
            bail!(
                "the audit signing key id {current_id:?} is not among the configured keys: {HINT}"
            );
        }
        Ok(Self {
            current_id: current_id.to_string(),
            keys,
        })
    }

    /// One fresh random key, for tests.
    pub fn generate(id: &str) -> Self {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        Self {
            current_id: id.to_string(),
            keys: BTreeMap::from([(id.to_string(), SigningKey::from_bytes(&seed))]),
        }
    }

    pub fn current_id(&self) -> &str {
        &self.current_id
    }

    /// Signs `message` with the current key.
    pub fn sign(&self, message: &[u8]) -> ExportSignature {
        // from_keys and generate both guarantee the current id is present.
        let key = &self.keys[&self.current_id];
        ExportSignature {
            key_id: self.current_id.clone(),
            signature: B64.encode(key.sign(message).to_bytes()),
        }
    }

    /// Every key's public half, the current one marked.
    pub fn published(&self) -> PublishedKeys {
        PublishedKeys {
            keys: self
                .keys
                .iter()
                .map(|(id, key)| PublishedKey {
                    key_id: id.clone(),
                    algorithm: ALGORITHM.to_string(),
                    public_key: B64.encode(key.verifying_key().to_bytes()),
                    current: *id == self.current_id,
                })
                .collect(),
        }
    }
}

/// A fresh random Ed25519 seed as 64 hex digits, for
/// `TWOFOLD_AUDIT_SIGNING_KEYS`, and its public key (base64).
pub fn new_seed() -> (String, String) {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let public = B64.encode(SigningKey::from_bytes(&seed).verifying_key().to_bytes());
    (hex::encode(seed), public)
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureProblem {
    #[error("signed by key {0}, not among the keys given")]
    UnknownKey(String),
    #[error(
        "the signature does not match: the trailer was rewritten or the export did not come from this server"
    )]
    Mismatch,
}

/// The public keys an auditor checks exports with: by id, and possibly one
/// given without an id (then it is tried whatever key id the trailer names).
#[derive(Debug, Clone, Default)]
pub struct VerifyingKeys {
    by_id: BTreeMap<String, VerifyingKey>,
    unnamed: Option<VerifyingKey>,
}

/// A public key as base64 (44 characters) or hex (64 digits).
fn parse_public_key(text: &str) -> anyhow::Result<VerifyingKey> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).ok()
    } else {
        B64.decode(text).ok()
    };
    let bytes = bytes
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .context("a public key is 32 bytes, as base64 or 64 hex digits")?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| anyhow!("not an Ed25519 public key"))
}

impl VerifyingKeys {
    /// The keys JSON of `GET /audit/keys` (or `twofold audit public-key`),
    /// or `id=key,id2=key2`, or one bare key.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        let mut keys = Self::default();
        if text.starts_with('{') {
            let published: PublishedKeys =
                serde_json::from_str(text).context("reading the public keys JSON")?;
            for key in published.keys {
                if key.algorithm != ALGORITHM {
                    bail!(
                        "key {}: algorithm {} is not ed25519",
                        key.key_id,
                        key.algorithm
                    );
                }
                let parsed = parse_public_key(&key.public_key)
                    .with_context(|| format!("key {}", key.key_id))?;
                keys.by_id.insert(key.key_id, parsed);
            }
        } else {
            for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                match item.split_once('=') {
                    // Base64 ends in '=' padding: an id is before any key text.
                    Some((id, key)) if !id.is_empty() && !key.is_empty() => {
                        keys.by_id.insert(id.to_string(), parse_public_key(key)?);
                    }
                    _ => keys.unnamed = Some(parse_public_key(item)?),
                }
            }
        }
        if keys.by_id.is_empty() && keys.unnamed.is_none() {
            bail!("no public key given");
        }
        Ok(keys)
    }

    /// Checks `signature` (base64) over `message` with the key named `key_id`.
    pub fn check(
        &self,
        key_id: &str,
        message: &[u8],
        signature: &str,
    ) -> Result<(), SignatureProblem> {
        let key = self
            .by_id
            .get(key_id)
            .or(self.unnamed.as_ref())
            .ok_or_else(|| SignatureProblem::UnknownKey(key_id.to_string()))?;
        let signature = B64
            .decode(signature.trim())
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(|b| Signature::from_bytes(&b))
            .ok_or(SignatureProblem::Mismatch)?;
        key.verify(message, &signature)
            .map_err(|_| SignatureProblem::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_with_the_published_key_and_nothing_else() {
        let signer = AuditSigner::generate("a1");
        let signed = signer.sign(b"message");
        let published = serde_json::to_string(&signer.published()).unwrap();
        assert!(!published.contains("secret"));
        let keys = VerifyingKeys::parse(&published).unwrap();
        assert_eq!(keys.check("a1", b"message", &signed.signature), Ok(()));
        assert_eq!(
            keys.check("a1", b"messagE", &signed.signature),
            Err(SignatureProblem::Mismatch)
        );
        assert_eq!(
            keys.check("a0", b"message", &signed.signature),
            Err(SignatureProblem::UnknownKey("a0".into()))
        );
        let other =
            VerifyingKeys::parse(&AuditSigner::generate("a1").published().keys[0].public_key)
                .unwrap();
        assert_eq!(
            other.check("a1", b"message", &signed.signature),
            Err(SignatureProblem::Mismatch)
        );
    }

    #[test]
    fn keys_are_read_as_base64_hex_or_by_id() {
        let (seed, public) = new_seed();
        let seeds = BTreeMap::from([("a".to_string(), SecretString::from(seed))]);
        let signer = AuditSigner::from_config(&seeds, "a").unwrap();
        let signed = signer.sign(b"m");
        let hex_key = hex::encode(B64.decode(&public).unwrap());
        for given in [public.clone(), hex_key, format!("a={public}")] {
            let keys = VerifyingKeys::parse(&given).unwrap();
            assert_eq!(keys.check("a", b"m", &signed.signature), Ok(()), "{given}");
        }
        assert!(VerifyingKeys::parse("nope").is_err());
        assert!(AuditSigner::from_config(&seeds, "b").is_err());
        let short = BTreeMap::from([("a".to_string(), SecretString::from("ab".to_string()))]);
        assert!(AuditSigner::from_config(&short, "a").is_err());
    }
}
