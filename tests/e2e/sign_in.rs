//! The password step: sessions without a second factor, challenges with one,
//! and answers that do not tell whether a user exists.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{settings_on, spawn_app, spawn_app_with_sms};

#[tokio::test]
async fn with_two_factor_off_a_password_opens_a_session_and_says_why() {
    let app = spawn_app().await;
    let reply = app.sign_in(&app.admin_username, &app.admin_password).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["status"], "signed_in");
    assert_eq!(reply.body["second_factor"]["used"], false);
    assert_eq!(
        reply.body["second_factor"]["skipped_because"],
        "two_factor_disabled"
    );
    let token = reply.body["session"]["token"].as_str().unwrap();
    let seen = app
        .post("/sessions/introspect", json!({ "token": token }))
        .await;
    assert_eq!(seen.body["active"], true);
    assert_eq!(seen.body["username"], app.admin_username.as_str());
    assert_eq!(seen.body["roles"], json!(["admin"]));
    // 90 days by default.
    let expires =
        chrono::DateTime::parse_from_rfc3339(seen.body["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        expires.with_timezone(&chrono::Utc) - crate::helpers::start_time(),
        chrono::Duration::days(90)
    );
}

#[tokio::test]
async fn unknown_user_and_wrong_password_answer_the_same() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    app.create_user(
        &admin,
        json!({"username": "bob", "password": "correct horse battery"}),
    )
    .await;
    let before = password_checks(&app).await;
    let wrong_password = app.sign_in("bob", "not the password").await;
    let unknown_user = app.sign_in("nobody", "not the password").await;
    let malformed_user = app.sign_in("no body!", "not the password").await;
    for reply in [&wrong_password, &unknown_user, &malformed_user] {
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply.body, wrong_password.body);
        assert_eq!(reply.code(), "invalid_credentials");
    }
    // Each of the three cost an argon2id check, known user or not.
    assert!(password_checks(&app).await >= before + 3.0);
}

async fn password_checks(app: &crate::helpers::TestApp) -> f64 {
    app.metrics()
        .await
        .lines()
        .find(|l| l.starts_with("twofold_password_checks_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_wrong_password_is_recorded_on_the_users_stream() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let bob = app
        .create_user(
            &admin,
            json!({"username": "bob", "password": "correct horse battery"}),
        )
        .await;
    app.sign_in("bob", "wrong wrong wrong").await;
    let rejected = app.events_of(&bob, "PasswordRejected").await;
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0]["ctx"]["actor"]["kind"], "user");
    assert_eq!(rejected[0]["ctx"]["ip"], "127.0.0.1");
}

#[tokio::test]
async fn with_two_factor_on_the_password_step_issues_a_challenge_with_the_default_method() {
    let app = spawn_app_with_sms().await;
    let admin = app.admin_token().await;
    let bob = app
        .create_user(
            &admin,
            json!({"username": "bob", "password": "correct horse battery", "email": "bob@acme.test", "phone": "+4915112345678", "roles": ["staff"]}),
        )
        .await;
    let changed = app
        .set_settings(
            &admin,
            json!({"enabled": true, "enforcement": "every_login", "allowed_methods": ["email", "sms"], "default_method": "sms", "sms_provider": "test-provider"}),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{:?}", changed.body);

    let reply = app.sign_in("bob", "correct horse battery").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["status"], "challenge");
    let challenge = &reply.body["challenge"];
    assert_eq!(challenge["method"], "sms");
    assert_eq!(challenge["methods"], json!(["email", "sms"]));
    assert!(reply.body.get("session").is_none());
    // Default code timeout: 4 hours.
    let expires =
        chrono::DateTime::parse_from_rfc3339(challenge["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        expires.with_timezone(&chrono::Utc) - crate::helpers::start_time(),
        chrono::Duration::hours(4)
    );

    let code = app
        .delivered_code(challenge["token"].as_str().unwrap())
        .await;
    let verified = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": challenge["token"], "code": code}),
        )
        .await;
    assert_eq!(verified.status, StatusCode::OK, "{:?}", verified.body);
    assert_eq!(verified.body["second_factor"]["method"], "sms");
    let session = verified.body["session"]["token"].as_str().unwrap();
    assert_ne!(session, challenge["token"].as_str().unwrap());
    let seen = app
        .post("/sessions/introspect", json!({ "token": session }))
        .await;
    assert_eq!(seen.body["active"], true);
    assert_eq!(
        seen.body["second_factor"],
        json!({"used": true, "method": "sms"})
    );
    assert_eq!(seen.body["roles"], json!(["staff"]));

    let types = app.event_types(&bob).await;
    assert_eq!(
        types,
        [
            "UserRegistered",
            "ChallengeIssued",
            "CodeVerified",
            "SessionStarted",
            "DeviceRemembered"
        ]
    );
}

