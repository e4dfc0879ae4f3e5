//! The scenarios, each next to the baseline it is measured against.

mod dispatch;
mod history;
mod lag;
mod rebuild;
mod relay;
mod scale;
mod sign_ins;
mod verifications;

use serde_json::json;
use twofold_domain::tenant::settings::{Enforcement, MaxInvalidAttempts};
use twofold_domain::tenant::TwoFactorSettings;
use twofold_domain::values::Method;

use crate::report::{Report, Scenario};
use crate::stack::Stack;
use crate::watch::Watch;
use crate::Args;

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn wanted(args: &Args, name: &str) -> bool {
    args.only.is_empty() || args.only.iter().any(|o| name.starts_with(o.as_str()))
}

/// Settings with the second factor on for everyone at every sign-in, by
/// authenticator first, with no attempt limit to trip over.
pub fn two_factor_on() -> TwoFactorSettings {
    TwoFactorSettings {
        enabled: true,
        enforcement: Enforcement::EveryLogin,
        allowed_methods: vec![Method::Totp, Method::Email],
        default_method: Method::Totp,
        max_invalid_attempts: MaxInvalidAttempts::Unlimited,
        ..TwoFactorSettings::default()
    }
}

pub fn two_factor_off() -> TwoFactorSettings {
    TwoFactorSettings {
        enabled: false,
        ..two_factor_on()
    }
}

pub async fn run_all(args: &Args) -> anyhow::Result<Report> {
    let started = std::time::Instant::now();
    let whole = Watch::start("whole run");
    let mut parts = Vec::new();
    let mut scenarios: Vec<Scenario> = Vec::new();
    let facts = crate::stack::postgres_facts(&args.admin_url).await?;
    if wanted(args, "sign-ins") || wanted(args, "totp-verifications") {
        let watch = Watch::start("sign-ins, totp-verifications");
        let stack = Stack::start(args).await?;
        let result = async {
            if wanted(args, "sign-ins") {
                scenarios.extend(sign_ins::run(args, &stack).await?);
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
            if wanted(args, "totp-verifications") {
                scenarios.extend(verifications::run(args, &stack).await?);
            }
            anyhow::Ok(())
        }
        .await;
        if let Ok(rss) = stack.verifier_peak_rss_mib() {
            eprintln!("twofold-bench: verifier peak RSS over the whole run: {rss:.1} MiB");
        }
        stack.stop().await;
        result?;
        parts.push(watch.finish());
    }
    if wanted(args, "long-history") {
        let watch = Watch::start("long-history");
        // Without the verifier's memory of recent states, so that every
        // sign-in reads the user (snapshot and later events) as a first
        // sign-in on a fresh verifier does.
        let stack =
            Stack::start_with(args, "history", &[("TWOFOLD_REMEMBERED_STREAMS", "0")]).await?;
        let result = history::run(args, &stack).await;
        stack.stop().await;
        scenarios.push(result?);
        parts.push(watch.finish());
    }
    if wanted(args, "rebuild") {
        let watch = Watch::start("rebuild");
        scenarios.push(rebuild::run(args).await?);
        parts.push(watch.finish());
    }
    if wanted(args, "relay") {
        let watch = Watch::start("relay");
        scenarios.push(relay::run(args).await?);
        parts.push(watch.finish());
    }
    if wanted(args, "projection-lag") {
        let watch = Watch::start("projection-lag");
        scenarios.push(lag::run(args).await?);
        parts.push(watch.finish());
    }
    if wanted(args, "scale") {
        let watch = Watch::start("scale");
        scenarios.extend(scale::run(args).await?);
        parts.push(watch.finish());
    }
    let (smtp, sms) = (
        wanted(args, "dispatcher-smtp"),
        wanted(args, "dispatcher-scaling"),
    );
    if smtp || sms {
        let watch = Watch::start("dispatcher-smtp, dispatcher-scaling");
        scenarios.extend(dispatch::run(args, smtp, sms).await?);
        parts.push(watch.finish());
    }
    eprintln!(
        "twofold-bench: all scenarios in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Report {
        machine: crate::stack::machine(),
        settings: json!({
            "argon2": {
                "algorithm": "argon2id",
                "memory_kib": twofold_platform::password::MEMORY_KIB,
                "iterations": twofold_platform::password::ITERATIONS,
                "parallelism": twofold_platform::password::PARALLELISM,
            },
            "postgresql": facts,
            "jetstream_storage": "file",
            "build_profile": if cfg!(debug_assertions) { "dev (dependencies and the domain, platform and projections crates at opt-level 2)" } else { "release" },
        }),
        run: whole.finish(),
        parts,
        scenarios,
    })
}
