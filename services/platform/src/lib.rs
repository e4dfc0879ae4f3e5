//! Infrastructure shared by the twofold workers: configuration, the PostgreSQL
//! event store, secret handling (passwords, TOTP seeds, codes, tokens), the
//! clock, and Prometheus metrics. The domain stays pure; this is where I/O lives.

pub mod audit_signing;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod db;
pub mod dead_letters;
pub mod envelope;
pub mod jetstream;
pub mod json;
pub mod password;
pub mod personal;
pub mod qr;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod totp;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::Config;
pub use envelope::Envelope;

/// Runs `attempt` until it succeeds, waiting twice as long after each
/// failure (from 200 ms, at most 5 s) and logging why: a worker started
/// before PostgreSQL or NATS waits for them instead of exiting.
pub async fn retrying<T, F>(what: &str, mut attempt: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut wait = std::time::Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "{what} failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}
