//! Server keys and what is done with them: sealing TOTP seeds (XChaCha20-Poly1305,
//! key id stored so keys rotate), deriving email/SMS codes (HMAC, so no code is
//! ever stored), and hashing backup codes and tokens.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use twofold_domain::secrets::{SealedSecret, SecretHash};
use twofold_domain::ChallengeId;

use crate::audit_signing::AuditSigner;

type HmacSha256 = Hmac<Sha256>;

/// One 256-bit server key. Never printed.
#[derive(Clone)]
struct ServerKey([u8; 32]);

impl ServerKey {
    /// A purpose-specific subkey, so one configured key serves several uses
    /// without one use's output helping to attack another.
    fn derive(&self, purpose: &str) -> [u8; 32] {
        let mut mac = mac_with(&self.0);
        mac.update(b"twofold/");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

fn mac_with(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable_hmac(),
    }
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    // new_from_slice only fails for fixed-size-key MACs; HMAC has none.
    #[allow(clippy::expect_used)]
    <HmacSha256 as Mac>::new_from_slice(&[0u8; 32]).expect("HMAC takes any key length")
}

/// The configured server keys: the current one for new secrets, older ones by
/// id for what was sealed before a rotation.
#[derive(Clone)]
pub struct Keyring {
    current_id: String,
    keys: BTreeMap<String, ServerKey>,
    /// Signs audit exports: the configured audit signing keys, else keys
    /// derived from the server keys (see [`Keyring::derived_audit_signer`]).
    audit: AuditSigner,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Keyring(current={}, ids={:?})",
            self.current_id,
            self.keys.keys()
        )
    }
}

/// The id prefix of audit signing keys derived from server keys.
const DERIVED_AUDIT_PREFIX: &str = "server-";

const HINT: &str = "set TWOFOLD_KEYS=<id>=<64 hex digits> and TWOFOLD_CURRENT_KEY_ID=<id> (generate a key with: openssl rand -hex 32)";

impl Keyring {
    pub fn from_config(
        keys: &BTreeMap<String, SecretString>,
        current_id: &str,
    ) -> anyhow::Result<Self> {
        if keys.is_empty() {
            bail!("no server key is configured: {HINT}");
        }
        let mut parsed = BTreeMap::new();
        for (id, hex_key) in keys {
            if id.is_empty() || id.contains(':') {
                bail!("key id {id:?} must be non-empty and contain no ':'");
            }
            let bytes = hex::decode(hex_key.expose_secret().trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| anyhow!("key {id:?} must be exactly 64 hex digits: {HINT}"))?;
            parsed.insert(id.clone(), ServerKey(bytes));
        }
        if !parsed.contains_key(current_id) {
            bail!("the current key id {current_id:?} is not among the configured keys: {HINT}");
        }
        let audit = Self::derived_audit_signer(&parsed, current_id)?;
        Ok(Self {
            current_id: current_id.to_string(),
            keys: parsed,
            audit,
        })
    }

