//! Erasure by crypto-shredding: a user's personal data is sealed under their
//! own data key in the event store, the outbox's JetStream copies and the
//! audit history; erasing the user deletes the key. Afterwards nothing in
//! the database or the stream reads as their email, phone or browser, they
//! cannot sign in, the API says they were erased, the audit exports from
//! before and after both verify, and a rebuild gives the same read models.

use reqwest::StatusCode;
use serde_json::{json, Value};
use twofold_projections::audit::{verify_extends, verify_signed};
use twofold_projections::consumer::Consumer;

use crate::console::PageClient;
use crate::helpers::{settings_on, spawn_app, Reply, TestApp};
use crate::nats::{caught_up, eventually, nats_config, nats_url, source, start_relay};

const PASSWORD: &str = "correct horse battery";
const EMAIL: &str = "zoe.erasable@example.org";
const PHONE: &str = "+4915199887766";
const BROWSER: &str = "ZoeBrowser/7.3 (erasure-test; rare)";

/// What must not be readable anywhere once Zoe is erased.
const PERSONAL: [&str; 3] = [EMAIL, PHONE, BROWSER];

/// Zoe signs in from her browser: password, then the emailed code.
async fn sign_in_from_browser(app: &TestApp) -> Reply {
    let challenge = app
        .send(
            app.client
                .post(format!("{}/sign-in", app.base))
                .header("user-agent", BROWSER)
                .json(&json!({"username": "zoe", "password": PASSWORD})),
        )
        .await;
    assert_eq!(
        challenge.body["status"], "challenge",
        "{:?}",
        challenge.body
    );
    let token = challenge.body["challenge"]["token"].as_str().unwrap();
    let code = app.delivered_code(token).await;
    app.send(
        app.client
            .post(format!("{}/challenge/verify", app.base))
            .header("user-agent", BROWSER)
            .json(&json!({"challenge_token": token, "code": code})),
    )
    .await
}

/// The admin confirms a factor (the step-up erasure asks for).
async fn step_up(app: &TestApp, admin: &str) {
    let step_up = app.post_auth("/me/step-up", admin, json!({})).await;
    let token = step_up.body["challenge"]["token"].as_str().unwrap();
    let code = app.delivered_code(token).await;
    let stepped = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    assert_eq!(stepped.body["status"], "stepped_up", "{:?}", stepped.body);
}

/// Every table of the test's database, each row as text, that contains `needle`.
async fn rows_containing(app: &TestApp, needle: &str) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(table_name) FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(tables.len() > 10, "{tables:?}");
    let mut found = Vec::new();
    for table in tables {
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT t::text FROM {table} t WHERE strpos(t::text, $1) > 0"
        ))
        .bind(needle)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        found.extend(rows.into_iter().map(|r| format!("{table}: {r}")));
    }
    found
}

/// Every message of the test's JetStream stream, as text.
async fn stream_messages(config: &twofold_platform::Config) -> Vec<String> {
    let client = async_nats::connect(&config.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&config.nats_stream).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut messages = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        messages.push(String::from_utf8_lossy(&message.payload).into_owned());
    }
    messages
}