#[tokio::test]
async fn a_user_without_a_usable_method_is_never_let_in_on_the_password_alone() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let carol = app
        .create_user(
            &admin,
            json!({"username": "carol", "password": "correct horse battery"}),
        )
        .await;
    // Email only, and carol has no email: refused, and recorded.
    app.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    let reply = app.sign_in("carol", "correct horse battery").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{:?}", reply.body);
    assert_eq!(reply.code(), "second_factor_unavailable");
    assert!(reply.body.get("session").is_none());
    let types = app.event_types(&carol).await;
    assert_eq!(types.last().unwrap(), "SignInRefusedNoMethod");
    assert!(!types.contains(&"SessionStarted".to_string()));

    // With the authenticator allowed (enrollment optional), carol is sent to
    // set one up, and may skip it: the skip is recorded with its reason.
    let admin = app.admin_token().await;
    app.set_settings(&admin, settings_on(&["totp", "email"], "totp"))
        .await;
    let reply = app.sign_in("carol", "correct horse battery").await;
    assert_eq!(
        reply.body["status"], "enrollment_required",
        "{:?}",
        reply.body
    );
    assert_eq!(reply.body["skippable"], true);
    let skipped = app
        .post(
            "/enrollment/skip",
            json!({"challenge_token": reply.body["challenge"]["token"]}),
        )
        .await;
    assert_eq!(skipped.status, StatusCode::OK, "{:?}", skipped.body);
    assert_eq!(
        skipped.body["second_factor"]["skipped_because"],
        "enrollment_skipped"
    );
    let recorded = app.events_of(&carol, "SecondFactorSkipped").await;
    assert_eq!(recorded[0]["reason"], "enrollment_skipped");

    // Required enrollment: no skipping.
    let admin = app.admin_token().await;
    let mut required = settings_on(&["totp", "email"], "totp");
    required["enrollment"] = json!("required");
    app.set_settings(&admin, required).await;
    let reply = app.sign_in("carol", "correct horse battery").await;
    assert_eq!(reply.body["skippable"], false);
    let refused = app
        .post(
            "/enrollment/skip",
            json!({"challenge_token": reply.body["challenge"]["token"]}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(refused.code(), "enrollment_required");
}

#[tokio::test]
async fn service_accounts_are_exempt() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    app.create_user(
        &admin,
        json!({"username": "ci-bot", "password": "correct horse battery", "email": "bot@acme.test", "service_account": true}),
    )
    .await;
    app.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    let reply = app.sign_in("ci-bot", "correct horse battery").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body["second_factor"]["skipped_because"],
        "service_account"
    );
}

#[tokio::test]
async fn a_session_ends_at_sign_out_and_at_its_expiry() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    app.create_user(
        &admin,
        json!({"username": "ola", "password": "correct horse battery"}),
    )
    .await;
    let token =
        |r: &crate::helpers::Reply| r.body["session"]["token"].as_str().unwrap().to_string();
    let first = token(&app.sign_in("ola", "correct horse battery").await);
    let second = token(&app.sign_in("ola", "correct horse battery").await);
    let active = |t: String| {
        let app = &app;
        async move {
            app.post("/sessions/introspect", json!({ "token": t }))
                .await
                .body["active"]
                .clone()
        }
    };
    assert_eq!(active(first.clone()).await, true);
    let out = app.post_auth("/sign-out", &first, json!({})).await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    assert_eq!(active(first.clone()).await, false);
    assert_eq!(app.get_auth("/me", &first).await.code(), "unauthenticated");
    assert_eq!(active(second.clone()).await, true);
    assert_eq!(active("tfs_garbage".into()).await, false);
    app.clock.advance(chrono::Duration::days(90));
    assert_eq!(active(second).await, false);
}

#[tokio::test]
async fn a_half_finished_sign_in_opens_nothing_that_needs_a_session() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    app.create_user(
        &admin,
        json!({"username": "pia", "password": "correct horse battery", "email": "pia@acme.test", "roles": ["admin"]}),
    )
    .await;
    app.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    let reply = app.sign_in("pia", "correct horse battery").await;
    let challenge = reply.body["challenge"]["token"].as_str().unwrap();
    for path in ["/me", "/settings", "/users"] {
        let r = app.get_auth(path, challenge).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(r.code(), "unauthenticated");
    }
    let seen = app
        .post("/sessions/introspect", json!({ "token": challenge }))
        .await;
    assert_eq!(seen.body["active"], false);
}

