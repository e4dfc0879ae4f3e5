//! The workers' side of JetStream: connecting, binding a durable pull
//! consumer, and batches from it for workers that take whatever has arrived
//! and handle it together (the projector's builders, the dispatcher).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use async_nats::jetstream::{self, consumer::pull, consumer::PullConsumer, Message};
use futures::{FutureExt, StreamExt};
use secrecy::ExposeSecret;

use crate::Config;

use crate::dead_letters::{backoff, MAX_DELIVER};

/// A client that connects in the background and reconnects by itself: a
/// worker started before NATS waits for it. Authenticates and uses TLS as
/// `config` says (`nats_credentials_file`, `nats_user`/`nats_password`,
/// `nats_token`, `nats_tls_*`).
pub async fn connect(config: &Config) -> anyhow::Result<async_nats::Client> {
    connect_watched(config, &Refusal::default()).await
}

/// Whether the NATS server refused this client's credentials at its last
/// attempt (cleared when it connects).
#[derive(Clone, Default)]
pub struct Refusal(Arc<AtomicBool>);

impl Refusal {
    pub fn refused(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// [`connect`], noting in `refusal` when the server refuses the credentials.
/// Connection problems are logged as they happen (without secrets).
pub async fn connect_watched(
    config: &Config,
    refusal: &Refusal,
) -> anyhow::Result<async_nats::Client> {
    let seen = refusal.clone();
    let mut options = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let seen = seen.clone();
            async move { note(&seen, &event) }
        });
    if let Some(path) = &config.nats_credentials_file {
        options = options.credentials_file(path).await.with_context(|| {
            format!("reading the NATS credentials file {path} (nats_credentials_file)")
        })?;
    }
    if let (Some(user), Some(password)) = (&config.nats_user, &config.nats_password) {
        options = options.user_and_password(user.clone(), password.expose_secret().to_string());
    }
    if let Some(token) = &config.nats_token {
        options = options.token(token.expose_secret().to_string());
    }
    if let Some(ca) = &config.nats_tls_ca_file {
        options = options.add_root_certificates(ca.into());
    }
    if let (Some(cert), Some(key)) = (&config.nats_tls_cert_file, &config.nats_tls_key_file) {
        options = options.add_client_certificate(cert.into(), key.into());
    }
    if config.nats_tls_required {
        options = options.require_tls(true);
    }
    let url = &config.nats_url;
    options
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

/// Logs a connection event worth an operator's attention, and keeps
/// `refusal` up to date.
fn note(refusal: &Refusal, event: &async_nats::Event) {
    use async_nats::{ClientError, Event, ServerError};
    match event {
        Event::Connected => {
            refusal.0.store(false, Ordering::Relaxed);
            tracing::info!("connected to NATS");
        }
        Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
        Event::ServerError(ServerError::AuthorizationViolation) => refused(refusal),
        Event::ClientError(ClientError::Other(why))
            if why.contains("authorization violation") || why.contains("signing nonce") =>
        {
            refused(refusal)
        }
        Event::ClientError(e) => tracing::warn!(error = %e, "cannot connect to NATS; retrying"),
        Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
        _ => {}
    }
}

fn refused(refusal: &Refusal) {
    refusal.0.store(true, Ordering::Relaxed);
    tracing::error!(
        "NATS refused this client's credentials (authorization violation): check nats_token, \
         nats_user and nats_password, or nats_credentials_file; retrying"
    );
}

/// Binds to (creating if needed) the durable pull consumer `config` names on
/// `stream`, with explicit acks and a finite number of deliveries (unless
/// `config` names one, [`MAX_DELIVER`]) spaced by a doubling backoff from
/// its ack wait. A consumer made by an older version, with unlimited
/// deliveries or another ack wait, is brought to this configuration.
pub async fn durable_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: pull::Config,
) -> anyhow::Result<PullConsumer> {
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| anyhow!("the stream {stream} is not there yet (start the relay): {e}"))?;
    let name = config.durable_name.clone().unwrap_or_default();
    let max_deliver = if config.max_deliver > 0 {
        config.max_deliver
    } else {
        MAX_DELIVER
    };
    let config = pull::Config {
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        max_deliver,
        backoff: backoff(config.ack_wait, max_deliver),
        ..config
    };
    let mut consumer: PullConsumer = stream
        .get_or_create_consumer(&name, config.clone())
        .await
        .map_err(|e| anyhow!("creating the consumer {name}: {e}"))?;
    let current = consumer.cached_info().config.max_deliver;
    if current != max_deliver || consumer.cached_info().config.ack_wait != config.ack_wait {
        match stream.update_consumer(config).await {
            Ok(updated) => consumer = updated,
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, current, "cannot bring the consumer to its configuration (max_deliver, ack wait); delete it to have it made again")
            }
        }
    }
    Ok(consumer)
}

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

    /// The durable consumer the batches come from.
    pub fn consumer(&self) -> &PullConsumer {
        &self.consumer
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

    /// One pull request for at most `max` messages, answered within `wait`:
    /// the messages as they arrive, none held back for later. A worker that
    /// pulls only what it has room for starts (and keeps alive) every
    /// message it holds, so none waits out its ack wait in a buffer and is
    /// handed to a second worker meanwhile.
    pub async fn pull(&self, max: usize, wait: Duration) -> anyhow::Result<pull::Batch> {
        self.consumer
            .fetch()
            .max_messages(max.max(1))
            .expires(wait)
            .messages()
            .await
            .map_err(|e| anyhow!("pulling from JetStream: {e}"))
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
