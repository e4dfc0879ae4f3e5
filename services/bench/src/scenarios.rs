//! The scenarios, each next to the baseline it is measured against.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use futures::future::join_all;
use serde_json::{json, Value};
use twofold_platform::totp;

use crate::report::{percentile, Report, Scenario};
use crate::stack::{create_database, drop_database, Stack};
use crate::Args;

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn wanted(args: &Args, name: &str) -> bool {
    args.only.is_empty() || args.only.iter().any(|o| name.starts_with(o.as_str()))
}

pub async fn run_all(args: &Args) -> anyhow::Result<Report> {
    let stack = Stack::start(args).await?;
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&stack.pool)
        .await?;
    let mut scenarios = Vec::new();
    let result = async {
        if wanted(args, "sign-ins") {
            scenarios.extend(sign_ins(args, &stack).await?);
        }
        if wanted(args, "totp-verifications") {
            scenarios.extend(verifications(&stack).await?);
        }
        if wanted(args, "long-history") {
            scenarios.push(long_history(args, &stack).await?);
        }
        if wanted(args, "verifier-memory") {
            let rss = stack.verifier_peak_rss_mib()?;
            scenarios.push(Scenario {
                name: "verifier peak RSS under the sign-in load".into(),
                value: rss,
                unit: "MiB".into(),
                baseline: None,
                baseline_unit: None,
                ratio: None,
                target: "<= 200 MiB".into(),
                met: rss <= 200.0,
                details: json!({}),
            });
        }
        anyhow::Ok(())
    }
    .await;
    stack.stop().await;
    result?;
    if wanted(args, "rebuild") {
        scenarios.push(rebuild(args).await?);
    }
    if wanted(args, "relay") {
        scenarios.push(relay(args).await?);
    }
    Ok(Report {
        machine: json!({
            "cores": cores(),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "profile": if cfg!(debug_assertions) { "dev (dependencies at opt-level 2)" } else { "release" },
        }),
        settings: json!({
            "argon2": {
                "algorithm": "argon2id",
                "memory_kib": twofold_platform::password::MEMORY_KIB,
                "iterations": twofold_platform::password::ITERATIONS,
                "parallelism": twofold_platform::password::PARALLELISM,
            },
            "synchronous_commit": synchronous_commit,
            "jetstream_storage": "not used by these scenarios",
        }),
        scenarios,
    })
}

