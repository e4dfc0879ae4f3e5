//! Tenant policy on real sign-ins over HTTP: enforcement modes with a
//! remembered device and a known IP, trusted proxies, lockout at each limit,
//! the resend limit, fallback, required enrollment and each scope.

use chrono::Duration;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{
    oathtool, settings_on, spawn_app, spawn_app_with, spawn_app_with_sms, ClockExt, TestApp,
};

const PASSWORD: &str = "correct horse battery";

async fn user(app: &TestApp, admin: &str, name: &str, extra: Value) -> String {
    let mut body =
        json!({"username": name, "password": PASSWORD, "email": format!("{name}@acme.test")});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    app.create_user(admin, body).await
}

/// Signs in and answers the email challenge; returns the whole answer.
async fn sign_in_with_email(app: &TestApp, name: &str, device: Option<&str>) -> Value {
    let mut body = json!({"username": name, "password": PASSWORD});
    if let Some(d) = device {
        body["device_token"] = json!(d);
    }
    let reply = app.post("/sign-in", body).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    if reply.body["status"] != "challenge" {
        return reply.body;
    }
    let token = reply.body["challenge"]["token"].as_str().unwrap();
    let code = app.delivered_code(token).await;
    let verified = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    assert_eq!(verified.status, StatusCode::OK, "{:?}", verified.body);
    verified.body
}

#[tokio::test]
async fn unrecognized_devices_mode_skips_a_remembered_device_and_says_so() {
    // Behind a trusted proxy, so each sign-in can come from its own address.
    let app = spawn_app_with(|c| c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()]).await;
    let admin = app.admin_token().await;
    let ann = user(&app, &admin, "ann", json!({})).await;
    user(&app, &admin, "bob", json!({})).await;
    app.set_settings(
        &admin,
        json!({"enabled": true, "enforcement": "unrecognized_devices"}),
    )
    .await;
    // The admin's session predates 2FA: admin calls need a fresh one.
    let admin = app.admin_token().await;
    let from = |ip: &str, body: Value| {
        app.send(
            app.client
                .post(format!("{}/sign-in", app.base))
                .header("x-forwarded-for", ip)
                .json(&body),
        )
    };

    // First sign-in from 198.51.100.1: challenged; completing it remembers the device.
    let first = from(
        "198.51.100.1",
        json!({"username": "ann", "password": PASSWORD}),
    )
    .await;
    assert_eq!(first.body["status"], "challenge");
    let token = first.body["challenge"]["token"].as_str().unwrap();
    let code = app.delivered_code(token).await;
    let response = app
        .client
        .post(format!("{}/challenge/verify", app.base))
        .header("x-forwarded-for", "198.51.100.1")
        .json(&json!({"challenge_token": token, "code": code}))
        .send()
        .await
        .unwrap();
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(cookie.starts_with("twofold_device=tfd_"), "{cookie}");
    for attribute in ["HttpOnly", "Secure", "SameSite=Lax"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let body: Value = response.json().await.unwrap();
    let device = body["device_token"].as_str().unwrap().to_string();

    // From another address: the device token (JSON, or the cookie) skips 2FA.
    let skipped = from(
        "203.0.113.9",
        json!({"username": "ann", "password": PASSWORD, "device_token": device}),
    )
    .await;
    assert_eq!(
        skipped.body["second_factor"]["skipped_because"],
        "known_device"
    );
    let cookie_value = cookie.split(';').next().unwrap().to_string();
    let by_cookie = app
        .send(
            app.client
                .post(format!("{}/sign-in", app.base))
                .header("x-forwarded-for", "203.0.113.10")
                .header("cookie", cookie_value)
                .json(&json!({"username": "ann", "password": PASSWORD})),
        )
        .await;
    assert_eq!(
        by_cookie.body["second_factor"]["skipped_because"],
        "known_device"
    );

    // Ann's device token does nothing for Bob, nor does a made-up one for Ann.
    let other = from(
        "203.0.113.11",
        json!({"username": "bob", "password": PASSWORD, "device_token": device}),
    )
    .await;
    assert_eq!(other.body["status"], "challenge");
    let forged = from(
        "203.0.113.12",
        json!({"username": "ann", "password": PASSWORD, "device_token": "tfd_forged"}),
    )
    .await;
    assert_eq!(forged.body["status"], "challenge");

    // From the address of the 2FA sign-in, without a device token: asked,
    // unless the tenant trusts known addresses (off by default).
    let not_trusted = from(
        "198.51.100.1",
        json!({"username": "ann", "password": PASSWORD}),
    )
    .await;
    assert_eq!(not_trusted.body["status"], "challenge");
    app.set_settings(&admin, json!({"trust_known_ips": true}))
        .await;
    let known_ip = from(
        "198.51.100.1",
        json!({"username": "ann", "password": PASSWORD}),
    )
    .await;
    assert_eq!(
        known_ip.body["second_factor"]["skipped_because"],
        "known_ip"
    );
    let skips: Vec<Value> = app.events_of(&ann, "SecondFactorSkipped").await;
    let reasons: Vec<&str> = skips
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["known_device", "known_device", "known_ip"]);
    // The events record the client's address, not the proxy's.
    let issued = app.events_of(&ann, "ChallengeIssued").await;
    assert_eq!(issued[0]["ctx"]["ip"], "198.51.100.1");

    // The admin sees the remembered device and forgets it, with a reason:
    // its next sign-in is asked for a second factor again.
    app.set_settings(&admin, json!({"trust_known_ips": false}))
        .await;
    let detail = app.get_auth(&format!("/users/{ann}"), &admin).await;
    let devices = detail.body["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 1, "{:?}", detail.body);
    let device_id = devices[0]["device_id"].as_str().unwrap();
    let path = format!("/users/{ann}/devices/{device_id}/forget");
    let no_reason = app.post_auth(&path, &admin, json!({})).await;
    assert_eq!(no_reason.status, StatusCode::UNPROCESSABLE_ENTITY);
    let forgot = app
        .post_auth(&path, &admin, json!({"reason": "laptop stolen"}))
        .await;
    assert_eq!(forgot.status, StatusCode::NO_CONTENT, "{:?}", forgot.body);
    let again = app
        .post_auth(&path, &admin, json!({"reason": "again"}))
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    let forgotten = app.events_of(&ann, "DeviceForgotten").await;
    assert_eq!(forgotten[0]["ctx"]["reason"], "laptop stolen");
    let asked = from(
        "203.0.113.13",
        json!({"username": "ann", "password": PASSWORD, "device_token": device}),
    )
    .await;
    assert_eq!(asked.body["status"], "challenge");
    app.set_settings(&admin, json!({"trust_known_ips": true}))
        .await;

    // Every login: the same device is challenged.
    app.set_settings(&admin, json!({"enforcement": "every_login"}))
        .await;
    let admin = app.admin_token().await;
    let _ = admin;
    let every = from(
        "198.51.100.1",
        json!({"username": "ann", "password": PASSWORD, "device_token": device}),
    )
    .await;
    assert_eq!(every.body["status"], "challenge");
}

