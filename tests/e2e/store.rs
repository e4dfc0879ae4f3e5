//! The event store under concurrency: appends of concurrent requests written
//! together in one statement, each stream all or nothing and in order; and
//! verifiers that remember states still deciding on the current ones when
//! another verifier has moved them on.

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use twofold_domain::user::{User, UserCommand, UserEvent};
use twofold_domain::{Actor, Ctx};
use twofold_platform::store::{Basis, Store};

use crate::helpers::{settings_on, spawn_app, start_time, TestApp};

const PASSWORD: &str = "correct horse battery";

async fn users(app: &TestApp, admin: &str, prefix: &str, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let name = format!("{prefix}{i}");
        let id = app
            .create_user(
                admin,
                json!({"username": name, "password": PASSWORD, "email": format!("{name}@acme.test")}),
            )
            .await;
        out.push((name, id));
    }
    out
}

#[tokio::test]
async fn concurrent_sign_ins_of_many_users_each_keep_a_whole_stream_in_order() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let people = users(&app, &admin, "crowd", 24).await;
    // Several rounds of everyone at once: their appends share commits.
    for _ in 0..3 {
        let replies = join_all(people.iter().map(|(name, _)| app.sign_in(name, PASSWORD))).await;
        for r in replies {
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        }
    }
    for (_, id) in &people {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT sequence, global_position FROM events \
             WHERE aggregate_type = 'user' AND aggregate_id = $1 ORDER BY sequence",
        )
        .bind(id)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        // Registered, then three sign-ins of two events each (skipped, session).
        assert_eq!(rows.len(), 7, "every event of every sign-in is there");
        for (k, (sequence, _)) in rows.iter().enumerate() {
            assert_eq!(*sequence, k as i64 + 1, "no gap and no duplicate");
        }
        assert!(
            rows.windows(2).all(|w| w[0].1 < w[1].1),
            "a stream's events are in commit order: {rows:?}"
        );
    }
    // Every event has its outbox entry, once.
    let (events, queued): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events), \
                (SELECT count(*) FROM (SELECT DISTINCT unnest(positions) FROM outbox) p)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(events, queued);
}

#[tokio::test]
async fn a_command_decided_on_a_stale_state_is_decided_again_and_written_once() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (_, id) = users(&app, &admin, "stale", 1).await.remove(0);
    let revoke = || UserCommand::RevokeSessions {
        forget_devices: false,
        ctx: Ctx::new(start_time(), Actor::Operator),
    };
    let store = &app.state.users;
    let other: Store<User> = Store::new(app.pool.clone());
    app.sign_in("stale0", PASSWORD).await;
    // The state as read now, with one session...
    let before = store.load_versioned(&id).await.unwrap();
    let first_session = *before.state.sessions.keys().next().unwrap();
    // ...then another writer ends it, and the user signs in again.
    other.execute(&id, |_| Ok(revoke())).await.unwrap();
    app.sign_in("stale0", PASSWORD).await;
    // Decided on the state read before, the command would end the first
    // session: its claim of the next sequence finds it taken, nothing of it
    // is written, and it is decided again on the current state.
    let stale = Basis {
        versioned: before.clone(),
        fresh: true,
    };
    let written = store
        .execute_with(&id, Some(stale), &[], |_| Ok(revoke()))
        .await
        .unwrap();
    let [UserEvent::SessionsRevoked { session_ids, .. }] = written.as_slice() else {
        panic!("one SessionsRevoked, not {written:?}");
    };
    assert_eq!(session_ids.len(), 1);
    assert_ne!(session_ids[0], first_session, "the current session ended");
    let sequences: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM events WHERE aggregate_type = 'user' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(&id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let expected: Vec<i64> = (1..=sequences.len() as i64).collect();
    assert_eq!(sequences, expected, "no gap and no duplicate");
    let replayed = store.replay(&id).await.unwrap();
    assert_eq!(
        store.load_versioned(&id).await.unwrap().state,
        replayed.state
    );
    assert!(replayed.state.sessions.is_empty());
}

