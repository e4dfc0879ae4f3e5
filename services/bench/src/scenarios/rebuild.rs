//! Rebuilding every read model from a large event store, in events per second.

use serde_json::json;

use crate::report::Scenario;
use crate::stack::{create_database, drop_database};
use crate::Args;

const TARGET: f64 = 50_000.0;

pub async fn run(args: &Args) -> anyhow::Result<Scenario> {
    let name = format!("twofold_bench_{}_rebuild", std::process::id());
    let url = create_database(&args.admin_url, &name).await?;
    let result = async {
        let pool = twofold_platform::db::pool_options(4).connect(&url).await?;
        twofold_platform::db::migrate(&pool).await?;
        // The events' personal data sealed, as in production, under keys
        // the rebuild opens.
        let personal = twofold_platform::personal::Personal::new(
            twofold_platform::crypto::Keyring::generate("bench"),
        );
        eprintln!("twofold-bench: writing {} events", args.rebuild_events);
        crate::synthetic::write_events(&pool, &personal, args.rebuild_events).await?;
        eprintln!("twofold-bench: rebuilding");
        let done = twofold_projections::rebuild::rebuild(&pool, &personal, |_| {}).await?;
        pool.close().await;
        let rate = done.events as f64 / done.seconds;
        anyhow::Ok(Scenario {
            name: format!("rebuild of all read models from {} events", done.events),
            value: rate,
            unit: "events/s".into(),
            baseline: None,
            baseline_unit: None,
            ratio: None,
            target: format!(">= {TARGET} events/s"),
            met: rate >= TARGET,
            details: json!({"seconds": done.seconds, "users": done.users}),
        })
    }
    .await;
    if !args.keep {
        drop_database(&args.admin_url, &name).await;
    }
    result
}
