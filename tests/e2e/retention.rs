//! Retention of the audit history (`audit_retention_days`): entries older
//! than the setting leave the read models, up to a signed checkpoint, once
//! the rows are checked against it; the events stay; a rebuild keeps them
//! out; exports taken after a pruning still verify, against the keys and the
//! checkpoints, from the pruned head; unset, nothing is pruned.

use std::collections::BTreeSet;

use chrono::Duration;
use reqwest::StatusCode;
use serde_json::{json, Value};
use twofold_projections::audit::{self, Pruned};
use twofold_projections::checkpoints;

use crate::audit_checkpoints::{every_five, signed_now};
use crate::audit_signed::{export, keys_of, published_keys};
use crate::helpers::{spawn_app_with, TestApp};
use crate::reports::{as_of_query, get};

async fn add_user(app: &TestApp, admin: &str, name: &str) -> String {
    app.create_user(
        admin,
        json!({"username": name, "password": "correct horse battery", "email": format!("{name}@acme.test")}),
    )
    .await
}

/// The positions of the tenant's audit rows.
async fn rows(app: &TestApp) -> Vec<i64> {
    sqlx::query_scalar("SELECT position FROM rm_audit WHERE tenant_id = $1 ORDER BY position")
        .bind(app.tenant_id.to_string())
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

async fn event_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// The positions of a user's timeline.
async fn history(app: &TestApp, admin: &str, user: &str) -> Vec<i64> {
    let reply = app.get_auth(&format!("/users/{user}/history"), admin).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect()
}

fn positions(text: &str) -> Vec<i64> {
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("trailer").is_none())
        .map(|v| v["position"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn entries_past_retention_leave_the_read_models_and_exports_still_verify() {
    let app = spawn_app_with(every_five).await;
    let admin = app.admin_token().await;
    let mut old_users = Vec::new();
    for name in ["ann", "ben", "cat", "deb"] {
        old_users.push(add_user(&app, &admin, name).await);
    }
    let set = app
        .set_settings(&admin, json!({"audit_retention_days": 30}))
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    let stored = app.get_auth("/settings", &admin).await;
    assert_eq!(stored.body["audit_retention_days"], 30, "{:?}", stored.body);
    signed_now(&app).await;
    let early = export(&app, &admin, "format=ndjson").await;
    let keys = keys_of(&published_keys(&app, &admin).await);
    let early_verified = audit::verify_signed(&early, &keys).unwrap();
    // Nothing is 30 days old yet.
    assert_eq!(app.state.prune_audit().await.unwrap(), []);

    app.clock.advance(Duration::days(31));
    let eve = add_user(&app, &admin, "eve").await;
    signed_now(&app).await;
    let before = rows(&app).await;
    let eve_before = history(&app, &admin, &eve).await;
    let events = event_count(&app).await;

    let prunings = app.state.prune_audit().await.unwrap();
    assert_eq!(prunings.len(), 1, "{prunings:?}");
    let mark: Pruned = prunings[0].pruned.clone();
    let all = checkpoints::list(&app.pool, &app.tenant_id.to_string(), None, None)
        .await
        .unwrap();
    // Up to a signed checkpoint, with its count and head, before eve's entries.
    let at_mark = all.iter().find(|c| c.position == mark.position).unwrap();
    assert_eq!(
        (at_mark.count, &at_mark.head, at_mark.at),
        (mark.count, &mark.head, mark.signed_at)
    );
    assert!(mark.position < *eve_before.first().unwrap());
    let gone: BTreeSet<i64> = before
        .iter()
        .copied()
        .filter(|p| *p <= mark.position)
        .collect();
    assert_eq!(prunings[0].entries, gone.len() as u64);
    assert_eq!(mark.count, gone.len() as i64);
    let after = rows(&app).await;
    assert_eq!(
        after,
        before
            .iter()
            .copied()
            .filter(|p| *p > mark.position)
            .collect::<Vec<_>>()
    );
    // The events stay (reading the histories below adds its own).
    assert_eq!(event_count(&app).await, events);
    // Timelines lose the pruned entries and keep the rest.
    for user in &old_users {
        assert!(history(&app, &admin, user)
            .await
            .iter()
            .all(|p| *p > mark.position));
    }
    assert_eq!(history(&app, &admin, &eve).await, eve_before);
    let metrics = app.metrics().await;
    let counted: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("twofold_audit_pruned_entries_total "))
        .unwrap_or_else(|| panic!("{metrics}"))
        .trim()
        .parse()
        .unwrap();
    assert!(counted >= gone.len() as f64, "{counted}");

    // An export now starts after the mark and goes on from its head.
    for format in ["ndjson", "csv"] {
        let text = export(&app, &admin, &format!("format={format}")).await;
        let verified = audit::verify_signed(&text, &keys).unwrap();
        assert_eq!(verified.pruned.as_ref(), Some(&mark));
        assert!(verified.first_position.unwrap() > mark.position);
        let checked = checkpoints::verify_against(&text, Some(&keys), &all).unwrap();
        assert!(checked.covered >= 2, "{checked:?}");
        assert_eq!(
            checked.pruned,
            all.iter().filter(|c| c.position < mark.position).count()
        );
    }
    let text = export(&app, &admin, "format=ndjson").await;
    assert!(positions(&text).iter().all(|p| *p > mark.position));
    // The export from before the pruning: extended when it reached the
    // mark, else the answer says why it cannot be.
    match audit::verify_extends(&text, Some(&keys), &early_verified) {
        Ok(_) => assert!(early_verified.last_position.unwrap() >= mark.position),
        Err(e) => {
            assert!(early_verified.last_position.unwrap() < mark.position);
            assert!(
                e.to_string().contains("pruned by the retention setting"),
                "{e}"
            );
        }
    }
    // A filtered export names the mark too, and starts from 64 zeros.
    let filtered = export(&app, &admin, &format!("format=ndjson&user_id={eve}")).await;
    let verified = audit::verify_signed(&filtered, &keys).unwrap();
    assert_eq!(verified.pruned.as_ref(), Some(&mark));
    assert!(verified.chain_start().is_none());

    // A rebuild keeps them out; a second pass finds nothing more to prune.
    let kept = rows(&app).await;
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
    // (With the reads recorded since.)
    let rebuilt = rows(&app).await;
    assert!(rebuilt.starts_with(&kept), "{rebuilt:?} {kept:?}");
    assert!(rebuilt.iter().all(|p| *p > mark.position));
    assert_eq!(app.state.prune_audit().await.unwrap(), []);
    let rebuilt = export(&app, &admin, "format=ndjson").await;
    let all = checkpoints::list(&app.pool, &app.tenant_id.to_string(), None, None)
        .await
        .unwrap();
    assert!(checkpoints::verify_against(&rebuilt, Some(&keys), &all).is_ok());
}

#[tokio::test]
async fn without_the_setting_nothing_is_pruned() {
    let app = spawn_app_with(every_five).await;
    let admin = app.admin_token().await;
    for name in ["ann", "ben", "cat"] {
        add_user(&app, &admin, name).await;
    }
    signed_now(&app).await;
    app.clock.advance(Duration::days(4000));
    let admin = app.admin_token().await;
    add_user(&app, &admin, "dan").await;
    signed_now(&app).await;
    let before = rows(&app).await;
    assert_eq!(app.state.prune_audit().await.unwrap(), []);
    assert_eq!(rows(&app).await, before);
    let text = export(&app, &admin, "format=ndjson").await;
    let keys = keys_of(&published_keys(&app, &admin).await);
    assert_eq!(audit::verify_signed(&text, &keys).unwrap().pruned, None);
}

#[tokio::test]
async fn a_row_altered_before_the_checkpoint_stops_the_pruning() {
    let app = spawn_app_with(every_five).await;
    let admin = app.admin_token().await;
    for name in ["ann", "ben", "cat"] {
        add_user(&app, &admin, name).await;
    }
    app.set_settings(&admin, json!({"audit_retention_days": 1}))
        .await;
    signed_now(&app).await;
    app.clock.advance(Duration::days(2));
    add_user(&app, &admin, "dan").await;
    signed_now(&app).await;
    let first = rows(&app).await[0];
    sqlx::query("UPDATE rm_audit SET reason = 'rewritten' WHERE position = $1")
        .bind(first)
        .execute(&app.pool)
        .await
        .unwrap();
    let before = rows(&app).await;
    // Pruning would hide the rewrite: the pass refuses, and removes nothing.
    assert_eq!(app.state.prune_audit().await.unwrap(), []);
    assert_eq!(rows(&app).await, before);
    let marks: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_pruned")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(marks, 0);
}

#[tokio::test]
async fn the_checkpoint_pass_keeps_the_position_it_got_to() {
    let app = spawn_app_with(every_five).await;
    let admin = app.admin_token().await;
    add_user(&app, &admin, "ann").await;
    signed_now(&app).await;
    let settled = || async {
        sqlx::query_scalar::<_, i64>("SELECT position FROM audit_settled")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    let last = || async {
        sqlx::query_scalar::<_, i64>("SELECT max(global_position) FROM events")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    assert_eq!(settled().await, last().await);
    add_user(&app, &admin, "ben").await;
    signed_now(&app).await;
    // The next pass started there and chained the new entries.
    assert_eq!(settled().await, last().await);
    let chained: i64 = sqlx::query_scalar("SELECT position FROM audit_chain WHERE tenant_id = $1")
        .bind(app.tenant_id.to_string())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(Some(chained), rows(&app).await.last().copied());
}

/// `as_of` and the daily series sweep forward from a kept Overview
/// checkpoint, finding the events after it by their time in the audit
/// history; across entries a pruning removed, they answer what folding every
/// event answers all the same.
#[tokio::test]
async fn as_of_and_the_daily_series_across_pruned_entries_answer_what_folding_every_event_answers()
{
    use crate::helpers::ClockExt;
    let app = spawn_app_with(every_five).await;
    let midnight = app
        .clock
        .now_for_tests()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let day = |n: i64, h: i64| midnight + Duration::days(n) + Duration::hours(h);
    let admin = app.admin_token().await;
    add_user(&app, &admin, "ann").await;
    let set = app
        .set_settings(&admin, json!({"audit_retention_days": 30}))
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    let as_of = |at: chrono::DateTime<chrono::Utc>| {
        let app = &app;
        async move {
            let admin = app.admin_token().await;
            get(app, &admin, &as_of_query(at)).await["overview"].clone()
        }
    };
    // Day 0's checkpoint, taken when a moment of day 1 is asked for: the
    // sweeps below start from it.
    app.clock.set(day(1, 12));
    signed_now(&app).await;
    as_of(day(1, 6)).await;
    // Day 2: users whose entries the pruning removes.
    app.clock.set(day(2, 9));
    let admin = app.admin_token().await;
    for name in ["ben", "cat", "deb"] {
        add_user(&app, &admin, name).await;
    }
    app.clock.set(day(40, 9));
    let admin = app.admin_token().await;
    add_user(&app, &admin, "eve").await;
    signed_now(&app).await;
    let day_2 = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM rm_audit WHERE tenant_id = $1 AND at >= $2 AND at < $3",
        )
        .bind(app.tenant_id.to_string())
        .bind(day(2, 0))
        .bind(day(3, 0))
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let day_2_before = day_2().await;
    let prunings = app.state.prune_audit().await.unwrap();
    assert_eq!(prunings.len(), 1, "{prunings:?}");
    // Up to the last signed checkpoint before the entries kept.
    let left = day_2().await;
    assert!(
        left < day_2_before,
        "day 2: {left} of {day_2_before} entries left"
    );

    let records = app.tenant_records().await;
    for at in [day(2, 12), day(3, 6), day(20, 0), day(39, 23), day(40, 12)] {
        let folded =
            serde_json::to_value(twofold_projections::overview::as_of(&records, at)).unwrap();
        // Once taking the checkpoint, once from the one taken.
        for _ in 0..2 {
            assert_eq!(as_of(at).await, folded, "as of {at}");
        }
    }
    // The figures moved over the days, so the comparisons said something.
    let before = twofold_projections::overview::as_of(&records, day(1, 6));
    let after = twofold_projections::overview::as_of(&records, day(2, 12));
    assert_eq!(after.active_users, before.active_users + 3);

    // The daily series, swept from the checkpoints kept, says the same.
    let expected: Vec<Value> = (1..=38)
        .map(|n| {
            let end = day(n + 1, 0) - Duration::microseconds(1);
            serde_json::to_value(twofold_projections::overview::DailyPoint::of(
                end.date_naive(),
                &twofold_projections::overview::as_of(&records, end),
            ))
            .unwrap()
        })
        .collect();
    let series = get(
        &app,
        &app.admin_token().await,
        &format!(
            "/overview/daily?from={}&to={}",
            day(1, 0).date_naive(),
            day(38, 0).date_naive()
        ),
    )
    .await;
    assert_eq!(series["days"], json!(expected));
}

/// Upgrading from before the fix above: the Overview checkpoints and days of
/// tenants whose audit history was pruned are forgotten (they may have been
/// swept across the pruned entries), to be folded again when asked for; the
/// other tenants' stay.
#[tokio::test]
async fn the_upgrade_forgets_the_overview_checkpoints_and_days_of_pruned_tenants() {
    const FIX: i64 = 20261205000005;
    let url = crate::helpers::empty_database().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    // The migrations before the fix, from a copy of the directory without it.
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let before = std::env::temp_dir().join(format!("twofold-migrations-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&before).unwrap();
    let mut copied = 0;
    for file in std::fs::read_dir(&here).unwrap() {
        let file = file.unwrap();
        let name = file.file_name().into_string().unwrap();
        let version: i64 = name.split('_').next().unwrap().parse().unwrap();
        if version < FIX {
            std::fs::copy(file.path(), before.join(&name)).unwrap();
            copied += 1;
        }
    }
    assert!(copied > 10, "{copied} migrations before the fix");
    sqlx::migrate::Migrator::new(before.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    std::fs::remove_dir_all(&before).unwrap();
    for tenant in ["pruned", "kept"] {
        sqlx::query(
            "INSERT INTO overview_checkpoints (tenant_id, day, body, users) VALUES ($1, '2026-03-01', '\\x7b7d', 0)",
        )
        .bind(tenant)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO overview_days (tenant_id, day, counts) VALUES ($1, '2026-03-01', '{}')",
        )
        .bind(tenant)
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO audit_pruned (tenant_id, position, count, head, signed_at, pruned_at) \
         VALUES ('pruned', 10, 10, 'h', now(), now())",
    )
    .execute(&pool)
    .await
    .unwrap();

    twofold_platform::db::migrate(&pool).await.unwrap();
    for table in ["overview_checkpoints", "overview_days"] {
        let left: Vec<String> =
            sqlx::query_scalar(&format!("SELECT tenant_id FROM {table} ORDER BY tenant_id"))
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(left, ["kept"], "{table}");
    }
}
