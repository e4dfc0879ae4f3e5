//! Typed configuration, layered: defaults, then a TOML file (`TWOFOLD_CONFIG` or
//! `--config`), then `TWOFOLD_...` environment variables. Validated at start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context};
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use ipnet::IpNet;
use secrecy::SecretString;
use serde::Deserialize;

use crate::audit_signing::AuditSigner;
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
    /// Ed25519 seeds by id (hex, 32 bytes each) that sign audit exports; the
    /// others stay published so exports they signed still verify. None:
    /// derived from the server keys (see `Keyring`).
    pub audit_signing_keys: BTreeMap<String, SecretString>,
    /// The id in `audit_signing_keys` that signs new exports.
    pub audit_signing_key_id: String,
    /// A signed checkpoint of each tenant's audit chain every this many
    /// entries (0: none by count).
    pub audit_checkpoint_entries: u64,
    /// And one of the chain's head when the last is this old, in seconds.
    pub audit_checkpoint_secs: u64,
    /// Entries are chained once their event is this old (seconds): longer
    /// than any writing transaction stays open.
    pub audit_checkpoint_settle_secs: u64,
    /// The directory counts the users matching a query up to this many;
    /// past it the total is "more than" this (or than the page's end).
    pub directory_count_limit: u32,
    /// Audit exports (`GET /audit`, filtered or not) one verifier streams at
    /// once; one more is refused (`exports_busy`) until one has finished. Each
    /// holds a database connection and a share of the cores while it runs.
    pub audit_exports_at_once: usize,
    /// An export whose client takes nothing for this many seconds (its
    /// connection open, nothing read) is cut short and gives its place up.
    pub audit_export_idle_secs: u64,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// NATS server the relay publishes to and the workers consume from.
    pub nats_url: String,
    /// JetStream stream carrying the events.
    pub nats_stream: String,
    /// Subjects are `<prefix>.events.<tenant>.<aggregate_type>.<event_type>`.
    pub nats_subject_prefix: String,
    /// A NATS credentials file (a user JWT and its NKey seed, `.creds`).
    pub nats_credentials_file: Option<String>,
    /// NATS user and password (both or neither).
    pub nats_user: Option<String>,
    pub nats_password: Option<SecretString>,
    /// A NATS authentication token.
    pub nats_token: Option<SecretString>,
    /// PEM file of the CAs that sign the NATS servers' certificates (instead
    /// of the system's roots).
    pub nats_tls_ca_file: Option<String>,
    /// PEM files of this client's certificate and key, for servers that
    /// verify clients (both or neither).
    pub nats_tls_cert_file: Option<String>,
    pub nats_tls_key_file: Option<String>,
    /// Refuse to talk to a NATS server without TLS.
    pub nats_tls_required: bool,
    /// How often the relay looks at an empty outbox, in milliseconds.
    pub relay_poll_ms: u64,
    /// How long the stream keeps a message, in seconds (at least 1; the
    /// event store is the record, the stream only carries it).
    pub nats_stream_max_age_secs: u64,
    /// Most bytes the stream keeps, the oldest dropped first (0: no limit;
    /// JetStream reserves a limit's worth of its storage for the stream).
    pub nats_stream_max_bytes: u64,
    /// Copies of the stream in a NATS cluster (1 on a single server).
    pub nats_stream_replicas: usize,
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
    /// How long an SMS provider may take to answer, in milliseconds.
    pub sms_timeout_ms: u64,
    /// Failures or timeouts in a row after which a provider's circuit opens
    /// (its codes go by email at once, untried); 0: never.
    pub sms_breaker_failures: u32,
    /// How long an open circuit stays open before one probe is let through.
    pub sms_breaker_cooldown_secs: u64,
    /// The language of security notices (`notices.<locale>.toml`).
    pub notice_locale: String,
    /// A directory of translated `notices.<locale>.toml` files; English is
    /// built in.
    pub notice_templates_dir: Option<String>,
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
            audit_signing_keys: BTreeMap::new(),
            audit_signing_key_id: String::new(),
            audit_checkpoint_entries: 1000,
            audit_checkpoint_secs: 3600,
            audit_checkpoint_settle_secs: 30,
            directory_count_limit: 1000,
            audit_exports_at_once: 2,
            audit_export_idle_secs: 60,
            max_body_bytes: 16 * 1024,
            trusted_proxies: Vec::new(),
            nats_url: "nats://127.0.0.1:4222".to_string(),
            nats_stream: "TWOFOLD_EVENTS".to_string(),
            nats_subject_prefix: "twofold".to_string(),
            nats_credentials_file: None,
            nats_user: None,
            nats_password: None,
            nats_token: None,
            nats_tls_ca_file: None,
            nats_tls_cert_file: None,
            nats_tls_key_file: None,
            nats_tls_required: false,
            relay_poll_ms: 5,
            nats_stream_max_age_secs: 30 * 24 * 3600,
            nats_stream_max_bytes: 0,
            nats_stream_replicas: 1,
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
            sms_timeout_ms: 10_000,
            sms_breaker_failures: 5,
            sms_breaker_cooldown_secs: 30,
            notice_locale: "en".to_string(),
            notice_templates_dir: None,
        }
    }
}

