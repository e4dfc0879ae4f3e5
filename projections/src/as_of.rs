//! The Overview at a past moment without folding the whole history: a daily
//! checkpoint holds every user's directory row as folded from their events
//! before the end of a day, and an answer folds only the events after it.
//!
//! A checkpoint keeps, per user stream, the longest run of events from the
//! stream's start that all happened before the day's end, folded, and the
//! sequence it reached. Folding a stream's later events up to a moment onto
//! that row gives what folding the whole stream up to the moment gives,
//! whatever the times of the later events, so the answer is the same as
//! [`overview::as_of`]'s. A stream whose times go back across the day's end
//! (an event before it after one past it) is listed, and its later events are
//! read by stream rather than by time. Checkpoints are taken only of days
//! that ended [`SETTLE`] ago, so no event of the day is still to commit.
//!
//! Nothing personal is kept: the usernames the answer names are read from
//! `usernames` (gone once a user is erased: `[erased]`, as the events give).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use twofold_domain::user::{TwoFactorState, ERASED};
use twofold_platform::envelope::COLUMNS;
use twofold_platform::personal::Personal;
use twofold_platform::store::Cache;

use crate::directory::UserRow;
use crate::overview::{self, Overview};
use crate::record::{self, EventRecord, RecordExt, Typed};

/// How long after a day's end its checkpoint may be taken: longer than any
/// event takes from its time to its commit.
pub const SETTLE: Duration = Duration::minutes(10);
/// Checkpoints kept per tenant (the most recently taken).
pub const KEPT: i64 = 32;

/// What a checkpoint keeps of one user's row: what the Overview reads,
/// nothing personal, and the sequence its stream was folded to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Kept {
    #[serde(rename = "u")]
    pub(crate) user_id: String,
    #[serde(rename = "s")]
    pub(crate) after: i64,
    #[serde(rename = "a", default)]
    service_account: bool,
    #[serde(rename = "t")]
    two_factor: TwoFactorState,
    #[serde(rename = "m", default)]
    verified_methods: BTreeSet<String>,
    #[serde(rename = "l", default)]
    locked: bool,
    #[serde(rename = "b", default)]
    backup_codes_left: u32,
    #[serde(rename = "e", default)]
    enrolled_at: Option<DateTime<Utc>>,
    #[serde(rename = "r", default)]
    roles: BTreeSet<String>,
    #[serde(rename = "x", default)]
    erased: bool,
}

impl Kept {
    pub(crate) fn of(user_id: &str, after: i64, row: &UserRow) -> Self {
        Self {
            user_id: user_id.to_string(),
            after,
            service_account: row.service_account,
            two_factor: row.two_factor,
            verified_methods: row.verified_methods.clone(),
            locked: row.locked,
            backup_codes_left: row.backup_codes_left,
            enrolled_at: row.enrolled_at,
            roles: row.roles.clone(),
            erased: row.erased,
        }
    }

    /// The row again; its username empty until named (`[erased]` if erased).
    pub(crate) fn row(&self) -> UserRow {
        UserRow {
            user_id: self.user_id.clone(),
            username: if self.erased {
                ERASED.to_string()
            } else {
                String::new()
            },
            service_account: self.service_account,
            two_factor: self.two_factor,
            verified_methods: self.verified_methods.clone(),
            locked: self.locked,
            backup_codes_left: self.backup_codes_left,
            enrolled_at: self.enrolled_at,
            roles: self.roles.clone(),
            erased: self.erased,
            ..UserRow::default()
        }
    }
}

/// Every user's row before a day's end, and the streams whose times go back
/// across it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub(crate) rows: Vec<Kept>,
    pub(crate) back_across: Vec<String>,
}

impl Checkpoint {
    pub fn users(&self) -> usize {
        self.rows.len()
    }
}

/// The user events among `records` (commit order) and their times.
fn user_events(
    records: &[EventRecord],
) -> impl Iterator<Item = (&EventRecord, twofold_domain::user::UserEvent)> {
    records
        .iter()
        .filter(|r| r.aggregate_type == "user")
        .filter_map(|r| match r.typed() {
            Ok(Typed::User(e)) => Some((r, *e)),
            _ => None,
        })
}

/// Takes the checkpoint at `end` of a tenant's events, handed in commit
/// order in as many parts as come.
#[derive(Debug, Default)]
pub struct Taker {
    end: DateTime<Utc>,
    /// Per stream: the row, the sequence folded to, whether an event at or
    /// after `end` has been met.
    streams: HashMap<String, (UserRow, i64, bool)>,
    back_across: BTreeSet<String>,
}

