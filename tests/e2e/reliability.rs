//! The pipeline under faults: poison messages, failed sends, a hung SMS
//! provider, a lost relay lock, and a rebuild that must change nothing. Each
//! test injects the fault into real parts (PostgreSQL, NATS, an SMTP server,
//! a local SMS provider) and checks what a user or an operator would see.

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::json;
use twofold_platform::Config;
use twofold_projections::consumer::{Consumer, Source as ProjectorSource};
use twofold_projections::store::Builder;
use twofold_relay::Relay;

use twofold_dispatcher::Outcome;

use crate::delivery::{code_in, delivered, run_until, stack, FakeSms, Smtp};
use crate::guarantees::DbProxy;
use crate::helpers::spawn_app;

/// Polls `done` every 100 ms, at most `tries` times; panics with `what`.
pub(crate) async fn eventually(what: &str, tries: usize, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..tries {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn dead_letters(pool: &sqlx::PgPool, consumer: &str) -> Vec<(String, String)> {
    sqlx::query_as("SELECT subject, reason FROM dead_letters WHERE consumer = $1 ORDER BY id")
        .bind(consumer)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_poison_burst_over_the_pending_limit_is_parked_and_codes_still_arrive() {
    let smtp = Smtp::start().await;
    let s = stack(smtp.port, "http://127.0.0.1:9").await;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login"}),
        "pia",
        false,
    )
    .await;
    // More garbage than a consumer may hold unacknowledged (1,000), on the
    // subjects both the dispatcher and the projector read, and an event of
    // an unknown newer version.
    let js = async_nats::jetstream::new(async_nats::connect(&s.config.nats_url).await.unwrap());
    let prefix = &s.config.nats_subject_prefix;
    let mut acks = Vec::new();
    for n in 0..1_050 {
        let body = match n % 3 {
            0 => format!("not an event {n}"),
            1 => format!("{{\"global_position\": {n}}}"),
            _ => "\u{0}\u{1}binary".to_string(),
        };
        let subject = format!("{prefix}.events.none.user.Garbage");
        acks.push(js.publish(subject, body.into()).await.unwrap());
    }
    let newer = json!({
        "global_position": 1, "aggregate_type": "user",
        "aggregate_id": "6f1c0d3e-0000-4000-8000-000000000001", "sequence": 1,
        "event_type": "ChallengeIssued", "event_version": "2.0", "tenant_id": null,
        "recorded_at": "2026-03-01T12:00:00Z", "payload": {"ChallengeIssued": {"shape": "to come"}}
    });
    acks.push(
        js.publish(
            format!("{prefix}.events.none.user.ChallengeIssued"),
            newer.to_string().into(),
        )
        .await
        .unwrap(),
    );
    for ack in acks {
        ack.await.unwrap();
    }

    let dispatcher = s.dispatcher().await;
    tokio::spawn(dispatcher.run_until_stopped(std::future::pending()));
    let projector_source = ProjectorSource {
        nats_url: s.config.nats_url.clone(),
        stream: s.config.nats_stream.clone(),
        filter_subject: format!("{prefix}.events.>"),
        durable: format!("{}p", s.source.durable),
        ack_wait: Duration::from_secs(1),
    };
    let projector = Consumer::connect(
        s.app.pool.clone(),
        s.app.state.personal.clone(),
        &projector_source,
    )
    .await
    .unwrap();
    tokio::spawn(projector.run_until_stopped(std::future::pending()));

    // A real sign-in after the burst: its code arrives.
    let token = s.challenge("pia").await;
    eventually("the code's email", 600, async || {
        !smtp.mails_to("pia@acme.test").is_empty()
    })
    .await;
    let code = code_in(&smtp.mails_to("pia@acme.test")[0]).unwrap();
    assert_eq!(s.verify(&token, &code).await, StatusCode::OK);

    // Every poison message is parked, once, with its reason, by each consumer.
    let parked = dead_letters(&s.app.pool, &s.source.durable).await;
    assert_eq!(parked.len(), 1_051, "the dispatcher parked each one once");
    assert!(
        parked
            .iter()
            .any(|(_, reason)| reason.contains("not an event")),
        "{:?}",
        &parked[..3]
    );
    let newer_reason = &parked
        .iter()
        .find(|(subject, _)| subject.ends_with("ChallengeIssued"))
        .unwrap()
        .1;
    assert!(
        newer_reason.contains("version 2.0, newer"),
        "{newer_reason}"
    );
    let projector = projector_source.durable.clone();
    eventually("the projector's dead letters", 300, async || {
        dead_letters(&s.app.pool, &projector).await.len() == 1_051
    })
    .await;
    // The projector went on too: the user's row has the sign-in.
    eventually("the directory row", 300, async || {
        let last: Option<Option<chrono::DateTime<chrono::Utc>>> =
            sqlx::query_scalar("SELECT last_sign_in_at FROM rm_users WHERE username = 'pia'")
                .fetch_optional(&s.app.pool)
                .await
                .unwrap();
        matches!(last, Some(Some(_)))
    })
    .await;
    let metrics = s.app.metrics().await;
    let line = format!(
        "twofold_dead_letters_total{{consumer=\"{}\"}} 1051",
        s.source.durable
    );
    assert!(metrics.contains(&line), "{line} in the metrics");
}

#[tokio::test]
async fn failed_sends_do_not_use_up_the_recipients_hourly_limit() {
    // SMTP is down: the port is kept free for the server that comes later.
    let port = crate::delivery::free_port();
    let mut s = stack(port, "http://127.0.0.1:9").await;
    s.config.recipient_limit_per_hour = 3;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login"}),
        "quinn",
        false,
    )
    .await;
    let d = s.dispatcher().await;
    // Four sign-ins, each tried twice and failed: eight failed sends, more
    // than the hourly limit of three.
    for n in 1..=4 {
        s.challenge("quinn").await;
        run_until(&d, |o| {
            o.iter().filter(|x| matches!(x, Outcome::Failed(_))).count() == 1
        })
        .await;
        s.app.clock.advance(chrono::Duration::seconds(1));
        assert_eq!(s.delivery_events("DeliveryFailed").await.len(), n);
    }
    for failed in s.delivery_events("DeliveryFailed").await {
        let reason = failed["reason"].as_str().unwrap();
        assert!(reason.starts_with("SMTP"), "{reason}");
    }
    // SMTP is back: the next sign-in's code arrives.
    let smtp = Smtp::start_on(port).await;
    let token = s.challenge("quinn").await;
    run_until(&d, |o| delivered(o) == 1).await;
    let mails = smtp.mails_to("quinn@acme.test");
    assert_eq!(mails.len(), 1);
    let code = code_in(&mails[0]).unwrap();
    assert_eq!(s.verify(&token, &code).await, StatusCode::OK);
}

#[tokio::test]
async fn with_the_sms_provider_hung_the_circuit_opens_and_codes_go_by_email_untried() {
    let smtp = Smtp::start().await;
    let sms = FakeSms::default();
    let url = sms.start().await;
    let mut s = stack(smtp.port, &url).await;
    s.config.sms_timeout_ms = 300;
    s.config.sms_breaker_failures = 3;
    s.config.sms_breaker_cooldown_secs = 30;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login", "allowed_methods": ["sms"],
               "default_method": "sms", "sms_provider": "test-sms"}),
        "rhea",
        true,
    )
    .await;
    let d = s.dispatcher().await;
    sms.hanging.store(true, Ordering::SeqCst);
    // Eight codes while the provider hangs: the first three wait for it and
    // time out, the rest go by email without trying it.
    for n in 1..=8 {
        s.challenge("rhea").await;
        run_until(&d, |o| delivered(o) == 1).await;
        assert_eq!(smtp.mails_to("rhea@acme.test").len(), n);
        s.app.clock.advance(chrono::Duration::seconds(1));
    }
    assert_eq!(
        sms.attempts.load(Ordering::SeqCst),
        3,
        "tries of the provider"
    );
    let reasons: Vec<String> = s
        .delivery_events("DeliveryFellBack")
        .await
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons.len(), 8);
    assert!(
        reasons[..3].iter().all(|r| r.contains("timed out")),
        "{reasons:?}"
    );
    assert!(
        reasons[3..].iter().all(|r| r.contains("circuit open")),
        "{reasons:?}"
    );
    let metrics = s.app.metrics().await;
    assert!(
        metrics.contains("twofold_sms_circuit_open{provider=\"test-sms\"} 1"),
        "the open circuit in the metrics"
    );

    // The provider recovers; after the cooldown one code probes it, and it
    // is used again.
    sms.hanging.store(false, Ordering::SeqCst);
    s.app.clock.advance(chrono::Duration::seconds(30));
    for n in 1..=2 {
        let token = s.challenge("rhea").await;
        run_until(&d, |o| delivered(o) == 1).await;
        assert_eq!(sms.sent.lock().unwrap().len(), n);
        let code = sms.sent.lock().unwrap()[n - 1]["Body"][..6].to_string();
        assert_eq!(s.verify(&token, &code).await, StatusCode::OK);
        s.app.clock.advance(chrono::Duration::seconds(1));
    }
    assert_eq!(sms.attempts.load(Ordering::SeqCst), 5);
}

