//! What the admin console needs beyond the API's reports: a settings change's
//! effect before it is saved, the rollout checklist computed from state, how
//! fresh the read models are, and an audit search.

use futures::StreamExt;
use serde::Serialize;
use twofold_domain::tenant::settings::{Enforcement, Enrollment, MaxInvalidAttempts, Scope};
use twofold_domain::tenant::TwoFactorSettings;
use twofold_domain::user::{SecondFactorUse, TwoFactorState};
use twofold_domain::values::{Method, Role};
use twofold_projections::audit::AuditEntry;
use twofold_projections::directory::UserRow;
use twofold_projections::queries::{self, AuditQuery, Freshness};

use crate::session::{AdminSession, ReaderSession};
use crate::{App, AppError, Origin};

/// Email and SMS codes valid longer than this are flagged as weak.
const STRONG_CODE_MINUTES: i64 = 10;

/// What saving proposed settings would do, from the directory as it stands.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SettingsPreview {
    /// Active users who would be asked for a second factor at sign-in.
    pub asked: u64,
    /// Of those, who has a method the settings allow.
    pub with_method: u64,
    /// Who would be sent to set up an authenticator at their next sign-in.
    pub to_enroll: u64,
    /// Who has nothing usable and nothing they could set up: their sign-in
    /// would be refused.
    pub without_method: u64,
    /// Admins (by username) with no method the settings allow.
    pub admins_without_factor: Vec<String>,
    /// Whether the admin saving could no longer pass the console's
    /// second-factor check (a change that is refused).
    pub locks_you_out: bool,
    /// Whether the admin saving must sign in again with a second factor to
    /// keep using the console.
    pub you_sign_in_again: bool,
    /// Choices that are allowed but weak, in words.
    pub warnings: Vec<&'static str>,
}

/// The weak choices among `settings`.
pub fn warnings(settings: &TwoFactorSettings) -> Vec<&'static str> {
    let mut out = Vec::new();
    let delivered = settings.allows(Method::Email) || settings.allows(Method::Sms);
    if delivered && settings.code_timeout.duration().num_minutes() > STRONG_CODE_MINUTES {
        out.push("Email and SMS codes stay valid for longer than 10 minutes: a code read from a stolen mailbox or phone keeps working. 5 or 10 minutes is usual.");
    }
    if settings.max_invalid_attempts == MaxInvalidAttempts::Unlimited {
        out.push("No limit on wrong codes: guessing is slowed, not stopped, until 100 wrong codes in a row. 3 to 10 is usual.");
    }
    if !settings.enabled {
        out.push("Two-factor authentication is off: nobody is asked for a second factor.");
    }
    if settings.enforcement == Enforcement::UnrecognizedDevices && settings.trust_known_ips {
        out.push("Known addresses skip the second factor: everyone behind the same office NAT or VPN shares one, so after one colleague passes it the others sign in with a password alone.");
    }
    out
}

fn in_scope(settings: &TwoFactorSettings, row: &UserRow) -> bool {
    match &settings.scope {
        Scope::AllUsers => true,
        Scope::SelectedRoles { roles } => roles.iter().any(|r| row.roles.contains(r.as_str())),
        Scope::PerUser => row.switched_on,
        Scope::Voluntary => row.opted_in,
    }
}

fn usable(settings: &TwoFactorSettings, row: &UserRow) -> bool {
    row.methods()
        .iter()
        .any(|m| settings.allowed_methods.iter().any(|a| a.as_str() == *m))
}

/// One step of the rollout checklist, done or not, with why.
#[derive(Debug, Clone, Serialize)]
pub struct ChecklistItem {
    pub step: &'static str,
    pub done: bool,
    pub detail: String,
}

impl App {
    /// What saving `proposed` would do; the settings come back validated.
    #[tracing::instrument(skip_all)]
    pub async fn preview_settings(
        &self,
        admin: &AdminSession,
        proposed: TwoFactorSettings,
    ) -> Result<(TwoFactorSettings, SettingsPreview), AppError> {
        let settings = proposed
            .validated()
            .map_err(|e| AppError::from(twofold_domain::tenant::TenantError::InvalidSettings(e)))?;
        let rows = queries::users(&self.pool, &admin.tenant_id().to_string()).await?;
        let mut preview = SettingsPreview {
            warnings: warnings(&settings),
            ..SettingsPreview::default()
        };
        // Sent to set up an authenticator: everyone without one where it is
        // required, and anyone with no usable method where it is allowed.
        let required = settings.enrollment == Enrollment::Required;
        let can_enroll = settings.allows(Method::Totp);
        for row in rows.iter().filter(|r| !r.service_account) {
            let has = usable(&settings, row);
            if row.roles.contains(Role::ADMIN) && !has {
                preview.admins_without_factor.push(row.username.clone());
            }
            if !settings.enabled || !in_scope(&settings, row) {
                continue;
            }
            preview.asked += 1;
            if has {
                preview.with_method += 1;
            }
            let totp_enrolled = row.two_factor == TwoFactorState::Enrolled;
            if can_enroll && ((required && !totp_enrolled) || !has) {
                preview.to_enroll += 1;
            } else if !has {
                preview.without_method += 1;
            }
        }
        let me = &admin.0;
        let my_row = rows.iter().find(|r| r.user_id == me.user_id.to_string());
        let asked_of_me = settings.enabled && my_row.is_none_or(|r| in_scope(&settings, r));
        if asked_of_me {
            let mine = me.user.available_methods(&settings);
            preview.locks_you_out = mine.is_empty() && !can_enroll;
            preview.you_sign_in_again = !matches!(me.second_factor, SecondFactorUse::Used { .. });
        }
        Ok((settings, preview))
    }

