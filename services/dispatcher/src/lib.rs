//! The dispatcher: a JetStream durable pull consumer shared by every instance
//! (run as many as the load needs). For each event that asks for a code to be
//! sent, it claims the send request in the event store, derives the code
//! (never stored), sends it by email (SMTP) or SMS (the tenant's provider,
//! falling back to email when the provider fails), records the outcome as an
//! event, and only then acks. A crashed instance's job is redelivered to
//! another; a request already delivered is not sent again.
//!
//! A job is three steps: [`plan`] (pure: from the typed event and the user,
//! tenant and delivery, what to send where, or nothing), send (SMTP/SMS,
//! [`send`]) and record (the delivery's events). Events that call for a
//! security notice ([`notice`]) are emailed to the user the same way.

pub mod breaker;
pub mod notice;
pub mod plan;
pub mod send;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use futures::StreamExt;
use sqlx::PgPool;
use twofold_domain::delivery::{
    Delivery, DeliveryCommand, DeliveryError, DeliveryEvent, DeliveryStatus,
};
use twofold_domain::tenant::settings::Enforcement;
use twofold_domain::tenant::Tenant;
use twofold_domain::user::User;
use twofold_domain::values::Method;
use twofold_domain::{Actor, Ctx, TenantId, UserId};
use twofold_platform::config::SmsProvider;
use twofold_platform::crypto::Keyring;
use twofold_platform::dead_letters::{last_delivery, DeadLetters, MAX_DELIVER};
use twofold_platform::jetstream::{durable_consumer, Batches};
use twofold_platform::personal::Personal;
use twofold_platform::store::{read_streams, Basis, ExecError, Store, StreamKey};
use twofold_platform::telemetry::{Telemetry, WorkerStart};
use twofold_platform::{Clock, Config, Envelope};

use breaker::{Admit, Breakers};
use notice::{Catalog, NoticeKind, NoticeRequest};
use plan::{after_failure, plan, AfterFailure, CodeRequest, Plan};
pub use send::{Mailer, RecipientLimit, SendError, SmsClient};

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
    /// Deliveries of a message before it is parked in `dead_letters`: more
    /// than the send attempts, so a job that keeps failing to send is
    /// recorded as `DeliveryFailed`, not parked.
    pub max_deliver: i64,
}

impl Source {
    pub fn from_config(config: &Config) -> Self {
        Self {
            stream: config.nats_stream.clone(),
            subject_prefix: config.nats_subject_prefix.clone(),
            durable: "dispatcher".to_string(),
            ack_wait: Duration::from_secs(10),
            retry_delay: Duration::from_secs(5),
            concurrency: config.dispatcher_concurrency.max(1),
            max_deliver: max_deliver_for(config.delivery_max_attempts),
        }
    }
}

/// How long a stopping dispatcher lets the jobs under way finish: longer
/// than an SMS timeout and an SMTP one after it (a fallback), so a job is
/// cut off only when its outcome cannot be recorded.
pub const DRAIN: Duration = Duration::from_secs(25);

/// How long one pull request waits for messages when there are none.
const PULL_WAIT: Duration = Duration::from_secs(5);

/// JetStream deliveries of a job for `max_attempts` sends: room for two more
/// (a crashed instance's, a failed record), at least [`MAX_DELIVER`].
pub fn max_deliver_for(max_attempts: u32) -> i64 {
    (i64::from(max_attempts) + 2).max(MAX_DELIVER)
}

pub struct Dispatcher {
    pool: PgPool,
    /// Metrics and health, when built as a worker ([`Dispatcher::build`]).
    telemetry: Option<Telemetry>,
    users: Store<User>,
    tenants: Store<Tenant>,
    deliveries: Store<Delivery>,
    keys: Keyring,
    /// Opens the personal data (addresses, browser) a notice is made of.
    personal: Personal,
    clock: Arc<dyn Clock>,
    /// The shared durable consumer, at most `concurrency` messages pulled
    /// ahead of what has been taken, so the jobs spread over the instances
    /// that have room for them.
    batches: Batches,
    concurrency: usize,
    mailer: Mailer,
    sms: SmsClient,
    /// A circuit breaker per SMS provider.
    breakers: Breakers,
    providers: BTreeMap<String, SmsProvider>,
    max_attempts: u32,
    retry_delay: Duration,
    recipients: RecipientLimit,
    /// Where jobs that cannot be read, or failed on every delivery, go.
    dead_letters: DeadLetters,
    max_deliver: i64,
    /// The security notices' text.
    notices: Catalog,
    /// Where the pages are, for links in notices.
    public_url: String,
}

