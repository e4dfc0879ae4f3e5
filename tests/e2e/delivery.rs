//! Code delivery end to end: verifier, relay and dispatchers as separate
//! tasks against real PostgreSQL, NATS and an SMTP server (aiosmtpd), with a
//! local HTTP server speaking the SMS provider's (Twilio's) Messages API.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::json;
use twofold_dispatcher::{Dispatcher, Outcome, Source};
use twofold_platform::config::SmsProvider;
use twofold_platform::Config;
use twofold_relay::Relay;

use crate::helpers::{spawn_app_with, TestApp};

/// A port nothing listens on now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's aiosmtpd, keeping what it receives in a Maildir.
pub(crate) struct Smtp {
    child: Child,
    pub(crate) port: u16,
    maildir: std::path::PathBuf,
}

impl Smtp {
    pub(crate) async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    /// The server on `port` (one a test kept free).
    pub(crate) async fn start_on(port: u16) -> Self {
        Self::spawn(port, |command, address, maildir| {
            command
                .args(["-m", "aiosmtpd", "-n", "-l", address])
                .args(["-c", "aiosmtpd.handlers.Mailbox"])
                .arg(maildir);
        })
        .await
    }

    /// A server that keeps each message at once but answers `250 OK` only
    /// `delay` later: a dispatcher waiting for that answer has handed the
    /// code over without knowing it.
    pub(crate) async fn start_slow(delay: Duration) -> Self {
        Self::spawn(free_port(), |command, address, maildir| {
            command
                .arg("-c")
                .arg(SLOW_SMTP)
                .arg(address)
                .arg(maildir)
                .arg(delay.as_secs_f64().to_string());
        })
        .await
    }

