//! Sending: email over SMTP (lettre, pooled connections) and SMS through a
//! provider's HTTP API, with the limits that protect cost: SMS sends per
//! second per provider (governor), codes per recipient per hour (counted
//! here, only the sends that went out).

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Context};
use chrono::{DateTime, Utc};
use governor::{DefaultKeyedRateLimiter, Quota};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;
use twofold_domain::user::ChallengePurpose;
use twofold_platform::config::SmsProvider;
use twofold_platform::Config;

/// Why a code was not sent. Permanent failures are recorded at once;
/// the others are tried again (see [`crate::plan::after_failure`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the user has no phone number")]
    NoPhone,
    #[error("the user has no email address")]
    NoEmail,
    #[error("the tenant names no SMS provider")]
    NoSmsProvider,
    #[error("no SMS provider named {0:?} is configured")]
    UnknownProvider(String),
    #[error("the recipient's hourly limit is reached")]
    RecipientLimit,
    #[error("the email address is not valid")]
    InvalidAddress,
    #[error("building the email: {0}")]
    Message(String),
    /// The SMTP server refused the message for good (a 5xx answer).
    #[error("SMTP refused: {0}")]
    SmtpRefused(String),
    /// The SMTP server could not be reached, or answered 4xx.
    #[error("SMTP: {0}")]
    Smtp(String),
    #[error("{provider}: timed out")]
    ProviderTimeout { provider: String },
    #[error("{provider}: unreachable ({cause})")]
    ProviderUnreachable { provider: String, cause: String },
    #[error("{provider}: answered {status}")]
    ProviderStatus { provider: String, status: u16 },
    /// The provider's circuit is open (it kept failing): not tried.
    #[error("{provider}: not tried, it keeps failing (circuit open)")]
    CircuitOpen { provider: String },
}

impl SendError {
    /// Whether trying again cannot help (the user, the configuration or
    /// the limit has to change first).
    pub fn is_permanent(&self) -> bool {
        match self {
            SendError::NoPhone
            | SendError::NoEmail
            | SendError::NoSmsProvider
            | SendError::UnknownProvider(_)
            | SendError::RecipientLimit
            | SendError::InvalidAddress
            | SendError::Message(_)
            | SendError::SmtpRefused(_) => true,
            SendError::Smtp(_)
            | SendError::ProviderTimeout { .. }
            | SendError::ProviderUnreachable { .. }
            | SendError::ProviderStatus { .. }
            | SendError::CircuitOpen { .. } => false,
        }
    }

