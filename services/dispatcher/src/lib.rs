//! The dispatcher: a JetStream durable pull consumer shared by every instance
//! (run as many as the load needs). For each event that asks for a code to be
//! sent, it claims the send request in the event store, derives the code
//! (never stored), sends it by email (SMTP) or SMS (the tenant's provider,
//! falling back to email when the provider fails), records the outcome as an
//! event, and only then acks. A crashed instance's job is redelivered to
//! another; a request already delivered is not sent again.

mod send;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use async_nats::jetstream::{self, AckKind};
use futures::future::join_all;
use futures::StreamExt;
use serde_json::Value;
use sqlx::PgPool;
use twofold_domain::delivery::{self, Delivery, DeliveryCommand, DeliveryError, DeliveryEvent};
use twofold_domain::tenant::Tenant;
use twofold_domain::user::User;
use twofold_domain::values::Method;
use twofold_domain::{Actor, ChallengeId, Ctx, TenantId, UserId};
use twofold_platform::config::SmsProvider;
use twofold_platform::crypto::Keyring;
use twofold_platform::jetstream::Batches;
use twofold_platform::store::{read_streams, Basis, ExecError, Store, StreamKey};
use twofold_platform::{Clock, Config};

pub use send::{Mailer, SmsClient};

/// Where the dispatcher reads from.
#[derive(Debug, Clone)]
pub struct Source {
    pub stream: String,
    pub subject_prefix: String,
    pub durable: String,
    /// How long a job may be held before JetStream hands it to another instance.
    pub ack_wait: Duration,
    /// Wait before a failed send is tried again.
    pub retry_delay: Duration,
    /// Jobs one instance works on at once (and pulls ahead of time).
    pub concurrency: usize,
}

impl Source {
    pub fn from_config(config: &Config) -> Self {
        Self {
            stream: config.nats_stream.clone(),
            subject_prefix: config.nats_subject_prefix.clone(),
            durable: "dispatcher".to_string(),
            ack_wait: Duration::from_secs(30),
            retry_delay: Duration::from_secs(5),
            concurrency: config.dispatcher_concurrency.max(1),
        }
    }
}

pub struct Dispatcher {
    pool: PgPool,
    users: Store<User>,
    tenants: Store<Tenant>,
    deliveries: Store<Delivery>,
    keys: Keyring,
    clock: Arc<dyn Clock>,
    /// The shared durable consumer, at most `concurrency` messages pulled
    /// ahead of what has been taken, so the jobs spread over the instances
    /// that have room for them.
    batches: Batches,
    concurrency: usize,
    mailer: Mailer,
    sms: SmsClient,
    providers: BTreeMap<String, SmsProvider>,
    max_attempts: u32,
    retry_delay: Duration,
    recipient_limit: u32,
    recently: Mutex<HashMap<String, VecDeque<Instant>>>,
}

/// What one job came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not a code to send (TOTP, another event type).
    Skipped,
    /// The challenge is gone, expired or has a newer code.
    Superseded,
    /// Already delivered (a redelivered job).
    AlreadyDone,
    Delivered {
        method: Method,
        provider: String,
    },
    /// Will be tried again after the delay, which doubles with each attempt.
    Retry(String, Duration),
    Failed(String),
}

