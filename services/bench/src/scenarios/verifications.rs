//! TOTP verifications per second at 1, 16 and 64 concurrent clients, against
//! single-row insert commits per second at the same concurrency.
//!
//! Each verification answers an open sign-in challenge with the right code
//! over HTTP: the verifier loads the tenant and the user, opens the sealed
//! seed, checks the code, and appends `CodeVerified`, `SessionStarted` and
//! `DeviceRemembered` in one commit. A time step is accepted once per user,
//! and only steps within one of now are, so each user answers at most three
//! (now-1, now, now+1): the set-up seeds enough enrolled users, each with
//! three open challenges, through the event store.

use std::sync::Arc;

use serde_json::json;
use sqlx::PgPool;

use crate::load::{closed_loop, status_outcome, Measured};
use crate::report::Scenario;
use crate::seed::{Profile, Seeded};
use crate::stack::{Client, Stack};
use crate::{wall_now, Args};
use twofold_platform::totp;

/// Steps a user can answer in one go: now-1, now and now+1.
const PER_USER: usize = 3;
/// Alternations of verifications and baseline.
const ROUNDS: usize = 3;

pub async fn run(args: &Args, stack: &Stack) -> anyhow::Result<Vec<Scenario>> {
    let seeder = stack.seeder().await?;
    let settings = super::two_factor_on();
    stack.apply_settings(&settings).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_inserts (id bigserial PRIMARY KEY, v text NOT NULL)",
    )
    .execute(&stack.pool)
    .await?;
    let mut out = Vec::new();
    for &clients in &args.clients {
        let users_needed = args.verifications.div_ceil(PER_USER).max(clients);
        eprintln!(
            "twofold-bench: seeding {users_needed} enrolled users with {PER_USER} open challenges each"
        );
        let users = seeder
            .users(
                &format!("v{clients}x"),
                users_needed,
                Profile {
                    email: true,
                    totp: true,
                    ..Profile::default()
                },
            )
            .await?;
        let challenges = seeder.challenges(&users, &settings, PER_USER).await?;
        eprintln!("twofold-bench: TOTP verifications, {clients} clients");
        // Rounds of verifications, each followed by as long a round of the
        // baseline, so that both see the same machine even when its load
        // drifts during the run.
        let per_round = users.len().div_ceil(ROUNDS);
        let mut work = users.into_iter().zip(challenges);
        let mut measured = Vec::new();
        let mut baselines = Vec::new();
        for _ in 0..ROUNDS {
            let round: Vec<_> = work.by_ref().take(per_round).collect();
            let (users, challenges): (Vec<_>, Vec<_>) = round.into_iter().unzip();
            let m = verify_all(
                stack.client(),
                users,
                challenges,
                clients,
                args.seconds / ROUNDS as f64,
            )
            .await;
            let b = insert_commits(&stack.pool, clients, m.seconds.max(0.5)).await;
            measured.push(m);
            baselines.push(b);
        }
        let measured = Measured::merge(measured);
        let baseline = Measured::merge(baselines);
        let (rate, baseline_rate) = (measured.rate, baseline.rate);
        let ratio = rate / baseline_rate;
        out.push(Scenario {
            name: format!("TOTP verifications/s, {clients} clients"),
            value: rate,
            unit: "verifications/s".into(),
            baseline: Some(baseline_rate),
            baseline_unit: Some("insert commits/s".into()),
            ratio: Some(ratio),
            target: "ratio >= 0.5".into(),
            met: ratio >= 0.5 && measured.failures == 0,
            details: json!({
                "clients": clients,
                "rounds": ROUNDS,
                "latency": measured.details(),
                "baseline_latency": baseline.details(),
            }),
        });
    }
    stack.apply_settings(&super::two_factor_off()).await?;
    Ok(out)
}

/// Client `c` takes users c, c + clients, …, and answers each one's
/// challenges with the codes of successive steps.
async fn verify_all(
    client: Client,
    users: Vec<Seeded>,
    challenges: Vec<Vec<String>>,
    clients: usize,
    seconds: f64,
) -> Measured {
    let work: Arc<Vec<(Vec<u8>, Vec<String>)>> = Arc::new(
        users
            .into_iter()
            .zip(challenges)
            .map(|(u, c)| (u.seed.unwrap_or_default(), c))
            .collect(),
    );
    closed_loop(clients, seconds, move |c, i| {
        let client = client.clone();
        let work = work.clone();
        async move {
            let i = i as usize;
            let (seed, tokens) = work.get(c + (i / PER_USER) * clients)?;
            // Steps in order, one per challenge: now-1, now, now+1.
            let step = totp::step_of(wall_now()) - 1 + (i % PER_USER) as u64;
            let code = totp::code_at_step(seed, step).ok()?;
            let answer = client
                .post(
                    "/challenge/verify",
                    None,
                    json!({"challenge_token": tokens[i % PER_USER], "code": code}),
                )
                .await;
            Some(status_outcome(answer))
        }
    })
    .await
}

/// Single-row insert commits at the same concurrency, through sqlx from
/// this same process (the loop the verifications run in).
async fn insert_commits(pool: &PgPool, clients: usize, seconds: f64) -> Measured {
    // Warm every connection first, so opening them is not measured.
    let warm: Vec<_> = (0..clients).map(|_| pool.acquire()).collect();
    let _held = futures::future::join_all(warm).await;
    drop(_held);
    let pool = pool.clone();
    closed_loop(clients, seconds, move |c, i| {
        let pool = pool.clone();
        async move {
            Some(
                sqlx::query("INSERT INTO bench_inserts (v) VALUES ($1)")
                    .bind(format!("{c}-{i}"))
                    .execute(&pool)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("insert: {e}")),
            )
        }
    })
    .await
}
