//! Signed checkpoints of each tenant's audit chain: the tenant's whole audit
//! history is one hash chain in position order (as an unfiltered export
//! computes it); every so many entries and every so often the server signs
//! where the chain stood (position, count, head, time). An auditor who keeps
//! the checkpoints can prove of any later unfiltered export that nothing
//! before a checkpoint was removed or altered since it was signed
//! (`twofold audit verify --checkpoints`).

use std::collections::BTreeSet;

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, SubsecRound, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use twofold_platform::audit_signing::{AuditSigner, VerifyingKeys, ALGORITHM};

use crate::audit::{chain, entries_between, verify_watching, ExportFilter, Verified, GENESIS};

/// When the server signs a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// A checkpoint at every this many entries of a tenant's chain (0: never).
    pub every_entries: u64,
    /// A checkpoint of the head when the last one is this old and the chain
    /// has grown since.
    pub every: chrono::Duration,
    /// Entries are chained once their event is this old in the store (by
    /// the database's clock): a bound on how long a writing transaction can
    /// stay open, so no event commits later at a position already chained.
    pub settle: std::time::Duration,
}

impl CheckpointPolicy {
    pub fn from_config(config: &twofold_platform::Config) -> Self {
        Self {
            every_entries: config.audit_checkpoint_entries,
            // Capped far beyond any use, within what a Duration holds.
            every: chrono::Duration::seconds(
                i64::try_from(config.audit_checkpoint_secs.min(1 << 40)).unwrap_or(1 << 40),
            ),
            settle: std::time::Duration::from_secs(config.audit_checkpoint_settle_secs),
        }
    }
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_entries: 1000,
            every: chrono::Duration::hours(1),
            settle: std::time::Duration::from_secs(30),
        }
    }
}

/// One signed checkpoint, as `GET /audit/checkpoints` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Checkpoint {
    pub tenant_id: String,
    /// The position of the entry the chain stood at.
    pub position: i64,
    /// Entries in the chain up to and including it.
    pub count: i64,
    /// The chain's hash there: an unfiltered export's `hash` on that entry.
    pub head: String,
    pub at: DateTime<Utc>,
    pub key_id: String,
    pub algorithm: String,
    /// Base64 Ed25519 signature of [`signed_message`].
    pub signature: String,
}

/// The version of a checkpoint's signed fields (part of what is signed).
pub const CHECKPOINT_VERSION: u32 = 1;

#[derive(Serialize)]
struct SignedFields<'a> {
    version: u32,
    tenant_id: &'a str,
    position: i64,
    count: i64,
    head: &'a str,
    at: String,
}

/// What a checkpoint's signature covers: a label line, then compact JSON
/// `{"version":1,"tenant_id","position","count","head","at"}` (`at` as RFC
/// 3339 with microseconds), so a checkpoint never passes for an export
/// trailer or the other way round.
fn signed_message(c: &Checkpoint) -> anyhow::Result<Vec<u8>> {
    let mut message = b"twofold audit checkpoint\n".to_vec();
    serde_json::to_writer(
        &mut message,
        &SignedFields {
            version: CHECKPOINT_VERSION,
            tenant_id: &c.tenant_id,
            position: c.position,
            count: c.count,
            head: &c.head,
            at: c.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        },
    )?;
    Ok(message)
}

impl Checkpoint {
    /// The chain of `tenant_id` at `position` (its `count`th entry, hash
    /// `head`), signed by `signer`'s current key at `at`.
    pub fn sign(
        signer: &AuditSigner,
        tenant_id: &str,
        position: i64,
        count: i64,
        head: &str,
        at: DateTime<Utc>,
    ) -> anyhow::Result<Self> {
        let mut c = Checkpoint {
            tenant_id: tenant_id.to_string(),
            position,
            count,
            head: head.to_string(),
            // PostgreSQL keeps microseconds: sign what it will give back.
            at: at.trunc_subsecs(6),
            key_id: String::new(),
            algorithm: ALGORITHM.to_string(),
            signature: String::new(),
        };
        let signature = signer.sign(&signed_message(&c)?);
        c.key_id = signature.key_id;
        c.signature = signature.signature;
        Ok(c)
    }
}

