//! The guarantees the design promises, shown end to end: lockout holds under
//! parallel guessing, a backup code works once however fast it is replayed,
//! bad input gets a clear 4xx and writes nothing, and no secret reaches the
//! event store.

use futures::future::join_all;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::{json, Value};

use crate::helpers::{enrolled_user, oathtool, settings_on, spawn_app, ClockExt, TestApp};

async fn event_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn email_user(app: &TestApp, admin: &str, name: &str) -> String {
    app.create_user(
        admin,
        json!({"username": name, "password": "correct horse battery", "email": format!("{name}@acme.test")}),
    )
    .await
}

async fn challenge(app: &TestApp, name: &str) -> String {
    let reply = app.sign_in(name, "correct horse battery").await;
    assert_eq!(reply.body["status"], "challenge", "{:?}", reply.body);
    reply.body["challenge"]["token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A six-digit code that is not `right`.
fn wrong(right: &str) -> &'static str {
    if right == "000000" {
        "111111"
    } else {
        "000000"
    }
}

#[tokio::test]
async fn twenty_concurrent_wrong_codes_never_get_more_than_the_limit() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let zoe = email_user(&app, &admin, "zoe").await;
    app.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    let token = challenge(&app, "zoe").await;
    let right = app.delivered_code(&token).await;
    let replies = join_all((0..20).map(|_| {
        app.post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": wrong(&right)}),
        )
    }))
    .await;
    assert!(replies.iter().all(|r| r.status != StatusCode::OK));
    let invalid = replies
        .iter()
        .filter(|r| r.code() == "invalid_code")
        .count();
    let locked = replies
        .iter()
        .filter(|r| r.code() == "account_locked")
        .count();
    assert_eq!(
        invalid + locked,
        20,
        "{:?}",
        replies.iter().map(|r| r.code()).collect::<Vec<_>>()
    );
    assert!(
        invalid <= 2,
        "only the first two wrong codes answer invalid_code"
    );
    assert_eq!(app.events_of(&zoe, "CodeRejected").await.len(), 3);
    assert_eq!(app.events_of(&zoe, "UserLockedOut").await.len(), 1);

    // Locked: even the right code is refused, and so is a new sign-in.
    let late = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": right}),
        )
        .await;
    assert_eq!(late.status, StatusCode::LOCKED);
    let again = app.sign_in("zoe", "correct horse battery").await;
    assert_eq!(again.status, StatusCode::LOCKED);
    assert_eq!(again.code(), "account_locked");
}

#[tokio::test]
async fn failures_count_across_challenges_and_a_resend_does_not_reset_them() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    email_user(&app, &admin, "yan").await;
    app.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    let first = challenge(&app, "yan").await;
    let right = app.delivered_code(&first).await;
    let r = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": first, "code": wrong(&right)}),
        )
        .await;
    assert_eq!(r.body["error"]["attempts_remaining"], 2);
    let resent = app
        .post("/challenge/resend", json!({"challenge_token": first}))
        .await;
    assert_eq!(resent.status, StatusCode::OK, "{:?}", resent.body);
    let second = challenge(&app, "yan").await;
    let right = app.delivered_code(&second).await;
    let r = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": second, "code": wrong(&right)}),
        )
        .await;
    assert_eq!(r.body["error"]["attempts_remaining"], 1);
    let r = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": first, "code": wrong(&right)}),
        )
        .await;
    assert_eq!(r.status, StatusCode::LOCKED);
}