/// Relays holding the relay's advisory lock in the test's database.
async fn lock_holders(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND classid = 1953984358 AND objid = 1869374578 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn outbox_drained(pool: &sqlx::PgPool) {
    eventually("the outbox to drain", 300, async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(pool)
            .await
            .unwrap();
        n == 0
    })
    .await;
}

#[tokio::test]
async fn after_a_database_cut_one_of_two_relays_publishes_and_every_event_once() {
    let app = spawn_app().await;
    let proxy = DbProxy::start(0).await;
    let through_proxy = app
        .config
        .database_url
        .expose_secret()
        .replace(":5432/", &format!(":{}/", proxy.port));
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = Config {
        nats_url: std::env::var("TWOFOLD_TEST_NATS_URL")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        nats_stream: format!("R{id}"),
        nats_subject_prefix: format!("r{id}"),
        ..Config::default()
    };
    let mut published = Vec::new();
    for _ in 0..2 {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&through_proxy)
            .await
            .unwrap();
        let relay = Relay::connect(pool, &config).await.unwrap();
        published.push(relay.published());
        tokio::spawn(async move {
            let _ = relay.run_until_stopped(std::future::pending()).await;
        });
    }
    let admin = app.admin_token().await;
    let user = async |name: String| {
        app.create_user(
            &admin,
            json!({"username": name, "password": "correct horse battery"}),
        )
        .await;
    };
    for n in 0..3 {
        user(format!("before{n}")).await;
    }
    outbox_drained(&app.pool).await;
    assert_eq!(lock_holders(&app.pool).await, 1);

    // PostgreSQL goes away for the relays (the verifier still reaches it,
    // so events keep coming) and comes back.
    let port = proxy.cut().await;
    for n in 0..3 {
        user(format!("during{n}")).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _proxy = DbProxy::start(port).await;
    outbox_drained(&app.pool).await;
    // Longer than a relay's longest back-off (5 s): a relay that would
    // publish has come back to it by now.
    tokio::time::sleep(Duration::from_secs(6)).await;

    // Afterwards exactly one relay holds the lock, and only it publishes.
    assert_eq!(lock_holders(&app.pool).await, 1);
    let counts = || -> Vec<u64> {
        published
            .iter()
            .map(|p| p.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    };
    let before = counts();
    let events_before = twofold_platform::db::count_events(&app.pool).await.unwrap();
    for n in 0..5 {
        user(format!("after{n}")).await;
    }
    outbox_drained(&app.pool).await;
    let new_events = twofold_platform::db::count_events(&app.pool).await.unwrap() - events_before;
    let moved: Vec<u64> = counts().iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(
        moved.contains(&0) && moved.contains(&(new_events as u64)),
        "one relay published all {new_events} new events: {moved:?}"
    );
    assert_eq!(lock_holders(&app.pool).await, 1);

    // Every event is on the stream, once.
    let js = async_nats::jetstream::new(async_nats::connect(&config.nats_url).await.unwrap());
    let mut stream = js.get_stream(&config.nats_stream).await.unwrap();
    let messages = stream.info().await.unwrap().state.messages;
    let events = twofold_platform::db::count_events(&app.pool).await.unwrap();
    assert_eq!(messages, events as u64);
}

/// The tenant's audit export (NDJSON), as the operator's CLI writes it: an
/// export over HTTP is itself recorded (`AuditRead`), which would put a new
/// entry between two exports.
async fn audit_export(app: &crate::helpers::TestApp, _admin: &str) -> String {
    use futures::StreamExt;
    let q = twofold_projections::queries::AuditQuery {
        format: Some("ndjson".to_string()),
        ..Default::default()
    };
    let (_, lines) = app
        .state
        .operator_audit_export(app.tenant_id, q)
        .await
        .unwrap();
    let lines: Vec<_> = lines.collect().await;
    lines.into_iter().map(Result::unwrap).collect()
}

#[tokio::test]
async fn a_rebuild_reproduces_the_live_audit_history_and_its_export_head() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    // Event times below the microsecond, some rounding up and some down:
    // the live path and the rebuild must store each the same.
    app.clock
        .set(crate::helpers::start_time() + chrono::Duration::nanoseconds(123_456_789));
    for n in 0..4 {
        app.clock.advance(chrono::Duration::nanoseconds(250_300));
        app.create_user(
            &admin,
            json!({"username": format!("tia{n}"), "password": "correct horse battery"}),
        )
        .await;
        app.sign_in(&format!("tia{n}"), "correct horse battery")
            .await;
    }
    // The live path: relay and projector over JetStream.
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = Config {
        nats_url: std::env::var("TWOFOLD_TEST_NATS_URL")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        nats_stream: format!("P{id}"),
        nats_subject_prefix: format!("p{id}"),
        ..Config::default()
    };
    let relay = Relay::connect(app.pool.clone(), &config).await.unwrap();
    twofold_relay::ensure_stream(
        relay.jetstream(),
        &config.nats_stream,
        &config.nats_subject_prefix,
    )
    .await
    .unwrap();
    tokio::spawn(async move {
        let _ = relay.run_until_stopped(std::future::pending()).await;
    });
    let source = ProjectorSource {
        nats_url: config.nats_url.clone(),
        stream: config.nats_stream.clone(),
        filter_subject: format!("{}.events.>", config.nats_subject_prefix),
        durable: format!("p{id}"),
        ack_wait: Duration::from_secs(1),
    };
    let projector = Consumer::connect(app.pool.clone(), app.state.personal.clone(), &source)
        .await
        .unwrap();
    tokio::spawn(projector.run_until_stopped(std::future::pending()));
    let events = twofold_platform::db::count_events(&app.pool).await.unwrap();
    eventually("the audit builder to apply every event", 300, async || {
        let applied: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(sequence), 0)::bigint FROM projection_positions WHERE projection = 'audit'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        applied == events
    })
    .await;
    let sub_micro: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE (payload::jsonb -> (event_type) -> 'ctx' ->> 'at') LIKE '%.123%'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(sub_micro > 0, "events with times below the microsecond");

    let live = audit_export(&app, &admin).await;
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
    let rebuilt = audit_export(&app, &admin).await;
    let head = |export: &str| twofold_projections::audit::verify(export).unwrap().head;
    assert_eq!(
        head(&live),
        head(&rebuilt),
        "the export head survives a rebuild"
    );
    assert_eq!(live, rebuilt);
}

