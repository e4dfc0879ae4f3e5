//! What a tenant's admin does: users, their factors and sessions, and the
//! tenant's two-factor settings. Every action on a user carries the admin as
//! actor and the reason given.

use chrono::{DateTime, Utc};
use serde::Serialize;
use twofold_domain::tenant::TwoFactorSettings;
use twofold_domain::user::{SecondFactorUse, User, UserCommand, UserError};
use twofold_domain::values::{Email, Phone, Role};
use twofold_domain::{Ctx, SessionId, TenantId, UserId};
use twofold_projections::directory::LastSignIn;

use crate::accounts::NewUser;
use crate::me::Profile;
use crate::session::{AdminSession, ReaderSession};
use crate::{backup_codes, App, AppError, Origin};

/// A user as an admin sees them: what they see of themselves, and more.
#[derive(Debug, Serialize)]
pub struct UserDetail {
    #[serde(flatten)]
    pub profile: Profile,
    pub two_factor_switched_on: bool,
    pub locked: bool,
    pub failures: u32,
    pub active_sessions: usize,
    pub remembered_devices: usize,
    /// Live sessions, oldest first.
    pub sessions: Vec<SessionView>,
    pub devices: Vec<DeviceView>,
    /// From the directory read model (it may lag a little).
    pub last_sign_in: Option<LastSignIn>,
}

/// What an admin can do to a user with one click (and a reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserAction {
    /// The user enrolls again; their sessions and remembered devices end.
    ResetEnrollment,
    /// Ends a lockout.
    Unlock,
    /// Ends the user's sessions and remembered devices.
    RevokeSessions,
    /// Forgets one remembered device: its next sign-in asks a second factor.
    ForgetDevice(uuid::Uuid),
}

#[derive(Debug, Serialize)]
pub struct SessionView {
    pub session_id: SessionId,
    pub started_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub second_factor: SecondFactorUse,
}

#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub device_id: uuid::Uuid,
    pub remembered_at: DateTime<Utc>,
}

impl UserAction {
    /// The command that carries the action out.
    pub fn command(self, ctx: Ctx) -> UserCommand {
        match self {
            UserAction::ResetEnrollment => UserCommand::ResetEnrollment { ctx },
            UserAction::Unlock => UserCommand::Unlock { ctx },
            UserAction::RevokeSessions => UserCommand::RevokeSessions {
                forget_devices: true,
                ctx,
            },
            UserAction::ForgetDevice(device_id) => UserCommand::ForgetDevice { device_id, ctx },
        }
    }
}

/// A change to a user; absent fields stay as they are.
#[derive(Debug, Default)]
pub struct UserUpdate {
    pub roles: Option<Vec<String>>,
    /// `Some(None)` clears it.
    pub email: Option<Option<String>>,
    pub phone: Option<Option<String>>,
    pub service_account: Option<bool>,
    /// Switches 2FA on or off for this user (scope "per user").
    pub two_factor_switched_on: Option<bool>,
    /// The method asked first (`Some(None)`: the tenant's default).
    pub preferred_method: Option<Option<String>>,
    pub reason: Option<String>,
}

fn admin_ctx(app: &App, origin: &Origin, admin: &AdminSession, reason: Option<String>) -> Ctx {
    let mut ctx = origin.ctx(app.now(), admin.actor());
    ctx.reason = reason.filter(|r| !r.trim().is_empty());
    ctx
}

/// A field to set, clear (empty or null) or leave.
fn change<T>(
    raw: Option<Option<String>>,
    parse: impl Fn(&str) -> Result<T, twofold_domain::values::ValueError>,
) -> Result<Option<Option<T>>, AppError> {
    Ok(raw
        .map(|v| v.filter(|s| !s.is_empty()).map(|s| parse(&s)).transpose())
        .transpose()?)
}

impl App {
    /// The user an admin names, in the admin's tenant.
    async fn target(
        &self,
        admin: &AdminSession,
        raw_user: &str,
    ) -> Result<(UserId, User), AppError> {
        self.user_named(admin.tenant_id(), raw_user).await
    }

    /// A user of `tenant_id` by the id written in a request.
    pub(crate) async fn user_named(
        &self,
        tenant_id: TenantId,
        raw_user: &str,
    ) -> Result<(UserId, User), AppError> {
        let user_id: UserId = raw_user.parse().map_err(|_| AppError::UserNotFound)?;
        let user = self.users.load(&user_id.to_string()).await?;
        if user.tenant_id != Some(tenant_id) {
            return Err(AppError::UserNotFound);
        }
        if user.erased {
            return Err(AppError::UserErased);
        }
        if !user.exists() {
            return Err(AppError::UserNotFound);
        }
        Ok((user_id, user))
    }