impl Taker {
    pub fn new(end: DateTime<Utc>) -> Self {
        Self {
            end,
            ..Self::default()
        }
    }

    pub fn add(&mut self, records: &[EventRecord]) {
        for (record, event) in user_events(records) {
            let (row, after, past) = self.streams.entry(record.aggregate_id.clone()).or_default();
            if event.ctx().at >= self.end {
                *past = true;
            } else if *past {
                self.back_across.insert(record.aggregate_id.clone());
            } else {
                row.apply(&event);
                *after = record.sequence;
            }
        }
    }

    pub fn finish(self) -> Checkpoint {
        let mut rows: Vec<Kept> = self
            .streams
            .iter()
            .filter(|(_, (_, after, _))| *after > 0)
            .map(|(id, (row, after, _))| Kept::of(id, *after, row))
            .collect();
        rows.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        Checkpoint {
            rows,
            back_across: self.back_across.into_iter().collect(),
        }
    }
}

/// The checkpoint at `end` of a tenant's `records` (all of them, commit order).
pub fn take(records: &[EventRecord], end: DateTime<Utc>) -> Checkpoint {
    let mut taker = Taker::new(end);
    taker.add(records);
    taker.finish()
}

/// The rows at `until` (at or after the checkpoint's end): the checkpoint's
/// rows with the `later` user events (commit order; any that the checkpoint
/// folded already are passed over) at or before `until` folded in. Rows from
/// the checkpoint have no username yet (see [`name`]).
pub fn resume(
    checkpoint: &Checkpoint,
    later: &[EventRecord],
    until: DateTime<Utc>,
) -> HashMap<String, UserRow> {
    let mut after: HashMap<&str, i64> = HashMap::with_capacity(checkpoint.rows.len());
    let mut rows: HashMap<String, UserRow> = HashMap::with_capacity(checkpoint.rows.len());
    for kept in &checkpoint.rows {
        after.insert(&kept.user_id, kept.after);
        rows.insert(kept.user_id.clone(), kept.row());
    }
    for (record, event) in user_events(later) {
        let done = after.get(record.aggregate_id.as_str()).copied();
        if done.is_some_and(|s| record.sequence <= s) || event.ctx().at > until {
            continue;
        }
        rows.entry(record.aggregate_id.clone())
            .or_default()
            .apply(&event);
    }
    rows
}

/// The ids of the rows without a username that the Overview would name.
pub fn unnamed(rows: &HashMap<String, UserRow>) -> Vec<String> {
    let named: HashSet<&str> = overview::named(rows.values()).into_iter().collect();
    rows.values()
        .filter(|r| r.username.is_empty() && named.contains(r.user_id.as_str()))
        .map(|r| r.user_id.clone())
        .collect()
}

/// Gives the rows in `ids` the usernames in `names` (`[erased]` if absent).
pub fn name(rows: &mut HashMap<String, UserRow>, ids: &[String], names: &HashMap<String, String>) {
    for id in ids {
        if let Some(row) = rows.get_mut(id) {
            row.username = names.get(id).cloned().unwrap_or_else(|| ERASED.to_string());
        }
    }
}

pub fn end_of(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc() + Duration::days(1)
}

/// The latest day whose checkpoint may answer for `at` when it is `now`:
/// the day before `at`'s, or the last one settled.
pub fn day_for(at: DateTime<Utc>, now: DateTime<Utc>) -> Option<NaiveDate> {
    let settled = (now - SETTLE).date_naive().pred_opt()?;
    Some(at.date_naive().pred_opt()?.min(settled))
}

pub(crate) async fn load(
    pool: &PgPool,
    tenant_id: &str,
    day: NaiveDate,
) -> anyhow::Result<Option<Checkpoint>> {
    let body: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT body FROM overview_checkpoints WHERE tenant_id = $1 AND day = $2",
    )
    .bind(tenant_id)
    .bind(day)
    .fetch_optional(pool)
    .await
    .context("reading an Overview checkpoint")?;
    body.map(|b| serde_json::from_slice(&b).context("an Overview checkpoint does not parse"))
        .transpose()
}