#[tokio::test]
async fn the_stream_is_bounded_by_the_configured_age_size_and_replicas() {
    let app = spawn_app().await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut config = Config {
        nats_url: std::env::var("TWOFOLD_TEST_NATS_URL")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        nats_stream: format!("L{id}"),
        nats_subject_prefix: format!("l{id}"),
        ..Config::default()
    };
    assert_eq!(
        config.nats_stream_max_age_secs,
        30 * 24 * 3600,
        "the default"
    );
    config.nats_stream_max_age_secs = 3600;
    config.nats_stream_max_bytes = 1 << 20;
    // A stream an older relay made, without limits.
    let js = async_nats::jetstream::new(async_nats::connect(&config.nats_url).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: config.nats_stream.clone(),
        subjects: vec![format!("{}.events.>", config.nats_subject_prefix)],
        ..Default::default()
    })
    .await
    .unwrap();
    let relay = Relay::connect(app.pool.clone(), &config).await.unwrap();
    tokio::spawn(async move {
        let _ = relay.run_until_stopped(std::future::pending()).await;
    });
    outbox_drained(&app.pool).await;
    let mut stream = js.get_stream(&config.nats_stream).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.max_age, Duration::from_secs(3600));
    assert_eq!(info.config.max_bytes, 1 << 20);
    assert_eq!(info.config.num_replicas, 1);
    let events = twofold_platform::db::count_events(&app.pool).await.unwrap();
    assert_eq!(info.state.messages, events as u64, "every event went out");
    // The limit reserves server storage: give it back.
    js.delete_stream(&config.nats_stream).await.unwrap();
}

