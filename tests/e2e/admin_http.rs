//! Admin user management and self-service over HTTP: every action, its event
//! with actor and reason, the 403s, and the step-up before sensitive changes.

use chrono::Duration;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{enrolled_user, oathtool, settings_on, spawn_app, ClockExt, TestApp};

const PASSWORD: &str = "correct horse battery";

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    token: &str,
    body: Value,
) -> crate::helpers::Reply {
    app.send(
        app.client
            .request(method, format!("{}{path}", app.base))
            .bearer_auth(token)
            .json(&body),
    )
    .await
}

async fn user_id_of(app: &TestApp, name: &str) -> String {
    sqlx::query_scalar("SELECT user_id::text FROM usernames WHERE username = $1")
        .bind(name)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_non_admin_gets_403_on_every_admin_endpoint() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let kim = app
        .create_user(&admin, json!({"username": "kim", "password": PASSWORD}))
        .await;
    let session = app.sign_in("kim", PASSWORD).await.body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let before = app.event_types(&kim).await;
    let reason = json!({"reason": "x"});
    let endpoints = [
        (
            Method::POST,
            "/users".to_string(),
            json!({"username": "z", "password": PASSWORD}),
        ),
        (Method::GET, "/users".to_string(), Value::Null),
        (Method::GET, format!("/users/{kim}"), Value::Null),
        (
            Method::PATCH,
            format!("/users/{kim}"),
            json!({"roles": ["admin"], "reason": "x"}),
        ),
        (
            Method::POST,
            format!("/users/{kim}/reset-enrollment"),
            reason.clone(),
        ),
        (Method::POST, format!("/users/{kim}/unlock"), reason.clone()),
        (
            Method::POST,
            format!("/users/{kim}/revoke-sessions"),
            reason.clone(),
        ),
        (
            Method::POST,
            format!("/users/{kim}/backup-codes"),
            reason.clone(),
        ),
        (Method::GET, format!("/users/{kim}/history"), Value::Null),
        (
            Method::POST,
            "/sessions/revoke-all".to_string(),
            reason.clone(),
        ),
        (Method::GET, "/settings".to_string(), Value::Null),
        (
            Method::PUT,
            "/settings".to_string(),
            json!({"settings": {}}),
        ),
        (Method::GET, "/overview".to_string(), Value::Null),
        (
            Method::GET,
            "/overview/daily?from=2026-01-01&to=2026-01-02".to_string(),
            Value::Null,
        ),
        (Method::GET, "/audit".to_string(), Value::Null),
    ];
    for (method, path, body) in &endpoints {
        let r = call(&app, method.clone(), path, &session, body.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {:?}",
            r.body
        );
        assert_eq!(r.code(), "forbidden", "{method} {path}");
        let anonymous = app
            .send(
                app.client
                    .request(method.clone(), format!("{}{path}", app.base))
                    .json(body),
            )
            .await;
        assert_eq!(
            anonymous.status,
            StatusCode::UNAUTHORIZED,
            "{method} {path}"
        );
    }
    // Nothing was changed by any of them.
    assert_eq!(app.event_types(&kim).await, before);

    // With 2FA on, an admin session that passed no second factor is refused.
    app.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    let stale = app.get_auth("/settings", &admin).await;
    assert_eq!(stale.status, StatusCode::FORBIDDEN);
    assert_eq!(stale.code(), "second_factor_required");
    let fresh = app.admin_token().await;
    assert_eq!(
        app.get_auth("/settings", &fresh).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn admin_actions_are_recorded_with_the_admin_and_the_reason() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let admin_id = user_id_of(&app, &app.admin_username).await;
    let (lee, _, old_codes) = enrolled_user(&app, &admin, "lee").await;
    app.set_settings(&admin, settings_on(&["totp", "email"], "totp"))
        .await;
    let admin = app.admin_token().await;

    // Lee's open session (started before 2FA) and a lockout from wrong codes.
    let lee_session = {
        let c = app.sign_in("lee", PASSWORD).await;
        let token = c.body["challenge"]["token"].as_str().unwrap();
        let ok = app
            .post(
                "/challenge/verify",
                json!({"challenge_token": token, "backup_code": old_codes[0]}),
            )
            .await;
        ok.body["session"]["token"].as_str().unwrap().to_string()
    };
    let c = app.sign_in("lee", PASSWORD).await;
    for _ in 0..3 {
        app.post(
            "/challenge/verify",
            json!({"challenge_token": c.body["challenge"]["token"], "code": "000000"}),
        )
        .await;
    }
    let detail = app.get_auth(&format!("/users/{lee}"), &admin).await;
    assert_eq!(detail.body["locked"], true);
    assert_eq!(
        app.post("/sessions/introspect", json!({"token": lee_session}))
            .await
            .body["active"],
        false,
        "a lockout ends the sessions"
    );

    // A reason is required.
    let no_reason = call(
        &app,
        Method::POST,
        &format!("/users/{lee}/unlock"),
        &admin,
        json!({}),
    )
    .await;
    assert_eq!(no_reason.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(no_reason.code(), "reason_required");
    let unlocked = call(
        &app,
        Method::POST,
        &format!("/users/{lee}/unlock"),
        &admin,
        json!({"reason": "ticket 7"}),
    )
    .await;
    assert_eq!(
        unlocked.status,
        StatusCode::NO_CONTENT,
        "{:?}",
        unlocked.body
    );
    let event = &app.events_of(&lee, "UserUnlocked").await[0];
    assert_eq!(
        event["ctx"]["actor"],
        json!({"kind": "admin", "id": admin_id})
    );
    assert_eq!(event["ctx"]["reason"], "ticket 7");
    assert_eq!(
        app.sign_in("lee", PASSWORD).await.body["status"],
        "challenge"
    );

    // New backup codes for Lee: the old ones stop working.
    let regenerated = call(
        &app,
        Method::POST,
        &format!("/users/{lee}/backup-codes"),
        &admin,
        json!({"reason": "lost paper"}),
    )
    .await;
    let codes = regenerated.body["backup_codes"].as_array().unwrap().clone();
    assert_eq!(codes.len(), 8);
    let c = app.sign_in("lee", PASSWORD).await;
    let old = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": c.body["challenge"]["token"], "backup_code": old_codes[1]}),
        )
        .await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    let new = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": c.body["challenge"]["token"], "backup_code": codes[0]}),
        )
        .await;
    assert_eq!(new.status, StatusCode::OK);
    let session = new.body["session"]["token"].as_str().unwrap().to_string();

    // A new phone is a factor change: sessions and remembered devices end.
    // Without a reason nothing changes.
    let before = app.event_types(&lee).await;
    let refused = call(
        &app,
        Method::PATCH,
        &format!("/users/{lee}"),
        &admin,
        json!({"phone": "+4915112345678"}),
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.code(), "reason_required");
    assert_eq!(app.event_types(&lee).await, before);
    let patched = call(
        &app,
        Method::PATCH,
        &format!("/users/{lee}"),
        &admin,
        json!({"phone": "+4915112345678", "roles": ["staff"], "reason": "new phone"}),
    )
    .await;
    assert_eq!(patched.status, StatusCode::NO_CONTENT, "{:?}", patched.body);
    let revoked = &app.events_of(&lee, "SessionsRevoked").await[0];
    assert_eq!(revoked["devices_forgotten"], true);
    assert_eq!(
        app.post("/sessions/introspect", json!({"token": session}))
            .await
            .body["active"],
        false
    );
    let updated = &app.events_of(&lee, "UserUpdated").await[0];
    assert_eq!(updated["roles"], json!(["staff"]));

    // Reset: Lee enrolls again; an admin cannot reset themself.
    let reset = call(
        &app,
        Method::POST,
        &format!("/users/{lee}/reset-enrollment"),
        &admin,
        json!({"reason": "lost phone"}),
    )
    .await;
    assert_eq!(reset.status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get_auth(&format!("/users/{lee}"), &admin).await.body["two_factor"],
        "not_started"
    );
    assert_eq!(
        app.events_of(&lee, "EnrollmentReset").await[0]["ctx"]["reason"],
        "lost phone"
    );
    let own = call(
        &app,
        Method::POST,
        &format!("/users/{admin_id}/reset-enrollment"),
        &admin,
        json!({"reason": "x"}),
    )
    .await;
    assert_eq!(own.status, StatusCode::FORBIDDEN);
    assert_eq!(own.code(), "cannot_change_own_factor");

    // Revoking: one user's sessions, then the whole tenant's.
    let s = app.sign_in("lee", PASSWORD).await; // email now (no authenticator)
    let token = s.body["challenge"]["token"].as_str().unwrap().to_string();
    let code = app.delivered_code(&token).await;
    let lee_session = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await
        .body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = call(
        &app,
        Method::POST,
        &format!("/users/{lee}/revoke-sessions"),
        &admin,
        json!({"reason": "suspicious"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.post("/sessions/introspect", json!({"token": lee_session}))
            .await
            .body["active"],
        false
    );
    let all = call(
        &app,
        Method::POST,
        "/sessions/revoke-all",
        &admin,
        json!({"reason": "incident 12"}),
    )
    .await;
    assert_eq!(all.status, StatusCode::OK, "{:?}", all.body);
    assert_eq!(
        app.post("/sessions/introspect", json!({"token": admin}))
            .await
            .body["active"],
        false
    );
}

#[tokio::test]
async fn sensitive_self_service_asks_for_a_current_factor_first() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (mia, secret, _) = enrolled_user(&app, &admin, "mia").await;
    app.set_settings(&admin, json!({"enabled": true, "enforcement": "every_login",
        "allowed_methods": ["totp", "email"], "default_method": "totp", "scope": {"kind": "voluntary"}})).await;
    let session = app.sign_in("mia", PASSWORD).await.body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();

    // Opting in is free; everything sensitive needs a step-up.
    let opted = app
        .post_auth("/me/two-factor", &session, json!({"enabled": true}))
        .await;
    assert_eq!(opted.status, StatusCode::NO_CONTENT);
    for (method, path, body) in [
        (Method::POST, "/me/backup-codes", json!({})),
        (Method::PATCH, "/me", json!({"email": "mia2@acme.test"})),
        (Method::DELETE, "/me/totp", Value::Null),
        (Method::POST, "/me/two-factor", json!({"enabled": false})),
    ] {
        let r = call(&app, method.clone(), path, &session, body).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {:?}",
            r.body
        );
        assert_eq!(r.code(), "step_up_required", "{method} {path}");
    }

    // Step up with the authenticator.
    let step = app.post_auth("/me/step-up", &session, json!({})).await;
    assert_eq!(step.body["challenge"]["method"], "totp");
    let done = app
        .post("/challenge/verify", json!({"challenge_token": step.body["challenge"]["token"], "code": oathtool(&secret, app.clock.now_for_tests())}))
        .await;
    assert_eq!(done.body, json!({"status": "stepped_up"}));
    let codes = app.post_auth("/me/backup-codes", &session, json!({})).await;
    assert_eq!(codes.body["backup_codes"].as_array().unwrap().len(), 8);
    assert_eq!(
        app.get_auth("/me", &session).await.body["backup_codes_left"],
        8
    );
    let off = app
        .post_auth("/me/two-factor", &session, json!({"enabled": false}))
        .await;
    assert_eq!(off.status, StatusCode::NO_CONTENT);

    // Ten minutes later the step-up has lapsed.
    app.clock.advance(Duration::minutes(11));
    let lapsed = call(&app, Method::DELETE, "/me/totp", &session, Value::Null).await;
    assert_eq!(lapsed.code(), "step_up_required");

    // Step up again (an email code works too) and remove the authenticator:
    // every session ends, this one included.
    let step = app.post_auth("/me/step-up", &session, json!({})).await;
    let token = step.body["challenge"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    app.post(
        "/challenge/switch",
        json!({"challenge_token": token, "method": "email"}),
    )
    .await;
    let code = app.delivered_code(&token).await;
    let done = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    assert_eq!(done.body["status"], "stepped_up");
    let removed = call(&app, Method::DELETE, "/me/totp", &session, Value::Null).await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT, "{:?}", removed.body);
    assert_eq!(app.events_of(&mia, "AuthenticatorRemoved").await.len(), 1);
    assert_eq!(
        app.post("/sessions/introspect", json!({"token": session}))
            .await
            .body["active"],
        false
    );
    let again = app.sign_in("mia", PASSWORD).await.body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        app.get_auth("/me", &again).await.body["two_factor"],
        "not_started"
    );
}

