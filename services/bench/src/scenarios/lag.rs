//! Projection lag: the time from an event's commit to the moment both read
//! models (directory and audit) have it, through the whole pipeline (outbox,
//! relay, JetStream, projector), at half the peak event rate.
//!
//! The peak is measured first, in the same run: the events per second the
//! whole pipeline carries from commit into both read models when 16 writers
//! commit sign-ins as fast as they can (events written, over the time until
//! the read models have them all: above that rate the lag only grows). The
//! writers decide each sign-in on the user's state as they remember it, as
//! verifiers do, rather than reading the user first. Then
//! sign-ins are committed on a fixed schedule (open loop) at half that event
//! rate, and each event's lag is the time from its commit returning to the
//! projector's commit of it, on the same clock (this process runs the
//! writers, the relay and the projector, and reads the wall clock for all
//! of them). Each lag is split into its hops: commit to the relay's publish
//! (the time the relay stamps on the message), publish to the projector
//! taking the message from its subscription, and from there to its commit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use serde_json::json;
use tokio::sync::watch;
use twofold_domain::tenant::TwoFactorSettings;
use twofold_domain::user::User;
use twofold_domain::TenantId;
use twofold_platform::crypto::Keyring;
use twofold_platform::store::Store;
use twofold_projections::consumer::{Consumer, Source, Step};
use twofold_projections::store::Builder;
use uuid::Uuid;

use crate::load::{closed_loop, open_loop};
use crate::report::{percentile, Scenario};
use crate::seed::{Profile, Seeded, Seeder};
use crate::stack::{analyze_filled, create_database, drop_database};
use crate::{wall_now, Args};

const USERS: usize = 2_000;
const PEAK_WRITERS: usize = 16;
const TARGET_P99_MS: f64 = 20.0;

/// When each event (stream, sequence) committed, as the writer saw it.
type Commits = Arc<Mutex<HashMap<(String, i64), DateTime<Utc>>>>;
/// Each builder's application of each event.
type Applied = Arc<Mutex<HashMap<(String, i64), Vec<Arrival>>>>;

/// How an event reached a read model.
#[derive(Clone, Copy)]
struct Arrival {
    /// When the relay published the event's message (its header), if the
    /// batch that applied the event held that message.
    published: Option<DateTime<Utc>>,
    /// When the projector took the batch from its subscription.
    received: DateTime<Utc>,
    /// When the batch's transaction committed.
    committed: DateTime<Utc>,
}

/// Notes what a projector step applied.
fn note(applied: &Applied, step: &Step) {
    let Some(received) = step.received else {
        return;
    };
    let published: HashMap<(&str, i64), DateTime<Utc>> = step
        .messages
        .iter()
        .filter_map(|(t, at)| Some(((t.aggregate_id.as_str(), t.sequence), (*at)?)))
        .collect();
    let mut applied = applied.lock().unwrap_or_else(|p| p.into_inner());
    for a in &step.applied {
        for r in &a.records {
            applied
                .entry((r.aggregate_id.clone(), r.sequence))
                .or_default()
                .push(Arrival {
                    published: published
                        .get(&(r.aggregate_id.as_str(), r.sequence))
                        .copied(),
                    received,
                    committed: a.committed,
                });
        }
    }
}

pub async fn run(args: &Args) -> anyhow::Result<Scenario> {
    let name = format!("twofold_bench_{}_lag", std::process::id());
    let url = create_database(&args.admin_url, &name).await?;
    let result = measure(args, &url).await;
    if !args.keep {
        drop_database(&args.admin_url, &name).await;
    }
    result
}