impl Dispatcher {
    pub async fn connect(
        pool: PgPool,
        config: &Config,
        source: &Source,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let client = async_nats::connect(&config.nats_url)
            .await
            .with_context(|| format!("connecting to NATS at {}", config.nats_url))?;
        let js = jetstream::new(client);
        let stream = js.get_stream(&source.stream).await.map_err(|e| {
            anyhow!(
                "the stream {} is not there yet (start the relay): {e}",
                source.stream
            )
        })?;
        let consumer = stream
            .get_or_create_consumer(
                &source.durable,
                jetstream::consumer::pull::Config {
                    durable_name: Some(source.durable.clone()),
                    filter_subject: format!("{}.events.*.user.>", source.subject_prefix),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: source.ack_wait,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow!("creating the consumer {}: {e}", source.durable))?;
        Ok(Self {
            pool: pool.clone(),
            users: Store::new(pool.clone()),
            tenants: Store::new(pool.clone()),
            // A job claims its delivery, then records it: the claim's state is
            // remembered for the record (another instance writing the
            // stream meanwhile fails the append, which then reads it).
            deliveries: Store::remembering(pool, config.remembered_streams),
            keys: config.keyring()?,
            clock,
            batches: Batches::new(consumer, source.concurrency),
            concurrency: source.concurrency.max(1),
            mailer: Mailer::from_config(config)?,
            sms: SmsClient::new(config.sms_rate_per_second)?,
            providers: config.sms_providers.clone(),
            max_attempts: config.delivery_max_attempts.max(1),
            retry_delay: source.retry_delay,
            recipient_limit: config.recipient_limit_per_hour,
            recently: Mutex::new(HashMap::new()),
        })
    }

    /// Handles up to `max` jobs at once, waiting at most `wait` for the
    /// first; returns the outcome of each.
    pub async fn process_next(&self, max: usize, wait: Duration) -> anyhow::Result<Vec<Outcome>> {
        let batch = self.batches.next(max, wait).await?;
        join_all(batch.into_iter().map(|m| self.job(m)))
            .await
            .into_iter()
            .collect()
    }

    /// One job: handled, then acked, or nak'ed with a delay to be tried again.
    async fn job(&self, message: jetstream::Message) -> anyhow::Result<Outcome> {
        metrics::gauge!("twofold_dispatcher_in_flight").increment(1.0);
        let outcome = self.handle(&message.payload).await;
        metrics::gauge!("twofold_dispatcher_in_flight").decrement(1.0);
        let outcome = match outcome {
            Ok(o) => o,
            // The store or the network failed: leave the job for a retry.
            Err(e) => Outcome::Retry(format!("{e:#}"), self.retry_delay),
        };
        match &outcome {
            Outcome::Retry(reason, after) => {
                tracing::warn!(%reason, "delivery will be retried");
                message
                    .ack_with(AckKind::Nak(Some(*after)))
                    .await
                    .map_err(|e| anyhow!("nak: {e}"))?;
            }
            _ => message.ack().await.map_err(|e| anyhow!("ack: {e}"))?,
        }
        Ok(outcome)
    }

    /// Works on up to `concurrency` jobs at a time until `shutdown` resolves.
    /// A job cut off by the shutdown is not acked: JetStream hands it to
    /// another instance after the ack wait.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let messages = match self.batches.open().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "dispatcher cannot subscribe; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            let work = messages.for_each_concurrent(self.concurrency, |message| async {
                match message {
                    Ok(m) => {
                        if let Err(e) = self.job(m).await {
                            tracing::warn!(error = %format!("{e:#}"), "dispatcher step failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "receiving from JetStream"),
                }
            });
            tokio::select! {
                _ = &mut shutdown => return,
                // The subscription ended: open another.
                _ = work => {}
            }
        }
    }

    fn ctx(&self) -> Ctx {
        Ctx::new(self.clock.now(), Actor::System)
    }

    /// The user, the tenant the event names (if it names one) and the
    /// delivery stream, in one read.
    async fn read(
        &self,
        user_id: UserId,
        tenant_id: Option<TenantId>,
        delivery_id: &str,
    ) -> anyhow::Result<(User, Option<Tenant>, Basis<Delivery>)> {
        let user_key = user_id.to_string();
        let tenant_key = tenant_id.map(|t| t.to_string());
        let mut keys = vec![
            StreamKey::Id {
                aggregate_type: "user",
                aggregate_id: &user_key,
            },
            StreamKey::Id {
                aggregate_type: "delivery",
                aggregate_id: delivery_id,
            },
        ];
        if let Some(t) = &tenant_key {
            keys.push(StreamKey::Id {
                aggregate_type: "tenant",
                aggregate_id: t,
            });
        }
        let mut rows = read_streams(&self.pool, &keys).await?.into_iter();
        let user = self
            .users
            .from_rows(&user_key, rows.next().flatten())
            .await?
            .state;
        let delivery = self
            .deliveries
            .from_rows(delivery_id, rows.next().flatten())
            .await?;
        let delivery = self.deliveries.read_now(delivery_id, delivery);
        let tenant = match &tenant_key {
            Some(t) => Some(
                self.tenants
                    .from_rows(t, rows.next().flatten())
                    .await?
                    .state,
            ),
            None => None,
        };
        Ok((user, tenant, delivery))
    }