    /// Runs one admin command on the user named.
    async fn admin_command(
        &self,
        admin: &AdminSession,
        raw_user: &str,
        reason: Option<String>,
        origin: &Origin,
        command: impl Fn(Ctx) -> UserCommand,
    ) -> Result<(), AppError> {
        let (user_id, _) = self.target(admin, raw_user).await?;
        let ctx = admin_ctx(self, origin, admin, reason);
        self.users
            .execute(&user_id.to_string(), |_| Ok(command(ctx.clone())))
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    pub async fn admin_create_user(
        &self,
        admin: &AdminSession,
        new: NewUser,
        origin: &Origin,
    ) -> Result<UserId, AppError> {
        let ctx = origin.ctx(self.now(), admin.actor());
        self.create_user(admin.tenant_id(), new, ctx).await
    }

    #[tracing::instrument(skip_all)]
    pub async fn settings(&self, admin: &AdminSession) -> Result<TwoFactorSettings, AppError> {
        Ok(self
            .tenant(&admin.tenant_id().to_string())
            .await?
            .1
            .settings)
    }

    #[tracing::instrument(skip_all)]
    pub async fn put_settings(
        &self,
        admin: &AdminSession,
        settings: TwoFactorSettings,
        reason: Option<String>,
        origin: &Origin,
    ) -> Result<TwoFactorSettings, AppError> {
        let ctx = admin_ctx(self, origin, admin, reason);
        self.keep_an_admin_able_to_sign_in(admin, &settings).await?;
        self.change_settings(admin.tenant_id(), settings, ctx).await
    }

    /// A user as an admin sees them; the read is recorded.
    #[tracing::instrument(skip_all)]
    pub async fn user_detail(
        &self,
        reader: &ReaderSession,
        origin: &Origin,
        raw_user: &str,
    ) -> Result<UserDetail, AppError> {
        self.record_read(
            reader,
            origin,
            twofold_domain::user::AuditedRead::UserDetail {
                user_id: raw_user.to_string(),
            },
        )
        .await?;
        self.user_detail_in(reader.tenant_id(), raw_user).await
    }

    /// A user's console page: their detail and timeline, recorded as one read.
    #[tracing::instrument(skip_all)]
    pub async fn user_page(
        &self,
        reader: &ReaderSession,
        origin: &Origin,
        raw_user: &str,
    ) -> Result<(UserDetail, Vec<twofold_projections::audit::AuditEntry>), AppError> {
        self.record_read(
            reader,
            origin,
            twofold_domain::user::AuditedRead::UserPage {
                user_id: raw_user.to_string(),
            },
        )
        .await?;
        let detail = self.user_detail_in(reader.tenant_id(), raw_user).await?;
        let history = self.user_history_in(reader, raw_user).await?;
        Ok((detail, history))
    }

    /// A user of `tenant_id` as an admin sees them.
    pub(crate) async fn user_detail_in(
        &self,
        tenant_id: TenantId,
        raw_user: &str,
    ) -> Result<UserDetail, AppError> {
        let (user_id, u) = self.user_named(tenant_id, raw_user).await?;
        let now = self.now();
        let last_sign_in = twofold_projections::queries::user(
            &self.pool,
            &tenant_id.to_string(),
            &user_id.to_string(),
        )
        .await?
        .and_then(|row| row.last_sign_in);
        Ok(UserDetail {
            profile: Profile::of(user_id, &u),
            two_factor_switched_on: u.two_factor_switched_on,
            locked: u.lockout.is_locked(),
            failures: u.lockout.failures(),
            active_sessions: u.sessions.values().filter(|s| now < s.expires_at).count(),
            remembered_devices: u.devices.len(),
            sessions: u
                .sessions
                .iter()
                .filter(|(_, s)| now < s.expires_at)
                .map(|(id, s)| SessionView {
                    session_id: *id,
                    started_at: s.started_at,
                    expires_at: s.expires_at,
                    second_factor: s.second_factor,
                })
                .collect(),
            devices: u
                .devices
                .iter()
                .map(|(id, d)| DeviceView {
                    device_id: *id,
                    remembered_at: d.remembered_at,
                })
                .collect(),
            last_sign_in,
        })
    }

    #[tracing::instrument(skip_all)]
    pub async fn update_user(
        &self,
        admin: &AdminSession,
        raw_user: &str,
        update: UserUpdate,
        origin: &Origin,
    ) -> Result<(), AppError> {
        let (user_id, _) = self.target(admin, raw_user).await?;
        let roles = update
            .roles
            .map(|r| {
                r.iter()
                    .map(|r| Role::parse(r))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let email = change(update.email, Email::parse)?;
        let phone = change(update.phone, Phone::parse)?;
        let ctx = admin_ctx(self, origin, admin, update.reason);
        if ctx.reason.is_none() {
            return Err(UserError::ReasonRequired.into());
        }
        let tenant_enabled = admin.0.tenant.settings.enabled;
        // Check the switch first, so a refused switch leaves the profile untouched.
        if update.two_factor_switched_on == Some(true) && !tenant_enabled {
            return Err(UserError::TwoFactorUnavailable.into());
        }
        let service_account = update.service_account;
        if roles.is_some() || email.is_some() || phone.is_some() || service_account.is_some() {
            self.users
                .execute(&user_id.to_string(), |_| {
                    Ok(UserCommand::Update {
                        roles: roles.clone(),
                        email: email.clone(),
                        phone: phone.clone(),
                        service_account,
                        ctx: ctx.clone(),
                    })
                })
                .await?;
        }
        if let Some(preferred) = &update.preferred_method {
            let method = preferred
                .as_deref()
                .filter(|m| !m.is_empty())
                .map(twofold_domain::values::Method::parse)
                .transpose()?;
            self.users
                .execute(&user_id.to_string(), |_| {
                    Ok(UserCommand::SetPreferredMethod {
                        method,
                        ctx: ctx.clone(),
                    })
                })
                .await?;
        }
        if let Some(on) = update.two_factor_switched_on {
            self.users
                .execute(&user_id.to_string(), |_| {
                    Ok(UserCommand::SwitchTwoFactor {
                        on,
                        tenant_enabled,
                        ctx: ctx.clone(),
                    })
                })
                .await?;
        }
        Ok(())
    }

    /// One of the admin's actions on a user, with the reason given.
    #[tracing::instrument(skip_all)]
    pub async fn act_on_user(
        &self,
        admin: &AdminSession,
        raw_user: &str,
        action: UserAction,
        reason: Option<String>,
        origin: &Origin,
    ) -> Result<(), AppError> {
        self.admin_command(admin, raw_user, reason, origin, |ctx| action.command(ctx))
            .await
    }

    /// A one-time password for a user who lost theirs, to hand over: they
    /// must change it at their next sign-in (which still asks the second
    /// factor); their sessions end.
    #[tracing::instrument(skip_all)]
    pub async fn reset_password(
        &self,
        admin: &AdminSession,
        raw_user: &str,
        reason: Option<String>,
        origin: &Origin,
    ) -> Result<String, AppError> {
        use rand::distributions::{Alphanumeric, DistString};
        let (user_id, _) = self.target(admin, raw_user).await?;
        let ctx = admin_ctx(self, origin, admin, reason);
        if ctx.reason.is_none() {
            return Err(UserError::ReasonRequired.into());
        }
        let password = Alphanumeric.sample_string(&mut rand::rngs::OsRng, 20);
        let new_hash = self
            .passwords
            .hash(&secrecy::SecretString::from(password.clone()))
            .await?;
        self.users
            .execute(&user_id.to_string(), |_| {
                Ok(UserCommand::ResetPassword {
                    new_hash: new_hash.clone(),
                    ctx: ctx.clone(),
                })
            })
            .await?;
        Ok(password)
    }

    /// An admin sends the user a link (by email) to choose a new password;
    /// it works once, for an hour. Answers when it expires.
    #[tracing::instrument(skip_all)]
    pub async fn send_reset_link(
        &self,
        admin: &AdminSession,
        raw_user: &str,
        reason: Option<String>,
        origin: &Origin,
    ) -> Result<chrono::DateTime<chrono::Utc>, AppError> {
        let (user_id, _) = self.target(admin, raw_user).await?;
        let ctx = admin_ctx(self, origin, admin, reason);
        let expires_at = ctx.at + chrono::Duration::hours(crate::accounts::RESET_LINK_HOURS);
        let reset_id = uuid::Uuid::new_v4();
        self.users
            .execute(&user_id.to_string(), |_| {
                Ok(UserCommand::IssueResetLink {
                    reset_id,
                    expires_at,
                    ctx: ctx.clone(),
                })
            })
            .await?;
        Ok(expires_at)
    }

    /// "Login As": a short session as the user, to test what they see. Needs
    /// the tenant to allow it, a reason, and this admin session to have
    /// confirmed a factor just now (a step-up); every event of the session is
    /// marked with the admin.
    #[tracing::instrument(skip_all)]
    pub async fn login_as(
        &self,
        admin: &AdminSession,
        raw_user: &str,
        reason: Option<String>,
        origin: &Origin,
    ) -> Result<crate::auth::SignedIn, AppError> {
        if !admin.0.stepped_up {
            return Err(UserError::StepUpRequired.into());
        }
        let (user_id, _) = self.target(admin, raw_user).await?;
        let ctx = admin_ctx(self, origin, admin, reason);
        if ctx.reason.is_none() {
            return Err(UserError::ReasonRequired.into());
        }
        let (token, session) = crate::auth::new_session_for(user_id);
        let settings = admin.0.tenant.settings.clone();
        let events = self
            .users
            .execute(&user_id.to_string(), |_| {
                Ok(UserCommand::StartLoginAs {
                    session: session.clone(),
                    settings: settings.clone(),
                    ctx: ctx.clone(),
                })
            })
            .await?;
        crate::auth::signed_in_by(token, &events)
            .ok_or_else(|| AppError::unexpected(anyhow::anyhow!("login as opened no session")))
    }

    /// Erases a user (GDPR art. 17): needs a reason and a step-up, like
    /// Login As. `UserErased` (the admin and the reason, nothing of the
    /// user's) is appended and, in the same transaction, the user's data key,
    /// snapshots and username claim are deleted: every personal value sealed
    /// in their events (here, in NATS, in exports) reads `[erased]` from
    /// then on, and the account can no longer sign in. An admin cannot erase
    /// themselves.
    #[tracing::instrument(skip_all)]
    pub async fn erase_user(
        &self,
        admin: &AdminSession,
        raw_user: &str,
        reason: Option<String>,
        origin: &Origin,
    ) -> Result<(), AppError> {
        if !admin.0.stepped_up {
            return Err(UserError::StepUpRequired.into());
        }
        let (user_id, _) = self.target(admin, raw_user).await?;
        if admin.actor() == twofold_domain::Actor::Admin(user_id) {
            return Err(UserError::CannotChangeOwnFactor.into());
        }
        let ctx = admin_ctx(self, origin, admin, reason);
        if ctx.reason.is_none() {
            return Err(UserError::ReasonRequired.into());
        }
        self.erase(user_id, ctx).await
    }

    /// Erases `user_id` (see [`App::erase_user`]), recorded with `ctx`: the
    /// console's, the API's and the operator's erasure.
    pub(crate) async fn erase(&self, user_id: UserId, ctx: Ctx) -> Result<(), AppError> {
        self.users
            .erase(&user_id.to_string(), |_| {
                Ok(UserCommand::Erase { ctx: ctx.clone() })
            })
            .await?;
        Ok(())
    }

    /// New codes for a user who lost theirs, shown to the admin once to hand over.
    #[tracing::instrument(skip_all)]
    pub async fn regenerate_backup_codes_for(
        &self,
        admin: &AdminSession,
        raw_user: &str,
        reason: Option<String>,
        origin: &Origin,
    ) -> Result<Vec<String>, AppError> {
        let (user_id, _) = self.target(admin, raw_user).await?;
        let (codes, hashes) = backup_codes::issue(&self.keys, user_id.as_uuid().as_bytes())?;
        self.admin_command(admin, raw_user, reason, origin, |ctx| {
            UserCommand::RegenerateBackupCodes {
                backup_codes: hashes.clone(),
                step_up: None,
                ctx,
            }
        })
        .await?;
        Ok(codes)
    }

    /// Ends every session of the tenant (remembered devices stay); answers
    /// how many users were signed out.
    #[tracing::instrument(skip_all)]
    pub async fn revoke_all_sessions(
        &self,
        admin: &AdminSession,
        reason: Option<String>,
        origin: &Origin,
    ) -> Result<usize, AppError> {
        let ctx = admin_ctx(self, origin, admin, reason);
        if ctx.reason.is_none() {
            return Err(UserError::ReasonRequired.into());
        }
        let users: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT user_id FROM usernames WHERE tenant_id = $1 ORDER BY user_id",
        )
        .bind(admin.tenant_id().as_uuid())
        .fetch_all(&self.pool)
        .await?;
        let mut signed_out = 0;
        for user in users {
            let events = self
                .users
                .execute(&user.to_string(), |_| {
                    Ok(UserCommand::RevokeSessions {
                        forget_devices: false,
                        ctx: ctx.clone(),
                    })
                })
                .await?;
            if !events.is_empty() {
                signed_out += 1;
            }
        }
        Ok(signed_out)
    }
}
