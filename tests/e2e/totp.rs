//! Authenticator apps: enrollment by otpauth URI and QR code, activation only
//! after a valid code, codes from a real TOTP client, one use per time step.

use base64::Engine;
use chrono::Duration;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{enrolled_user, oathtool, settings_on, spawn_app, zbarimg, ClockExt, TestApp};

async fn session_of(app: &TestApp, username: &str) -> String {
    let reply = app.sign_in(username, "correct horse battery").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.body["session"]["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn enrollment_gives_an_otpauth_uri_whose_qr_code_a_reader_decodes() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    app.create_user(
        &admin,
        json!({"username": "dora", "password": "correct horse battery"}),
    )
    .await;
    let session = session_of(&app, "dora").await;
    let started = app.post_auth("/me/totp", &session, json!({})).await;
    assert_eq!(started.status, StatusCode::CREATED, "{:?}", started.body);
    let uri = started.body["otpauth_uri"].as_str().unwrap();
    let secret = started.body["secret"].as_str().unwrap();
    assert!(uri.starts_with("otpauth://totp/Acme:dora?secret="), "{uri}");
    assert!(uri.contains(&format!("secret={secret}")));
    assert!(uri.contains("issuer=Acme"));
    // 160 bits or more: 32 base32 characters carry 160 bits.
    assert!(secret.trim_end_matches('=').len() >= 32, "{secret}");

    let png = base64::engine::general_purpose::STANDARD
        .decode(started.body["qr_png_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(zbarimg(&png), uri);
    let response = app
        .client
        .get(format!("{}/me/totp/qr.png", app.base))
        .bearer_auth(&session)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "image/png");
    assert_eq!(zbarimg(&response.bytes().await.unwrap()), uri);

    // Pending until a code confirms it.
    let me = app.get_auth("/me", &session).await;
    assert_eq!(me.body["two_factor"], "pending");
}

#[tokio::test]
async fn a_wrong_confirmation_code_does_not_activate_the_authenticator() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let dora = app
        .create_user(
            &admin,
            json!({"username": "dora", "password": "correct horse battery"}),
        )
        .await;
    let session = session_of(&app, "dora").await;
    let started = app.post_auth("/me/totp", &session, json!({})).await;
    let secret = started.body["secret"].as_str().unwrap();
    // A code from five minutes ago is outside the one-step drift.
    let stale = oathtool(secret, app.clock.now_for_tests() - Duration::minutes(5));
    let reply = app
        .post_auth("/me/totp/confirm", &session, json!({ "code": stale }))
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.code(), "invalid_code");
    let me = app.get_auth("/me", &session).await;
    assert_eq!(me.body["two_factor"], "pending");
    assert_eq!(me.body["backup_codes_left"], 0);
    assert_eq!(
        app.events_of(&dora, "EnrollmentCodeRejected").await.len(),
        1
    );
    assert!(app.events_of(&dora, "EnrollmentCompleted").await.is_empty());
}

#[tokio::test]
async fn a_code_from_oathtool_signs_in_and_the_same_time_step_never_works_twice() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (erin, secret, backup_codes) = enrolled_user(&app, &admin, "erin").await;
    assert_eq!(backup_codes.len(), 8);
    app.set_settings(&admin, settings_on(&["totp", "email"], "totp"))
        .await;

    let first = app.sign_in("erin", "correct horse battery").await;
    assert_eq!(first.body["challenge"]["method"], "totp");
    assert_eq!(first.body["challenge"]["methods"], json!(["totp", "email"]));
    let code = oathtool(&secret, app.clock.now_for_tests());
    let ok = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": first.body["challenge"]["token"], "code": code}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    assert_eq!(ok.body["second_factor"]["method"], "totp");

    // Same step, a new sign-in: the code was used, so it is refused and counted.
    let second = app.sign_in("erin", "correct horse battery").await;
    let replay = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": second.body["challenge"]["token"], "code": code}),
        )
        .await;
    assert_eq!(replay.status, StatusCode::UNAUTHORIZED);
    assert_eq!(replay.body["error"]["attempts_remaining"], 2);
    let rejected = app.events_of(&erin, "CodeRejected").await;
    assert_eq!(rejected[0]["reason"], "reused_time_step");

    // The next step's code works on the same challenge.
    app.clock.advance(Duration::seconds(30));
    let next = oathtool(&secret, app.clock.now_for_tests());
    let ok = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": second.body["challenge"]["token"], "code": next}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
}

