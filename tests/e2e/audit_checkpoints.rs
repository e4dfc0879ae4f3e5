//! Signed checkpoints of the audit chain as an auditor uses them: the
//! verifier signs one every N entries and one of the head every hour (by
//! its clock), serves them at `/audit/checkpoints`, and an unfiltered
//! export verifies against them, unless an audit row was removed or altered
//! after a checkpoint covered it; checkpoints signed before a key rotation
//! still verify with the published keys.

use chrono::Duration;
use reqwest::StatusCode;
use serde_json::{json, Value};
use twofold_platform::{Clock, Config};
use twofold_projections::checkpoints::{self, Checkpoint, CheckpointPolicy};

use crate::audit_signed::{audit_keys, export, keys_of, published_keys, some_history};
use crate::helpers::{spawn_app_with, TestApp};

/// Checkpoints every five entries, and entries chained as soon as applied.
pub(crate) fn every_five(config: &mut Config) {
    audit_keys(config, &["a1"], "a1");
    config.audit_checkpoint_entries = 5;
    config.audit_checkpoint_settle_secs = 0;
}

pub(crate) async fn signed_now(app: &TestApp) -> Vec<Checkpoint> {
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
    app.state
        .record_audit_checkpoints(&CheckpointPolicy::from_config(&app.config))
        .await
        .unwrap()
}

async fn served(app: &TestApp, token: &str, query: &str) -> Vec<Checkpoint> {
    let reply = app
        .get_auth(&format!("/audit/checkpoints{query}"), token)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    checkpoints::parse(&reply.body.to_string()).unwrap()
}