/// Every configuration key; in the environment each is `TWOFOLD_` and the
/// key in capitals (`http_addr` is `TWOFOLD_HTTP_ADDR`).
const KEYS: &[&str] = &[
    "database_url",
    "database_max_connections",
    "remembered_streams",
    "http_addr",
    "metrics_addr",
    "public_url",
    "keys",
    "current_key_id",
    "audit_signing_keys",
    "audit_signing_key_id",
    "audit_checkpoint_entries",
    "audit_checkpoint_secs",
    "audit_checkpoint_settle_secs",
    "directory_count_limit",
    "audit_exports_at_once",
    "audit_export_idle_secs",
    "max_body_bytes",
    "nats_url",
    "nats_stream",
    "nats_subject_prefix",
    "nats_credentials_file",
    "nats_user",
    "nats_password",
    "nats_token",
    "nats_tls_ca_file",
    "nats_tls_cert_file",
    "nats_tls_key_file",
    "nats_tls_required",
    "relay_poll_ms",
    "nats_stream_max_age_secs",
    "nats_stream_max_bytes",
    "nats_stream_replicas",
    "smtp_host",
    "smtp_port",
    "smtp_tls",
    "smtp_username",
    "smtp_password",
    "smtp_from",
    "sms_providers",
    "delivery_max_attempts",
    "dispatcher_concurrency",
    "sms_rate_per_second",
    "recipient_limit_per_hour",
    "sms_timeout_ms",
    "sms_breaker_failures",
    "sms_breaker_cooldown_secs",
    "notice_locale",
    "notice_templates_dir",
    "trusted_proxies",
];

/// Keys whose values are whole numbers (the others are read as text).
const NUMBERS: &[&str] = &[
    "database_max_connections",
    "remembered_streams",
    "max_body_bytes",
    "directory_count_limit",
    "audit_exports_at_once",
    "audit_export_idle_secs",
    "audit_checkpoint_entries",
    "audit_checkpoint_secs",
    "audit_checkpoint_settle_secs",
    "relay_poll_ms",
    "nats_stream_max_age_secs",
    "nats_stream_max_bytes",
    "nats_stream_replicas",
    "smtp_port",
    "delivery_max_attempts",
    "dispatcher_concurrency",
    "sms_rate_per_second",
    "recipient_limit_per_hour",
    "sms_timeout_ms",
    "sms_breaker_failures",
    "sms_breaker_cooldown_secs",
];

/// `TWOFOLD_*` variables that are not configuration keys.
fn other_variable(name: &str) -> bool {
    matches!(
        name,
        "TWOFOLD_CONFIG" | "TWOFOLD_LOG" | "TWOFOLD_LOG_FORMAT" | "TWOFOLD_COMMIT"
    ) || name.starts_with("TWOFOLD_TEST_")
        || name.starts_with("TWOFOLD_BENCH_")
}

/// The known variable nearest to an unknown one, when it looks like a typo.
fn nearest_variable(name: &str) -> Option<String> {
    KEYS.iter()
        .map(|k| format!("TWOFOLD_{}", k.to_uppercase()))
        .map(|known| (strsim::levenshtein(name, &known), known))
        .filter(|(distance, _)| *distance <= 4)
        .min()
        .map(|(_, known)| known)
}

/// The `TWOFOLD_*` variables that configure nothing, each with the known one
/// it most looks like.
pub fn unknown_variables<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, Option<String>)> {
    names
        .into_iter()
        .filter(|n| n.starts_with("TWOFOLD_") && !other_variable(n))
        .filter(|n| !KEYS.contains(&n["TWOFOLD_".len()..].to_lowercase().as_str()))
        .map(|n| (n.to_string(), nearest_variable(n)))
        .collect()
}