#[tokio::test]
async fn a_long_history_is_read_from_snapshots() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let quinn = app
        .create_user(
            &admin,
            json!({"username": "quinn", "password": "correct horse battery", "email": "quinn@acme.test"}),
        )
        .await;
    for _ in 0..40 {
        let r = app.sign_in("quinn", "correct horse battery").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let snapshots: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM snapshots WHERE aggregate_type = 'user' AND aggregate_id = $1",
    )
    .bind(&quinn)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        snapshots, 1,
        "one snapshot per stream, replaced as the stream moves on"
    );
    let last: i64 = sqlx::query_scalar(
        "SELECT last_sequence FROM snapshots WHERE aggregate_type = 'user' AND aggregate_id = $1",
    )
    .bind(&quinn)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let events_in_stream: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'user' AND aggregate_id = $1",
    )
    .bind(&quinn)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let behind = events_in_stream - last;
    assert!(
        (0..twofold_platform::store::SNAPSHOT_EVERY).contains(&behind),
        "the snapshot is fewer than {} events behind the stream ({events_in_stream} events, snapshot at {last})",
        twofold_platform::store::SNAPSHOT_EVERY
    );
    // The state loaded from snapshot + later events equals a full replay.
    let loaded = app.state.users.load(&quinn).await.unwrap();
    // The snapshot holds the personal data sealed, as the events do (the
    // trusted addresses too: see `personal`'s tests).
    let snapshot: String = sqlx::query_scalar(
        "SELECT payload::text FROM snapshots WHERE aggregate_type = 'user' AND aggregate_id = $1",
    )
    .bind(&quinn)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    for plain in ["quinn", "quinn@acme.test"] {
        assert!(!snapshot.contains(plain), "{plain} in {snapshot}");
    }
    assert!(
        snapshot.contains(&format!("\"sealed:1:{quinn}:")),
        "{snapshot}"
    );
    let events = app.stream_events(&quinn).await;
    let mut replayed = twofold_domain::user::User::default();
    for e in events {
        cqrs_es::Aggregate::apply(&mut replayed, serde_json::from_value(e).unwrap());
    }
    assert_eq!(loaded, replayed);
    assert_eq!(loaded.sign_ins, 40);
}

/// The account's password-guessing budget: five wrong passwords, then each
/// next try waits longer; the wait answers the same whether the password is
/// right or wrong, holds under parallel guessing, and a right password once
/// allowed starts the budget over.
#[tokio::test]
async fn wrong_passwords_are_slowed_per_account_without_an_oracle() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let mel = app
        .create_user(
            &admin,
            json!({"username": "mel", "password": "correct horse battery"}),
        )
        .await;
    // Twenty wrong passwords at once: exactly five are looked at.
    let guesses: Vec<String> = (0..20).map(|i| format!("wrong password {i}")).collect();
    let replies = futures::future::join_all(guesses.iter().map(|g| app.sign_in("mel", g))).await;
    let refused = replies
        .iter()
        .filter(|r| r.status == StatusCode::UNAUTHORIZED)
        .count();
    let throttled: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(refused, 5);
    assert_eq!(throttled.len(), 15);
    assert_eq!(throttled[0].code(), "too_many_attempts");
    assert!(
        throttled[0].body["error"]["retry_after_secs"]
            .as_i64()
            .unwrap()
            >= 1
    );
    assert_eq!(app.events_of(&mel, "PasswordRejected").await.len(), 5);
    // While it waits, the right password gets the same answer.
    let right = app.sign_in("mel", "correct horse battery").await;
    assert_eq!(right.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(right.code(), "too_many_attempts");
    // After the wait, it opens the account and the budget starts over.
    app.clock.advance(chrono::Duration::seconds(2));
    let right = app.sign_in("mel", "correct horse battery").await;
    assert_eq!(right.status, StatusCode::OK, "{:?}", right.body);
    for _ in 0..5 {
        assert_eq!(
            app.sign_in("mel", "wrong again").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
}

/// A locked account answers the same whether the password is right or wrong.
#[tokio::test]
async fn a_locked_account_is_no_password_oracle() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    app.create_user(
        &admin,
        json!({"username": "lin", "password": "correct horse battery", "email": "lin@acme.test"}),
    )
    .await;
    app.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    let c = app.sign_in("lin", "correct horse battery").await;
    let token = c.body["challenge"]["token"].as_str().unwrap().to_string();
    let right = app.delivered_code(&token).await;
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    for _ in 0..3 {
        app.post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": wrong}),
        )
        .await;
    }
    let with_right = app.sign_in("lin", "correct horse battery").await;
    let with_wrong = app.sign_in("lin", "not the password").await;
    assert_eq!(with_right.status, StatusCode::LOCKED);
    assert_eq!(with_wrong.status, with_right.status);
    assert_eq!(with_wrong.body, with_right.body);
}