#[tokio::test]
async fn an_event_the_projector_cannot_apply_is_parked_and_the_others_go_on() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let ava = app
        .create_user(
            &admin,
            json!({"username": "ava", "password": "correct horse battery"}),
        )
        .await;
    // An event of a newer version in ava's stream, as a newer verifier
    // would write it.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'user', $1, max(sequence) + 1, 'FutureThing', '2.0', '{\"FutureThing\": {}}', '{}' \
         FROM events WHERE aggregate_type = 'user' AND aggregate_id = $1",
    )
    .bind(&ava)
    .execute(&app.pool)
    .await
    .unwrap();
    // And one of a known type in a newer version, whose shape happens to
    // parse: not folded by guesswork either.
    let cyd = app
        .create_user(
            &admin,
            json!({"username": "cyd", "password": "correct horse battery"}),
        )
        .await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'user', $1, \
           (SELECT max(sequence) + 1 FROM events WHERE aggregate_type = 'user' AND aggregate_id = $1), \
           event_type, '2.0', payload, metadata \
         FROM events WHERE aggregate_type = 'user' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(&cyd)
    .execute(&app.pool)
    .await
    .unwrap();

    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = Config {
        nats_url: std::env::var("TWOFOLD_TEST_NATS_URL")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        nats_stream: format!("F{id}"),
        nats_subject_prefix: format!("f{id}"),
        ..Config::default()
    };
    let relay = Relay::connect(app.pool.clone(), &config).await.unwrap();
    twofold_relay::ensure_stream(
        relay.jetstream(),
        &config.nats_stream,
        &config.nats_subject_prefix,
    )
    .await
    .unwrap();
    tokio::spawn(async move {
        let _ = relay.run_until_stopped(std::future::pending()).await;
    });
    let source = ProjectorSource {
        nats_url: config.nats_url.clone(),
        stream: config.nats_stream.clone(),
        filter_subject: format!("{}.events.>", config.nats_subject_prefix),
        durable: format!("f{id}"),
        ack_wait: Duration::from_millis(200),
    };
    let durable = source.durable.clone();
    // The projector's consumer as an older version made it: unlimited deliveries.
    let js = async_nats::jetstream::new(async_nats::connect(&config.nats_url).await.unwrap());
    let stream = js.get_stream(&config.nats_stream).await.unwrap();
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(durable.clone()),
            filter_subject: source.filter_subject.clone(),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let projector = Consumer::connect(app.pool.clone(), app.state.personal.clone(), &source)
        .await
        .unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(&durable).await.unwrap();
    assert_eq!(
        consumer.info().await.unwrap().config.max_deliver,
        twofold_platform::dead_letters::MAX_DELIVER,
        "the older consumer is brought to a finite max_deliver"
    );
    tokio::spawn(projector.run_until_stopped(std::future::pending()));

    // Events after it, of other streams, are applied.
    app.create_user(
        &admin,
        json!({"username": "bea", "password": "correct horse battery"}),
    )
    .await;
    eventually("bea's directory row", 300, async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_users WHERE username = 'bea'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        n == 1
    })
    .await;
    // The event it cannot apply is parked after its deliveries, with why.
    eventually("the parked events", 300, async || {
        dead_letters(&app.pool, &durable).await.len() >= 2
    })
    .await;
    let parked = dead_letters(&app.pool, &durable).await;
    assert_eq!(parked.len(), 2, "{parked:?}");
    let future = parked
        .iter()
        .find(|(subject, _)| subject.ends_with(".user.FutureThing"))
        .unwrap();
    assert!(
        future.1.starts_with("failed on all 5 deliveries") && future.1.contains("FutureThing"),
        "{future:?}"
    );
    let newer = parked
        .iter()
        .find(|(subject, _)| subject.ends_with(".user.UserRegistered"))
        .unwrap();
    assert!(
        newer
            .1
            .contains("UserRegistered of version 2.0, newer than this projector reads"),
        "{newer:?}"
    );
}