    async fn record(
        &self,
        id: &str,
        command: DeliveryCommand,
    ) -> anyhow::Result<Result<Vec<DeliveryEvent>, DeliveryError>> {
        self.record_on(id, None, command).await
    }

    /// [`Dispatcher::record`], deciding on `basis` (just read) when given.
    async fn record_on(
        &self,
        id: &str,
        basis: Option<Basis<Delivery>>,
        command: DeliveryCommand,
    ) -> anyhow::Result<Result<Vec<DeliveryEvent>, DeliveryError>> {
        match self
            .deliveries
            .execute_with(id, basis, &[], |_| Ok(command.clone()))
            .await
        {
            Ok(events) => Ok(Ok(events)),
            Err(ExecError::Refused(e)) => Ok(Err(e)),
            Err(ExecError::ReadMoved) => Err(anyhow!("unexpected: a delivery names no reads")),
            Err(ExecError::Store(e)) => Err(anyhow!(e)),
        }
    }

    /// Whether `recipient` may get one more code this hour (per instance).
    fn recipient_allowed(&self, recipient: &str) -> bool {
        let Ok(mut recent) = self.recently.lock() else {
            return true;
        };
        let sent = recent.entry(recipient.to_string()).or_default();
        let hour = Duration::from_secs(3600);
        while sent.front().is_some_and(|t| t.elapsed() > hour) {
            sent.pop_front();
        }
        if sent.len() as u32 >= self.recipient_limit {
            return false;
        }
        sent.push_back(Instant::now());
        true
    }

