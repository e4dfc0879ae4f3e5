//! How the admin's and the auditor's reads grow with the size of a tenant:
//! for each size, a tenant with a year and more of history is written by
//! COPY (events, their personal data sealed under per-user data keys, and
//! username claims, as the verifier writes them), its read
//! models built by the real rebuild, and the real verifier asked, one request
//! at a time, for the Overview (now and a year back), directory pages, one
//! user's audit export, the whole tenant's export in both formats (against
//! PostgreSQL's own `COPY … TO STDOUT` of the same rows) and the console's
//! pages.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use chrono::Duration;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolCopyExt;
use twofold_platform::personal::Personal;

use crate::load::{closed_loop, Measured};
use crate::report::Scenario;
use crate::seed::{Profile, PASSWORD};
use crate::stack::{Client, Stack};
use crate::synthetic::{write_tenant, Shape};
use crate::{wall_now, Args};

/// How far back the history starts.
const HISTORY_DAYS: i64 = 400;

/// One timed read: a name, the paths asked in turn, and its p99 target.
struct Read {
    name: &'static str,
    paths: Vec<String>,
    p99_ms: f64,
}

pub async fn run(args: &Args) -> anyhow::Result<Vec<Scenario>> {
    let mut sizes = Vec::new();
    for &users in &args.scale_users {
        let stack = Stack::start_with(args, &format!("scale{users}"), &[]).await?;
        let result = one_size(args, &stack, users).await;
        stack.stop().await;
        sizes.push(result?);
    }
    // One measurement's sizes next to each other, with how each grew from
    // the smallest.
    let mut out = Vec::new();
    let count = sizes.iter().map(Vec::len).min().unwrap_or(0);
    for i in 0..count {
        let smallest = sizes[0][i].value;
        for size in &mut sizes {
            let mut s = size[i].clone();
            if let Value::Object(d) = &mut s.details {
                d.insert(
                    "growth_from_smallest".into(),
                    json!(s.value / smallest.max(1e-9)),
                );
            }
            out.push(s);
        }
    }
    Ok(out)
}

fn label(users: u64, events: u64) -> String {
    format!(
        "scale, {}k users / {:.1}M events",
        users / 1000,
        events as f64 / 1e6
    )
}