/// What a message asks the dispatcher for.
enum Job {
    Code(CodeRequest),
    /// A security notice (made from the event once it is opened).
    Notice,
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
    /// A security notice went to this many addresses.
    NoticeSent {
        kind: NoticeKind,
        recipients: u32,
    },
    /// A security notice could not be sent, for good.
    NoticeFailed {
        kind: NoticeKind,
        error: SendError,
    },
    /// Will be tried again after the delay, which doubles with each attempt.
    Retry(String, Duration),
    Failed(SendError),
    /// Not an event this dispatcher can read (garbage, an unknown newer
    /// version), or failed on its last delivery: parked in `dead_letters`.
    Parked(String),
}

/// What the send step came to.
struct Sent {
    /// Why an SMS code went by email instead.
    fell_back: Option<SendError>,
    /// The method and provider it went by, or why it did not go.
    result: Result<(Method, String), SendError>,
}

impl Dispatcher {
    /// The dispatcher worker: starts its metrics and health server on
    /// `metrics_addr`, then waits for PostgreSQL (migrating it), NATS and the
    /// relay's stream, and binds the shared consumer.
    pub async fn build(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let start = WorkerStart::begin(config, "dispatcher").await?;
        let (source, js) = (Source::from_config(config), jetstream::new(start.nats));
        let (telemetry, pool) = (start.telemetry, start.pool);
        let consumer =
            twofold_platform::retrying("binding the dispatcher's consumer", || bind(&js, &source))
                .await;
        telemetry.readiness().add_consumer(&consumer);
        let mut dispatcher = Self::on(pool, config, &source, consumer, clock)?;
        dispatcher.telemetry = Some(telemetry);
        Ok(dispatcher)
    }