#[tokio::test]
async fn the_same_backup_code_sent_ten_times_at_once_succeeds_exactly_once() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (uma, _, codes) = enrolled_user(&app, &admin, "uma").await;
    app.set_settings(
        &admin,
        json!({"enabled": true, "enforcement": "every_login", "allowed_methods": ["totp"], "default_method": "totp", "max_invalid_attempts": "10"}),
    )
    .await;
    let mut tokens = Vec::new();
    for _ in 0..10 {
        tokens.push(challenge(&app, "uma").await);
    }
    let replies = join_all(tokens.iter().map(|t| {
        app.post(
            "/challenge/verify",
            json!({"challenge_token": t, "backup_code": codes[0]}),
        )
    }))
    .await;
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(
        ok,
        1,
        "{:?}",
        replies.iter().map(|r| r.code()).collect::<Vec<_>>()
    );
    assert_eq!(app.events_of(&uma, "BackupCodeUsed").await.len(), 1);
    assert_eq!(app.events_of(&uma, "CodeRejected").await.len(), 9);
}

#[tokio::test]
async fn malformed_codes_count_as_wrong_codes() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    email_user(&app, &admin, "xia").await;
    let mut settings = settings_on(&["email"], "email");
    settings["max_invalid_attempts"] = json!("10");
    app.set_settings(&admin, settings).await;
    let token = challenge(&app, "xia").await;
    // A request of the wrong shape is not an attempt: nothing is written.
    let before = event_count(&app).await;
    for body in [
        json!({"challenge_token": token}),
        json!({"challenge_token": token, "code": "123456", "backup_code": "abcde-23456"}),
    ] {
        let r = app.post("/challenge/verify", body).await;
        assert_eq!(r.code(), "code_required");
    }
    assert_eq!(event_count(&app).await, before, "nothing may be written");
    // A code of the wrong shape is an attempt like any wrong code.
    let mut remaining = 10;
    for code in [
        "",
        "12345",
        "1234567",
        " 123456",
        "12345a",
        "١٢٣٤٥٦",
        "１２３４５６",
    ] {
        let r = app
            .post(
                "/challenge/verify",
                json!({"challenge_token": token, "code": code}),
            )
            .await;
        remaining -= 1;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{code:?}: {:?}", r.body);
        assert_eq!(r.code(), "invalid_code", "{code:?}");
        assert_eq!(r.body["error"]["attempts_remaining"], remaining, "{code:?}");
    }
    let r = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "backup_code": "not-a-code"}),
        )
        .await;
    assert_eq!(r.code(), "invalid_code");
    assert_eq!(r.body["error"]["attempts_remaining"], remaining - 1);
}

#[tokio::test]
async fn malformed_requests_get_stable_codes_and_no_internals() {
    let app = spawn_app().await;
    let url = format!("{}/sign-in", app.base);
    let raw = |body: &'static str, content_type: Option<&'static str>| {
        let mut req = app.client.post(&url).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req
    };
    let before = event_count(&app).await;
    let cases = [
        (
            raw("{\"username\":", Some("application/json")),
            400,
            "malformed_json",
        ),
        (
            raw(
                "{\"username\":5,\"password\":\"x\"}",
                Some("application/json"),
            ),
            422,
            "invalid_body",
        ),
        (
            raw("{\"username\":\"a\"}", Some("application/json")),
            422,
            "invalid_body",
        ),
        (
            raw(
                "{\"username\":\"a\",\"password\":\"b\",\"extra\":1}",
                Some("application/json"),
            ),
            422,
            "invalid_body",
        ),
        (raw("{}", None), 415, "unsupported_media_type"),
    ];
    for (req, status, code) in cases {
        let r = app.send(req).await;
        assert_eq!(r.status.as_u16(), status, "{:?}", r.body);
        assert_eq!(r.code(), code);
        let text = r.body.to_string();
        for internal in ["sqlx", "panicked", "serde", "src/", "backtrace"] {
            assert!(!text.contains(internal), "{text}");
        }
    }
    let big = format!(
        "{{\"username\":\"{}\",\"password\":\"x\"}}",
        "a".repeat(20_000)
    );
    let r = app
        .send(
            app.client
                .post(&url)
                .header("content-type", "application/json")
                .body(big),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "body_too_large");

    let unknown_tenant = app
        .send(
            app.client
                .post(format!(
                    "{}/v1/tenants/{}/sign-in",
                    app.base.split("/v1/").next().unwrap(),
                    uuid::Uuid::new_v4()
                ))
                .json(&json!({"username": "a", "password": "b"})),
        )
        .await;
    assert_eq!(unknown_tenant.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown_tenant.code(), "tenant_not_found");
    let malformed_tenant = app
        .send(
            app.client
                .post(format!(
                    "{}/v1/tenants/nope/sign-in",
                    app.base.split("/v1/").next().unwrap()
                ))
                .json(&json!({"username": "a", "password": "b"})),
        )
        .await;
    assert_eq!(malformed_tenant.code(), "tenant_not_found");
    let unknown_challenge = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": "tfc_bogus", "code": "123456"}),
        )
        .await;
    assert_eq!(unknown_challenge.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown_challenge.code(), "challenge_not_found");
    assert_eq!(event_count(&app).await, before);
}

