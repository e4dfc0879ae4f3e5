//! Events through NATS: the relay publishes the outbox to JetStream, the
//! projector's builders keep the read models from it, and neither a builder
//! killed mid-batch, nor redelivery, nor NATS going away loses or doubles
//! anything.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use twofold_platform::Config;
use twofold_projections::consumer::{Consumer, Source};
use twofold_projections::store::Builder;
use twofold_relay::Relay;

use crate::delivery::free_port;
use crate::helpers::{settings_on, spawn_app, TestApp};

pub(crate) fn nats_url() -> String {
    std::env::var("TWOFOLD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

/// A stream and subject prefix of this test's own.
pub(crate) fn nats_config(url: &str) -> Config {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Config {
        nats_url: url.to_string(),
        nats_stream: format!("T{id}"),
        nats_subject_prefix: format!("t{id}"),
        ..Config::default()
    }
}

pub(crate) fn source(config: &Config, durable: &str) -> Source {
    Source {
        nats_url: config.nats_url.clone(),
        stream: config.nats_stream.clone(),
        filter_subject: format!("{}.events.>", config.nats_subject_prefix),
        durable: durable.to_string(),
        ack_wait: Duration::from_secs(1),
    }
}

pub(crate) async fn start_relay(app: &TestApp, config: &Config) -> tokio::task::JoinHandle<()> {
    let relay = Relay::connect(app.pool.clone(), config).await.unwrap();
    tokio::spawn(async move {
        let _ = relay.run_until_stopped(std::future::pending()).await;
    })
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

/// Waits (bounded) until a relay has published the whole outbox.
async fn outbox_drained(app: &TestApp) {
    eventually("the outbox to drain", async || {
        count(app, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
}

/// Waits (bounded) until `done` holds.
pub(crate) async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn some_history(app: &TestApp) {
    let admin = app.admin_token().await;
    for name in ["nia", "oto", "pax"] {
        app.create_user(
            &admin,
            json!({"username": name, "password": "correct horse battery", "email": format!("{name}@acme.test")}),
        )
        .await;
    }
    app.set_settings(&admin, settings_on(&["email"], "email"))
        .await;
    for name in ["nia", "oto"] {
        let c = app.sign_in(name, "correct horse battery").await;
        let token = c.body["challenge"]["token"].as_str().unwrap().to_string();
        let code = app.delivered_code(&token).await;
        let ok = app
            .post(
                "/challenge/verify",
                json!({"challenge_token": token, "code": code}),
            )
            .await;
        assert_eq!(ok.status, StatusCode::OK);
    }
}

/// The directory's rows and, last, the Overview counts moved with them
/// (zeros left out: a live builder leaves a count that went back to 0), and
/// the audit history.
pub(crate) async fn read_models(app: &TestApp) -> (Vec<Value>, Vec<(i64, String)>) {
    let mut users: Vec<Value> = sqlx::query_scalar("SELECT row FROM rm_users ORDER BY user_id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    let counts: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT tenant_id, key, value FROM rm_overview_counts WHERE value <> 0 ORDER BY 1, 2",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    users.push(serde_json::json!(counts));
    let audit: Vec<(i64, String)> =
        sqlx::query_as("SELECT position, details::text FROM rm_audit ORDER BY position")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    (users, audit)
}

/// Every builder has applied every event: per stream, a builder's position is
/// the last sequence it applied, so the positions add up to the event count.
pub(crate) async fn caught_up(app: &TestApp) -> bool {
    let events = count(app, "SELECT count(*) FROM events").await;
    if count(app, "SELECT count(*) FROM outbox").await != 0 {
        return false;
    }
    for builder in Builder::ALL {
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

/// An app with some history, all of it published to a stream of the test's
/// own by a relay that goes on running.
async fn history_in_the_stream() -> (TestApp, Config, tokio::task::JoinHandle<()>) {
    let app = spawn_app().await;
    let config = nats_config(&nats_url());
    let relay = start_relay(&app, &config).await;
    some_history(&app).await;
    outbox_drained(&app).await;
    (app, config, relay)
}

/// Waits until the builders have applied every event, and checks the read
/// models are exactly what a rebuild from the event store makes (nothing
/// lost or applied twice); returns them.
async fn caught_up_as_a_rebuild_makes_them(app: &TestApp) -> (Vec<Value>, Vec<(i64, String)>) {
    eventually("the read models to catch up", async || caught_up(app).await).await;
    let live = read_models(app).await;
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
    assert_eq!(read_models(app).await, live, "nothing lost or doubled");
    live
}

#[tokio::test]
async fn committed_events_reach_the_read_models_through_jetstream() {
    let (app, config, relay) = history_in_the_stream().await;

    // Every event is in the stream once, under its tenant and type.
    let client = async_nats::connect(&config.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&config.nats_stream).await.unwrap();
    let events = count(&app, "SELECT count(*) FROM events").await;
    assert_eq!(stream.info().await.unwrap().state.messages as i64, events);

    let src = source(&config, "live");
    let p = Consumer::connect(app.pool.clone(), app.state.personal.clone(), &src)
        .await
        .unwrap();
    let projector = tokio::spawn(p.run_until_stopped(std::future::pending()));
    eventually("the read models to catch up", async || {
        caught_up(&app).await
    })
    .await;
    let live = read_models(&app).await;
    // Their rows, and the Overview counts last.
    let users = live.0.len() - 1;
    assert_eq!(users, 4, "root-admin, nia, oto, pax");

    // A rebuild from the event store gives exactly the live read models.
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
    assert_eq!(read_models(&app).await, live);

    // And new events keep flowing.
    let admin = app.admin_token().await;
    app.create_user(
        &admin,
        json!({"username": "quy", "password": "correct horse battery"}),
    )
    .await;
    eventually("the new user", async || {
        count(&app, "SELECT count(*) FROM rm_users WHERE username = 'quy'").await == 1
    })
    .await;
    projector.abort();
    relay.abort();
}

#[tokio::test]
async fn a_builder_killed_mid_batch_and_redelivery_leave_the_read_models_exact() {
    let (app, config, relay) = history_in_the_stream().await;
    let src = source(&config, "crashy");

    // A builder applies part of a batch and dies before acking: its updates
    // are committed, its messages will come again.
    let records = twofold_projections::record::load_batch(&app.pool, 0, 7)
        .await
        .unwrap();
    for r in &records {
        assert!(Builder::Directory
            .apply(&app.pool, &app.state.personal, r)
            .await
            .unwrap());
    }
    // A projector dies mid-run.
    let first = Consumer::connect(app.pool.clone(), app.state.personal.clone(), &src)
        .await
        .unwrap();
    let killed = tokio::spawn(first.run_until_stopped(std::future::pending()));
    tokio::time::sleep(Duration::from_millis(30)).await;
    killed.abort();

    // A fresh one on the same durable consumer finishes the job.
    let p = Consumer::connect(app.pool.clone(), app.state.personal.clone(), &src)
        .await
        .unwrap();
    let projector = tokio::spawn(p.run_until_stopped(std::future::pending()));
    caught_up_as_a_rebuild_makes_them(&app).await;
    projector.abort();
    relay.abort();
}

/// A NATS server of this test's own, to stop and start.
struct PrivateNats {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl PrivateNats {
    fn start(port: u16, dir: &std::path::Path) -> Self {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("nats-server must be installed: run ops/deps");
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn stop(mut self) -> (u16, std::path::PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.port, self.dir.clone())
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[tokio::test]
async fn with_nats_down_sign_in_works_and_every_event_arrives_once_it_is_back() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("twofold-nats-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let nats = PrivateNats::start(port, &dir);
    let app = spawn_app().await;
    let config = nats_config(&format!("nats://127.0.0.1:{port}"));
    let relay = start_relay(&app, &config).await;
    some_history(&app).await;
    outbox_drained(&app).await;

    // NATS goes away: sign-ins still work, the outbox grows.
    let (port, dir) = nats.stop();
    let admin = app.admin_token().await;
    app.create_user(
        &admin,
        json!({"username": "rio", "password": "correct horse battery", "email": "rio@acme.test"}),
    )
    .await;
    let r = app.sign_in("rio", "correct horse battery").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(count(&app, "SELECT count(*) FROM outbox").await > 0);

    // NATS is back: everything is published, nothing twice.
    let _nats = PrivateNats::start(port, &dir);
    eventually("the outbox to drain after NATS returned", async || {
        count(&app, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
    let client = async_nats::connect(&config.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&config.nats_stream).await.unwrap();
    let events = count(&app, "SELECT count(*) FROM events").await;
    assert_eq!(stream.info().await.unwrap().state.messages as i64, events);
    relay.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_backlog_of_many_batches_is_published_once_each_and_in_order_per_stream() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(
            app.create_user(
                &admin,
                json!({"username": format!("many{i}"), "password": "correct horse battery"}),
            )
            .await,
        );
    }
    // Sign-ins of everyone at once, many times over, straight through the
    // store: their appends share statements, so outbox rows carry events of
    // many streams, and the backlog spans several of the relay's batches.
    let write = |id: String| {
        let store = app.state.users.clone();
        async move {
            for _ in 0..40 {
                let command = || {
                    twofold_domain::user::UserCommand::SignIn(twofold_domain::user::SignIn {
                        password_ok: true,
                        address_retry_after: None,
                        settings: Default::default(),
                        challenge: twofold_domain::user::NewChallenge {
                            id: twofold_domain::ChallengeId(uuid::Uuid::new_v4()),
                            token_hash: twofold_domain::secrets::SecretHash("c".into()),
                        },
                        session: twofold_domain::user::NewSession {
                            id: twofold_domain::SessionId(uuid::Uuid::new_v4()),
                            token_hash: twofold_domain::secrets::SecretHash("s".into()),
                            expires_at: None,
                        },
                        device: None,
                        enrollment_seed: None,
                        ctx: twofold_domain::Ctx::new(
                            crate::helpers::start_time(),
                            twofold_domain::Actor::System,
                        ),
                    })
                };
                store.execute(&id, |_| Ok(command())).await.unwrap();
            }
        }
    };
    futures::future::join_all(ids.iter().cloned().map(write)).await;
    let events = count(&app, "SELECT count(*) FROM events").await;
    let rows = count(&app, "SELECT count(*) FROM outbox").await;
    assert!(
        events > 2000 && rows < events / 4,
        "{events} events in {rows} outbox rows"
    );

    let (messages, in_stream) = relay_all(&app, events as usize).await;
    let mut seen = std::collections::HashSet::new();
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for message in messages {
        let id = message
            .headers
            .as_ref()
            .unwrap()
            .get("Nats-Msg-Id")
            .unwrap()
            .to_string();
        assert!(seen.insert(id.clone()), "{id} published once");
        let (stream_id, sequence) = id.rsplit_once(':').unwrap();
        let sequence: i64 = sequence.parse().unwrap();
        let before = last.insert(stream_id.to_string(), sequence).unwrap_or(0);
        assert!(sequence > before, "{stream_id}: {sequence} after {before}");
    }
    assert_eq!(in_stream as i64, events, "nothing more");
}

/// Starts a relay on a stream of its own, waits until it has drained the
/// outbox, and answers the first `expected` messages of the stream, in its
/// order, and how many it holds in all.
async fn relay_all(app: &TestApp, expected: usize) -> (Vec<async_nats::jetstream::Message>, u64) {
    let config = nats_config(&nats_url());
    let relay = start_relay(app, &config).await;
    outbox_drained(app).await;
    relay.abort();

    let client = async_nats::connect(&config.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(&config.nats_stream).await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut read = Vec::with_capacity(expected);
    use futures::StreamExt;
    while read.len() < expected {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("every event arrives")
            .unwrap()
            .unwrap();
        read.push(message);
    }
    let info = js
        .get_stream(&config.nats_stream)
        .await
        .unwrap()
        .cached_info()
        .clone();
    (read, info.state.messages)
}

/// The relay reads an outbox row's events with one walk of the positions'
/// index when they lie close together, and one by one when they do not:
/// either way exactly the events the row names, in its order, and nothing
/// in between that belongs to another row.
#[tokio::test]
async fn outbox_rows_whose_events_lie_apart_or_interleaved_publish_exactly_theirs() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    for i in 0..30 {
        app.create_user(
            &admin,
            json!({"username": format!("apart{i}"), "password": "correct horse battery"}),
        )
        .await;
    }
    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT global_position FROM events ORDER BY global_position")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert!(positions.len() >= 30, "{} events", positions.len());
    // One row of every tenth event (far apart: read one by one), then the
    // rest dealt alternately into two rows (close together, each with the
    // other's events in between).
    let apart: Vec<i64> = positions.iter().copied().step_by(10).collect();
    let rest: Vec<i64> = positions
        .iter()
        .copied()
        .filter(|p| !apart.contains(p))
        .collect();
    let even: Vec<i64> = rest.iter().copied().step_by(2).collect();
    let odd: Vec<i64> = rest.iter().copied().skip(1).step_by(2).collect();
    let close = |row: &[i64]| row[row.len() - 1] - row[0] < twofold_relay::SPAN * row.len() as i64;
    assert!(!close(&apart) && close(&even) && close(&odd));
    sqlx::query("DELETE FROM outbox")
        .execute(&app.pool)
        .await
        .unwrap();
    for row in [&apart, &even, &odd] {
        sqlx::query("INSERT INTO outbox (positions) VALUES ($1)")
            .bind(row)
            .execute(&app.pool)
            .await
            .unwrap();
    }

    let (messages, in_stream) = relay_all(&app, positions.len()).await;
    let published: Vec<i64> = messages
        .iter()
        .map(|m| {
            let body: Value = serde_json::from_slice(&m.payload).unwrap();
            body["global_position"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(published, [apart, even, odd].concat());
    assert_eq!(in_stream as usize, positions.len(), "nothing more");
}

#[tokio::test]
async fn the_per_builder_consumers_of_an_earlier_version_hand_over_where_they_left_off() {
    use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
    use futures::StreamExt;
    use twofold_platform::envelope::parse_msg_id;
    use twofold_projections::store::StreamTarget;

    let (app, config, relay) = history_in_the_stream().await;
    let src = source(&config, "upgrade");
    let js = async_nats::jetstream::new(async_nats::connect(&config.nats_url).await.unwrap());
    let mut stream = js.get_stream(&config.nats_stream).await.unwrap();
    // Every event committed so far is in the stream (an event can commit
    // after the outbox was seen empty, and be published a moment later).
    eventually("every event in the stream", async || {
        let events = count(&app, "SELECT count(*) FROM events").await as u64;
        let messages = stream.info().await.unwrap().state.messages;
        messages == events && count(&app, "SELECT count(*) FROM outbox").await == 0
    })
    .await;
    let events = count(&app, "SELECT count(*) FROM events").await as u64;
    assert!(events > 10, "{events} events");

    // The earlier version's consumers, one per builder, each having applied
    // and acked the stream's first messages: the directory 10, the audit 6.
    for (builder, acked) in [(Builder::Directory, 10), (Builder::Audit, 6)] {
        let old: PullConsumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("upgrade-{}", builder.name())),
                filter_subject: src.filter_subject.clone(),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = old
            .batch()
            .max_messages(acked)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        let mut conn = app.pool.acquire().await.unwrap();
        let mut n = 0;
        while let Some(message) = messages.next().await {
            let message = message.unwrap();
            let id = message
                .headers
                .as_ref()
                .unwrap()
                .get("Nats-Msg-Id")
                .unwrap();
            let (aggregate_type, aggregate_id, sequence) = parse_msg_id(id.as_str()).unwrap();
            let target = StreamTarget {
                aggregate_type,
                aggregate_id,
                sequence,
            };
            builder
                .catch_up(&mut conn, &app.state.personal, &[target])
                .await
                .unwrap();
            message.double_ack().await.unwrap();
            n += 1;
        }
        assert_eq!(n, acked);
    }

    // The shared consumer starts after the 6 both had acked, and the old
    // ones are gone.
    let p = Consumer::connect(app.pool.clone(), app.state.personal.clone(), &src)
        .await
        .unwrap();
    let info = stream.consumer_info("upgrade").await.unwrap();
    // It starts at the 7th message of the stream (its own, so sequence 7).
    // (Its pending count is no measure of that: the first pull may already
    // have taken messages out, and the count trails right after creation.)
    assert_eq!(
        info.config.deliver_policy,
        async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: 7 },
        "not the whole stream again"
    );
    for old in src.legacy_durables() {
        assert!(stream.consumer_info(&old).await.is_err(), "{old} deleted");
    }
    let projector = tokio::spawn(p.run_until_stopped(std::future::pending()));
    let live = caught_up_as_a_rebuild_makes_them(&app).await;
    projector.abort();

    // Bound again (a restart), it goes on where it was: nothing is left
    // to deliver (at most what the stopped one had not acked yet).
    let p = Consumer::connect(app.pool.clone(), app.state.personal.clone(), &src)
        .await
        .unwrap();
    let projector = tokio::spawn(p.run_until_stopped(std::future::pending()));
    eventually("the stream to be delivered and acked", async || {
        let info = stream.consumer_info("upgrade").await.unwrap();
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    assert_eq!(read_models(&app).await, live);
    projector.abort();
    relay.abort();
}

#[tokio::test]
async fn an_event_that_arrives_after_a_later_one_of_its_stream_changes_nothing() {
    let app = spawn_app().await;
    some_history(&app).await;
    let records = twofold_projections::record::load_batch(&app.pool, 0, 10_000)
        .await
        .unwrap();
    // Messages arrive newest first, each builder sees every one of them...
    for builder in Builder::ALL {
        for r in records.iter().rev() {
            builder
                .apply(&app.pool, &app.state.personal, r)
                .await
                .unwrap();
        }
    }
    // ...and the read models are those a replay in order builds.
    let live = read_models(&app).await;
    let positions = count(
        &app,
        "SELECT COALESCE(sum(sequence), 0)::bigint FROM projection_positions",
    )
    .await;
    let events = count(&app, "SELECT count(*) FROM events").await;
    assert_eq!(
        positions,
        events * Builder::ALL.len() as i64,
        "every stream applied to its end"
    );
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
    assert_eq!(read_models(&app).await, live);
    assert_eq!(live.1.len() as i64, events, "each event audited once");
}

/// The status and body of `GET http://{addr}{path}`, or `None` when nothing answers.
async fn probe(addr: std::net::SocketAddr, path: &str) -> Option<(StatusCode, String)> {
    let r = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    Some((r.status(), r.text().await.ok()?))
}

/// Waits (up to 30 s: reconnects back off) until every worker's `path` answers `status`.
async fn all_answer(addrs: &[std::net::SocketAddr], path: &str, status: StatusCode) {
    for _ in 0..300 {
        let mut all = true;
        for addr in addrs {
            all &= probe(*addr, path).await.is_some_and(|(s, _)| s == status);
        }
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {path} to answer {status}");
}

#[tokio::test]
async fn workers_wait_for_nats_and_say_when_they_are_ready() {
    let nats_port = free_port();
    let dir = std::env::temp_dir().join(format!("twofold-nats-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let app = spawn_app().await;
    let base = nats_config(&format!("nats://127.0.0.1:{nats_port}"));
    let config = |metrics_port: u16| Config {
        metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port)),
        nats_url: base.nats_url.clone(),
        nats_stream: base.nats_stream.clone(),
        nats_subject_prefix: base.nats_subject_prefix.clone(),
        ..app.config.clone()
    };
    let (relay, dispatcher, projector) = (
        config(free_port()),
        config(free_port()),
        config(free_port()),
    );
    let addrs = [
        relay.metrics_addr,
        dispatcher.metrics_addr,
        projector.metrics_addr,
    ];
    let clock: std::sync::Arc<dyn twofold_platform::Clock> = std::sync::Arc::new(app.clock.clone());
    // Started before NATS is there: they wait for it rather than exit.
    let workers = [
        tokio::spawn(async move {
            let relay = Relay::build(&relay).await.unwrap();
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
    all_answer(&addrs, "/health/live", StatusCode::OK).await;
    for addr in addrs {
        let (status, why) = probe(addr, "/health/ready").await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{why}");
        assert!(why.contains("NATS"), "{why}");
    }

    // NATS comes: the relay creates the stream, the others bind to it.
    let nats = PrivateNats::start(nats_port, &dir);
    all_answer(&addrs, "/health/ready", StatusCode::OK).await;
    for addr in addrs {
        let (status, text) = probe(addr, "/metrics").await.unwrap();
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    // And the stack works: a sign-in's events reach the read models.
    some_history(&app).await;
    eventually("the read models to catch up", async || {
        caught_up(&app).await
    })
    .await;

    // NATS goes away: not ready, and it says why; still live.
    let (nats_port, dir) = nats.stop();
    all_answer(&addrs, "/health/ready", StatusCode::SERVICE_UNAVAILABLE).await;
    for addr in addrs {
        let (_, why) = probe(addr, "/health/ready").await.unwrap();
        assert!(why.contains("NATS"), "{why}");
        assert_eq!(probe(addr, "/health/live").await.unwrap().0, StatusCode::OK);
    }
    // It comes back: ready again.
    let _nats = PrivateNats::start(nats_port, &dir);
    all_answer(&addrs, "/health/ready", StatusCode::OK).await;
    for w in workers {
        w.abort();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