/// Both read models, whole rows, in a stable order.
async fn read_models(app: &TestApp) -> (Vec<Value>, Vec<Value>) {
    let users = sqlx::query_scalar("SELECT to_jsonb(u) FROM rm_users u ORDER BY user_id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    let audit = sqlx::query_scalar("SELECT to_jsonb(a) FROM rm_audit a ORDER BY position")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    (users, audit)
}

async fn export(app: &TestApp, admin: &str) -> String {
    let response = app
        .client
        .get(format!("{}/audit", app.base))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap()
}

#[tokio::test]
async fn an_erased_users_personal_data_reads_nowhere_and_the_audit_chain_still_verifies() {
    let app = spawn_app().await;
    let config = nats_config(&nats_url());
    let _relay = start_relay(&app, &config).await;
    let admin = app.admin_token().await;
    let zoe = app
        .create_user(
            &admin,
            json!({"username": "zoe", "password": PASSWORD, "email": EMAIL, "phone": PHONE}),
        )
        .await;
    // The console, in the admin's browser: Zoe's page offers the erasure,
    // and posting it without a fresh step-up asks for one and erases nothing.
    let pages = app.pages();
    let console = PageClient::sign_in(&app, &app.admin_username, &app.admin_password).await;
    let (status, page) = console.get(format!("{pages}/admin/users/{zoe}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Erase zoe"), "{page}");
    let before_console = app.event_types(&zoe).await;
    let (status, _) = console
        .post(
            format!("{pages}/admin/users/{zoe}/erase"),
            &[("reason", "GDPR request #42")],
        )
        .await;
    assert_ne!(status, StatusCode::SEE_OTHER);
    assert_eq!(app.event_types(&zoe).await, before_console);
    app.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    // Admin actions now need a session that passed the second factor.
    let admin = app.admin_token().await;
    let signed_in = sign_in_from_browser(&app).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    let session = signed_in.body["session"]["token"].as_str().unwrap();
    let src = source(&config, "erasure");
    let consumer = Consumer::connect(app.pool.clone(), app.state.personal.clone(), &src)
        .await
        .unwrap();
    tokio::spawn(consumer.run_until_stopped(std::future::pending()));
    eventually("the read models to catch up", async || {
        caught_up(&app).await
    })
    .await;

    // Before: the events and their NATS copies hold Zoe's data sealed only,
    // while the API, the history and the export show it opened.
    let events: Vec<String> = sqlx::query_scalar("SELECT payload::text FROM events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    let stream = stream_messages(&config).await;
    for needle in PERSONAL {
        assert!(
            !events.iter().any(|e| e.contains(needle)),
            "{needle} in an event"
        );
        assert!(
            !stream.iter().any(|m| m.contains(needle)),
            "{needle} in NATS"
        );
    }
    let detail = app.get_auth(&format!("/users/{zoe}"), &admin).await;
    assert_eq!(detail.body["email"], EMAIL, "{:?}", detail.body);
    let history = app.get_auth(&format!("/users/{zoe}/history"), &admin).await;
    assert!(
        history.body.to_string().contains(BROWSER),
        "{:?}",
        history.body
    );
    let keys = app.get_auth("/audit/keys", &admin).await.body;
    let keys = twofold_platform::audit_signing::VerifyingKeys::parse(&keys.to_string()).unwrap();
    let before = export(&app, &admin).await;
    assert!(before.contains(BROWSER) && before.contains(EMAIL));
    let earlier = verify_signed(&before, &keys).unwrap();

    // Erasing takes an admin's step-up and a reason.
    let erase = |body: Value| {
        let (app, admin, zoe) = (&app, admin.clone(), zoe.clone());
        async move {
            app.post_auth(&format!("/users/{zoe}/erase"), &admin, body)
                .await
        }
    };
    let refused = erase(json!({"reason": "GDPR request #42"})).await;
    assert_eq!(refused.code(), "step_up_required");
    step_up(&app, &admin).await;
    let refused = erase(json!({})).await;
    assert_eq!(refused.code(), "reason_required");
    let erased = erase(json!({"reason": "GDPR request #42"})).await;
    assert_eq!(erased.status, StatusCode::NO_CONTENT, "{:?}", erased.body);
    let again = erase(json!({"reason": "twice"})).await;
    assert_eq!(again.code(), "user_erased");

    // The account is gone: no sign-in, no session, shown as erased.
    let refused = app.sign_in("zoe", PASSWORD).await;
    assert_eq!(refused.code(), "invalid_credentials", "{:?}", refused.body);
    let seen = app
        .post("/sessions/introspect", json!({"token": session}))
        .await;
    assert_eq!(seen.body["active"], false);
    let detail = app.get_auth(&format!("/users/{zoe}"), &admin).await;
    assert_eq!(detail.status, StatusCode::GONE);
    assert_eq!(detail.code(), "user_erased");
    let recorded = app.events_of(&zoe, "UserErased").await;
    assert_eq!(recorded[0]["ctx"]["reason"], "GDPR request #42");
    assert_eq!(recorded[0]["ctx"]["actor"]["kind"], "admin");

    eventually("the erasure to reach the read models", async || {
        caught_up(&app).await
    })
    .await;
    let listed = app.get_auth("/users?per_page=100", &admin).await;
    let row = listed.body["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user_id"] == zoe.as_str())
        .cloned()
        .unwrap();
    assert_eq!(row["erased"], true, "{row}");
    assert_eq!(row["username"], "[erased]");

    // Nothing of Zoe's reads anywhere: not in any table, not in the stream.
    for needle in PERSONAL {
        let rows = rows_containing(&app, needle).await;
        assert!(rows.is_empty(), "{needle} still in the database: {rows:#?}");
        let messages = stream_messages(&config).await;
        assert!(
            !messages.iter().any(|m| m.contains(needle)),
            "{needle} in NATS"
        );
    }
    let history = app.get_auth(&format!("/users/{zoe}/history"), &admin).await;
    let text = history.body.to_string();
    assert!(!text.contains(BROWSER) && !text.contains(EMAIL), "{text}");
    assert!(text.contains("[erased]"), "{text}");

    // The export taken before still verifies; a fresh one verifies, shows
    // the fields as erased, and extends the earlier one.
    assert!(verify_signed(&before, &keys).is_ok());
    let after = export(&app, &admin).await;
    for needle in PERSONAL {
        assert!(!after.contains(needle), "{needle} in a fresh export");
    }
    assert!(after.contains("[erased]"));
    let extended = verify_extends(&after, Some(&keys), &earlier).unwrap();
    assert!(extended.entries > earlier.entries);

    // A rebuild from the events gives exactly the read models kept live,
    // once those have applied the reads just audited (the history and the
    // export each recorded an `AuditRead`): taken earlier, the live models
    // miss them, and a batch still applying when the rebuild truncates can
    // deadlock with it.
    eventually("the audited reads to reach the read models", async || {
        caught_up(&app).await
    })
    .await;
    let live = read_models(&app).await;
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
    assert_eq!(read_models(&app).await, live);

    // The console says so too (with 2FA off again, so the browser session
    // from before it was switched on opens the console).
    let off = app.set_settings(&admin, json!({"enabled": false})).await;
    assert_eq!(off.status, StatusCode::OK, "{:?}", off.body);
    let (status, page) = console.get(format!("{pages}/admin/users/{zoe}")).await;
    assert_eq!(status, StatusCode::GONE, "{page}");
    assert!(page.contains("was erased"), "{page}");
    let (_, list) = console.get(format!("{pages}/admin/users")).await;
    assert!(list.contains("[erased]") && !list.contains(EMAIL), "{list}");
}

/// The operator's break-glass erasure (`twofold user erase`): the same
/// erasure, recorded with the operator as actor and the reason, which it
/// requires.
#[tokio::test]
async fn the_operator_erases_a_user_with_a_reason() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let zoe = app
        .create_user(
            &admin,
            json!({"username": "zoe", "password": PASSWORD, "email": EMAIL}),
        )
        .await;
    let no_reason = app
        .state
        .operator_erase(app.tenant_id, "zoe", "  ")
        .await
        .unwrap_err();
    assert_eq!(no_reason.code(), "reason_required");
    let unknown = app
        .state
        .operator_erase(app.tenant_id, "nobody", "erasure request #7")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), "user_not_found");
    assert!(app.events_of(&zoe, "UserErased").await.is_empty());

    app.state
        .operator_erase(app.tenant_id, "zoe", "erasure request #7")
        .await
        .unwrap();
    let recorded = app.events_of(&zoe, "UserErased").await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0]["ctx"]["reason"], "erasure request #7");
    assert_eq!(recorded[0]["ctx"]["actor"]["kind"], "operator");
    let refused = app.sign_in("zoe", PASSWORD).await;
    assert_eq!(refused.code(), "invalid_credentials", "{:?}", refused.body);
    let detail = app.get_auth(&format!("/users/{zoe}"), &admin).await;
    assert_eq!(detail.code(), "user_erased");
    assert!(rows_containing(&app, EMAIL).await.is_empty());
}

