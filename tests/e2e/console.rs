//! The admin console: an admin turns 2FA on through the Settings page (with
//! its preview), a user enrolls, the Overview counts them once the projector
//! has caught up, the admin reads a timeline, unlocks a locked user and
//! exports the audit log; all in a real browser. And who may see it: a
//! non-admin gets no console page, an auditor reads everything and can act
//! on nothing.

use std::time::Duration;

use chrono::Duration as Span;
use reqwest::StatusCode;
use serde_json::{json, Value};
use twofold_platform::Config;

use crate::browser::Browser;
use crate::delivery::free_port;
use crate::helpers::{enrolled_user, oathtool, spawn_app, zbarimg, ClockExt, TestApp};

const PASSWORD: &str = "correct horse battery";

/// A relay and a projector on a stream of this test's own, so the read
/// models follow the events.
async fn start_pipeline(app: &TestApp) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = Config {
        nats_url: std::env::var("TWOFOLD_TEST_NATS_URL")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string()),
        nats_stream: format!("C{id}"),
        nats_subject_prefix: format!("c{id}"),
        relay_poll_ms: 5,
        ..app.config.clone()
    };
    let relay_config = Config {
        metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        ..config.clone()
    };
    let projector_config = Config {
        metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        ..config
    };
    tokio::spawn(async move {
        let relay = twofold_relay::Relay::build(&relay_config).await.unwrap();
        let _ = relay.run_until_stopped(std::future::pending()).await;
    });
    tokio::spawn(async move {
        let projector = twofold_projections::consumer::Projector::build(&projector_config)
            .await
            .unwrap();
        projector.run_until_stopped(std::future::pending()).await;
    });
}

async fn sign_in(b: &Browser, app: &TestApp, username: &str, password: &str) {
    b.goto(&format!("{}/sign-in", app.pages())).await;
    b.fill("#username", username).await;
    b.fill("#password", password).await;
    b.submit("main button[type=submit]").await;
}

/// Enrolls at the enrollment page the sign-in led to; answers the secret.
async fn enroll_here(b: &Browser, app: &TestApp) -> String {
    assert!(b.url().await.ends_with("/enroll"), "{}", b.url().await);
    let png = b.find("img#qr").await.screenshot().await.unwrap();
    let uri = zbarimg(&png);
    let secret = uri
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("secret="))
        .unwrap()
        .to_string();
    b.fill("#code", &oathtool(&secret, app.clock.now_for_tests()))
        .await;
    b.submit("main form button[type=submit]").await;
    assert!(b.text().await.contains("Save your recovery codes"));
    b.click_text("I saved them").await;
    secret
}

