//! The pipeline under faults: poison messages, failed sends, a hung SMS
//! provider, a lost relay lock, and a rebuild that must change nothing. Each
//! test injects the fault into real parts (PostgreSQL, NATS, an SMTP server,
//! a local SMS provider) and checks what a user or an operator would see.

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use twofold_projections::consumer::{Consumer, Source as ProjectorSource};
use twofold_projections::store::Builder;

use twofold_dispatcher::Outcome;

use crate::delivery::{code_in, delivered, run_until, stack, FakeSms, Smtp};

/// Polls `done` every 100 ms, at most `tries` times; panics with `what`.
async fn eventually(what: &str, tries: usize, mut done: impl AsyncFnMut() -> bool) {
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
        durable_prefix: format!("{}p", s.source.durable),
        ack_wait: Duration::from_secs(1),
    };
    let directory = Consumer::connect(s.app.pool.clone(), &projector_source, Builder::Directory)
        .await
        .unwrap();
    tokio::spawn(directory.run_until_stopped(std::future::pending()));

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
    let projector = format!("{}-directory", projector_source.durable_prefix);
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