#[tokio::test]
async fn a_reset_enrollment_also_ends_a_lockout_and_says_so() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (noa, secret, _) = enrolled_user(&app, &admin, "noa").await;
    app.set_settings(&admin, settings_on(&["totp", "email"], "totp"))
        .await;
    let admin = app.admin_token().await;
    let c = app.sign_in("noa", PASSWORD).await;
    let wrong = if oathtool(&secret, app.clock.now_for_tests()) == "000000" {
        "111111"
    } else {
        "000000"
    };
    for _ in 0..3 {
        app.post(
            "/challenge/verify",
            json!({"challenge_token": c.body["challenge"]["token"], "code": wrong}),
        )
        .await;
    }
    assert_eq!(app.sign_in("noa", PASSWORD).await.code(), "account_locked");
    let reset = call(
        &app,
        Method::POST,
        &format!("/users/{noa}/reset-enrollment"),
        &admin,
        json!({"reason": "lost phone, locked"}),
    )
    .await;
    assert_eq!(reset.status, StatusCode::NO_CONTENT, "{:?}", reset.body);
    let types = app.event_types(&noa).await;
    let at = types.iter().rposition(|t| t == "EnrollmentReset").unwrap();
    assert_eq!(types[at + 1], "UserUnlocked");
    let detail = app.get_auth(&format!("/users/{noa}"), &admin).await;
    assert_eq!(detail.body["locked"], false);
    assert_eq!(detail.body["two_factor"], "not_started");
    // Noa starts over: the password opens the challenge again (by email).
    let again = app.sign_in("noa", PASSWORD).await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
}