#[tokio::test]
async fn a_challenge_opened_on_one_verifier_is_answered_on_another_that_remembers_the_user() {
    let a = spawn_app().await;
    let b = a.twin().await;
    let admin = a.admin_token().await;
    users(&a, &admin, "twin", 1).await;
    a.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    // A remembers the user as it signs in...
    let first = a.sign_in("twin0", PASSWORD).await;
    assert_eq!(first.body["status"], "challenge");
    // ...B opens a second challenge, which A's memory does not have.
    let second = b.sign_in("twin0", PASSWORD).await;
    let token = second.body["challenge"]["token"].as_str().unwrap();
    let code = a.delivered_code(token).await;
    let answered = a
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    assert_eq!(answered.status, StatusCode::OK, "{:?}", answered.body);
    assert_eq!(answered.body["status"], "signed_in");
}

#[tokio::test]
async fn a_settings_change_through_another_verifier_applies_at_the_next_sign_in() {
    let a = spawn_app().await;
    let b = a.twin().await;
    let admin = a.admin_token().await;
    users(&a, &admin, "policy", 1).await;
    // A remembers the tenant with 2FA off.
    let before = a.sign_in("policy0", PASSWORD).await;
    assert_eq!(before.body["status"], "signed_in");
    // B switches it on.
    let changed = b
        .set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{:?}", changed.body);
    let after = a.sign_in("policy0", PASSWORD).await;
    assert_eq!(after.status, StatusCode::OK, "{:?}", after.body);
    assert_eq!(
        after.body["status"], "challenge",
        "the sign-in after the change asks for the second factor"
    );
}

#[tokio::test]
async fn a_lockout_through_another_verifier_holds_on_one_that_remembers_the_user() {
    let a = spawn_app().await;
    let b = a.twin().await;
    let admin = a.admin_token().await;
    users(&a, &admin, "locked", 1).await;
    a.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    let first = a.sign_in("locked0", PASSWORD).await;
    assert_eq!(first.body["status"], "challenge");
    // Three wrong codes through B lock the user out.
    let challenge = b.sign_in("locked0", PASSWORD).await;
    let token = challenge.body["challenge"]["token"].as_str().unwrap();
    let right = b.delivered_code(token).await;
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    for _ in 0..3 {
        b.post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": wrong}),
        )
        .await;
    }
    let refused = a.sign_in("locked0", PASSWORD).await;
    assert_eq!(refused.status, StatusCode::LOCKED, "{:?}", refused.body);
    assert_eq!(refused.code(), "account_locked");
}

/// The username claim and the user's first events are one transaction: a
/// connection killed by PostgreSQL after the claim is written, while the
/// events are being written, leaves the name free (no compensating step
/// exists to forget), and the same name can then be registered.
#[tokio::test]
async fn a_registration_killed_between_claim_and_events_leaves_the_name_free() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    // Kills the writing backend in the middle of its insert of the first event.
    sqlx::raw_sql(
        "CREATE FUNCTION die_on_register() RETURNS trigger AS $$ \
         BEGIN \
           IF NEW.event_type = 'UserRegistered' THEN \
             PERFORM pg_terminate_backend(pg_backend_pid()); \
           END IF; \
           RETURN NEW; \
         END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER die_on_register BEFORE INSERT ON events \
           FOR EACH ROW EXECUTE FUNCTION die_on_register();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let body = json!({"username": "dora", "password": "correct horse battery"});
    // (The username is sealed in the event: count registrations instead.)
    let registrations = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'UserRegistered'")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    let registered_before = registrations().await;
    let refused = app.post_auth("/users", &admin, body.clone()).await;
    assert!(
        refused.status.is_server_error(),
        "{} {}",
        refused.status,
        refused.body
    );
    let claims: i64 = sqlx::query_scalar("SELECT count(*) FROM usernames WHERE username = 'dora'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(claims, 0, "the claim must die with its events");
    assert_eq!(registrations().await, registered_before);

    sqlx::raw_sql("DROP TRIGGER die_on_register ON events")
        .execute(&app.pool)
        .await
        .unwrap();
    let created = app.post_auth("/users", &admin, body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(
        app.sign_in("dora", "correct horse battery").await.status,
        StatusCode::OK
    );
}
