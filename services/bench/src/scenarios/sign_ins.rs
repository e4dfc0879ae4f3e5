//! Sign-ins per second, password only and password + TOTP, at cores × 4
//! concurrent clients, against bare argon2id verifications per second with
//! the same parameters on the same cores: a sign-in is an argon2id check plus
//! everything else, so the ratio says what everything else costs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde_json::json;

use super::cores;
use crate::load::{closed_loop, status_outcome, Measured, Outcome};
use crate::report::Scenario;
use crate::seed::{Profile, Seeded, PASSWORD};
use crate::stack::{Client, Stack};
use crate::{wall_now, Args};
use twofold_platform::totp;

/// Steps a user can answer in one go: now-1, now and now+1.
const PER_USER: usize = 3;

pub async fn run(args: &Args, stack: &Stack) -> anyhow::Result<Vec<Scenario>> {
    let clients = cores() * 4;
    let seeder = stack.seeder().await?;
    let plain = seeder
        .users("plain", clients * 4, Profile::default())
        .await?;
    // Enough authenticator users for 100 sign-ins per second per core (about
    // twice what argon2id allows), three sign-ins each.
    let expected = 100.0 * cores() as f64 * args.seconds;
    let with_totp = seeder
        .users(
            "totp",
            (expected as usize).div_ceil(PER_USER).max(clients),
            Profile {
                totp: true,
                ..Profile::default()
            },
        )
        .await?;

    // The baseline before and after the sign-ins, averaged, so that a drift
    // in the machine's load during the run weighs on both alike.
    eprintln!("twofold-bench: argon2id baseline on {} threads", cores());
    let before = argon2_rate(cores(), args.seconds / 2.0).await?;

    stack.apply_settings(&super::two_factor_off()).await?;
    eprintln!("twofold-bench: password-only sign-ins, {clients} clients");
    let password_only = password_sign_ins(stack.client(), plain, clients, args.seconds).await;

    stack.apply_settings(&super::two_factor_on()).await?;
    eprintln!("twofold-bench: password + TOTP sign-ins, {clients} clients");
    let totp_sign_ins = totp_sign_ins(stack.client(), with_totp, clients, args.seconds).await;
    stack.apply_settings(&super::two_factor_off()).await?;

    let after = argon2_rate(cores(), args.seconds / 2.0).await?;
    let baseline = (before + after) / 2.0;
    let scenario = |name: &str, m: &Measured| {
        let ratio = m.rate / baseline;
        Scenario {
            name: name.into(),
            value: m.rate,
            unit: "sign-ins/s".into(),
            baseline: Some(baseline),
            baseline_unit: Some("argon2id hashes/s".into()),
            ratio: Some(ratio),
            target: "ratio >= 0.9".into(),
            met: ratio >= 0.9 && m.failures == 0,
            details: json!({
                "clients": clients,
                "latency": m.details(),
                "baseline_before_and_after": [before, after],
            }),
        }
    };
    Ok(vec![
        scenario("sign-ins/s, password only", &password_only),
        scenario("sign-ins/s, password + TOTP", &totp_sign_ins),
    ])
}

/// Bare argon2id verifications per second on `threads` threads, same
/// parameters as the verifier's.
async fn argon2_rate(threads: usize, seconds: f64) -> anyhow::Result<f64> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::encode_b64(b"benchmark-salt!!").map_err(|e| anyhow!("{e}"))?;
        let phc = twofold_platform::password::argon2()
            .hash_password(PASSWORD.as_bytes(), &salt)
            .map_err(|e| anyhow!("{e}"))?
            .to_string();
        let count = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(seconds);
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let phc = phc.clone();
                let count = count.clone();
                std::thread::spawn(move || {
                    let argon = twofold_platform::password::argon2();
                    while Instant::now() < deadline {
                        if let Ok(parsed) = PasswordHash::new(&phc) {
                            let _ = argon.verify_password(PASSWORD.as_bytes(), &parsed);
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
    })
    .await?
}

async fn password_sign_ins(
    client: Client,
    users: Vec<Seeded>,
    clients: usize,
    seconds: f64,
) -> Measured {
    let users = Arc::new(users);
    closed_loop(clients, seconds, move |c, i| {
        let client = client.clone();
        let users = users.clone();
        async move {
            let user = &users[(c + i as usize * clients) % users.len()];
            Some(status_outcome(client.sign_in(&user.name, PASSWORD).await))
        }
    })
    .await
}

/// Each user signs in three times in a row, with the codes of successive
/// steps; client `c` takes users c, c + clients, …
async fn totp_sign_ins(
    client: Client,
    users: Vec<Seeded>,
    clients: usize,
    seconds: f64,
) -> Measured {
    let users = Arc::new(users);
    closed_loop(clients, seconds, move |c, i| {
        let client = client.clone();
        let users = users.clone();
        async move {
            let i = i as usize;
            let user = users.get(c + (i / PER_USER) * clients)?;
            Some(totp_sign_in(&client, user, i % PER_USER).await)
        }
    })
    .await
}

async fn totp_sign_in(client: &Client, user: &Seeded, k: usize) -> Outcome {
    let (status, body) = client
        .sign_in(&user.name, PASSWORD)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let token = body["challenge"]["token"]
        .as_str()
        .ok_or_else(|| format!("{status} no challenge"))?;
    let step = totp::step_of(wall_now()) - 1 + k as u64;
    let seed = user.seed.as_deref().unwrap_or_default();
    let code = totp::code_at_step(seed, step).map_err(|e| e.to_string())?;
    status_outcome(
        client
            .post(
                "/challenge/verify",
                None,
                json!({"challenge_token": token, "code": code}),
            )
            .await,
    )
}