#[tokio::test]
async fn an_admin_without_a_second_factor_in_session_is_offered_a_step_up() {
    let app = spawn_app().await;
    let before = app.admin_token().await; // 2FA off: password only
    let on = app
        .set_settings(&before, settings_on(&["email"], "email"))
        .await;
    assert_eq!(on.status, StatusCode::OK, "{:?}", on.body);
    let refused = app.get_auth("/overview", &before).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.code(), "second_factor_required");
    assert_eq!(refused.body["error"]["step_up"], "/me/step-up");
    // The same session confirms an email code and may act again.
    let step_up = app.post_auth("/me/step-up", &before, json!({})).await;
    assert_eq!(step_up.status, StatusCode::OK, "{:?}", step_up.body);
    let token = step_up.body["challenge"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let code = app.delivered_code(&token).await;
    let verified = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    assert_eq!(verified.body["status"], "stepped_up", "{:?}", verified.body);
    assert_eq!(
        app.get_auth("/overview", &before).await.status,
        StatusCode::OK
    );
    // For the step-up's window only.
    app.clock.advance(Duration::minutes(11));
    assert_eq!(
        app.get_auth("/overview", &before).await.code(),
        "second_factor_required"
    );
}

#[tokio::test]
async fn login_as_is_off_by_default_needs_a_step_up_and_marks_every_event() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let ola = app
        .create_user(
            &admin,
            json!({"username": "ola", "password": PASSWORD, "email": "ola@acme.test"}),
        )
        .await;
    let login_as = |token: String| {
        let app = &app;
        let ola = ola.clone();
        async move {
            call(
                app,
                Method::POST,
                &format!("/users/{ola}/login-as"),
                &token,
                json!({"reason": "checking what ola sees"}),
            )
            .await
        }
    };
    // Off by default.
    let mut settings = settings_on(&["email"], "email");
    let off = login_as(admin.clone()).await;
    assert_eq!(off.status, StatusCode::FORBIDDEN);
    settings["allow_login_as"] = json!(true);
    app.set_settings(&admin, settings).await;
    let admin = app.admin_token().await;
    // On, but this admin session has not just confirmed a factor.
    let no_step_up = login_as(admin.clone()).await;
    assert_eq!(no_step_up.code(), "step_up_required");
    let step_up = app.post_auth("/me/step-up", &admin, json!({})).await;
    let token = step_up.body["challenge"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let code = app.delivered_code(&token).await;
    let stepped = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    assert_eq!(stepped.body["status"], "stepped_up", "{:?}", stepped.body);

    let opened = login_as(admin.clone()).await;
    assert_eq!(opened.status, StatusCode::OK, "{:?}", opened.body);
    let as_ola = opened.body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let seen = app
        .post("/sessions/introspect", json!({"token": as_ola}))
        .await;
    assert_eq!(seen.body["active"], true);
    assert_eq!(seen.body["username"], "ola");
    let admin_id = opened.body["impersonated_by"].as_str().unwrap().to_string();
    assert_eq!(seen.body["impersonated_by"], admin_id);
    // What happens in that session names the admin.
    let out = app.post_auth("/sign-out", &as_ola, json!({})).await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    let started = app.events_of(&ola, "SessionStarted").await;
    let started = started.last().unwrap();
    assert_eq!(
        started["second_factor"],
        json!({"two_factor": "skipped", "reason": "login_as"})
    );
    assert_eq!(started["ctx"]["actor"]["id"], admin_id);
    assert_eq!(started["ctx"]["reason"], "checking what ola sees");
    let ended = app.events_of(&ola, "SessionEnded").await;
    assert_eq!(ended.last().unwrap()["ctx"]["impersonated_by"], admin_id);
}

