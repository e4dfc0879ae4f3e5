//! Backup codes: 8 single-use codes of 10 characters (about 49 bits each),
//! shown once when issued and kept only as keyed hashes.

use rand::Rng;
use twofold_domain::secrets::SecretHash;
use twofold_domain::user::{User, BACKUP_CODE_COUNT};
use twofold_platform::crypto::Keyring;

/// No 0/o, 1/l/i: codes are read off paper and typed in.
const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
const LEN: usize = 10;

/// Fresh codes as shown to the user (`abcde-23456`) and their hashes.
pub fn issue(keys: &Keyring, user_id: &[u8]) -> (Vec<String>, Vec<SecretHash>) {
    let mut rng = rand::rngs::OsRng;
    (0..BACKUP_CODE_COUNT)
        .map(|_| {
            let raw: String = (0..LEN)
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
                .collect();
            let hash = keys.backup_code_hash(user_id, &raw);
            (format!("{}-{}", &raw[..5], &raw[5..]), hash)
        })
        .unzip()
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
        let (codes, hashes) = issue(&keys, b"user");
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
