//! Signed audit exports as an auditor checks them: the keys the verifier
//! publishes at `/audit/keys` verify its NDJSON and CSV exports; a cut,
//! re-trailed, truncated or reordered export fails with its reason; after a
//! key rotation old exports still verify with the published keys.

use reqwest::StatusCode;
use serde_json::{json, Value};
use twofold_platform::audit_signing::{AuditSigner, VerifyingKeys};
use twofold_platform::Config;
use twofold_projections::audit::{verify, verify_extends, verify_signed};

use crate::helpers::{spawn_app_with, TestApp};

fn seed(byte: u8) -> secrecy::SecretString {
    secrecy::SecretString::from(hex_of(byte))
}

fn hex_of(byte: u8) -> String {
    format!("{byte:02x}").repeat(32)
}

/// Audit signing keys `ids` (seeded 0x10, 0x11, ... in order), `current` signing.
pub(crate) fn audit_keys(config: &mut Config, ids: &[&str], current: &str) {
    config.audit_signing_keys = ids
        .iter()
        .zip(0x10u8..)
        .map(|(id, byte)| (id.to_string(), seed(byte)))
        .collect();
    config.audit_signing_key_id = current.to_string();
}

/// A history to export: the admin's sign-in and three users created.
pub(crate) async fn some_history(app: &TestApp) -> String {
    let admin = app.admin_token().await;
    for name in ["ann", "ben", "cat"] {
        app.create_user(
            &admin,
            json!({"username": name, "password": "correct horse battery", "email": format!("{name}@acme.test")}),
        )
        .await;
    }
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
    admin
}

