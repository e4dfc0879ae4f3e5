//! The Overview day by day: its figures at the end of each day (UTC), as
//! `as_of` the last moment of the day answers them. A settled day's figures
//! never change, so each is computed once and kept (`overview_days`); the
//! series is then read, not folded.
//!
//! Days are computed by sweeping forward from the latest daily checkpoint
//! before them (see [`crate::as_of`]): each day's events, found by time, are
//! folded onto the rows in the order of their streams, and the counts move
//! by what each changed row took away and adds ([`overview::tally`]). A
//! stream whose times go back across a day's end is folded as `as_of` folds
//! it, every event up to the moment in commit order. The sweep leaves the
//! last day's checkpoint behind, so the next day starts from it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::Context;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use sqlx::PgPool;
use twofold_domain::user::UserEvent;
use twofold_platform::personal::Personal;

use crate::as_of::{self, Checkpoint, Kept, SETTLE};
use crate::directory::UserRow;
use crate::overview::{self, Counts, DailyPoint};
use crate::record::{EventRecord, RecordExt, Typed};

/// The furthest back a sweep starts from a stored checkpoint; further than
/// this, the day before the first asked for is taken anew.
const LONGEST_SWEEP_DAYS: i64 = 62;

#[derive(Debug, Default)]
struct Stream {
    row: UserRow,
    /// The sequence folded to: every event up to it is before the sweep's end.
    after: i64,
    /// Events after `after` met so far, by sequence, with their times.
    pending: BTreeMap<i64, (DateTime<Utc>, UserEvent)>,
}

/// A tenant's rows at the end of a day, moved forward a day at a time.
#[derive(Debug)]
pub struct Sweep {
    end: DateTime<Utc>,
    streams: HashMap<String, Stream>,
    /// Streams with events met but not folded.
    waiting: BTreeSet<String>,
    /// The counts of every stream's folded row.
    counts: Counts,
}

impl Sweep {
    /// From the checkpoint at `end`.
    pub fn new(checkpoint: &Checkpoint, end: DateTime<Utc>) -> Self {
        let mut counts = Counts::new();
        let mut streams = HashMap::with_capacity(checkpoint.rows.len());
        for kept in &checkpoint.rows {
            let row = kept.row();
            overview::count(&mut counts, &row, 1);
            streams.insert(
                kept.user_id.clone(),
                Stream {
                    row,
                    after: kept.after,
                    pending: BTreeMap::new(),
                },
            );
        }
        Self {
            end,
            streams,
            waiting: BTreeSet::new(),
            counts,
        }
    }

    /// Hands in user events: every event after the checkpoint of the streams
    /// it lists, and any others after its end (in any order; events met
    /// before, or already folded, are passed over).
    pub fn add(&mut self, records: &[EventRecord]) {
        for record in records.iter().filter(|r| r.aggregate_type == "user") {
            let Ok(Typed::User(event)) = record.typed() else {
                continue;
            };
            let stream = self.streams.entry(record.aggregate_id.clone()).or_default();
            if record.sequence > stream.after {
                stream
                    .pending
                    .insert(record.sequence, (event.ctx().at, *event));
                self.waiting.insert(record.aggregate_id.clone());
            }
        }
    }

    /// Moves the end forward to `end`: each stream folds its next events in
    /// order while they are before it. An event not handed in is after it
    /// (every earlier one was), so a gap stops the stream too.
    pub fn advance(&mut self, end: DateTime<Utc>) {
        self.end = end;
        let mut emptied = Vec::new();
        for id in &self.waiting {
            let Some(stream) = self.streams.get_mut(id) else {
                continue;
            };
            let before = stream.row.clone();
            let mut folded = false;
            while let Some(entry) = stream.pending.first_entry() {
                if *entry.key() != stream.after + 1 || entry.get().0 >= end {
                    break;
                }
                let (sequence, (_, event)) = entry.remove_entry();
                stream.row.apply(&event);
                stream.after = sequence;
                folded = true;
            }
            if folded {
                overview::count(&mut self.counts, &before, -1);
                overview::count(&mut self.counts, &stream.row, 1);
            }
            if stream.pending.is_empty() {
                emptied.push(id.clone());
            }
        }
        for id in emptied {
            self.waiting.remove(&id);
        }
    }