#[tokio::test]
async fn an_event_missing_behind_later_ones_shows_in_the_unapplied_count() {
    let app = spawn_app().await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = Config {
        nats_url: std::env::var("TWOFOLD_TEST_NATS_URL")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        nats_stream: format!("U{id}"),
        nats_subject_prefix: format!("u{id}"),
        ..app.config.clone()
    };
    let relay = Relay::connect(app.pool.clone(), &config).await.unwrap();
    twofold_relay::ensure_stream(
        relay.jetstream(),
        &config.nats_stream,
        &config.nats_subject_prefix,
    )
    .await
    .unwrap();
    tokio::spawn(async move {
        let _ = relay.run_until_stopped(std::future::pending()).await;
    });
    let projector = twofold_projections::consumer::Projector::build(&config)
        .await
        .unwrap();
    tokio::spawn(projector.run_until_stopped(std::future::pending()));
    let unapplied = async |builder| {
        twofold_projections::consumer::unapplied_events(&app.pool, builder)
            .await
            .unwrap()
    };
    let all_applied =
        async || unapplied(Builder::Directory).await == 0 && unapplied(Builder::Audit).await == 0;
    eventually("the projector to catch up", 300, all_applied).await;

    // An event the projector has not got (as if a projector that died held
    // it until its ack wait), then later ones it gets.
    let mut tx = app.pool.begin().await.unwrap();
    let position: i64 = sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('probe', 'p1', 1, 'Probed', '1.0', '{\"Probed\": {}}', '{}') RETURNING global_position",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::query("DELETE FROM outbox WHERE $1 = ANY(positions)")
        .bind(position)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let admin = app.admin_token().await;
    app.create_user(
        &admin,
        json!({"username": "uma", "password": "correct horse battery"}),
    )
    .await;
    eventually("uma's row", 300, async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_users WHERE username = 'uma'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        n == 1
    })
    .await;
    eventually("the later events applied", 300, async || {
        unapplied(Builder::Directory).await == 1 && unapplied(Builder::Audit).await == 1
    })
    .await;
    // The progress position says "at the head"; the unapplied count and its
    // gauge say one is missing.
    let freshness = twofold_projections::queries::freshness(&app.pool)
        .await
        .unwrap();
    assert!(
        freshness
            .iter()
            .all(|f| f.applied_position == f.head_position),
        "{freshness:?}"
    );
    eventually("the gauge", 300, async || {
        let metrics = app.metrics().await;
        metrics.contains("twofold_projection_unapplied_events{builder=\"directory\"} 1")
            && metrics.contains("twofold_projection_unapplied_events{builder=\"audit\"} 1")
    })
    .await;

    // It arrives: nothing is missing any more.
    sqlx::query("INSERT INTO outbox (positions) VALUES (ARRAY[$1::bigint])")
        .bind(position)
        .execute(&app.pool)
        .await
        .unwrap();
    eventually("the missing event applied", 300, all_applied).await;
}