pub(crate) async fn save(
    pool: &PgPool,
    tenant_id: &str,
    day: NaiveDate,
    checkpoint: &Checkpoint,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO overview_checkpoints (tenant_id, day, body, users) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING",
    )
    .bind(tenant_id)
    .bind(day)
    .bind(serde_json::to_vec(checkpoint)?)
    .bind(i32::try_from(checkpoint.users()).unwrap_or(i32::MAX))
    .execute(&mut *tx)
    .await
    .context("writing an Overview checkpoint")?;
    sqlx::query(
        "DELETE FROM overview_checkpoints WHERE tenant_id = $1 AND day NOT IN \
         (SELECT day FROM overview_checkpoints WHERE tenant_id = $1 \
          ORDER BY created_at DESC, day DESC LIMIT $2)",
    )
    .bind(tenant_id)
    .bind(KEPT)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The tenant's user events after `end` up to `until` (found by time in the
/// audit history), and every event after the checkpoint of the streams in
/// `back_across`, in commit order, opened. Where the audit history was
/// pruned past `end`, its times no longer find every event: then every user
/// event of the tenant the checkpoint does not hold, read from the events.
pub(crate) async fn later(
    pool: &PgPool,
    personal: &Personal,
    tenant_id: &str,
    checkpoint: &Checkpoint,
    end: DateTime<Utc>,
    until: DateTime<Utc>,
) -> anyhow::Result<Vec<EventRecord>> {
    // Every pruned entry happened before the checkpoint it was pruned up
    // to was signed (give or take a clock's skew, well within SETTLE).
    let pruned = crate::retention::mark(pool, tenant_id).await?;
    if pruned.is_some_and(|p| end <= p.signed_at + SETTLE) {
        return not_held(pool, personal, tenant_id, checkpoint).await;
    }
    let mut records: Vec<EventRecord> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM events WHERE global_position IN \
           (SELECT position FROM rm_audit WHERE tenant_id = $1 AND aggregate_type = 'user' \
              AND at >= $2 AND at <= $3) \
         UNION ALL \
         SELECT {COLUMNS} FROM events WHERE aggregate_type = 'user' AND aggregate_id = ANY($4) \
         ORDER BY global_position"
    ))
    .bind(tenant_id)
    .bind(end)
    .bind(until)
    .bind(&checkpoint.back_across)
    .fetch_all(pool)
    .await
    .context("reading the events after an Overview checkpoint")?;
    // A listed stream's events in the time range come twice.
    records.dedup_by_key(|r| r.global_position);
    personal.open_envelopes(pool, &mut records).await?;
    Ok(records)
}

/// Every user event of the tenant that `checkpoint` has not folded, in
/// commit order, opened, read from the events: slower than a lookup by time
/// (it reads the tenant's whole history), and needed only for moments older
/// than the audit history kept.
async fn not_held(
    pool: &PgPool,
    personal: &Personal,
    tenant_id: &str,
    checkpoint: &Checkpoint,
) -> anyhow::Result<Vec<EventRecord>> {
    let folded: HashMap<&str, i64> = checkpoint
        .rows
        .iter()
        .map(|k| (k.user_id.as_str(), k.after))
        .collect();
    let mut out = Vec::new();
    record::each_of_tenant(pool, personal, tenant_id, 10_000, |records| {
        out.extend(
            records
                .iter()
                .filter(|r| {
                    r.aggregate_type == "user"
                        && folded
                            .get(r.aggregate_id.as_str())
                            .is_none_or(|after| r.sequence > *after)
                })
                .cloned(),
        );
    })
    .await?;
    Ok(out)
}

pub(crate) static TAKING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Checkpoints recently used, parsed (they never change once taken).
pub type Remembered = Cache<(String, NaiveDate), Arc<Checkpoint>>;

/// The tenant's checkpoint of `day`: stored, or taken now, swept forward
/// from an earlier one or else from all its events (in a task of its own,
/// so that a request given up on still leaves it for the next).
pub(crate) async fn checkpoint(
    pool: &PgPool,
    personal: &Personal,
    tenant_id: &str,
    day: NaiveDate,
) -> anyhow::Result<Checkpoint> {
    if let Some(c) = load(pool, tenant_id, day).await? {
        return Ok(c);
    }
    let (pool, personal, tenant) = (pool.clone(), personal.clone(), tenant_id.to_string());
    tokio::spawn(async move {
        // One at a time: a request asking again while the first is still
        // folding waits for its checkpoint instead of folding again.
        let _taking = TAKING.lock().await;
        if let Some(c) = load(&pool, &tenant, day).await? {
            return Ok(c);
        }
        // Swept forward from an earlier one if there is one not long before,
        // else folded from every event.
        let taken = match crate::days::base(&pool, &tenant, day).await? {
            Some(base) => {
                crate::days::sweep_from(&pool, &personal, &tenant, base, day, |_, _| Ok(()))
                    .await?
                    .checkpoint()
            }
            None => {
                let mut taker = Taker::new(end_of(day));
                record::each_of_tenant(&pool, &personal, &tenant, 10_000, |r| taker.add(r)).await?;
                taker.finish()
            }
        };
        save(&pool, &tenant, day, &taken).await?;
        anyhow::Ok(taken)
    })
    .await
    .context("taking an Overview checkpoint")?
}