    /// Streams with an event before the end that waits behind a later one.
    fn back_across(&self) -> impl Iterator<Item = (&String, &Stream)> {
        self.waiting.iter().filter_map(|id| {
            let stream = self.streams.get(id)?;
            stream
                .pending
                .values()
                .any(|(at, _)| *at < self.end)
                .then_some((id, stream))
        })
    }

    /// The counts at the last moment before the end: a stream going back
    /// across it has every event before it folded, in commit order.
    pub fn counts(&self) -> Counts {
        let mut counts = self.counts.clone();
        for (_, stream) in self.back_across() {
            let mut row = stream.row.clone();
            for (at, event) in stream.pending.values() {
                if *at < self.end {
                    row.apply(event);
                }
            }
            overview::count(&mut counts, &stream.row, -1);
            overview::count(&mut counts, &row, 1);
        }
        counts
    }

    /// The checkpoint at the end, as [`as_of::take`] would take it.
    pub fn checkpoint(&self) -> Checkpoint {
        let mut rows: Vec<Kept> = self
            .streams
            .iter()
            .filter(|(_, s)| s.after > 0)
            .map(|(id, s)| Kept::of(id, s.after, &s.row))
            .collect();
        rows.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        let mut back_across: Vec<String> = self.back_across().map(|(id, _)| id.clone()).collect();
        back_across.sort();
        Checkpoint { rows, back_across }
    }
}

/// A day's figures from its counts.
pub fn point(day: NaiveDate, counts: &Counts) -> DailyPoint {
    DailyPoint::of(day, &overview::from_counts(counts, Vec::new(), Vec::new()))
}

/// The last moment of `day`.
fn last_moment(day: NaiveDate) -> DateTime<Utc> {
    as_of::end_of(day) - Duration::microseconds(1)
}

static SWEEPING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn stored(
    pool: &PgPool,
    tenant_id: &str,
    from: NaiveDate,
    to: NaiveDate,
) -> anyhow::Result<BTreeMap<NaiveDate, Counts>> {
    let rows: Vec<(NaiveDate, sqlx::types::Json<Counts>)> = sqlx::query_as(
        "SELECT day, counts FROM overview_days WHERE tenant_id = $1 AND day BETWEEN $2 AND $3",
    )
    .bind(tenant_id)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
    .context("reading the Overview's days")?;
    Ok(rows.into_iter().map(|(d, c)| (d, c.0)).collect())
}

/// The latest stored checkpoint of the tenant at or before `day`, if one is
/// no more than [`LONGEST_SWEEP_DAYS`] before it.
pub(crate) async fn base(
    pool: &PgPool,
    tenant_id: &str,
    day: NaiveDate,
) -> anyhow::Result<Option<(NaiveDate, Checkpoint)>> {
    let row: Option<(NaiveDate, Vec<u8>)> = sqlx::query_as(
        "SELECT day, body FROM overview_checkpoints WHERE tenant_id = $1 AND day <= $2 AND day >= $3 \
         ORDER BY day DESC LIMIT 1",
    )
    .bind(tenant_id)
    .bind(day)
    .bind(day - Duration::days(LONGEST_SWEEP_DAYS))
    .fetch_optional(pool)
    .await
    .context("reading an Overview checkpoint")?;
    row.map(|(day, body)| {
        serde_json::from_slice::<Checkpoint>(&body)
            .map(|c| (day, c))
            .context("an Overview checkpoint does not parse")
    })
    .transpose()
}

/// Sweeps from `base` (a day and its checkpoint) to the end of `last`,
/// handing `each` every day after the base with the sweep at its end.
pub(crate) async fn sweep_from(
    pool: &PgPool,
    personal: &Personal,
    tenant_id: &str,
    (base_day, checkpoint): (NaiveDate, Checkpoint),
    last: NaiveDate,
    mut each: impl FnMut(NaiveDate, &Sweep) -> anyhow::Result<()>,
) -> anyhow::Result<Sweep> {
    let base_end = as_of::end_of(base_day);
    let later = as_of::later(
        pool,
        personal,
        tenant_id,
        &checkpoint,
        base_end,
        last_moment(last),
    )
    .await?;
    let mut sweep = Sweep::new(&checkpoint, base_end);
    sweep.add(&later);
    let mut day = base_day;
    while day < last {
        day = day.succ_opt().context("a day after")?;
        sweep.advance(as_of::end_of(day));
        each(day, &sweep)?;
    }
    Ok(sweep)
}