async fn measure(args: &Args, url: &str) -> anyhow::Result<Scenario> {
    let pool = twofold_platform::db::pool_options(16).connect(url).await?;
    twofold_platform::db::migrate(&pool).await?;
    let id = std::process::id();
    let config = twofold_platform::Config {
        nats_url: args.nats_url.clone(),
        nats_stream: format!("BENCH_LAG_{id}"),
        nats_subject_prefix: format!("benchlag{id}"),
        ..twofold_platform::Config::default()
    };
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut s: watch::Receiver<bool>| async move {
        let _ = s.changed().await;
    };
    let relay = twofold_relay::Relay::connect(pool.clone(), &config).await?;
    twofold_relay::ensure_stream(
        relay.jetstream(),
        &config.nats_stream,
        &config.nats_subject_prefix,
    )
    .await?;
    let js = relay.jetstream().clone();
    let relay_task = tokio::spawn({
        let stopped = stopped.clone();
        async move { relay.run_until_stopped(until_stopped(stopped)).await }
    });
    let applied: Applied = Arc::default();
    // The server keys the seeder seals personal data with, which the
    // directory builder opens.
    let keys = Keyring::generate("bench");
    let source = Source {
        nats_url: config.nats_url.clone(),
        stream: config.nats_stream.clone(),
        filter_subject: format!("{}.events.>", config.nats_subject_prefix),
        durable: "benchlag".into(),
        ack_wait: Duration::from_secs(30),
    };
    let projector = Consumer::connect(
        pool.clone(),
        twofold_platform::personal::Personal::new(keys.clone()),
        &source,
    )
    .await?;
    // As the projector worker runs it, noting each step.
    let projector_task = tokio::spawn({
        let (applied, stopped) = (applied.clone(), stopped.clone());
        async move {
            projector
                .run_noting(until_stopped(stopped), |step| note(&applied, &step))
                .await
        }
    });

    let seeder = Seeder::new(pool.clone(), keys.clone(), TenantId(Uuid::new_v4())).await?;
    eprintln!("twofold-bench: seeding {USERS} users for the projection lag");
    let users = Arc::new(
        seeder
            .users(
                "lag",
                USERS,
                Profile {
                    email: true,
                    ..Profile::default()
                },
            )
            .await?,
    );
    // The writers stand in for verifiers, which decide on the states they
    // remember (`remembered_streams`) instead of reading each user first,
    // and seal personal data as they do.
    let writers = Store::<User>::remembering(pool.clone(), USERS)
        .sealing(twofold_platform::personal::Personal::new(keys.clone()));
    settle(&pool).await?;
    // Statistics as a database that has been running has them: without
    // them the projector's statements kept plans made while the seeding had
    // just begun, and it read the users' rows by scanning them all.
    analyze_filled(&pool).await?;

    // The peak: sign-ins as fast as the writers can commit them, for as long
    // as the read models then take to have them all.
    eprintln!("twofold-bench: peak event rate, {PEAK_WRITERS} writers");
    let ignore: Commits = Arc::default();
    let started = Instant::now();
    let before = event_count(&pool).await?;
    let peak = closed_loop(PEAK_WRITERS, args.seconds / 2.0, {
        let (writers, users, ignore) = (writers.clone(), users.clone(), ignore.clone());
        move |c, i| {
            let (writers, users, ignore) = (writers.clone(), users.clone(), ignore.clone());
            async move {
                let user = &users[(c + i as usize * PEAK_WRITERS) % users.len()];
                Some(sign_in(&writers, user, &ignore).await)
            }
        }
    })
    .await;
    settle(&pool).await?;
    let written = event_count(&pool).await? - before;
    let peak_events = written as f64 / started.elapsed().as_secs_f64();
    // The peak wrote most users' first snapshots: the measured phase runs
    // with statistics that know of them.
    analyze_filled(&pool).await?;
    let write_peak_events = peak.rate * EVENTS_PER_SIGN_IN as f64;
    applied.lock().unwrap_or_else(|p| p.into_inner()).clear();

    // Half the peak, on a schedule.
    let rate = peak_events / 2.0 / EVENTS_PER_SIGN_IN as f64;
    eprintln!(
        "twofold-bench: projection lag at {:.0} events/s (half of {peak_events:.0})",
        rate * EVENTS_PER_SIGN_IN as f64
    );
    let commits: Commits = Arc::default();
    let writes = open_loop(rate, args.seconds, {
        let (writers, users, commits) = (writers.clone(), users.clone(), commits.clone());
        move |i| {
            let (writers, users, commits) = (writers.clone(), users.clone(), commits.clone());
            async move { sign_in(&writers, &users[i as usize % users.len()], &commits).await }
        }
    })
    .await;
    settle(&pool).await?;
    let _ = stop.send(true);
    let _ = projector_task.await;
    let _ = relay_task.await;
    let _ = js.delete_stream(&config.nats_stream).await;
    pool.close().await;

    let commits = commits.lock().unwrap_or_else(|p| p.into_inner());
    let applied = applied.lock().unwrap_or_else(|p| p.into_inner());
    let mut lags = Vec::with_capacity(commits.len());
    let (mut relay, mut nats, mut apply) = (Vec::new(), Vec::new(), Vec::new());
    let ms = |from: DateTime<Utc>, to: DateTime<Utc>| {
        (to - from).num_microseconds().unwrap_or(0).max(0) as f64 / 1000.0
    };
    let mut missing = 0;
    for (event, committed) in commits.iter() {
        match applied.get(event) {
            // In every read model: when the last builder had it.
            Some(at) if at.len() >= Builder::ALL.len() => {
                let Some(last) = at.iter().max_by_key(|a| a.committed) else {
                    continue;
                };
                lags.push(ms(*committed, last.committed));
                if let Some(published) = last.published {
                    relay.push(ms(*committed, published));
                    nats.push(ms(published, last.received));
                    apply.push(ms(last.received, last.committed));
                }
            }
            _ => missing += 1,
        }
    }
    let hop = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        json!({
            "p50_ms": percentile(&v, 50.0),
            "p95_ms": percentile(&v, 95.0),
            "p99_ms": percentile(&v, 99.0),
            "events": v.len(),
        })
    };
    let hops = json!({
        "commit_to_relay_publish": hop(relay),
        "publish_to_projector_receive": hop(nats),
        "receive_to_projector_commit": hop(apply),
    });
    lags.sort_by(|a, b| a.total_cmp(b));
    let p99 = percentile(&lags, 99.0);
    Ok(Scenario {
        name: "projection lag at half the peak event rate".into(),
        value: p99,
        unit: "ms (p99)".into(),
        baseline: None,
        baseline_unit: None,
        ratio: None,
        target: format!("p99 <= {TARGET_P99_MS} ms"),
        met: p99 <= TARGET_P99_MS && missing == 0 && writes.failures == 0,
        details: json!({
            "p50_ms": percentile(&lags, 50.0),
            "p95_ms": percentile(&lags, 95.0),
            "p99_ms": p99,
            "max_ms": lags.last(),
            "events": lags.len(),
            "events_not_projected": missing,
            "hops": hops,
            "peak_events_per_second": peak_events,
            "peak_is": "events per second from commit into both read models, 16 writers as fast as they can",
            "writers_peak_events_per_second": write_peak_events,
            "events_per_second": writes.rate * EVENTS_PER_SIGN_IN as f64,
            "commit_latency": writes.details(),
        }),
    })
}

/// A sign-in with the second factor off: `SecondFactorSkipped` and
/// `SessionStarted`.
const EVENTS_PER_SIGN_IN: i64 = 2;

async fn sign_in(writers: &Store<User>, user: &Seeded, commits: &Commits) -> crate::load::Outcome {
    let (_, command) = crate::seed::sign_in(user.id, &TwoFactorSettings::default(), wall_now());
    let id = user.id.to_string();
    let executed = writers
        .execute_at(&id, None, &[], |_| Ok(command.clone()))
        .await;
    match executed {
        Ok((events, last)) => {
            let committed = wall_now();
            let mut commits = commits.lock().unwrap_or_else(|p| p.into_inner());
            for k in 0..events.len() as i64 {
                commits.insert((id.clone(), last - k), committed);
            }
            Ok(())
        }
        Err(e) => Err(format!("{e}")),
    }
}

async fn event_count(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?)
}

/// Waits until every builder has applied every event committed so far.
async fn settle(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let behind: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM events) * $1 - \
                    (SELECT COALESCE(sum(sequence), 0) FROM projection_positions)::bigint",
        )
        .bind(Builder::ALL.len() as i64)
        .fetch_one(pool)
        .await?;
        if behind == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the read models are still {behind} events behind after 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
