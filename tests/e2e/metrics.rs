//! What `/metrics` shows on a fresh verifier and fresh workers: HELP text
//! for every twofold metric, every counter the README names (at zero before
//! anything happened), histograms rather than summaries, build info, process
//! metrics, the pools and the NATS connections.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use twofold_platform::Config;

use crate::delivery::free_port;
use crate::helpers::spawn_app;

fn nats_url() -> String {
    std::env::var("TWOFOLD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

pub(crate) async fn scrape(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits (bounded) until `addr` answers `/health/ready` with 200.
async fn ready(addr: SocketAddr) {
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(format!("http://{addr}/health/ready")).await {
            if r.status() == StatusCode::OK {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{addr} never became ready");
}

/// The metric families of a scrape's samples (without `_bucket`, `_sum`, `_count`).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default())
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|base| text.contains(&format!("# TYPE {base} histogram")))
                .unwrap_or(name)
                .to_string()
        })
        .collect()
}

/// The value of the sample `series` (name and labels as rendered).
pub(crate) fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Every counter the README names.
fn documented_counters() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut names = BTreeSet::new();
    for (at, _) in readme.match_indices("twofold_") {
        let name: String = readme[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if name.ends_with("_total") {
            names.insert(name);
        }
    }
    names
}

#[tokio::test]
async fn every_metric_has_help_and_every_documented_counter_starts_at_zero() {
    let app = spawn_app().await;
    let verifier = scrape(app.metrics_addr).await;

    // The workers, on a stream of their own.
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = || Config {
        metrics_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
        nats_url: nats_url(),
        nats_stream: format!("M{id}"),
        nats_subject_prefix: format!("m{id}"),
        ..app.config.clone()
    };
    let (relay, dispatcher, projector) = (config(), config(), config());
    let addrs = [
        relay.metrics_addr,
        dispatcher.metrics_addr,
        projector.metrics_addr,
    ];
    let clock: std::sync::Arc<dyn twofold_platform::Clock> = std::sync::Arc::new(app.clock.clone());
    let workers = [
        tokio::spawn(async move {
            let relay = twofold_relay::Relay::build(&relay).await.unwrap();
            let _ = relay.run_until_stopped(std::future::pending()).await;
        }),
        tokio::spawn(async move {
            let dispatcher = twofold_dispatcher::Dispatcher::build(&dispatcher, clock)
                .await
                .unwrap();
            dispatcher.run_until_stopped(std::future::pending()).await;
        }),
        tokio::spawn(async move {
            let projector = twofold_projections::consumer::Projector::build(&projector)
                .await
                .unwrap();
            projector.run_until_stopped(std::future::pending()).await;
        }),
    ];
    for addr in addrs {
        ready(addr).await;
    }
    // One process: every port shows all of it.
    let text = scrape(addrs[0]).await;

    for scraped in [&verifier, &text] {
        for family in families(scraped)
            .iter()
            .filter(|f| f.starts_with("twofold_"))
        {
            assert!(
                scraped.contains(&format!("# HELP {family} ")),
                "no HELP for {family}:\n{scraped}"
            );
        }
        assert!(
            !scraped.contains(" summary"),
            "histograms, not summaries:\n{scraped}"
        );
    }
    // The store's batches are a histogram (the verifier appended at start).
    assert!(
        verifier.contains("# TYPE twofold_store_batch_appends histogram"),
        "{verifier}"
    );
    assert!(
        verifier.contains("twofold_store_batch_appends_bucket{le=\"1\"}"),
        "{verifier}"
    );

    let documented = documented_counters();
    assert!(documented.len() >= 10, "{documented:?}");
    for counter in &documented {
        assert!(
            text.contains(&format!("# HELP {counter} ")) && text.contains(&format!("\n{counter}")),
            "{counter} is documented but not registered:\n{text}"
        );
    }
    // Nothing has been locked, failed or refused: those counters are there at zero
    // (asserted only when this test has the process to itself, as under nextest).
    if std::env::var("NEXTEST_EXECUTION_MODE").as_deref() == Ok("process-per-test") {
        for series in [
            "twofold_lockouts_total",
            "twofold_sign_ins_total{outcome=\"locked\"}",
            "twofold_verifications_total{method=\"totp\",outcome=\"rejected\"}",
            "twofold_code_limit_reached_total{budget=\"codes_per_account\"}",
            "twofold_dispatcher_failed_total{method=\"email\",provider=\"smtp\"}",
            "twofold_dispatcher_sent_total{method=\"email\",provider=\"smtp\"}",
        ] {
            assert_eq!(value(&text, series), Some(0.0), "{series}:\n{text}");
        }
    }

    // Build info, process metrics, each worker's pool and NATS connection.
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        text.lines().any(|l| l.starts_with("twofold_build_info{")
            && l.contains(&format!("version=\"{version}\""))
            && l.ends_with(" 1")),
        "{text}"
    );
    for family in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_threads",
    ] {
        assert!(
            value(&text, family).is_some_and(|v| v > 0.0),
            "{family}:\n{text}"
        );
    }
    // In whole seconds (a counter of the metrics crate): present, maybe 0 yet.
    assert!(
        value(&text, "process_cpu_seconds_total").is_some(),
        "{text}"
    );
    for worker in ["verifier", "relay", "dispatcher", "projector"] {
        let pool = format!("twofold_db_pool_connections{{worker=\"{worker}\"}}");
        assert!(
            value(&text, &pool).is_some_and(|v| v >= 1.0),
            "{pool}:\n{text}"
        );
        let max = format!("twofold_db_pool_max_connections{{worker=\"{worker}\"}}");
        assert_eq!(value(&text, &max), Some(8.0), "{max}:\n{text}");
        let idle = format!("twofold_db_pool_idle_connections{{worker=\"{worker}\"}}");
        assert!(value(&text, &idle).is_some(), "{idle}:\n{text}");
    }
    for worker in ["relay", "dispatcher", "projector"] {
        let nats = format!("twofold_nats_connected{{worker=\"{worker}\"}}");
        assert_eq!(value(&text, &nats), Some(1.0), "{nats}:\n{text}");
    }
    for w in workers {
        w.abort();
    }
}
