//! Who is asking: a live session of a user of the tenant, and whether it may
//! act as the tenant's admin.

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use twofold_domain::tenant::Tenant;
use twofold_domain::user::{
    SecondFactorUse, SessionState, SkipReason, User, UserCommand, UserEvent, STEP_UP_VALID_SECS,
};
use twofold_domain::{Actor, Ctx, SessionId, TenantId, UserId};
use twofold_platform::store::ExecError;
use twofold_platform::tokens::{self, TokenKind};

use crate::{App, AppError, Origin};

/// A live session of a user of the tenant it was presented to.
#[derive(Debug, Clone)]
pub struct Session {
    pub tenant_id: TenantId,
    pub tenant: Tenant,
    pub user_id: UserId,
    pub session_id: SessionId,
    pub second_factor: SecondFactorUse,
    /// Whether the user confirmed a current factor in this session within the
    /// step-up window (which also opens what needs a second factor).
    pub stepped_up: bool,
    /// The admin who opened this session as the user (Login As).
    pub impersonated_by: Option<UserId>,
    pub user: User,
}

impl Session {
    /// Refuses while the user must change a one-time password first.
    pub fn require_own_password(&self) -> Result<(), AppError> {
        if self.user.password_must_change {
            return Err(AppError::PasswordChangeRequired);
        }
        Ok(())
    }
}

impl Session {
    pub fn actor(&self) -> Actor {
        Actor::User(self.user_id)
    }

    /// The context of a command this session makes: the user acts, and a
    /// session an admin opened as them (Login As) marks every event with
    /// that admin.
    pub fn ctx(&self, origin: &Origin, at: DateTime<Utc>) -> Ctx {
        let mut ctx = origin.ctx(at, self.actor());
        ctx.impersonated_by = self.impersonated_by;
        ctx
    }

    /// This session as the tenant's admin: the user has the admin role and,
    /// when the tenant's 2FA is on, the session met the tenant's policy (a
    /// second factor passed, a device remembered by one, or a scope that does
    /// not ask this admin), or the session confirmed a current factor by a
    /// step-up within its window. A session from before 2FA was switched on,
    /// or of an admin with no factor set up, is not enough.
    pub fn admin(self) -> Result<AdminSession, AppError> {
        if !self.user.is_admin() {
            return Err(AppError::Forbidden);
        }
        self.policy_met()?;
        Ok(AdminSession(self))
    }

    /// This session as a reader of the tenant's reports: an admin or an
    /// auditor, whose session met the tenant's policy as an admin's must.
    pub fn reader(self) -> Result<ReaderSession, AppError> {
        if !self.user.is_admin() && !self.user.is_auditor() {
            return Err(AppError::Forbidden);
        }
        self.policy_met()?;
        Ok(ReaderSession(self))
    }

    fn policy_met(&self) -> Result<(), AppError> {
        self.require_own_password()?;
        let checked = matches!(
            self.second_factor,
            SecondFactorUse::Used { .. }
                | SecondFactorUse::Skipped {
                    reason: SkipReason::KnownDevice | SkipReason::NotRequired
                }
        );
        if self.tenant.settings.enabled && !checked && !self.stepped_up {
            return Err(AppError::SecondFactorRequired);
        }
        Ok(())
    }
}

/// A session that may read the tenant's reports (Overview, directory,
/// timelines, audit), checked by [`Session::reader`]; an admin's or an
/// auditor's. It cannot act.
#[derive(Debug, Clone)]
pub struct ReaderSession(pub Session);

impl ReaderSession {
    pub fn tenant_id(&self) -> TenantId {
        self.0.tenant_id
    }
}

/// A session of an admin of the tenant, checked by [`Session::admin`].
#[derive(Debug, Clone)]
pub struct AdminSession(pub Session);

impl AdminSession {
    pub fn actor(&self) -> Actor {
        Actor::Admin(self.0.user_id)
    }

    pub fn tenant_id(&self) -> TenantId {
        self.0.tenant_id
    }

    /// An admin reads whatever an auditor may.
    pub fn reader(&self) -> ReaderSession {
        ReaderSession(self.0.clone())
    }
}

impl App {
    /// A live session being used, under the tenant's idle timeout: false when
    /// it sat idle too long (it is ended then); its use is recorded now and
    /// then. Without an idle timeout, nothing is read or written.
    pub(crate) async fn keep_alive(
        &self,
        tenant: &Tenant,
        user_id: UserId,
        session_id: SessionId,
        live: &SessionState,
        now: DateTime<Utc>,
    ) -> Result<bool, AppError> {
        let Some(mins) = tenant.settings.idle_timeout_mins else {
            return Ok(true);
        };
        let idle_timeout_secs = i64::from(mins) * 60;
        let idle = live.idle_at(Some(idle_timeout_secs), now);
        let every = (idle_timeout_secs / 10).max(60);
        if idle || (now - live.last_used()).num_seconds() >= every {
            let ctx = Ctx::new(
                now,
                if idle {
                    Actor::System
                } else {
                    Actor::User(user_id)
                },
            );
            let touched = self
                .users
                .execute(&user_id.to_string(), |_| {
                    Ok(UserCommand::TouchSession {
                        session_id,
                        idle_timeout_secs,
                        ctx: ctx.clone(),
                    })
                })
                .await;
            match touched {
                Ok(events) => {
                    return Ok(!events
                        .iter()
                        .any(|e| matches!(e, UserEvent::SessionEnded { .. })))
                }
                // Ended meanwhile (signed out, revoked).
                Err(ExecError::Refused(_)) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// The live session a token names, for the tenant named in `raw_tenant`.
    #[tracing::instrument(skip_all)]
    pub async fn session(
        &self,
        raw_tenant: &str,
        token: Option<&SecretString>,
    ) -> Result<Session, AppError> {
        let (tenant_id, tenant) = self.tenant(raw_tenant).await?;
        let claim = token
            .and_then(|t| tokens::parse(TokenKind::Session, t))
            .ok_or(AppError::Unauthenticated)?;
        let user = self
            .user_in(tenant_id, claim.user_id)
            .await?
            .ok_or(AppError::Unauthenticated)?;
        let session_id = SessionId(claim.item);
        let now = self.now();
        let live = user
            .live_session(session_id, &claim.hash, now)
            .ok_or(AppError::Unauthenticated)?;
        if !self
            .keep_alive(&tenant, claim.user_id, session_id, live, now)
            .await?
        {
            return Err(AppError::Unauthenticated);
        }
        let second_factor = live.second_factor;
        let stepped_up = live
            .stepped_up_at
            .is_some_and(|at| (now - at).num_seconds() < STEP_UP_VALID_SECS);
        let impersonated_by = live.impersonated_by;
        Ok(Session {
            tenant_id,
            tenant,
            user_id: claim.user_id,
            session_id,
            second_factor,
            stepped_up,
            impersonated_by,
            user,
        })
    }
}
