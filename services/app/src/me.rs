//! The signed-in user's own account: profile, authenticator enrollment,
//! step-up, and the sensitive changes a step-up allows.

use serde::Serialize;
use twofold_domain::user::{
    SecondFactorUse, SessionEndReason, TwoFactorState, User, UserCommand, UserError, UserEvent,
};
use twofold_domain::values::{Email, Method, Phone};
use twofold_domain::{Ctx, SessionId, UserId};
use twofold_platform::totp;
use uuid::Uuid;

use crate::auth::{issued, IssuedChallenge, NewAuthenticator};
use crate::session::Session;
use crate::{backup_codes, observe, App, AppError, Origin};

/// What a user sees of their own account.
#[derive(Debug, Serialize)]
pub struct Profile {
    pub user_id: UserId,
    pub username: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub roles: Vec<String>,
    pub service_account: bool,
    pub two_factor: TwoFactorState,
    pub two_factor_opted_in: bool,
    pub backup_codes_left: usize,
    /// The method asked first, when the user chose one.
    pub preferred_method: Option<Method>,
}

/// The account of a session's user.
pub fn profile(session: &Session) -> Profile {
    Profile::of(session.user_id, &session.user)
}

impl Profile {
    pub fn of(user_id: UserId, u: &User) -> Self {
        Self {
            user_id,
            username: u.username.as_ref().map(|n| n.as_str().to_string()),
            email: u.email.as_ref().map(|e| e.as_str().to_string()),
            phone: u.phone.as_ref().map(|p| p.as_str().to_string()),
            roles: u.roles.iter().map(|r| r.as_str().to_string()).collect(),
            service_account: u.service_account,
            two_factor: u.two_factor,
            two_factor_opted_in: u.two_factor_opted_in,
            backup_codes_left: u.backup_codes_left(),
            preferred_method: u.preferred_method,
        }
    }
}

/// A contact change as sent: absent fields stay as they are.
#[derive(Debug, Default)]
pub struct ContactChange {
    pub email: Option<String>,
    pub phone: Option<String>,
}

impl App {
    fn account_name(session: &Session) -> String {
        session
            .user
            .username
            .as_ref()
            .map(|u| u.as_str().to_string())
            .unwrap_or_default()
    }

    /// Runs one command on the session user's own account.
    async fn own_command(
        &self,
        session: &Session,
        origin: &Origin,
        command: impl Fn(Ctx) -> UserCommand,
    ) -> Result<Vec<UserEvent>, AppError> {
        session.require_own_password()?;
        let ctx = session.ctx(origin, self.now());
        Ok(self
            .users
            .execute(&session.user_id.to_string(), |_| Ok(command(ctx.clone())))
            .await?)
    }

    /// Starts enrolling an authenticator app: a new seed, sealed in the
    /// user's stream until a code confirms it.
    #[tracing::instrument(skip_all)]
    pub async fn start_totp(
        &self,
        session: &Session,
        origin: &Origin,
    ) -> Result<NewAuthenticator, AppError> {
        let seed = totp::new_secret();
        let sealed = self
            .keys
            .seal(&seed, session.user_id.as_uuid().as_bytes())?;
        self.own_command(session, origin, |ctx| UserCommand::StartTotpEnrollment {
            sealed: sealed.clone(),
            ctx,
        })
        .await?;
        NewAuthenticator::new(&seed, &session.tenant.name, &Self::account_name(session))
    }

    /// The seed of the enrollment in progress.
    fn pending_seed(&self, session: &Session) -> Result<Vec<u8>, AppError> {
        let sealed = session
            .user
            .pending_totp
            .as_ref()
            .ok_or(UserError::NoEnrollmentInProgress)?;
        Ok(self
            .keys
            .open(sealed, session.user_id.as_uuid().as_bytes())?)
    }

    /// The pending enrollment, to show its QR code again.
    pub fn pending_totp(&self, session: &Session) -> Result<NewAuthenticator, AppError> {
        let seed = self.pending_seed(session)?;
        NewAuthenticator::new(&seed, &session.tenant.name, &Self::account_name(session))
    }

