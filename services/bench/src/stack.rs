//! The stack under test: a fresh database, a tenant, and the real
//! `twofold verifier` process; plus what the scenarios share to drive it.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use twofold_domain::tenant::{Tenant, TenantCommand, TwoFactorSettings};
use twofold_domain::{Actor, Ctx, TenantId};
use twofold_platform::crypto::Keyring;
use twofold_platform::store::Store;

use crate::seed::Seeder;
use crate::Args;

/// PostgreSQL's default allows 100 connections: the verifier's pool (which
/// its remembered states leave mostly idle), its committers, and the load
/// generator's pool (one per client for the 64-client insert baseline) and
/// committers share them.
const VERIFIER_CONNECTIONS: u32 = 24;
const BENCH_CONNECTIONS: u32 = 64;

pub struct Stack {
    keep: bool,
    pub tenant_id: String,
    pub tenant: TenantId,
    /// The verifier's server keys, for seeding secrets it can open.
    pub keys: Keyring,
    pub db_name: String,
    pub admin_url: String,
    base: String,
    pub pool: PgPool,
    http: reqwest::Client,
    verifier: Child,
}

pub async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let mut conn = PgConnection::connect(admin_url)
        .await
        .context("connecting to PostgreSQL (run ops/deps)")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    let base = admin_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .context("the admin URL names no database")?;
    Ok(format!("{base}/{name}"))
}

/// Statistics for every table that holds rows, as autovacuum keeps them in
/// a database that has been running a while. A scenario that fills its
/// tables and measures at once would otherwise run on plans PostgreSQL made
/// when they were nearly empty: a statement run often gets a generic plan,
/// kept until the table's statistics change, and one made then scans the
/// table where a key lookup belongs. Empty tables are left unanalyzed (an
/// analyzed empty table is planned as empty however much it then grows; an
/// unanalyzed one as ten pages).
pub async fn analyze_filled(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND n.nspname = current_schema() AND pg_relation_size(c.oid) > 0",
    )
    .fetch_all(pool)
    .await?;
    if !tables.is_empty() {
        sqlx::query(&format!("ANALYZE {}", tables.join(", ")))
            .execute(pool)
            .await?;
    }
    Ok(())
}