    /// Whether this says the provider is unwell (counts toward its circuit
    /// breaker): a timeout, no connection, a 5xx or 429 answer.
    pub fn is_provider_failure(&self) -> bool {
        match self {
            SendError::ProviderTimeout { .. } | SendError::ProviderUnreachable { .. } => true,
            SendError::ProviderStatus { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// Codes per recipient per hour (per instance), keyed by the address or
/// number: at most `limit` sent in any hour. Only sends that went out count:
/// a send reserves its place ([`RecipientLimit::take`]) and a failed one
/// gives it back ([`RecipientLimit::give_back`]), so an SMTP or provider
/// outage does not use up the budget. Time is the dispatcher's clock.
pub struct RecipientLimit {
    limit: usize,
    /// Per recipient, when its codes of the last hour went out (oldest first).
    sent: Mutex<HashMap<String, VecDeque<DateTime<Utc>>>>,
}

const HOUR: chrono::TimeDelta = chrono::TimeDelta::hours(1);

impl RecipientLimit {
    pub fn per_hour(limit: u32) -> Self {
        Self {
            limit: limit as usize,
            sent: Mutex::new(HashMap::new()),
        }
    }

    fn sent(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<DateTime<Utc>>>> {
        self.sent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one code of `recipient`'s budget at `now`, or says it is spent.
    pub fn take(&self, recipient: &str, now: DateTime<Utc>) -> Result<(), SendError> {
        let mut sent = self.sent();
        let times = sent.entry(recipient.to_string()).or_default();
        while times.front().is_some_and(|t| *t <= now - HOUR) {
            times.pop_front();
        }
        if times.len() >= self.limit {
            return Err(SendError::RecipientLimit);
        }
        times.push_back(now);
        Ok(())
    }

    /// Gives back the code taken at `at` for a send that did not go out.
    pub fn give_back(&self, recipient: &str, at: DateTime<Utc>) {
        let mut sent = self.sent();
        if let Some(times) = sent.get_mut(recipient) {
            if let Some(i) = times.iter().rposition(|t| *t == at) {
                times.remove(i);
            }
        }
    }

    /// Drops the recipients with nothing sent in the last hour (their
    /// budget is whole: nothing to remember).
    pub fn forget_idle(&self, now: DateTime<Utc>) {
        let mut sent = self.sent();
        sent.retain(|_, times| times.back().is_some_and(|t| *t > now - HOUR));
        sent.shrink_to_fit();
    }

    /// How many recipients are remembered.
    pub fn remembered(&self) -> usize {
        self.sent().len()
    }
}

/// What a code is for, which its message says: a code to confirm a new
/// address must not read as a sign-in the owner of that address never
/// tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A sign-in's second factor, or the first code of an enrollment at sign-in.
    SignIn,
    /// A step-up: a current factor before a sensitive change.
    Confirm,
    /// A code sent to a new email address or phone number, to prove it.
    VerifyContact,
}

impl Purpose {
    pub fn of(purpose: &ChallengePurpose) -> Self {
        match purpose {
            ChallengePurpose::SignIn | ChallengePurpose::Enrollment => Self::SignIn,
            ChallengePurpose::StepUp { .. } => Self::Confirm,
            ChallengePurpose::VerifyContact => Self::VerifyContact,
        }
    }
}

pub fn sms_text(tenant: &str, code: &str, purpose: Purpose) -> String {
    match purpose {
        Purpose::SignIn => format!("{code} is your {tenant} sign-in code. Do not share it."),
        Purpose::Confirm => format!("{code} is your {tenant} confirmation code. Do not share it."),
        Purpose::VerifyContact => {
            format!("{code} is your {tenant} code to confirm this phone number. Do not share it.")
        }
    }
}

/// An email code's subject, its first sentence (before and after the code)
/// and the rest.
struct EmailText {
    subject: String,
    lead: String,
    after_code: &'static str,
    rest: String,
}

fn email_text(tenant: &str, expires: &str, purpose: Purpose) -> EmailText {
    match purpose {
        Purpose::SignIn => EmailText {
            subject: format!("{tenant} sign-in code"),
            lead: format!("Your {tenant} sign-in code is "),
            after_code: ".",
            rest: format!(
                "It expires at {expires}. If you did not try to sign in, ignore this email."
            ),
        },
        Purpose::Confirm => EmailText {
            subject: format!("{tenant} confirmation code"),
            lead: format!("Your {tenant} confirmation code is "),
            after_code: ".",
            rest: format!(
                "It confirms a change to your account and expires at {expires}. If you did not \
                 ask for it, someone may know your password: change it."
            ),
        },
        Purpose::VerifyContact => EmailText {
            subject: format!("{tenant}: confirm your email address"),
            lead: format!("To confirm this email address for your {tenant} account, your code is "),
            after_code: ".",
            rest: format!(
                "Enter it where you added this address to your account; it expires at \
                 {expires}. Until then your codes keep going where they went. If you did not \
                 add this address, ignore this email: it will not be used."
            ),
        },
    }
}

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let host = config.smtp_host.as_str();
        let mut builder = match config.smtp_tls.as_str() {
            "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(host)?,
            "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)?,
            _ => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
        }
        .port(config.smtp_port)
        .timeout(Some(Duration::from_secs(10)));
        if let (Some(user), Some(password)) = (&config.smtp_username, &config.smtp_password) {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.expose_secret().to_string(),
            ));
        }
        Ok(Self {
            transport: builder.build(),
            from: config
                .smtp_from
                .parse()
                .context("smtp_from is not an email address")?,
        })
    }

    /// The Message-ID of every copy of one delivery: a copy sent again after
    /// a dispatcher died between the server's acceptance and the recorded
    /// outcome carries the same id, which mail stores use to drop it.
    fn message_id(&self, delivery: &str) -> String {
        format!(
            "<{}@{}>",
            delivery.replace(':', "."),
            self.from.email.domain()
        )
    }

    /// A plain-text email (a security notice).
    pub async fn send_notice(
        &self,
        delivery: &str,
        to: &str,
        subject: &str,
        body: &str,
    ) -> Result<(), SendError> {
        let to: Mailbox = to.parse().map_err(|_| SendError::InvalidAddress)?;
        let message = Message::builder()
            .message_id(Some(self.message_id(delivery)))
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .header(lettre::message::header::ContentType::TEXT_PLAIN)
            .body(body.to_string())
            .map_err(|e| SendError::Message(e.to_string()))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| match e.is_permanent() {
                true => SendError::SmtpRefused(e.to_string()),
                false => SendError::Smtp(e.to_string()),
            })
    }