/// Every string value in a JSON document.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn no_password_secret_code_or_token_reaches_the_event_store() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (_, secret, codes) = enrolled_user(&app, &admin, "vic").await;
    app.set_settings(&admin, settings_on(&["totp", "email"], "totp"))
        .await;
    let mut secrets: Vec<String> = vec![
        "correct horse battery".into(),
        app.admin_password.clone(),
        secret.clone(),
        admin.clone(),
    ];
    // TOTP sign-in, backup-code sign-in, email sign-in after a switch.
    let t = challenge(&app, "vic").await;
    let code = oathtool(&secret, app.clock.now_for_tests());
    let s1 = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": t, "code": code}),
        )
        .await;
    let mut six_digit = vec![code];
    secrets.push(t);
    let t = challenge(&app, "vic").await;
    let s2 = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": t, "backup_code": codes[1]}),
        )
        .await;
    secrets.push(t.clone());
    let t = challenge(&app, "vic").await;
    app.post(
        "/challenge/switch",
        json!({"challenge_token": t, "method": "email"}),
    )
    .await;
    let email_code = app.delivered_code(&t).await;
    let s3 = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": t, "code": email_code}),
        )
        .await;
    six_digit.push(email_code);
    secrets.push(t);
    for s in [&s1, &s2, &s3] {
        assert_eq!(s.status, StatusCode::OK, "{:?}", s.body);
        secrets.push(s.body["session"]["token"].as_str().unwrap().to_string());
        secrets.push(s.body["device_token"].as_str().unwrap().to_string());
    }
    for c in &codes {
        secrets.push(c.clone());
        secrets.push(c.replace('-', ""));
    }
    app.sign_in("vic", "wrong password here").await;

    let text = app.all_event_text().await;
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a secret is in the event store");
    }
    // Six-digit codes could turn up inside hashes by chance; look for them as values.
    let rows: Vec<Value> = sqlx::query_scalar("SELECT payload::jsonb FROM events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    let mut values = Vec::new();
    rows.iter().for_each(|r| strings(r, &mut values));
    for c in &six_digit {
        assert!(!values.contains(c), "a code is in the event store");
    }
    // Every event names its tenant in the metadata, for routing by tenant.
    let tenants: Vec<Option<String>> =
        sqlx::query_scalar("SELECT DISTINCT metadata::jsonb ->> 'tenant_id' FROM events")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(tenants, [Some(app.tenant_id.to_string())]);
    // Names, labels and HELP text; not the values (numbers like process
    // memory in bytes may hold any six digits by chance).
    let metrics: String = app
        .metrics()
        .await
        .lines()
        .map(|l| match l.starts_with('#') {
            true => l,
            false => l.rsplit_once(' ').map_or(l, |(series, _)| series),
        })
        .collect::<Vec<_>>()
        .join("\n");
    for s in secrets.iter().chain(&six_digit) {
        assert!(!metrics.contains(s.as_str()), "a secret is in the metrics");
    }
}