/// Reloads the Overview until `what` holds (the projector catching up).
async fn overview_until(b: &Browser, app: &TestApp, what: &str, done: impl Fn(&str) -> bool) {
    for _ in 0..300 {
        b.goto(&format!("{}/admin/overview", app.pages())).await;
        if done(&b.text().await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the Overview never showed {what}: {}", b.text().await);
}

#[tokio::test]
async fn an_admin_rolls_out_2fa_in_the_console_and_follows_it_up() {
    let app = spawn_app().await;
    start_pipeline(&app).await;
    let admin = app.admin_token().await;
    app.create_user(
        &admin,
        json!({"username": "dora", "password": PASSWORD, "email": "dora@acme.test", "roles": ["staff"]}),
    )
    .await;
    // ben has an authenticator and then guesses wrong until he is locked out.
    let (ben, ben_secret, _) = enrolled_user(&app, &admin, "ben").await;

    let mut b = Browser::start("console").await;
    sign_in(&b, &app, &app.admin_username, &app.admin_password).await;
    b.click_text("Console").await;
    assert!(b.url().await.ends_with("/admin/overview"));
    b.shot("overview-before").await;

    // Settings: 2FA on, authenticator required, email as a fallback.
    b.click_text("Settings").await;
    b.shot("settings").await;
    b.find("#enabled").await.click().await.unwrap();
    b.find("input[name=allow_totp]")
        .await
        .click()
        .await
        .unwrap();
    b.find("input[name=enforcement][value=every_login]")
        .await
        .click()
        .await
        .unwrap();
    b.find("input[name=enrollment][value=required]")
        .await
        .click()
        .await
        .unwrap();
    b.find("#code_timeout option[value='15m']")
        .await
        .click()
        .await
        .unwrap();
    b.fill("#reason", "rollout to everyone").await;
    b.click_text("Preview the effect").await;
    let preview = b.find("#preview").await.text().await.unwrap();
    // root-admin, dora and ben are asked; ben has an authenticator, the admin
    // and dora an email, so nobody is left without a method.
    assert!(preview.contains("3 users will be asked"), "{preview}");
    assert!(preview.contains("3 of them have a method"), "{preview}");
    assert!(
        preview.contains("sign in again with a second factor"),
        "{preview}"
    );
    b.shot("settings-preview").await;
    b.click_text("Save settings").await;
    assert!(
        b.text().await.contains("Settings saved"),
        "{}",
        b.text().await
    );
    let stored = app
        .state
        .tenant(&app.tenant_id.to_string())
        .await
        .unwrap()
        .1
        .settings;
    assert!(stored.enabled);
    assert_eq!(
        stored.enrollment,
        twofold_domain::tenant::settings::Enrollment::Required
    );

    // The console now asks this session for a second factor, and offers
    // to confirm one (an email code: the admin has no authenticator yet).
    b.goto(&format!("{}/admin/overview", app.pages())).await;
    assert!(
        b.text().await.contains("Confirm it's you"),
        "{}",
        b.text().await
    );
    b.shot("step-up-offer").await;
    b.click_text("Confirm with a code").await;
    assert!(b.url().await.ends_with("/challenge"), "{}", b.url().await);
    let challenge = b
        .client
        .get_named_cookie("twofold_challenge")
        .await
        .unwrap();
    let code = app.delivered_code(challenge.value()).await;
    b.fill("#code", &code).await;
    b.submit("main form button[type=submit]").await;
    assert!(b.text().await.contains("Confirmed"), "{}", b.text().await);
    b.goto(&format!("{}/admin/overview", app.pages())).await;
    assert!(b.find("#enrolled").await.text().await.is_ok());
    b.goto(&format!("{}/account", app.pages())).await;
    b.click_text("Sign out").await;

    // dora signs in and is sent to enroll.
    sign_in(&b, &app, "dora", PASSWORD).await;
    enroll_here(&b, &app).await;
    b.click_text("Sign out").await;

    // ben locks himself out with wrong codes.
    for _ in 0..3 {
        let c = app.sign_in("ben", PASSWORD).await;
        let wrong = if oathtool(&ben_secret, app.clock.now_for_tests()) == "000000" {
            "111111"
        } else {
            "000000"
        };
        app.post(
            "/challenge/verify",
            json!({"challenge_token": c.body["challenge"]["token"], "code": wrong}),
        )
        .await;
    }

    // The admin enrolls too, and is back in the console.
    app.clock.advance(Span::seconds(30));
    sign_in(&b, &app, &app.admin_username, &app.admin_password).await;
    enroll_here(&b, &app).await;
    b.click_text("Console").await;
    overview_until(&b, &app, "dora and the admin enrolled", |t| {
        t.contains("Figures are up to date")
    })
    .await;
    assert_eq!(b.find("#enrolled").await.text().await.unwrap(), "3");
    assert_eq!(
        b.find("#enrollment-rate").await.text().await.unwrap(),
        "100%"
    );
    b.shot("overview").await;

    // User Management: the enrolled users, then dora's timeline.
    b.click_text("User Management").await;
    b.find("#two_factor option[value=on]")
        .await
        .click()
        .await
        .unwrap();
    b.click_text("Filter").await;
    let listed = b.find("#directory").await.text().await.unwrap();
    assert!(
        listed.contains("dora") && listed.contains("ben"),
        "{listed}"
    );
    b.shot("users").await;
    b.click_text("dora").await;
    let timeline = b.find("#timeline").await.text().await.unwrap();
    assert!(timeline.contains("EnrollmentCompleted"), "{timeline}");
    assert!(timeline.contains("SessionStarted"), "{timeline}");
    b.shot("user").await;

    // Unlock ben, with a reason and the confirmation.
    b.goto(&format!("{}/admin/users/{ben}", app.pages())).await;
    assert!(b.text().await.contains("locked out"));
    b.find("#action option[value=unlock]")
        .await
        .click()
        .await
        .unwrap();
    b.fill("#reason", "ben called the help desk").await;
    b.find("#confirm").await.click().await.unwrap();
    b.click_text("Apply").await;
    assert!(
        b.text().await.contains("The user is unlocked"),
        "{}",
        b.text().await
    );
    b.shot("user-unlocked").await;
    let unlocked = app.events_of(&ben, "UserUnlocked").await;
    assert_eq!(unlocked[0]["ctx"]["reason"], "ben called the help desk");
    assert_eq!(unlocked[0]["ctx"]["actor"]["kind"], "admin");

    // Audit: the unlock is there, and the export verifies.
    b.click_text("Audit").await;
    b.fill("#event_type", "UserUnlocked").await;
    b.click_text("Search").await;
    let found = b.find("#audit").await.text().await.unwrap();
    assert!(
        found.contains("UserUnlocked") && found.contains("ben called the help desk"),
        "{found}"
    );
    b.shot("audit").await;
    let href = b
        .find("#export-ndjson")
        .await
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    let cookies = b.client.get_all_cookies().await.unwrap();
    let header = cookies
        .iter()
        .map(|c| format!("{}={}", c.name(), c.value()))
        .collect::<Vec<_>>()
        .join("; ");
    let origin = app.pages().split("/t/").next().unwrap().to_string();
    let export = reqwest::Client::new()
        .get(format!("{origin}{href}"))
        .header("cookie", header)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), StatusCode::OK);
    assert!(export.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains("attachment"));
    let text = export.text().await.unwrap();
    let verified = twofold_projections::audit::verify(&text).unwrap();
    assert_eq!(verified.entries, 1);
    b.stop().await;
}

