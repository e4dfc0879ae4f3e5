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
    twofold_projections::rebuild::rebuild(&s.app.pool, |_| {})
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