/// Bare argon2id verifications per second on `threads` threads, same parameters.
fn argon2_rate(threads: usize, seconds: u64) -> anyhow::Result<f64> {
    let salt = SaltString::encode_b64(b"benchmark-salt!!").map_err(|e| anyhow::anyhow!("{e}"))?;
    let phc = twofold_platform::password::argon2()
        .hash_password(b"correct horse battery", &salt)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .to_string();
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let phc = phc.clone();
            let count = count.clone();
            std::thread::spawn(move || {
                let argon = twofold_platform::password::argon2();
                while Instant::now() < deadline {
                    if let Ok(parsed) = PasswordHash::new(&phc) {
                        let _ = argon.verify_password(b"correct horse battery", &parsed);
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Runs `clients` tasks calling `op` until `seconds` pass; returns ops/s and
/// sorted latencies in ms.
async fn closed_loop<F, Fut>(clients: usize, seconds: u64, op: F) -> (f64, Vec<f64>)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks = (0..clients).map(|c| {
        let op = op.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                if op(c, i).await {
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                i += 1;
            }
            latencies
        })
    });
    let mut all: Vec<f64> = join_all(tasks)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .flatten()
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    (all.len() as f64 / elapsed, all)
}

fn latency_details(sorted: &[f64]) -> Value {
    json!({
        "p50_ms": percentile(sorted, 50.0),
        "p95_ms": percentile(sorted, 95.0),
        "p99_ms": percentile(sorted, 99.0),
        "samples": sorted.len(),
    })
}

const PASSWORD: &str = "correct horse battery";

async fn create_users(
    stack: &Stack,
    admin: &str,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    for chunk in names.chunks(8) {
        let calls = chunk.iter().map(|name| {
            stack.post(
                "/users",
                Some(admin),
                json!({"username": name, "password": PASSWORD, "email": format!("{name}@bench.test")}),
            )
        });
        for r in join_all(calls).await {
            let (status, body) = r?;
            if status != 201 {
                bail!("creating a user failed: {status} {body}");
            }
        }
    }
    Ok(names)
}

/// Enrolls an authenticator for each user (2FA must be off); returns the seeds
/// and the time step each enrollment used.
async fn enroll(stack: &Stack, users: &[String]) -> anyhow::Result<Vec<(Vec<u8>, u64)>> {
    let mut seeds = Vec::new();
    for chunk in users.chunks(8) {
        let calls = chunk.iter().map(|name| async move {
            let session = stack.session(name, PASSWORD).await?;
            let (_, started) = stack.post("/me/totp", Some(&session), json!({})).await?;
            let secret = started["secret"].as_str().context("no secret")?.to_string();
            let seed = data_encoding::BASE32_NOPAD
                .decode(secret.trim_end_matches('=').as_bytes())
                .context("secret is not base32")?;
            let step = totp::step_of(wall_now()) - 1;
            let code = totp::code_at_step(&seed, step)?;
            let (status, body) = stack
                .post("/me/totp/confirm", Some(&session), json!({"code": code}))
                .await?;
            if status != 200 {
                bail!("enrollment failed: {status} {body}");
            }
            anyhow::Ok((seed, step))
        });
        for r in join_all(calls).await {
            seeds.push(r?);
        }
    }
    Ok(seeds)
}

#[allow(clippy::disallowed_methods)] // the load generator shares the verifier's wall clock
fn wall_now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn set_two_factor(stack: &Stack, on: bool) -> anyhow::Result<()> {
    stack.set_settings(&json!({
        "enabled": on, "enforcement": "every_login", "allowed_methods": ["totp", "email"],
        "default_method": "totp", "allow_fallback": true, "enrollment": "optional",
        "code_timeout": "4h", "max_invalid_attempts": "unlimited", "resend_limit": "unlimited",
        "sms_provider": null, "scope": {"kind": "all_users"}, "replace_backup_codes_on_use": false,
        "session_duration_secs": 7776000}))
}

async fn sign_ins(args: &Args, stack: &Stack) -> anyhow::Result<Vec<Scenario>> {
    let clients = cores() * 4;
    let admin = stack.admin().await?;
    let plain = create_users(stack, &admin, "plain", 32).await?;
    let with_totp = create_users(stack, &admin, "totp", 180).await?;
    let seeds = enroll(stack, &with_totp).await?;

    eprintln!("twofold-bench: argon2id baseline on {} threads", cores());
    let baseline = tokio::task::spawn_blocking({
        let seconds = args.seconds;
        move || argon2_rate(cores(), seconds)
    })
    .await??;

    eprintln!("twofold-bench: password-only sign-ins, {clients} clients");
    let s = Arc::new(StackRef::new(stack));
    let plain = Arc::new(plain);
    let (rate, lat) = closed_loop(clients, args.seconds, {
        let s = s.clone();
        let plain = plain.clone();
        move |c, i| {
            let s = s.clone();
            let plain = plain.clone();
            async move {
                let name = &plain[(c * 7 + i as usize) % plain.len()];
                matches!(s.sign_in(name).await, Ok(200))
            }
        }
    })
    .await;
    let password_only = Scenario {
        name: "sign-ins/s, password only".into(),
        value: rate,
        unit: "sign-ins/s".into(),
        baseline: Some(baseline),
        baseline_unit: Some("argon2id hashes/s".into()),
        ratio: Some(rate / baseline),
        target: "ratio >= 0.9".into(),
        met: rate / baseline >= 0.9,
        details: json!({"clients": clients, "latency": latency_details(&lat)}),
    };

    // Password + TOTP: each user's time steps are used once, so users rotate.
    set_two_factor(stack, true)?;
    eprintln!("twofold-bench: password + TOTP sign-ins, {clients} clients");
    let used: HashMap<usize, u64> = seeds.iter().map(|(_, step)| *step).enumerate().collect();
    let used = Arc::new(tokio::sync::Mutex::new(used));
    let users: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
        with_totp
            .into_iter()
            .zip(seeds.into_iter().map(|(seed, _)| seed))
            .collect(),
    );
    let (rate2, lat2) = closed_loop(clients, args.seconds, {
        let s = s.clone();
        move |c, _| {
            let s = s.clone();
            let users = users.clone();
            let used = used.clone();
            async move {
                // Pick a user of this client with a step still unused.
                let now = totp::step_of(wall_now());
                let mut pick = None;
                {
                    let mut used = used.lock().await;
                    for k in (c..users.len()).step_by(clients) {
                        let next = used.get(&k).map_or(now - 1, |last| (last + 1).max(now - 1));
                        if next <= now + 1 {
                            used.insert(k, next);
                            pick = Some((k, next));
                            break;
                        }
                    }
                }
                let Some((k, step)) = pick else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return false;
                };
                let (name, seed) = &users[k];
                s.sign_in_with_totp(name, seed, step).await.unwrap_or(false)
            }
        }
    })
    .await;
    set_two_factor(stack, false)?;
    let with_totp = Scenario {
        name: "sign-ins/s, password + TOTP".into(),
        value: rate2,
        unit: "sign-ins/s".into(),
        baseline: Some(baseline),
        baseline_unit: Some("argon2id hashes/s".into()),
        ratio: Some(rate2 / baseline),
        target: "ratio >= 0.9".into(),
        met: rate2 / baseline >= 0.9,
        details: json!({"clients": clients, "latency": latency_details(&lat2)}),
    };
    Ok(vec![password_only, with_totp])
}

