//! NATS beyond one local server: a server that wants a token, and a
//! three-node JetStream cluster with a stream of three replicas that loses a
//! node under load.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::json;
use twofold_platform::Config;

use crate::delivery::{code_in, free_port, Smtp};
use crate::helpers::{settings_on, spawn_app, spawn_app_with, TestApp};

fn nats_server() -> &'static str {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nats-server must be installed: run ops/deps")
}

/// A nats-server process of this test's own (killed when dropped).
struct Node {
    child: Child,
    args: Vec<String>,
}

impl Node {
    fn start(args: Vec<String>) -> Self {
        let child = Command::new(nats_server())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, args }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same ports and store.
    fn restart(&mut self) {
        self.kill();
        *self = Self::start(self.args.clone());
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

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_worker_trusting_the_servers_ca_connects_over_tls_and_one_without_it_does_not() {
    // A CA of this test's own, and a certificate for 127.0.0.1 signed by it.
    let dir = temp_dir("nats-tls");
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=twofold test CA",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("san.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.cnf",
        ],
    );
    let port = free_port();
    let _nats = Node::start(vec![
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-js".into(),
        "-sd".into(),
        dir.join("store").display().to_string(),
        "--tls".into(),
        "--tlscert".into(),
        dir.join("server.pem").display().to_string(),
        "--tlskey".into(),
        dir.join("server.key").display().to_string(),
    ]);
    let app = spawn_app().await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = |ca: Option<String>| Config {
        metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        nats_url: format!("nats://127.0.0.1:{port}"),
        nats_stream: format!("S{id}"),
        nats_subject_prefix: format!("s{id}"),
        nats_tls_ca_file: ca,
        nats_tls_required: true,
        ..app.config.clone()
    };
    let trusting = config(Some(dir.join("ca.pem").display().to_string()));
    let untrusting = config(None);
    let (trusting_addr, untrusting_addr) = (trusting.metrics_addr, untrusting.metrics_addr);
    let relay = tokio::spawn(async move {
        let relay = twofold_relay::Relay::build(&trusting).await.unwrap();
        let _ = relay.run_until_stopped(std::future::pending()).await;
    });
    let projector = tokio::spawn(async move {
        let projector = twofold_projections::consumer::Projector::build(&untrusting)
            .await
            .unwrap();
        projector.run_until_stopped(std::future::pending()).await;
    });
    eventually(
        "the relay trusting the CA to be ready",
        Duration::from_secs(30),
        async || {
            ready_body(trusting_addr)
                .await
                .is_some_and(|(s, _)| s == StatusCode::OK)
        },
    )
    .await;
    eventually(
        "the outbox to drain over TLS",
        Duration::from_secs(30),
        async || count(&app, "SELECT count(*) FROM outbox").await == 0,
    )
    .await;
    // The system's roots do not know the test's CA: never connected.
    let (status, why) = ready_body(untrusting_addr).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{why}");
    assert!(why.contains("NATS"), "{why}");
    relay.abort();
    projector.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Three nodes routed to each other on loopback, JetStream on each.
struct Cluster {
    nodes: Vec<Node>,
    client_ports: Vec<u16>,
    dirs: Vec<PathBuf>,
}

impl Cluster {
    fn start() -> Self {
        let name = format!("c{}", uuid::Uuid::new_v4().simple());
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let dirs: Vec<PathBuf> = (0..3).map(|_| temp_dir("nats-node")).collect();
        let nodes = (0..3)
            .map(|i| {
                let routes: Vec<String> = (0..3)
                    .filter(|j| *j != i)
                    .map(|j| format!("nats://127.0.0.1:{}", route_ports[j]))
                    .collect();
                Node::start(vec![
                    "-a".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    client_ports[i].to_string(),
                    "-n".into(),
                    format!("{name}-n{i}"),
                    "-js".into(),
                    "-sd".into(),
                    dirs[i].display().to_string(),
                    "--cluster_name".into(),
                    name.clone(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", route_ports[i]),
                    "--routes".into(),
                    routes.join(","),
                ])
            })
            .collect();
        Self {
            nodes,
            client_ports,
            dirs,
        }
    }

    fn url(&self, node: usize) -> String {
        format!("nats://127.0.0.1:{}", self.client_ports[node])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Every builder has applied every event (per stream, a builder's position
/// is the last sequence it applied, so the positions add up to the events).
async fn caught_up(app: &TestApp) -> bool {
    let events = count(app, "SELECT count(*) FROM events").await;
    if count(app, "SELECT count(*) FROM outbox").await != 0 {
        return false;
    }
    for builder in twofold_projections::store::Builder::ALL {
        let applied: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(sequence), 0)::bigint FROM projection_positions WHERE projection = $1",
        )
        .bind(builder.name())
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if applied != events {
            return false;
        }
    }
    true
}

const SIGN_INS: usize = 30;

#[tokio::test]
async fn sign_ins_through_a_three_node_cluster_survive_a_node_killed_and_restarted() {
    let mut cluster = Cluster::start();
    let smtp = Smtp::start().await;
    let app = spawn_app_with(|c| {
        c.smtp_port = smtp.port;
        c.smtp_from = "Acme <no-reply@acme.test>".into();
    })
    .await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    // The workers know node 0 only; the client learns the others from it.
    let config = Config {
        nats_url: cluster.url(0),
        nats_stream: format!("C{id}"),
        nats_subject_prefix: format!("c{id}"),
        nats_stream_replicas: 3,
        ..app.config.clone()
    };

    // The stream, with three replicas, before the relay finds it (once the
    // cluster has elected its JetStream leader).
    let client = async_nats::connect(cluster.url(1)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream_config = async_nats::jetstream::stream::Config {
        name: config.nats_stream.clone(),
        subjects: vec![format!("{}.events.>", config.nats_subject_prefix)],
        duplicate_window: Duration::from_secs(120),
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: 3,
        ..Default::default()
    };
    eventually(
        "the cluster to take a stream of three replicas",
        Duration::from_secs(30),
        async || js.create_stream(stream_config.clone()).await.is_ok(),
    )
    .await;

    // Relay, dispatcher and projector, with short ack waits so that what a
    // lost node leaves unacknowledged comes again within the test.
    let relay = twofold_relay::Relay::connect(app.pool.clone(), &config)
        .await
        .unwrap();
    let dispatcher = twofold_dispatcher::Dispatcher::connect(
        app.pool.clone(),
        &config,
        &twofold_dispatcher::Source {
            stream: config.nats_stream.clone(),
            subject_prefix: config.nats_subject_prefix.clone(),
            durable: "dispatcher".into(),
            ack_wait: Duration::from_secs(2),
            retry_delay: Duration::from_millis(500),
            concurrency: 4,
            max_deliver: twofold_dispatcher::max_deliver_for(config.delivery_max_attempts),
        },
        Arc::new(app.clock.clone()),
    )
    .await
    .unwrap();
    let source = twofold_projections::consumer::Source {
        nats_url: config.nats_url.clone(),
        stream: config.nats_stream.clone(),
        filter_subject: format!("{}.events.>", config.nats_subject_prefix),
        durable: "projector".into(),
        ack_wait: Duration::from_secs(2),
    };
    let mut workers = vec![
        tokio::spawn(async move {
            let _ = relay.run_until_stopped(std::future::pending()).await;
        }),
        tokio::spawn(dispatcher.run_until_stopped(std::future::pending())),
    ];
    let consumer = twofold_projections::consumer::Consumer::connect(
        app.pool.clone(),
        app.state.personal.clone(),
        &source,
    )
    .await
    .unwrap();
    workers.push(tokio::spawn(
        consumer.run_until_stopped(std::future::pending()),
    ));

    let admin = app.admin_token().await;
    let names: Vec<String> = (0..SIGN_INS).map(|i| format!("cl{i:02}")).collect();
    for name in &names {
        app.create_user(
            &admin,
            json!({"username": name, "password": "correct horse battery", "email": format!("{name}@acme.test")}),
        )
        .await;
    }
    let r = app
        .set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);

    // Sign-ins, with node 0 (the one the workers were told of) killed a
    // third of the way through and back two thirds of the way.
    let mut challenges = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if i == SIGN_INS / 3 {
            cluster.nodes[0].kill();
        }
        if i == 2 * SIGN_INS / 3 {
            cluster.nodes[0].restart();
        }
        let r = app.sign_in(name, "correct horse battery").await;
        assert_eq!(r.body["status"], "challenge", "{:?}", r.body);
        assert_eq!(r.body["challenge"]["method"], "email", "{:?}", r.body);
        challenges.push(r.body["challenge"]["token"].as_str().unwrap().to_string());
    }

    // Every code arrives, and signs in (names of one length: no address is
    // part of another).
    eventually(
        "every code to be mailed",
        Duration::from_secs(40),
        async || {
            names
                .iter()
                .all(|n| !smtp.mails_to(&format!("{n}@acme.test")).is_empty())
        },
    )
    .await;
    for (name, token) in names.iter().zip(&challenges) {
        let mails = smtp.mails_to(&format!("{name}@acme.test"));
        let code = code_in(&mails[0]).expect("a code in the mail");
        let r = app
            .post(
                "/challenge/verify",
                json!({"challenge_token": token, "code": code}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{name}: {:?}", r.body);
    }

    // Every event reached the stream once and both read models.
    eventually(
        "the read models to catch up",
        Duration::from_secs(40),
        async || caught_up(&app).await,
    )
    .await;
    let events = count(&app, "SELECT count(*) FROM events").await;
    let info = js
        .get_stream(&config.nats_stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(
        info.state.messages as i64, events,
        "each event in the stream once"
    );
    assert_eq!(info.config.num_replicas, 3);
    // And the restarted node holds its replica again, current with the leader.
    eventually(
        "every replica to be current",
        Duration::from_secs(30),
        async || {
            let Ok(mut stream) = js.get_stream(&config.nats_stream).await else {
                return false;
            };
            let Ok(info) = stream.info().await else {
                return false;
            };
            let replicas = info
                .cluster
                .as_ref()
                .map(|c| c.replicas.clone())
                .unwrap_or_default();
            replicas.len() == 2 && replicas.iter().all(|r| r.current && !r.offline)
        },
    )
    .await;
    let users = count(
        &app,
        "SELECT count(*) FROM rm_users WHERE username LIKE 'cl%'",
    )
    .await;
    assert_eq!(users, SIGN_INS as i64);
    let delivered = count(
        &app,
        "SELECT count(*) FROM events WHERE event_type = 'CodeDelivered'",
    )
    .await;
    assert_eq!(delivered, SIGN_INS as i64, "one delivery per challenge");
    // Sent exactly once: still one mail each after the redeliveries settled.
    for name in &names {
        let mails = smtp.mails_to(&format!("{name}@acme.test"));
        assert_eq!(mails.len(), 1, "{name} got {} mails", mails.len());
    }
    for w in workers {
        w.abort();
    }
}