    async fn spawn(port: u16, args: impl FnOnce(&mut Command, &str, &std::path::Path)) -> Self {
        let maildir = std::env::temp_dir().join(format!("twofold-mail-{}", uuid::Uuid::new_v4()));
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        let mut command = Command::new("/usr/bin/python3");
        args(&mut command, &format!("127.0.0.1:{port}"), &maildir);
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Debian's python3-aiosmtpd must be installed: run ops/deps");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            port,
            maildir,
        }
    }

    pub(crate) fn mails(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(entries) = std::fs::read_dir(self.maildir.join(sub)) {
                for e in entries.flatten() {
                    out.push(std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    pub(crate) fn mails_to(&self, address: &str) -> Vec<String> {
        self.mails()
            .into_iter()
            .filter(|m| m.contains(address))
            .collect()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = std::fs::remove_dir_all(&self.maildir);
    }
}

/// The six digits after "code is " in a message.
pub(crate) fn code_in(text: &str) -> Option<String> {
    let at = text.find("code is ")? + "code is ".len();
    let code: String = text[at..].chars().take(6).collect();
    (code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit())).then_some(code)
}

/// aiosmtpd with a handler that stores a message in the Maildir, then waits
/// before it answers.
const SLOW_SMTP: &str = r#"
import asyncio, mailbox, signal, sys
from aiosmtpd.controller import Controller
host, port = sys.argv[1].rsplit(":", 1)
box = mailbox.Maildir(sys.argv[2])
delay = float(sys.argv[3])
class Slow:
    async def handle_DATA(self, server, session, envelope):
        box.add(envelope.original_content)
        await asyncio.sleep(delay)
        return "250 OK"
Controller(Slow(), hostname=host, port=int(port)).start()
signal.pause()
"#;

/// The header lines of a message whose name is `name` (case aside).
pub(crate) fn header<'m>(mail: &'m str, name: &str) -> Option<&'m str> {
    mail.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A stand-in SMS provider speaking Twilio's Messages API.
#[derive(Clone, Default)]
pub(crate) struct FakeSms {
    pub(crate) sent: Arc<Mutex<Vec<HashMap<String, String>>>>,
    pub(crate) failing: Arc<AtomicBool>,
    /// Answers nothing (the request hangs until the client gives up).
    pub(crate) hanging: Arc<AtomicBool>,
    /// Requests received, answered or not.
    pub(crate) attempts: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeSms {
    pub(crate) async fn start(&self) -> String {
        use axum::extract::{Form, Path, State};
        let app = axum::Router::new()
            .route(
                "/2010-04-01/Accounts/{sid}/Messages.json",
                axum::routing::post(
                    |State(me): State<FakeSms>,
                     Path(_sid): Path<String>,
                     headers: axum::http::HeaderMap,
                     Form(mut form): Form<HashMap<String, String>>| async move {
                        if let Some(key) = headers.get("idempotency-key") {
                            form.insert(
                                "Idempotency-Key".into(),
                                key.to_str().unwrap_or_default().into(),
                            );
                        }
                        me.attempts.fetch_add(1, Ordering::SeqCst);
                        if me.hanging.load(Ordering::SeqCst) {
                            std::future::pending::<()>().await;
                        }
                        if me.failing.load(Ordering::SeqCst) {
                            return (
                                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                                "{}".to_string(),
                            );
                        }
                        me.sent.lock().unwrap().push(form);
                        (
                            axum::http::StatusCode::CREATED,
                            "{\"sid\":\"SM1\",\"status\":\"queued\"}".to_string(),
                        )
                    },
                ),
            )
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}")
    }
}

pub(crate) struct Stack {
    pub(crate) app: TestApp,
    pub(crate) config: Config,
    pub(crate) source: Source,
    relay: tokio::task::JoinHandle<()>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

/// The verifier, a relay, and the configuration a dispatcher needs (the same
/// server keys, so it derives the codes the verifier checks).
pub(crate) async fn stack(smtp_port: u16, sms_url: &str) -> Stack {
    let mut keys = None;
    // The verifier knows the provider's name too: settings may name only it.
    let app = spawn_app_with(|c| {
        keys = Some(c.keys.clone());
        c.sms_providers.insert(
            "test-sms".to_string(),
            SmsProvider::Webhook {
                url: sms_url.to_string(),
                bearer_token: None,
            },
        );
    })
    .await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = Config {
        keys: keys.unwrap(),
        current_key_id: "test".to_string(),
        nats_url: std::env::var("TWOFOLD_TEST_NATS_URL")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        nats_stream: format!("D{id}"),
        nats_subject_prefix: format!("d{id}"),
        smtp_host: "127.0.0.1".into(),
        smtp_port,
        smtp_from: "Acme <no-reply@acme.test>".into(),
        sms_providers: [(
            "test-sms".to_string(),
            SmsProvider::Twilio {
                base_url: sms_url.to_string(),
                account_sid: "AC123".into(),
                auth_token: SecretString::from("token".to_string()),
                from: "+15550001111".into(),
            },
        )]
        .into(),
        delivery_max_attempts: 2,
        ..Config::default()
    };
    let relay = Relay::connect(app.pool.clone(), &config).await.unwrap();
    twofold_relay::ensure_stream(
        relay.jetstream(),
        &config.nats_stream,
        &config.nats_subject_prefix,
    )
    .await
    .unwrap();
    let relay = tokio::spawn(async move {
        let _ = relay.run_until_stopped(std::future::pending()).await;
    });
    let source = Source {
        stream: config.nats_stream.clone(),
        subject_prefix: config.nats_subject_prefix.clone(),
        durable: format!("dispatch{id}"),
        ack_wait: Duration::from_secs(1),
        retry_delay: Duration::from_millis(200),
        concurrency: 4,
        max_deliver: twofold_dispatcher::max_deliver_for(config.delivery_max_attempts),
    };
    Stack {
        app,
        config,
        source,
        relay,
    }
}

impl Stack {
    pub(crate) async fn dispatcher(&self) -> Dispatcher {
        Dispatcher::connect(
            self.app.pool.clone(),
            &self.config,
            &self.source,
            Arc::new(self.app.clock.clone()),
        )
        .await
        .unwrap()
    }

    pub(crate) async fn with_user(&self, settings: serde_json::Value, name: &str, phone: bool) {
        let admin = self.app.admin_token().await;
        // The admin keeps a method the settings allow (SMS only would
        // otherwise lock every admin out, which is refused).
        let me: String =
            sqlx::query_scalar("SELECT user_id::text FROM usernames WHERE username = 'root-admin'")
                .fetch_one(&self.app.pool)
                .await
                .unwrap();
        let patched = self
            .app
            .send(
                self.app
                    .client
                    .patch(format!("{}/users/{me}", self.app.base))
                    .bearer_auth(&admin)
                    .json(&json!({"phone": "+4915100000000", "reason": "admin phone"})),
            )
            .await;
        assert_eq!(patched.status, StatusCode::NO_CONTENT, "{:?}", patched.body);
        let admin = self.app.admin_token().await;
        let mut body = json!({"username": name, "password": "correct horse battery", "email": format!("{name}@acme.test")});
        if phone {
            body["phone"] = json!("+4915112345678");
        }
        self.app.create_user(&admin, body).await;
        let r = self.app.set_settings(&admin, settings).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }

    pub(crate) async fn challenge(&self, name: &str) -> String {
        let r = self.app.sign_in(name, "correct horse battery").await;
        assert_eq!(r.body["status"], "challenge", "{:?}", r.body);
        r.body["challenge"]["token"].as_str().unwrap().to_string()
    }

    pub(crate) async fn verify(&self, token: &str, code: &str) -> StatusCode {
        self.app
            .post(
                "/challenge/verify",
                json!({"challenge_token": token, "code": code}),
            )
            .await
            .status
    }

    pub(crate) async fn delivery_events(&self, event_type: &str) -> Vec<serde_json::Value> {
        sqlx::query_scalar(
            "SELECT payload::jsonb -> $1 FROM events WHERE aggregate_type = 'delivery' AND event_type = $1 ORDER BY global_position",
        )
        .bind(event_type)
        .fetch_all(&self.app.pool)
        .await
        .unwrap()
    }
}

/// Runs `dispatcher` until `done` or a bounded time passes; returns the outcomes.
pub(crate) async fn run_until(
    dispatcher: &Dispatcher,
    mut done: impl FnMut(&[Outcome]) -> bool,
) -> Vec<Outcome> {
    let mut all = Vec::new();
    for _ in 0..60 {
        all.extend(
            dispatcher
                .process_next(10, Duration::from_millis(250))
                .await
                .unwrap(),
        );
        if done(&all) {
            return all;
        }
    }
    panic!("gave up waiting; outcomes so far: {all:?}");
}

pub(crate) fn delivered(outcomes: &[Outcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Delivered { .. }))
        .count()
}

#[tokio::test]
async fn an_email_code_arrives_by_smtp_and_signs_in() {
    let smtp = Smtp::start().await;
    let s = stack(smtp.port, "http://127.0.0.1:9").await;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login"}),
        "ema",
        false,
    )
    .await;
    let token = s.challenge("ema").await;
    let d = s.dispatcher().await;
    run_until(&d, |o| delivered(o) == 1).await;
    let mails = smtp.mails_to("ema@acme.test");
    assert_eq!(mails.len(), 1);
    assert!(mails[0].contains("Acme sign-in code"), "{}", mails[0]);
    assert!(
        mails[0].contains("expires at 2026-03-01 16:00 UTC"),
        "{}",
        mails[0]
    );
    let code = code_in(&mails[0]).expect("a code in the mail");
    assert_eq!(s.verify(&token, &code).await, StatusCode::OK);
    let recorded = s.delivery_events("CodeDelivered").await;
    // The Overview's delivery figures, once the read models have the events.
    twofold_projections::rebuild::rebuild(&s.app.pool, &s.app.state.personal, |_| {})
        .await
        .unwrap();
    let admin = s.app.admin_token().await;
    let stats = s.app.get_auth("/overview/delivery", &admin).await;
    assert_eq!(stats.status, StatusCode::OK, "{:?}", stats.body);
    assert_eq!(stats.body["delivery"][0]["method"], "email");
    assert_eq!(stats.body["delivery"][0]["provider"], "smtp");
    assert_eq!(stats.body["delivery"][0]["fallback_rate"], 0.0);
    assert_eq!(recorded[0]["method"], "email");
    assert_eq!(recorded[0]["provider"], "smtp");
    // The outcome records carry no code.
    assert!(!recorded[0].to_string().contains(&code));
}