/// What the closures share: the base URL and client.
struct StackRef {
    base: String,
    http: reqwest::Client,
}

impl StackRef {
    fn new(stack: &Stack) -> Self {
        Self {
            base: stack.base.clone(),
            http: stack.http.clone(),
        }
    }

    async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    async fn sign_in(&self, name: &str) -> anyhow::Result<u16> {
        Ok(self
            .post(
                "/sign-in",
                None,
                json!({"username": name, "password": PASSWORD}),
            )
            .await?
            .0)
    }

    async fn sign_in_with_totp(&self, name: &str, seed: &[u8], step: u64) -> anyhow::Result<bool> {
        let (_, body) = self
            .post(
                "/sign-in",
                None,
                json!({"username": name, "password": PASSWORD}),
            )
            .await?;
        let token = body["challenge"]["token"]
            .as_str()
            .context("no challenge")?;
        let code = totp::code_at_step(seed, step)?;
        let (status, _) = self
            .post(
                "/challenge/verify",
                None,
                json!({"challenge_token": token, "code": code}),
            )
            .await?;
        Ok(status == 200)
    }
}

/// TOTP verifications (each appending events) against single-row insert
/// commits at the same concurrency. Verifications answer step-up challenges,
/// so no argon2 is in the loop: what is measured is load, decide, append.
async fn verifications(stack: &Stack) -> anyhow::Result<Vec<Scenario>> {
    let admin = stack.admin().await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_inserts (id bigserial PRIMARY KEY, v text NOT NULL)",
    )
    .execute(&stack.pool)
    .await?;
    let mut out = Vec::new();
    for clients in [1usize, 16, 64] {
        // Enrollment used a step at or before now-1, so each user has two
        // steps left in the window: now and now+1.
        let per_user = 2usize;
        let users = create_users(stack, &admin, &format!("v{clients}x"), clients).await?;
        let seeds = enroll(stack, &users).await?;
        let mut sessions = Vec::new();
        for name in &users {
            sessions.push(stack.session(name, PASSWORD).await?);
        }
        // Prepare the challenges outside the timed phase.
        let mut challenges: Vec<Vec<String>> = vec![Vec::new(); clients];
        for (c, session) in sessions.iter().enumerate() {
            for _ in 0..per_user {
                let (status, body) = stack.post("/me/step-up", Some(session), json!({})).await?;
                if status != 200 {
                    bail!("step-up failed: {status} {body}");
                }
                challenges[c].push(
                    body["challenge"]["token"]
                        .as_str()
                        .context("no token")?
                        .to_string(),
                );
            }
        }
        let now = totp::step_of(wall_now());
        let started = Instant::now();
        let calls = challenges.into_iter().zip(seeds).map(|(tokens, seed)| {
            let s = StackRef::new(stack);
            async move {
                let mut lat = Vec::new();
                // The enrollment used step now-1 (or earlier): go on from there.
                for (k, token) in tokens.iter().enumerate() {
                    let code = totp::code_at_step(&seed.0, now + k as u64).unwrap_or_default();
                    let t = Instant::now();
                    if let Ok((200, _)) = s
                        .post(
                            "/challenge/verify",
                            None,
                            json!({"challenge_token": token, "code": code}),
                        )
                        .await
                    {
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                lat
            }
        });
        let mut lat: Vec<f64> = join_all(calls).await.into_iter().flatten().collect();
        let elapsed = started.elapsed().as_secs_f64();
        lat.sort_by(|a, b| a.total_cmp(b));
        let rate = lat.len() as f64 / elapsed;

        // Baseline: single-row insert commits at the same concurrency.
        let pool = stack.pool.clone();
        let (baseline, _) = closed_loop(clients, 3, move |c, i| {
            let pool = pool.clone();
            async move {
                sqlx::query("INSERT INTO bench_inserts (v) VALUES ($1)")
                    .bind(format!("{c}-{i}"))
                    .execute(&pool)
                    .await
                    .is_ok()
            }
        })
        .await;
        out.push(Scenario {
            name: format!("TOTP verifications/s, {clients} clients"),
            value: rate,
            unit: "verifications/s".into(),
            baseline: Some(baseline),
            baseline_unit: Some("insert commits/s".into()),
            ratio: Some(rate / baseline),
            target: "ratio >= 0.5".into(),
            met: rate / baseline >= 0.5,
            details: json!({"clients": clients, "verifications": lat.len(), "latency": latency_details(&lat)}),
        });
    }
    Ok(out)
}

/// A user with a long history signs in as fast as a new one (snapshots).
async fn long_history(args: &Args, stack: &Stack) -> anyhow::Result<Scenario> {
    let admin = stack.admin().await?;
    let users = create_users(stack, &admin, "history", 2).await?;
    let (old, new) = (&users[0], &users[1]);
    let old_id: String =
        sqlx::query_scalar("SELECT user_id::text FROM usernames WHERE username = $1")
            .bind(old)
            .fetch_one(&stack.pool)
            .await?;
    eprintln!(
        "twofold-bench: writing {} past sign-ins",
        args.history_sign_ins
    );
    // Past sign-ins go through the real event store (snapshots and all), minus
    // argon2, which would only make the set-up slow.
    let store: twofold_platform::store::Store<twofold_domain::user::User> =
        twofold_platform::store::Store::new(stack.pool.clone());
    let settings = twofold_domain::tenant::TwoFactorSettings::default();
    for i in 0..args.history_sign_ins {
        let at = wall_now() - chrono::Duration::days(89) + chrono::Duration::seconds(i as i64);
        store
            .execute(&old_id, |_| {
                Ok(twofold_domain::user::UserCommand::SignIn(
                    twofold_domain::user::SignIn {
                        password_ok: true,
                        settings: settings.clone(),
                        challenge: twofold_domain::user::NewChallenge {
                            id: twofold_domain::ChallengeId(uuid::Uuid::new_v4()),
                            token_hash: twofold_domain::secrets::SecretHash("bench".into()),
                        },
                        session: twofold_domain::user::NewSession {
                            id: twofold_domain::SessionId(uuid::Uuid::new_v4()),
                            token_hash: twofold_domain::secrets::SecretHash("bench".into()),
                            expires_at: None,
                        },
                        device: None,
                        enrollment_seed: None,
                        ctx: twofold_domain::Ctx::new(at, twofold_domain::Actor::System),
                    },
                ))
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(&old_id)
        .fetch_one(&stack.pool)
        .await?;
    let s = StackRef::new(stack);
    let mut old_lat = Vec::new();
    let mut new_lat = Vec::new();
    for _ in 0..40 {
        for (name, lat) in [(old, &mut old_lat), (new, &mut new_lat)] {
            let t = Instant::now();
            if s.sign_in(name).await? == 200 {
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    old_lat.sort_by(|a, b| a.total_cmp(b));
    new_lat.sort_by(|a, b| a.total_cmp(b));
    let (o, n) = (percentile(&old_lat, 50.0), percentile(&new_lat, 50.0));
    Ok(Scenario {
        name: format!(
            "sign-in of a user with {} past sign-ins",
            args.history_sign_ins
        ),
        value: o,
        unit: "ms (p50)".into(),
        baseline: Some(n),
        baseline_unit: Some("ms (p50), new user".into()),
        ratio: Some(o / n),
        target: "ratio <= 1.1".into(),
        met: o / n <= 1.1,
        details: json!({"events_in_stream": events, "long_history": latency_details(&old_lat), "new_user": latency_details(&new_lat)}),
    })
}

/// Rebuild of all read models from a large event store.
async fn rebuild(args: &Args) -> anyhow::Result<Scenario> {
    let name = format!("twofold_bench_rebuild_{}", std::process::id());
    let url = create_database(&args.admin_url, &name).await?;
    let result = async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        twofold_platform::db::migrate(&pool).await?;
        eprintln!("twofold-bench: writing {} events", args.rebuild_events);
        crate::synthetic::write_events(&pool, args.rebuild_events).await?;
        eprintln!("twofold-bench: rebuilding");
        let done = twofold_projections::rebuild::rebuild(&pool, |_| {}).await?;
        pool.close().await;
        let rate = done.events as f64 / done.seconds;
        anyhow::Ok(Scenario {
            name: format!("rebuild of all read models from {} events", done.events),
            value: rate,
            unit: "events/s".into(),
            baseline: None,
            baseline_unit: None,
            ratio: None,
            target: ">= 50000 events/s".into(),
            met: rate >= 50_000.0,
            details: json!({"seconds": done.seconds, "users": done.users}),
        })
    }
    .await;
    drop_database(&args.admin_url, &name).await;
    result
}

/// Relay throughput: events committed (with their outbox rows) published and
/// acked, against plain JetStream publishes of the same size and ack mode.
async fn relay(args: &Args) -> anyhow::Result<Scenario> {
    let events = args.relay_events;
    let name = format!("twofold_bench_relay_{}", std::process::id());
    let url = create_database(&args.admin_url, &name).await?;
    let result = async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        twofold_platform::db::migrate(&pool).await?;
        crate::synthetic::write_events(&pool, events).await?;
        let id = std::process::id();
        let config = twofold_platform::Config {
            nats_url: args.nats_url.clone(),
            nats_stream: format!("BENCH_RELAY_{id}"),
            nats_subject_prefix: format!("benchrelay{id}"),
            ..twofold_platform::Config::default()
        };
        let relay = twofold_relay::Relay::connect(pool.clone(), &config).await?;
        let js = relay.jetstream().clone();
        twofold_relay::ensure_stream(&js, &config.nats_stream, &config.nats_subject_prefix).await?;

        // Baseline: the same number of publishes of a typical event's size,
        // sent in batches of the relay's size and acked in order.
        let sample: String = sqlx::query_scalar("SELECT payload::text FROM events LIMIT 1")
            .fetch_one(&pool)
            .await?;
        let body: Vec<u8> = sample.as_bytes().to_vec();
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < events {
            let mut acks = Vec::new();
            for _ in 0..500.min(events - sent) {
                acks.push(
                    js.publish(
                        format!("{}.events.bench.baseline", config.nats_subject_prefix),
                        body.clone().into(),
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                );
                sent += 1;
            }
            for ack in acks {
                ack.await.map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        let baseline = events as f64 / started.elapsed().as_secs_f64();

        let started = Instant::now();
        let mut published = 0usize;
        while relay.backlog().await? > 0 {
            published += relay.process_next().await?;
        }
        let rate = published as f64 / started.elapsed().as_secs_f64();
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
            details: json!({"message_bytes": sample.len(), "batch": 500}),
        })
    }
    .await;
    drop_database(&args.admin_url, &name).await;
    result
}
