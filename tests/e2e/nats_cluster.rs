//! NATS beyond one local server: a server that wants a token.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use secrecy::SecretString;
use twofold_platform::Config;

use crate::delivery::free_port;
use crate::helpers::{spawn_app, TestApp};

fn nats_server() -> &'static str {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nats-server must be installed: run ops/deps")
}

/// A nats-server process of this test's own (killed when dropped).
struct Node {
    child: Child,
}

impl Node {
    fn start(args: Vec<String>) -> Self {
        let child = Command::new(nats_server())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("twofold-{what}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits (bounded) until `done` holds.
async fn eventually(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let step = Duration::from_millis(100);
    for _ in 0..(limit.as_millis() / step.as_millis()) {
        if done().await {
            return;
        }
        tokio::time::sleep(step).await;
    }
    panic!("timed out waiting for {what}");
}

async fn ready_body(addr: std::net::SocketAddr) -> Option<(StatusCode, String)> {
    let r = reqwest::get(format!("http://{addr}/health/ready"))
        .await
        .ok()?;
    Some((r.status(), r.text().await.ok()?))
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

#[tokio::test]
async fn a_worker_with_the_right_token_connects_and_one_with_a_wrong_token_says_so() {
    let port = free_port();
    let dir = temp_dir("nats-token");
    let _nats = Node::start(vec![
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-js".into(),
        "-sd".into(),
        dir.display().to_string(),
        "--auth".into(),
        "the-right-token".into(),
    ]);
    let app = spawn_app().await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = |token: &str| Config {
        metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        nats_url: format!("nats://127.0.0.1:{port}"),
        nats_stream: format!("A{id}"),
        nats_subject_prefix: format!("a{id}"),
        nats_token: Some(SecretString::from(token.to_string())),
        ..app.config.clone()
    };
    let (right, wrong) = (config("the-right-token"), config("a-wrong-token"));
    let (right_addr, wrong_addr) = (right.metrics_addr, wrong.metrics_addr);
    let relay = tokio::spawn(async move {
        let relay = twofold_relay::Relay::build(&right).await.unwrap();
        let _ = relay.run_until_stopped(std::future::pending()).await;
    });
    let projector = tokio::spawn(async move {
        let projector = twofold_projections::consumer::Projector::build(&wrong)
            .await
            .unwrap();
        projector.run_until_stopped(std::future::pending()).await;
    });

    // The right token: ready, and the outbox goes out.
    eventually(
        "the relay with the right token to be ready",
        Duration::from_secs(30),
        async || {
            ready_body(right_addr)
                .await
                .is_some_and(|(s, _)| s == StatusCode::OK)
        },
    )
    .await;
    eventually("the outbox to drain", Duration::from_secs(30), async || {
        count(&app, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
    // A wrong token: not ready, and it says why.
    eventually(
        "the worker with a wrong token to say why",
        Duration::from_secs(30),
        async || {
            ready_body(wrong_addr).await.is_some_and(|(s, why)| {
                s == StatusCode::SERVICE_UNAVAILABLE && why.contains("NATS refused the credentials")
            })
        },
    )
    .await;
    let (_, why) = ready_body(wrong_addr).await.unwrap();
    assert!(!why.contains("wrong-token"), "no secrets: {why}");
    relay.abort();
    projector.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