/// A browser signed in through the sign-in form (no second factor asked).
pub(crate) struct PageClient {
    client: reqwest::Client,
    token: String,
}

impl PageClient {
    pub(crate) async fn sign_in(app: &TestApp, username: &str, password: &str) -> PageClient {
        let client = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let html = client
            .get(format!("{}/sign-in", app.pages()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let token = html
            .split("name=\"form_token\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .to_string();
        let signed_in = client
            .post(format!("{}/sign-in", app.pages()))
            .form(&[
                ("form_token", token.as_str()),
                ("username", username),
                ("password", password),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(signed_in.status(), StatusCode::SEE_OTHER);
        PageClient { client, token }
    }

    pub(crate) async fn get(&self, url: String) -> (StatusCode, String) {
        let r = self.client.get(url).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    }

    pub(crate) async fn post(&self, url: String, fields: &[(&str, &str)]) -> (StatusCode, String) {
        let mut form = vec![("form_token", self.token.as_str())];
        form.extend_from_slice(fields);
        let r = self.client.post(url).form(&form).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    }
}

#[tokio::test]
async fn a_non_admin_gets_no_console_and_an_auditor_reads_but_cannot_act() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let kim = app
        .create_user(
            &admin,
            json!({"username": "kim", "password": PASSWORD, "roles": ["staff"]}),
        )
        .await;
    let audrey = app
        .create_user(
            &admin,
            json!({"username": "audrey", "password": PASSWORD, "roles": ["auditor"]}),
        )
        .await;
    let pages = app.pages();

    let user = PageClient::sign_in(&app, "kim", PASSWORD).await;
    for tab in ["overview", "settings", "users", "audit"] {
        let (status, body) = user.get(format!("{pages}/admin/{tab}")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{tab}");
        assert!(body.contains("forbidden"), "{body}");
    }
    let (_, account) = user.get(format!("{pages}/account")).await;
    assert!(!account.contains("Console"));

    let auditor = PageClient::sign_in(&app, "audrey", PASSWORD).await;
    for path in [
        "overview",
        "settings",
        "users",
        "audit",
        &format!("users/{kim}"),
    ] {
        let (status, body) = auditor.get(format!("{pages}/admin/{path}")).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert!(body.contains("read-only access"), "{path}");
        assert!(
            !body.contains("Save settings") && !body.contains(">Apply<"),
            "{path}"
        );
    }
    // The user page and the audit search were reads of the history, recorded.
    let reads: Vec<Value> = app
        .events_of(&audrey, "AuditRead")
        .await
        .into_iter()
        .map(|r| r["read"].clone())
        .collect();
    assert_eq!(
        reads,
        [
            json!({"what": "audit_search", "filter": {"event_type": null, "user_id": null, "actor": null, "from": null, "to": null}}),
            json!({"what": "user_page", "user_id": kim}),
        ]
    );
    let before = app.event_types(&kim).await;
    let (status, _) = auditor
        .post(
            format!("{pages}/admin/users/{kim}"),
            &[
                ("action", "revoke-sessions"),
                ("reason", "curious"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = auditor
        .post(
            format!("{pages}/admin/settings"),
            &[
                ("enabled", "on"),
                ("enforcement", "every_login"),
                ("allow_email", "on"),
                ("default_method", "email"),
                ("enrollment", "optional"),
                ("code_timeout", "5m"),
                ("max_invalid_attempts", "3"),
                ("resend_limit", "3"),
                ("scope", "all_users"),
                ("session_days", "1"),
                ("reason", "x"),
                ("intent", "save"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(app.event_types(&kim).await, before);
    let settings = app
        .state
        .tenant(&app.tenant_id.to_string())
        .await
        .unwrap()
        .1
        .settings;
    assert!(!settings.enabled);
}