/// The Overview of a tenant as it stood at `at`, when it is `now`: from the
/// checkpoint of the day before (taken now from all the events if there is
/// none yet) and the events after it; or, for a moment before any day has
/// settled, folded from all the events.
pub async fn overview_at(
    pool: &PgPool,
    personal: &Personal,
    remembered: &Remembered,
    tenant_id: &str,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> anyhow::Result<Overview> {
    let Some(day) = day_for(at, now) else {
        let records = record::load_tenant(pool, personal, tenant_id).await?;
        return Ok(overview::as_of(&records, at));
    };
    let end = end_of(day);
    let key = (tenant_id.to_string(), day);
    let checkpoint = match remembered.get(&key) {
        Some(c) => c,
        None => {
            let c = Arc::new(checkpoint(pool, personal, tenant_id, day).await?);
            remembered.put(key, c.clone());
            c
        }
    };
    let later = later(pool, personal, tenant_id, &checkpoint, end, at).await?;
    let mut rows = resume(&checkpoint, &later, at);
    let ids = unnamed(&rows);
    if !ids.is_empty() {
        let names: HashMap<String, String> = sqlx::query_as(
            "SELECT user_id::text, username FROM usernames WHERE user_id = ANY($1::text[]::uuid[])",
        )
        .bind(&ids)
        .fetch_all(pool)
        .await
        .context("reading usernames")?
        .into_iter()
        .collect();
        name(&mut rows, &ids, &names);
    }
    Ok(overview::compute(rows.values()))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::value::RawValue;
    use twofold_domain::secrets::{PasswordHash, SecretHash};
    use twofold_domain::user::UserEvent;
    use twofold_domain::values::{Method, Role, Username};
    use twofold_domain::{Actor, ChallengeId, Ctx, TenantId, UserId};

    use super::*;

    fn record(position: i64, user: UserId, sequence: i64, event: &UserEvent) -> EventRecord {
        EventRecord {
            global_position: position,
            aggregate_type: "user".into(),
            aggregate_id: user.to_string(),
            sequence,
            event_type: event.name().into(),
            event_version: "1.0".into(),
            tenant_id: None,
            recorded_at: Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap(),
            payload: RawValue::from_string(serde_json::to_string(event).unwrap()).unwrap(),
            opened: None,
        }
    }

    /// Users whose events, interleaved, change what the Overview shows, a
    /// few of them with times going back (as a retried command's may).
    fn history() -> (Vec<EventRecord>, HashMap<String, String>) {
        let start = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        let tenant = TenantId(uuid::Uuid::new_v4());
        let mut streams: Vec<(UserId, Vec<UserEvent>)> = Vec::new();
        let mut names = HashMap::new();
        for u in 0..12i64 {
            let user = UserId(uuid::Uuid::new_v4());
            let name = format!("user{u:02}");
            names.insert(user.to_string(), name.clone());
            // Hours from the start; user 3 and 7 have times going back.
            let mut hours = [u * 5, u * 5 + 20, u * 5 + 30, u * 5 + 47, u * 5 + 60];
            if u % 4 == 3 {
                hours.swap(1, 2);
                hours[3] = hours[1] - 1;
            }
            let ctx = |i: usize| Ctx::new(start + Duration::hours(hours[i]), Actor::User(user));
            let events = vec![
                UserEvent::UserRegistered {
                    user_id: user,
                    tenant_id: tenant,
                    username: Username::parse(&name).unwrap(),
                    email: None,
                    phone: None,
                    roles: vec![Role::parse(["staff", "finance"][u as usize % 2]).unwrap()],
                    service_account: u == 11,
                    password_hash: PasswordHash("x".into()),
                    ctx: ctx(0),
                },
                if u % 3 == 0 {
                    UserEvent::EnrollmentCompleted {
                        method: Method::Totp,
                        totp_step: 1,
                        ctx: ctx(1),
                    }
                } else {
                    UserEvent::CodeVerified {
                        challenge_id: ChallengeId(uuid::Uuid::new_v4()),
                        method: Method::Email,
                        totp_step: None,
                        ctx: ctx(1),
                    }
                },
                UserEvent::BackupCodesIssued {
                    hashes: vec![SecretHash("0".repeat(64)); 3],
                    ctx: ctx(2),
                },
                UserEvent::UserLockedOut {
                    failures: 3,
                    ended_sessions: Vec::new(),
                    ctx: ctx(3),
                },
                UserEvent::UserUnlocked { ctx: ctx(4) },
            ];
            streams.push((user, events));
        }
        // Commit order: round-robin over the streams.
        let mut records = Vec::new();
        for i in 0..5 {
            for (user, events) in &streams {
                let position = records.len() as i64 + 1;
                records.push(record(position, *user, i as i64 + 1, &events[i]));
            }
        }
        (records, names)
    }

    /// What `overview_at` selects after a checkpoint: the user events from
    /// its end up to `until` by time, and the listed streams' events.
    fn selected(
        records: &[EventRecord],
        c: &Checkpoint,
        end: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Vec<EventRecord> {
        records
            .iter()
            .filter(|r| {
                let at = r.ctx().unwrap().at;
                (at >= end && at <= until) || c.back_across.contains(&r.aggregate_id)
            })
            .cloned()
            .collect()
    }

    #[test]
    fn a_checkpoint_and_the_events_after_it_answer_what_folding_every_event_answers() {
        let (records, names) = history();
        let start = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        let mut listed = 0;
        for end_hours in (0..130).step_by(7) {
            let end = start + Duration::hours(end_hours);
            let checkpoint = take(&records, end);
            listed += checkpoint.back_across.len();
            // Through JSON, as stored.
            let checkpoint: Checkpoint =
                serde_json::from_slice(&serde_json::to_vec(&checkpoint).unwrap()).unwrap();
            for after_end in [0, 1, 5, 13, 30, 200] {
                let until = end + Duration::hours(after_end)
                    - Duration::seconds(1).min(Duration::hours(after_end));
                let later = selected(&records, &checkpoint, end, until);
                let mut rows = resume(&checkpoint, &later, until);
                let ids = unnamed(&rows);
                name(&mut rows, &ids, &names);
                assert_eq!(
                    overview::compute(rows.values()),
                    overview::as_of(&records, until),
                    "checkpoint at {end}, as of {until}"
                );
            }
        }
        assert!(
            listed > 0,
            "some streams went back across a checkpoint's end"
        );
    }

    #[test]
    fn a_sweep_forward_from_a_checkpoint_gives_what_taking_and_folding_every_event_give() {
        let (records, _) = history();
        let start = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        let mut listed = 0;
        for base_hours in (0..130).step_by(11) {
            let base_end = start + Duration::hours(base_hours);
            let checkpoint = take(&records, base_end);
            let ends: Vec<_> = (1..=8).map(|i| base_end + Duration::hours(i * 7)).collect();
            let last = ends[ends.len() - 1];
            // What `later` reads: by time up to the last end, and the
            // listed streams' every event.
            let mut sweep = crate::days::Sweep::new(&checkpoint, base_end);
            sweep.add(&selected(
                &records,
                &checkpoint,
                base_end,
                last - Duration::microseconds(1),
            ));
            for end in ends {
                sweep.advance(end);
                let taken = take(&records, end);
                listed += taken.back_across.len();
                assert_eq!(sweep.checkpoint(), taken, "from {base_end} to {end}");
                let day = end.date_naive();
                assert_eq!(
                    crate::days::point(day, &sweep.counts()),
                    overview::DailyPoint::of(
                        day,
                        &overview::as_of(&records, end - Duration::microseconds(1))
                    ),
                    "from {base_end} to {end}"
                );
            }
        }
        assert!(listed > 0, "some streams went back across an end");
    }

    #[test]
    fn the_day_asked_for_is_the_one_before_and_settled() {
        let at = Utc.with_ymd_and_hms(2026, 3, 10, 8, 0, 0).unwrap();
        let day = |d| NaiveDate::from_ymd_opt(2026, 3, d).unwrap();
        assert_eq!(day_for(at, at + Duration::days(30)), Some(day(9)));
        // On the 10th at 00:05 the 9th has not settled.
        let early = Utc.with_ymd_and_hms(2026, 3, 10, 0, 5, 0).unwrap();
        assert_eq!(day_for(early, early), Some(day(8)));
        assert_eq!(day_for(at, at), Some(day(9)));
        assert_eq!(
            end_of(day(9)),
            Utc.with_ymd_and_hms(2026, 3, 10, 0, 0, 0).unwrap()
        );
    }
}