    pub async fn send(
        &self,
        delivery: &str,
        to: &str,
        tenant: &str,
        code: &str,
        expires_at: DateTime<Utc>,
        purpose: Purpose,
    ) -> Result<(), SendError> {
        let expires = expires_at.format("%Y-%m-%d %H:%M UTC").to_string();
        let text = email_text(tenant, &expires, purpose);
        let plain = format!("{}{code}{}\n\n{}\n", text.lead, text.after_code, text.rest);
        let html = format!(
            "<p>{}<strong>{code}</strong>{}</p><p>{}</p>",
            html_escape(&text.lead),
            text.after_code,
            html_escape(&text.rest)
        );
        let to: Mailbox = to.parse().map_err(|_| SendError::InvalidAddress)?;
        let message = Message::builder()
            .message_id(Some(self.message_id(delivery)))
            .from(self.from.clone())
            .to(to)
            .subject(text.subject)
            .multipart(MultiPart::alternative_plain_html(plain, html))
            .map_err(|e| SendError::Message(e.to_string()))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| match e.is_permanent() {
                true => SendError::SmtpRefused(e.to_string()),
                false => SendError::Smtp(e.to_string()),
            })
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub struct SmsClient {
    http: reqwest::Client,
    /// Sends per second, per provider name.
    pace: DefaultKeyedRateLimiter<String>,
}

impl SmsClient {
    /// At most `per_second` sends per provider, each answered within `timeout`.
    pub fn new(per_second: u32, timeout: Duration) -> anyhow::Result<Self> {
        let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        Ok(Self {
            http: reqwest::Client::builder().timeout(timeout).build()?,
            pace: DefaultKeyedRateLimiter::keyed(Quota::per_second(per_second)),
        })
    }