/// Computes and keeps the figures of the settled days `first..=last`, and
/// the checkpoint of `last`.
async fn sweep(
    pool: &PgPool,
    personal: &Personal,
    tenant_id: &str,
    first: NaiveDate,
    last: NaiveDate,
) -> anyhow::Result<()> {
    let start = first.pred_opt().context("a day before the first")?;
    let base = match base(pool, tenant_id, start).await? {
        Some(base) => base,
        None => (
            start,
            as_of::checkpoint(pool, personal, tenant_id, start).await?,
        ),
    };
    let base_day = base.0;
    let (mut days, mut counts) = (Vec::new(), Vec::new());
    let sweep = sweep_from(pool, personal, tenant_id, base, last, |day, sweep| {
        days.push(day);
        counts.push(serde_json::to_value(sweep.counts())?);
        Ok(())
    })
    .await?;
    sqlx::query(
        "INSERT INTO overview_days (tenant_id, day, counts) \
         SELECT $1, * FROM unnest($2::date[], $3::jsonb[]) ON CONFLICT DO NOTHING",
    )
    .bind(tenant_id)
    .bind(&days)
    .bind(&counts)
    .execute(pool)
    .await
    .context("keeping the Overview's days")?;
    if last > base_day {
        as_of::save(pool, tenant_id, last, &sweep.checkpoint()).await?;
    }
    Ok(())
}

/// The Overview's figures at the end of each day from `from` to `to`, when
/// it is `now`: settled days kept (computed on first asking), the day of
/// `now` and after from `live` (the live Overview's counts), and a day that
/// ended less than [`SETTLE`] ago as `as_of` its last moment answers.
pub async fn daily(
    pool: &PgPool,
    personal: &Personal,
    remembered: &as_of::Remembered,
    tenant_id: &str,
    (from, to): (NaiveDate, NaiveDate),
    now: DateTime<Utc>,
    live: &Counts,
) -> anyhow::Result<Vec<DailyPoint>> {
    let settled = (now - SETTLE)
        .date_naive()
        .pred_opt()
        .context("a settled day")?;
    let mut kept = stored(pool, tenant_id, from, to.min(settled)).await?;
    let missing: Vec<NaiveDate> = from
        .iter_days()
        .take_while(|d| *d <= to.min(settled))
        .filter(|d| !kept.contains_key(d))
        .collect();
    if let (Some(&first), Some(&last)) = (missing.first(), missing.last()) {
        // In a task of its own, so that a request given up on still leaves
        // the days for the next; one sweep at a time, and a request asking
        // meanwhile reads the days the one before it kept.
        let (pool_, personal, tenant) = (pool.clone(), personal.clone(), tenant_id.to_string());
        tokio::spawn(async move {
            let _sweeping = SWEEPING.lock().await;
            let kept = stored(&pool_, &tenant, first, last).await?;
            if first
                .iter_days()
                .take_while(|d| *d <= last)
                .any(|d| !kept.contains_key(&d))
            {
                sweep(&pool_, &personal, &tenant, first, last).await?;
            }
            anyhow::Ok(())
        })
        .await
        .context("keeping the Overview's days")??;
        kept = stored(pool, tenant_id, from, to.min(settled)).await?;
    }
    let today = now.date_naive();
    let mut points = Vec::new();
    for day in from.iter_days().take_while(|d| *d <= to) {
        points.push(match kept.get(&day) {
            Some(counts) => point(day, counts),
            None if day >= today => point(day, live),
            None if day > settled => {
                let o = as_of::overview_at(
                    pool,
                    personal,
                    remembered,
                    tenant_id,
                    last_moment(day),
                    now,
                )
                .await?;
                DailyPoint::of(day, &o)
            }
            None => anyhow::bail!("the Overview's figures of {day} were not kept"),
        });
    }
    Ok(points)
}
