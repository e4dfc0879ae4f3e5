//! The Overview an admin watches: enrollment rate, who is enrolled, pending or
//! not started, backup-code health, recent enrollments, roles without 2FA.
//! Computed by one pure function from directory rows, so the live answer (rows
//! from the read model) and the answer for any past moment (rows folded from
//! the events up to it) cannot drift apart.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use twofold_domain::user::{SecondFactorUse, TwoFactorState};

use crate::directory::{LastSignIn, UserRow};
use crate::record::{EventRecord, RecordExt, Typed};

/// Users with this many backup codes or fewer left count as running low.
pub const LOW_BACKUP_CODES: u32 = 2;
pub const RECENT_ENROLLMENTS: usize = 10;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overview {
    /// Users who sign in themselves (service accounts are not counted).
    pub active_users: u64,
    pub enrolled: u64,
    pub pending: u64,
    pub not_started: u64,
    /// Share of active users who completed enrollment, 0 to 1.
    pub enrollment_rate: f64,
    pub locked: u64,
    /// Enrolled users by the methods they have proved (`totp`, `email`,
    /// `sms`; a user may count under several).
    pub by_method: BTreeMap<String, u64>,
    pub backup_codes: BackupCodeHealth,
    pub recent_enrollments: Vec<RecentEnrollment>,
    pub roles_without_2fa: Vec<RoleGap>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackupCodeHealth {
    /// Enrolled users with no backup code left.
    pub none_left: u64,
    /// Enrolled users with 1 or 2 left.
    pub running_low: u64,
    /// Who they are, fewest codes first (to reach out to them).
    pub users: Vec<LowOnCodes>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LowOnCodes {
    pub user_id: String,
    pub username: String,
    pub left: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecentEnrollment {
    pub user_id: String,
    pub username: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoleGap {
    pub role: String,
    pub users: u64,
    pub not_enrolled: u64,
}

/// How many of the users low on backup codes the Overview names (fewest
/// codes first); the directory's `backup_codes=low` filter lists them all.
pub const LOW_ON_CODES_NAMED: usize = 50;

/// The count of users whose last sign-in passed a second factor (for the
/// rollout checklist's "tested" step; not an Overview figure).
pub const SECOND_FACTOR_USED: &str = "second_factor_used";

/// A tenant's Overview figures as counts by key (see [`tally`]).
pub type Counts = BTreeMap<String, i64>;

/// The counts one user's row adds one to: the Overview's figures are the
/// sums of these over the tenant's rows, so the live Overview keeps them per
/// tenant (`rm_overview_counts`) and moves them by what each change of a row
/// takes away and adds, and the figures for a past day are summed the same
/// way.
pub fn tally(row: &UserRow) -> Vec<String> {
    if row.service_account || row.user_id.is_empty() {
        return Vec::new();
    }
    let status = row.status();
    let enrolled = status == TwoFactorState::Enrolled;
    let mut keys = vec![
        "active_users".to_string(),
        match status {
            TwoFactorState::Enrolled => "enrolled",
            TwoFactorState::Pending => "pending",
            TwoFactorState::NotStarted => "not_started",
        }
        .to_string(),
    ];
    if row.locked {
        keys.push("locked".to_string());
    }
    for method in &row.verified_methods {
        keys.push(format!("method:{method}"));
    }
    // Recovery codes come with an authenticator.
    if row.two_factor == TwoFactorState::Enrolled {
        match row.backup_codes_left {
            0 => keys.push("codes:none".to_string()),
            n if n <= LOW_BACKUP_CODES => keys.push("codes:low".to_string()),
            _ => {}
        }
    }
    if let Some(LastSignIn {
        second_factor: SecondFactorUse::Used { .. },
        ..
    }) = row.last_sign_in
    {
        keys.push(SECOND_FACTOR_USED.to_string());
    }
    for role in &row.roles {
        keys.push(format!("role:{role}"));
        if !enrolled {
            keys.push(format!("role_not_enrolled:{role}"));
        }
    }
    keys
}

/// Adds `row`'s tally to `counts` `times` times (-1 takes it away).
pub fn count(counts: &mut Counts, row: &UserRow, times: i64) {
    for key in tally(row) {
        *counts.entry(key).or_default() += times;
    }
}

/// The Overview from its counts, the users low on codes (fewest first, at
/// most [`LOW_ON_CODES_NAMED`]) and the most recent enrollments (newest
/// first, at most [`RECENT_ENROLLMENTS`]).
pub fn from_counts(
    counts: &Counts,
    low_on_codes: Vec<LowOnCodes>,
    recent_enrollments: Vec<RecentEnrollment>,
) -> Overview {
    let n = |key: &str| u64::try_from(counts.get(key).copied().unwrap_or(0)).unwrap_or(0);
    let mut by_method: BTreeMap<String, u64> = ["totp", "email", "sms"]
        .into_iter()
        .map(|m| (m.to_string(), 0))
        .collect();
    let mut roles_without_2fa = Vec::new();
    for (key, _) in counts.iter().filter(|(_, v)| **v > 0) {
        if let Some(method) = key.strip_prefix("method:") {
            by_method.insert(method.to_string(), n(key));
        } else if let Some(role) = key.strip_prefix("role_not_enrolled:") {
            roles_without_2fa.push(RoleGap {
                role: role.to_string(),
                users: n(&format!("role:{role}")),
                not_enrolled: n(key),
            });
        }
    }
    let active_users = n("active_users");
    let enrolled = n("enrolled");
    Overview {
        active_users,
        enrolled,
        pending: n("pending"),
        not_started: n("not_started"),
        enrollment_rate: if active_users > 0 {
            enrolled as f64 / active_users as f64
        } else {
            0.0
        },
        locked: n("locked"),
        by_method,
        backup_codes: BackupCodeHealth {
            none_left: n("codes:none"),
            running_low: n("codes:low"),
            users: low_on_codes,
        },
        recent_enrollments,
        roles_without_2fa,
    }
}

pub fn compute<'a>(rows: impl IntoIterator<Item = &'a UserRow>) -> Overview {
    let mut counts = Counts::new();
    let mut low = Vec::new();
    let mut recent = Vec::new();
    for row in rows {
        count(&mut counts, row, 1);
        if row.service_account {
            continue;
        }
        if row.two_factor == TwoFactorState::Enrolled && row.backup_codes_left <= LOW_BACKUP_CODES {
            low.push(LowOnCodes {
                user_id: row.user_id.clone(),
                username: row.username.clone(),
                left: row.backup_codes_left,
            });
        }
        if let (TwoFactorState::Enrolled, Some(at)) = (row.status(), row.enrolled_at) {
            recent.push(RecentEnrollment {
                user_id: row.user_id.clone(),
                username: row.username.clone(),
                at,
            });
        }
    }
    low.sort_by(|a, b| {
        a.left
            .cmp(&b.left)
            .then_with(|| a.username.cmp(&b.username))
    });
    low.truncate(LOW_ON_CODES_NAMED);
    recent.sort_by(|a, b| b.at.cmp(&a.at).then_with(|| a.username.cmp(&b.username)));
    recent.truncate(RECENT_ENROLLMENTS);
    from_counts(&counts, low, recent)
}

/// The users [`compute`] names, of `rows`: those low on backup codes, and
/// those who may be among the recent enrollments (the newest, and any tied
/// with the last of them, since ties go by username). A caller holding rows
/// without usernames looks up these only; the others do not show.
pub fn named<'a>(rows: impl IntoIterator<Item = &'a UserRow>) -> Vec<&'a str> {
    let mut named = Vec::new();
    let mut enrolled: Vec<(DateTime<Utc>, &str)> = Vec::new();
    for row in rows {
        if row.service_account {
            continue;
        }
        if row.two_factor == TwoFactorState::Enrolled && row.backup_codes_left <= LOW_BACKUP_CODES {
            named.push(row.user_id.as_str());
        }
        if let (TwoFactorState::Enrolled, Some(at)) = (row.status(), row.enrolled_at) {
            enrolled.push((at, row.user_id.as_str()));
        }
    }
    if enrolled.len() > RECENT_ENROLLMENTS {
        let (_, &mut (cut, _), _) =
            enrolled.select_nth_unstable_by(RECENT_ENROLLMENTS - 1, |a, b| b.0.cmp(&a.0));
        enrolled.retain(|(at, _)| *at >= cut);
    }
    named.extend(enrolled.into_iter().map(|(_, id)| id));
    named
}

/// Folds the user events in `records` (one tenant's, in commit order) whose
/// time is at or before `until`.
pub fn fold_until(records: &[EventRecord], until: DateTime<Utc>) -> HashMap<String, UserRow> {
    let mut rows: HashMap<String, UserRow> = HashMap::new();
    for record in records {
        if record.aggregate_type != "user" {
            continue;
        }
        let Ok(Typed::User(event)) = record.typed() else {
            continue;
        };
        if event.ctx().at > until {
            continue;
        }
        rows.entry(record.aggregate_id.clone())
            .or_default()
            .apply(&event);
    }
    rows
}

/// The Overview as it stood at `at`.
pub fn as_of(records: &[EventRecord], at: DateTime<Utc>) -> Overview {
    compute(fold_until(records, at).values())
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DailyPoint {
    pub date: NaiveDate,
    pub active_users: u64,
    pub enrolled: u64,
    pub pending: u64,
    pub not_started: u64,
    pub enrollment_rate: f64,
    pub locked: u64,
}

impl DailyPoint {
    /// The day's point of the Overview at its end.
    pub fn of(date: NaiveDate, o: &Overview) -> Self {
        Self {
            date,
            active_users: o.active_users,
            enrolled: o.enrolled,
            pending: o.pending,
            not_started: o.not_started,
            enrollment_rate: o.enrollment_rate,
            locked: o.locked,
        }
    }
}