#[tokio::test]
async fn one_step_of_clock_drift_is_accepted_and_two_are_not() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (_, secret, _) = enrolled_user(&app, &admin, "finn").await;
    app.set_settings(&admin, settings_on(&["totp"], "totp"))
        .await;
    app.clock.advance(Duration::minutes(10));

    let now = app.clock.now_for_tests();
    // Two refusals stay under the default limit of three.
    for (offset, accepted) in [(-60, false), (30, true), (60, false)] {
        let challenge = app.sign_in("finn", "correct horse battery").await;
        let code = oathtool(&secret, now + Duration::seconds(offset));
        let reply = app
            .post(
                "/challenge/verify",
                json!({"challenge_token": challenge.body["challenge"]["token"], "code": code}),
            )
            .await;
        assert_eq!(
            reply.status == StatusCode::OK,
            accepted,
            "offset {offset}s: {:?}",
            reply.body
        );
    }
}

#[tokio::test]
async fn enrolling_again_once_enrolled_is_refused() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    enrolled_user(&app, &admin, "gus").await;
    let session = session_of(&app, "gus").await;
    let again = app.post_auth("/me/totp", &session, json!({})).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.code(), "already_enrolled");
    let me = app.get_auth("/me", &session).await;
    assert_eq!(me.body["two_factor"], "enrolled");
    assert_eq!(me.body["backup_codes_left"], 8);
}

/// With `replace_backup_codes_on_use`, a used recovery code is replaced at
/// once (still 8), the new one works and the used one does not; and the user
/// can see their codes again after a step-up, the replacement among them.
#[tokio::test]
async fn a_used_recovery_code_is_replaced_and_the_codes_can_be_shown_again() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (_, secret, codes) = enrolled_user(&app, &admin, "rio").await;
    let mut settings = settings_on(&["totp", "email"], "totp");
    settings["replace_backup_codes_on_use"] = json!(true);
    app.set_settings(&admin, settings).await;

    let challenge = app.sign_in("rio", "correct horse battery").await;
    let used = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": challenge.body["challenge"]["token"], "backup_code": codes[2]}),
        )
        .await;
    assert_eq!(used.status, StatusCode::OK, "{:?}", used.body);
    let replacement = used.body["backup_code_replacement"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!codes.contains(&replacement));
    let session = used.body["session"]["token"].as_str().unwrap().to_string();
    assert_eq!(
        app.get_auth("/me", &session).await.body["backup_codes_left"],
        8
    );

    // Shown again only after a step-up.
    let refused = app.get_auth("/me/backup-codes", &session).await;
    assert_eq!(refused.code(), "step_up_required");
    let step_up = app.post_auth("/me/step-up", &session, json!({})).await;
    app.clock.advance(Duration::seconds(30));
    let stepped = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": step_up.body["challenge"]["token"],
                   "code": oathtool(&secret, app.clock.now_for_tests())}),
        )
        .await;
    assert_eq!(stepped.body["status"], "stepped_up", "{:?}", stepped.body);
    let shown = app.get_auth("/me/backup-codes", &session).await;
    assert_eq!(shown.status, StatusCode::OK, "{:?}", shown.body);
    let shown: Vec<String> = shown.body["backup_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["used"], false);
            c["code"].as_str().unwrap().to_string()
        })
        .collect();
    let mut expected = codes.clone();
    expected[2] = replacement.clone();
    assert_eq!(shown, expected);
    // Nothing readable of them is stored.
    assert!(!app
        .all_event_text()
        .await
        .contains(&replacement.replace('-', "")));

    // The replacement works; the used code does not.
    for (code, works) in [(&codes[2], false), (&replacement, true)] {
        let c = app.sign_in("rio", "correct horse battery").await;
        let r = app
            .post(
                "/challenge/verify",
                json!({"challenge_token": c.body["challenge"]["token"], "backup_code": code}),
            )
            .await;
        assert_eq!(r.status == StatusCode::OK, works, "{code}: {:?}", r.body);
    }
}
