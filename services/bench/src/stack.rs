//! The stack under test: a fresh database and the real `twofold verifier`
//! process, plus the HTTP calls the scenarios make.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};

use crate::Args;

pub struct Stack {
    pub tenant_id: String,
    twofold_bin: std::path::PathBuf,
    env: Vec<(String, String)>,
    pub db_name: String,
    pub admin_url: String,
    pub base: String,
    pub admin_password: String,
    pub pool: PgPool,
    pub http: reqwest::Client,
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

pub async fn drop_database(admin_url: &str, name: &str) {
    if let Ok(mut conn) = PgConnection::connect(admin_url).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await;
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Stack {
    pub async fn start(args: &Args) -> anyhow::Result<Self> {
        let db_name = format!("twofold_bench_{}", std::process::id());
        let database_url = create_database(&args.admin_url, &db_name).await?;
        let keys = format!("bench={}", twofold_platform::crypto::new_key_hex());
        let port = free_port()?;
        let metrics_port = free_port()?;
        let vars: Vec<(String, String)> = vec![
            ("TWOFOLD_DATABASE_URL".into(), database_url.clone()),
            ("TWOFOLD_KEYS".into(), keys.clone()),
            ("TWOFOLD_CURRENT_KEY_ID".into(), "bench".into()),
            ("TWOFOLD_DATABASE_MAX_CONNECTIONS".into(), "64".into()),
            ("TWOFOLD_HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
            (
                "TWOFOLD_METRICS_ADDR".into(),
                format!("127.0.0.1:{metrics_port}"),
            ),
            ("TWOFOLD_LOG".into(), "warn".into()),
        ];
        let env = |cmd: &mut Command| {
            cmd.envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        };
        let mut migrate = Command::new(&args.twofold_bin);
        migrate.arg("migrate");
        env(&mut migrate);
        let status = migrate
            .status()
            .with_context(|| format!("running {}", args.twofold_bin.display()))?;
        if !status.success() {
            bail!("twofold migrate failed");
        }
        let mut create = Command::new(&args.twofold_bin);
        create.args([
            "tenant",
            "create",
            "--name",
            "Bench",
            "--admin-username",
            "admin",
        ]);
        env(&mut create);
        let out = create.stderr(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("twofold tenant create failed");
        }
        let created: Value = serde_json::from_slice(&out.stdout)?;
        let mut verifier = Command::new(&args.twofold_bin);
        verifier
            .arg("verifier")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        env(&mut verifier);
        let verifier = verifier.spawn().context("starting the verifier")?;
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
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(70)
            .connect(&database_url)
            .await?;
        Ok(Self {
            tenant_id: created["tenant_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            twofold_bin: args.twofold_bin.clone(),
            env: vars,
            base: format!(
                "http://127.0.0.1:{port}/v1/tenants/{}",
                created["tenant_id"].as_str().unwrap_or_default()
            ),
            admin_password: created["one_time_password"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            db_name,
            admin_url: args.admin_url.clone(),
            pool,
            http,
            verifier,
        })
    }

    /// Replaces the tenant's settings as an operator (`twofold tenant settings`),
    /// so the bench needs no 2FA-checked admin session.
    pub fn set_settings(&self, settings: &Value) -> anyhow::Result<()> {
        let out = Command::new(&self.twofold_bin)
            .args([
                "tenant",
                "settings",
                "--tenant",
                &self.tenant_id,
                "--reason",
                "benchmark",
                "--json",
            ])
            .arg(settings.to_string())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()?;
        if !out.status.success() {
            bail!(
                "twofold tenant settings failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

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
        let body = resp.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    pub async fn session(&self, username: &str, password: &str) -> anyhow::Result<String> {
        let (status, body) = self
            .post(
                "/sign-in",
                None,
                json!({"username": username, "password": password}),
            )
            .await?;
        match body["session"]["token"].as_str() {
            Some(t) if status == 200 => Ok(t.to_string()),
            _ => bail!("sign-in of {username} did not open a session: {status} {body}"),
        }
    }

    pub async fn admin(&self) -> anyhow::Result<String> {
        self.session("admin", &self.admin_password.clone()).await
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
        drop_database(&self.admin_url, &self.db_name).await;
    }
}