/// The last position up to which every event is in the audit history for
/// good: applied by the audit builder and older than `settle`, with nothing
/// unapplied before it. `after`: a position known settled.
async fn horizon(pool: &PgPool, after: i64, settle: std::time::Duration) -> anyhow::Result<i64> {
    sqlx::query_scalar(
        "SELECT least( \
           (SELECT min(e.global_position) - 1 FROM events e \
              LEFT JOIN projection_positions p ON p.projection = 'audit' \
               AND p.aggregate_type = e.aggregate_type AND p.aggregate_id = e.aggregate_id \
             WHERE e.global_position > $1 AND e.sequence > coalesce(p.sequence, 0)), \
           (SELECT min(global_position) - 1 FROM events \
             WHERE global_position > $1 AND recorded_at > now() - make_interval(secs => $2)), \
           (SELECT coalesce(max(global_position), 0) FROM events))",
    )
    .bind(after)
    .bind(settle.as_secs_f64())
    .fetch_one(pool)
    .await
    .context("finding the settled audit horizon")
}

/// Extends every tenant's chain over its settled new entries and signs the
/// checkpoints that are due at `now`: one at every `every_entries`th entry,
/// and one of the head when the last is `every` old and entries came since.
/// Safe to run from several verifiers at once (each tenant's chain is
/// locked while extended). Returns the checkpoints signed.
pub async fn record_due(
    pool: &PgPool,
    signer: &AuditSigner,
    now: DateTime<Utc>,
    policy: &CheckpointPolicy,
) -> anyhow::Result<Vec<Checkpoint>> {
    // Where the last complete pass got to (before one ever did: the least
    // advanced chain).
    let after: i64 = sqlx::query_scalar(
        "SELECT coalesce((SELECT position FROM audit_settled), \
           (SELECT min(position) FROM audit_chain), 0)",
    )
    .fetch_one(pool)
    .await
    .context("reading the audit chains")?;
    let settled = horizon(pool, after, policy.settle).await?;
    let tenants: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT tenant_id FROM rm_audit a WHERE position > $1 AND position <= $2 \
           AND NOT EXISTS (SELECT 1 FROM audit_chain c WHERE c.tenant_id = a.tenant_id AND c.position >= a.position) \
         UNION SELECT tenant_id FROM audit_chain WHERE count > checkpointed_count",
    )
    .bind(after)
    .bind(settled)
    .fetch_all(pool)
    .await
    .context("finding the tenants with new audit entries")?;
    let mut recorded = Vec::new();
    for tenant in tenants {
        recorded.extend(extend_chain(pool, signer, &tenant, settled, now, policy).await?);
    }
    // Every tenant's chain now reaches `settled`: the next pass starts there.
    sqlx::query(
        "INSERT INTO audit_settled (position) VALUES ($1) \
         ON CONFLICT (singleton) DO UPDATE SET position = greatest(audit_settled.position, $1)",
    )
    .bind(settled)
    .execute(pool)
    .await
    .context("recording the settled audit position")?;
    Ok(recorded)
}

#[derive(sqlx::FromRow)]
struct ChainRow {
    position: i64,
    count: i64,
    head: String,
    checkpointed_count: i64,
    checkpointed_at: DateTime<Utc>,
}