    /// Where the worker's metrics and health are served, when built as one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.telemetry.as_ref().map(Telemetry::local_addr)
    }

    /// A dispatcher on `pool` reading `source` (no metrics server: the
    /// in-process form tests and benchmarks use).
    pub async fn connect(
        pool: PgPool,
        config: &Config,
        source: &Source,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let client = async_nats::connect(&config.nats_url)
            .await
            .with_context(|| format!("connecting to NATS at {}", config.nats_url))?;
        let consumer = bind(&jetstream::new(client), source).await?;
        Self::on(pool, config, source, consumer, clock)
    }

    fn on(
        pool: PgPool,
        config: &Config,
        source: &Source,
        consumer: PullConsumer,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let keys = config.keyring()?;
        let personal = Personal::new(keys.clone());
        Ok(Self {
            pool: pool.clone(),
            telemetry: None,
            users: Store::new(pool.clone()).sealing(personal.clone()),
            personal,
            tenants: Store::new(pool.clone()),
            // A job claims its delivery, then records it: the claim's state is
            // remembered for the record (another instance writing the
            // stream meanwhile fails the append, which then reads it).
            deliveries: Store::remembering(pool.clone(), config.remembered_streams),
            keys,
            clock,
            batches: Batches::new(consumer, source.concurrency),
            concurrency: source.concurrency.max(1),
            mailer: Mailer::from_config(config)?,
            sms: SmsClient::new(
                config.sms_rate_per_second,
                Duration::from_millis(config.sms_timeout_ms.max(1)),
            )?,
            breakers: Breakers::new(
                config.sms_breaker_failures,
                chrono::TimeDelta::seconds(config.sms_breaker_cooldown_secs as i64),
            ),
            providers: config.sms_providers.clone(),
            max_attempts: config.delivery_max_attempts.max(1),
            retry_delay: source.retry_delay,
            recipients: RecipientLimit::per_hour(config.recipient_limit_per_hour),
            dead_letters: DeadLetters::new(pool, &source.durable, source.ack_wait),
            max_deliver: source.max_deliver,
            notices: Catalog::load(
                &config.notice_locale,
                config.notice_templates_dir.as_deref(),
            )?,
            public_url: config.public_url.trim_end_matches('/').to_string(),
        })
    }

    /// Handles up to `max` jobs: those that arrive within `wait`, each
    /// started as it arrives; returns the outcome of each.
    pub async fn process_next(&self, max: usize, wait: Duration) -> anyhow::Result<Vec<Outcome>> {
        let mut batch = self.batches.pull(max, wait).await?;
        let mut jobs = futures::stream::FuturesUnordered::new();
        let mut outcomes = Vec::new();
        let mut pulled = false;
        loop {
            tokio::select! {
                message = batch.next(), if !pulled => match message {
                    Some(Ok(m)) => jobs.push(self.job(m)),
                    Some(Err(e)) => return Err(anyhow!("receiving from JetStream: {e}")),
                    None => pulled = true,
                },
                Some(outcome) = jobs.next(), if !jobs.is_empty() => outcomes.push(outcome),
                else => break,
            }
        }
        outcomes.into_iter().collect()
    }

    /// One job: handled, then acked, or nak'ed with a delay to be tried
    /// again; parked when it cannot be read or fails on its last delivery.
    /// While PostgreSQL is away the job is held and tried again when it is
    /// back, using up no delivery.
    async fn job(&self, message: jetstream::Message) -> anyhow::Result<Outcome> {
        let parsed = serde_json::from_slice::<Envelope>(&message.payload)
            .map_err(|e| format!("a message that is not an event: {e}"))
            .and_then(|event| Ok((readable(&event)?, event)));
        let (request, event) = match parsed {
            Ok(parsed) => parsed,
            Err(reason) => {
                self.dead_letters.park(&message, &reason).await?;
                return Ok(Outcome::Parked(reason));
            }
        };
        let Some(request) = request else {
            message.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
            return Ok(Outcome::Skipped);
        };
        metrics::gauge!("twofold_dispatcher_in_flight").increment(1.0);
        let outcome = loop {
            let handled = match &request {
                Job::Code(code) => {
                    self.dead_letters
                        .keeping_alive(&[&message], self.handle(code))
                        .await
                }
                Job::Notice => {
                    self.dead_letters
                        .keeping_alive(&[&message], self.open_and_notify(&event))
                        .await
                }
            };
            match handled {
                Ok(o) => break o,
                Err(e) if self.dead_letters.database_answers().await => {
                    // The store answers, so the failure is this job's.
                    break Outcome::Retry(format!("{e:#}"), self.retry_delay);
                }
                Err(_) => {
                    self.dead_letters
                        .hold_until_database_answers(&[&message])
                        .await
                }
            }
        };
        metrics::gauge!("twofold_dispatcher_in_flight").decrement(1.0);
        match outcome {
            Outcome::Retry(reason, _) if last_delivery(&message, self.max_deliver) => {
                let reason = format!(
                    "failed on all {} deliveries; last: {reason}",
                    self.max_deliver
                );
                self.dead_letters.park(&message, &reason).await?;
                Ok(Outcome::Parked(reason))
            }
            Outcome::Retry(reason, after) => {
                self.dead_letters.log().warn("retry", |skipped| {
                    tracing::warn!(%reason, skipped, "delivery will be retried");
                });
                message
                    .ack_with(AckKind::Nak(Some(after)))
                    .await
                    .map_err(|e| anyhow!("nak: {e}"))?;
                Ok(Outcome::Retry(reason, after))
            }
            outcome => {
                message.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
                Ok(outcome)
            }
        }
    }

    /// Works on up to `concurrency` jobs at a time until `shutdown` resolves.
    /// It pulls only as many messages as it has free slots, and starts each
    /// as it arrives, so every message it holds is being worked on and kept
    /// alive. On shutdown it takes no new job and lets the ones under way
    /// finish (record their outcome and ack) for at most [`DRAIN`]: a
    /// restart sends no code twice. A job cut off after that, or by a crash,
    /// is not acked: JetStream hands it to another instance after the ack
    /// wait.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) {
        let me = Arc::new(self);
        let mut jobs = tokio::task::JoinSet::new();
        let work = async {
            loop {
                while jobs.try_join_next().is_some() {}
                if jobs.len() >= me.concurrency {
                    jobs.join_next().await;
                    continue;
                }
                let free = me.concurrency - jobs.len();
                let mut batch = match me.batches.pull(free, PULL_WAIT).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "dispatcher cannot pull; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                while let Some(message) = batch.next().await {
                    match message {
                        Ok(m) => {
                            let me = me.clone();
                            jobs.spawn(async move {
                                if let Err(e) = me.job(m).await {
                                    tracing::warn!(error = %format!("{e:#}"), "dispatcher step failed");
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "receiving from JetStream");
                            break;
                        }
                    }
                }
            }
        };
        // Recipients whose hourly budget is whole again are forgotten.
        let forget = async {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                every.tick().await;
                me.recipients.forget_idle(me.clock.now());
            }
        };
        tokio::select! {
            _ = shutdown => {}
            _ = work => {}
            _ = forget => {}
        }
        let drained =
            tokio::time::timeout(DRAIN, async { while jobs.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                cut_off = jobs.len(),
                "dispatcher stopped with jobs still under way"
            );
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

    /// Appends `command` to the delivery `id`, deciding on `basis` (just
    /// read) when given.
    async fn append(
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

    /// [`Dispatcher::append`] of a command the delivery must accept.
    async fn record(&self, id: &str, command: DeliveryCommand) -> anyhow::Result<()> {
        self.append(id, None, command)
            .await?
            .map_err(|e| anyhow!(e))?;
        Ok(())
    }

    /// One job: plan, claim, send, record.
    async fn handle(&self, request: &CodeRequest) -> anyhow::Result<Outcome> {
        let id = request.delivery_id();
        let (user, tenant, basis) = self.read(request.user_id, request.tenant_hint, &id).await?;
        // The tenant read with the user is the one the event named; the
        // user's own is read if they differ.
        let tenant = match (user.tenant_id, tenant) {
            (Some(t), Some(tenant)) if request.tenant_hint == Some(t) => Some(tenant),
            (Some(t), _) => Some(self.tenants.load(&t.to_string()).await?),
            (None, _) => None,
        };
        let now = self.clock.now();
        let send = match plan(
            request,
            &user,
            tenant.as_ref(),
            basis.state(),
            &self.providers,
            now,
        ) {
            Plan::Superseded => return Ok(Outcome::Superseded),
            Plan::AlreadyDone => return Ok(Outcome::AlreadyDone),
            Plan::Send(send) => send,
        };
        let claimed = self
            .append(
                &id,
                Some(basis),
                DeliveryCommand::Claim {
                    challenge_id: request.challenge_id,
                    generation: request.generation,
                    user_id: request.user_id,
                    tenant_id: send.tenant_id,
                    method: request.method,
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
        let code = self
            .keys
            .delivered_code(request.challenge_id, request.generation);
        let started = Instant::now();
        let sent = self.send(&id, &send, &code).await;
        self.record_sent(&id, &send, attempt, sent, started).await
    }

    /// A security notice: to the user's email address (and, after a change,
    /// the one before), once per event, recorded on its own delivery stream.
    /// A notice is made of the user's personal data (addresses, browser):
    /// the event is opened for it here (a code needs none of it), so a
    /// database outage holds the job like any other step of it.
    async fn open_and_notify(&self, event: &Envelope) -> anyhow::Result<Outcome> {
        let mut event = event.clone();
        self.personal
            .open_envelopes(&self.pool, std::slice::from_mut(&mut event))
            .await?;
        match NoticeRequest::from_event(&event)? {
            Some(request) => self.handle_notice(&request).await,
            None => Ok(Outcome::Skipped),
        }
    }

    async fn handle_notice(&self, request: &NoticeRequest) -> anyhow::Result<Outcome> {
        let id = request.delivery_id();
        let (user, tenant, basis) = self.read(request.user_id, request.tenant_hint, &id).await?;
        let tenant = match (user.tenant_id, tenant) {
            (Some(t), Some(tenant)) if request.tenant_hint == Some(t) => Some(tenant),
            (Some(t), _) => Some(self.tenants.load(&t.to_string()).await?),
            (None, _) => None,
        };
        let (Some(tenant_id), Some(tenant)) = (user.tenant_id, tenant) else {
            return Ok(Outcome::Superseded);
        };
        if matches!(
            basis.state().status,
            DeliveryStatus::Delivered | DeliveryStatus::Failed
        ) {
            return Ok(Outcome::AlreadyDone);
        }
        // A device remembered at a sign-in is a new one only where devices
        // are recognized: at every login each sign-in remembers one.
        if request.kind == NoticeKind::NewDeviceSignIn
            && tenant.settings.enforcement != Enforcement::UnrecognizedDevices
        {
            return Ok(Outcome::Skipped);
        }
        if let Some(before) = request.unless_after {
            let previous: Option<String> = sqlx::query_scalar(
                "SELECT event_type FROM events WHERE aggregate_type = 'user' AND aggregate_id = $1 AND sequence = $2",
            )
            .bind(request.user_id.to_string())
            .bind(request.sequence - 1)
            .fetch_optional(&self.pool)
            .await?;
            if previous.as_deref() == Some(before) {
                return Ok(Outcome::Skipped);
            }
        }
        // A reset link only while it is the one that works.
        let mut request = request.clone();
        if let Some((reset_id, until)) = request.reset {
            if user.reset_link != Some((reset_id, until)) || self.clock.now() >= until {
                return Ok(Outcome::Superseded);
            }
            request.link = Some(format!(
                "{}/t/{tenant_id}/reset?token={}",
                self.public_url,
                self.keys.reset_token(request.user_id.as_uuid(), reset_id)
            ));
        }
        let request = &request;
        let mut to: Vec<String> = user.email.iter().map(|e| e.as_str().to_string()).collect();
        if let Some(old) = &request.previous_email {
            if !to.contains(old) {
                to.push(old.clone());
            }
        }
        if to.is_empty() {
            return Ok(Outcome::Skipped);
        }
        let claimed = self
            .append(
                &id,
                Some(basis),
                DeliveryCommand::ClaimNotice {
                    notice: request.kind.as_str().to_string(),
                    user_id: request.user_id,
                    tenant_id,
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
                    DeliveryEvent::NoticeClaimed { attempt, .. } => Some(*attempt),
                    _ => None,
                })
                .unwrap_or(1),
        };
        let (subject, body) = self.notices.render(request, &tenant.name);
        let mut sent = Ok(());
        for address in &to {
            sent = self.mailer.send_notice(&id, address, &subject, &body).await;
            if sent.is_err() {
                break;
            }
        }
        let kind = request.kind.as_str();
        match sent {
            Ok(()) => {
                metrics::counter!("twofold_notices_sent_total", "notice" => kind).increment(1);
                let recipients = to.len() as u32;
                self.record(
                    &id,
                    DeliveryCommand::RecordNoticeSent {
                        recipients,
                        ctx: self.ctx(),
                    },
                )
                .await?;
                Ok(Outcome::NoticeSent {
                    kind: request.kind,
                    recipients,
                })
            }
            Err(error) => {
                metrics::counter!("twofold_notices_failed_total", "notice" => kind).increment(1);
                match after_failure(&error, attempt, self.max_attempts, self.retry_delay) {
                    AfterFailure::Fail => {
                        self.record(
                            &id,
                            DeliveryCommand::RecordNoticeFailed {
                                reason: error.to_string(),
                                ctx: self.ctx(),
                            },
                        )
                        .await?;
                        Ok(Outcome::NoticeFailed {
                            kind: request.kind,
                            error,
                        })
                    }
                    AfterFailure::Retry(after) => Ok(Outcome::Retry(error.to_string(), after)),
                }
            }
        }
    }

    /// The send step: by SMS when asked (falling back to email), else by email.
    async fn send(&self, id: &str, send: &plan::Send, code: &str) -> Sent {
        let mut fell_back = None;
        if let Some(sms) = &send.sms {
            let sent = match sms {
                Ok((provider, phone)) => self
                    .send_sms(id, provider, phone, send, code)
                    .await
                    .map(|()| (Method::Sms, provider.clone())),
                Err(e) => Err(e.clone()),
            };
            match sent {
                Ok(sent) => {
                    return Sent {
                        fell_back: None,
                        result: Ok(sent),
                    }
                }
                Err(e) => fell_back = Some(e),
            }
        }
        let result = match &send.email {
            Ok(address) => self.send_email(id, address, send, code).await,
            Err(e) => Err(e.clone()),
        };
        Sent {
            fell_back,
            result: result.map(|()| (Method::Email, "smtp".to_string())),
        }
    }

    async fn send_sms(
        &self,
        id: &str,
        provider: &str,
        phone: &str,
        send: &plan::Send,
        code: &str,
    ) -> Result<(), SendError> {
        let config = self
            .providers
            .get(provider)
            .ok_or_else(|| SendError::UnknownProvider(provider.to_string()))?;
        let now = self.clock.now();
        self.recipients.take(phone, now)?;
        if self.breakers.admit(provider, now) == Admit::Open {
            self.recipients.give_back(phone, now);
            return Err(SendError::CircuitOpen {
                provider: provider.to_string(),
            });
        }
        let sent = self
            .sms
            .send(
                id,
                provider,
                config,
                phone,
                &send::sms_text(&send.tenant_name, code, send.purpose),
            )
            .await;
        if sent.is_err() {
            self.recipients.give_back(phone, now);
        }
        // Any answer but a failure of the provider itself (a refused number,
        // say) shows it is up.
        match &sent {
            Err(e) if e.is_provider_failure() => self.breakers.failed(provider, self.clock.now()),
            _ => self.breakers.succeeded(provider),
        }
        sent
    }

    async fn send_email(
        &self,
        id: &str,
        address: &str,
        send: &plan::Send,
        code: &str,
    ) -> Result<(), SendError> {
        let now = self.clock.now();
        self.recipients.take(address, now)?;
        let sent = self
            .mailer
            .send(
                id,
                address,
                &send.tenant_name,
                code,
                send.expires_at,
                send.purpose,
            )
            .await;
        if sent.is_err() {
            self.recipients.give_back(address, now);
        }
        sent
    }

    /// The record step: the fallback, then the delivery, a failure, or a
    /// retry to come.
    async fn record_sent(
        &self,
        id: &str,
        send: &plan::Send,
        attempt: u32,
        sent: Sent,
        started: Instant,
    ) -> anyhow::Result<Outcome> {
        if let Some(reason) = sent.fell_back {
            let provider = match &send.sms {
                Some(Ok((provider, _))) => provider.clone(),
                _ => String::new(),
            };
            metrics::counter!("twofold_dispatcher_failed_total", "method" => "sms", "provider" => provider)
                .increment(1);
            self.record(
                id,
                DeliveryCommand::RecordFallback {
                    reason: reason.to_string(),
                    ctx: self.ctx(),
                },
            )
            .await?;
        }
        match sent.result {
            Ok((method, provider)) => {
                let elapsed = started.elapsed();
                metrics::counter!("twofold_dispatcher_sent_total", "method" => method.as_str(), "provider" => provider.clone())
                    .increment(1);
                metrics::histogram!("twofold_dispatcher_send_seconds", "method" => method.as_str())
                    .record(elapsed.as_secs_f64());
                self.record(
                    id,
                    DeliveryCommand::RecordDelivered {
                        method,
                        provider: provider.clone(),
                        latency_ms: elapsed.as_millis() as u64,
                        ctx: self.ctx(),
                    },
                )
                .await?;
                Ok(Outcome::Delivered { method, provider })
            }
            Err(error) => {
                metrics::counter!("twofold_dispatcher_failed_total", "method" => Method::Email.as_str(), "provider" => "smtp")
                    .increment(1);
                match after_failure(&error, attempt, self.max_attempts, self.retry_delay) {
                    AfterFailure::Fail => {
                        self.record(
                            id,
                            DeliveryCommand::RecordFailed {
                                reason: error.to_string(),
                                ctx: self.ctx(),
                            },
                        )
                        .await?;
                        Ok(Outcome::Failed(error))
                    }
                    AfterFailure::Retry(after) => Ok(Outcome::Retry(error.to_string(), after)),
                }
            }
        }
    }
}

/// The code a message asks for, `None` when it asks for none, or why it
/// cannot be read (not an event, an event of an unknown newer version).
fn readable(event: &Envelope) -> Result<Option<Job>, String> {
    if let Some(code) = CodeRequest::from_event(event).map_err(|e| format!("{e:#}"))? {
        return Ok(Some(Job::Code(code)));
    }
    Ok(NoticeRequest::from_event(event)
        .map_err(|e| format!("{e:#}"))?
        .map(|_| Job::Notice))
}

/// Binds to (creating if needed) the shared durable consumer of user events.
async fn bind(js: &jetstream::Context, source: &Source) -> anyhow::Result<PullConsumer> {
    durable_consumer(
        js,
        &source.stream,
        jetstream::consumer::pull::Config {
            durable_name: Some(source.durable.clone()),
            filter_subject: format!("{}.events.*.user.>", source.subject_prefix),
            ack_wait: source.ack_wait,
            max_deliver: source.max_deliver,
            ..Default::default()
        },
    )
    .await
}
