//! A user with a long history signs in as fast as a new one: the state is
//! read from a snapshot and the few events after it, however long the stream.

use std::time::Instant;

use serde_json::json;
use twofold_domain::tenant::TwoFactorSettings;

use crate::report::{percentile, Scenario};
use crate::seed::{Profile, PASSWORD};
use crate::stack::Stack;
use crate::{wall_now, Args};

/// Sign-ins measured for each of the two users, alternating.
const SAMPLES: usize = 100;

pub async fn run(args: &Args, stack: &Stack) -> anyhow::Result<Scenario> {
    let seeder = stack.seeder().await?;
    let users = seeder.users("history", 2, Profile::default()).await?;
    let (old, new) = (&users[0], &users[1]);
    eprintln!(
        "twofold-bench: writing {} past sign-ins",
        args.history_sign_ins
    );
    // The past sign-ins go through the event store as the verifier writes
    // them (events, snapshots, outbox), without argon2id, which would only
    // make the set-up slow.
    let settings = TwoFactorSettings::default();
    for i in 0..args.history_sign_ins {
        let at = wall_now() - chrono::Duration::days(89) + chrono::Duration::seconds(i as i64);
        let (_, command) = crate::seed::sign_in(old.id, &settings, at);
        seeder
            .store()
            .execute(&old.id.to_string(), |_| Ok(command.clone()))
            .await
            .map_err(|e| anyhow::Error::new(e).context("writing the history"))?;
    }
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'user' AND aggregate_id = $1",
    )
    .bind(old.id.to_string())
    .fetch_one(&stack.pool)
    .await?;
    let client = stack.client();
    let (mut old_ms, mut new_ms) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        for (name, samples) in [(&old.name, &mut old_ms), (&new.name, &mut new_ms)] {
            let t = Instant::now();
            let (status, body) = client.sign_in(name, PASSWORD).await?;
            if status != 200 {
                anyhow::bail!("a sign-in of {name} failed: {status} {body}");
            }
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    old_ms.sort_by(|a, b| a.total_cmp(b));
    new_ms.sort_by(|a, b| a.total_cmp(b));
    let (o, n) = (percentile(&old_ms, 50.0), percentile(&new_ms, 50.0));
    let details = |s: &[f64]| json!({"p50_ms": percentile(s, 50.0), "p95_ms": percentile(s, 95.0), "p99_ms": percentile(s, 99.0), "samples": s.len()});
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
        details: json!({
            "events_in_stream": events,
            "long_history": details(&old_ms),
            "new_user": details(&new_ms),
        }),
    })
}