#[tokio::test]
async fn a_one_time_password_must_be_changed_first_and_an_admin_reset_hands_one_out() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let uli = app
        .create_user(
            &admin,
            json!({"username": "uli", "password": PASSWORD, "email": "uli@acme.test"}),
        )
        .await;
    app.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    let admin = app.admin_token().await;
    // Another session of uli's, to see it end.
    let c = app.sign_in("uli", PASSWORD).await;
    let token = c.body["challenge"]["token"].as_str().unwrap().to_string();
    let code = app.delivered_code(&token).await;
    let old_session = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await
        .body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let reset = call(
        &app,
        Method::POST,
        &format!("/users/{uli}/reset-password"),
        &admin,
        json!({"reason": "forgot it"}),
    )
    .await;
    assert_eq!(reset.status, StatusCode::OK, "{:?}", reset.body);
    let one_time = reset.body["one_time_password"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        app.post("/sessions/introspect", json!({"token": old_session}))
            .await
            .body["active"],
        false
    );
    // The old password is gone; the one-time one still asks the second factor.
    assert_eq!(
        app.sign_in("uli", PASSWORD).await.code(),
        "invalid_credentials"
    );
    let c = app.sign_in("uli", &one_time).await;
    assert_eq!(c.body["status"], "challenge", "{:?}", c.body);
    let token = c.body["challenge"]["token"].as_str().unwrap().to_string();
    let code = app.delivered_code(&token).await;
    let signed = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    assert_eq!(signed.body["password_change_required"], true);
    let session = signed.body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    // Nothing else until it is changed.
    let blocked = app.post_auth("/me/step-up", &session, json!({})).await;
    assert_eq!(blocked.code(), "password_change_required");
    let wrong = app
        .post_auth(
            "/me/password",
            &session,
            json!({"current_password": "not it", "new_password": "a brand new password"}),
        )
        .await;
    assert_eq!(wrong.code(), "invalid_credentials");
    // This session passed 2FA at sign-in: that is the change's step-up.
    let changed = app
        .post_auth(
            "/me/password",
            &session,
            json!({"current_password": one_time, "new_password": "a brand new password"}),
        )
        .await;
    assert_eq!(changed.status, StatusCode::NO_CONTENT, "{:?}", changed.body);
    let now_free = app.post_auth("/me/step-up", &session, json!({})).await;
    assert_eq!(now_free.status, StatusCode::OK, "{:?}", now_free.body);
    // A later change, not forced, asks for a fresh step-up.
    let again = app
        .post_auth(
            "/me/password",
            &session,
            json!({"current_password": "a brand new password", "new_password": "yet another password"}),
        )
        .await;
    assert_eq!(again.code(), "step_up_required");
    let events = app.event_types(&uli).await;
    assert!(events.contains(&"PasswordChangeRequired".to_string()));
}