    /// Sends; the error says why the provider failed (status, timeout, refused).
    /// Every copy of one delivery carries the same `Idempotency-Key`, so a
    /// provider that honours it drops a copy sent again after a crash.
    pub async fn send(
        &self,
        delivery: &str,
        name: &str,
        provider: &SmsProvider,
        to: &str,
        text: &str,
    ) -> Result<(), SendError> {
        self.pace.until_key_ready(&name.to_string()).await;
        let request = match provider {
            SmsProvider::Twilio {
                base_url,
                account_sid,
                auth_token,
                from,
            } => self
                .http
                .post(format!(
                    "{}/2010-04-01/Accounts/{account_sid}/Messages.json",
                    base_url.trim_end_matches('/')
                ))
                .basic_auth(account_sid, Some(auth_token.expose_secret()))
                .form(&[("To", to), ("From", from.as_str()), ("Body", text)]),
            SmsProvider::Webhook { url, bearer_token } => {
                let r = self
                    .http
                    .post(url)
                    .json(&serde_json::json!({ "to": to, "body": text }));
                match bearer_token {
                    Some(t) => r.bearer_auth(t.expose_secret()),
                    None => r,
                }
            }
        };
        let provider = name.to_string();
        let response = request
            .header("Idempotency-Key", delivery)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    SendError::ProviderTimeout { provider }
                } else {
                    let cause = anyhow!(e).root_cause().to_string();
                    SendError::ProviderUnreachable {
                        provider: name.to_string(),
                        cause,
                    }
                }
            })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(SendError::ProviderStatus {
                provider: name.to_string(),
                status: response.status().as_u16(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_says_what_it_is_for_and_only_a_sign_in_code_speaks_of_a_sign_in() {
        let purposes = [Purpose::SignIn, Purpose::Confirm, Purpose::VerifyContact];
        for purpose in purposes {
            let sms = sms_text("Acme", "123456", purpose);
            let email = email_text("Acme", "2026-12-05 10:00 UTC", purpose);
            let body = format!("{}123456{} {}", email.lead, email.after_code, email.rest);
            // What `ops/mail-sink` and the tests read a code by.
            assert!(body.contains("code is 123456"), "{body}");
            assert!(sms.starts_with("123456 is your Acme "), "{sms}");
            let signs_in = purpose == Purpose::SignIn;
            for text in [&sms, &email.subject, &body] {
                assert_eq!(
                    text.contains("sign-in") || text.contains("sign in"),
                    signs_in,
                    "{text}"
                );
            }
        }
        assert!(email_text("Acme", "", Purpose::VerifyContact)
            .subject
            .contains("confirm your email address"));
        assert!(sms_text("Acme", "1", Purpose::VerifyContact).contains("confirm this phone number"));
    }

    #[test]
    fn what_the_user_or_the_configuration_must_change_is_permanent() {
        for e in [
            SendError::NoPhone,
            SendError::NoEmail,
            SendError::NoSmsProvider,
            SendError::UnknownProvider("x".into()),
            SendError::RecipientLimit,
            SendError::InvalidAddress,
            SendError::SmtpRefused("550 no such mailbox".into()),
        ] {
            assert!(e.is_permanent(), "{e}");
        }
        for e in [
            SendError::Smtp("connection refused".into()),
            SendError::ProviderTimeout {
                provider: "p".into(),
            },
            SendError::ProviderUnreachable {
                provider: "p".into(),
                cause: "refused".into(),
            },
            SendError::ProviderStatus {
                provider: "p".into(),
                status: 500,
            },
        ] {
            assert!(!e.is_permanent(), "{e}");
        }
    }

    #[test]
    fn reasons_read_as_the_events_record_them() {
        let e = SendError::ProviderStatus {
            provider: "test-sms".into(),
            status: 500,
        };
        assert_eq!(e.to_string(), "test-sms: answered 500");
        assert!(SendError::Smtp("x".into()).to_string().starts_with("SMTP"));
    }

    #[test]
    fn a_recipient_gets_its_hourly_budget_and_no_more() {
        use chrono::TimeZone;
        let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
        let limit = RecipientLimit::per_hour(2);
        assert_eq!(limit.take("a@x.test", t0), Ok(()));
        assert_eq!(limit.take("a@x.test", t0), Ok(()));
        assert_eq!(limit.take("a@x.test", t0), Err(SendError::RecipientLimit));
        // Each recipient has a budget of its own.
        assert_eq!(limit.take("b@x.test", t0), Ok(()));
        assert_eq!(limit.remembered(), 2);
        // Both sent in the last hour: neither is forgotten.
        limit.forget_idle(t0 + chrono::TimeDelta::minutes(59));
        assert_eq!(limit.remembered(), 2);
        // An hour after a send, its place is free again.
        let later = t0 + HOUR;
        assert_eq!(limit.take("a@x.test", later), Ok(()));
        limit.forget_idle(later);
        assert_eq!(limit.remembered(), 1);
        assert_eq!(
            RecipientLimit::per_hour(0).take("a@x.test", t0),
            Err(SendError::RecipientLimit)
        );
    }

    #[test]
    fn a_send_that_did_not_go_out_gives_its_place_back() {
        use chrono::TimeZone;
        let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
        let limit = RecipientLimit::per_hour(1);
        for n in 0..10 {
            let at = t0 + chrono::TimeDelta::seconds(n);
            assert_eq!(limit.take("a@x.test", at), Ok(()), "{n}");
            limit.give_back("a@x.test", at);
        }
        assert_eq!(limit.take("a@x.test", t0), Ok(()));
        assert_eq!(limit.take("a@x.test", t0), Err(SendError::RecipientLimit));
    }
}
