//! `twofold-bench`: runs each performance scenario against a baseline measured
//! in the same run on the same machine, and writes `bench/report.json` and a
//! table. Ratios, not absolute figures, are what the targets speak of.
//!
//! The stack under test is the real `twofold` binary (verifier) on a fresh
//! database; the load comes from this process over HTTP.

mod load;
mod report;
mod scenarios;
mod seed;
mod stack;
mod synthetic;
mod watch;

use std::path::PathBuf;

use anyhow::Context;

/// The allocator `twofold` runs with, so the relay and the load measured in
/// this process allocate as they do in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone)]
pub struct Args {
    /// The `twofold` binary to start.
    pub twofold_bin: PathBuf,
    /// An admin connection to PostgreSQL (databases are created per run).
    pub admin_url: String,
    /// Where `report.json` goes.
    pub out_dir: PathBuf,
    /// Scenario names to run (all when empty).
    pub only: Vec<String>,
    /// Seconds each timed phase runs (at most).
    pub seconds: f64,
    /// Verifications prepared for each client count.
    pub verifications: usize,
    /// Client counts of the verification scenario.
    pub clients: Vec<usize>,
    /// Events for the rebuild scenario.
    pub rebuild_events: u64,
    /// Past sign-ins of the long-history user.
    pub history_sign_ins: u64,
    /// Events the relay scenario publishes (in four rounds, each after as
    /// many baseline publishes: at 200,000 a round runs about half a
    /// second; at 50,000, an eighth, the ratio spread 0.65-0.80 on one build).
    pub relay_events: u64,
    /// Codes each dispatcher round sends (twice as many with two instances).
    pub dispatch_jobs: usize,
    /// Tenant sizes (users) of the scale scenario.
    pub scale_users: Vec<u64>,
    /// Events each user of the scale scenario has (about).
    pub scale_events_per_user: u64,
    pub nats_url: String,
    /// Keep the databases for a look afterwards.
    pub keep: bool,
}

const FLAGS: &str = "--twofold-bin --admin-url --out --only --seconds --verifications --clients --rebuild-events --history-sign-ins --relay-events --dispatch-jobs --scale-users --scale-events-per-user --keep";

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        twofold_bin: PathBuf::from("target/debug/twofold"),
        admin_url: std::env::var("TWOFOLD_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string()),
        out_dir: PathBuf::from("bench"),
        only: Vec::new(),
        seconds: 8.0,
        verifications: 6_000,
        clients: vec![1, 16, 64],
        rebuild_events: 1_000_000,
        history_sign_ins: 10_000,
        relay_events: 200_000,
        dispatch_jobs: 1_000,
        scale_users: vec![10_000, 100_000],
        scale_events_per_user: 20,
        nats_url: std::env::var("TWOFOLD_TEST_NATS_URL")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string()),
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--twofold-bin" => a.twofold_bin = PathBuf::from(value()?),
            "--admin-url" => a.admin_url = value()?,
            "--out" => a.out_dir = PathBuf::from(value()?),
            "--only" => a.only = value()?.split(',').map(str::to_string).collect(),
            "--seconds" => a.seconds = value()?.parse().context("--seconds")?,
            "--verifications" => a.verifications = value()?.parse().context("--verifications")?,
            "--clients" => {
                a.clients = value()?
                    .split(',')
                    .map(|c| c.parse().context("--clients"))
                    .collect::<anyhow::Result<_>>()?
            }
            "--rebuild-events" => {
                a.rebuild_events = value()?.parse().context("--rebuild-events")?
            }
            "--relay-events" => a.relay_events = value()?.parse().context("--relay-events")?,
            "--dispatch-jobs" => a.dispatch_jobs = value()?.parse().context("--dispatch-jobs")?,
            "--scale-users" => {
                a.scale_users = value()?
                    .split(',')
                    .map(|c| c.parse().context("--scale-users"))
                    .collect::<anyhow::Result<_>>()?
            }
            "--scale-events-per-user" => {
                a.scale_events_per_user = value()?.parse().context("--scale-events-per-user")?
            }
            "--history-sign-ins" => {
                a.history_sign_ins = value()?.parse().context("--history-sign-ins")?
            }
            "--keep" => a.keep = true,
            "--help" | "-h" => {
                println!("twofold-bench [flags]: {FLAGS}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown flag {other}; flags: {FLAGS}"),
        }
    }
    Ok(a)
}

/// The load generator shares the verifier's wall clock: TOTP codes and
/// commit times are read off the same clock the services use.
#[allow(clippy::disallowed_methods)]
pub fn wall_now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let report = scenarios::run_all(&args).await?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let path = args.out_dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let table = report::table(&report);
    let md = args.out_dir.join("report.md");
    std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    println!("{table}");
    eprintln!(
        "twofold-bench: wrote {} and {}",
        path.display(),
        md.display()
    );
    Ok(())
}
