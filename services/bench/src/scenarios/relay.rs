//! Relay throughput: committed events (with their outbox rows) published to
//! JetStream and acknowledged, against plain JetStream publishes of the same
//! size, acknowledged the same way, in the same run.

use std::time::Instant;

use async_nats::jetstream::context::PublishAckFuture;
use serde_json::json;

use crate::report::Scenario;
use crate::stack::{create_database, drop_database};
use crate::Args;

/// Alternations of baseline and relay.
const ROUNDS: u64 = 4;
/// Events in a relay batch here: its outbox rows of 100 each (the bulk-loaded
/// events came in statements far larger than 100 events).
const BATCH: u64 = twofold_relay::BATCH_ROWS as u64 * 100;

pub async fn run(args: &Args) -> anyhow::Result<Scenario> {
    let events = args.relay_events;
    let name = format!("twofold_bench_{}_relay", std::process::id());
    let url = create_database(&args.admin_url, &name).await?;
    let result = async {
        let pool = twofold_platform::db::pool_options(4).connect(&url).await?;
        twofold_platform::db::migrate(&pool).await?;
        // Sealed as production's events are (the relay sends them as stored).
        let personal = twofold_platform::personal::Personal::new(
            twofold_platform::crypto::Keyring::generate("bench"),
        );
        crate::synthetic::write_events(&pool, &personal, events).await?;
        let id = std::process::id();
        let config = twofold_platform::Config {
            nats_url: args.nats_url.clone(),
            nats_stream: format!("BENCH_RELAY_{id}"),
            nats_subject_prefix: format!("benchrelay{id}"),
            ..twofold_platform::Config::default()
        };
        let relay = twofold_relay::Relay::connect(pool.clone(), &config).await?;
        let js = relay.jetstream().clone();
        twofold_relay::ensure_stream(&js, &config.nats_stream, &config.nats_subject_prefix)
            .await?;

        // Baseline: as many publishes of the relay's own messages (same
        // size, same headers, same subjects), acknowledged the same way: in
        // batches as large as the relay's, one batch's acks awaited while
        // the next is sent.
        eprintln!("twofold-bench: relay and JetStream publishes, {events} events each");
        let sample = relay.read(&[]).await?.events;
        let message_bytes =
            sample.iter().map(|m| m.body.len()).sum::<usize>() / sample.len().max(1);
        // Rounds of baseline publishes and relay publishing, alternating, so
        // that both see the same machine even when its load drifts.
        let per_round = events.div_ceil(ROUNDS);
        let (mut baseline_seconds, mut relay_seconds) = (0.0, 0.0);
        let mut published = 0usize;
        let mut sent = 0u64;
        for _ in 0..ROUNDS {
            let started = Instant::now();
            let round_end = (sent + per_round).min(events);
            let mut waiting: Vec<PublishAckFuture> = Vec::new();
            while sent < round_end {
                let mut acks = Vec::new();
                for _ in 0..BATCH.min(round_end - sent) {
                    let like = &sample[(sent as usize) % sample.len().max(1)];
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("baseline:{sent}").as_str());
                    acks.push(
                        js.publish_with_headers(
                            format!("{}.baseline", like.subject),
                            headers,
                            like.body.clone().into(),
                        )
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                    );
                    sent += 1;
                }
                for ack in std::mem::replace(&mut waiting, acks) {
                    ack.await.map_err(|e| anyhow::anyhow!("{e}"))?;
                }
            }
            for ack in waiting {
                ack.await.map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            baseline_seconds += started.elapsed().as_secs_f64();

            let started = Instant::now();
            published += relay.drain_at_most(per_round as usize).await?;
            relay_seconds += started.elapsed().as_secs_f64();
        }
        let baseline = sent as f64 / baseline_seconds;
        let rate = published as f64 / relay_seconds;
        if (published as u64) < events {
            anyhow::bail!("the relay published {published} of {events} events");
        }
        let _ = js.delete_stream(&config.nats_stream).await;
        pool.close().await;
        anyhow::Ok(Scenario {
            name: format!("relay throughput, {published} events"),
            value: rate,
            unit: "events/s".into(),
            baseline: Some(baseline),
            baseline_unit: Some("JetStream publishes/s (acked)".into()),
            ratio: Some(rate / baseline),
            target: "ratio >= 0.7".into(),
            met: rate / baseline >= 0.7,
            details: json!({"message_bytes": message_bytes, "batch": BATCH, "batches_in_flight": 2, "rounds": ROUNDS}),
        })
    }
    .await;
    if !args.keep {
        drop_database(&args.admin_url, &name).await;
    }
    result
}