/// An environment variable's text as the value of `key`: `keys` as
/// `id=hex,id2=hex`, `trusted_proxies` comma-separated, `sms_providers` as
/// JSON, the numeric keys as numbers, anything else as text.
fn env_value(key: &str, raw: &str) -> anyhow::Result<Value> {
    let name = format!("TWOFOLD_{}", key.to_uppercase());
    Ok(match key {
        "keys" | "audit_signing_keys" => {
            let mut dict = Dict::new();
            for pair in raw.split(',').filter(|p| !p.trim().is_empty()) {
                let Some((id, hex)) = pair.split_once('=') else {
                    bail!("{name} must look like id1=<64 hex digits>,id2=<64 hex digits>");
                };
                dict.insert(id.trim().to_string(), Value::from(hex.trim().to_string()));
            }
            Value::from(dict)
        }
        // A single address is a network of one.
        "trusted_proxies" => Value::from(
            raw.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| match (p.contains('/'), p.parse::<std::net::IpAddr>()) {
                    (false, Ok(ip)) => Value::from(IpNet::from(ip).to_string()),
                    _ => Value::from(p.to_string()),
                })
                .collect::<Vec<_>>(),
        ),
        "sms_providers" => {
            let json: serde_json::Value = serde_json::from_str(raw)
                .with_context(|| format!("{name} must be JSON (see README, Configuration)"))?;
            Value::serialize(json).with_context(|| format!("reading {name}"))?
        }
        "nats_tls_required" => Value::from(match raw.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" | "" => false,
            _ => bail!("{name} must be true or false, not {raw:?}"),
        }),
        k if NUMBERS.contains(&k) => Value::from(
            raw.trim()
                .parse::<u64>()
                .with_context(|| format!("{name} must be a whole number, not {raw:?}"))?,
        ),
        _ => Value::from(raw.to_string()),
    })
}

