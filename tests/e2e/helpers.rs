//! Starting a verifier per test, and talking to it.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use twofold_app::App;
use twofold_domain::{Actor, Ctx, TenantId};
use twofold_platform::{crypto, Config, ManualClock};
use twofold_verifier::Verifier;
use uuid::Uuid;

/// The first admin's password once the one-time one is changed.
pub const ADMIN_PASSWORD: &str = "the admin's own password";

pub fn admin_database_url() -> String {
    std::env::var("TWOFOLD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A fixed start for the manual clock: tests move it, never sleep.
pub fn start_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 5).unwrap()
}

pub struct TestApp {
    pub base: String,
    pub tenant_id: TenantId,
    pub admin_username: String,
    pub admin_password: String,
    pub clock: ManualClock,
    pub state: App,
    pub pool: PgPool,
    pub client: reqwest::Client,
    pub metrics_addr: SocketAddr,
    /// The verifier's configuration (to start another on the same database).
    pub config: Config,
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    /// The stable error code, if this is an error.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// A fresh database, a verifier on a free port, and a tenant named "Acme" with
/// its first admin.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// A verifier whose configuration names an SMS provider `test-provider`
/// (a webhook nobody answers: these tests run no dispatcher).
pub async fn spawn_app_with_sms() -> TestApp {
    spawn_app_with(|c| {
        c.sms_providers.insert(
            "test-provider".to_string(),
            twofold_platform::config::SmsProvider::Webhook {
                url: "http://127.0.0.1:9/sms".to_string(),
                bearer_token: None,
            },
        );
    })
    .await
}

/// A new database of the test's own, with nothing in it: its URL.
pub async fn empty_database() -> String {
    let db_name = format!("twofold_test_{}", Uuid::new_v4().simple());
    let admin_url = admin_database_url();
    let mut conn = PgConnection::connect(&admin_url)
        .await
        .expect("PostgreSQL must be running: run ops/deps");
    sqlx::query(&format!("CREATE DATABASE {db_name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let base_url = admin_url.rsplit_once('/').unwrap().0;
    format!("{base_url}/{db_name}")
}

/// The same, with the verifier's configuration adjusted by `adjust` (after the
/// test database is named in it).
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    let database_url = empty_database().await;
    let mut config = Config {
        database_url: SecretString::from(database_url),
        database_max_connections: 8,
        http_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        keys: [(
            "test".to_string(),
            SecretString::from(crypto::new_key_hex()),
        )]
        .into(),
        current_key_id: "test".to_string(),
        ..Config::default()
    };
    // Tests read the store through a connection of their own, whatever
    // `adjust` does to the verifier's.
    let direct = PgPool::connect(config.database_url.expose_secret())
        .await
        .unwrap();
    twofold_platform::db::migrate(&direct).await.unwrap();
    adjust(&mut config);

    let clock = ManualClock::starting_at(start_time());
    let (addr, metrics_addr, state) = start_verifier(&config, &clock).await;

    let created = state
        .create_tenant(
            "Acme",
            "root-admin",
            Some("admin@acme.test".to_string()),
            Ctx::new(start_time(), Actor::Operator),
        )
        .await
        .unwrap();
    let pool = direct;
    // The one-time password works only until it is changed: the first
    // sign-in changes it, as an admin would.
    let base = format!("http://{addr}/v1/tenants/{}", created.tenant_id);
    let client = reqwest::Client::new();
    let first: Value = client
        .post(format!("{base}/sign-in"))
        .json(&json!({"username": created.admin_username, "password": created.one_time_password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["password_change_required"], true, "{first}");
    let token = first["session"]["token"].as_str().unwrap();
    let changed = client
        .post(format!("{base}/me/password"))
        .bearer_auth(token)
        .json(
            &json!({"current_password": created.one_time_password, "new_password": ADMIN_PASSWORD}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        changed.status(),
        StatusCode::NO_CONTENT,
        "{:?}",
        changed.text().await
    );
    TestApp {
        base,
        tenant_id: created.tenant_id,
        admin_username: created.admin_username,
        admin_password: ADMIN_PASSWORD.to_string(),
        clock,
        state,
        pool,
        client: reqwest::Client::new(),
        metrics_addr,
        config,
    }
}

/// A verifier serving in the background: its API and metrics addresses, and
/// its state.
async fn start_verifier(config: &Config, clock: &ManualClock) -> (SocketAddr, SocketAddr, App) {
    let verifier = Verifier::build(config, Arc::new(clock.clone()))
        .await
        .unwrap();
    let addr = verifier.local_addr().unwrap();
    let metrics_addr = verifier.metrics_addr().unwrap();
    let state = verifier.app();
    tokio::spawn(verifier.run_until_stopped(std::future::pending()));
    (addr, metrics_addr, state)
}

impl TestApp {
    /// A second verifier on the same database, tenant and clock, as another
    /// instance behind a load balancer would be: it remembers what it reads
    /// and writes itself, not what this one did.
    pub async fn twin(&self) -> TestApp {
        self.twin_with(|_| {}).await
    }

    /// [`TestApp::twin`] with its configuration adjusted by `adjust`, as a
    /// restart with new settings would be (e.g. a rotated key).
    pub async fn twin_with(&self, adjust: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = self.config.clone();
        adjust(&mut config);
        let (addr, metrics_addr, state) = start_verifier(&config, &self.clock).await;
        TestApp {
            base: format!("http://{addr}/v1/tenants/{}", self.tenant_id),
            tenant_id: self.tenant_id,
            admin_username: self.admin_username.clone(),
            admin_password: self.admin_password.clone(),
            clock: self.clock.clone(),
            state,
            pool: self.pool.clone(),
            client: reqwest::Client::new(),
            metrics_addr,
            config,
        }
    }

    /// The tenant's pages: `http://addr/t/{tenant}`.
    pub fn pages(&self) -> String {
        self.base.replace("/v1/tenants/", "/t/")
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(self.client.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn post_auth(&self, path: &str, token: &str, body: Value) -> Reply {
        self.send(
            self.client
                .post(format!("{}{path}", self.base))
                .bearer_auth(token)
                .json(&body),
        )
        .await
    }

    pub async fn get_auth(&self, path: &str, token: &str) -> Reply {
        self.send(
            self.client
                .get(format!("{}{path}", self.base))
                .bearer_auth(token),
        )
        .await
    }

    pub async fn put_auth(&self, path: &str, token: &str, body: Value) -> Reply {
        self.send(
            self.client
                .put(format!("{}{path}", self.base))
                .bearer_auth(token)
                .json(&body),
        )
        .await
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
        };
        Reply { status, body }
    }

    pub async fn sign_in(&self, username: &str, password: &str) -> Reply {
        self.post(
            "/sign-in",
            json!({ "username": username, "password": password }),
        )
        .await
    }

    /// A session token of the tenant's first admin. With 2FA on, the admin
    /// answers the email challenge with the code the dispatcher would send, so
    /// the session passes the admin endpoints' second-factor check.
    /// Every event of the test's tenant and its users, in commit order,
    /// opened: what folding the whole history folds.
    pub async fn tenant_records(&self) -> Vec<twofold_projections::record::EventRecord> {
        twofold_projections::record::load_tenant(
            &self.pool,
            &self.state.personal,
            &self.tenant_id.to_string(),
        )
        .await
        .unwrap()
    }

    pub async fn admin_token(&self) -> String {
        let reply = self
            .sign_in(&self.admin_username, &self.admin_password)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        if reply.body["status"] == "challenge" {
            let token = reply.body["challenge"]["token"].as_str().unwrap();
            let code = self.delivered_code(token).await;
            let verified = self
                .post(
                    "/challenge/verify",
                    json!({ "challenge_token": token, "code": code }),
                )
                .await;
            assert_eq!(verified.status, StatusCode::OK, "{:?}", verified.body);
            return verified.body["session"]["token"]
                .as_str()
                .unwrap()
                .to_string();
        }
        reply.body["session"]["token"].as_str().unwrap().to_string()
    }

    /// Creates a user through the admin API; returns the user id.
    pub async fn create_user(&self, admin: &str, body: Value) -> String {
        let reply = self.post_auth("/users", admin, body).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
        reply.body["user_id"].as_str().unwrap().to_string()
    }

    /// Changes the tenant's settings: `changes` is merged over the current ones.
    pub async fn set_settings(&self, admin: &str, changes: Value) -> Reply {
        let current = self.get_auth("/settings", admin).await;
        assert_eq!(current.status, StatusCode::OK, "{:?}", current.body);
        let mut settings = current.body;
        for (k, v) in changes.as_object().unwrap() {
            settings[k] = v.clone();
        }
        self.put_auth(
            "/settings",
            admin,
            json!({ "settings": settings, "reason": "test" }),
        )
        .await
    }

    /// The event types of a user's stream, in order.
    pub async fn event_types(&self, user_id: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT event_type FROM events WHERE aggregate_type = 'user' AND aggregate_id = $1 ORDER BY sequence",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Payloads of a user's events of one type, in order, their personal
    /// data opened.
    pub async fn events_of(&self, user_id: &str, event_type: &str) -> Vec<Value> {
        self.stream_events(user_id)
            .await
            .into_iter()
            .filter_map(|e| e.get(event_type).cloned())
            .collect()
    }

    /// Every event of a user's stream as stored (`{"<type>": {…}}`), in
    /// order, their personal data opened.
    pub async fn stream_events(&self, user_id: &str) -> Vec<Value> {
        let keys = self
            .state
            .personal
            .read_keys(&self.pool, &[user_id.to_string()])
            .await
            .unwrap();
        sqlx::query_scalar(
            "SELECT payload::text FROM events WHERE aggregate_type = 'user' AND aggregate_id = $1 ORDER BY sequence",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|text: String| {
            let opened = twofold_platform::personal::Personal::open_text(&text, &keys);
            serde_json::from_str::<Value>(&opened).unwrap()
        })
        .collect()
    }

    /// Every event of the database as text, for searching for leaked secrets.
    pub async fn all_event_text(&self) -> String {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT payload::text || metadata::text FROM events UNION ALL SELECT payload::text FROM snapshots",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        rows.join("\n")
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The email/SMS code the dispatcher would send for a challenge token's
    /// current generation, computed from the server key as the issue allows.
    pub async fn delivered_code(&self, challenge_token: &str) -> String {
        let claim = twofold_platform::tokens::parse(
            twofold_platform::tokens::TokenKind::Challenge,
            &SecretString::from(challenge_token.to_string()),
        )
        .unwrap();
        let user = self
            .state
            .users
            .load(&claim.user_id.to_string())
            .await
            .unwrap();
        let challenge = &user.challenges[&twofold_domain::ChallengeId(claim.item)];
        self.state
            .keys
            .delivered_code(challenge.id, challenge.generation)
    }
}

/// `zbarimg` (a real QR reader) on a PNG; returns the decoded text.
pub fn zbarimg(png: &[u8]) -> String {
    let path = std::env::temp_dir().join(format!("twofold-qr-{}.png", Uuid::new_v4()));
    std::fs::write(&path, png).unwrap();
    let out = Command::new("zbarimg")
        .args(["--raw", "--quiet"])
        .arg(&path)
        .output()
        .expect("zbarimg must be installed: run ops/deps");
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "zbarimg failed: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A TOTP code from the real client, `oathtool`, at `at`.
pub fn oathtool(secret_base32: &str, at: DateTime<Utc>) -> String {
    let out = Command::new("oathtool")
        .args([
            "--totp",
            "--base32",
            "--now",
            &at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            secret_base32,
        ])
        .output()
        .expect("oathtool must be installed: run ops/deps");
    assert!(out.status.success(), "oathtool failed: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn settings_on(methods: &[&str], default: &str) -> Value {
    json!({
        "enabled": true,
        "enforcement": "every_login",
        "allowed_methods": methods,
        "default_method": default,
    })
}

/// An enrolled user: signed in (2FA off), enrolled an authenticator with
/// oathtool, and holding 8 backup codes. Returns (user id, base32 secret,
/// backup codes). Leaves the clock one step past the confirmation.
pub async fn enrolled_user(
    app: &TestApp,
    admin: &str,
    username: &str,
) -> (String, String, Vec<String>) {
    let user_id = app
        .create_user(
            admin,
            json!({"username": username, "password": "correct horse battery", "email": format!("{username}@acme.test")}),
        )
        .await;
    let reply = app.sign_in(username, "correct horse battery").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let session = reply.body["session"]["token"].as_str().unwrap().to_string();
    let started = app.post_auth("/me/totp", &session, json!({})).await;
    assert_eq!(started.status, StatusCode::CREATED, "{:?}", started.body);
    let secret = started.body["secret"].as_str().unwrap().to_string();
    let code = oathtool(&secret, app.clock.now_for_tests());
    let confirmed = app
        .post_auth("/me/totp/confirm", &session, json!({ "code": code }))
        .await;
    assert_eq!(confirmed.status, StatusCode::OK, "{:?}", confirmed.body);
    let codes = confirmed.body["backup_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    app.clock.advance(chrono::Duration::seconds(30));
    (user_id, secret, codes)
}

pub trait ClockExt {
    fn now_for_tests(&self) -> DateTime<Utc>;
}

impl ClockExt for ManualClock {
    fn now_for_tests(&self) -> DateTime<Utc> {
        twofold_platform::Clock::now(self)
    }
}
