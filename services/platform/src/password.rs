//! Password hashing with argon2id at OWASP parameters (m=19 MiB, t=2, p=1) on
//! a pool of one thread per core, each reusing its own 19 MiB working memory:
//! at most one hash per core runs at a time, and memory stays flat under load
//! instead of growing with allocator arenas. An unknown user is checked
//! against a dummy hash so that it costs the same time as a known one.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use argon2::password_hash::{PasswordHash as Phc, PasswordVerifier};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;
use twofold_domain::secrets::PasswordHash;

/// OWASP's argon2id recommendation.
pub const MEMORY_KIB: u32 = 19 * 1024;
pub const ITERATIONS: u32 = 2;
pub const PARALLELISM: u32 = 1;
const OUTPUT_LEN: usize = 32;
const SALT_LEN: usize = 16;

fn params() -> Params {
    // The constants above are within argon2's limits.
    Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, Some(OUTPUT_LEN)).unwrap_or_default()
}

pub fn argon2() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params())
}

enum Job {
    Hash {
        password: SecretString,
        reply: oneshot::Sender<anyhow::Result<String>>,
    },
    Verify {
        phc: String,
        password: SecretString,
        reply: oneshot::Sender<bool>,
    },
}

/// One pool thread: its working memory is allocated once and reused.
fn worker(jobs: Arc<Mutex<mpsc::Receiver<Job>>>) {
    let argon = argon2();
    let mut blocks = vec![Block::default(); params().block_count()];
    loop {
        let job = {
            let Ok(rx) = jobs.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        match job {
            Job::Hash { password, reply } => {
                let _ = reply.send(hash_with(&argon, &mut blocks, &password));
            }
            Job::Verify {
                phc,
                password,
                reply,
            } => {
                let _ = reply.send(verify_with(&mut blocks, &phc, &password));
            }
        }
    }
}

fn hash_with(
    argon: &Argon2,
    blocks: &mut [Block],
    password: &SecretString,
) -> anyhow::Result<String> {
    let mut salt = [0u8; SALT_LEN];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let mut out = [0u8; OUTPUT_LEN];
    argon
        .hash_password_into_with_memory(
            password.expose_secret().as_bytes(),
            &salt,
            &mut out,
            blocks,
        )
        .map_err(|e| anyhow!("argon2 hashing failed: {e}"))?;
    Ok(format!(
        "$argon2id$v=19$m={MEMORY_KIB},t={ITERATIONS},p={PARALLELISM}${}${}",
        B64.encode(salt),
        B64.encode(out)
    ))
}

fn verify_with(blocks: &mut [Block], phc: &str, password: &SecretString) -> bool {
    let Ok(parsed) = Phc::new(phc) else {
        return false;
    };
    let same_params = Params::try_from(&parsed).is_ok_and(|p| {
        p.m_cost() == MEMORY_KIB && p.t_cost() == ITERATIONS && p.p_cost() == PARALLELISM
    });
    let (Some(salt), Some(expected), true) = (parsed.salt, parsed.hash, same_params) else {
        // Hashes made under other parameters are checked the allocating way.
        return Argon2::default()
            .verify_password(password.expose_secret().as_bytes(), &parsed)
            .is_ok();
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    let params = Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, Some(expected.len()));
    let Ok(params) = params else {
        return false;
    };
    let computed = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into_with_memory(
            password.expose_secret().as_bytes(),
            salt,
            &mut out,
            &mut *blocks,
        );
    if computed.is_err() {
        return false;
    }
    out.ct_eq(expected.as_bytes()).into()
}

#[derive(Clone)]
pub struct Passwords {
    jobs: mpsc::Sender<Job>,
    dummy: Arc<String>,
}

impl Passwords {
    /// A pool of `threads` hashing threads (the core count in production).
    pub fn new(threads: usize) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || worker(rx))
                .context("starting a password hashing thread")?;
        }
        let dummy = hash_with(
            &argon2(),
            &mut vec![Block::default(); params().block_count()],
            &SecretString::from("twofold dummy password for unknown users".to_string()),
        )?;
        Ok(Self {
            jobs: tx,
            dummy: Arc::new(dummy),
        })
    }

    pub fn for_this_machine() -> anyhow::Result<Self> {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    pub async fn hash(&self, password: &SecretString) -> anyhow::Result<PasswordHash> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Hash {
                password: password.clone(),
                reply,
            })
            .map_err(|_| anyhow!("the password pool is gone"))?;
        Ok(PasswordHash(
            answer.await.context("the password pool dropped a job")??,
        ))
    }

    /// Checks `password` against `stored`, or against the dummy hash when there
    /// is no such user (and then answers false), in the same time either way.
    pub async fn verify(
        &self,
        stored: Option<&PasswordHash>,
        password: &SecretString,
    ) -> anyhow::Result<bool> {
        metrics::counter!("twofold_password_checks_total").increment(1);
        let known = stored.is_some();
        let phc = stored
            .map(|h| h.0.clone())
            .unwrap_or_else(|| self.dummy.as_str().to_string());
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Verify {
                phc,
                password: password.clone(),
                reply,
            })
            .map_err(|_| anyhow!("the password pool is gone"))?;
        let ok = answer.await.context("the password pool dropped a job")?;
        Ok(known && ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};

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

    #[tokio::test]
    async fn hashes_are_standard_phc_strings_other_implementations_read() {
        let p = Passwords::new(1).unwrap();
        let secret = SecretString::from("correct horse".to_string());
        let hash = p.hash(&secret).await.unwrap();
        let parsed = Phc::new(&hash.0).unwrap();
        assert!(argon2().verify_password(b"correct horse", &parsed).is_ok());
        // And a hash made by the argon2 crate's own hasher verifies here.
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs = argon2()
            .hash_password(b"correct horse", &salt)
            .unwrap()
            .to_string();
        assert!(p
            .verify(Some(&PasswordHash(theirs)), &secret)
            .await
            .unwrap());
    }
}