    async fn handle(&self, payload: &[u8]) -> anyhow::Result<Outcome> {
        let body: Value =
            serde_json::from_slice(payload).context("a message that is not an event")?;
        let event_type = body["event_type"].as_str().unwrap_or_default();
        let inner = &body["payload"][event_type];
        let (method, generation) = match event_type {
            "ChallengeIssued" => (&inner["method"], 0),
            "CodeResent" => (&inner["method"], inner["generation"].as_u64().unwrap_or(0)),
            "ChallengeMethodSwitched" => (&inner["to"], inner["generation"].as_u64().unwrap_or(0)),
            _ => return Ok(Outcome::Skipped),
        };
        let method: Method =
            serde_json::from_value(method.clone()).context("a code event without a method")?;
        if !method.is_delivered() {
            return Ok(Outcome::Skipped);
        }
        let generation = u32::try_from(generation).unwrap_or(0);
        let challenge_id: ChallengeId = serde_json::from_value(inner["challenge_id"].clone())
            .context("a code event without a challenge")?;
        let user_id: UserId = body["aggregate_id"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .context("a code event without a user")?;
        // The tenant the relay found in the event's metadata: read with the
        // user (checked against the user's own below).
        let tenant_hint: Option<TenantId> = body["metadata"]["tenant_id"]
            .as_str()
            .and_then(|t| t.parse().ok());
        let id = delivery::stream_id(challenge_id, generation);
        let (user, tenant, claim_basis) = self.read(user_id, tenant_hint, &id).await?;
        let now = self.clock.now();
        let Some(challenge) = user.challenges.get(&challenge_id) else {
            return Ok(Outcome::Superseded);
        };
        if challenge.is_expired(now) || challenge.generation != generation {
            return Ok(Outcome::Superseded);
        }
        let Some(tenant_id) = user.tenant_id else {
            return Ok(Outcome::Superseded);
        };
        let tenant = match tenant {
            Some(tenant) if tenant_hint == Some(tenant_id) => tenant,
            _ => self.tenants.load(&tenant_id.to_string()).await?,
        };
        let claimed = self
            .record_on(
                &id,
                Some(claim_basis),
                DeliveryCommand::Claim {
                    challenge_id,
                    generation,
                    user_id,
                    tenant_id,
                    method,
                    ctx: self.ctx(),
                },
            )
            .await?;
        let attempt = match claimed {
            Err(DeliveryError::AlreadyDelivered | DeliveryError::AlreadyFailed) => {
                return Ok(Outcome::AlreadyDone)
            }
            Err(e) => return Err(anyhow!(e)),
            Ok(events) => events
                .iter()
                .find_map(|e| match e {
                    DeliveryEvent::DeliveryClaimed { attempt, .. } => Some(*attempt),
                    _ => None,
                })
                .unwrap_or(1),
        };
        let code = self.keys.delivered_code(challenge_id, generation);
        let started = Instant::now();
        let mut method_used = method;
        let mut sent: Result<String, String> = Err("no recipient".to_string());
        if method == Method::Sms {
            sent = match (user.phone.as_ref(), tenant.settings.sms_provider.as_ref()) {
                (Some(phone), Some(name)) => match self.providers.get(name) {
                    Some(provider) if self.recipient_allowed(phone.as_str()) => self
                        .sms
                        .send(
                            name,
                            provider,
                            phone.as_str(),
                            &send::sms_text(&tenant.name, &code),
                        )
                        .await
                        .map(|()| name.clone()),
                    Some(_) => Err("the recipient's hourly limit is reached".to_string()),
                    None => Err(format!("no SMS provider named {name:?} is configured")),
                },
                (None, _) => Err("the user has no phone number".to_string()),
                (_, None) => Err("the tenant names no SMS provider".to_string()),
            };
            if let Err(reason) = &sent {
                metrics::counter!("twofold_dispatcher_failed_total", "method" => "sms", "provider" => tenant.settings.sms_provider.clone().unwrap_or_default())
                    .increment(1);
                self.record(
                    &id,
                    DeliveryCommand::RecordFallback {
                        reason: reason.clone(),
                        ctx: self.ctx(),
                    },
                )
                .await?
                .map_err(|e| anyhow!(e))?;
                method_used = Method::Email;
            }
        }
        if method_used == Method::Email {
            sent = match user.email.as_ref() {
                Some(email) if self.recipient_allowed(email.as_str()) => self
                    .mailer
                    .send(email.as_str(), &tenant.name, &code, challenge.expires_at)
                    .await
                    .map(|()| "smtp".to_string()),
                Some(_) => Err("the recipient's hourly limit is reached".to_string()),
                None => Err("the user has no email address".to_string()),
            };
        }
        match sent {
            Ok(provider) => {
                let latency_ms = started.elapsed().as_millis() as u64;
                metrics::counter!("twofold_dispatcher_sent_total", "method" => method_used.as_str(), "provider" => provider.clone())
                    .increment(1);
                metrics::histogram!("twofold_dispatcher_send_seconds", "method" => method_used.as_str())
                    .record(started.elapsed().as_secs_f64());
                self.record(
                    &id,
                    DeliveryCommand::RecordDelivered {
                        method: method_used,
                        provider: provider.clone(),
                        latency_ms,
                        ctx: self.ctx(),
                    },
                )
                .await?
                .map_err(|e| anyhow!(e))?;
                Ok(Outcome::Delivered {
                    method: method_used,
                    provider,
                })
            }
            Err(reason) => {
                metrics::counter!("twofold_dispatcher_failed_total", "method" => method_used.as_str(), "provider" => "smtp")
                    .increment(1);
                if attempt >= self.max_attempts
                    || reason.contains("limit")
                    || reason.contains("no email")
                {
                    self.record(
                        &id,
                        DeliveryCommand::RecordFailed {
                            reason: reason.clone(),
                            ctx: self.ctx(),
                        },
                    )
                    .await?
                    .map_err(|e| anyhow!(e))?;
                    Ok(Outcome::Failed(reason))
                } else {
                    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(10));
                    let after = (self.retry_delay * factor).min(Duration::from_secs(300));
                    Ok(Outcome::Retry(reason, after))
                }
            }
        }
    }
}