/// A new email address is used only once a code sent to it comes back:
/// until then codes keep going to the old one.
#[tokio::test]
async fn a_new_email_address_is_verified_by_a_code_before_any_code_goes_there() {
    let smtp = Smtp::start().await;
    let s = stack(smtp.port, "http://127.0.0.1:9").await;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login"}),
        "cat",
        false,
    )
    .await;
    let d = s.dispatcher().await;
    // Runs the dispatcher for one delivery and reads its code from `to`'s mailbox.
    let code_for = |token: String, to: &'static str| {
        let (d, smtp) = (&d, &smtp);
        async move {
            let before = smtp.mails_to(to);
            run_until(d, |o| delivered(o) == 1).await;
            // The mailbox is a directory: the new code is the one not there
            // before (beside any security notice).
            let new = smtp
                .mails_to(to)
                .into_iter()
                .find(|m| !before.contains(m) && code_in(m).is_some())
                .expect("a new mail");
            (token, code_in(&new).expect("a code"))
        }
    };
    // Signed in with a code to the old address, then a step-up.
    let (token, code) = code_for(s.challenge("cat").await, "cat@acme.test").await;
    let signed_in = s
        .app
        .post(
            "/challenge/verify",
            json!({"challenge_token": token, "code": code}),
        )
        .await;
    let session = signed_in.body["session"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let step = s.app.post_auth("/me/step-up", &session, json!({})).await;
    let step_token = step.body["challenge"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (token, code) = code_for(step_token, "cat@acme.test").await;
    assert_eq!(s.verify(&token, &code).await, StatusCode::OK);

    // The new address gets a code; the profile keeps the old one meanwhile.
    let changed = s
        .app
        .send(
            s.app
                .client
                .patch(format!("{}/me", s.app.base))
                .bearer_auth(&session)
                .json(&json!({"email": "kit@elsewhere.test"})),
        )
        .await;
    assert_eq!(changed.status, StatusCode::ACCEPTED, "{:?}", changed.body);
    assert_eq!(changed.body["status"], "verification_sent");
    assert_eq!(changed.body["challenge"]["methods"], json!(["email"]));
    let verify_token = changed.body["challenge"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (verify_token, new_code) = code_for(verify_token, "kit@elsewhere.test").await;
    // Each message says what its code is for: the new address is asked to
    // confirm itself, not told of a sign-in its owner never tried.
    let to_new = &smtp.mails_to("kit@elsewhere.test")[0];
    assert!(
        to_new.contains("Acme: confirm your email address"),
        "{to_new}"
    );
    assert!(!to_new.contains("sign-in"), "{to_new}");
    assert!(smtp
        .mails_to("cat@acme.test")
        .iter()
        .any(|m| m.contains("Acme confirmation code")));
    assert_eq!(
        s.app.get_auth("/me", &session).await.body["email"],
        "cat@acme.test"
    );
    // A sign-in now still sends its code to the old address.
    let (_, _) = code_for(s.challenge("cat").await, "cat@acme.test").await;
    assert_eq!(smtp.mails_to("kit@elsewhere.test").len(), 1);
    assert_eq!(smtp.mails_to("cat@acme.test").len(), 3);

    // A recovery code proves nothing about the new address; its code does.
    let backup = s
        .app
        .post(
            "/challenge/verify",
            json!({"challenge_token": verify_token, "backup_code": "aaaa-bbbb"}),
        )
        .await;
    assert_eq!(backup.status, StatusCode::BAD_REQUEST, "{:?}", backup.body);
    let done = s
        .app
        .post(
            "/challenge/verify",
            json!({"challenge_token": verify_token, "code": new_code}),
        )
        .await;
    assert_eq!(done.body, json!({"status": "contact_verified"}));
    // Every session ended with the change; the new address is the user's.
    assert_eq!(
        s.app.get_auth("/me", &session).await.status,
        StatusCode::UNAUTHORIZED
    );
    let user: String =
        sqlx::query_scalar("SELECT user_id::text FROM usernames WHERE username = 'cat'")
            .fetch_one(&s.app.pool)
            .await
            .unwrap();
    let types = s.app.event_types(&user).await;
    assert!(types.contains(&"ContactVerificationStarted".to_string()));
    assert!(types.contains(&"ContactVerified".to_string()));
    let (_, _) = code_for(s.challenge("cat").await, "kit@elsewhere.test").await;
    // Both addresses are told of the change.
    let notice = "where your codes go was changed";
    let told = |to: &str| smtp.mails_to(to).iter().any(|m| m.contains(notice));
    run_until(&d, |_| told("kit@elsewhere.test") && told("cat@acme.test")).await;
}

#[tokio::test]
async fn an_sms_code_goes_through_the_provider_and_falls_back_to_email_when_it_fails() {
    let smtp = Smtp::start().await;
    let sms = FakeSms::default();
    let url = sms.start().await;
    let s = stack(smtp.port, &url).await;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login", "allowed_methods": ["sms"],
               "default_method": "sms", "sms_provider": "test-sms"}),
        "sid",
        true,
    )
    .await;
    let d = s.dispatcher().await;

    let token = s.challenge("sid").await;
    run_until(&d, |o| delivered(o) == 1).await;
    let message = sms.sent.lock().unwrap()[0].clone();
    assert_eq!(message["To"], "+4915112345678");
    assert_eq!(message["From"], "+15550001111");
    // Every copy of one delivery names it, for providers that drop copies.
    let claimed = s.delivery_events("DeliveryClaimed").await;
    assert_eq!(
        message.get("Idempotency-Key"),
        Some(&format!(
            "{}:{}",
            claimed[0]["challenge_id"].as_str().unwrap(),
            claimed[0]["generation"]
        ))
    );
    let code = message["Body"][..6].to_string();
    assert_eq!(s.verify(&token, &code).await, StatusCode::OK);

    // The provider fails: the code comes by email (though email is not an
    // allowed method), and the event says why.
    sms.failing.store(true, Ordering::SeqCst);
    s.app.clock.advance(chrono::Duration::seconds(1));
    let token = s.challenge("sid").await;
    let outcomes = run_until(&d, |o| delivered(o) == 1).await;
    assert!(outcomes.contains(&Outcome::Delivered {
        method: twofold_domain::values::Method::Email,
        provider: "smtp".into()
    }));
    let fell_back = s.delivery_events("DeliveryFellBack").await;
    assert_eq!(fell_back.len(), 1);
    assert_eq!(fell_back[0]["from"], "sms");
    assert!(
        fell_back[0]["reason"]
            .as_str()
            .unwrap()
            .contains("answered 500"),
        "{fell_back:?}"
    );
    let mails = smtp.mails_to("sid@acme.test");
    let code = code_in(&mails[0]).unwrap();
    assert_eq!(s.verify(&token, &code).await, StatusCode::OK);

    // The Overview's delivery figures, from the read models.
    twofold_projections::rebuild::rebuild(&s.app.pool, &s.app.state.personal, |_| {})
        .await
        .unwrap();
    let rows: Vec<serde_json::Value> =
        twofold_projections::queries::delivery(&s.app.pool, &s.app.tenant_id.to_string())
            .await
            .unwrap()
            .iter()
            .map(|r| serde_json::to_value(r).unwrap())
            .collect();
    let row = |method: &str, provider: &str| {
        rows.iter()
            .find(|r| r["method"] == method && r["provider"] == provider)
            .cloned()
            .unwrap_or_else(|| panic!("no {method}/{provider} row in {rows:?}"))
    };
    // Two SMS requests: one sent, one fell back to email, both under the
    // tenant's provider.
    assert_eq!(row("sms", "test-sms")["sent"], 1);
    assert_eq!(row("sms", "test-sms")["fell_back"], 1);
    assert_eq!(row("sms", "test-sms")["fallback_rate"], 0.5);
    assert!(row("email", "smtp")["sent"].as_i64().unwrap() >= 1);
    assert!(row("sms", "test-sms")["latency_p50_ms"].is_number());
    assert!(rows.iter().all(|r| r["provider"] != "-"), "{rows:?}");

    // The user's timeline shows where each code went.
    let sid: String =
        sqlx::query_scalar("SELECT user_id::text FROM usernames WHERE username = 'sid'")
            .fetch_one(&s.app.pool)
            .await
            .unwrap();
    // (Read as GET /users/{id}/history does: the admin has no phone, so SMS
    // only would refuse the admin's own sign-in.)
    let tenant = s.app.tenant_id.to_string();
    let q = twofold_projections::queries::AuditQuery {
        user_id: Some(sid),
        ..Default::default()
    };
    let entries: Vec<_> = futures::StreamExt::collect::<Vec<_>>(
        twofold_projections::queries::audit(&s.app.pool, &tenant, &q),
    )
    .await;
    let types: Vec<String> = entries.into_iter().map(|e| e.unwrap().event_type).collect();
    let types: Vec<&str> = types.iter().map(String::as_str).collect();
    for t in ["DeliveryClaimed", "CodeDelivered", "DeliveryFellBack"] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
}