impl Config {
    /// Defaults, then the TOML file if one is named (`--config`, else
    /// `TWOFOLD_CONFIG`), then the `TWOFOLD_*` environment. Validated; an
    /// unknown `TWOFOLD_*` variable is warned about with the nearest known one.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_from(file, std::env::vars())
    }

    /// [`Config::load`] with the environment given.
    pub fn load_from(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("TWOFOLD_"))
            .collect();
        for (name, nearest) in unknown_variables(vars.keys().map(String::as_str)) {
            match nearest {
                Some(known) => {
                    tracing::warn!("{name} configures nothing; did you mean {known}?")
                }
                None => tracing::warn!("{name} configures nothing"),
            }
        }
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| vars.get("TWOFOLD_CONFIG").map(std::path::PathBuf::from));
        let mut figment = Figment::new();
        if let Some(path) = &file {
            if !path.is_file() {
                bail!("the configuration file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file(path));
        }
        let mut env = Dict::new();
        for key in KEYS {
            if let Some(raw) = vars.get(&format!("TWOFOLD_{}", key.to_uppercase())) {
                env.insert(key.to_string(), env_value(key, raw)?);
            }
        }
        let config: Config = figment
            .merge(Serialized::globals(env))
            .extract()
            .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        config.validate()?;
        Ok(config)
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
        if self.nats_user.is_some() != self.nats_password.is_some() {
            bail!("nats_user and nats_password go together: set both or neither");
        }
        let ways = [
            self.nats_credentials_file.is_some(),
            self.nats_user.is_some(),
            self.nats_token.is_some(),
        ];
        if ways.into_iter().filter(|w| *w).count() > 1 {
            bail!("NATS authentication: set one of nats_credentials_file, nats_user and nats_password, or nats_token");
        }
        if self.nats_tls_cert_file.is_some() != self.nats_tls_key_file.is_some() {
            bail!("nats_tls_cert_file and nats_tls_key_file go together: set both or neither");
        }
        if self.dispatcher_concurrency == 0 {
            bail!("dispatcher_concurrency must be at least 1");
        }
        if self.relay_poll_ms == 0 {
            bail!("relay_poll_ms must be at least 1");
        }
        if self.audit_checkpoint_secs == 0 {
            bail!("audit_checkpoint_secs must be at least 1");
        }
        if self.nats_stream_max_age_secs == 0 {
            bail!("nats_stream_max_age_secs must be at least 1 (the stream must not grow forever)");
        }
        if !(1..=5).contains(&self.nats_stream_replicas) {
            bail!("nats_stream_replicas must be 1 to 5");
        }
        if self.database_max_connections == 0 {
            bail!("database_max_connections must be at least 1");
        }
        if self.audit_exports_at_once == 0 {
            bail!("audit_exports_at_once must be at least 1");
        }
        if self.audit_export_idle_secs == 0 {
            bail!("audit_export_idle_secs must be at least 1");
        }
        self.keyring()?;
        Ok(())
    }

    /// The server keys, parsed, with the audit signing keys; fails with a
    /// clear message when no server key is set.
    pub fn keyring(&self) -> anyhow::Result<Keyring> {
        let keyring = Keyring::from_config(&self.keys, &self.current_key_id)?;
        if self.audit_signing_keys.is_empty() {
            if !self.audit_signing_key_id.is_empty() {
                bail!("audit_signing_key_id is set but audit_signing_keys is empty");
            }
            return Ok(keyring);
        }
        Ok(keyring.with_audit_signer(AuditSigner::from_config(
            &self.audit_signing_keys,
            &self.audit_signing_key_id,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_environment_overrides_the_file_which_overrides_the_defaults() {
        let key = "11".repeat(32);
        let dir = std::env::temp_dir().join(format!("twofold-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("twofold.toml");
        std::fs::write(
            &file,
            "http_addr = \"127.0.0.1:7000\"\nrelay_poll_ms = 9\ncurrent_key_id = \"k1\"\n",
        )
        .unwrap();
        let c = Config::load_from(
            Some(&file),
            vars(&[
                ("TWOFOLD_HTTP_ADDR", "0.0.0.0:9999"),
                ("TWOFOLD_KEYS", &format!("k1={key}")),
                ("TWOFOLD_SMS_RATE_PER_SECOND", "250"),
                ("TWOFOLD_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.1"),
                (
                    "TWOFOLD_SMS_PROVIDERS",
                    r#"{"hook": {"kind": "webhook", "url": "http://127.0.0.1:9/sms"}}"#,
                ),
                ("TWOFOLD_TEST_DATABASE_URL", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.http_addr.port(), 9999, "the environment wins");
        assert_eq!(c.relay_poll_ms, 9, "then the file");
        assert_eq!(c.smtp_port, 25, "then the defaults");
        assert_eq!(c.sms_rate_per_second, 250);
        assert_eq!(c.keys["k1"].expose_secret(), key);
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(c.sms_providers.contains_key("hook"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unknown_variable_is_named_with_the_nearest_known_one() {
        let unknown = unknown_variables([
            "TWOFOLD_DATABSE_URL",
            "TWOFOLD_HTTP_ADDR",
            "TWOFOLD_LOG",
            "TWOFOLD_TEST_NATS_URL",
            "TWOFOLD_COMPLETELY_DIFFERENT_THING",
        ]);
        assert_eq!(
            unknown,
            vec![
                (
                    "TWOFOLD_DATABSE_URL".to_string(),
                    Some("TWOFOLD_DATABASE_URL".to_string())
                ),
                ("TWOFOLD_COMPLETELY_DIFFERENT_THING".to_string(), None),
            ]
        );
    }

    #[test]
    fn a_bad_value_is_named_in_the_error() {
        let key = "11".repeat(32);
        let base = [
            ("TWOFOLD_KEYS", format!("k1={key}")),
            ("TWOFOLD_CURRENT_KEY_ID", "k1".to_string()),
        ];
        for (name, bad, named) in [
            ("TWOFOLD_HTTP_ADDR", "nope", "http_addr"),
            ("TWOFOLD_SMTP_PORT", "twenty-five", "TWOFOLD_SMTP_PORT"),
            (
                "TWOFOLD_SMS_PROVIDERS",
                "{not json",
                "TWOFOLD_SMS_PROVIDERS",
            ),
        ] {
            let mut v: Vec<(String, String)> = base
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            v.push((name.to_string(), bad.to_string()));
            let err = format!("{:#}", Config::load_from(None, v).unwrap_err());
            assert!(err.contains(named), "{name}: {err}");
        }
        // A secret's value never appears in an error.
        let err = format!(
            "{:#}",
            Config::load_from(None, vars(&[("TWOFOLD_KEYS", "k1=0123abcd")])).unwrap_err()
        );
        assert!(!err.contains("0123abcd"), "{err}");
    }

    #[test]
    fn nats_credentials_and_tls_are_read_and_checked() {
        let key = "11".repeat(32);
        let base = [
            ("TWOFOLD_KEYS", format!("k1={key}")),
            ("TWOFOLD_CURRENT_KEY_ID", "k1".to_string()),
        ];
        let load = |extra: &[(&str, &str)]| {
            let mut v: Vec<(String, String)> = base
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            v.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            Config::load_from(None, v)
        };
        let c = load(&[
            ("TWOFOLD_NATS_TOKEN", "s3cret-token"),
            ("TWOFOLD_NATS_TLS_CA_FILE", "/etc/twofold/nats-ca.pem"),
            ("TWOFOLD_NATS_TLS_REQUIRED", "true"),
        ])
        .unwrap();
        assert_eq!(c.nats_token.unwrap().expose_secret(), "s3cret-token");
        assert_eq!(
            c.nats_tls_ca_file.as_deref(),
            Some("/etc/twofold/nats-ca.pem")
        );
        assert!(c.nats_tls_required);
        for (extra, named) in [
            (&[("TWOFOLD_NATS_USER", "w")][..], "nats_password"),
            (
                &[
                    ("TWOFOLD_NATS_TOKEN", "t0ken-value"),
                    ("TWOFOLD_NATS_CREDENTIALS_FILE", "/x.creds"),
                ][..],
                "one of",
            ),
            (
                &[("TWOFOLD_NATS_TLS_CERT_FILE", "/c.pem")][..],
                "nats_tls_key_file",
            ),
            (
                &[("TWOFOLD_NATS_TLS_REQUIRED", "maybe")][..],
                "TWOFOLD_NATS_TLS_REQUIRED",
            ),
        ] {
            let err = format!("{:#}", load(extra).unwrap_err());
            assert!(err.contains(named), "{extra:?}: {err}");
            assert!(!err.contains("t0ken-value"), "{err}");
        }
    }

    #[test]
    fn missing_keys_are_refused_with_a_hint() {
        let err = Config::default().validate().unwrap_err();
        assert!(format!("{err:#}").contains("TWOFOLD_KEYS"));
    }

    #[test]
    fn audit_signing_keys_are_configured_or_derived_from_the_server_keys() {
        let key = "11".repeat(32);
        let base = vec![
            ("TWOFOLD_KEYS".to_string(), format!("k1={key}")),
            ("TWOFOLD_CURRENT_KEY_ID".to_string(), "k1".to_string()),
        ];
        let derived = Config::load_from(None, base.clone())
            .unwrap()
            .keyring()
            .unwrap();
        assert_eq!(derived.audit_signer().current_id(), "server-k1");
        // The same server key derives the same signing key.
        let again = Config::load_from(None, base.clone())
            .unwrap()
            .keyring()
            .unwrap();
        assert_eq!(
            derived.audit_signer().published(),
            again.audit_signer().published()
        );

        let mut configured = base.clone();
        configured.push((
            "TWOFOLD_AUDIT_SIGNING_KEYS".to_string(),
            format!("a1={},a0={}", "22".repeat(32), "33".repeat(32)),
        ));
        configured.push(("TWOFOLD_AUDIT_SIGNING_KEY_ID".to_string(), "a1".to_string()));
        let ring = Config::load_from(None, configured)
            .unwrap()
            .keyring()
            .unwrap();
        let published = ring.audit_signer().published();
        let ids: Vec<(&str, bool)> = published
            .keys
            .iter()
            .map(|k| (k.key_id.as_str(), k.current))
            .collect();
        assert_eq!(ids, [("a0", false), ("a1", true)]);
        assert!(!serde_json::to_string(&published)
            .unwrap()
            .contains(&"22".repeat(32)));

        let mut unknown = base;
        unknown.push((
            "TWOFOLD_AUDIT_SIGNING_KEYS".to_string(),
            format!("a1={}", "22".repeat(32)),
        ));
        unknown.push(("TWOFOLD_AUDIT_SIGNING_KEY_ID".to_string(), "a2".to_string()));
        let err = format!("{:#}", Config::load_from(None, unknown).unwrap_err());
        assert!(err.contains("TWOFOLD_AUDIT_SIGNING_KEY_ID"), "{err}");
        assert!(!err.contains(&"22".repeat(32)), "{err}");
    }
}
