//! The `twofold` binary's own commands that need no services.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use chrono::{TimeZone, Utc};
use serde_json::json;
use twofold_projections::audit::{AuditEntry, Exporter, Format};

fn twofold() -> Command {
    Command::new(env!("CARGO_BIN_EXE_twofold"))
}

fn export(format: Format) -> String {
    let mut e = Exporter::new(format);
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
    out.push_str(&e.trailer().unwrap());
    out
}

#[test]
fn audit_verify_accepts_an_intact_export_and_refuses_an_altered_one() {
    let dir = std::env::temp_dir().join(format!("twofold-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, format) in [("a.ndjson", Format::Ndjson), ("a.csv", Format::Csv)] {
        let text = export(format);
        let intact = dir.join(name);
        std::fs::write(&intact, &text).unwrap();
        let out = twofold()
            .args(["audit", "verify"])
            .arg(&intact)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: 3 entries"));

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
