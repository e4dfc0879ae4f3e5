//! Security notices end to end: events on a user's stream reach the
//! dispatcher through the relay and JetStream, and the user gets a plain
//! email about each, once, recorded as delivery events.

use reqwest::StatusCode;
use serde_json::json;
use twofold_dispatcher::notice::NoticeKind;
use twofold_dispatcher::Outcome;

use crate::delivery::{run_until, stack, Smtp};

fn notices(outcomes: &[Outcome]) -> Vec<NoticeKind> {
    outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::NoticeSent { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_user_is_told_by_email_of_each_change_to_their_account() {
    let smtp = Smtp::start().await;
    let s = stack(smtp.port, "http://127.0.0.1:9").await;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login"}),
        "nia",
        false,
    )
    .await;
    let nia: String =
        sqlx::query_scalar("SELECT user_id::text FROM usernames WHERE username = 'nia'")
            .fetch_one(&s.app.pool)
            .await
            .unwrap();
    let admin = s.app.admin_token().await;
    let reason = json!({"reason": "help desk #7"});
    // Locked by three wrong codes, unlocked and given new recovery codes and
    // a one-time password by an admin.
    let token = s.challenge("nia").await;
    for _ in 0..3 {
        s.verify(&token, "000000").await;
    }
    for action in ["unlock", "backup-codes", "reset-password"] {
        let r = s
            .app
            .post_auth(&format!("/users/{nia}/{action}"), &admin, reason.clone())
            .await;
        assert!(r.status.is_success(), "{action}: {:?}", r.body);
    }
    let d = s.dispatcher().await;
    // (The admin is told of their own changes too: a new password, a phone.)
    let outcomes = run_until(&d, |_| smtp.mails_to("nia@acme.test").len() >= 4).await;
    assert_eq!(notices(&outcomes).len(), 6, "{outcomes:?}");
    let mails = smtp.mails_to("nia@acme.test");
    assert_eq!(mails.len(), 4, "{mails:?}");
    let subject = |s: &str| mails.iter().filter(|m| m.contains(s)).count();
    assert_eq!(
        subject("Subject: Acme: your account was locked"),
        1,
        "{mails:?}"
    );
    assert_eq!(subject("Subject: Acme: your account was unlocked"), 1);
    assert_eq!(subject("Subject: Acme: new recovery codes were made"), 1);
    assert_eq!(subject("Subject: Acme: your password was reset"), 1);
    assert!(mails.iter().any(|m| m.contains("by an administrator")));
    // No code, password or recovery code is in any notice.
    let codes = s
        .app
        .post_auth(
            &format!("/users/{nia}/backup-codes"),
            &admin,
            reason.clone(),
        )
        .await;
    let outcomes = run_until(&d, |o| !notices(o).is_empty()).await;
    assert_eq!(notices(&outcomes), [NoticeKind::RecoveryCodesRegenerated]);
    let text = smtp.mails().join("\n");
    for code in codes.body["backup_codes"].as_array().unwrap() {
        assert!(!text.contains(code.as_str().unwrap()));
    }
    // Each is recorded once, as delivery events of its own stream; a
    // redelivered event sends nothing more.
    assert_eq!(s.delivery_events("NoticeSent").await.len(), 7);
    let claimed = s.delivery_events("NoticeClaimed").await;
    assert_eq!(
        claimed
            .iter()
            .filter(|c| c["user_id"] == nia.as_str())
            .count(),
        5
    );
    let after = d
        .process_next(10, std::time::Duration::from_millis(300))
        .await
        .unwrap();
    assert!(notices(&after).is_empty(), "{after:?}");
    // The user's own history shows them.
    twofold_projections::rebuild::rebuild(&s.app.pool, &s.app.state.personal, |_| {})
        .await
        .unwrap();
    let history = s
        .app
        .get_auth(&format!("/users/{nia}/history"), &admin)
        .await;
    assert_eq!(history.status, StatusCode::OK, "{:?}", history.body);
    assert!(
        history.body.to_string().contains("NoticeSent"),
        "{:?}",
        history.body
    );
}

/// An admin sends a reset link instead of a one-time password: it goes by
/// email, works once and for an hour, ends every session, and the next
/// sign-in still asks the second factor. The link is in no event.
#[tokio::test]
async fn a_password_reset_link_by_email_works_once_and_never_skips_the_second_factor() {
    let smtp = Smtp::start().await;
    let s = stack(smtp.port, "http://127.0.0.1:9").await;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login"}),
        "ora",
        false,
    )
    .await;
    let ora: String =
        sqlx::query_scalar("SELECT user_id::text FROM usernames WHERE username = 'ora'")
            .fetch_one(&s.app.pool)
            .await
            .unwrap();
    let token = s.challenge("ora").await;
    let code = s.app.delivered_code(&token).await;
    let signed_in = s
        .app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    let session = signed_in.body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let admin = s.app.admin_token().await;
    let path = format!("/users/{ora}/reset-password");
    let sent = s
        .app
        .post_auth(&path, &admin, json!({"reason": "lost it", "via": "email"}))
        .await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{:?}", sent.body);
    assert_eq!(sent.body["status"], "link_sent");
    let d = s.dispatcher().await;
    let reset_mail = |smtp: &Smtp| {
        smtp.mails_to("ora@acme.test")
            .into_iter()
            .find(|m| m.contains("choose a new password"))
    };
    run_until(&d, |_| reset_mail(&smtp).is_some()).await;
    let mail = reset_mail(&smtp).unwrap();
    // Quoted-printable mail bodies may wrap long lines.
    let mail = mail
        .replace("=\r\n", "")
        .replace("=\n", "")
        .replace("=3D", "=");
    let at = mail.find("reset?token=").expect("a link") + "reset?token=".len();
    let link_token: String = mail[at..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || *c == '-' || *c == '.')
        .collect();
    assert!(!s.app.all_event_text().await.contains(&link_token));
    // The page the link opens.
    let page = reqwest::get(format!("{}/reset?token={link_token}", s.app.pages()))
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("Choose a new password"));
    // A new password through it, once.
    let body = json!({"token": link_token, "new_password": "a brand new password"});
    let reset = s.app.post("/password/reset", body.clone()).await;
    assert_eq!(reset.status, StatusCode::NO_CONTENT, "{:?}", reset.body);
    let again = s.app.post("/password/reset", body).await;
    assert_eq!(again.status, StatusCode::GONE);
    assert_eq!(again.code(), "reset_link_invalid");
    let forged = s
        .app
        .post(
            "/password/reset",
            json!({"token": format!("{ora}.{}.00", uuid::Uuid::new_v4()), "new_password": "whatever it is"}),
        )
        .await;
    assert_eq!(forged.code(), "reset_link_invalid");
    // Every session ended; the new password signs in to a second factor.
    let seen = s
        .app
        .post("/sessions/introspect", json!({"token": session}))
        .await;
    assert_eq!(seen.body["active"], false);
    let next = s.app.sign_in("ora", "a brand new password").await;
    assert_eq!(next.body["status"], "challenge", "{:?}", next.body);
    // A link past its hour does nothing.
    s.app
        .post_auth(&path, &admin, json!({"reason": "again", "via": "email"}))
        .await;
    run_until(&d, |_| {
        smtp.mails_to("ora@acme.test")
            .iter()
            .filter(|m| m.contains("choose a new password"))
            .count()
            == 2
    })
    .await;
    let mail = smtp
        .mails_to("ora@acme.test")
        .into_iter()
        .filter(|m| m.contains("choose a new password"))
        .map(|m| {
            m.replace("=\r\n", "")
                .replace("=\n", "")
                .replace("=3D", "=")
        })
        .find(|m| !m.contains(&link_token))
        .unwrap();
    let at = mail.find("reset?token=").unwrap() + "reset?token=".len();
    let late: String = mail[at..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || *c == '-' || *c == '.')
        .collect();
    s.app.clock.advance(chrono::Duration::hours(2));
    let expired = s
        .app
        .post(
            "/password/reset",
            json!({"token": late, "new_password": "yet another password"}),
        )
        .await;
    assert_eq!(expired.code(), "reset_link_invalid");
}