    /// A keyring with one fresh random key, for tests and local demos.
    pub fn generate(id: &str) -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let keys = BTreeMap::from([(id.to_string(), ServerKey(key))]);
        let audit = match Self::derived_audit_signer(&keys, id) {
            Ok(audit) => audit,
            // The current id is among `keys` by construction.
            Err(_) => AuditSigner::generate(&format!("{DERIVED_AUDIT_PREFIX}{id}")),
        };
        Self {
            current_id: id.to_string(),
            keys,
            audit,
        }
    }

    /// When no audit signing key is configured: one Ed25519 seed per server
    /// key, HMAC-SHA256 of the server key over the label
    /// `twofold/audit-signing-key`, with the id `server-<server key id>`.
    /// The current server key's signs; the others stay published.
    fn derived_audit_signer(
        keys: &BTreeMap<String, ServerKey>,
        current_id: &str,
    ) -> anyhow::Result<AuditSigner> {
        AuditSigner::from_seeds(
            keys.iter().map(|(id, key)| {
                (
                    format!("{DERIVED_AUDIT_PREFIX}{id}"),
                    key.derive("audit-signing-key"),
                )
            }),
            &format!("{DERIVED_AUDIT_PREFIX}{current_id}"),
        )
    }

    /// This keyring with configured audit signing keys instead of derived ones.
    pub fn with_audit_signer(mut self, audit: AuditSigner) -> Self {
        self.audit = audit;
        self
    }

    /// What signs audit exports.
    pub fn audit_signer(&self) -> &AuditSigner {
        &self.audit
    }

    fn current(&self) -> &ServerKey {
        // from_config and generate both guarantee the current id is present.
        &self.keys[&self.current_id]
    }

    /// Seals a TOTP seed; `context` (the user id) is bound in as associated
    /// data so a sealed seed cannot be moved to another user.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> anyhow::Result<SealedSecret> {
        let cipher = XChaCha20Poly1305::new(&self.current().derive("seal").into());
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .map_err(|_| anyhow!("sealing a secret failed"))?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ciphertext);
        Ok(SealedSecret {
            key_id: self.current_id.clone(),
            sealed: B64.encode(blob),
        })
    }

    /// Opens what [`Keyring::seal`] sealed, with whichever key sealed it.
    pub fn open(&self, sealed: &SealedSecret, context: &[u8]) -> anyhow::Result<Vec<u8>> {
        let key = self.keys.get(&sealed.key_id).with_context(|| {
            format!(
                "the key {:?} that sealed a secret is not configured",
                sealed.key_id
            )
        })?;
        let blob = B64
            .decode(&sealed.sealed)
            .context("a sealed secret is not base64")?;
        if blob.len() < 24 {
            bail!("a sealed secret is too short");
        }
        let (nonce, ciphertext) = blob.split_at(24);
        XChaCha20Poly1305::new(&key.derive("seal").into())
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .map_err(|_| anyhow!("a sealed secret does not open with its key"))
    }

    /// The 6-digit email/SMS code of a challenge's `generation`: derived, never
    /// stored, and the same in the verifier and the dispatcher.
    pub fn delivered_code(&self, challenge: ChallengeId, generation: u32) -> String {
        let mut mac = mac_with(&self.current().derive("delivered-code"));
        mac.update(challenge.as_uuid().as_bytes());
        mac.update(&generation.to_be_bytes());
        let digest = mac.finalize().into_bytes();
        // RFC 4226 dynamic truncation.
        let offset = (digest[31] & 0x0f) as usize;
        let value = u32::from_be_bytes([
            digest[offset] & 0x7f,
            digest[offset + 1],
            digest[offset + 2],
            digest[offset + 3],
        ]);
        format!("{:06}", value % 1_000_000)
    }

    /// The anti-forgery token of a browser's form nonce: forms carry it, and a
    /// post is accepted only when it matches the nonce in the browser's cookie
    /// (a signed double-submit cookie; a forger can read neither).
    pub fn form_token(&self, nonce: &str) -> String {
        let mut mac = mac_with(&self.current().derive("form-token"));
        mac.update(nonce.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The name a budget keeps a client address, recipient or account under:
    /// a keyed hash, so the budgets table holds no personal data. (A key
    /// rotation starts every budget afresh.)
    pub fn budget_key(&self, kind: &str, value: &str) -> String {
        let mut mac = mac_with(&self.current().derive("budget-key"));
        mac.update(kind.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// The secret part of a password reset link: derived from the user and
    /// the reset's id by the current server key, never stored or sent
    /// anywhere but in the user's email.
    pub fn reset_link_mac(&self, user: &[u8], reset_id: &[u8]) -> String {
        let mut mac = mac_with(&self.current().derive("reset-link"));
        mac.update(user);
        mac.update(reset_id);
        hex::encode(mac.finalize().into_bytes())
    }

    /// A password reset link's token: `<user>.<reset>.<secret>`.
    pub fn reset_token(&self, user: uuid::Uuid, reset_id: uuid::Uuid) -> String {
        format!(
            "{user}.{reset_id}.{}",
            self.reset_link_mac(user.as_bytes(), reset_id.as_bytes())
        )
    }

    /// Whether `presented` is the reset link secret of (user, reset), in
    /// constant time.
    pub fn reset_link_matches(&self, user: &[u8], reset_id: &[u8], presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        let expected = self.reset_link_mac(user, reset_id);
        expected.len() == presented.len()
            && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
    }

    /// Whether `presented` is the form token of `nonce`, in constant time.
    pub fn form_token_matches(&self, nonce: &str, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        let expected = self.form_token(nonce);
        expected.len() == presented.len()
            && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
    }

    /// Keyed hash of a backup code for one user, as `key_id:hex`.
    pub fn backup_code_hash(&self, user: &[u8], normalized_code: &str) -> SecretHash {
        self.backup_code_hash_with(&self.current_id, user, normalized_code)
            .unwrap_or_else(|| SecretHash(String::new()))
    }

    /// The same under the key named `key_id` (the one the stored hashes name).
    pub fn backup_code_hash_with(
        &self,
        key_id: &str,
        user: &[u8],
        normalized_code: &str,
    ) -> Option<SecretHash> {
        let key = self.keys.get(key_id)?;
        let mut mac = mac_with(&key.derive("backup-code"));
        mac.update(user);
        mac.update(normalized_code.as_bytes());
        Some(SecretHash(format!(
            "{key_id}:{}",
            hex::encode(mac.finalize().into_bytes())
        )))
    }
}

/// A fresh random 256-bit key as 64 hex digits, for `TWOFOLD_KEYS`.
pub fn new_key_hex() -> String {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    hex::encode(key)
}

/// Hash of a 256-bit random token. Such a token cannot be guessed, so a plain
/// hash is enough and survives key rotation.
pub fn token_hash(token_bytes: &[u8]) -> SecretHash {
    SecretHash(hex::encode(Sha256::digest(token_bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn sealed_secrets_open_only_with_their_context() {
        let ring = Keyring::generate("k1");
        let sealed = ring.seal(b"seed", b"user-1").unwrap();
        assert!(!sealed.sealed.contains("seed"));
        assert_eq!(ring.open(&sealed, b"user-1").unwrap(), b"seed");
        assert!(ring.open(&sealed, b"user-2").is_err());
    }

    #[test]
    fn an_old_key_still_opens_after_rotation() {
        let old = Keyring::generate("old");
        let sealed = old.seal(b"seed", b"u").unwrap();
        let mut rotated = Keyring::generate("new");
        rotated.keys.extend(old.keys.clone());
        assert_eq!(rotated.open(&sealed, b"u").unwrap(), b"seed");
        assert_eq!(rotated.seal(b"x", b"u").unwrap().key_id, "new");
    }

    #[test]
    fn delivered_codes_are_six_digits_and_move_with_the_generation() {
        let ring = Keyring::generate("k");
        let c = ChallengeId(Uuid::new_v4());
        let a = ring.delivered_code(c, 0);
        assert_eq!(a.len(), 6);
        assert!(a.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(a, ring.delivered_code(c, 0));
        let differs = (1..5).any(|g| ring.delivered_code(c, g) != a);
        assert!(differs);
    }

    #[test]
    fn configured_keys_are_checked() {
        let keys = BTreeMap::from([("k".to_string(), SecretString::from("abc".to_string()))]);
        assert!(Keyring::from_config(&keys, "k").is_err());
        let keys = BTreeMap::from([("k".to_string(), SecretString::from("ab".repeat(32)))]);
        assert!(Keyring::from_config(&keys, "other").is_err());
        assert!(Keyring::from_config(&keys, "k").is_ok());
    }
}