#[tokio::test]
async fn forwarded_for_is_ignored_from_an_untrusted_peer() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let cy = user(&app, &admin, "cy", json!({})).await;
    app.send(
        app.client
            .post(format!("{}/sign-in", app.base))
            .header("x-forwarded-for", "203.0.113.7")
            .json(&json!({"username": "cy", "password": PASSWORD})),
    )
    .await;
    let started = app.events_of(&cy, "SessionStarted").await;
    assert_eq!(started[0]["ctx"]["ip"], "127.0.0.1");
}

#[tokio::test]
async fn lockout_comes_at_each_configured_limit() {
    for (limit, setting) in [(3usize, "3"), (5, "5"), (10, "10")] {
        let app = spawn_app().await;
        let admin = app.admin_token().await;
        let id = user(&app, &admin, "dee", json!({})).await;
        app.set_settings(
            &admin,
            json!({"enabled": true, "enforcement": "every_login", "max_invalid_attempts": setting}),
        )
        .await;
        let reply = app.sign_in("dee", PASSWORD).await;
        let token = reply.body["challenge"]["token"]
            .as_str()
            .unwrap()
            .to_string();
        let right = app.delivered_code(&token).await;
        let wrong = if right == "000000" {
            "111111"
        } else {
            "000000"
        };
        let mut statuses = Vec::new();
        for _ in 0..limit + 1 {
            let r = app
                .post(
                    "/challenge/verify",
                    json!({"challenge_token": token, "code": wrong}),
                )
                .await;
            statuses.push(r.status.as_u16());
        }
        let unauthorized = statuses.iter().filter(|s| **s == 401).count();
        assert_eq!(unauthorized, limit - 1, "limit {limit}: {statuses:?}");
        assert_eq!(statuses[limit - 1], 423, "limit {limit}: {statuses:?}");
        assert_eq!(app.events_of(&id, "CodeRejected").await.len(), limit);
    }
}