async fn one_size(args: &Args, stack: &Stack, users: u64) -> anyhow::Result<Vec<Scenario>> {
    // Set-up: an admin who signs in with a password only, the history by
    // COPY, and the read models by the rebuild the operator runs.
    stack.apply_settings(&super::two_factor_off()).await?;
    let seeder = stack.seeder().await?;
    let admin = seeder
        .users(
            "scaleadmin",
            1,
            Profile {
                admin: true,
                ..Profile::default()
            },
        )
        .await?;
    let client = stack.client();
    let (status, body) = client.sign_in(&admin[0].name, PASSWORD).await?;
    let token = body["session"]["token"]
        .as_str()
        .with_context(|| format!("the admin's sign-in: {status} {body}"))?
        .to_string();
    let started = Instant::now();
    eprintln!("twofold-bench: writing a tenant of {users} users");
    let personal = Personal::new(stack.keys.clone());
    let written = write_tenant(
        &stack.pool,
        &personal,
        Shape {
            tenant: stack.tenant,
            users,
            events_per_user: args.scale_events_per_user,
            start: wall_now() - Duration::days(HISTORY_DAYS),
            span: Duration::days(HISTORY_DAYS) - Duration::hours(1),
        },
    )
    .await?;
    let copied = started.elapsed().as_secs_f64();
    eprintln!("twofold-bench: {written} events in {copied:.0} s; rebuilding");
    let rebuilt = twofold_projections::rebuild::rebuild(&stack.pool, &personal, |_| {}).await?;
    let seeding = started.elapsed().as_secs_f64();
    eprintln!("twofold-bench: rebuilt in {:.0} s", rebuilt.seconds);
    let label = label(users, written);
    let set_up = json!({
        "users": users,
        "events": written,
        "copy_seconds": copied,
        "rebuild_seconds": rebuilt.seconds,
        "seeding_seconds": seeding,
    });

    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT user_id::text FROM usernames WHERE tenant_id = $1 ORDER BY username LIMIT 500",
    )
    .bind(stack.tenant.as_uuid())
    .fetch_all(&stack.pool)
    .await?;
    // A day about a year back, at moments through it.
    let year_back = (wall_now() - Duration::days(365)).date_naive();
    let moment = |i: usize| {
        let at = year_back.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
            + Duration::minutes(7 * i as i64 % 1440);
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    // The first `as_of` of the day takes its checkpoint (asked again while
    // it answers `timeout`: the checkpoint is still being taken).
    let t = Instant::now();
    first_answer(&client, &token, &format!("/overview?as_of={}", moment(0))).await?;
    let checkpoint_ms = t.elapsed().as_secs_f64() * 1000.0;
    let pages = users / 50;
    let pages_ = format!("/t/{}/admin", stack.tenant_id);
    // The console's first Overview of the day computes the 30 days' figures
    // (swept from a checkpoint) and keeps them; the rest read them.
    let t = Instant::now();
    first_answer(&client, &token, &format!("{pages_}/overview")).await?;
    let days_ms = t.elapsed().as_secs_f64() * 1000.0;
    let reads = [
        Read {
            name: "GET /overview",
            paths: vec!["/overview".into()],
            p99_ms: 20.0,
        },
        Read {
            name: "GET /overview?as_of= a day a year back",
            paths: (1..200)
                .map(|i| format!("/overview?as_of={}", moment(i)))
                .collect(),
            p99_ms: 200.0,
        },
        Read {
            name: "directory filters and search, GET /users?…",
            paths: (0..50u64)
                .flat_map(|i| {
                    [
                        format!("/users?status=enrolled&page={}", 1 + i * 7 % pages.max(1)),
                        format!("/users?role=finance&two_factor=on&page={}", 1 + i % 20),
                        format!("/users?q=user{:04}", i * 37 % 1000),
                        format!("/users?method=totp&locked=false&page={}", 1 + i % 10),
                        "/users?backup_codes=low".into(),
                        format!("/users?status=not_started&page={}", 1 + i % 5),
                    ]
                })
                .collect(),
            p99_ms: 30.0,
        },
        Read {
            name: "audit export of one user's history",
            paths: ids
                .iter()
                .map(|id| format!("/audit?user_id={id}&format=ndjson"))
                .collect(),
            p99_ms: 50.0,
        },
        Read {
            name: "console Overview page",
            paths: vec![format!("{pages_}/overview")],
            p99_ms: 50.0,
        },
        Read {
            name: "console Users page",
            paths: (0..50u64)
                .flat_map(|i| {
                    [
                        format!("{pages_}/users?page={}", 1 + i * 7 % pages.max(1)),
                        format!("{pages_}/users?status=pending&q=user{:03}", i % 100),
                    ]
                })
                .collect(),
            p99_ms: 50.0,
        },
    ];
    let mut out = Vec::new();
    for read in reads {
        let (measured, refused) = timed(&client, &token, &read.paths, args.seconds).await;
        if measured.latencies.is_empty() {
            bail!("{}: nothing answered: {:?}", read.name, measured.reasons);
        }
        let p99 = crate::report::percentile(&measured.latencies, 99.0);
        let mut details = measured.details();
        if let Value::Object(d) = &mut details {
            d.insert("set_up".into(), set_up.clone());
            d.insert("answered_other_than_200".into(), json!(refused));
            if read.name.contains("as_of") {
                d.insert(
                    "first_request_taking_the_checkpoint_ms".into(),
                    json!(checkpoint_ms),
                );
            }
            if read.name.contains("Overview page") {
                d.insert("first_request_keeping_the_days_ms".into(), json!(days_ms));
            }
        }
        out.push(Scenario {
            name: format!("{label}: {}", read.name),
            value: p99,
            unit: "ms (p99)".into(),
            baseline: None,
            baseline_unit: None,
            ratio: None,
            target: format!("p99 <= {} ms", read.p99_ms),
            met: p99 <= read.p99_ms && measured.failures == 0 && refused.is_empty(),
            details,
        });
    }
    out.extend(export(stack, &client, &token, &label, &set_up).await?);
    Ok(out)
}

/// Asks `path` until it answers 200, while it answers `timeout` (503): the
/// work it started goes on and the next asking finds it done.
async fn first_answer(client: &Client, token: &str, path: &str) -> anyhow::Result<()> {
    for tries in 1.. {
        match client.get(path, token).await? {
            (200, _) => break,
            (503, _) if tries < 20 => {}
            (status, _) => bail!("GET {path}: {status}"),
        }
    }
    Ok(())
}

