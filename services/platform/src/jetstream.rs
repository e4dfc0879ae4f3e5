//! Batches from a JetStream durable pull consumer, for workers that take
//! whatever has arrived and handle it together (the projector's builders,
//! the dispatcher).

use std::time::Duration;

use anyhow::anyhow;
use async_nats::jetstream::{consumer::pull, consumer::PullConsumer, Message};
use futures::{FutureExt, StreamExt};

/// A consumer's messages as JetStream pushes them: the subscription keeps
/// pull requests outstanding for at most `ahead` messages, is opened at the
/// first step and opened again after it broke.
pub struct Batches {
    consumer: PullConsumer,
    ahead: usize,
    messages: tokio::sync::Mutex<Option<pull::Stream>>,
}

impl Batches {
    pub fn new(consumer: PullConsumer, ahead: usize) -> Self {
        Self {
            consumer,
            ahead: ahead.max(1),
            messages: tokio::sync::Mutex::new(None),
        }
    }

    /// A subscription of its own, `ahead` messages at most outstanding.
    pub async fn open(&self) -> anyhow::Result<pull::Stream> {
        self.consumer
            .stream()
            .max_messages_per_batch(self.ahead)
            .messages()
            .await
            .map_err(|e| anyhow!("subscribing to JetStream: {e}"))
    }

    /// Waits at most `wait` for a message, then takes whatever else has
    /// arrived, up to `max` in all; empty when nothing came.
    pub async fn next(&self, max: usize, wait: Duration) -> anyhow::Result<Vec<Message>> {
        let mut guard = self.messages.lock().await;
        let messages = match guard.as_mut() {
            Some(m) => m,
            None => guard.insert(self.open().await?),
        };
        let mut batch = Vec::new();
        match tokio::time::timeout(wait, messages.next()).await {
            Err(_) | Ok(None) => return Ok(Vec::new()),
            Ok(Some(first)) => batch.push(first),
        }
        while batch.len() < max {
            match messages.next().now_or_never() {
                Some(Some(next)) => batch.push(next),
                _ => break,
            }
        }
        match batch.into_iter().collect() {
            Ok(batch) => Ok(batch),
            Err(e) => {
                // The subscription is broken: the next step opens another.
                *guard = None;
                Err(anyhow!("receiving from JetStream: {e}"))
            }
        }
    }
}
