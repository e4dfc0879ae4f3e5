//! Hourly budgets shared by every verifier through PostgreSQL: how many wrong
//! passwords one client address may send across accounts, and how many codes
//! may go to one recipient, one account or one address. A use is taken before
//! the work it pays for, in one atomic upsert, so parallel requests cannot
//! pass the budget together; a use that turns out not to count (a right
//! password) is given back.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use twofold_domain::tenant::TwoFactorSettings;
use twofold_domain::user::{NewContact, User, UserCommand, UserEvent};
use twofold_domain::values::Method;
use twofold_domain::{TenantId, UserId};

use crate::{App, AppError};

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Wrong passwords from one client address, across the tenant's accounts.
    PasswordsPerAddress,
    /// Codes sent to one email address or phone number.
    CodesPerRecipient,
    /// Codes sent for one account.
    CodesPerAccount,
    /// Codes sent for sign-ins from one client address.
    CodesPerAddress,
    /// Sign-ins from one client address for names that are no account: a
    /// count that refuses nothing. Writing it gives an unknown name's try
    /// the same commit an existing account's wrong password has (its
    /// event), so the two take the same time.
    UnknownNamesPerAddress,
}

impl Budget {
    fn as_str(self) -> &'static str {
        match self {
            Self::PasswordsPerAddress => "passwords_per_address",
            Self::CodesPerRecipient => "codes_per_recipient",
            Self::CodesPerAccount => "codes_per_account",
            Self::CodesPerAddress => "codes_per_address",
            Self::UnknownNamesPerAddress => "unknown_names_per_address",
        }
    }
}

/// A budget is spent: seconds until its window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    pub retry_after_secs: i64,
}

/// A use taken from a budget, to give back if it turns out not to count.
#[derive(Debug, Clone)]
pub struct Taken {
    tenant_id: TenantId,
    budget: Budget,
    key: String,
    window_start: DateTime<Utc>,
}

fn window_of(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::hours(1)).unwrap_or(at)
}

impl App {
    /// Takes one use of `budget` for `key` in the hour around `at`, unless
    /// `limit` uses are already taken.
    pub(crate) async fn take_budget(
        &self,
        tenant_id: TenantId,
        budget: Budget,
        key: &str,
        limit: u32,
        at: DateTime<Utc>,
    ) -> Result<Result<Taken, Spent>, AppError> {
        let window_start = window_of(at);
        let key = self.keys.budget_key(budget.as_str(), key);
        let taken: Option<i32> = sqlx::query_scalar(
            "INSERT INTO budgets (tenant_id, kind, key, window_start, used) VALUES ($1, $2, $3, $4, 1)
             ON CONFLICT (tenant_id, kind, key) DO UPDATE SET
                 used = CASE WHEN budgets.window_start < EXCLUDED.window_start THEN 1 ELSE budgets.used + 1 END,
                 window_start = GREATEST(budgets.window_start, EXCLUDED.window_start)
             WHERE budgets.window_start < EXCLUDED.window_start OR budgets.used < $5
             RETURNING used",
        )
        .bind(tenant_id.as_uuid())
        .bind(budget.as_str())
        .bind(&key)
        .bind(window_start)
        .bind(i32::try_from(limit).unwrap_or(i32::MAX))
        .fetch_optional(self.pool_for(budget))
        .await?;
        Ok(match taken {
            Some(_) => Ok(Taken {
                tenant_id,
                budget,
                key,
                window_start,
            }),
            None => Err(Spent {
                retry_after_secs: (window_start + TimeDelta::hours(1) - at)
                    .num_seconds()
                    .max(1),
            }),
        })
    }

    /// Where a budget is written: most on connections that do not wait for
    /// the WAL flush (a use lost in a crash costs nothing); the unknown
    /// names' count stands in for an existing account's event, so it waits
    /// for the same flush that event's commit does.
    fn pool_for(&self, budget: Budget) -> &sqlx::PgPool {
        match budget {
            Budget::UnknownNamesPerAddress => &self.pool,
            _ => &self.budgets_pool,
        }
    }