pub async fn drop_database(admin_url: &str, name: &str) {
    if let Ok(mut conn) = PgConnection::connect(admin_url).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await;
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Stack {
    pub async fn start(args: &Args) -> anyhow::Result<Self> {
        Self::start_with(args, "main", &[]).await
    }

    /// A stack of its own (database `twofold_bench_<pid>_<name>`), with the
    /// verifier's configuration changed by `settings` (`TWOFOLD_*` variables).
    pub async fn start_with(
        args: &Args,
        name: &str,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let db_name = format!("twofold_bench_{}_{name}", std::process::id());
        let database_url = create_database(&args.admin_url, &db_name).await?;
        let key_hex = twofold_platform::crypto::new_key_hex();
        let keys = Keyring::from_config(
            &BTreeMap::from([("bench".to_string(), key_hex.clone().into())]),
            "bench",
        )?;
        let port = free_port()?;
        let vars: Vec<(String, String)> = [
            ("TWOFOLD_DATABASE_URL".into(), database_url.clone()),
            ("TWOFOLD_KEYS".into(), format!("bench={key_hex}")),
            ("TWOFOLD_CURRENT_KEY_ID".into(), "bench".into()),
            (
                "TWOFOLD_DATABASE_MAX_CONNECTIONS".into(),
                VERIFIER_CONNECTIONS.to_string(),
            ),
            ("TWOFOLD_HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
            (
                "TWOFOLD_METRICS_ADDR".into(),
                format!("127.0.0.1:{}", free_port()?),
            ),
            ("TWOFOLD_LOG".into(), "warn".into()),
        ]
        .into_iter()
        .chain(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
        let twofold = |args_: &[&str]| {
            let mut cmd = Command::new(&args.twofold_bin);
            cmd.args(args_)
                .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            cmd
        };
        let status = twofold(&["migrate"])
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("running {}", args.twofold_bin.display()))?;
        if !status.success() {
            bail!("twofold migrate failed");
        }
        let out = twofold(&[
            "tenant",
            "create",
            "--name",
            "Bench",
            "--admin-username",
            "admin",
        ])
        .stderr(Stdio::null())
        .output()?;
        if !out.status.success() {
            bail!("twofold tenant create failed");
        }
        let created: Value = serde_json::from_slice(&out.stdout)?;
        let tenant_id = created["tenant_id"]
            .as_str()
            .context("tenant create printed no tenant id")?
            .to_string();
        std::fs::create_dir_all(&args.out_dir)?;
        let log = std::fs::File::create(args.out_dir.join(format!("verifier-{name}.log")))?;
        let verifier = twofold(&["verifier"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the verifier")?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?;
        let health = format!("http://127.0.0.1:{port}/health");
        let mut up = false;
        for _ in 0..100 {
            if http.get(&health).send().await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !up {
            bail!("the verifier did not come up");
        }
        // The verifier's own pool settings, so the insert baseline goes
        // through the same sqlx pool as the verifier's reads do.
        let pool = twofold_platform::db::pool_options(BENCH_CONNECTIONS)
            .connect(&database_url)
            .await?;
        Ok(Self {
            keep: args.keep,
            tenant: tenant_id.parse().context("the tenant id is not a UUID")?,
            keys,
            base: format!("http://127.0.0.1:{port}/v1/tenants/{tenant_id}"),
            tenant_id,
            db_name,
            admin_url: args.admin_url.clone(),
            pool,
            http,
            verifier,
        })
    }

    /// Sets the tenant's two-factor settings through the event store, as an
    /// operator would (`twofold tenant settings`), without a process start.
    pub async fn apply_settings(&self, settings: &TwoFactorSettings) -> anyhow::Result<()> {
        let tenants: Store<Tenant> = Store::new(self.pool.clone());
        tenants
            .execute(&self.tenant_id, |_| {
                Ok(TenantCommand::ChangeTwoFactorSettings {
                    settings: settings.clone(),
                    ctx: Ctx::new(crate::wall_now(), Actor::Operator).with_reason("benchmark"),
                })
            })
            .await
            .map_err(|e| anyhow::Error::new(e).context("changing the settings"))?;
        Ok(())
    }

    pub async fn seeder(&self) -> anyhow::Result<Seeder> {
        Seeder::new(self.pool.clone(), self.keys.clone(), self.tenant).await
    }

    /// A cheap handle for load-generating tasks.
    pub fn client(&self) -> Client {
        Client {
            base: Arc::new(self.base.clone()),
            http: self.http.clone(),
        }
    }

    /// Peak resident memory of the verifier process, in MiB.
    pub fn verifier_peak_rss_mib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.verifier.id()))?;
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .context("no VmHWM in /proc status")?;
        Ok(kib / 1024.0)
    }

    pub async fn stop(mut self) {
        let _ = self.verifier.kill();
        let _ = self.verifier.wait();
        self.pool.close().await;
        if self.keep {
            eprintln!("twofold-bench: kept the database {}", self.db_name);
        } else {
            drop_database(&self.admin_url, &self.db_name).await;
        }
    }
}

/// The API as the load generator's tasks call it.
#[derive(Clone)]
pub struct Client {
    base: Arc<String>,
    http: reqwest::Client,
}

impl Client {
    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// A GET of the API (`path` under the tenant) or, when `path` starts
    /// with `/t/`, of a page, as the holder of the session `token` (bearer
    /// for the API, the session cookie for pages); answers the status and
    /// the body's length, read to the end.
    pub async fn get(&self, path: &str, token: &str) -> anyhow::Result<(u16, usize)> {
        let req = if path.starts_with("/t/") {
            let origin = self.base.split("/v1/").next().unwrap_or_default();
            self.http
                .get(format!("{origin}{path}"))
                .header("cookie", format!("twofold_session={token}"))
        } else {
            self.http
                .get(format!("{}{path}", self.base))
                .bearer_auth(token)
        };
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?.len()))
    }

    /// A GET read as a stream of lines: the status and the lines.
    pub async fn get_lines(&self, path: &str, token: &str) -> anyhow::Result<(u16, u64)> {
        let mut resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let mut lines = 0u64;
        while let Some(chunk) = resp.chunk().await? {
            lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        }
        Ok((status, lines))
    }

    /// A password sign-in; answers the status and body.
    pub async fn sign_in(&self, username: &str, password: &str) -> anyhow::Result<(u16, Value)> {
        self.post(
            "/sign-in",
            None,
            json!({"username": username, "password": password}),
        )
        .await
    }
}

/// What the report says of the machine it ran on.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    json!({
        "cores": crate::scenarios::cores(),
        "cpu": model,
        "memory_gib": mem_gib,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

/// The PostgreSQL settings that decide commit costs, read through `url`.
pub async fn postgres_facts(url: &str) -> anyhow::Result<Value> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("connecting to PostgreSQL")?;
    let mut facts = serde_json::Map::new();
    for name in [
        "server_version",
        "synchronous_commit",
        "fsync",
        "wal_sync_method",
        "shared_buffers",
        "max_connections",
        "ssl",
    ] {
        let value: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut conn)
            .await?;
        facts.insert(name.to_string(), Value::String(value));
    }
    // How this run reaches it, as the server sees this connection.
    let (tcp, tls): (bool, bool) = sqlx::query_as(
        "SELECT inet_server_addr() IS NOT NULL, \
                COALESCE((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
    )
    .fetch_one(&mut conn)
    .await?;
    let connection = match (tcp, tls) {
        (false, _) => "its Unix socket",
        (true, true) => "TCP with TLS",
        (true, false) => "TCP without TLS",
    };
    facts.insert("connection".into(), Value::String(connection.into()));
    Ok(Value::Object(facts))
}
