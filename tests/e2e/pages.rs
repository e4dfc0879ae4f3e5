//! The end user's pages in a real browser: enrollment required at sign-in
//! (the QR code read off the page by a real reader, codes from a real TOTP
//! client), recovery codes, the account page, signing in with an
//! authenticator code and with a recovery code; and the pages' defences.

use chrono::Duration;
use fantoccini::Locator;
use reqwest::StatusCode;
use serde_json::json;

use crate::browser::Browser;
use crate::helpers::{oathtool, spawn_app, zbarimg, ClockExt, TestApp};

const PASSWORD: &str = "correct horse battery";

async fn sign_in(b: &Browser, app: &TestApp, username: &str) {
    b.goto(&format!("{}/sign-in", app.pages())).await;
    b.fill("#username", username).await;
    b.fill("#password", PASSWORD).await;
    b.submit("main button[type=submit]").await;
}

#[tokio::test]
async fn a_user_enrolls_at_sign_in_then_signs_in_with_totp_and_with_a_recovery_code() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    app.create_user(
        &admin,
        json!({"username": "dora", "password": PASSWORD, "email": "dora@acme.test"}),
    )
    .await;
    let changed = app
        .set_settings(
            &admin,
            json!({"enabled": true, "enforcement": "every_login", "allowed_methods": ["totp"],
                   "default_method": "totp", "enrollment": "required"}),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);

    let mut b = Browser::start("user-enrollment").await;
    // The API reference, whose long paths once widened the page on phones.
    let root = app.base.split("/v1/").next().unwrap().to_string();
    b.goto(&format!("{root}/api")).await;
    b.shot("api").await;
    b.goto(&format!("{}/sign-in", app.pages())).await;
    b.shot("sign-in").await;
    sign_in(&b, &app, "dora").await;
    assert!(b.url().await.ends_with("/enroll"), "{}", b.url().await);
    b.shot("enroll").await;

    // The QR code as the browser shows it, read by a real reader.
    let png = b.find("img#qr").await.screenshot().await.unwrap();
    let uri = zbarimg(&png);
    assert!(uri.starts_with("otpauth://totp/Acme:dora?"), "{uri}");
    let secret = uri
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("secret="))
        .unwrap()
        .to_string();
    assert_eq!(b.find("#secret").await.text().await.unwrap(), secret);
    b.fill("#code", &oathtool(&secret, app.clock.now_for_tests()))
        .await;
    b.submit("main form button[type=submit]").await;

    let codes: Vec<String> = {
        let items = b
            .client
            .find_all(Locator::Css("#recovery-codes li"))
            .await
            .unwrap();
        let mut out = Vec::new();
        for item in items {
            out.push(item.text().await.unwrap());
        }
        out
    };
    assert_eq!(codes.len(), 8, "{}", b.text().await);
    let download = b
        .find("a[download]")
        .await
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    assert!(download.starts_with("data:text/plain;base64,"));
    b.shot("recovery-codes").await;
    b.click_text("I saved them").await;
    assert!(b.url().await.ends_with("/account"), "{}", b.url().await);
    let account = b.text().await;
    assert!(account.contains("Active"), "{account}");
    assert!(account.contains("8 of 8 unused"), "{account}");
    b.shot("account").await;
    b.click_text("Sign out").await;
    assert!(b.text().await.contains("You are signed out"));

    // With the authenticator: a wrong code first, then the right one.
    app.clock.advance(Duration::seconds(30));
    sign_in(&b, &app, "dora").await;
    assert!(b.url().await.ends_with("/challenge"), "{}", b.url().await);
    b.fill("#code", "000000").await;
    b.submit("main form button[type=submit]").await;
    let refused = b.text().await;
    assert!(refused.contains("wrong"), "{refused}");
    assert!(refused.contains("2 attempts left"), "{refused}");
    b.shot("challenge-wrong-code").await;
    b.fill("#code", &oathtool(&secret, app.clock.now_for_tests()))
        .await;
    b.submit("main form button[type=submit]").await;
    assert!(b.url().await.ends_with("/account"), "{}", b.url().await);
    b.click_text("Sign out").await;

    // With a recovery code.
    app.clock.advance(Duration::seconds(30));
    sign_in(&b, &app, "dora").await;
    b.click_text("Use a recovery code instead").await;
    b.shot("challenge-recovery-code").await;
    b.fill("#backup_code", &codes[0]).await;
    b.submit("main form button[type=submit]").await;
    assert!(b.url().await.ends_with("/account"), "{}", b.url().await);
    assert!(b.text().await.contains("7 of 8 unused"));
    b.stop().await;
}

/// A form posted without the browser's anti-forgery token, or with another
/// browser's, is refused and changes nothing; pages carry a strict CSP and
/// refuse framing.
#[tokio::test]
async fn forms_without_the_browsers_token_are_refused() {
    let app = spawn_app().await;
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = client
        .get(format!("{}/sign-in", app.pages()))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let html = page.text().await.unwrap();
    let token = html
        .split("name=\"form_token\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    let form = |token: &str| {
        vec![
            ("form_token".to_string(), token.to_string()),
            ("username".to_string(), app.admin_username.clone()),
            ("password".to_string(), app.admin_password.clone()),
        ]
    };
    // No token, a made-up token, and a stranger (no cookie) with a real token.
    for (who, fields) in [(&client, form("")), (&client, form(&"0".repeat(64)))] {
        let refused = who
            .post(format!("{}/sign-in", app.pages()))
            .form(&fields)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(refused.text().await.unwrap().contains("form_expired"));
    }
    let stranger = reqwest::Client::new()
        .post(format!("{}/sign-in", app.pages()))
        .form(&form(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(stranger.status(), StatusCode::FORBIDDEN);
    let sessions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'SessionStarted'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    // Only the one spawn_app opened to change the one-time password.
    assert_eq!(sessions, 1);
    // With its own cookie and token, the same browser signs in.
    let accepted = client
        .post(format!("{}/sign-in", app.pages()))
        .form(&form(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(
        accepted.status(),
        StatusCode::SEE_OTHER,
        "{:?}",
        accepted.text().await
    );
    let cookie = accepted
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("twofold_session="))
        .unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
}