#[tokio::test]
async fn a_job_held_by_a_dispatcher_that_died_is_delivered_by_another_once() {
    let smtp = Smtp::start().await;
    let s = stack(smtp.port, "http://127.0.0.1:9").await;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login"}),
        "ida",
        false,
    )
    .await;
    let token = s.challenge("ida").await;

    // A dispatcher takes the job and dies before acking it.
    let dying = s.dispatcher().await;
    {
        let client = async_nats::connect(&s.config.nats_url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(&s.config.nats_stream).await.unwrap();
        let consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(&s.source.durable).await.unwrap();
        let mut taken = 0;
        for _ in 0..20 {
            let mut batch = consumer
                .fetch()
                .max_messages(10)
                .expires(Duration::from_millis(200))
                .messages()
                .await
                .unwrap();
            while let Some(m) = futures::StreamExt::next(&mut batch).await {
                let m = m.unwrap();
                if String::from_utf8_lossy(&m.payload).contains("ChallengeIssued") {
                    taken += 1;
                } else {
                    m.ack().await.unwrap();
                }
            }
            if taken > 0 {
                break;
            }
        }
        assert_eq!(taken, 1, "the dying dispatcher held the job");
    }
    drop(dying);

    // Another instance gets it after the ack wait, and delivers it once.
    let other = s.dispatcher().await;
    run_until(&other, |o| delivered(o) == 1).await;
    let extra = other
        .process_next(10, Duration::from_millis(1500))
        .await
        .unwrap();
    assert_eq!(delivered(&extra), 0);
    let mails = smtp.mails_to("ida@acme.test");
    assert_eq!(mails.len(), 1);
    assert_eq!(
        s.verify(&token, &code_in(&mails[0]).unwrap()).await,
        StatusCode::OK
    );
}