#[tokio::test]
async fn with_no_limit_guessing_slows_down_instead() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    user(&app, &admin, "eli", json!({})).await;
    app.set_settings(
        &admin,
        json!({"enabled": true, "enforcement": "every_login", "max_invalid_attempts": "unlimited"}),
    )
    .await;
    let reply = app.sign_in("eli", PASSWORD).await;
    let token = reply.body["challenge"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let right = app.delivered_code(&token).await;
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    for _ in 0..5 {
        let r = app
            .post(
                "/challenge/verify",
                json!({"challenge_token": token, "code": wrong}),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let slowed = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": right}),
        )
        .await;
    assert_eq!(slowed.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(slowed.code(), "too_many_attempts");
    assert_eq!(slowed.body["error"]["retry_after_secs"], 1);
    app.clock.advance(Duration::seconds(1));
    let ok = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": right}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
}

#[tokio::test]
async fn the_resend_limit_and_fallback_apply() {
    let app = spawn_app_with_sms().await;
    let admin = app.admin_token().await;
    user(&app, &admin, "fay", json!({"phone": "+4915112345678"})).await;
    app.set_settings(
        &admin,
        json!({"enabled": true, "enforcement": "every_login", "allowed_methods": ["email", "sms"],
               "default_method": "email", "sms_provider": "test-provider", "resend_limit": "3"}),
    )
    .await;
    let reply = app.sign_in("fay", PASSWORD).await;
    assert_eq!(reply.body["challenge"]["methods"], json!(["email", "sms"]));
    assert_eq!(reply.body["challenge"]["resends_remaining"], 3);
    let token = reply.body["challenge"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    for left in [2, 1] {
        let r = app
            .post("/challenge/resend", json!({"challenge_token": token}))
            .await;
        assert_eq!(r.body["resends_remaining"], left);
    }
    // A switch sends a code too: it counts toward the limit.
    let switched = app
        .post(
            "/challenge/switch",
            json!({"challenge_token": token, "method": "sms"}),
        )
        .await;
    assert_eq!(switched.body["method"], "sms");
    assert_eq!(switched.body["resends_remaining"], 0);
    let refused = app
        .post("/challenge/resend", json!({"challenge_token": token}))
        .await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.code(), "resend_limit_reached");
    let refused = app
        .post(
            "/challenge/switch",
            json!({"challenge_token": token, "method": "email"}),
        )
        .await;
    assert_eq!(refused.code(), "resend_limit_reached");
    let code = app.delivered_code(&token).await;
    let ok = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    assert_eq!(ok.body["second_factor"]["method"], "sms");

    // Fallback off: one method, and no switching.
    let admin = app.admin_token().await;
    app.set_settings(&admin, json!({"allow_fallback": false}))
        .await;
    let reply = app.sign_in("fay", PASSWORD).await;
    assert_eq!(reply.body["challenge"]["methods"], json!(["email"]));
    let refused = app
        .post(
            "/challenge/switch",
            json!({"challenge_token": reply.body["challenge"]["token"], "method": "sms"}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(refused.code(), "method_not_available");
}

#[tokio::test]
async fn required_enrollment_enrolls_before_any_session() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let gil = user(&app, &admin, "gil", json!({})).await;
    app.set_settings(
        &admin,
        json!({"enabled": true, "enforcement": "every_login", "allowed_methods": ["totp", "email"],
               "default_method": "totp", "enrollment": "required"}),
    )
    .await;
    let reply = app.sign_in("gil", PASSWORD).await;
    assert_eq!(reply.body["status"], "enrollment_required");
    assert!(reply.body.get("session").is_none());
    let uri = reply.body["enrollment"]["otpauth_uri"].as_str().unwrap();
    assert!(uri.starts_with("otpauth://totp/Acme:gil?"));
    let secret = reply.body["enrollment"]["secret"].as_str().unwrap();
    let token = reply.body["challenge"]["token"].as_str().unwrap();
    // The enrollment challenge is not a sign-in challenge.
    let elsewhere = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": oathtool(secret, app.clock.now_for_tests())}),
        )
        .await;
    assert_eq!(elsewhere.code(), "wrong_challenge_purpose");
    let wrong = app
        .post("/enrollment/complete", json!({"challenge_token": token, "code": oathtool(secret, app.clock.now_for_tests() - Duration::minutes(5))}))
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.body["error"]["attempts_remaining"], 2);
    let done = app
        .post(
            "/enrollment/complete",
            json!({"challenge_token": token, "code": oathtool(secret, app.clock.now_for_tests())}),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{:?}", done.body);
    assert_eq!(done.body["backup_codes"].as_array().unwrap().len(), 8);
    assert_eq!(done.body["second_factor"]["method"], "totp");
    let session = done.body["session"]["token"].as_str().unwrap();
    assert_eq!(
        app.get_auth("/me", session).await.body["two_factor"],
        "enrolled"
    );
    assert_eq!(app.events_of(&gil, "EnrollmentCompleted").await.len(), 1);
    // From now on, an ordinary TOTP challenge.
    app.clock.advance(Duration::seconds(30));
    let next = app.sign_in("gil", PASSWORD).await;
    assert_eq!(next.body["status"], "challenge");
    assert_eq!(next.body["challenge"]["method"], "totp");
}

#[tokio::test]
async fn each_scope_asks_only_its_users() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let fin = user(&app, &admin, "fin", json!({"roles": ["finance"]})).await;
    user(&app, &admin, "sam", json!({"roles": ["staff"]})).await;
    let per = user(&app, &admin, "per", json!({})).await;
    let vol = user(&app, &admin, "vol", json!({})).await;
    let _ = fin;

    // The master toggle off: nobody is asked, and switching a user on is refused.
    let refused = app
        .send(
            app.client
                .patch(format!("{}/users/{per}", app.base))
                .bearer_auth(&admin)
                .json(&json!({"two_factor_switched_on": true, "reason": "pilot"})),
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(refused.code(), "two_factor_unavailable");
    let vol_session = app.sign_in("vol", PASSWORD).await.body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let opt_in = app
        .post_auth("/me/two-factor", &vol_session, json!({"enabled": true}))
        .await;
    assert_eq!(opt_in.code(), "two_factor_unavailable");

    app.set_settings(
        &admin,
        json!({"enabled": true, "enforcement": "every_login",
        "scope": {"kind": "selected_roles", "roles": ["finance"]}}),
    )
    .await;
    let admin = app.admin_token().await;
    assert_eq!(
        app.sign_in("fin", PASSWORD).await.body["status"],
        "challenge"
    );
    let sam = app.sign_in("sam", PASSWORD).await;
    assert_eq!(sam.body["second_factor"]["skipped_because"], "not_required");

    app.set_settings(&admin, json!({"scope": {"kind": "per_user"}}))
        .await;
    let admin = app.admin_token().await;
    assert_eq!(
        app.sign_in("per", PASSWORD).await.body["second_factor"]["skipped_because"],
        "not_required"
    );
    let switched = app
        .send(
            app.client
                .patch(format!("{}/users/{per}", app.base))
                .bearer_auth(&admin)
                .json(&json!({"two_factor_switched_on": true, "reason": "pilot"})),
        )
        .await;
    assert_eq!(
        switched.status,
        StatusCode::NO_CONTENT,
        "{:?}",
        switched.body
    );
    assert_eq!(
        app.sign_in("per", PASSWORD).await.body["status"],
        "challenge"
    );
    let event = &app.events_of(&per, "TwoFactorSwitched").await[0];
    assert_eq!(event["ctx"]["reason"], "pilot");
    assert_eq!(event["ctx"]["actor"]["kind"], "admin");

    app.set_settings(&admin, json!({"scope": {"kind": "voluntary"}}))
        .await;
    let before = sign_in_with_email(&app, "vol", None).await;
    assert_eq!(before["second_factor"]["skipped_because"], "not_required");
    let session = before["session"]["token"].as_str().unwrap();
    let opted = app
        .post_auth("/me/two-factor", session, json!({"enabled": true}))
        .await;
    assert_eq!(opted.status, StatusCode::NO_CONTENT, "{:?}", opted.body);
    assert_eq!(
        app.sign_in("vol", PASSWORD).await.body["status"],
        "challenge"
    );
    assert_eq!(
        app.events_of(&vol, "VoluntaryTwoFactorChanged").await.len(),
        1
    );
}

#[tokio::test]
async fn a_settings_change_applies_from_the_next_sign_in_and_sessions_stay() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    user(&app, &admin, "hal", json!({})).await;
    let session = app.sign_in("hal", PASSWORD).await.body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let changed = app
        .set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_eq!(
        app.sign_in("hal", PASSWORD).await.body["status"],
        "challenge"
    );
    let seen = app
        .post("/sessions/introspect", json!({"token": session}))
        .await;
    assert_eq!(seen.body["active"], true);
}

#[tokio::test]
async fn every_refused_combination_names_its_field() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    for (changes, field) in [
        (json!({"allowed_methods": []}), "allowed_methods"),
        (json!({"default_method": "totp"}), "default_method"),
        (json!({"allowed_methods": ["email", "sms"]}), "sms_provider"),
        (
            json!({"allowed_methods": ["email", "sms"], "sms_provider": "nowhere"}),
            "sms_provider",
        ),
        (json!({"enrollment": "required"}), "enrollment"),
        (
            json!({"session_duration_secs": 60}),
            "session_duration_secs",
        ),
        (
            json!({"scope": {"kind": "selected_roles", "roles": []}}),
            "scope",
        ),
    ] {
        let r = app.set_settings(&admin, changes).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{field}");
        assert_eq!(r.code(), "invalid_settings");
        assert_eq!(r.body["error"]["field"], field);
    }
    let unknown = app
        .set_settings(&admin, json!({"code_timeout": "3m"}))
        .await;
    assert_eq!(unknown.code(), "invalid_body");
    // A reason is required; without one nothing is written.
    let current = app.get_auth("/settings", &admin).await.body;
    for reason in [json!(null), json!(" ")] {
        let r = app
            .put_auth(
                "/settings",
                &admin,
                json!({"settings": current, "reason": reason}),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(r.code(), "reason_required");
    }
    let tenant_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'tenant'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(tenant_events, 1, "only TenantCreated");
}

#[tokio::test]
async fn a_user_and_an_admin_choose_the_method_asked_first() {
    let app = spawn_app_with_sms().await;
    let admin = app.admin_token().await;
    let pia = user(&app, &admin, "pia", json!({"phone": "+4915112345678"})).await;
    let session = app.sign_in("pia", PASSWORD).await.body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    // Only methods pia has set up can be preferred.
    let refused = app
        .post_auth("/me/preferred-method", &session, json!({"method": "totp"}))
        .await;
    assert_eq!(refused.code(), "method_not_available");
    let chosen = app
        .post_auth("/me/preferred-method", &session, json!({"method": "sms"}))
        .await;
    assert_eq!(chosen.status, StatusCode::NO_CONTENT, "{:?}", chosen.body);
    assert_eq!(
        app.get_auth("/me", &session).await.body["preferred_method"],
        "sms"
    );
    app.set_settings(
        &admin,
        json!({"enabled": true, "enforcement": "every_login", "allowed_methods": ["email", "sms"],
               "default_method": "email", "sms_provider": "test-provider"}),
    )
    .await;
    let admin = app.admin_token().await;
    let c = app.sign_in("pia", PASSWORD).await;
    assert_eq!(c.body["challenge"]["method"], "sms", "{:?}", c.body);

    // An admin sets it back to the tenant's default for her, with a reason.
    let patched = app
        .send(
            app.client
                .patch(format!("{}/users/{pia}", app.base))
                .bearer_auth(&admin)
                .json(&json!({"preferred_method": null, "reason": "SMS does not reach her"})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::NO_CONTENT, "{:?}", patched.body);
    let c = app.sign_in("pia", PASSWORD).await;
    assert_eq!(c.body["challenge"]["method"], "email", "{:?}", c.body);
    let set = app.events_of(&pia, "PreferredMethodSet").await;
    assert_eq!(set.len(), 2);
    assert_eq!(set[1]["ctx"]["reason"], "SMS does not reach her");
}

#[tokio::test]
async fn settings_under_which_no_admin_could_sign_in_are_refused() {
    let app = spawn_app_with_sms().await;
    let admin = app.admin_token().await;
    // SMS only: the admin has no phone, and no other admin has one.
    let refused = app
        .set_settings(
            &admin,
            json!({"enabled": true, "enforcement": "every_login", "allowed_methods": ["sms"],
                   "default_method": "sms", "sms_provider": "test-provider"}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{:?}", refused.body);
    assert_eq!(refused.code(), "would_lock_you_out");
    assert!(!app.get_auth("/settings", &admin).await.body["enabled"]
        .as_bool()
        .unwrap());
    // With the authenticator allowed, anyone can set it up at sign-in: fine.
    let allowed = app
        .set_settings(
            &admin,
            json!({"enabled": true, "enforcement": "every_login", "allowed_methods": ["sms", "totp"],
                   "default_method": "sms", "sms_provider": "test-provider"}),
        )
        .await;
    assert_eq!(allowed.status, StatusCode::OK, "{:?}", allowed.body);
}