    /// Saves settings from the console: a reason is required, and a change
    /// that would leave the admin saving it unable to pass the console's
    /// second-factor check is refused.
    #[tracing::instrument(skip_all)]
    pub async fn save_settings_checked(
        &self,
        admin: &AdminSession,
        proposed: TwoFactorSettings,
        reason: Option<String>,
        origin: &Origin,
    ) -> Result<TwoFactorSettings, AppError> {
        if reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
            return Err(twofold_domain::user::UserError::ReasonRequired.into());
        }
        let (settings, preview) = self.preview_settings(admin, proposed).await?;
        if preview.locks_you_out {
            return Err(AppError::WouldLockYouOut);
        }
        self.put_settings(admin, settings, reason, origin).await
    }

    /// Refuses settings under which no admin could pass a second factor any
    /// more: neither the admin saving them (from their own state) nor any
    /// other admin (from the directory) has a method they allow, and the
    /// authenticator, which anyone could set up at sign-in, is not allowed.
    pub(crate) async fn keep_an_admin_able_to_sign_in(
        &self,
        admin: &AdminSession,
        settings: &TwoFactorSettings,
    ) -> Result<(), AppError> {
        if !settings.enabled || settings.allows(Method::Totp) {
            return Ok(());
        }
        if !admin.0.user.available_methods(settings).is_empty() {
            return Ok(());
        }
        let rows = queries::users(&self.pool, &admin.tenant_id().to_string()).await?;
        let me = admin.0.user_id.to_string();
        let another = rows.iter().any(|r| {
            r.user_id != me
                && r.roles.contains(Role::ADMIN)
                && (!in_scope(settings, r) || usable(settings, r))
        });
        if another {
            Ok(())
        } else {
            Err(AppError::WouldLockYouOut)
        }
    }

    /// The rollout checklist (from the seeds' checklist), from state.
    #[tracing::instrument(skip_all)]
    pub async fn checklist(&self, reader: &ReaderSession) -> Result<Vec<ChecklistItem>, AppError> {
        let tenant_key = reader.tenant_id().to_string();
        let settings = &reader.0.tenant.settings;
        let admins = queries::admins(&self.pool, &tenant_key).await?;
        let changes = self.tenants.load_versioned(&tenant_key).await?.sequence - 1;
        let admins_ready = admins
            .iter()
            .filter(|r| {
                r.two_factor == twofold_domain::user::TwoFactorState::Enrolled
                    || usable(settings, r)
            })
            .count();
        let tested = queries::overview_counts(&self.pool, &tenant_key)
            .await?
            .get(twofold_projections::overview::SECOND_FACTOR_USED)
            .is_some_and(|n| *n > 0);
        let methods: Vec<&str> = settings
            .allowed_methods
            .iter()
            .map(|m| m.as_str())
            .collect();
        Ok(vec![
            ChecklistItem {
                step: "Verification methods chosen and 2FA turned on",
                done: settings.enabled,
                detail: format!(
                    "{}; methods: {}",
                    if settings.enabled {
                        "2FA is on"
                    } else {
                        "2FA is off"
                    },
                    methods.join(", ")
                ),
            },
            ChecklistItem {
                step: "SMS provider set",
                done: !settings.allows(Method::Sms) || settings.sms_provider.is_some(),
                detail: match (&settings.sms_provider, settings.allows(Method::Sms)) {
                    (Some(p), _) => format!("provider {p}"),
                    (None, true) => "SMS is allowed but no provider is selected".to_string(),
                    (None, false) => "not needed: SMS is not allowed".to_string(),
                },
            },
            ChecklistItem {
                step: "Enrollment policy decided",
                done: changes > 0,
                detail: format!(
                    "authenticator enrollment {}; settings changed {changes} time{}",
                    if settings.enrollment == Enrollment::Required {
                        "required"
                    } else {
                        "optional"
                    },
                    if changes == 1 { "" } else { "s" }
                ),
            },
            ChecklistItem {
                step: "Admins enrolled",
                done: !admins.is_empty() && admins_ready == admins.len(),
                detail: format!(
                    "{admins_ready} of {} admins can pass a second factor",
                    admins.len()
                ),
            },
            ChecklistItem {
                step: "Tested with a user before rolling out",
                done: tested,
                detail: if tested {
                    "someone has signed in with a second factor".to_string()
                } else {
                    "nobody has signed in with a second factor yet: try it with a test user or a small role first".to_string()
                },
            },
        ])
    }

    /// How fresh the read models are.
    #[tracing::instrument(skip_all)]
    pub async fn freshness(&self) -> Result<Vec<Freshness>, AppError> {
        Ok(queries::freshness(&self.pool).await?)
    }

    /// The newest `limit` audit entries matching `q`, newest first.
    #[tracing::instrument(skip_all)]
    pub async fn audit_search(
        &self,
        reader: &ReaderSession,
        origin: &crate::Origin,
        q: &AuditQuery,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, AppError> {
        self.record_read(
            reader,
            origin,
            twofold_domain::user::AuditedRead::AuditSearch {
                filter: crate::reports::read_filter(q),
            },
        )
        .await?;
        let tenant = reader.tenant_id().to_string();
        let mut entries: Vec<AuditEntry> = Vec::new();
        let mut stream = queries::audit(&self.pool, &tenant, q);
        while let Some(entry) = stream.next().await {
            entries.push(entry?);
        }
        entries.reverse();
        entries.truncate(limit);
        self.open_entries(&mut entries).await?;
        Ok(entries)
    }

    /// Every user row of the tenant, for pages that list beyond a page.
    #[tracing::instrument(skip_all)]
    pub async fn user_rows(&self, reader: &ReaderSession) -> Result<Vec<UserRow>, AppError> {
        Ok(queries::users(&self.pool, &reader.tenant_id().to_string()).await?)
    }
}