/// One client asking the paths in turn for `seconds`. Every answer's time
/// counts, a refusal's too (a `timeout` after 30 s is what the reader
/// waited); answers other than 200 are counted by status.
async fn timed(
    client: &Client,
    token: &str,
    paths: &[String],
    seconds: f64,
) -> (Measured, BTreeMap<String, u64>) {
    let paths = Arc::new(paths.to_vec());
    let refused = Arc::new(Mutex::new(BTreeMap::new()));
    let (client, token) = (client.clone(), Arc::new(token.to_string()));
    let counted = refused.clone();
    let measured = closed_loop(1, seconds, move |_, i| {
        let (client, token, paths, refused) = (
            client.clone(),
            token.clone(),
            paths.clone(),
            counted.clone(),
        );
        async move {
            let path = &paths[i as usize % paths.len()];
            Some(match client.get(path, &token).await {
                Ok((200, _)) => Ok(()),
                Ok((status, _)) => {
                    let mut r = refused.lock().unwrap_or_else(|p| p.into_inner());
                    *r.entry(status.to_string()).or_insert(0) += 1;
                    Ok(())
                }
                Err(e) => Err(format!("request failed: {e}")),
            })
        }
    })
    .await;
    let refused = refused.lock().unwrap_or_else(|p| p.into_inner()).clone();
    (measured, refused)
}

/// The whole tenant's signed export, in both formats, against PostgreSQL
/// writing the same audit rows with `COPY … TO STDOUT`, alternated, the
/// better of two each. NDJSON shows each entry's personal data opened beside
/// the sealed form (the data keys read and every sealed value decrypted:
/// work COPY does not do); CSV writes the rows as stored, sealed, as COPY
/// does.
async fn export(
    stack: &Stack,
    client: &Client,
    token: &str,
    label: &str,
    set_up: &Value,
) -> anyhow::Result<Vec<Scenario>> {
    let (mut copied, mut ndjson, mut csv) = (0.0f64, 0.0f64, 0.0f64);
    let mut rows = 0u64;
    for _ in 0..2 {
        let t = Instant::now();
        let mut out = stack
            .pool
            .copy_out_raw(&format!(
                "COPY (SELECT position, tenant_id, aggregate_type, aggregate_id, sequence, \
                 event_type, at, actor_kind, actor_id, ip, user_agent, reason, user_id, details \
                 FROM rm_audit WHERE tenant_id = '{}' ORDER BY position) TO STDOUT",
                stack.tenant_id
            ))
            .await?;
        let mut lines = 0u64;
        use futures::StreamExt;
        while let Some(chunk) = out.next().await {
            lines += chunk?.iter().filter(|b| **b == b'\n').count() as u64;
        }
        copied = copied.max(lines as f64 / t.elapsed().as_secs_f64());
        // Lines that are not rows: NDJSON's trailer; CSV's header and trailer.
        for (format, rate, not_rows) in [("ndjson", &mut ndjson, 1), ("csv", &mut csv, 2)] {
            let t = Instant::now();
            let (status, lines_out) = client
                .get_lines(&format!("/audit?format={format}"), token)
                .await?;
            if status != 200 {
                bail!("the tenant's {format} export answered {status}");
            }
            rows = lines_out.saturating_sub(not_rows);
            *rate = rate.max(rows as f64 / t.elapsed().as_secs_f64());
            if rows != lines {
                bail!("the {format} export has {rows} rows where COPY wrote {lines}");
            }
        }
    }
    let scenario = |what: &str, exported: f64| {
        let ratio = exported / copied;
        Scenario {
            name: format!("{label}: tenant-wide audit export, {what}"),
            value: exported,
            unit: "rows/s".into(),
            baseline: Some(copied),
            baseline_unit: Some("rows/s, COPY TO STDOUT".into()),
            ratio: Some(ratio),
            target: "ratio >= 0.5".into(),
            met: ratio >= 0.5,
            details: json!({"rows": rows, "set_up": set_up}),
        }
    };
    Ok(vec![
        scenario("NDJSON, personal data opened", ndjson),
        scenario("CSV, as stored", csv),
    ])
}