    /// Activates the pending authenticator once a valid code shows the app
    /// has the seed; answers the 8 backup codes, shown this once.
    #[tracing::instrument(skip_all)]
    pub async fn confirm_totp(
        &self,
        session: &Session,
        code: &str,
        origin: &Origin,
    ) -> Result<Vec<String>, AppError> {
        let code = crate::auth::parse_code(code)?;
        let seed = self.pending_seed(session)?;
        let matched_step = totp::matching_step(&seed, &code, self.now())?;
        let (codes, hashes) =
            backup_codes::issue(&self.keys, session.user_id.as_uuid().as_bytes())?;
        let events = self
            .own_command(session, origin, |ctx| UserCommand::ConfirmTotpEnrollment {
                matched_step,
                backup_codes: hashes.clone(),
                ctx,
            })
            .await?;
        if events
            .iter()
            .any(|e| matches!(e, UserEvent::EnrollmentCompleted { .. }))
        {
            observe::enrollment(Method::Totp);
            Ok(codes)
        } else {
            Err(AppError::InvalidCode {
                message: "The code does not match the authenticator. Check the app's clock and try the current code.".to_string(),
                attempts_remaining: None,
            })
        }
    }

    /// A challenge for a current factor before a sensitive change; answered
    /// at verify, it lets this session make sensitive changes for a while.
    #[tracing::instrument(skip_all)]
    pub async fn step_up(
        &self,
        session: &Session,
        origin: &Origin,
    ) -> Result<IssuedChallenge, AppError> {
        let (token, challenge) = crate::auth::new_challenge_for(session.user_id);
        let settings = session.tenant.settings.clone();
        let now = self.now();
        let command = |ctx| UserCommand::StartStepUp {
            session_id: session.session_id,
            challenge: challenge.clone(),
            settings: settings.clone(),
            ctx,
        };
        let fee = self
            .pay_for_code(
                session.tenant_id,
                &settings,
                session.user_id,
                &session.user,
                &command(session.ctx(origin, now)),
                origin.ip.as_deref(),
            )
            .await?;
        let executed = self.own_command(session, origin, command).await;
        self.settle(fee, executed.as_ref().ok().map(Vec::as_slice))
            .await;
        let events = executed?;
        issued(token, &events)
            .ok_or_else(|| AppError::unexpected(anyhow::anyhow!("step-up issued no challenge")))
    }

    /// Opt in to (or, after a step-up, out of) 2FA where the tenant leaves
    /// it to each user.
    #[tracing::instrument(skip_all)]
    pub async fn set_voluntary(
        &self,
        session: &Session,
        enabled: bool,
        origin: &Origin,
    ) -> Result<(), AppError> {
        let tenant_enabled = session.tenant.settings.enabled;
        self.own_command(session, origin, |ctx| UserCommand::SetVoluntaryTwoFactor {
            on: enabled,
            tenant_enabled,
            step_up: session.session_id,
            ctx,
        })
        .await?;
        Ok(())
    }

    /// New backup codes (after a step-up); the old ones stop working.
    #[tracing::instrument(skip_all)]
    pub async fn regenerate_own_backup_codes(
        &self,
        session: &Session,
        origin: &Origin,
    ) -> Result<Vec<String>, AppError> {
        let (codes, hashes) =
            backup_codes::issue(&self.keys, session.user_id.as_uuid().as_bytes())?;
        self.own_command(session, origin, |ctx| UserCommand::RegenerateBackupCodes {
            backup_codes: hashes.clone(),
            step_up: Some(session.session_id),
            ctx,
        })
        .await?;
        Ok(codes)
    }

    /// Changes where codes go (after a step-up). A factor change ends every
    /// session, this one included.
    #[tracing::instrument(skip_all)]
    pub async fn change_contact(
        &self,
        session: &Session,
        change: ContactChange,
        origin: &Origin,
    ) -> Result<Option<IssuedChallenge>, AppError> {
        let email = change
            .email
            .map(|e| Email::parse(&e).map(Some))
            .transpose()?;
        let phone = change
            .phone
            .map(|p| Phone::parse(&p).map(Some))
            .transpose()?;
        let (token, challenge) = crate::auth::new_challenge_for(session.user_id);
        let settings = &session.tenant.settings;
        let command = |ctx| UserCommand::ChangeContact {
            email: email.clone(),
            phone: phone.clone(),
            step_up: session.session_id,
            challenge: challenge.clone(),
            settings: settings.clone(),
            ctx,
        };
        // A code to a new address or number is paid for like any other.
        let fee = self
            .pay_for_code(
                session.tenant_id,
                settings,
                session.user_id,
                &session.user,
                &command(session.ctx(origin, self.now())),
                origin.ip.as_deref(),
            )
            .await?;
        let executed = self.own_command(session, origin, command).await;
        self.settle(fee, executed.as_ref().ok().map(Vec::as_slice))
            .await;
        Ok(issued(token, &executed?))
    }