#[tokio::test]
async fn under_load_a_hung_provider_costs_a_few_timeouts_not_one_per_code() {
    let smtp = Smtp::start().await;
    let sms = FakeSms::default();
    let url = sms.start().await;
    let mut s = stack(smtp.port, &url).await;
    s.config.sms_timeout_ms = 300;
    s.config.sms_breaker_failures = 3;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login", "allowed_methods": ["sms"],
               "default_method": "sms", "sms_provider": "test-sms"}),
        "load0",
        true,
    )
    .await;
    let admin = s.app.admin_token().await;
    const USERS: usize = 12;
    for n in 1..USERS {
        s.app
            .create_user(
                &admin,
                json!({"username": format!("load{n}"), "password": "correct horse battery",
                       "email": format!("load{n}@acme.test"), "phone": format!("+49151000000{n:02}")}),
            )
            .await;
    }
    sms.hanging.store(true, Ordering::SeqCst);
    let dispatcher = s.dispatcher().await;
    tokio::spawn(dispatcher.run_until_stopped(std::future::pending()));
    for n in 0..USERS {
        s.challenge(&format!("load{n}")).await;
    }
    eventually("every code by email", 600, async || {
        (0..USERS).all(|n| smtp.mails_to(&format!("load{n}@acme.test")).len() == 1)
    })
    .await;
    // At most the jobs already under way when the circuit opened waited
    // for the provider: the failures that open it, plus the others then in
    // flight.
    let tried = sms.attempts.load(Ordering::SeqCst);
    let bound = 3 + s.source.concurrency - 1;
    assert!(
        (3..=bound).contains(&tried),
        "{tried} tries of the provider for {USERS} codes"
    );
    assert_eq!(s.delivery_events("DeliveryFellBack").await.len(), USERS);
}

