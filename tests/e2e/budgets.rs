//! Budgets over HTTP: wrong passwords per client address across accounts,
//! codes sent per account, recipient and address, and idle sessions. Each is
//! tried with parallel requests: no more than the budget get through.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{settings_on, spawn_app, Reply, TestApp};

fn count(replies: &[Reply], status: StatusCode) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

async fn users(app: &TestApp, admin: &str, names: &[&str]) -> Vec<String> {
    let mut ids = Vec::new();
    for name in names {
        ids.push(
            app.create_user(
                admin,
                json!({"username": name, "password": "correct horse battery", "email": format!("{name}@acme.test")}),
            )
            .await,
        );
    }
    ids
}

/// A password spray from one address: wrong passwords across many accounts,
/// existing or not, stop at the address's hourly budget; then even a right
/// password from there gets the same refusal, recorded on the account.
#[tokio::test]
async fn a_password_spray_from_one_address_stops_at_its_budget() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let ids = users(&app, &admin, &["ann", "bob", "cyd"]).await;
    let r = app
        .set_settings(&admin, json!({"password_failures_per_address_per_hour": 6}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // Twenty-four tries at once over three accounts and three unknown names.
    let names = ["ann", "bob", "cyd", "nobody", "ghost", "zed"];
    let tries: Vec<_> = (0..24)
        .map(|i| (names[i % names.len()], format!("guess {i}")))
        .collect();
    let replies = futures::future::join_all(tries.iter().map(|(n, p)| app.sign_in(n, p))).await;
    assert_eq!(count(&replies, StatusCode::UNAUTHORIZED), 6);
    let throttled: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(throttled.len(), 18);
    for t in &throttled {
        assert_eq!(t.code(), "too_many_attempts");
    }
    // An unknown and an existing name are answered alike.
    let unknown = app.sign_in("nobody", "x").await;
    let known_right = app.sign_in("ann", "correct horse battery").await;
    assert_eq!(unknown.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(known_right.status, unknown.status);
    assert_eq!(known_right.code(), unknown.code());
    // The accounts' histories show the throttling, naming the budget.
    let recorded = app.events_of(&ids[0], "SignInThrottled").await;
    assert!(!recorded.is_empty());
    assert_eq!(recorded.last().unwrap()["budget"], "address");
    // The next hour starts afresh.
    app.clock.advance(chrono::Duration::hours(1));
    let right = app.sign_in("ann", "correct horse battery").await;
    assert_eq!(right.status, StatusCode::OK, "{:?}", right.body);
    // A right password gives its use back (just after answering).
    for _ in 0..100 {
        let used: i32 =
            sqlx::query_scalar("SELECT used FROM budgets WHERE kind = 'passwords_per_address'")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        if used == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // So six wrong ones are looked at.
    let replies = futures::future::join_all(
        ["nobody", "ghost", "zed", "yan", "xia", "wes", "vic", "uma"]
            .iter()
            .map(|n| app.sign_in(n, "nope")),
    )
    .await;
    assert_eq!(count(&replies, StatusCode::UNAUTHORIZED), 6);
    assert_eq!(count(&replies, StatusCode::TOO_MANY_REQUESTS), 2);
}

/// Codes cost: sign-ins, resends and switches that send an email code take
/// from the account's hourly budget; parallel resends cannot pass it.
#[tokio::test]
async fn codes_sent_for_one_account_stop_at_its_hourly_budget() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let ids = users(&app, &admin, &["dee"]).await;
    let mut settings = settings_on(&["email"], "email");
    settings["codes_per_account_per_hour"] = json!(4);
    let r = app.set_settings(&admin, settings).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let c = app.sign_in("dee", "correct horse battery").await;
    assert_eq!(c.body["status"], "challenge", "{:?}", c.body);
    let token = c.body["challenge"]["token"].as_str().unwrap().to_string();
    // Ten resends at once: three more codes fit the budget of four.
    let replies = futures::future::join_all(
        (0..10).map(|_| app.post("/challenge/resend", json!({ "challenge_token": token }))),
    )
    .await;
    assert_eq!(count(&replies, StatusCode::OK), 3, "{replies:?}");
    let refused: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(refused.len(), 7);
    assert_eq!(refused[0].code(), "code_limit_reached");
    assert!(
        refused[0].body["error"]["retry_after_secs"]
            .as_i64()
            .unwrap()
            >= 1
    );
    assert_eq!(app.events_of(&ids[0], "CodeResent").await.len(), 3);
    // A new sign-in would send a code too: refused, no challenge opened.
    let again = app.sign_in("dee", "correct horse battery").await;
    assert_eq!(again.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(again.code(), "code_limit_reached");
    assert_eq!(app.events_of(&ids[0], "ChallengeIssued").await.len(), 1);
    // The code already sent still works.
    let code = app.delivered_code(&token).await;
    let ok = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    // An hour later codes go out again.
    app.clock.advance(chrono::Duration::hours(1));
    let c = app.sign_in("dee", "correct horse battery").await;
    assert_eq!(c.body["status"], "challenge", "{:?}", c.body);
}

/// Codes for sign-ins from one address across accounts stop at the
/// address's budget (SMS pumping through many accounts).
#[tokio::test]
async fn codes_sent_from_one_address_across_accounts_stop_at_its_budget() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let names = ["e1", "e2", "e3", "e4", "e5", "e6"];
    users(&app, &admin, &names).await;
    let mut settings = settings_on(&["email"], "email");
    settings["codes_per_address_per_hour"] = json!(4);
    let r = app.set_settings(&admin, settings).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let replies = futures::future::join_all(
        names
            .iter()
            .map(|n| app.sign_in(n, "correct horse battery")),
    )
    .await;
    assert_eq!(count(&replies, StatusCode::OK), 4, "{replies:?}");
    assert_eq!(count(&replies, StatusCode::TOO_MANY_REQUESTS), 2);
    let challenges: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'ChallengeIssued'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(challenges, 4);
}

/// With an idle timeout, a session unused for that long ends; one in use
/// lives on, its use recorded now and then, not at every request.
#[tokio::test]
async fn an_idle_session_ends_and_a_used_one_lives_on() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let ids = users(&app, &admin, &["fay"]).await;
    let r = app
        .set_settings(&admin, json!({"idle_timeout_mins": 30}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let s = app.sign_in("fay", "correct horse battery").await;
    let token = s.body["session"]["token"].as_str().unwrap().to_string();
    // Used every 20 minutes for two hours: it stays.
    for _ in 0..6 {
        app.clock.advance(chrono::Duration::minutes(20));
        assert!(active(&app, &token).await);
        assert!(active(&app, &token).await);
    }
    // Each use past a tenth of the timeout was recorded once, not twice.
    assert_eq!(app.events_of(&ids[0], "SessionUsed").await.len(), 6);
    // Left alone for 30 minutes, it ends.
    app.clock.advance(chrono::Duration::minutes(30));
    assert!(!active(&app, &token).await);
    let ended = app.events_of(&ids[0], "SessionEnded").await;
    assert_eq!(ended.last().unwrap()["reason"], "idle");
    // The API refuses it as well.
    let me = app.get_auth("/me", &token).await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED);
    // Out of range is refused, naming the field (the admin's session went
    // idle meanwhile too).
    let admin = app.admin_token().await;
    let r = app
        .set_settings(&admin, json!({"idle_timeout_mins": 1}))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["field"], "idle_timeout_mins");
}

async fn active(app: &TestApp, token: &str) -> bool {
    app.post("/sessions/introspect", json!({ "token": token }))
        .await
        .body["active"]
        == true
}

/// An unknown username and an existing one with a wrong password cost the
/// same: same status, same body, and medians within 5 ms over interleaved
/// samples (the existing user's try writes an event; the unknown's must not
/// be measurably quicker for it).
#[tokio::test]
async fn unknown_and_existing_users_take_the_same_time() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let names: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
    users(&app, &admin, &names_ref).await;
    let r = app
        .set_settings(
            &admin,
            json!({"password_attempts_before_delay": 100, "password_failures_per_address_per_hour": 100000}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    const SAMPLES: usize = 150;
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..SAMPLES * 2 {
        // Pairs alternate which goes first, so what one try leaves behind
        // (a flush, a wake-up) does not land on the same side every time.
        let pair = i / 2;
        let is_known = (i % 2 == 0) == (pair % 2 == 0);
        let name = if is_known {
            names[pair % names.len()].clone()
        } else {
            format!("nobody{i}")
        };
        let started = std::time::Instant::now();
        let reply = app.sign_in(&name, "a wrong password").await;
        let took = started.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{:?}", reply.body);
        assert_eq!(reply.code(), "invalid_credentials");
        if is_known {
            known.push(took);
        } else {
            unknown.push(took);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Each pair ran back to back, under the same load: the median of the
    // pairs' differences is steadier than the difference of two medians.
    let paired: Vec<f64> = known.iter().zip(&unknown).map(|(k, u)| k - u).collect();
    let (k, u, d) = (median(known), median(unknown), median(paired));
    println!(
        "median wrong-password sign-in: existing user {k:.2} ms, unknown user {u:.2} ms, \
         median paired difference {d:.2} ms"
    );
    assert!(
        d.abs() < 5.0,
        "existing {k:.2} ms vs unknown {u:.2} ms (paired {d:.2} ms): the difference tells whether a user exists"
    );
}

/// Two accounts that share an email address share its budget of codes.
#[tokio::test]
async fn codes_sent_to_one_address_stop_at_its_budget_across_accounts() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    for name in ["gus", "gil"] {
        app.create_user(
            &admin,
            json!({"username": name, "password": "correct horse battery", "email": "shared@acme.test"}),
        )
        .await;
    }
    let mut settings = settings_on(&["email"], "email");
    settings["codes_per_account_per_hour"] = json!(3);
    let r = app.set_settings(&admin, settings).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let replies = futures::future::join_all(
        ["gus", "gil", "gus", "gil", "gus", "gil"]
            .iter()
            .map(|n| app.sign_in(n, "correct horse battery")),
    )
    .await;
    assert_eq!(count(&replies, StatusCode::OK), 3, "{replies:?}");
    assert_eq!(count(&replies, StatusCode::TOO_MANY_REQUESTS), 3);
}