    /// The method to ask first at sign-in (`None`: the tenant's default),
    /// among those the user has set up.
    pub async fn set_preferred_method(
        &self,
        session: &Session,
        method: Option<&str>,
        origin: &Origin,
    ) -> Result<(), AppError> {
        let method = method
            .filter(|m| !m.is_empty())
            .map(Method::parse)
            .transpose()?;
        self.own_command(session, origin, |ctx| UserCommand::SetPreferredMethod {
            method,
            ctx,
        })
        .await?;
        Ok(())
    }

    /// Removes the authenticator (after a step-up); every session ends.
    #[tracing::instrument(skip_all)]
    pub async fn remove_totp(&self, session: &Session, origin: &Origin) -> Result<(), AppError> {
        self.own_command(session, origin, |ctx| UserCommand::RemoveAuthenticator {
            step_up: session.session_id,
            ctx,
        })
        .await?;
        Ok(())
    }

    /// Ends one of the user's own sessions (another browser, a lost phone).
    #[tracing::instrument(skip_all)]
    pub async fn end_own_session(
        &self,
        session: &Session,
        session_id: SessionId,
        origin: &Origin,
    ) -> Result<(), AppError> {
        self.own_command(session, origin, |ctx| UserCommand::EndSession {
            session_id,
            reason: SessionEndReason::Revoked,
            ctx,
        })
        .await?;
        Ok(())
    }

    /// Stops trusting one of the user's remembered devices.
    #[tracing::instrument(skip_all)]
    pub async fn forget_own_device(
        &self,
        session: &Session,
        device_id: Uuid,
        origin: &Origin,
    ) -> Result<(), AppError> {
        self.own_command(session, origin, |ctx| UserCommand::ForgetDevice {
            device_id,
            ctx,
        })
        .await?;
        Ok(())
    }

    /// The user's recovery codes, shown again (after a step-up), each with
    /// whether it was used. Checking a code still goes by its keyed hash.
    pub fn own_backup_codes(&self, session: &Session) -> Result<Vec<ShownCode>, AppError> {
        if !session.stepped_up {
            return Err(UserError::StepUpRequired.into());
        }
        let user = &session.user;
        if user.backup_codes.is_empty() {
            return Ok(Vec::new());
        }
        let sealed = user.sealed_backup_codes.as_ref().ok_or_else(|| {
            AppError::bad_input(
                "codes_not_kept",
                "These recovery codes were issued before twofold kept them to show again. Regenerate them to see them any time.",
            )
        })?;
        let codes = backup_codes::open(&self.keys, session.user_id.as_uuid().as_bytes(), sealed)?;
        Ok(codes
            .into_iter()
            .zip(&user.backup_codes)
            .map(|(code, slot)| ShownCode {
                code,
                used: slot.used,
            })
            .collect())
    }
}

impl App {
    /// The user changes their password: the current one, and (where the
    /// tenant's 2FA asks them for one) a step-up in this session. Their other
    /// sessions end; a one-time password stops being one.
    #[tracing::instrument(skip_all)]
    pub async fn change_password(
        &self,
        session: &Session,
        current: &secrecy::SecretString,
        new: &secrecy::SecretString,
        origin: &Origin,
    ) -> Result<(), AppError> {
        crate::accounts::check_password(new)?;
        let current_ok = self
            .passwords
            .verify(session.user.password_hash.as_ref(), current)
            .await?;
        let new_hash = self.passwords.hash(new).await?;
        let settings = &session.tenant.settings;
        // A forced change right after a sign-in that passed 2FA needs no
        // other step-up: that second factor is this session's own.
        let forced_after_2fa = session.user.password_must_change
            && matches!(session.second_factor, SecondFactorUse::Used { .. });
        let asks_a_factor = settings.enabled
            && !session.user.available_methods(settings).is_empty()
            && !forced_after_2fa;
        let ctx = session.ctx(origin, self.now());
        self.users
            .execute(&session.user_id.to_string(), |_| {
                Ok(UserCommand::ChangePassword {
                    current_ok,
                    new_hash: new_hash.clone(),
                    session_id: session.session_id,
                    step_up: asks_a_factor.then_some(session.session_id),
                    ctx: ctx.clone(),
                })
            })
            .await?;
        Ok(())
    }
}

/// A recovery code shown again, and whether it was used.
#[derive(Debug, Serialize)]
pub struct ShownCode {
    pub code: String,
    pub used: bool,
}
