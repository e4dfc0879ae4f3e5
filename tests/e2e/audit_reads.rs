//! Reads of users' data are themselves audited: an auditor's (and an
//! admin's) reads of a user's detail and timeline and of audit exports are
//! `AuditRead` events on the reader's own stream, shown in the audit
//! history with who, what, when and from where; the auditor still cannot act.

use reqwest::StatusCode;
use serde_json::{json, Value};
use twofold_platform::Clock;

use crate::helpers::{spawn_app, TestApp};

const PASSWORD: &str = "correct horse battery";

async fn sign_in(app: &TestApp, username: &str) -> String {
    let reply = app.sign_in(username, PASSWORD).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.body["session"]["token"].as_str().unwrap().to_string()
}

async fn get(app: &TestApp, path: &str, token: &str) -> StatusCode {
    app.client
        .get(format!("{}{path}", app.base))
        .bearer_auth(token)
        .header("user-agent", "audit-tool/2")
        .send()
        .await
        .unwrap()
        .status()
}

/// The audit history's `AuditRead` entries, as an admin's export shows them.
async fn reads_in_history(app: &TestApp, admin: &str) -> Vec<Value> {
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
    let text = app
        .client
        .get(format!("{}/audit?event_type=AuditRead", app.base))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("trailer").is_none())
        .collect()
}

#[tokio::test]
async fn an_auditors_reads_show_in_the_audit_history_and_the_auditor_still_cannot_act() {
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
    let auditor = sign_in(&app, "audrey").await;
    assert!(reads_in_history(&app, &admin).await.is_empty());

    for path in [
        format!("/users/{kim}/history"),
        format!("/users/{kim}"),
        format!("/audit?user_id={kim}&format=csv"),
    ] {
        assert_eq!(get(&app, &path, &auditor).await, StatusCode::OK, "{path}");
    }
    // Refused reads are not recorded as reads.
    assert_eq!(
        get(&app, "/audit?format=xml", &auditor).await,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    // The auditor cannot act, and trying records nothing.
    let before = app.event_types(&kim).await;
    let acts = [
        app.post_auth(
            &format!("/users/{kim}/unlock"),
            &auditor,
            json!({"reason": "curious"}),
        )
        .await,
        app.post_auth(
            &format!("/users/{kim}/revoke-sessions"),
            &auditor,
            json!({"reason": "curious"}),
        )
        .await,
        app.post_auth(
            "/users",
            &auditor,
            json!({"username": "mallory", "password": PASSWORD}),
        )
        .await,
    ];
    for reply in acts {
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{:?}", reply.body);
    }
    assert_eq!(app.event_types(&kim).await, before);

    let admin_id = app
        .events_of(&audrey, "UserRegistered")
        .await
        .first()
        .unwrap()["ctx"]["actor"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let reads = reads_in_history(&app, &admin).await;
    // The admin's export of the reads before them is a read too.
    let (admins, reads): (Vec<Value>, Vec<Value>) = reads
        .into_iter()
        .partition(|e| e["actor_id"] == json!(admin_id));
    assert_eq!(admins.len(), 1, "{admins:?}");
    assert_eq!(
        admins[0]["details"]["read"],
        json!({"what": "audit_export", "format": "ndjson", "filter": {
            "event_type": "AuditRead", "user_id": null, "actor": null, "from": null, "to": null}})
    );
    let seen: Vec<(&str, &str, Value)> = reads
        .iter()
        .map(|e| {
            (
                e["actor_id"].as_str().unwrap(),
                e["user_id"].as_str().unwrap(),
                e["details"]["read"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                audrey.as_str(),
                audrey.as_str(),
                json!({"what": "user_history", "user_id": kim})
            ),
            (
                audrey.as_str(),
                audrey.as_str(),
                json!({"what": "user_detail", "user_id": kim})
            ),
            (
                audrey.as_str(),
                audrey.as_str(),
                json!({"what": "audit_export", "format": "csv", "filter": {
                    "event_type": null, "user_id": kim, "actor": null, "from": null, "to": null}})
            ),
        ]
    );
    for e in &reads {
        assert_eq!(e["event_type"], "AuditRead");
        // Sealed in the entry (the reader's personal data), opened beside it.
        assert!(e["ip"].as_str().unwrap().starts_with("sealed:"), "{e}");
        assert_eq!(e["opened"]["ip"], "127.0.0.1");
        assert_eq!(e["opened"]["user_agent"], "audit-tool/2");
        assert_eq!(e["at"], json!(app.clock.now()));
    }

    assert_eq!(app.events_of(&admin_id, "AuditRead").await.len(), 2);
}