    /// Gives a use back: it did not count after all.
    pub(crate) async fn give_back(&self, taken: Taken) -> Result<(), AppError> {
        sqlx::query(
            "UPDATE budgets SET used = used - 1
             WHERE tenant_id = $1 AND kind = $2 AND key = $3 AND window_start = $4 AND used > 0",
        )
        .bind(taken.tenant_id.as_uuid())
        .bind(taken.budget.as_str())
        .bind(&taken.key)
        .bind(taken.window_start)
        .execute(self.pool_for(taken.budget))
        .await?;
        Ok(())
    }
}

/// Where a command's code goes when it is not to the user's own contact:
/// a new address or number being verified.
fn new_recipient(events: &[UserEvent]) -> Option<String> {
    events.iter().find_map(|e| match e {
        UserEvent::ContactVerificationStarted { contact, .. } => Some(match contact {
            NewContact::Email(e) => format!("email:{}", e.as_str()),
            NewContact::Phone(p) => format!("sms:{}", p.as_str()),
        }),
        _ => None,
    })
}

/// The code a command's events send, if any: its method.
fn code_sent(events: &[UserEvent]) -> Option<Method> {
    events.iter().find_map(|e| match e {
        UserEvent::ChallengeIssued { method, .. } | UserEvent::CodeResent { method, .. }
            if method.is_delivered() =>
        {
            Some(*method)
        }
        UserEvent::ChallengeMethodSwitched { to, .. } if to.is_delivered() => Some(*to),
        _ => None,
    })
}

/// Uses taken for a code about to be sent, settled once the command ran.
#[must_use]
pub(crate) struct CodeFee(Vec<Taken>);

impl App {
    /// Before `command` runs on `user`: if it would send a code, takes one use
    /// from the hourly budgets of codes for the account, for the recipient
    /// and for the client's address; refuses when any is spent.
    pub(crate) async fn pay_for_code(
        &self,
        tenant_id: TenantId,
        settings: &TwoFactorSettings,
        user_id: UserId,
        user: &User,
        command: &UserCommand,
        ip: Option<&str>,
    ) -> Result<CodeFee, AppError> {
        let at = self.now();
        let decided = user.decide(command.clone()).unwrap_or_default();
        let Some(method) = code_sent(&decided) else {
            return Ok(CodeFee(Vec::new()));
        };
        let recipient = new_recipient(&decided).or_else(|| match method {
            Method::Sms => user.phone.as_ref().map(|p| format!("sms:{}", p.as_str())),
            _ => user.email.as_ref().map(|e| format!("email:{}", e.as_str())),
        });
        let per_account = settings.codes_per_account_per_hour;
        let uses = [
            Some((Budget::CodesPerAccount, user_id.to_string(), per_account)),
            recipient.map(|r| (Budget::CodesPerRecipient, r, per_account)),
            ip.map(|ip| {
                (
                    Budget::CodesPerAddress,
                    ip.to_string(),
                    settings.codes_per_address_per_hour,
                )
            }),
        ];
        let mut taken = Vec::new();
        for (budget, key, limit) in uses.into_iter().flatten() {
            match self.take_budget(tenant_id, budget, &key, limit, at).await? {
                Ok(t) => taken.push(t),
                Err(spent) => {
                    for t in taken {
                        self.give_back(t).await?;
                    }
                    metrics::counter!("twofold_code_limit_reached_total", "budget" => budget.as_str())
                        .increment(1);
                    return Err(AppError::CodeLimitReached {
                        retry_after_secs: spent.retry_after_secs,
                    });
                }
            }
        }
        Ok(CodeFee(taken))
    }

    /// After the command ran: uses it did not need (no code went out, or it
    /// failed) are given back.
    pub(crate) async fn settle(&self, fee: CodeFee, events: Option<&[UserEvent]>) {
        if events.and_then(code_sent).is_some() {
            return;
        }
        for t in fee.0 {
            if let Err(e) = self.give_back(t).await {
                tracing::warn!(error = %e, "a code budget's use could not be given back");
            }
        }
    }
}
