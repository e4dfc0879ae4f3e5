//! Password hashing with argon2id at OWASP parameters (m=19 MiB, t=2, p=1), on
//! the blocking pool, at most one hash per core at a time. An unknown user is
//! checked against a dummy hash so that it costs the same time as a known one.

use std::sync::Arc;

use anyhow::{anyhow, Context};
use argon2::password_hash::{
    PasswordHash as Phc, PasswordHasher as _, PasswordVerifier, SaltString,
};
use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use twofold_domain::secrets::PasswordHash;

/// OWASP's argon2id recommendation.
pub const MEMORY_KIB: u32 = 19 * 1024;
pub const ITERATIONS: u32 = 2;
pub const PARALLELISM: u32 = 1;

pub fn argon2() -> Argon2<'static> {
    // The constants above are within argon2's limits.
    let params = Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn hash_blocking(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow!("argon2 hashing failed: {e}"))
}

fn verify_blocking(phc: &str, password: &str) -> bool {
    match Phc::new(phc) {
        Ok(parsed) => argon2()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    dummy: Arc<String>,
}

impl Passwords {
    /// `parallel` hashes at most at once (the core count in production).
    pub fn new(parallel: usize) -> anyhow::Result<Self> {
        Ok(Self {
            permits: Arc::new(Semaphore::new(parallel.max(1))),
            dummy: Arc::new(hash_blocking("twofold dummy password for unknown users")?),
        })
    }

    pub fn for_this_machine() -> anyhow::Result<Self> {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    pub async fn hash(&self, password: &SecretString) -> anyhow::Result<PasswordHash> {
        let _permit = self
            .permits
            .acquire()
            .await
            .context("password pool closed")?;
        let password = password.expose_secret().to_string();
        let phc = tokio::task::spawn_blocking(move || hash_blocking(&password))
            .await
            .context("password hashing task failed")??;
        Ok(PasswordHash(phc))
    }

    /// Checks `password` against `stored`, or against the dummy hash when there
    /// is no such user (and then answers false), in the same time either way.
    pub async fn verify(
        &self,
        stored: Option<&PasswordHash>,
        password: &SecretString,
    ) -> anyhow::Result<bool> {
        let _permit = self
            .permits
            .acquire()
            .await
            .context("password pool closed")?;
        metrics::counter!("twofold_password_checks_total").increment(1);
        let known = stored.is_some();
        let phc = stored
            .map(|h| h.0.clone())
            .unwrap_or_else(|| self.dummy.as_str().to_string());
        let password = password.expose_secret().to_string();
        let ok = tokio::task::spawn_blocking(move || verify_blocking(&phc, &password))
            .await
            .context("password check task failed")?;
        Ok(known && ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_at_owasp_parameters_and_verify() {
        let p = Passwords::new(2).unwrap();
        let secret = SecretString::from("correct horse".to_string());
        let hash = p.hash(&secret).await.unwrap();
        assert!(
            hash.0.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            hash.0
        );
        assert!(p.verify(Some(&hash), &secret).await.unwrap());
        let wrong = SecretString::from("battery staple".to_string());
        assert!(!p.verify(Some(&hash), &wrong).await.unwrap());
        assert!(!p.verify(None, &secret).await.unwrap());
    }
}