impl ChainRow {
    /// Signs a checkpoint of the chain where it stands.
    fn checkpoint(
        &mut self,
        signer: &AuditSigner,
        tenant: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Checkpoint> {
        let c = Checkpoint::sign(signer, tenant, self.position, self.count, &self.head, now)?;
        self.checkpointed_count = self.count;
        self.checkpointed_at = now;
        Ok(c)
    }
}

async fn extend_chain(
    pool: &PgPool,
    signer: &AuditSigner,
    tenant: &str,
    settled: i64,
    now: DateTime<Utc>,
    policy: &CheckpointPolicy,
) -> anyhow::Result<Vec<Checkpoint>> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO audit_chain (tenant_id, position, count, head, checkpointed_count, checkpointed_at) \
         VALUES ($1, 0, 0, $2, 0, $3) ON CONFLICT DO NOTHING",
    )
    .bind(tenant)
    .bind(GENESIS)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let mut row: ChainRow = sqlx::query_as(
        "SELECT position, count, head, checkpointed_count, checkpointed_at \
         FROM audit_chain WHERE tenant_id = $1 FOR UPDATE",
    )
    .bind(tenant)
    .fetch_one(&mut *tx)
    .await
    .context("locking a tenant's audit chain")?;
    let mut due = Vec::new();
    {
        let mut entries = entries_between(&mut tx, tenant, row.position, settled);
        while let Some(entry) = entries.try_next().await? {
            row.head = chain(&row.head, &entry)?;
            row.count += 1;
            row.position = entry.position;
            if policy.every_entries > 0 && row.count % policy.every_entries as i64 == 0 {
                due.push(row.checkpoint(signer, tenant, now)?);
            }
        }
    }
    if row.count > row.checkpointed_count && now - row.checkpointed_at >= policy.every {
        due.push(row.checkpoint(signer, tenant, now)?);
    }
    for c in &due {
        sqlx::query(
            "INSERT INTO audit_checkpoints (tenant_id, position, count, head, at, key_id, algorithm, signature) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&c.tenant_id)
        .bind(c.position)
        .bind(c.count)
        .bind(&c.head)
        .bind(c.at)
        .bind(&c.key_id)
        .bind(&c.algorithm)
        .bind(&c.signature)
        .execute(&mut *tx)
        .await
        .context("recording an audit checkpoint")?;
    }
    sqlx::query(
        "UPDATE audit_chain SET position = $2, count = $3, head = $4, checkpointed_count = $5, \
           checkpointed_at = $6 WHERE tenant_id = $1",
    )
    .bind(tenant)
    .bind(row.position)
    .bind(row.count)
    .bind(&row.head)
    .bind(row.checkpointed_count)
    .bind(row.checkpointed_at)
    .execute(&mut *tx)
    .await?;
    tx.commit()
        .await
        .context("committing a tenant's audit chain")?;
    Ok(due)
}

/// The tenant's checkpoints signed from `from` to `to` (inclusive), oldest first.
pub async fn list(
    pool: &PgPool,
    tenant: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> anyhow::Result<Vec<Checkpoint>> {
    sqlx::query_as(
        "SELECT tenant_id, position, count, head, at, key_id, algorithm, signature \
         FROM audit_checkpoints WHERE tenant_id = $1 \
           AND ($2::timestamptz IS NULL OR at >= $2) AND ($3::timestamptz IS NULL OR at <= $3) \
         ORDER BY position",
    )
    .bind(tenant)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
    .context("reading audit checkpoints")
}

/// The checkpoints JSON as `GET /audit/checkpoints` answers it
/// (`{"checkpoints":[...]}`), or a bare list of them.
pub fn parse(text: &str) -> anyhow::Result<Vec<Checkpoint>> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Wrapped { checkpoints: Vec<Checkpoint> },
        Bare(Vec<Checkpoint>),
    }
    Ok(
        match serde_json::from_str(text).context("reading the checkpoints JSON")? {
            Given::Wrapped { checkpoints } | Given::Bare(checkpoints) => checkpoints,
        },
    )
}

/// What [`verify_against`] found: the export, and how many checkpoints it
/// was held against (`later`: signed after its last entry, so saying
/// nothing of it).
#[derive(Debug)]
pub struct CheckedExport {
    pub verified: Verified,
    pub covered: usize,
    pub later: usize,
    /// Signed before the place the history was pruned up to: their entries
    /// left the read models, so the export cannot show them.
    pub pruned: usize,
}

