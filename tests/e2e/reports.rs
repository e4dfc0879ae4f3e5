//! The read models an admin and an auditor see, after a scripted history:
//! the Overview (live, `as_of`, daily), the user directory, and the audit
//! history with exports that `twofold audit verify` checks.

use chrono::Duration;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{enrolled_user, oathtool, settings_on, spawn_app_with_sms, ClockExt, TestApp};

async fn rebuild(app: &TestApp) {
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
}

pub(crate) async fn get(app: &TestApp, admin: &str, path: &str) -> Value {
    let reply = app.get_auth(path, admin).await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {:?}", reply.body);
    reply.body
}

/// Users: the admin (not enrolled, email), ann and ben enrolled with an
/// authenticator, eli enrolled by answering an email code (role support), cat
/// pending, dan not started (role finance), a service account; ben locked out;
/// ann used a backup code.
async fn scripted_history(app: &TestApp) -> (String, String) {
    let admin = app.admin_token().await;
    let (ann, ann_secret, ann_codes) = enrolled_user(app, &admin, "ann").await;
    let (ben, ben_secret, _) = enrolled_user(app, &admin, "ben").await;
    let cat = app
        .create_user(
            &admin,
            json!({"username": "cat", "password": "correct horse battery", "roles": ["staff"]}),
        )
        .await;
    let cat_session = app.sign_in("cat", "correct horse battery").await.body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    app.post_auth("/me/totp", &cat_session, json!({})).await;
    app.create_user(&admin, json!({"username": "dan", "password": "correct horse battery", "roles": ["finance"], "email": "dan@acme.test"}))
        .await;
    app.create_user(
        &admin,
        json!({"username": "bot", "password": "correct horse battery", "service_account": true}),
    )
    .await;
    let _ = cat;
    app.create_user(&admin, json!({"username": "eli", "password": "correct horse battery", "roles": ["support"], "email": "eli@acme.test"}))
        .await;
    app.create_user(&admin, json!({"username": "fox", "password": "correct horse battery", "roles": ["support"], "phone": "+4915112345678"}))
        .await;

    // 2FA on: ann signs in with TOTP, then with a backup code; ben fails 3
    // times; eli answers an email code.
    let mut settings = settings_on(&["totp", "email", "sms"], "totp");
    settings["sms_provider"] = json!("test-provider");
    let changed = app.set_settings(&admin, settings).await;
    assert_eq!(changed.status, StatusCode::OK, "{:?}", changed.body);
    // fox answers an SMS code (the code the dispatcher would send).
    let c = app.sign_in("fox", "correct horse battery").await;
    assert_eq!(c.body["challenge"]["method"], "sms", "{:?}", c.body);
    let token = c.body["challenge"]["token"].as_str().unwrap();
    let code = app.delivered_code(token).await;
    let ok = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    app.clock.advance(Duration::seconds(30));
    let c = app.sign_in("eli", "correct horse battery").await;
    assert_eq!(c.body["challenge"]["method"], "email", "{:?}", c.body);
    let token = c.body["challenge"]["token"].as_str().unwrap();
    let code = app.delivered_code(token).await;
    let ok = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    let c = app.sign_in("ann", "correct horse battery").await;
    let ok = app
        .post("/challenge/verify", json!({"challenge_token": c.body["challenge"]["token"], "code": oathtool(&ann_secret, app.clock.now_for_tests())}))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    app.clock.advance(Duration::minutes(1));
    let c = app.sign_in("ann", "correct horse battery").await;
    let ok = app
        .post(
            "/challenge/verify",
            json!({"challenge_token": c.body["challenge"]["token"], "backup_code": ann_codes[0]}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    let c = app.sign_in("ben", "correct horse battery").await;
    let wrong = if oathtool(&ben_secret, app.clock.now_for_tests()) == "000000" {
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
    (ann, ben)
}

#[tokio::test]
async fn the_overview_and_directory_answer_the_hand_computed_figures() {
    let app = spawn_app_with_sms().await;
    let (ann, ben) = scripted_history(&app).await;
    rebuild(&app).await;
    let admin = app.admin_token().await;

    let o = &get(&app, &admin, "/overview").await["overview"];
    // Active users: root-admin, ann, ben, eli, fox, cat, dan (the service
    // account is not counted); enrolled: ann and ben (authenticator), eli
    // (email), fox (SMS).
    assert_eq!(o["active_users"], 7);
    assert_eq!(o["enrolled"], 4);
    assert_eq!(o["pending"], 1);
    assert_eq!(o["not_started"], 2);
    assert_eq!(o["enrollment_rate"], 4.0 / 7.0);
    assert_eq!(o["locked"], 1);
    assert_eq!(o["by_method"], json!({"totp": 2, "email": 1, "sms": 1}));
    assert_eq!(
        o["backup_codes"],
        json!({"none_left": 0, "running_low": 0, "users": []})
    );
    let recent: Vec<&str> = o["recent_enrollments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["username"].as_str().unwrap())
        .collect();
    assert_eq!(recent, ["eli", "fox", "ben", "ann"]);
    assert_eq!(
        o["roles_without_2fa"],
        json!([
            {"role": "admin", "users": 1, "not_enrolled": 1},
            {"role": "finance", "users": 1, "not_enrolled": 1},
            {"role": "staff", "users": 1, "not_enrolled": 1}
        ])
    );

    let enrolled = get(&app, &admin, "/users?status=enrolled").await;
    assert_eq!(enrolled["total"], 4);
    let sms = get(&app, &admin, "/users?method=sms").await;
    assert_eq!(sms["users"][0]["username"], "fox");
    let locked = get(&app, &admin, "/users?locked=true").await;
    assert_eq!(locked["users"][0]["username"], "ben");
    let finance = get(&app, &admin, "/users?role=finance").await;
    assert_eq!(finance["users"][0]["username"], "dan");
    let email = get(&app, &admin, "/users?method=email&per_page=2&page=1").await;
    assert_eq!(email["total"], 5); // admin, ann, ben, dan, eli
    assert_eq!(email["users"].as_array().unwrap().len(), 2);
    let off = get(&app, &admin, "/users?two_factor=off").await;
    assert_eq!(off["total"], 4);

    let detail = get(&app, &admin, &format!("/users/{ann}")).await;
    assert_eq!(detail["backup_codes_left"], 7);
    assert_eq!(
        detail["last_sign_in"]["second_factor"],
        json!({"two_factor": "used", "method": "backup_code"})
    );
    let ben_detail = get(&app, &admin, &format!("/users/{ben}")).await;
    assert_eq!(ben_detail["locked"], true);

    let bad = app.get_auth("/users?status=bogus", &admin).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad.code(), "invalid_query");
}

#[tokio::test]
async fn as_of_a_past_moment_answers_what_the_read_model_answered_then() {
    let app = spawn_app_with_sms().await;
    scripted_history(&app).await;
    let admin = app.admin_token().await;
    // The admin's sign-in (an email code) counts too: rebuild after it.
    rebuild(&app).await;
    let then = app.clock.now_for_tests();
    let answered_then = get(&app, &admin, "/overview").await["overview"].clone();

    // Later: more users enroll.
    app.clock.advance(Duration::days(2));
    let before_settings_change = app.set_settings(&admin, json!({"enabled": false})).await;
    assert_eq!(before_settings_change.status, StatusCode::OK);
    let admin = app.admin_token().await;
    enrolled_user(&app, &admin, "eve").await;
    rebuild(&app).await;
    let now = get(&app, &admin, "/overview").await["overview"].clone();
    assert_ne!(now, answered_then);
    // ann, ben, eli, fox, eve, and the admin, who answered an email code.
    assert_eq!(now["enrolled"], 6);

    let as_of = get(
        &app,
        &admin,
        &format!(
            "/overview?as_of={}",
            then.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                .replace('+', "%2B")
        ),
    )
    .await;
    assert_eq!(as_of["overview"], answered_then);

    let day = then.date_naive();
    let series = get(
        &app,
        &admin,
        &format!(
            "/overview/daily?from={}&to={}",
            day,
            day + Duration::days(2)
        ),
    )
    .await;
    let days = series["days"].as_array().unwrap();
    assert_eq!(days.len(), 3);
    // Day one: ann, ben, eli, fox and the admin; two days on, eve too.
    assert_eq!(days[0]["enrolled"], 5);
    assert_eq!(days[2]["enrolled"], 6);
}

/// `as_of` for an RFC 3339 moment, as a query parameter.
pub(crate) fn as_of_query(at: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "/overview?as_of={}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .replace('+', "%2B")
    )
}

#[tokio::test]
async fn as_of_from_a_daily_checkpoint_answers_what_folding_every_event_answers() {
    let app = spawn_app_with_sms().await;
    let start = app.clock.now_for_tests();
    scripted_history(&app).await;
    // Users enroll in the days after with 2FA off at sign-in.
    let admin = app.admin_token().await;
    let off = app.set_settings(&admin, json!({"enabled": false})).await;
    assert_eq!(off.status, StatusCode::OK);
    let midnight = start.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let day = |n: i64, h: i64, m: i64| {
        midnight + Duration::days(n) + Duration::hours(h) + Duration::minutes(m)
    };
    let patch = |path: String, token: String, body: Value| {
        let app = &app;
        async move {
            let r = app
                .client
                .patch(format!("{}{path}", app.base))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
        }
    };
    // Three more days: each a user enrolled, one created (finance), and a
    // change of roles.
    let mut dan = String::new();
    for n in 1..=3 {
        app.clock.set(day(n, 9, 0));
        let admin = app.admin_token().await;
        enrolled_user(&app, &admin, &format!("day{n}")).await;
        let id = app
            .create_user(&admin, json!({"username": format!("new{n}"), "password": "correct horse battery", "roles": ["finance"]}))
            .await;
        patch(
            format!("/users/{id}"),
            admin.clone(),
            json!({"roles": ["staff"], "reason": "moved"}),
        )
        .await;
        dan = id;
    }
    // The last new user's times go back across the end of day 3: a change at
    // 00:30 on day 4, then one at 23:30 on day 3 (a clock set back).
    app.clock.set(day(4, 0, 30));
    let admin = app.admin_token().await;
    patch(
        format!("/users/{dan}"),
        admin.clone(),
        json!({"roles": ["ops"], "reason": "moved"}),
    )
    .await;
    app.clock.set(day(3, 23, 30));
    patch(
        format!("/users/{dan}"),
        admin,
        json!({"roles": ["support"], "reason": "moved"}),
    )
    .await;
    app.clock.set(day(6, 12, 0));
    rebuild(&app).await;
    let admin = app.admin_token().await;

    let records = app.tenant_records().await;
    let moments: Vec<_> = (0..=5)
        .flat_map(|n| {
            [
                day(n, 0, 0),
                day(n, 9, 30),
                day(n, 23, 45),
                day(n + 1, 0, 0) - Duration::microseconds(1),
            ]
        })
        .chain([start, day(4, 0, 15), day(4, 0, 45)])
        .collect();
    for at in &moments {
        let folded =
            serde_json::to_value(twofold_projections::overview::as_of(&records, *at)).unwrap();
        // Once taking the checkpoint, once from the one taken.
        for _ in 0..2 {
            let answered = get(&app, &admin, &as_of_query(*at)).await;
            assert_eq!(answered["overview"], folded, "as of {at}");
        }
    }
    // The figures moved over the days, so the comparisons said something.
    let first = twofold_projections::overview::as_of(&records, day(0, 23, 45));
    let last = twofold_projections::overview::as_of(&records, day(5, 0, 0));
    assert_eq!(last.active_users, first.active_users + 6);
    assert_eq!(last.enrolled, first.enrolled + 3);

    // A checkpoint per day asked for (the day before each moment's), and
    // nothing personal in them; the stream going back is listed.
    let taken: Vec<(chrono::NaiveDate, Vec<u8>)> = sqlx::query_as(
        "SELECT day, body FROM overview_checkpoints WHERE tenant_id = $1 ORDER BY day",
    )
    .bind(app.tenant_id.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let days: Vec<_> = taken.iter().map(|(d, _)| *d).collect();
    let expected: Vec<_> = (-1..=4).map(|n| day(n, 0, 0).date_naive()).collect();
    assert_eq!(days, expected);
    for (d, body) in &taken {
        let body = String::from_utf8_lossy(body);
        for personal in ["ann", "eli", "@acme.test", "+49151", "192.0.2", "new1"] {
            assert!(!body.contains(personal), "{d}: {personal} in {body}");
        }
        assert_eq!(body.contains(&dan), *d >= day(3, 0, 0).date_naive(), "{d}");
        assert_eq!(
            body.contains(&format!("\"back_across\":[\"{dan}\"]")),
            *d == day(3, 0, 0).date_naive(),
            "{d}: {body}"
        );
    }

    // A rebuild empties them (they are folded by the code rebuilt with).
    rebuild(&app).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM overview_checkpoints")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    let again = get(&app, &admin, &as_of_query(day(4, 0, 45))).await;
    assert_eq!(
        again["overview"],
        serde_json::to_value(twofold_projections::overview::as_of(
            &records,
            day(4, 0, 45)
        ))
        .unwrap()
    );

    // The daily series: each day's figures are what `as_of` its last moment
    // answers, whether swept forward from a checkpoint, kept, or (today) the
    // live Overview's.
    let series = format!(
        "/overview/daily?from={}&to={}",
        day(-2, 0, 0).date_naive(),
        day(6, 0, 0).date_naive()
    );
    let expected: Vec<Value> = (-2..=6)
        .map(|n| {
            let end = day(n + 1, 0, 0) - Duration::microseconds(1);
            serde_json::to_value(twofold_projections::overview::DailyPoint::of(
                end.date_naive(),
                &twofold_projections::overview::as_of(&records, end),
            ))
            .unwrap()
        })
        .collect();
    for _ in 0..2 {
        let days = get(&app, &admin, &series).await;
        assert_eq!(days["days"], json!(expected));
    }
    let kept: Vec<chrono::NaiveDate> =
        sqlx::query_scalar("SELECT day FROM overview_days WHERE tenant_id = $1 ORDER BY day")
            .bind(app.tenant_id.to_string())
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let settled: Vec<_> = (-2..=5).map(|n| day(n, 0, 0).date_naive()).collect();
    assert_eq!(kept, settled, "the settled days are kept, today is not");
    // A later series starts from the checkpoint the sweep left (day 5).
    app.clock.set(day(8, 12, 0));
    let later = get(
        &app,
        &admin,
        &format!(
            "/overview/daily?from={}&to={}",
            day(5, 0, 0).date_naive(),
            day(7, 0, 0).date_naive()
        ),
    )
    .await;
    assert_eq!(later["days"][0], expected[7]);
    assert_eq!(later["days"][2]["enrolled"], expected[8]["enrolled"]);
}

#[tokio::test]
async fn the_live_overview_counts_move_with_each_change_as_a_rebuild_counts_them() {
    use twofold_projections::store::{catch_up, Builder, StreamTarget};
    let app = spawn_app_with_sms().await;
    scripted_history(&app).await;
    let admin = app.admin_token().await;
    let counts = || async {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT key, value FROM rm_overview_counts WHERE tenant_id = $1 AND value <> 0 ORDER BY key",
        )
        .bind(app.tenant_id.to_string())
        .fetch_all(&app.pool)
        .await
        .unwrap();
        rows
    };
    let from_rows = || async {
        let rows = twofold_projections::queries::users(&app.pool, &app.tenant_id.to_string())
            .await
            .unwrap();
        let counts = twofold_projections::overview_counts::of(&rows)
            .remove(&app.tenant_id.to_string())
            .unwrap_or_default();
        let counts: Vec<(String, i64)> = counts.into_iter().filter(|(_, v)| *v != 0).collect();
        (counts, twofold_projections::overview::compute(&rows))
    };
    // The live builder: the first half of the events one at a time, the
    // rest in one batch (several events of a user folded at once).
    let records = twofold_projections::record::load_batch(&app.pool, 0, 100_000)
        .await
        .unwrap();
    let (first, rest) = records.split_at(records.len() / 2);
    for record in first {
        Builder::Directory
            .apply(&app.pool, &app.state.personal, record)
            .await
            .unwrap();
    }
    let targets: Vec<StreamTarget> = rest.iter().map(StreamTarget::of).collect();
    let mut conn = app.pool.acquire().await.unwrap();
    catch_up(
        &mut conn,
        &app.state.personal,
        &[Builder::Directory],
        &targets,
        0,
    )
    .await
    .unwrap();
    let (expected, computed) = from_rows().await;
    assert!(expected.len() > 8, "{expected:?}");
    assert_eq!(counts().await, expected);
    let live = get(&app, &admin, "/overview").await["overview"].clone();
    assert_eq!(live, serde_json::to_value(&computed).unwrap());
    assert_eq!(live["active_users"], 7);
    assert_eq!(live["locked"], 1);

    rebuild(&app).await;
    assert_eq!(counts().await, expected);
    assert_eq!(get(&app, &admin, "/overview").await["overview"], live);

    // After the upgrade that brought the counts, they are filled in from
    // the rows; until then the Overview is computed from the rows.
    sqlx::query("DELETE FROM rm_overview_counts")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO read_model_upgrades (name) VALUES ('overview_counts')")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(get(&app, &admin, "/overview").await["overview"], live);
    twofold_projections::overview_counts::upgrade(&app.pool)
        .await
        .unwrap();
    assert_eq!(counts().await, expected);
    assert_eq!(get(&app, &admin, "/overview").await["overview"], live);
}

/// The directory's rows and the audit history, in key order.
async fn read_models(pool: &sqlx::PgPool) -> (Vec<Value>, Vec<(i64, String)>) {
    let users: Vec<Value> = sqlx::query_scalar("SELECT row FROM rm_users ORDER BY user_id")
        .fetch_all(pool)
        .await
        .unwrap();
    let audit: Vec<(i64, String)> =
        sqlx::query_as("SELECT position, details::text FROM rm_audit ORDER BY position")
            .fetch_all(pool)
            .await
            .unwrap();
    (users, audit)
}

#[tokio::test]
async fn a_rebuild_equals_the_read_models_it_replaces_and_replays_are_harmless() {
    let app = spawn_app_with_sms().await;
    let indexes = || async {
        let defs: Vec<String> = sqlx::query_scalar(
            "SELECT indexdef FROM pg_indexes WHERE tablename IN ('rm_audit', 'rm_users') ORDER BY 1",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        defs
    };
    let before = indexes().await;
    assert!(before.len() > 2, "the read models have secondary indexes");
    scripted_history(&app).await;
    rebuild(&app).await;
    // The rebuild drops the secondary indexes while it writes and builds
    // them again before it commits.
    assert_eq!(indexes().await, before);
    let first = read_models(&app.pool).await;
    assert!(!first.0.is_empty() && !first.1.is_empty());

    // Applying every event again, one by one as a live builder would on
    // redelivery, changes nothing: each is recognised as already applied.
    let records = twofold_projections::record::load_batch(&app.pool, 0, 100_000)
        .await
        .unwrap();
    for record in &records {
        for builder in twofold_projections::store::Builder::ALL {
            assert!(!builder
                .apply(&app.pool, &app.state.personal, record)
                .await
                .unwrap());
        }
    }
    assert_eq!(read_models(&app.pool).await, first);
    rebuild(&app).await;
    assert_eq!(read_models(&app.pool).await, first);
}

#[tokio::test]
async fn two_batches_of_the_same_streams_at_once_apply_each_event_once_as_a_rebuild_does() {
    use twofold_projections::store::{catch_up, Builder, StreamTarget};
    let app = spawn_app_with_sms().await;
    scripted_history(&app).await;
    let records = twofold_projections::record::load_batch(&app.pool, 0, 100_000)
        .await
        .unwrap();
    assert!(records.len() > 30, "{} events", records.len());
    // Two projector connections (as two instances would) bring the same
    // streams up to the same events at the same time, a few events at a
    // time: whichever claims a stream's positions second waits for the
    // other's commit, and then finds its events applied.
    let (mut a, mut b) = (
        app.pool.acquire().await.unwrap(),
        app.pool.acquire().await.unwrap(),
    );
    let mut applied = [0usize; 2];
    for chunk in records.chunks(3) {
        let targets: Vec<StreamTarget> = chunk.iter().map(StreamTarget::of).collect();
        let (x, y) = tokio::join!(
            catch_up(&mut a, &app.state.personal, &Builder::ALL, &targets, 0),
            catch_up(&mut b, &app.state.personal, &Builder::ALL, &targets, 1),
        );
        for (builder, records) in x.unwrap().into_iter().chain(y.unwrap()) {
            applied[Builder::ALL.iter().position(|b| *b == builder).unwrap()] += records.len();
        }
    }
    // Every event once for each builder, between the two.
    assert_eq!(applied, [records.len(); 2]);
    let snapshot = || async {
        let (users, audit) = read_models(&app.pool).await;
        let counts: Vec<(String, i64)> = sqlx::query_as(
            "SELECT key, value FROM rm_overview_counts WHERE value <> 0 ORDER BY tenant_id, key",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        (users, audit, counts)
    };
    let live = snapshot().await;
    assert!(!live.0.is_empty() && !live.1.is_empty() && !live.2.is_empty());
    rebuild(&app).await;
    assert_eq!(snapshot().await, live);
}

#[tokio::test]
async fn the_audit_history_and_its_exports_are_tamper_evident() {
    let app = spawn_app_with_sms().await;
    let (ann, _) = scripted_history(&app).await;
    rebuild(&app).await;
    let admin = app.admin_token().await;

    let history = get(&app, &admin, &format!("/users/{ann}/history")).await;
    let entries = history["entries"].as_array().unwrap();
    let types: Vec<&str> = entries
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types[0], "UserRegistered");
    assert!(types.contains(&"BackupCodeUsed"));
    let registered = &entries[0];
    assert_eq!(registered["actor_kind"], "admin");
    assert_eq!(registered["ip"], "127.0.0.1");
    // Hashes and sealed seeds stay out of the history.
    let text = history.to_string();
    assert!(
        !text.contains("password_hash") && !text.contains("token_hash") && !text.contains("sealed")
    );

    for format in ["ndjson", "csv"] {
        let response = app
            .client
            .get(format!("{}/audit?format={format}", app.base))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let export = response.text().await.unwrap();
        let dir = std::env::temp_dir().join(format!("twofold-audit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let intact = dir.join("intact");
        std::fs::write(&intact, &export).unwrap();
        assert!(verify_cli(&intact), "{format}: intact export refused");

        let lines: Vec<&str> = export.lines().collect();
        // (An entry's own fields: an NDJSON line's `opened` values stand
        // beside the hashed entry, outside the chain.)
        let altered_text = export.replacen("UserRegistered", "UserRegisterex", 1);
        assert_ne!(altered_text, export);
        let altered = dir.join("altered");
        std::fs::write(&altered, altered_text).unwrap();
        assert!(!verify_cli(&altered), "{format}: altered export accepted");

        let first_entry = usize::from(format == "csv");
        let removed_text: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != first_entry + 2)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        let removed = dir.join("removed");
        std::fs::write(&removed, removed_text).unwrap();
        assert!(
            !verify_cli(&removed),
            "{format}: export with a line removed accepted"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    let filtered = app
        .client
        .get(format!("{}/audit?event_type=UserLockedOut", app.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(filtered.lines().count(), 2, "{filtered}"); // one entry and the trailer
    assert!(twofold_projections::audit::verify(&filtered).is_ok());
}

/// Exports past `audit_exports_at_once` are refused with a stable code and
/// leave no trace; once one has been read to its end, or dropped, the next
/// goes through.
#[tokio::test]
async fn audit_exports_past_the_limit_are_refused_until_one_is_done() {
    use futures::StreamExt;
    let app = crate::helpers::spawn_app_with(|c| c.audit_exports_at_once = 1).await;
    let admin = app.admin_token().await;
    let q = || twofold_projections::queries::AuditQuery {
        format: Some("ndjson".to_string()),
        ..Default::default()
    };
    let export = |format: &str| {
        app.client
            .get(format!("{}/audit?format={format}", app.base))
            .bearer_auth(&admin)
            .send()
    };
    let audit_reads = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE event_type = 'AuditRead'")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };

    // An export not yet read holds the one place.
    let (_, streaming) = app
        .state
        .operator_audit_export(app.tenant_id, q())
        .await
        .unwrap();
    let before = audit_reads().await;
    for format in ["ndjson", "csv"] {
        let refused = export(format).await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "exports_busy", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("Try again when one has finished"),
            "{message}"
        );
    }
    let second = app.state.operator_audit_export(app.tenant_id, q()).await;
    assert!(
        matches!(
            second,
            Err(twofold_app::AppError::ExportsBusy { running: 1 })
        ),
        "a second export went through"
    );
    assert_eq!(
        audit_reads().await,
        before,
        "a refused export was recorded as a read"
    );

    // Read to its end, it frees the place.
    let text: Vec<_> = streaming.collect().await;
    let text: String = text.into_iter().map(Result::unwrap).collect();
    assert!(twofold_projections::audit::verify(&text).is_ok());
    let over_http = export("ndjson").await.unwrap();
    assert_eq!(over_http.status(), StatusCode::OK);
    let over_http = over_http.text().await.unwrap();
    assert!(twofold_projections::audit::verify(&over_http).is_ok());
    assert_eq!(audit_reads().await, before + 1);

    // Dropped unread, it frees the place too.
    let (_, abandoned) = app
        .state
        .operator_audit_export(app.tenant_id, q())
        .await
        .unwrap();
    drop(abandoned);
    let (_, next) = app
        .state
        .operator_audit_export(app.tenant_id, q())
        .await
        .expect("an abandoned export still held its place");
    let text: Vec<_> = next.collect().await;
    assert!(text.iter().all(Result::is_ok));

    let metrics = crate::metrics::scrape(app.metrics_addr).await;
    let counted = |series| crate::metrics::value(&metrics, series);
    assert_eq!(counted("twofold_audit_exports_refused_total"), Some(3.0));
    assert_eq!(counted("twofold_audit_exports_stalled_total"), Some(0.0));
}

/// A client that keeps its connection and reads nothing does not keep its
/// export's place: after `audit_export_idle_secs` the export is cut short
/// (no trailer, so what the client got fails verification) and the next
/// export goes through.
#[tokio::test]
async fn a_stalled_export_gives_up_its_place() {
    use futures::StreamExt;
    let app = crate::helpers::spawn_app_with(|c| {
        c.audit_exports_at_once = 1;
        c.audit_export_idle_secs = 1;
    })
    .await;
    // About 2 MB of history: far more than the chunks waiting for a client.
    sqlx::query(
        r#"INSERT INTO rm_audit (position, tenant_id, aggregate_type, aggregate_id, sequence,
             event_type, at, actor_kind, details)
           SELECT 1000000 + g, $1, 'tenant', $1, g, 'TenantSettingsChanged', now(), 'system',
             ('{"note":"' || repeat('x', 500) || '"}')::json
           FROM generate_series(1, 3000) g"#,
    )
    .bind(app.tenant_id.to_string())
    .execute(&app.pool)
    .await
    .unwrap();
    let q = || twofold_projections::queries::AuditQuery {
        format: Some("ndjson".to_string()),
        ..Default::default()
    };
    let (_, stalled) = app
        .state
        .operator_audit_export(app.tenant_id, q())
        .await
        .unwrap();
    assert!(matches!(
        app.state.operator_audit_export(app.tenant_id, q()).await,
        Err(twofold_app::AppError::ExportsBusy { .. })
    ));
    // Nothing reads `stalled`: its writer stops once the waiting chunks
    // have sat for the idle time, and the place is free again.
    let mut next = None;
    for _ in 0..200 {
        if let Ok((_, lines)) = app.state.operator_audit_export(app.tenant_id, q()).await {
            next = Some(lines);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let next = next.expect("the stalled export kept its place");
    let whole: Vec<_> = next.collect().await;
    let whole: String = whole.into_iter().map(Result::unwrap).collect();
    let verified = twofold_projections::audit::verify(&whole);
    assert!(
        verified.is_ok(),
        "{verified:?} {}",
        &whole[whole.len().saturating_sub(600)..]
    );
    assert!(whole.lines().count() > 3000);

    // What the stalled client still gets is the beginning, and it ends in
    // an error, with no trailer.
    let got: Vec<_> = stalled.collect().await;
    assert!(
        got.last().is_some_and(Result::is_err),
        "the cut export ended cleanly"
    );
    let text: String = got.into_iter().filter_map(Result::ok).collect();
    assert!(text.lines().count() < 3000);
    assert!(twofold_projections::audit::verify(&text).is_err());

    let metrics = crate::metrics::scrape(app.metrics_addr).await;
    let stalled = crate::metrics::value(&metrics, "twofold_audit_exports_stalled_total");
    assert_eq!(stalled, Some(1.0), "{metrics}");
}

/// What `twofold audit verify` decides for a file (the binary's own test,
/// `services/twofold/tests/cli.rs`, checks it answers the same).
fn verify_cli(file: &std::path::Path) -> bool {
    twofold_projections::audit::verify(&std::fs::read_to_string(file).unwrap()).is_ok()
}

#[tokio::test]
async fn the_directory_counts_up_to_its_limit_and_then_says_more_than() {
    let app = crate::helpers::spawn_app_with(|c| c.directory_count_limit = 3).await;
    let admin = app.admin_token().await;
    for name in ["amy_b", "amyxb", "bob", "cy", "dee"] {
        app.create_user(
            &admin,
            json!({"username": name, "password": "correct horse battery"}),
        )
        .await;
    }
    rebuild(&app).await;
    let page = |p: u32| format!("/users?per_page=2&page={p}");
    let total = |v: &Value| (v["total"].clone(), v["total_capped"].clone());
    let names = |v: &Value| -> Vec<String> {
        v["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["username"].as_str().unwrap().to_string())
            .collect()
    };

    // Six users (the admin and five) on pages of two: counting stops past 3.
    let first = get(&app, &admin, &page(1)).await;
    assert_eq!(names(&first), ["amy_b", "amyxb"]);
    assert_eq!(total(&first), (json!(4), json!(true)));
    // Past the limit, the total is one more than the rows through the page,
    // so a next page shows.
    let second = get(&app, &admin, &page(2)).await;
    assert_eq!(names(&second), ["bob", "cy"]);
    assert_eq!(total(&second), (json!(5), json!(true)));
    // The last page knows the whole count, whatever the limit.
    let last = get(&app, &admin, &page(3)).await;
    assert_eq!(last["users"].as_array().unwrap().len(), 2);
    assert_eq!(total(&last), (json!(6), json!(false)));
    let all = get(&app, &admin, "/users").await;
    assert_eq!(total(&all), (json!(6), json!(false)));
    // Past the end: no rows, and the count up to the limit.
    let beyond = get(&app, &admin, &page(9)).await;
    assert_eq!(names(&beyond), Vec::<String>::new());
    assert_eq!(total(&beyond), (json!(4), json!(true)));
    // Under the limit the count is exact, and `q` matches its text
    // literally (`_` is not a wildcard).
    let amy = get(&app, &admin, "/users?q=AMY&per_page=1").await;
    assert_eq!(total(&amy), (json!(2), json!(false)));
    let underscore = get(&app, &admin, "/users?q=y_").await;
    assert_eq!(names(&underscore), ["amy_b"]);
    assert_eq!(underscore["total"], 1);
}