/// The sign-in codes among the mails to `address`.
fn code_mails(smtp: &Smtp, address: &str) -> Vec<String> {
    smtp.mails_to(address)
        .into_iter()
        .filter(|m| code_in(m).is_some())
        .collect()
}

/// Until the mail server holds `n` sign-in codes for `address`.
async fn mail_server_holds(smtp: &Smtp, address: &str, n: usize) {
    crate::reliability::eventually(&format!("{n} codes for {address}"), 100, async || {
        code_mails(smtp, address).len() >= n
    })
    .await;
}

/// A mail server that answers 2 s after it took a message, and ida's
/// challenge, whose code goes there.
async fn slow_mail_challenge() -> (Smtp, Stack, String) {
    let smtp = Smtp::start_slow(Duration::from_secs(2)).await;
    let s = stack(smtp.port, "http://127.0.0.1:9").await;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login"}),
        "ida",
        false,
    )
    .await;
    let token = s.challenge("ida").await;
    (smtp, s, token)
}

#[tokio::test]
async fn a_code_sent_again_after_a_crash_is_the_same_message() {
    let (smtp, s, token) = slow_mail_challenge().await;

    // The mail server has taken the code; the dispatcher dies waiting for
    // its answer, so no outcome is recorded.
    let dying = s.dispatcher().await;
    let running = tokio::spawn(dying.run_until_stopped(std::future::pending()));
    mail_server_holds(&smtp, "ida@acme.test", 1).await;
    running.abort();
    let _ = running.await;
    assert!(s.delivery_events("CodeDelivered").await.is_empty());

    // Another instance sends it again after the ack wait: the same code in
    // a message with the same Message-ID, which mail stores drop as a copy.
    let other = s.dispatcher().await;
    run_until(&other, |o| delivered(o) == 1).await;
    let mails = code_mails(&smtp, "ida@acme.test");
    assert_eq!(mails.len(), 2, "one copy after the crash");
    assert_eq!(code_in(&mails[0]), code_in(&mails[1]));
    let ids: Vec<_> = mails.iter().map(|m| header(m, "Message-ID")).collect();
    assert!(ids[0].is_some(), "{}", mails[0]);
    assert_eq!(ids[0], ids[1]);
    assert_eq!(
        s.verify(&token, &code_in(&mails[0]).unwrap()).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_stopping_dispatcher_finishes_the_codes_under_way() {
    let (smtp, s, token) = slow_mail_challenge().await;

    // Stopped while the mail server holds the code but has not answered.
    let stopping = s.dispatcher().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(stopping.run_until_stopped(async {
        let _ = stopped.await;
    }));
    mail_server_holds(&smtp, "ida@acme.test", 1).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the dispatcher stops once its job is done")
        .unwrap();

    // Its outcome is recorded and the job acked: nobody sends it again.
    assert_eq!(s.delivery_events("CodeDelivered").await.len(), 1);
    let other = s.dispatcher().await;
    let later = other
        .process_next(10, Duration::from_millis(2500))
        .await
        .unwrap();
    assert_eq!(delivered(&later), 0, "{later:?}");
    let mails = code_mails(&smtp, "ida@acme.test");
    assert_eq!(mails.len(), 1);
    assert_eq!(
        s.verify(&token, &code_in(&mails[0]).unwrap()).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn two_dispatchers_share_the_work_and_send_each_code_once() {
    let smtp = Smtp::start().await;
    let s = stack(smtp.port, "http://127.0.0.1:9").await;
    // More jobs than one instance takes ahead (4 here).
    let names: Vec<String> = (1..=12).map(|i| format!("u{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for n in &names {
        // The admin signs in for each user made here: more codes in an hour
        // than one account may have by default.
        s.with_user(
            json!({"enabled": true, "enforcement": "every_login", "codes_per_account_per_hour": 100}),
            n,
            false,
        )
        .await;
    }
    for n in &names {
        s.challenge(n).await;
    }
    let a = Arc::new(s.dispatcher().await);
    let b = Arc::new(s.dispatcher().await);
    let run = |d: Arc<Dispatcher>| {
        tokio::spawn(async move {
            // One job at a time, until nothing comes for a while.
            let mut mine = Vec::new();
            let mut idle = 0;
            while idle < 5 {
                let got = d.process_next(1, Duration::from_millis(200)).await.unwrap();
                idle = if got.is_empty() { idle + 1 } else { 0 };
                mine.extend(got);
            }
            mine
        })
    };
    let (ra, rb) = (run(a.clone()), run(b.clone()));
    let (oa, ob) = (ra.await.unwrap(), rb.await.unwrap());
    assert_eq!(
        delivered(&oa) + delivered(&ob),
        names.len(),
        "{oa:?} {ob:?}"
    );
    assert!(
        delivered(&oa) > 0 && delivered(&ob) > 0,
        "both instances took jobs: {} and {}",
        delivered(&oa),
        delivered(&ob)
    );
    for n in &names {
        assert_eq!(smtp.mails_to(&format!("{n}@acme.test")).len(), 1, "{n}");
    }
}

#[tokio::test]
async fn with_smtp_down_a_delivery_is_retried_then_recorded_as_failed() {
    let closed = free_port();
    let s = stack(closed, "http://127.0.0.1:9").await;
    s.with_user(
        json!({"enabled": true, "enforcement": "every_login"}),
        "fox",
        false,
    )
    .await;
    s.challenge("fox").await;
    let d = s.dispatcher().await;
    let outcomes = run_until(&d, |o| o.iter().any(|x| matches!(x, Outcome::Failed(_)))).await;
    assert!(
        outcomes.iter().any(|x| matches!(x, Outcome::Retry(..))),
        "{outcomes:?}"
    );
    let failed = s.delivery_events("DeliveryFailed").await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["attempts"], 2);
    assert!(
        failed[0]["reason"].as_str().unwrap().contains("SMTP"),
        "{failed:?}"
    );
}
