//! Typed configuration, layered: defaults, then a TOML file (`TWOFOLD_CONFIG` or
//! `--config`), then `TWOFOLD_...` environment variables. Validated at start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context};
use ipnet::IpNet;
use secrecy::SecretString;
use serde::Deserialize;

use crate::crypto::Keyring;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// PostgreSQL connection string of the event store.
    pub database_url: SecretString,
    /// Most connections the pool keeps.
    pub database_max_connections: u32,
    /// Streams whose latest state a verifier remembers to decide commands
    /// without a read (0: read every time). See `Store::remembering`.
    pub remembered_streams: usize,
    /// Where the verifier's HTTP API listens.
    pub http_addr: SocketAddr,
    /// Where Prometheus scrapes this worker's metrics.
    pub metrics_addr: SocketAddr,
    /// The address people reach the verifier's pages at (behind any proxy).
    /// Browser cookies are `Secure` unless this is plain http on loopback.
    pub public_url: String,
    /// Server keys by id (hex, 32 bytes each): TOTP seeds are sealed, and
    /// codes and tokens keyed, under the current one; older ids still open.
    pub keys: BTreeMap<String, SecretString>,
    /// The id in `keys` used for new secrets.
    pub current_key_id: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// NATS server the relay publishes to and the workers consume from.
    pub nats_url: String,
    /// JetStream stream carrying the events.
    pub nats_stream: String,
    /// Subjects are `<prefix>.events.<tenant>.<aggregate_type>.<event_type>`.
    pub nats_subject_prefix: String,
    /// How often the relay looks at an empty outbox, in milliseconds.
    pub relay_poll_ms: u64,
    /// SMTP server for email codes.
    pub smtp_host: String,
    pub smtp_port: u16,
    /// `none`, `starttls` or `tls`.
    pub smtp_tls: String,
    pub smtp_username: Option<String>,
    pub smtp_password: Option<SecretString>,
    /// The From address of code emails.
    pub smtp_from: String,
    /// SMS providers by the name tenant settings use in `sms_provider`.
    pub sms_providers: BTreeMap<String, SmsProvider>,
    /// Attempts at one delivery before it is recorded as failed.
    pub delivery_max_attempts: u32,
    /// Deliveries one dispatcher instance works on at once.
    pub dispatcher_concurrency: usize,
    /// Most SMS sends per second per provider (cost protection).
    pub sms_rate_per_second: u32,
    /// Most codes sent to one recipient per hour.
    pub recipient_limit_per_hour: u32,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` is believed;
    /// from anyone else the peer address is the client's.
    pub trusted_proxies: Vec<IpNet>,
}

/// An SMS provider's API.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SmsProvider {
    /// A Twilio-compatible Messages API:
    /// `POST {base_url}/2010-04-01/Accounts/{account_sid}/Messages.json`.
    Twilio {
        base_url: String,
        account_sid: String,
        auth_token: SecretString,
        from: String,
    },
    /// A generic JSON webhook: `POST {url}` with `{"to", "body"}`.
    Webhook {
        url: String,
        #[serde(default)]
        bearer_token: Option<SecretString>,
    },
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: SecretString::from("postgres://postgres@127.0.0.1:5432/twofold"),
            database_max_connections: 16,
            remembered_streams: 8192,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            public_url: "http://127.0.0.1:8080".to_string(),
            keys: BTreeMap::new(),
            current_key_id: String::new(),
            max_body_bytes: 16 * 1024,
            trusted_proxies: Vec::new(),
            nats_url: "nats://127.0.0.1:4222".to_string(),
            nats_stream: "TWOFOLD_EVENTS".to_string(),
            nats_subject_prefix: "twofold".to_string(),
            relay_poll_ms: 5,
            smtp_host: "127.0.0.1".to_string(),
            smtp_port: 25,
            smtp_tls: "none".to_string(),
            smtp_username: None,
            smtp_password: None,
            smtp_from: "twofold <no-reply@localhost>".to_string(),
            sms_providers: BTreeMap::new(),
            delivery_max_attempts: 5,
            dispatcher_concurrency: 16,
            sms_rate_per_second: 20,
            recipient_limit_per_hour: 20,
        }
    }
}

impl Config {
    /// Defaults, then the file if one is named, then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let env_file = std::env::var("TWOFOLD_CONFIG").ok();
        let file = file.or(env_file.as_deref().map(Path::new));
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("reading the configuration file {}", path.display())
                })?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing the configuration file {}", path.display()))?
            }
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        if let Some(v) = var("TWOFOLD_DATABASE_URL") {
            self.database_url = SecretString::from(v);
        }
        if let Some(v) = var("TWOFOLD_DATABASE_MAX_CONNECTIONS") {
            self.database_max_connections = v
                .parse()
                .context("TWOFOLD_DATABASE_MAX_CONNECTIONS must be a whole number")?;
        }
        if let Some(v) = var("TWOFOLD_SMS_RATE_PER_SECOND") {
            self.sms_rate_per_second = v
                .parse()
                .context("TWOFOLD_SMS_RATE_PER_SECOND must be a whole number")?;
        }
        if let Some(v) = var("TWOFOLD_RECIPIENT_LIMIT_PER_HOUR") {
            self.recipient_limit_per_hour = v
                .parse()
                .context("TWOFOLD_RECIPIENT_LIMIT_PER_HOUR must be a whole number")?;
        }
        if let Some(v) = var("TWOFOLD_DISPATCHER_CONCURRENCY") {
            self.dispatcher_concurrency = v
                .parse()
                .context("TWOFOLD_DISPATCHER_CONCURRENCY must be a whole number")?;
        }
        if let Some(v) = var("TWOFOLD_RELAY_POLL_MS") {
            self.relay_poll_ms = v
                .parse()
                .context("TWOFOLD_RELAY_POLL_MS must be a whole number of milliseconds")?;
        }
        if let Some(v) = var("TWOFOLD_REMEMBERED_STREAMS") {
            self.remembered_streams = v
                .parse()
                .context("TWOFOLD_REMEMBERED_STREAMS must be a whole number")?;
        }
        if let Some(v) = var("TWOFOLD_HTTP_ADDR") {
            self.http_addr = v
                .parse()
                .context("TWOFOLD_HTTP_ADDR must be an address like 127.0.0.1:8080")?;
        }
        if let Some(v) = var("TWOFOLD_METRICS_ADDR") {
            self.metrics_addr = v
                .parse()
                .context("TWOFOLD_METRICS_ADDR must be an address like 127.0.0.1:9464")?;
        }
        if let Some(v) = var("TWOFOLD_PUBLIC_URL") {
            self.public_url = v;
        }
        if let Some(v) = var("TWOFOLD_KEYS") {
            // "id1=hex,id2=hex"
            self.keys.clear();
            for pair in v.split(',').filter(|p| !p.trim().is_empty()) {
                let Some((id, key)) = pair.split_once('=') else {
                    bail!("TWOFOLD_KEYS must look like id1=<64 hex digits>,id2=<64 hex digits>");
                };
                self.keys.insert(
                    id.trim().to_string(),
                    SecretString::from(key.trim().to_string()),
                );
            }
        }
        if let Some(v) = var("TWOFOLD_CURRENT_KEY_ID") {
            self.current_key_id = v;
        }
        if let Some(v) = var("TWOFOLD_NATS_URL") {
            self.nats_url = v;
        }
        if let Some(v) = var("TWOFOLD_NATS_STREAM") {
            self.nats_stream = v;
        }
        if let Some(v) = var("TWOFOLD_NATS_SUBJECT_PREFIX") {
            self.nats_subject_prefix = v;
        }
        if let Some(v) = var("TWOFOLD_SMTP_HOST") {
            self.smtp_host = v;
        }
        if let Some(v) = var("TWOFOLD_SMTP_PORT") {
            self.smtp_port = v
                .parse()
                .context("TWOFOLD_SMTP_PORT must be a port number")?;
        }
        if let Some(v) = var("TWOFOLD_SMTP_TLS") {
            self.smtp_tls = v;
        }
        if let Some(v) = var("TWOFOLD_SMTP_USERNAME") {
            self.smtp_username = Some(v);
        }
        if let Some(v) = var("TWOFOLD_SMTP_PASSWORD") {
            self.smtp_password = Some(SecretString::from(v));
        }
        if let Some(v) = var("TWOFOLD_SMTP_FROM") {
            self.smtp_from = v;
        }
        if let Some(v) = var("TWOFOLD_SMS_PROVIDERS") {
            self.sms_providers = serde_json::from_str(&v)
                .context("TWOFOLD_SMS_PROVIDERS must be a JSON object of providers by name")?;
        }
        if let Some(v) = var("TWOFOLD_TRUSTED_PROXIES") {
            self.trusted_proxies = v
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    p.parse::<IpNet>()
                        .or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from))
                        .with_context(|| {
                            format!(
                                "TWOFOLD_TRUSTED_PROXIES: {p:?} is not an IP address or CIDR range"
                            )
                        })
                })
                .collect::<anyhow::Result<_>>()?;
        }
        Ok(())
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !matches!(self.smtp_tls.as_str(), "none" | "starttls" | "tls") {
            bail!("smtp_tls must be none, starttls or tls");
        }
        let token_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !token_ok(&self.nats_stream) {
            bail!("nats_stream must be letters, digits, _ and - only");
        }
        if !self.nats_subject_prefix.split('.').all(token_ok) {
            bail!("nats_subject_prefix must be dot-separated tokens of letters, digits, _ and -");
        }
        if self.dispatcher_concurrency == 0 {
            bail!("dispatcher_concurrency must be at least 1");
        }
        if self.relay_poll_ms == 0 {
            bail!("relay_poll_ms must be at least 1");
        }
        if self.database_max_connections == 0 {
            bail!("database_max_connections must be at least 1");
        }
        self.keyring()?;
        Ok(())
    }

    /// The server keys, parsed; fails with a clear message when none is set.
    pub fn keyring(&self) -> anyhow::Result<Keyring> {
        Keyring::from_config(&self.keys, &self.current_key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn environment_overrides_the_defaults() {
        let mut c = Config::default();
        let key = "11".repeat(32);
        let env = BTreeMap::from([
            ("TWOFOLD_HTTP_ADDR", "0.0.0.0:9999".to_string()),
            ("TWOFOLD_KEYS", format!("k1={key}")),
            ("TWOFOLD_CURRENT_KEY_ID", "k1".to_string()),
            ("TWOFOLD_SMS_RATE_PER_SECOND", "250".to_string()),
            ("TWOFOLD_DISPATCHER_CONCURRENCY", "4".to_string()),
        ]);
        c.apply_env(|n| env.get(n).cloned()).unwrap();
        assert_eq!(c.http_addr.port(), 9999);
        assert_eq!(c.sms_rate_per_second, 250);
        assert_eq!(c.dispatcher_concurrency, 4);
        assert_eq!(c.keys["k1"].expose_secret(), key);
        c.validate().unwrap();
    }

    #[test]
    fn a_bad_value_is_named_in_the_error() {
        let mut c = Config::default();
        let err = c
            .apply_env(|n| (n == "TWOFOLD_HTTP_ADDR").then(|| "nope".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("TWOFOLD_HTTP_ADDR"));
    }

    #[test]
    fn missing_keys_are_refused_with_a_hint() {
        let err = Config::default().validate().unwrap_err();
        assert!(format!("{err:#}").contains("TWOFOLD_KEYS"));
    }
}