/// A tenant-wide export longer than the batches it is read in (512 entries)
/// opens every user's personal data, whichever batch first names the user,
/// and shows an erased user's as `[erased]`; and it still verifies.
#[tokio::test]
async fn an_export_of_many_read_batches_opens_each_users_data_and_the_erased_as_erased() {
    use twofold_domain::secrets::SecretHash;
    use twofold_domain::user::{NewChallenge, NewSession, SignIn, UserCommand};
    use twofold_domain::{Actor, ChallengeId, Ctx, SessionId};

    let app = spawn_app().await;
    let admin = app.admin_token().await;
    // Sign-ins straight through the store, each user from an address and a
    // browser of their own.
    let sign_in = |id: String, i: usize| {
        let users = app.state.users.clone();
        async move {
            let command = UserCommand::SignIn(SignIn {
                password_ok: true,
                address_retry_after: None,
                settings: Default::default(),
                challenge: NewChallenge {
                    id: ChallengeId(uuid::Uuid::new_v4()),
                    token_hash: SecretHash("c".into()),
                },
                session: NewSession {
                    id: SessionId(uuid::Uuid::new_v4()),
                    token_hash: SecretHash("s".into()),
                    expires_at: None,
                },
                device: None,
                enrollment_seed: None,
                ctx: Ctx::new(crate::helpers::start_time(), Actor::System).with_request(
                    Some(format!("198.51.100.{i}")),
                    Some(format!("ManyBrowser/{i}")),
                ),
            });
            users.execute(&id, |_| Ok(command.clone())).await.unwrap();
        }
    };
    let create = |i: usize| {
        let body = json!({"username": format!("many{i}"), "password": PASSWORD});
        app.create_user(&admin, body)
    };
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(create(i).await);
    }
    // Taking turns, so every batch names several users.
    for _ in 0..70 {
        for (i, id) in ids.iter().enumerate() {
            sign_in(id.clone(), i).await;
        }
    }
    // A user registered after all that: a later batch is the first to name
    // their data key.
    ids.push(create(8).await);
    sign_in(ids[8].clone(), 8).await;
    app.state
        .operator_erase(app.tenant_id, "many3", "erasure request #9")
        .await
        .unwrap();
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();

    let text = export(&app, &admin).await;
    let keys = app.get_auth("/audit/keys", &admin).await.body;
    let keys = twofold_platform::audit_signing::VerifyingKeys::parse(&keys.to_string()).unwrap();
    verify_signed(&text, &keys).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("trailer").is_none())
        .collect();
    assert!(lines.len() > 2 * 512, "{} entries", lines.len());
    let mut checked = [0usize; 9];
    for line in &lines {
        let Some(i) = ids
            .iter()
            .position(|id| line["aggregate_id"] == id.as_str())
        else {
            continue;
        };
        if line["event_type"] != "SessionStarted" {
            continue;
        }
        assert!(
            line["ip"].as_str().unwrap().starts_with("sealed:1:"),
            "{line}"
        );
        let (ip, browser) = if i == 3 {
            ("[erased]".to_string(), "[erased]".to_string())
        } else {
            (format!("198.51.100.{i}"), format!("ManyBrowser/{i}"))
        };
        assert_eq!(line["opened"]["ip"], ip.as_str(), "{line}");
        assert_eq!(line["opened"]["user_agent"], browser.as_str(), "{line}");
        checked[i] += 1;
    }
    assert_eq!(checked, [70, 70, 70, 70, 70, 70, 70, 70, 1]);
}
