//! Parking messages a worker cannot handle: the message goes to the
//! `dead_letters` table with its reason and is terminated on the stream, so
//! it is neither retried forever nor holds up the messages behind it, and it
//! is counted in `twofold_dead_letters_total{consumer}`.
//!
//! A failure is the message's only while PostgreSQL answers: during an
//! outage a worker holds its messages (telling JetStream it is still working
//! on them, so they are not redelivered and use up no deliveries) until the
//! database is back, and tries them again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use async_nats::jetstream::{AckKind, Message};
use sqlx::PgPool;

/// Deliveries of a message before it is parked (JetStream's `max_deliver`).
pub const MAX_DELIVER: i64 = 5;

/// Redelivery delays for a message left unacknowledged, JetStream's
/// `backoff`: the ack wait, then twice as long each time, one fewer than the
/// deliveries (the server requires it; the first replaces the ack wait).
pub fn backoff(ack_wait: Duration, max_deliver: i64) -> Vec<Duration> {
    (0..max_deliver.saturating_sub(1).max(0) as u32)
        .map(|n| ack_wait.saturating_mul(2u32.saturating_pow(n)))
        .collect()
}

/// Whether this delivery of `message` is the last JetStream makes.
pub fn last_delivery(message: &Message, max_deliver: i64) -> bool {
    message
        .info()
        .map(|i| i.delivered >= max_deliver)
        .unwrap_or(false)
}

/// How many times `message` was delivered (1 for the first).
pub fn deliveries(message: &Message) -> i64 {
    message.info().map(|i| i.delivered).unwrap_or(1)
}

/// One consumer's parking place.
pub struct DeadLetters {
    pool: PgPool,
    consumer: String,
    /// How often a message held during an outage is marked in progress.
    keep_alive: Duration,
    log: QuietLog,
}

impl DeadLetters {
    /// For the durable consumer `consumer`, whose ack wait is `ack_wait`.
    pub fn new(pool: PgPool, consumer: &str, ack_wait: Duration) -> Self {
        Self {
            pool,
            consumer: consumer.to_string(),
            keep_alive: (ack_wait / 3).max(Duration::from_millis(50)),
            log: QuietLog::new(Duration::from_secs(30)),
        }
    }

    /// The consumer's warnings, at most one per kind per interval.
    pub fn log(&self) -> &QuietLog {
        &self.log
    }

    /// Parks `message`: writes it with `reason`, terminates it, counts it.
    /// While PostgreSQL does not take the write, the message is held (in
    /// progress) and the write tried again.
    pub async fn park(&self, message: &Message, reason: &str) -> anyhow::Result<()> {
        let (sequence, delivered) = message
            .info()
            .map(|i| (i.stream_sequence as i64, i.delivered))
            .unwrap_or((0, 1));
        // PostgreSQL text holds no NUL.
        let reason = reason.replace('\0', "");
        let mut refused = 0;
        loop {
            match self.write(message, sequence, &reason).await {
                Ok(()) => break,
                Err(e) => {
                    // The database answers and still refuses the row: after
                    // three tries the message is terminated unrecorded
                    // rather than block the consumer.
                    if self.database_answers().await {
                        refused += 1;
                        if refused >= 3 {
                            tracing::error!(consumer = %self.consumer, subject = %message.subject, sequence, error = %format!("{e:#}"), "a message is dropped without a dead-letter record");
                            break;
                        }
                    }
                    self.log.warn("dead-letter-write", |skipped| {
                        tracing::warn!(consumer = %self.consumer, error = %format!("{e:#}"), skipped, "cannot park a message yet; holding it");
                    });
                    let _ = message.ack_with(AckKind::Progress).await;
                    tokio::time::sleep(self.keep_alive).await;
                }
            }
        }
        message
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| anyhow!("terminating a parked message: {e}"))?;
        metrics::counter!("twofold_dead_letters_total", "consumer" => self.consumer.clone())
            .increment(1);
        self.log.warn("parked", |skipped| {
            tracing::warn!(consumer = %self.consumer, subject = %message.subject, reason = %reason, delivered, skipped, "message parked in dead_letters");
        });
        Ok(())
    }

    async fn write(&self, message: &Message, sequence: i64, reason: &str) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO dead_letters (consumer, subject, stream_sequence, payload, reason) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (consumer, stream_sequence) DO NOTHING",
        )
        .bind(&self.consumer)
        .bind(message.subject.as_str())
        .bind(sequence)
        .bind(message.payload.as_ref())
        .bind(reason)
        .execute(&self.pool)
        .await
        .context("writing a dead letter")?;
        Ok(())
    }

    /// Whether PostgreSQL answers now (within a keep-alive interval).
    pub async fn database_answers(&self) -> bool {
        matches!(
            tokio::time::timeout(
                self.keep_alive.min(Duration::from_secs(5)),
                sqlx::query("SELECT 1").execute(&self.pool)
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// Holds `messages` (marking them in progress, so JetStream neither
    /// redelivers them nor counts a delivery) until PostgreSQL answers.
    pub async fn hold_until_database_answers(&self, messages: &[&Message]) {
        let mut wait = Duration::from_millis(100);
        loop {
            for m in messages {
                let _ = m.ack_with(AckKind::Progress).await;
            }
            if self.database_answers().await {
                return;
            }
            self.log.warn("database-away", |skipped| {
                tracing::warn!(consumer = %self.consumer, skipped, "PostgreSQL does not answer; holding messages until it does");
            });
            tokio::time::sleep(wait.min(self.keep_alive)).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// Runs `work` on `messages`, marking them in progress while it runs,
    /// so a slow step (a store that waits for a connection, a slow
    /// provider) does not have them handed to another worker.
    pub async fn keeping_alive<T>(
        &self,
        messages: &[&Message],
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let keep_alive = async {
            loop {
                tokio::time::sleep(self.keep_alive).await;
                for m in messages {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
            }
        };
        tokio::select! {
            out = work => out,
            never = keep_alive => never,
        }
    }
}

/// Warnings that repeat (a failure on every delivery, every batch) logged
/// once per interval per kind, with how many were left out since the last.
pub struct QuietLog {
    every: Duration,
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl QuietLog {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Calls `log` (with the number left out since the last time) when no
    /// warning of `kind` was logged in the interval; else counts it.
    pub fn warn(&self, kind: &'static str, log: impl FnOnce(u64)) {
        let now = Instant::now();
        let skipped = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            match last.get_mut(kind) {
                Some((at, skipped)) if now.duration_since(*at) < self.every => {
                    *skipped += 1;
                    return;
                }
                Some((at, skipped)) => {
                    let n = *skipped;
                    *at = now;
                    *skipped = 0;
                    n
                }
                None => {
                    last.insert(kind, (now, 0));
                    0
                }
            }
        };
        log(skipped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_ack_wait_and_is_one_short_of_the_deliveries() {
        let b = backoff(Duration::from_secs(30), 5);
        assert_eq!(
            b,
            [30, 60, 120, 240].map(Duration::from_secs).to_vec(),
            "{b:?}"
        );
        assert!(backoff(Duration::from_secs(1), 1).is_empty());
    }

    #[test]
    fn a_repeated_warning_is_logged_once_per_interval() {
        let log = QuietLog::new(Duration::from_secs(3600));
        let mut logged = Vec::new();
        for _ in 0..1000 {
            log.warn("x", |skipped| logged.push(skipped));
        }
        log.warn("y", |skipped| logged.push(skipped));
        assert_eq!(logged, vec![0, 0]);
    }
}
