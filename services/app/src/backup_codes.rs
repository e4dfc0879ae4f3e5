//! Backup codes: 8 single-use codes of 10 characters (about 49 bits each),
//! shown once when issued and kept only as keyed hashes.

use rand::Rng;
use twofold_domain::secrets::{SealedSecret, SecretHash};
use twofold_domain::user::{NewBackupCodes, User, BACKUP_CODE_COUNT};
use twofold_platform::crypto::Keyring;

/// No 0/o, 1/l/i: codes are read off paper and typed in.
const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
const LEN: usize = 10;

/// A fresh code as typed: 10 characters of [`ALPHABET`].
fn fresh() -> String {
    let mut rng = rand::rngs::OsRng;
    (0..LEN)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A code as shown to the user: `abcde-23456`.
fn shown(raw: &str) -> String {
    format!("{}-{}", &raw[..5], &raw[5..])
}

/// Fresh codes as shown to the user (`abcde-23456`) and their hashes.
pub fn issue_hashed(keys: &Keyring, user_id: &[u8]) -> (Vec<String>, Vec<SecretHash>) {
    (0..BACKUP_CODE_COUNT)
        .map(|_| {
            let raw = fresh();
            let hash = keys.backup_code_hash(user_id, &raw);
            (shown(&raw), hash)
        })
        .unzip()
}

/// Fresh codes as shown, and what the user's stream keeps of them: their
/// hashes (to check them) and the codes sealed (to show them again).
pub fn issue(keys: &Keyring, user_id: &[u8]) -> anyhow::Result<(Vec<String>, NewBackupCodes)> {
    let (codes, hashes) = issue_hashed(keys, user_id);
    let sealed = Some(seal(keys, user_id, &codes)?);
    Ok((codes, NewBackupCodes { hashes, sealed }))
}

/// Sealing binds the codes to their user and to this purpose, so a sealed
/// TOTP seed and sealed codes can never be swapped.
fn context(user_id: &[u8]) -> Vec<u8> {
    [user_id, b"/backup-codes"].concat()
}

fn seal(keys: &Keyring, user_id: &[u8], codes: &[String]) -> anyhow::Result<SealedSecret> {
    keys.seal(codes.join("\n").as_bytes(), &context(user_id))
}

/// The user's codes as sealed, in slot order.
pub fn open(keys: &Keyring, user_id: &[u8], sealed: &SealedSecret) -> anyhow::Result<Vec<String>> {
    let plain = keys.open(sealed, &context(user_id))?;
    Ok(String::from_utf8(plain)?
        .split('\n')
        .map(str::to_string)
        .collect())
}

/// A new code for the slot the presented one (`hash`) takes, hashed with the
/// key the user's codes use, and the user's codes sealed again with it.
pub fn replacement(
    keys: &Keyring,
    user: &User,
    presented: &SecretHash,
    new_code: &str,
) -> anyhow::Result<twofold_domain::user::ReplacementCode> {
    let raw = new_code.replace('-', "");
    let hash = hash_for(keys, user, &raw);
    let user_id = user.id.map(|u| u.as_uuid()).unwrap_or_default();
    let slot = user
        .backup_codes
        .iter()
        .position(|s| !s.used && s.hash.matches(presented));
    let sealed = match (&user.sealed_backup_codes, slot) {
        (Some(sealed), Some(slot)) => {
            let mut codes = open(keys, user_id.as_bytes(), sealed)?;
            if let Some(c) = codes.get_mut(slot) {
                *c = new_code.to_string();
            }
            Some(seal(keys, user_id.as_bytes(), &codes)?)
        }
        _ => None,
    };
    Ok(twofold_domain::user::ReplacementCode { hash, sealed })
}

/// A fresh code, as shown, to replace a used one.
pub fn new_code() -> String {
    shown(&fresh())
}

/// The code as stored: lowercase, without the hyphen. `None` if it cannot be one.
pub fn normalize(presented: &str) -> Option<String> {
    let lower = presented.to_ascii_lowercase();
    let raw = match lower.split_once('-') {
        Some((a, b)) if a.len() == 5 => format!("{a}{b}"),
        Some(_) => return None,
        None => lower,
    };
    (raw.len() == LEN && raw.bytes().all(|b| ALPHABET.contains(&b))).then_some(raw)
}

/// The hash of a presented code under the key the user's codes were hashed with.
pub fn hash_for(keys: &Keyring, user: &User, normalized: &str) -> SecretHash {
    let user_id = user.id.map(|u| u.as_uuid()).unwrap_or_default();
    let key_id = user
        .backup_codes
        .first()
        .and_then(|slot| slot.hash.0.split_once(':'))
        .map(|(id, _)| id.to_string());
    key_id
        .and_then(|id| keys.backup_code_hash_with(&id, user_id.as_bytes(), normalized))
        .unwrap_or_else(|| keys.backup_code_hash(user_id.as_bytes(), normalized))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_codes_normalize_back_and_are_distinct() {
        let keys = Keyring::generate("k");
        let (codes, hashes) = issue_hashed(&keys, b"user");
        assert_eq!(codes.len(), BACKUP_CODE_COUNT);
        for (code, hash) in codes.iter().zip(&hashes) {
            let raw = normalize(code).unwrap();
            assert!(keys.backup_code_hash(b"user", &raw).matches(hash));
            assert!(!hash.0.contains(&raw));
            assert_eq!(
                normalize(&code.to_uppercase()).as_deref(),
                Some(raw.as_str())
            );
        }
        let mut unique = codes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), codes.len());
    }

    #[test]
    fn sealed_codes_open_for_their_user_only() {
        let keys = Keyring::generate("k");
        let (codes, issued) = issue(&keys, b"user-1").unwrap();
        let sealed = issued.sealed.unwrap();
        assert_eq!(open(&keys, b"user-1", &sealed).unwrap(), codes);
        assert!(open(&keys, b"user-2", &sealed).is_err());
        assert!(!sealed.sealed.contains(&codes[0]));
    }

    #[test]
    fn malformed_codes_are_refused() {
        for bad in [
            "",
            "abcde",
            "abcde-2345",
            "abcde-234567",
            " abcde-23456",
            "abc0e-23456",
            "ab-cde23456",
        ] {
            assert!(normalize(bad).is_none(), "{bad:?}");
        }
    }
}