#[tokio::test]
async fn a_code_waits_out_a_database_outage_held_not_redelivered_or_parked() {
    let smtp = Smtp::start().await;
    let s = stack(smtp.port, "http://127.0.0.1:9").await;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login"}),
        "hal",
        false,
    )
    .await;
    // The dispatcher reaches PostgreSQL through a proxy that is cut.
    let proxy = DbProxy::start(0).await;
    let through_proxy = s
        .app
        .config
        .database_url
        .expose_secret()
        .replace(":5432/", &format!(":{}/", proxy.port));
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&through_proxy)
        .await
        .unwrap();
    let dispatcher = twofold_dispatcher::Dispatcher::connect(
        pool,
        &s.config,
        &s.source,
        std::sync::Arc::new(s.app.clock.clone()),
    )
    .await
    .unwrap();
    tokio::spawn(dispatcher.run_until_stopped(std::future::pending()));
    let port = proxy.cut().await;
    let token = s.challenge("hal").await;
    // Longer than the ack wait (1 s) and the backoff of several deliveries.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(smtp.mails_to("hal@acme.test").is_empty());
    let _proxy = DbProxy::start(port).await;
    eventually("the code's email", 600, async || {
        !smtp.mails_to("hal@acme.test").is_empty()
    })
    .await;
    let code = code_in(&smtp.mails_to("hal@acme.test")[0]).unwrap();
    assert_eq!(s.verify(&token, &code).await, StatusCode::OK);
    // Held through the outage: not handed out again, sent once, not parked.
    let js = async_nats::jetstream::new(async_nats::connect(&s.config.nats_url).await.unwrap());
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&s.config.nats_stream)
        .await
        .unwrap()
        .get_consumer(&s.source.durable)
        .await
        .unwrap();
    // Once every event is out and handled, the consumer made one delivery
    // per user event: none was handed out twice.
    outbox_drained(&s.app.pool).await;
    let user_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'user'")
            .fetch_one(&s.app.pool)
            .await
            .unwrap();
    let mut info = consumer.info().await.unwrap().clone();
    for _ in 0..300 {
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        info = consumer.info().await.unwrap().clone();
    }
    assert_eq!(
        info.delivered.consumer_sequence, user_events as u64,
        "each event delivered once (consumer {:?})",
        info.delivered
    );
    assert_eq!(smtp.mails_to("hal@acme.test").len(), 1);
    assert!(dead_letters(&s.app.pool, &s.source.durable)
        .await
        .is_empty());
}
