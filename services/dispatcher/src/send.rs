//! Sending: email over SMTP (lettre, pooled connections) and SMS through a
//! provider's HTTP API, each with a per-provider rate limit.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use chrono::{DateTime, Utc};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;
use tokio::sync::Mutex;
use twofold_platform::config::SmsProvider;
use twofold_platform::Config;

pub fn sms_text(tenant: &str, code: &str) -> String {
    format!("{code} is your {tenant} sign-in code. Do not share it.")
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

    pub async fn send(
        &self,
        to: &str,
        tenant: &str,
        code: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), String> {
        let expires = expires_at.format("%Y-%m-%d %H:%M UTC");
        let plain = format!(
            "Your {tenant} sign-in code is {code}.\n\nIt expires at {expires}. If you did not try to sign in, ignore this email.\n"
        );
        let html = format!(
            "<p>Your {tenant} sign-in code is <strong>{code}</strong>.</p><p>It expires at {expires}. If you did not try to sign in, ignore this email.</p>",
            tenant = html_escape(tenant)
        );
        let to: Mailbox = to
            .parse()
            .map_err(|_| "the email address is not valid".to_string())?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(format!("{tenant} sign-in code"))
            .multipart(MultiPart::alternative_plain_html(plain, html))
            .map_err(|e| format!("building the email: {e}"))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| format!("SMTP: {e}"))
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub struct SmsClient {
    http: reqwest::Client,
    per_second: u32,
    window: Mutex<(Instant, u32)>,
}

impl SmsClient {
    pub fn new(per_second: u32) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            per_second: per_second.max(1),
            window: Mutex::new((Instant::now(), 0)),
        })
    }

    /// Waits until the provider's per-second budget has room.
    async fn pace(&self) {
        loop {
            let mut w = self.window.lock().await;
            if w.0.elapsed() >= Duration::from_secs(1) {
                *w = (Instant::now(), 0);
            }
            if w.1 < self.per_second {
                w.1 += 1;
                return;
            }
            let left = Duration::from_secs(1).saturating_sub(w.0.elapsed());
            drop(w);
            tokio::time::sleep(left).await;
        }
    }

    /// Sends; the error says why the provider failed (status, timeout, refused).
    pub async fn send(
        &self,
        name: &str,
        provider: &SmsProvider,
        to: &str,
        text: &str,
    ) -> Result<(), String> {
        self.pace().await;
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
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                format!("{name}: timed out")
            } else {
                format!("{name}: unreachable ({})", anyhow!(e).root_cause())
            }
        })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("{name}: answered {}", response.status().as_u16()))
        }
    }
}