/// A TCP proxy to PostgreSQL that a test can cut, as if the database went away.
pub(crate) struct DbProxy {
    pub(crate) port: u16,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl DbProxy {
    pub(crate) async fn start(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            let mut stopped_accept = stopped.clone();
            loop {
                tokio::select! {
                    _ = stopped_accept.changed() => break,
                    accepted = listener.accept() => {
                        let Ok((mut client, _)) = accepted else { continue };
                        links.spawn(async move {
                            if let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await {
                                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                        });
                    }
                }
            }
            // Cutting the proxy drops every open connection too.
            links.abort_all();
        });
        Self { port, stop, task }
    }

    pub(crate) async fn cut(self) -> u16 {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.port
    }
}

#[tokio::test]
async fn with_postgresql_unreachable_sign_in_answers_503_and_recovers() {
    let proxy = DbProxy::start(0).await;
    let port = proxy.port;
    let app = crate::helpers::spawn_app_with(|config| {
        let url = config
            .database_url
            .expose_secret()
            .replace(":5432/", &format!(":{port}/"));
        config.database_url = url.into();
    })
    .await;
    let ok = app.sign_in(&app.admin_username, &app.admin_password).await;
    assert_eq!(ok.status, StatusCode::OK);
    let before = event_count(&app).await;

    let port = proxy.cut().await;
    let down = app.sign_in(&app.admin_username, &app.admin_password).await;
    assert_eq!(
        down.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        down.body
    );
    assert_eq!(down.code(), "service_unavailable");
    assert!(!down.body.to_string().contains("5432"));
    assert_eq!(event_count(&app).await, before, "nothing half-written");

    let _proxy = DbProxy::start(port).await;
    let mut back = None;
    for _ in 0..20 {
        let r = app.sign_in(&app.admin_username, &app.admin_password).await;
        if r.status == StatusCode::OK {
            back = Some(r);
            break;
        }
    }
    assert!(
        back.is_some(),
        "sign-in works again once PostgreSQL is back"
    );
}

/// The status of `GET http://{addr}{path}`.
async fn health_status(addr: &str, path: &str) -> StatusCode {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn verifier_is_ready_only_while_postgresql_answers() {
    let proxy = DbProxy::start(0).await;
    let port = proxy.port;
    let app = crate::helpers::spawn_app_with(|config| {
        let url = config
            .database_url
            .expose_secret()
            .replace(":5432/", &format!(":{port}/"));
        config.database_url = url.into();
    })
    .await;
    let api = app
        .base
        .split("/v1/")
        .next()
        .unwrap()
        .replace("http://", "");
    let metrics = app.metrics_addr.to_string();
    // On the API port (for load balancers) and on the metrics port (as every worker).
    for addr in [api.as_str(), metrics.as_str()] {
        assert_eq!(health_status(addr, "/health/live").await, StatusCode::OK);
        assert_eq!(health_status(addr, "/health/ready").await, StatusCode::OK);
    }

    let port = proxy.cut().await;
    for addr in [api.as_str(), metrics.as_str()] {
        let ready = reqwest::get(format!("http://{addr}/health/ready"))
            .await
            .unwrap();
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        let why = ready.text().await.unwrap();
        assert!(why.contains("PostgreSQL"), "{why}");
        assert!(
            !why.contains(&port.to_string()),
            "no connection details: {why}"
        );
        assert_eq!(health_status(addr, "/health/live").await, StatusCode::OK);
    }
    // `/health` stays what it was: the process answers, nothing checked.
    assert_eq!(health_status(&api, "/health").await, StatusCode::OK);

    let _proxy = DbProxy::start(port).await;
    let mut ready = false;
    for _ in 0..50 {
        if health_status(&api, "/health/ready").await == StatusCode::OK {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "ready again once PostgreSQL is back");
    assert_eq!(
        health_status(&metrics, "/health/ready").await,
        StatusCode::OK
    );
}
