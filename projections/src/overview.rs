//! The Overview an admin watches: enrollment rate, who is enrolled, pending or
//! not started, backup-code health, recent enrollments, roles without 2FA.
//! Computed by one pure function from directory rows, so the live answer (rows
//! from the read model) and the answer for any past moment (rows folded from
//! the events up to it) cannot drift apart.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Serialize;
use twofold_domain::user::TwoFactorState;

use crate::directory::UserRow;
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

pub fn compute<'a>(rows: impl IntoIterator<Item = &'a UserRow>) -> Overview {
    let mut o = Overview {
        active_users: 0,
        enrolled: 0,
        pending: 0,
        not_started: 0,
        enrollment_rate: 0.0,
        locked: 0,
        by_method: ["totp", "email", "sms"]
            .into_iter()
            .map(|m| (m.to_string(), 0))
            .collect(),
        backup_codes: BackupCodeHealth {
            none_left: 0,
            running_low: 0,
            users: Vec::new(),
        },
        recent_enrollments: Vec::new(),
        roles_without_2fa: Vec::new(),
    };
    let mut roles: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for row in rows {
        if row.service_account {
            continue;
        }
        o.active_users += 1;
        let status = row.status();
        let enrolled = status == TwoFactorState::Enrolled;
        match status {
            TwoFactorState::Enrolled => o.enrolled += 1,
            TwoFactorState::Pending => o.pending += 1,
            TwoFactorState::NotStarted => o.not_started += 1,
        }
        if row.locked {
            o.locked += 1;
        }
        for method in &row.verified_methods {
            *o.by_method.entry(method.clone()).or_default() += 1;
        }
        // Recovery codes come with an authenticator.
        if row.two_factor == TwoFactorState::Enrolled {
            let left = row.backup_codes_left;
            match left {
                0 => o.backup_codes.none_left += 1,
                n if n <= LOW_BACKUP_CODES => o.backup_codes.running_low += 1,
                _ => {}
            }
            if left <= LOW_BACKUP_CODES {
                o.backup_codes.users.push(LowOnCodes {
                    user_id: row.user_id.clone(),
                    username: row.username.clone(),
                    left,
                });
            }
        }
        if enrolled {
            if let Some(at) = row.enrolled_at {
                o.recent_enrollments.push(RecentEnrollment {
                    user_id: row.user_id.clone(),
                    username: row.username.clone(),
                    at,
                });
            }
        }
        for role in &row.roles {
            let entry = roles.entry(role.as_str()).or_default();
            entry.0 += 1;
            if !enrolled {
                entry.1 += 1;
            }
        }
    }
    if o.active_users > 0 {
        o.enrollment_rate = o.enrolled as f64 / o.active_users as f64;
    }
    o.backup_codes.users.sort_by(|a, b| {
        a.left
            .cmp(&b.left)
            .then_with(|| a.username.cmp(&b.username))
    });
    o.recent_enrollments
        .sort_by(|a, b| b.at.cmp(&a.at).then_with(|| a.username.cmp(&b.username)));
    o.recent_enrollments.truncate(RECENT_ENROLLMENTS);
    o.roles_without_2fa = roles
        .into_iter()
        .filter(|(_, (_, not_enrolled))| *not_enrolled > 0)
        .map(|(role, (users, not_enrolled))| RoleGap {
            role: role.to_string(),
            users,
            not_enrolled,
        })
        .collect();
    o
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

/// The Overview's figures at the end of each day from `from` to `to` (UTC).
pub fn daily(records: &[EventRecord], from: NaiveDate, to: NaiveDate) -> Vec<DailyPoint> {
    let mut points = Vec::new();
    let mut rows: HashMap<String, UserRow> = HashMap::new();
    let mut user_events = records
        .iter()
        .filter(|r| r.aggregate_type == "user")
        .filter_map(|r| match r.typed() {
            Ok(Typed::User(e)) => Some((r.aggregate_id.clone(), e)),
            _ => None,
        })
        .peekable();
    let mut day = from;
    while day <= to {
        let end_of_day = day
            .and_hms_opt(0, 0, 0)
            .map(|d| d.and_utc() + Duration::days(1));
        let Some(end) = end_of_day else { break };
        while let Some((_, e)) = user_events.peek() {
            if e.ctx().at >= end {
                break;
            }
            if let Some((id, e)) = user_events.next() {
                rows.entry(id).or_default().apply(&e);
            }
        }
        let o = compute(rows.values());
        points.push(DailyPoint {
            date: day,
            active_users: o.active_users,
            enrolled: o.enrolled,
            pending: o.pending,
            not_started: o.not_started,
            enrollment_rate: o.enrollment_rate,
            locked: o.locked,
        });
        match day.succ_opt() {
            Some(next) => day = next,
            None => break,
        }
    }
    points
}