pub(crate) async fn export(app: &TestApp, token: &str, query: &str) -> String {
    let response = app
        .client
        .get(format!("{}/audit?{query}", app.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap()
}

/// The published keys, as the endpoint answers them.
pub(crate) async fn published_keys(app: &TestApp, token: &str) -> Value {
    let reply = app.get_auth("/audit/keys", token).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.body
}

pub(crate) fn keys_of(published: &Value) -> VerifyingKeys {
    VerifyingKeys::parse(&published.to_string()).unwrap()
}

fn refused(text: &str, keys: &VerifyingKeys) -> String {
    verify_signed(text, keys).unwrap_err().to_string()
}

/// The export's entry lines (CSV: after the header).
fn entry_lines(text: &str, csv: bool) -> (Vec<&str>, &str) {
    let lines: Vec<&str> = text.lines().collect();
    let (trailer, body) = lines.split_last().unwrap();
    (body[usize::from(csv)..].to_vec(), trailer)
}

/// The export cut to its first `keep` entries, with a trailer rewritten to
/// claim them (count, head and last position recomputed) and `signature`
/// in place of the server's.
fn cut_and_retrailed(text: &str, csv: bool, keep: usize, signature: &str) -> String {
    let (entries, trailer) = entry_lines(text, csv);
    let kept = &entries[..keep];
    let last = kept[keep - 1];
    let header = if csv {
        text.lines().next().unwrap()
    } else {
        ""
    };
    if csv {
        // `#trailer,count,head,version,tenant,filter,first,last,key,alg,sig`
        let (rest, _sig) = trailer.rsplit_once(',').unwrap();
        let (rest, alg) = rest.rsplit_once(',').unwrap();
        let (rest, key) = rest.rsplit_once(',').unwrap();
        let (rest, _last) = rest.rsplit_once(',').unwrap();
        // What stays: version, tenant, filter, first position.
        let signed = rest.splitn(4, ',').nth(3).unwrap();
        let head = last.rsplit(',').next().unwrap();
        let position = last.split(',').next().unwrap();
        let new_trailer =
            format!("#trailer,{keep},{head},{signed},{position},{key},{alg},{signature}");
        format!("{header}\n{}\n{new_trailer}\n", kept.join("\n"))
    } else {
        let last: Value = serde_json::from_str(last).unwrap();
        let mut t: Value = serde_json::from_str(trailer).unwrap();
        t["trailer"]["count"] = json!(keep);
        t["trailer"]["head"] = last["hash"].clone();
        t["trailer"]["last_position"] = last["position"].clone();
        t["trailer"]["signature"] = json!(signature);
        format!("{}\n{t}\n", kept.join("\n"))
    }
}

#[tokio::test]
async fn exports_verify_with_the_published_key_and_tampered_ones_fail_with_their_reason() {
    let app = spawn_app_with(|c| audit_keys(c, &["a0"], "a0")).await;
    let admin = some_history(&app).await;

    let unauthenticated = app
        .client
        .get(format!("{}/audit/keys", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
    let published = published_keys(&app, &admin).await;
    assert_eq!(
        published["keys"].as_array().unwrap().len(),
        1,
        "{published}"
    );
    assert_eq!(published["keys"][0]["key_id"], "a0");
    assert_eq!(published["keys"][0]["algorithm"], "ed25519");
    assert_eq!(published["keys"][0]["current"], true);
    assert!(!published.to_string().contains(&hex_of(0x10)));
    let keys = keys_of(&published);

    for format in ["ndjson", "csv"] {
        let csv = format == "csv";
        let text = export(&app, &admin, &format!("format={format}")).await;
        let verified = verify_signed(&text, &keys).unwrap();
        assert!(verified.signature_checked);
        assert_eq!(verified.key_id.as_deref(), Some("a0"));
        assert_eq!(
            verified.tenant_id.as_deref(),
            Some(app.tenant_id.to_string().as_str())
        );
        let (entries, trailer) = entry_lines(&text, csv);
        assert!(entries.len() >= 5, "{format}: {text}");
        assert!(trailer.contains("ed25519"), "{trailer}");
        // An unsigned check passes too, and says less.
        assert!(!verify(&text).unwrap().signature_checked);

        // Cut to fewer entries and re-trailed: the chain and count agree,
        // the signature does not, whether kept, garbage or absent.
        let original_signature = if csv {
            trailer
                .rsplit(',')
                .next()
                .unwrap()
                .trim_start_matches('\'')
                .to_string()
        } else {
            serde_json::from_str::<Value>(trailer).unwrap()["trailer"]["signature"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let garbage = "A".repeat(86) + "==";
        for signature in [
            original_signature.as_str(),
            garbage.as_str(),
            "bm90IGEgc2lnbmF0dXJl",
        ] {
            let forged = cut_and_retrailed(&text, csv, 3, signature);
            verify(&forged).unwrap_or_else(|e| panic!("{format}: the chain holds: {e}\n{forged}"));
            assert_eq!(
                refused(&forged, &keys),
                "the signature does not match: the trailer was rewritten or the export did not come from this server",
                "{format}"
            );
        }
        if !csv {
            let (entries, trailer) = entry_lines(&text, false);
            let mut t: Value = serde_json::from_str(
                cut_and_retrailed(&text, false, 3, "x")
                    .lines()
                    .last()
                    .unwrap(),
            )
            .unwrap();
            t["trailer"]
                .as_object_mut()
                .unwrap()
                .retain(|k, _| k == "count" || k == "head");
            let unsigned = format!("{}\n{t}\n", entries[..3].join("\n"));
            assert!(verify(&unsigned).is_ok());
            assert!(
                refused(&unsigned, &keys).contains("not signed"),
                "{trailer}"
            );
        }

        // Truncated: entries dropped, the trailer kept.
        let (entries, trailer) = entry_lines(&text, csv);
        let header = if csv {
            format!("{}\n", text.lines().next().unwrap())
        } else {
            String::new()
        };
        let truncated = format!(
            "{header}{}\n{trailer}\n",
            entries[..entries.len() - 2].join("\n")
        );
        assert_eq!(
            refused(&truncated, &keys),
            format!(
                "the trailer counts {} entries but the export has {}",
                entries.len(),
                entries.len() - 2
            ),
            "{format}"
        );

        // Reordered: two entries swapped.
        let mut swapped = entries.clone();
        swapped.swap(1, 2);
        let reordered = format!("{header}{}\n{trailer}\n", swapped.join("\n"));
        assert!(
            refused(&reordered, &keys).contains("reordered"),
            "{format}: {}",
            refused(&reordered, &keys)
        );

        // Another server's key: not this server's export.
        let other = AuditSigner::generate("a0").published();
        let other = VerifyingKeys::parse(&serde_json::to_string(&other).unwrap()).unwrap();
        assert!(refused(&text, &other).starts_with("the signature does not match"));
    }

    // A filtered export signs its filter.
    let filtered = export(&app, &admin, "event_type=UserRegistered").await;
    let verified = verify_signed(&filtered, &keys).unwrap();
    assert_eq!(
        verified.filter.unwrap().event_type.as_deref(),
        Some("UserRegistered")
    );
    let widened = filtered.replacen(
        "\"filter\":{\"event_type\":\"UserRegistered\"",
        "\"filter\":{\"event_type\":null",
        1,
    );
    assert_ne!(widened, filtered);
    assert!(refused(&widened, &keys).starts_with("the signature does not match"));
}

#[tokio::test]
async fn after_a_key_rotation_old_exports_still_verify_with_the_published_keys() {
    let app = spawn_app_with(|c| audit_keys(c, &["a0"], "a0")).await;
    let admin = some_history(&app).await;
    let old_keys = keys_of(&published_keys(&app, &admin).await);
    let old = export(&app, &admin, "format=ndjson").await;
    let old_csv = export(&app, &admin, "format=csv").await;
    assert_eq!(
        verify_signed(&old, &old_keys).unwrap().key_id.as_deref(),
        Some("a0")
    );

    // Restarted with a1 current and a0 still listed.
    let rotated = app
        .twin_with(|c| {
            audit_keys(c, &["a0", "a1"], "a1");
        })
        .await;
    let admin = rotated.admin_token().await;
    let published = published_keys(&rotated, &admin).await;
    let listed: Vec<(String, bool)> = published["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key_id"].as_str().unwrap().to_string(),
                k["current"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [("a0".to_string(), false), ("a1".to_string(), true)]
    );
    // a0 is the same key as before the rotation.
    assert_eq!(
        published["keys"][0],
        published_before(&old_keys_json(&app, &admin).await)
    );
    let keys = keys_of(&published);
    for text in [&old, &old_csv] {
        let verified = verify_signed(text, &keys).unwrap();
        assert_eq!(verified.key_id.as_deref(), Some("a0"));
    }
    let new = export(&rotated, &admin, "format=ndjson").await;
    let verified = verify_signed(&new, &keys).unwrap();
    assert_eq!(verified.key_id.as_deref(), Some("a1"));
    // The old export with only the new key: named, not guessed at.
    let only_a1 = VerifyingKeys::parse(&format!(
        "a1={}",
        published["keys"][1]["public_key"].as_str().unwrap()
    ))
    .unwrap();
    assert_eq!(
        refused(&old, &only_a1),
        "signed by key a0, not among the keys given"
    );
    assert!(verify_signed(&new, &only_a1).is_ok());
}

/// The first verifier's published keys (it still runs with a0 only).
async fn old_keys_json(app: &TestApp, token: &str) -> Value {
    published_keys(app, token).await
}

fn published_before(keys: &Value) -> Value {
    let mut key = keys["keys"][0].clone();
    key["current"] = json!(false);
    key
}

#[tokio::test]
async fn without_a_configured_key_exports_are_signed_with_one_derived_from_the_server_key() {
    let app = spawn_app_with(|_| {}).await;
    let admin = some_history(&app).await;
    let published = published_keys(&app, &admin).await;
    assert_eq!(published["keys"][0]["key_id"], "server-test", "{published}");
    let text = export(&app, &admin, "format=csv").await;
    let verified = verify_signed(&text, &keys_of(&published)).unwrap();
    assert_eq!(verified.key_id.as_deref(), Some("server-test"));
    // A second verifier with the same server key signs with the same key.
    let twin = app.twin().await;
    let twin_admin = twin.admin_token().await;
    assert_eq!(published_keys(&twin, &twin_admin).await, published);

    // Later, with more history: the new export extends the earlier one.
    let earlier = verify_signed(&text, &keys_of(&published)).unwrap();
    twin.create_user(
        &twin_admin,
        json!({"username": "dot", "password": "correct horse battery"}),
    )
    .await;
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
    let later = export(&twin, &twin_admin, "format=csv").await;
    let extended = verify_extends(&later, Some(&keys_of(&published)), &earlier).unwrap();
    assert!(extended.entries > earlier.entries);
    // An export of another filter does not.
    let other = export(&twin, &twin_admin, "event_type=UserRegistered").await;
    assert!(verify_extends(&other, Some(&keys_of(&published)), &earlier).is_err());
}

/// An export longer than a chunk (about `EXPORT_CHUNK` bytes are sent at
/// once) goes out in several, each ending on a whole line, and verifies in
/// both formats: the lines and trailer are those of a one-chunk export.
#[tokio::test]
async fn an_export_of_several_chunks_verifies_in_both_formats() {
    use futures::StreamExt;
    use twofold_app::reports::EXPORT_CHUNK;
    let app = spawn_app_with(|c| audit_keys(c, &["a0"], "a0")).await;
    let admin = some_history(&app).await;
    let keys = keys_of(&published_keys(&app, &admin).await);
    // Each export, of nothing here, is recorded: an entry of the history
    // (with the admin's IP and user agent sealed, opened in NDJSON).
    let reads = 300;
    for _ in 0..reads {
        export(&app, &admin, "event_type=Nothing").await;
    }
    twofold_projections::rebuild::rebuild(&app.pool, &app.state.personal, |_| {})
        .await
        .unwrap();
    let mut counted = None;
    for format in ["ndjson", "csv"] {
        let q = twofold_projections::queries::AuditQuery {
            format: Some(format.to_string()),
            ..Default::default()
        };
        let (_, chunks) = app
            .state
            .operator_audit_export(app.tenant_id, q)
            .await
            .unwrap();
        let chunks: Vec<String> = chunks.map(Result::unwrap).collect().await;
        let text = chunks.concat();
        assert!(
            text.len() > 2 * EXPORT_CHUNK,
            "{format}: {} bytes",
            text.len()
        );
        assert!(chunks.len() > 2, "{format}: {} chunks", chunks.len());
        for chunk in &chunks {
            assert!(chunk.ends_with('\n'), "{format}: a chunk ends mid-line");
            assert!(chunk.len() < 2 * EXPORT_CHUNK, "{format}: {}", chunk.len());
        }
        let verified = verify_signed(&text, &keys).unwrap();
        assert!(verified.entries > reads, "{format}: {}", verified.entries);
        // Both formats export the same entries.
        assert_eq!(*counted.get_or_insert(verified.entries), verified.entries);
        if format == "ndjson" {
            assert!(text.contains("\"opened\":{"), "no entry shows opened data");
        }
    }
}