/// Each entry of an unfiltered NDJSON export: its position and chain hash.
fn chain_of(text: &str) -> Vec<(i64, String)> {
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("trailer").is_none())
        .map(|v| {
            (
                v["position"].as_i64().unwrap(),
                v["hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn add_user(app: &TestApp, admin: &str, name: &str) {
    app.create_user(
        admin,
        json!({"username": name, "password": "correct horse battery", "email": format!("{name}@acme.test")}),
    )
    .await;
}

#[tokio::test]
async fn a_checkpoint_comes_every_n_entries_and_an_export_verifies_against_them() {
    let app = spawn_app_with(every_five).await;
    let admin = some_history(&app).await;
    let first = signed_now(&app).await;
    let text = export(&app, &admin, "format=ndjson").await;
    let chain = chain_of(&text);
    assert!(chain.len() >= 10, "{} entries", chain.len());
    // One at every fifth entry of the chain, with its position and hash.
    let expected: Vec<(i64, i64, String)> = chain
        .iter()
        .enumerate()
        .filter(|(i, _)| (i + 1) % 5 == 0)
        .map(|(i, (p, h))| (*p, i as i64 + 1, h.clone()))
        .collect();
    let got: Vec<(i64, i64, String)> = first
        .iter()
        .map(|c| (c.position, c.count, c.head.clone()))
        .collect();
    assert_eq!(got, expected);
    assert!(first
        .iter()
        .all(|c| c.key_id == "a1" && c.at == app.clock.now()));
    assert_eq!(served(&app, &admin, "").await, first);
    let keys = keys_of(&published_keys(&app, &admin).await);
    let checked = checkpoints::verify_against(&text, Some(&keys), &first).unwrap();
    assert_eq!(checked.covered, first.len());
    // A filtered export is not the tenant's chain.
    let filtered = export(&app, &admin, "format=ndjson&event_type=UserCreated").await;
    let err = checkpoints::verify_against(&filtered, Some(&keys), &first).unwrap_err();
    assert!(err.to_string().contains("filter"), "{err}");
    // A checkpoint rewritten after signing.
    let mut forged = first.clone();
    forged[0].count += 1;
    let err = checkpoints::verify_against(&text, Some(&keys), &forged).unwrap_err();
    assert!(
        err.to_string().contains("the signature does not match"),
        "{err}"
    );
}

#[tokio::test]
async fn without_a_count_a_checkpoint_of_the_head_comes_every_hour_by_the_clock() {
    let app = spawn_app_with(|c| {
        every_five(c);
        c.audit_checkpoint_entries = 0;
    })
    .await;
    let admin = some_history(&app).await;
    assert_eq!(signed_now(&app).await, []);
    app.clock.advance(Duration::minutes(59));
    assert_eq!(signed_now(&app).await, []);
    app.clock.advance(Duration::minutes(1));
    let on_the_hour = signed_now(&app).await;
    assert_eq!(on_the_hour.len(), 1, "{on_the_hour:?}");
    let head = on_the_hour[0].clone();
    // The head as it stood: the whole chain then.
    let text = export(&app, &admin, "format=ndjson").await;
    let chain = chain_of(&text);
    assert_eq!(
        (head.position, head.count, head.head.clone()),
        (
            chain.last().unwrap().0,
            chain.len() as i64,
            chain.last().unwrap().1.clone()
        )
    );
    assert_eq!(head.at, app.clock.now());

    // from/to select by when they were signed.
    let since = served(
        &app,
        &admin,
        &format!(
            "?from={}",
            head.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
    )
    .await;
    assert_eq!(since, vec![head.clone()]);
    let before = served(
        &app,
        &admin,
        &format!(
            "?to={}",
            (head.at - Duration::seconds(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
    )
    .await;
    assert_eq!(before, []);
    let bad = app
        .get_auth("/audit/checkpoints?from=yesterday", &admin)
        .await;
    assert_eq!(
        bad.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        bad.body
    );

    let keys = keys_of(&published_keys(&app, &admin).await);
    assert!(checkpoints::verify_against(&text, Some(&keys), &[head]).is_ok());
}

#[tokio::test]
async fn an_audit_row_removed_or_altered_after_a_checkpoint_fails_the_next_export() {
    let app = spawn_app_with(every_five).await;
    let admin = some_history(&app).await;
    signed_now(&app).await;
    let keys = keys_of(&published_keys(&app, &admin).await);
    let all = served(&app, &admin, "").await;
    let checkpoint = all[1].clone();
    let chain = chain_of(&export(&app, &admin, "format=ndjson").await);
    // An entry between the first and the second checkpoint.
    let inside = chain
        .iter()
        .map(|(p, _)| *p)
        .find(|p| *p > all[0].position && *p < checkpoint.position)
        .unwrap();

    sqlx::query("UPDATE rm_audit SET ip = '203.0.113.66' WHERE position = $1")
        .bind(inside)
        .execute(&app.pool)
        .await
        .unwrap();
    let altered = export(&app, &admin, "format=ndjson").await;
    // Signed by the server, so it verifies alone: the checkpoint tells.
    assert!(twofold_projections::audit::verify_signed(&altered, &keys).is_ok());
    let err = checkpoints::verify_against(&altered, Some(&keys), &all)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "the export's chain at position {} is not the head the checkpoint at position {} ({}) signed: an entry was altered since",
            checkpoint.position, checkpoint.position, checkpoint.at
        )
    );

    sqlx::query("DELETE FROM rm_audit WHERE position = $1")
        .bind(inside)
        .execute(&app.pool)
        .await
        .unwrap();
    let removed = export(&app, &admin, "format=ndjson").await;
    let err = checkpoints::verify_against(&removed, Some(&keys), &all)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "the export has {} entries up to position {}",
            checkpoint.count - 1,
            checkpoint.position
        )) && err.ends_with("entries were removed or added since"),
        "{err}"
    );

    sqlx::query("DELETE FROM rm_audit WHERE position = $1")
        .bind(checkpoint.position)
        .execute(&app.pool)
        .await
        .unwrap();
    let err = checkpoints::verify_against(
        &export(&app, &admin, "format=ndjson").await,
        Some(&keys),
        &all,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(&format!(
            "the export has no entry at position {}",
            checkpoint.position
        )),
        "{err}"
    );
}

#[tokio::test]
async fn checkpoints_signed_before_a_key_rotation_still_verify() {
    let app = spawn_app_with(every_five).await;
    let admin = some_history(&app).await;
    let before = signed_now(&app).await;
    assert!(!before.is_empty());
    let rotated = app.twin_with(|c| audit_keys(c, &["a1", "a2"], "a2")).await;
    let admin2 = rotated.admin_token().await;
    for name in ["dan", "eve", "fay"] {
        add_user(&rotated, &admin2, name).await;
    }
    let after = signed_now(&rotated).await;
    assert!(!after.is_empty());
    assert!(after.iter().all(|c| c.key_id == "a2"));
    let all = served(&rotated, &admin2, "").await;
    assert!(all.iter().any(|c| c.key_id == "a1"));
    let keys = keys_of(&published_keys(&rotated, &admin2).await);
    let text = export(&rotated, &admin2, "format=ndjson").await;
    let checked = checkpoints::verify_against(&text, Some(&keys), &all).unwrap();
    assert_eq!(checked.covered, all.len());
    let _ = admin;
}
