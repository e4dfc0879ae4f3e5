//! The `twofold` binary's own commands that need no services.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use chrono::{TimeZone, Utc};
use serde_json::json;
use twofold_platform::audit_signing::AuditSigner;
use twofold_projections::audit::{AuditEntry, ExportFilter, Exporter, Format};

fn twofold() -> Command {
    Command::new(env!("CARGO_BIN_EXE_twofold"))
}

fn export(format: Format, signer: &AuditSigner) -> String {
    let mut e = Exporter::new(format, "t", ExportFilter::default());
    let mut out = e.header();
    for n in 1..=3 {
        out.push_str(
            &e.line(AuditEntry {
                position: n,
                tenant_id: "t".into(),
                aggregate_type: "user".into(),
                aggregate_id: "u".into(),
                sequence: n,
                event_type: "CodeRejected".into(),
                at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
                actor_kind: "user".into(),
                actor_id: Some("u".into()),
                ip: Some(format!("192.0.2.{n}")),
                user_agent: None,
                reason: None,
                user_id: Some("u".into()),
                details: json!({ "failures": n }),
            })
            .unwrap(),
        );
    }
    out.push_str(&e.trailer(signer).unwrap());
    out
}

#[test]
fn audit_verify_accepts_an_intact_export_and_refuses_an_altered_one() {
    let dir = std::env::temp_dir().join(format!("twofold-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let signer = AuditSigner::generate("a1");
    let public = signer.published().keys[0].public_key.clone();
    let stranger = AuditSigner::generate("a1").published().keys[0]
        .public_key
        .clone();
    for (name, format) in [("a.ndjson", Format::Ndjson), ("a.csv", Format::Csv)] {
        let text = export(format, &signer);
        let intact = dir.join(name);
        std::fs::write(&intact, &text).unwrap();
        let out = twofold()
            .args(["audit", "verify"])
            .arg(&intact)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.starts_with("ok: 3 entries"), "{said}");
        assert!(said.contains("origin was not checked"), "{said}");

        let out = twofold()
            .args(["audit", "verify", "--public-key", &public])
            .arg(&intact)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("signed by this server's key a1"), "{said}");

        let out = twofold()
            .args(["audit", "verify", "--public-key", &stranger])
            .arg(&intact)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout)
            .starts_with("FAILED: the signature does not match"));

        // An export extends itself.
        let out = twofold()
            .args(["audit", "verify", "--public-key", &public, "--extends"])
            .arg(&intact)
            .arg(&intact)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("and it extends"));

        let altered = dir.join(format!("altered-{name}"));
        std::fs::write(&altered, text.replacen("192.0.2.2", "192.0.2.9", 1)).unwrap();
        let out = twofold()
            .args(["audit", "verify"])
            .arg(&altered)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("FAILED"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn audit_verify_holds_an_export_against_signed_checkpoints() {
    use twofold_projections::checkpoints::Checkpoint;
    let dir = std::env::temp_dir().join(format!("twofold-cli-cp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let signer = AuditSigner::generate("a1");
    let public = signer.published().keys[0].public_key.clone();
    let text = export(Format::Ndjson, &signer);
    let file = dir.join("export.ndjson");
    std::fs::write(&file, &text).unwrap();
    let second: serde_json::Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
    let at = Utc.with_ymd_and_hms(2026, 1, 1, 1, 0, 0).unwrap();
    let checkpoint = |head: &str| {
        let c = Checkpoint::sign(&signer, "t", 2, 2, head, at).unwrap();
        serde_json::to_string(&json!({ "checkpoints": [c] })).unwrap()
    };
    let verify = |checkpoints: &str, extra: &[&str]| {
        let path = dir.join("checkpoints.json");
        std::fs::write(&path, checkpoints).unwrap();
        twofold()
            .args(["audit", "verify", "--public-key", &public, "--checkpoints"])
            .arg(&path)
            .args(extra)
            .arg(&file)
            .output()
            .unwrap()
    };
    let out = verify(&checkpoint(second["hash"].as_str().unwrap()), &[]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("holds the 1 checkpoints"), "{said}");

    // The history at position 2 was another when the checkpoint was signed.
    let out = verify(&checkpoint(&"ab".repeat(32)), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("FAILED: the export's chain at position 2"),
        "{said}"
    );
    assert!(said.contains("an entry was altered since"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn keygen_audit_prints_a_seed_and_public_key_prints_only_public_halves() {
    let out = twofold().args(["keygen", "--audit"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let seed = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(seed.len(), 64);
    let key = String::from_utf8(twofold().arg("keygen").output().unwrap().stdout).unwrap();
    let out = twofold()
        .args(["audit", "public-key", "--key-id", "a1"])
        .env("TWOFOLD_KEYS", format!("k={}", key.trim()))
        .env("TWOFOLD_CURRENT_KEY_ID", "k")
        .env(
            "TWOFOLD_AUDIT_SIGNING_KEYS",
            format!("a1={seed},a0={}", "11".repeat(32)),
        )
        .env("TWOFOLD_AUDIT_SIGNING_KEY_ID", "a1")
        .env_remove("TWOFOLD_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains(&seed) && !text.contains(key.trim()),
        "{text}"
    );
    let keys: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1, "{keys}");
    assert_eq!(keys["keys"][0]["key_id"], "a1");
    assert_eq!(keys["keys"][0]["algorithm"], "ed25519");
    assert_eq!(keys["keys"][0]["current"], true);
}

#[test]
fn keygen_prints_a_256_bit_hex_key() {
    let out = twofold().arg("keygen").output().unwrap();
    let key = String::from_utf8(out.stdout).unwrap();
    assert_eq!(key.trim().len(), 64);
    assert!(key.trim().bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn a_missing_server_key_is_refused_with_a_hint() {
    let out = twofold()
        .arg("migrate")
        .env_remove("TWOFOLD_KEYS")
        .env_remove("TWOFOLD_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TWOFOLD_KEYS"));
}

/// The break-glass commands against a real database: show a user, act on one
/// with a reason (recorded with the operator as actor), the Overview, and an
/// audit export that `audit verify` accepts.
#[test]
fn the_break_glass_commands_work_without_any_session() {
    let admin_url = std::env::var("TWOFOLD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let db = format!("twofold_test_cli_{}", std::process::id());
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args(["-w", "-X", "-q", &admin_url, "-c", sql])
            .output()
            .expect("psql must be installed: run ops/deps");
        assert!(out.status.success(), "{out:?}");
    };
    psql(&format!("DROP DATABASE IF EXISTS {db}"));
    psql(&format!("CREATE DATABASE {db}"));
    let url = format!("{}/{db}", admin_url.rsplit_once('/').unwrap().0);
    let key = String::from_utf8(twofold().arg("keygen").output().unwrap().stdout).unwrap();
    let cli = |args: &[&str]| {
        let mut command = twofold();
        command
            .args(args)
            .env("TWOFOLD_DATABASE_URL", &url)
            .env("TWOFOLD_KEYS", format!("k={}", key.trim()))
            .env("TWOFOLD_CURRENT_KEY_ID", "k")
            .env_remove("TWOFOLD_CONFIG");
        command
    };
    let run = |args: &[&str]| cli(args).output().unwrap();
    let created = run(&[
        "tenant",
        "create",
        "--name",
        "Acme",
        "--admin-username",
        "root",
    ]);
    assert!(created.status.success(), "{created:?}");
    let created: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let tenant = created["tenant_id"].as_str().unwrap().to_string();

    let shown = run(&["user", "show", "--tenant", &tenant, "--username", "root"]);
    assert!(shown.status.success(), "{shown:?}");
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["username"], "root");
    assert_eq!(shown["locked"], false);

    // Not locked: refused with the stable code, nothing written.
    let unlock = run(&[
        "user",
        "unlock",
        "--tenant",
        &tenant,
        "--username",
        "root",
        "--reason",
        "help desk",
    ]);
    assert!(!unlock.status.success());
    assert!(String::from_utf8_lossy(&unlock.stderr).contains("not_locked"));
    let revoke = run(&[
        "user",
        "revoke-sessions",
        "--tenant",
        &tenant,
        "--username",
        "root",
        "--reason",
        "laptop stolen",
    ]);
    assert!(revoke.status.success(), "{revoke:?}");
    let unknown = run(&[
        "user",
        "revoke-sessions",
        "--tenant",
        &tenant,
        "--username",
        "nobody",
        "--reason",
        "x",
    ]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("user_not_found"));

    let overview = run(&["overview", "--tenant", &tenant]);
    assert!(overview.status.success(), "{overview:?}");
    let overview: serde_json::Value = serde_json::from_slice(&overview.stdout).unwrap();
    assert!(overview["enrollment_rate"].is_number());

    let export = run(&["audit", "export", "--tenant", &tenant]);
    assert!(export.status.success(), "{export:?}");
    let dir = std::env::temp_dir().join(format!("twofold-cli-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("export.ndjson");
    std::fs::write(&file, &export.stdout).unwrap();
    let keys = run(&["audit", "public-key"]);
    assert!(keys.status.success(), "{keys:?}");
    let keys_file = dir.join("keys.json");
    std::fs::write(&keys_file, &keys.stdout).unwrap();
    let verify = || {
        twofold()
            .args(["audit", "verify", "--public-key"])
            .arg(&keys_file)
            .arg(&file)
            .output()
            .unwrap()
    };
    let verified = verify();
    assert!(verified.status.success(), "{verified:?}");
    assert!(
        String::from_utf8_lossy(&verified.stdout).contains("signed by this server's key server-k")
    );

    // An export read slowly through a pipe is not cut short, whatever the
    // idle limit the verifiers' clients get: about 2 MB, far more than the
    // pipe holds, left unread for longer than that limit.
    let filled = Command::new("psql")
        .args(["-w", "-X", "-q", &url, "-c"])
        .arg(format!(
            r#"INSERT INTO rm_audit (position, tenant_id, aggregate_type, aggregate_id, sequence,
                 event_type, at, actor_kind, details)
               SELECT 1000000 + g, '{tenant}', 'tenant', '{tenant}', g, 'TenantSettingsChanged',
                 now(), 'system', ('{{"note":"' || repeat('x', 500) || '"}}')::json
               FROM generate_series(1, 3000) g"#
        ))
        .output()
        .unwrap();
    assert!(filled.status.success(), "{filled:?}");
    let slow = cli(&["audit", "export", "--tenant", &tenant])
        .env("TWOFOLD_AUDIT_EXPORT_IDLE_SECS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let slow = slow.wait_with_output().unwrap();
    assert!(
        slow.status.success(),
        "{:?}",
        String::from_utf8_lossy(&slow.stderr)
    );
    std::fs::write(&file, &slow.stdout).unwrap();
    assert!(slow.stdout.len() > 1_500_000);
    let verified = verify();
    assert!(verified.status.success(), "{verified:?}");

    let _ = std::fs::remove_dir_all(&dir);
    psql(&format!("DROP DATABASE IF EXISTS {db}"));
}

/// Four free consecutive ports on loopback (the metrics ports of `twofold all`).
fn free_port_run(len: u16) -> u16 {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    for _ in 0..100 {
        let base = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if base < 65000 && (0..len).all(|i| free(base + i)) {
            return base;
        }
    }
    panic!("no run of {len} free ports");
}

/// The status line of `GET http://127.0.0.1:{port}{path}`, or `None`.
fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

/// `twofold all`: the four workers in one process, each ready on its own
/// metrics port (and the verifier on its API port), all stopped by SIGTERM.
#[test]
fn all_runs_the_four_workers_until_sigterm() {
    let admin_url = std::env::var("TWOFOLD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let nats_url =
        std::env::var("TWOFOLD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let db = format!("twofold_test_all_{}", std::process::id());
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args(["-w", "-X", "-q", &admin_url, "-c", sql])
            .output()
            .expect("psql must be installed: run ops/deps");
        assert!(out.status.success(), "{out:?}");
    };
    psql(&format!("DROP DATABASE IF EXISTS {db}"));
    psql(&format!("CREATE DATABASE {db}"));
    let url = format!("{}/{db}", admin_url.rsplit_once('/').unwrap().0);
    let key = String::from_utf8(twofold().arg("keygen").output().unwrap().stdout).unwrap();
    let http = free_port_run(1);
    let metrics = loop {
        let base = free_port_run(4);
        if !(base..base + 4).contains(&http) {
            break base;
        }
    };
    let id = format!("all{}", std::process::id());
    let all = twofold()
        .arg("all")
        .env("TWOFOLD_DATABASE_URL", &url)
        .env("TWOFOLD_KEYS", format!("k={}", key.trim()))
        .env("TWOFOLD_CURRENT_KEY_ID", "k")
        .env("TWOFOLD_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("TWOFOLD_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
        .env("TWOFOLD_NATS_URL", &nats_url)
        .env("TWOFOLD_NATS_STREAM", id.to_uppercase())
        .env("TWOFOLD_NATS_SUBJECT_PREFIX", &id)
        .env_remove("TWOFOLD_CONFIG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ports = [http, metrics, metrics + 1, metrics + 2, metrics + 3];
    let mut ready = false;
    for _ in 0..600 {
        if ports
            .iter()
            .all(|p| http_status(*p, "/health/ready") == Some(200))
        {
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let kill = |signal: &str| {
        Command::new("kill")
            .args([signal, &all.id().to_string()])
            .status()
            .unwrap()
    };
    if !ready {
        kill("-KILL");
        let out = all.wait_with_output().unwrap();
        panic!(
            "not every worker got ready: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(kill("-TERM").success());
    let out = all.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for worker in ["verifier", "relay", "dispatcher", "projector"] {
        assert!(stderr.contains(worker), "{worker}: {stderr}");
    }
    psql(&format!("DROP DATABASE IF EXISTS {db}"));
}