/// Verifies an unfiltered export (its signature too, with `keys`) and holds
/// it against `checkpoints`: each checkpoint's signature checks with `keys`
/// (when given), and each one at or before the export's last entry must
/// find that entry in the export with the count and the chain's hash it
/// signed. So an entry removed, added or altered before a checkpoint since
/// it was signed fails the export, with which and why.
pub fn verify_against(
    text: &str,
    keys: Option<&VerifyingKeys>,
    checkpoints: &[Checkpoint],
) -> anyhow::Result<CheckedExport> {
    let watch: BTreeSet<i64> = checkpoints.iter().map(|c| c.position).collect();
    let verified = verify_watching(text, keys, watch)?;
    let Some(tenant) = verified.tenant_id.clone() else {
        bail!("the export is from before signing: it names no tenant, so checkpoints cannot be held against it");
    };
    if verified.filter.as_ref() != Some(&ExportFilter::default()) {
        bail!("the export was taken with a filter: only an unfiltered export is the tenant's whole chain that checkpoints sign");
    }
    let (mut covered, mut later, mut pruned) = (0, 0, 0);
    let start = verified.chain_start().cloned();
    for c in checkpoints {
        let name = format!("the checkpoint at position {} ({})", c.position, c.at);
        if c.tenant_id != tenant {
            bail!(
                "{name} is of tenant {}, not the export's {tenant}",
                c.tenant_id
            );
        }
        if let Some(keys) = keys {
            if c.algorithm != ALGORITHM {
                bail!("{name} is not signed with ed25519");
            }
            keys.check(&c.key_id, &signed_message(c)?, &c.signature)
                .map_err(|problem| anyhow!("{name}: {problem}"))?;
        }
        if let Some(start) = start.as_ref().filter(|s| c.position <= s.position) {
            if c.position < start.position {
                pruned += 1;
                continue;
            }
            if (c.count, c.head.as_str()) != (start.count, start.head.as_str()) {
                bail!(
                    "the export's chain starts from a pruned head at position {} that is not the one {name} signed: entries were removed, added or altered before the pruning",
                    c.position
                );
            }
            covered += 1;
            continue;
        }
        let after_last = match verified.last_position {
            Some(last) => c.position > last,
            // An empty export: only the pruned mark, if any, places it.
            None => start.as_ref().is_none_or(|s| c.position > s.position),
        };
        if after_last {
            later += 1;
            continue;
        }
        let Some((count, head)) = verified.at(c.position) else {
            bail!("the export has no entry at position {}, where {name} was taken: it was removed from the history since", c.position);
        };
        if count as i64 != c.count {
            bail!(
                "the export has {count} entries up to position {} where {name} signed {}: entries were removed or added since",
                c.position,
                c.count
            );
        }
        if head != c.head {
            bail!(
                "the export's chain at position {} is not the head {name} signed: an entry was altered since",
                c.position
            );
        }
        covered += 1;
    }
    Ok(CheckedExport {
        verified,
        covered,
        later,
        pruned,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditEntry, Exporter, Format};
    use chrono::TimeZone;
    use serde_json::json;

    fn entry(position: i64) -> AuditEntry {
        AuditEntry {
            position,
            tenant_id: "t".into(),
            aggregate_type: "user".into(),
            aggregate_id: "u".into(),
            sequence: position,
            event_type: "CodeRejected".into(),
            at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            actor_kind: "user".into(),
            actor_id: Some("u".into()),
            ip: None,
            user_agent: None,
            reason: None,
            user_id: Some("u".into()),
            details: json!({ "failures": position }),
        }
    }

    fn signer() -> AuditSigner {
        static SIGNER: std::sync::OnceLock<AuditSigner> = std::sync::OnceLock::new();
        SIGNER.get_or_init(|| AuditSigner::generate("a1")).clone()
    }

    fn keys() -> VerifyingKeys {
        VerifyingKeys::parse(&serde_json::to_string(&signer().published()).unwrap()).unwrap()
    }

    fn export(format: Format, positions: &[i64], filter: ExportFilter) -> String {
        let mut e = Exporter::new(format, "t", filter);
        let mut out = e.header();
        for &p in positions {
            out.push_str(&e.line(entry(p)).unwrap());
        }
        out.push_str(&e.trailer(&signer()).unwrap());
        out
    }

    /// Checkpoints of the chain over `positions` at each `at` (1-based entries).
    fn checkpoints_of(positions: &[i64], every: usize) -> Vec<Checkpoint> {
        let mut head = GENESIS.to_string();
        let mut out = Vec::new();
        for (i, &p) in positions.iter().enumerate() {
            head = chain(&head, &entry(p)).unwrap();
            if (i + 1) % every == 0 {
                let at = Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).unwrap()
                    + chrono::Duration::nanoseconds(1_234_567);
                out.push(Checkpoint::sign(&signer(), "t", p, i as i64 + 1, &head, at).unwrap());
            }
        }
        out
    }

    #[test]
    fn an_intact_export_holds_its_checkpoints_in_both_formats() {
        let positions: Vec<i64> = (1..=10).map(|n| n * 3).collect();
        let cps = checkpoints_of(&positions, 4);
        assert_eq!(cps.len(), 2);
        for format in [Format::Ndjson, Format::Csv] {
            let text = export(format, &positions, ExportFilter::default());
            let checked = verify_against(&text, Some(&keys()), &cps).unwrap();
            assert_eq!((checked.covered, checked.later), (2, 0));
            // An older export: the later checkpoint says nothing of it.
            let older = export(format, &positions[..6], ExportFilter::default());
            let checked = verify_against(&older, Some(&keys()), &cps).unwrap();
            assert_eq!((checked.covered, checked.later), (1, 1));
        }
    }

    #[test]
    fn checkpoints_survive_a_json_round_trip_and_a_forged_one_fails() {
        let positions = [1, 2, 3, 4];
        let cps = checkpoints_of(&positions, 2);
        let text = serde_json::to_string(&json!({ "checkpoints": cps })).unwrap();
        let parsed = parse(&text).unwrap();
        let export = export(Format::Ndjson, &positions, ExportFilter::default());
        assert!(verify_against(&export, Some(&keys()), &parsed).is_ok());
        let mut forged = parsed.clone();
        forged[1].position = 3;
        let err = verify_against(&export, Some(&keys()), &forged).unwrap_err();
        assert!(
            err.to_string().contains("the signature does not match"),
            "{err}"
        );
        let mut other = parsed;
        other[0].tenant_id = "x".into();
        let err = verify_against(&export, None, &other).unwrap_err();
        assert!(err.to_string().contains("is of tenant x"), "{err}");
    }

    #[test]
    fn history_changed_before_a_checkpoint_fails_with_why() {
        let positions = [1, 2, 3, 4, 5, 6];
        let cps = checkpoints_of(&positions, 3);
        let removed = export(Format::Ndjson, &[1, 3, 4, 5, 6], ExportFilter::default());
        let err = verify_against(&removed, Some(&keys()), &cps).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the export has 2 entries up to position 3"),
            "{err}"
        );
        let at_checkpoint = export(Format::Ndjson, &[1, 2, 4, 5, 6], ExportFilter::default());
        let err = verify_against(&at_checkpoint, Some(&keys()), &cps).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the export has no entry at position 3"),
            "{err}"
        );
        let mut e = Exporter::new(Format::Ndjson, "t", ExportFilter::default());
        let mut altered = String::new();
        for p in positions {
            let mut entry = entry(p);
            if p == 5 {
                entry.reason = Some("rewritten".into());
            }
            altered.push_str(&e.line(entry).unwrap());
        }
        altered.push_str(&e.trailer(&signer()).unwrap());
        let err = verify_against(&altered, Some(&keys()), &cps).unwrap_err();
        assert!(
            err.to_string().contains("an entry was altered since"),
            "{err}"
        );
        let filtered = export(
            Format::Ndjson,
            &positions,
            ExportFilter {
                user_id: Some("u".into()),
                ..ExportFilter::default()
            },
        );
        let err = verify_against(&filtered, Some(&keys()), &cps).unwrap_err();
        assert!(err.to_string().contains("with a filter"), "{err}");
    }

    fn pruned_export(mark: &crate::audit::Pruned, positions: &[i64]) -> String {
        crate::audit::tests::export_after(
            &signer(),
            Format::Ndjson,
            mark,
            positions.iter().map(|&p| entry(p)),
        )
    }

    #[test]
    fn an_export_after_a_pruning_holds_the_checkpoints_from_its_mark() {
        let positions: Vec<i64> = (1..=10).collect();
        let cps = checkpoints_of(&positions, 3);
        let mark = crate::audit::Pruned {
            position: cps[1].position,
            count: cps[1].count,
            head: cps[1].head.clone(),
            signed_at: cps[1].at,
        };
        let text = pruned_export(&mark, &positions[6..]);
        let checked = verify_against(&text, Some(&keys()), &cps).unwrap();
        assert_eq!((checked.covered, checked.later, checked.pruned), (2, 0, 1));
        // A mark whose head the checkpoint there did not sign.
        let forged = crate::audit::Pruned {
            head: cps[0].head.clone(),
            ..mark.clone()
        };
        let err = verify_against(
            &pruned_export(&forged, &positions[6..]),
            Some(&keys()),
            &cps,
        )
        .unwrap_err();
        assert!(err.to_string().contains("pruned head"), "{err}");
        // An entry after the mark removed: the next checkpoint's count.
        let removed = pruned_export(&mark, &[7, 9, 10]);
        let err = verify_against(&removed, Some(&keys()), &cps).unwrap_err();
        assert!(
            err.to_string()
                .contains("entries were removed or added since"),
            "{err}"
        );
    }
}
