//! Authenticator-app codes (RFC 6238: HMAC-SHA-1, 6 digits, 30-second steps)
//! and the otpauth URI that enrolls them.

use anyhow::anyhow;
use chrono::{DateTime, Utc};
use rand::RngCore;
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Secret, TOTP};
use twofold_domain::values::OtpCode;

pub const STEP_SECONDS: u64 = 30;
pub const DIGITS: usize = 6;
/// 160 bits, the size RFC 4226 recommends and every authenticator app takes.
pub const SECRET_BYTES: usize = 20;

/// A fresh random seed.
pub fn new_secret() -> Vec<u8> {
    let mut seed = vec![0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    seed
}

fn totp(seed: &[u8], issuer: &str, account: &str) -> anyhow::Result<TOTP> {
    TOTP::new(
        Algorithm::SHA1,
        DIGITS,
        1,
        STEP_SECONDS,
        seed.to_vec(),
        Some(issuer.to_string()),
        account.to_string(),
    )
    .map_err(|e| anyhow!("building the TOTP failed: {e}"))
}

/// The code of time step `step`.
pub fn code_at_step(seed: &[u8], step: u64) -> anyhow::Result<String> {
    Ok(totp(seed, "twofold", "user")?.generate(step * STEP_SECONDS))
}

pub fn step_of(at: DateTime<Utc>) -> u64 {
    u64::try_from(at.timestamp()).unwrap_or(0) / STEP_SECONDS
}

/// The time step within one step of `at` whose code is `code`, if any. Every
/// candidate is compared, in constant time, so timing says nothing.
pub fn matching_step(
    seed: &[u8],
    code: &OtpCode,
    at: DateTime<Utc>,
) -> anyhow::Result<Option<u64>> {
    let now = step_of(at);
    let mut found = None;
    for step in [now.saturating_sub(1), now, now + 1] {
        let expected = code_at_step(seed, step)?;
        if bool::from(expected.as_bytes().ct_eq(code.expose().as_bytes())) && found.is_none() {
            found = Some(step);
        }
    }
    Ok(found)
}

/// `otpauth://totp/Issuer:account?secret=...&issuer=Issuer`.
pub fn otpauth_uri(seed: &[u8], issuer: &str, account: &str) -> anyhow::Result<String> {
    Ok(totp(seed, issuer, account)?.get_url())
}

pub fn base32(seed: &[u8]) -> String {
    Secret::Raw(seed.to_vec()).to_encoded().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// RFC 6238 appendix B, SHA-1 rows (8 digits there; the last 6 are ours).
    #[test]
    fn rfc6238_vectors() {
        let seed = b"12345678901234567890";
        for (t, expected) in [
            (59u64, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ] {
            let code = code_at_step(seed, t / STEP_SECONDS).unwrap();
            assert_eq!(code, expected[2..], "t={t}");
        }
    }

    /// RFC 4226 appendix D: HOTP values for counters 0..9 (TOTP at step = counter).
    #[test]
    fn rfc4226_vectors() {
        let seed = b"12345678901234567890";
        let expected = [
            "755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583",
            "399871", "520489",
        ];
        for (counter, want) in expected.iter().enumerate() {
            assert_eq!(code_at_step(seed, counter as u64).unwrap(), *want);
        }
    }

    #[test]
    fn one_step_of_drift_is_accepted_and_two_are_not() {
        let seed = new_secret();
        let at = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 10).unwrap();
        let now = step_of(at);
        for (step, accepted) in [
            (now - 2, false),
            (now - 1, true),
            (now, true),
            (now + 1, true),
            (now + 2, false),
        ] {
            let code = OtpCode::parse(&code_at_step(&seed, step).unwrap()).unwrap();
            let found = matching_step(&seed, &code, at).unwrap();
            assert_eq!(
                found.is_some(),
                accepted,
                "step offset {}",
                step as i64 - now as i64
            );
            if accepted {
                assert_eq!(found, Some(step));
            }
        }
    }

    #[test]
    fn the_uri_names_the_issuer_and_account() {
        let seed = new_secret();
        let uri = otpauth_uri(&seed, "Acme", "alice").unwrap();
        assert!(
            uri.starts_with("otpauth://totp/Acme:alice?secret="),
            "{uri}"
        );
        assert!(uri.contains(&format!("secret={}", base32(&seed))));
        assert!(uri.contains("issuer=Acme"));
    }
}
