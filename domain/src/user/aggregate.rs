//! The user aggregate: decides on commands and folds events into state.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use super::challenge::ChallengePurpose;
use super::commands::{
    ChallengeRef, CompleteEnrollment, NewBackupCodes, NewChallenge, NewDevice, PresentedDevice,
    Proof, SignIn, UserCommand, VerifyCode,
};
use super::events::{
    GuessBudget, NewContact, ProofKind, RejectionReason, SecondFactorUse, SessionEndReason,
    SkipReason, UserEvent,
};
use super::lockout::{AfterFailure, Lockout};
use super::{
    Challenge, UserError, BACKUP_CODE_COUNT, FREE_FAILURES_WITHOUT_LIMIT, LOGIN_AS_SESSION,
    MAX_ACTIVE_SESSIONS, MAX_OPEN_CHALLENGES, MAX_REMEMBERED, MAX_SLOWDOWN_SECS,
    STEP_UP_VALID_SECS,
};
use crate::context::{Actor, Ctx};
use crate::ids::{ChallengeId, SessionId, TenantId, UserId};
use crate::secrets::{PasswordHash, SealedSecret, SecretHash};
use crate::tenant::settings::{Enforcement, Enrollment, MaxInvalidAttempts, Scope};
use crate::tenant::TwoFactorSettings;
use crate::values::{Email, Method, Phone, Role, Username};
use uuid::Uuid;

/// Where the user stands with the authenticator app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TwoFactorState {
    #[default]
    NotStarted,
    Pending,
    Enrolled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TotpFactor {
    pub sealed: SealedSecret,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupCodeSlot {
    pub hash: SecretHash,
    pub used: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    pub token_hash: SecretHash,
    pub started_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub second_factor: SecondFactorUse,
    /// When the user last confirmed a current factor in this session.
    #[serde(default)]
    pub stepped_up_at: Option<DateTime<Utc>>,
    /// The admin who opened this session as the user (Login As).
    #[serde(default)]
    pub impersonated_by: Option<UserId>,
    /// When the session was last recorded in use (idle timeout).
    #[serde(default)]
    pub last_used_at: Option<DateTime<Utc>>,
}

impl SessionState {
    /// When this session was last known to be in use.
    pub fn last_used(&self) -> DateTime<Utc> {
        [Some(self.started_at), self.stepped_up_at, self.last_used_at]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(self.started_at)
    }

    /// Whether it sat unused for `idle_timeout_secs` by `at`.
    pub fn idle_at(&self, idle_timeout_secs: Option<i64>, at: DateTime<Utc>) -> bool {
        idle_timeout_secs
            .is_some_and(|idle| at >= self.last_used() + chrono::Duration::seconds(idle))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub token_hash: SecretHash,
    pub remembered_at: DateTime<Utc>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: Option<UserId>,
    pub tenant_id: Option<TenantId>,
    pub username: Option<Username>,
    pub email: Option<Email>,
    pub phone: Option<Phone>,
    pub roles: BTreeSet<Role>,
    pub service_account: bool,
    pub password_hash: Option<PasswordHash>,
    pub two_factor: TwoFactorState,
    pub totp: Option<TotpFactor>,
    pub pending_totp: Option<SealedSecret>,
    /// The last TOTP time step accepted; no step at or before it is accepted again.
    pub last_totp_step: Option<u64>,
    pub backup_codes: Vec<BackupCodeSlot>,
    /// The backup codes themselves, sealed, in slot order (to show again).
    #[serde(default)]
    pub sealed_backup_codes: Option<SealedSecret>,
    pub lockout: Lockout,
    pub challenges: BTreeMap<ChallengeId, Challenge>,
    pub sessions: BTreeMap<SessionId, SessionState>,
    pub sign_ins: u64,
    #[serde(default)]
    pub devices: BTreeMap<Uuid, DeviceState>,
    /// IPs of earlier sign-ins completed with a second factor, newest last.
    #[serde(default)]
    pub trusted_ips: Vec<String>,
    /// Switched on by an admin (scope "per user").
    #[serde(default)]
    pub two_factor_switched_on: bool,
    /// Opted in by the user (scope "voluntary").
    #[serde(default)]
    pub two_factor_opted_in: bool,
    #[serde(default)]
    pub last_failure_at: Option<DateTime<Utc>>,
    /// The method the user (or an admin for them) wants asked first.
    #[serde(default)]
    pub preferred_method: Option<Method>,
    /// Wrong passwords in a row, and when the last one came (the guessing budget).
    #[serde(default)]
    pub password_failures: u32,
    #[serde(default)]
    pub last_password_failure_at: Option<DateTime<Utc>>,
    /// The password is a one-time one: changing it comes before anything else.
    #[serde(default)]
    pub password_must_change: bool,
    /// A new email address or phone number waiting for its code to come
    /// back, by the challenge that carries it.
    #[serde(default)]
    pub pending_contact: Option<(ChallengeId, NewContact)>,
    /// The password reset link that works now, and until when.
    #[serde(default)]
    pub reset_link: Option<(uuid::Uuid, DateTime<Utc>)>,
    /// Erased by an admin: nothing of the account is left but its id.
    #[serde(default)]
    pub erased: bool,
}

impl User {
    /// Registered and not erased.
    pub fn exists(&self) -> bool {
        self.id.is_some() && !self.erased
    }

    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r.as_str() == Role::ADMIN)
    }

    pub fn is_auditor(&self) -> bool {
        self.roles.iter().any(|r| r.as_str() == Role::AUDITOR)
    }

    pub fn backup_codes_left(&self) -> usize {
        self.backup_codes.iter().filter(|s| !s.used).count()
    }

    /// The methods this user can answer a challenge with under `settings`,
    /// in the tenant's canonical order.
    pub fn available_methods(&self, settings: &TwoFactorSettings) -> Vec<Method> {
        settings
            .allowed_methods
            .iter()
            .copied()
            .filter(|m| match m {
                Method::Totp => self.two_factor == TwoFactorState::Enrolled,
                Method::Email => self.email.is_some(),
                Method::Sms => self.phone.is_some(),
            })
            .collect()
    }

    /// The method a challenge starts with, among the `available` ones (not
    /// empty): the user's own preference, else the tenant's default, else the
    /// first the user has.
    fn first_method(&self, available: &[Method], settings: &TwoFactorSettings) -> Method {
        [self.preferred_method, Some(settings.default_method)]
            .into_iter()
            .flatten()
            .find(|m| available.contains(m))
            .unwrap_or(available[0])
    }

    /// An open challenge whose token matches, or `ChallengeNotFound`.
    pub fn open_challenge(&self, reference: &ChallengeRef) -> Result<&Challenge, UserError> {
        self.challenges
            .get(&reference.id)
            .filter(|c| c.token_hash.matches(&reference.token_hash))
            .ok_or(UserError::ChallengeNotFound)
    }

    /// An open challenge whose token matches, of a user who is not locked out
    /// (a locked user holding a valid token is told so).
    fn open_unlocked(&self, reference: &ChallengeRef) -> Result<&Challenge, UserError> {
        let open = self.open_challenge(reference)?;
        if self.lockout.is_locked() {
            return Err(UserError::LockedOut);
        }
        Ok(open)
    }

    /// A live session whose token matches at `at`.
    pub fn live_session(
        &self,
        id: SessionId,
        token_hash: &SecretHash,
        at: DateTime<Utc>,
    ) -> Option<&SessionState> {
        self.sessions
            .get(&id)
            .filter(|s| s.token_hash.matches(token_hash) && at < s.expires_at)
    }

    fn require_exists(&self) -> Result<(), UserError> {
        if self.exists() {
            Ok(())
        } else {
            Err(UserError::NotFound)
        }
    }

    /// Whether this sign-in needs a second factor, or why not.
    fn skip_reason(
        &self,
        settings: &TwoFactorSettings,
        device: Option<&PresentedDevice>,
        ip: Option<&str>,
        at: DateTime<Utc>,
        enrolling: bool,
    ) -> Option<SkipReason> {
        if !settings.enabled {
            return Some(SkipReason::TwoFactorDisabled);
        }
        if self.service_account {
            return Some(SkipReason::ServiceAccount);
        }
        let asked = match &settings.scope {
            Scope::AllUsers => true,
            Scope::SelectedRoles { roles } => roles.iter().any(|r| self.roles.contains(r)),
            Scope::PerUser => self.two_factor_switched_on,
            Scope::Voluntary => self.two_factor_opted_in,
        };
        if !asked {
            return Some(SkipReason::NotRequired);
        }
        if enrolling {
            return None;
        }
        if settings.enforcement == Enforcement::UnrecognizedDevices {
            let fresh_until = |d: &DeviceState| {
                d.remembered_at + chrono::Duration::days(settings.remembered_device_days.into())
            };
            if let Some(d) = device {
                if self.devices.get(&d.id).is_some_and(|known| {
                    known.token_hash.matches(&d.token_hash) && at < fresh_until(known)
                }) {
                    return Some(SkipReason::KnownDevice);
                }
            }
            if settings.trust_known_ips
                && ip.is_some_and(|ip| self.trusted_ips.iter().any(|t| t == ip))
            {
                return Some(SkipReason::KnownIp);
            }
        }
        None
    }

    /// Whether a sign-in that asks for a second factor sends this user to
    /// set up an authenticator: where the tenant requires one, or where the
    /// user has no usable method at all (then the tenant's enrollment setting
    /// says whether they may skip it).
    fn needs_enrollment(&self, settings: &TwoFactorSettings) -> bool {
        settings.allows(Method::Totp)
            && self.two_factor != TwoFactorState::Enrolled
            && (settings.enrollment == Enrollment::Required
                || self.available_methods(settings).is_empty())
    }

    fn sign_in(&self, cmd: SignIn) -> Result<Vec<UserEvent>, UserError> {
        self.require_exists()?;
        let SignIn {
            password_ok,
            address_retry_after,
            settings,
            challenge,
            session,
            device,
            enrollment_seed,
            ctx,
        } = cmd;
        // Neither a lockout nor the guessing budget looks at the password,
        // so their answers say nothing about whether it was right.
        if self.lockout.is_locked() {
            return Ok(vec![UserEvent::SignInRefusedLocked { ctx }]);
        }
        if let Some(retry_after_secs) = address_retry_after {
            return Ok(vec![UserEvent::SignInThrottled {
                retry_after_secs,
                budget: GuessBudget::Address,
                ctx,
            }]);
        }
        if let Some(retry_after_secs) = self.password_wait(&settings, ctx.at) {
            return Ok(vec![UserEvent::SignInThrottled {
                retry_after_secs,
                budget: GuessBudget::Account,
                ctx,
            }]);
        }
        if !password_ok {
            return Ok(vec![UserEvent::PasswordRejected { ctx }]);
        }
        let enrolling = self.needs_enrollment(&settings) && enrollment_seed.is_some();
        let skip = self.skip_reason(
            &settings,
            device.as_ref(),
            ctx.ip.as_deref(),
            ctx.at,
            enrolling,
        );
        if let Some(reason) = skip {
            let mut events = vec![UserEvent::SecondFactorSkipped {
                reason,
                ctx: ctx.clone(),
            }];
            events.extend(self.start_session(
                session,
                &settings,
                SecondFactorUse::Skipped { reason },
                ctx,
            ));
            return Ok(events);
        }
        if !enrolling && self.available_methods(&settings).is_empty() {
            // Asked for a second factor with nothing to give and nothing to
            // set up: refused, never let through on the password alone.
            return Ok(vec![UserEvent::SignInRefusedNoMethod { ctx }]);
        }
        if let (true, Some(sealed)) = (enrolling, enrollment_seed) {
            return Ok(vec![
                UserEvent::TotpEnrollmentStarted {
                    sealed,
                    ctx: ctx.clone(),
                },
                self.challenge_issued(
                    challenge,
                    Method::Totp,
                    vec![Method::Totp],
                    &settings,
                    ChallengePurpose::Enrollment,
                    ctx,
                ),
            ]);
        }
        let methods = self.available_methods(&settings);
        let method = self.first_method(&methods, &settings);
        let methods = if settings.allow_fallback {
            methods
        } else {
            vec![method]
        };
        Ok(vec![self.challenge_issued(
            challenge,
            method,
            methods,
            &settings,
            ChallengePurpose::SignIn,
            ctx,
        )])
    }

    fn challenge_issued(
        &self,
        challenge: NewChallenge,
        method: Method,
        methods: Vec<Method>,
        settings: &TwoFactorSettings,
        purpose: ChallengePurpose,
        ctx: Ctx,
    ) -> UserEvent {
        UserEvent::ChallengeIssued {
            challenge_id: challenge.id,
            method,
            methods,
            token_hash: challenge.token_hash,
            expires_at: ctx.at + settings.code_timeout.duration(),
            resend_limit: settings.resend_limit.limit(),
            purpose,
            ctx,
        }
    }

    /// With "no limit" on attempts, each wrong code past the first few doubles
    /// the wait before the next one is looked at.
    fn slowdown(&self, settings: &TwoFactorSettings, at: DateTime<Utc>) -> Result<(), UserError> {
        if settings.max_invalid_attempts != MaxInvalidAttempts::Unlimited {
            return Ok(());
        }
        let failures = self.lockout.failures();
        let (Some(last), true) = (
            self.last_failure_at,
            failures >= FREE_FAILURES_WITHOUT_LIMIT,
        ) else {
            return Ok(());
        };
        let exponent = (failures - FREE_FAILURES_WITHOUT_LIMIT).min(20);
        let wait = (1i64 << exponent).min(MAX_SLOWDOWN_SECS);
        let allowed_at = last + chrono::Duration::seconds(wait);
        if at < allowed_at {
            return Err(UserError::TooManyAttempts {
                retry_after_secs: (allowed_at - at).num_seconds().max(1),
            });
        }
        Ok(())
    }

    /// The password-guessing budget of this account: after the tenant's
    /// `password_attempts_before_delay` wrong passwords in a row (from any
    /// address), each next try must wait twice as long as the last (1 s, 2 s,
    /// … up to 15 minutes). A right password resets it. It slows guessing to
    /// a crawl without ever locking the owner out. Seconds left to wait, if any.
    fn password_wait(&self, settings: &TwoFactorSettings, at: DateTime<Utc>) -> Option<i64> {
        let free = settings.password_attempts_before_delay;
        let last = self.last_password_failure_at?;
        if self.password_failures < free {
            return None;
        }
        let exponent = (self.password_failures - free).min(20);
        let wait = (1i64 << exponent).min(MAX_SLOWDOWN_SECS);
        let allowed_at = last + chrono::Duration::seconds(wait);
        (at < allowed_at).then(|| (allowed_at - at).num_seconds().max(1))
    }

    /// A step-up confirmed in `session` recently enough for a sensitive change.
    fn require_step_up(&self, session: SessionId, at: DateTime<Utc>) -> Result<(), UserError> {
        let fresh = self.sessions.get(&session).is_some_and(|s| {
            at < s.expires_at
                && s.stepped_up_at
                    .is_some_and(|t| at < t + chrono::Duration::seconds(STEP_UP_VALID_SECS))
        });
        if fresh {
            Ok(())
        } else {
            Err(UserError::StepUpRequired)
        }
    }

    /// Ends every session and forgets every device, as resets, lockouts and
    /// factor changes must.
    fn revoke_all(&self, ctx: &Ctx) -> UserEvent {
        UserEvent::SessionsRevoked {
            session_ids: self.sessions.keys().copied().collect(),
            devices_forgotten: true,
            ctx: ctx.clone(),
        }
    }

    /// The events of issuing `codes`: their hashes, and the sealed codes
    /// when the caller sealed them.
    fn issue_codes(codes: NewBackupCodes, ctx: &Ctx) -> Result<Vec<UserEvent>, UserError> {
        if codes.hashes.len() != BACKUP_CODE_COUNT {
            return Err(UserError::WrongBackupCodeCount {
                expected: BACKUP_CODE_COUNT,
            });
        }
        let mut events = vec![UserEvent::BackupCodesIssued {
            hashes: codes.hashes,
            ctx: ctx.clone(),
        }];
        if let Some(sealed) = codes.sealed {
            events.push(UserEvent::BackupCodesSealed {
                sealed,
                ctx: ctx.clone(),
            });
        }
        Ok(events)
    }

    fn remember_device(device: NewDevice, ctx: Ctx) -> UserEvent {
        UserEvent::DeviceRemembered {
            device_id: device.id,
            token_hash: device.token_hash,
            ctx,
        }
    }

    /// `SessionStarted`, preceded by the eviction of the oldest session when
    /// the user is at the cap.
    fn start_session(
        &self,
        session: super::NewSession,
        settings: &TwoFactorSettings,
        second_factor: SecondFactorUse,
        ctx: Ctx,
    ) -> Vec<UserEvent> {
        let mut events = Vec::new();
        let live: Vec<(&SessionId, &SessionState)> = self
            .sessions
            .iter()
            .filter(|(_, s)| ctx.at < s.expires_at)
            .collect();
        if live.len() >= MAX_ACTIVE_SESSIONS {
            if let Some((oldest, _)) = live.iter().min_by_key(|(_, s)| s.started_at) {
                events.push(UserEvent::SessionEnded {
                    session_id: **oldest,
                    reason: SessionEndReason::Evicted,
                    ctx: Ctx::new(ctx.at, Actor::System),
                });
            }
        }
        events.push(UserEvent::SessionStarted {
            session_id: session.id,
            token_hash: session.token_hash,
            expires_at: session
                .expires_at
                .unwrap_or(ctx.at + settings.session_duration()),
            second_factor,
            ctx,
        });
        events
    }

    fn verify(&self, cmd: VerifyCode) -> Result<Vec<UserEvent>, UserError> {
        self.require_exists()?;
        let VerifyCode {
            challenge,
            proof,
            settings,
            session,
            device,
            replacement,
            ctx,
        } = cmd;
        let open = self.open_unlocked(&challenge)?;
        if open.purpose == ChallengePurpose::Enrollment {
            return Err(UserError::WrongChallengePurpose);
        }
        // A recovery code proves nothing about a new address or number.
        if open.purpose == ChallengePurpose::VerifyContact && matches!(proof, Proof::Backup { .. })
        {
            return Err(UserError::ProofDoesNotFitChallenge);
        }
        self.slowdown(&settings, ctx.at)?;
        if open.is_expired(ctx.at) {
            return Ok(vec![UserEvent::ChallengeExpired {
                challenge_id: open.id,
                ctx,
            }]);
        }
        let (kind, verdict) = match proof {
            Proof::Totp { matched_step } => {
                if open.method != Method::Totp {
                    return Err(UserError::ProofDoesNotFitChallenge);
                }
                let verdict = match matched_step {
                    None => Err(RejectionReason::WrongCode),
                    Some(step) if self.last_totp_step.is_some_and(|last| step <= last) => {
                        Err(RejectionReason::ReusedTimeStep)
                    }
                    Some(step) => Ok(UserEvent::CodeVerified {
                        challenge_id: open.id,
                        method: Method::Totp,
                        totp_step: Some(step),
                        ctx: ctx.clone(),
                    }),
                };
                (ProofKind::Totp, verdict)
            }
            Proof::Delivered { matches } => {
                if !open.method.is_delivered() {
                    return Err(UserError::ProofDoesNotFitChallenge);
                }
                let verdict = if matches {
                    Ok(UserEvent::CodeVerified {
                        challenge_id: open.id,
                        method: open.method,
                        totp_step: None,
                        ctx: ctx.clone(),
                    })
                } else {
                    Err(RejectionReason::WrongCode)
                };
                (open.method.into(), verdict)
            }
            Proof::Backup { hash } => {
                let slot = self
                    .backup_codes
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !s.used)
                    .find(|(_, s)| s.hash.matches(&hash))
                    .map(|(i, _)| i);
                let verdict = match slot {
                    Some(slot) => Ok(UserEvent::BackupCodeUsed {
                        challenge_id: open.id,
                        slot,
                        remaining: self.backup_codes_left() - 1,
                        ctx: ctx.clone(),
                    }),
                    None => Err(RejectionReason::WrongCode),
                };
                (ProofKind::BackupCode, verdict)
            }
        };
        match verdict {
            Ok(accepted) => {
                // A used backup code's slot gets its replacement when the
                // tenant keeps 8 (and the caller brought one).
                let replaced = match (&accepted, replacement) {
                    (UserEvent::BackupCodeUsed { slot, .. }, Some(r))
                        if settings.replace_backup_codes_on_use =>
                    {
                        let mut extra = vec![UserEvent::BackupCodeReplaced {
                            slot: *slot,
                            hash: r.hash,
                            ctx: ctx.clone(),
                        }];
                        if let Some(sealed) = r.sealed {
                            extra.push(UserEvent::BackupCodesSealed {
                                sealed,
                                ctx: ctx.clone(),
                            });
                        }
                        extra
                    }
                    _ => Vec::new(),
                };
                let mut events = vec![accepted];
                events.extend(replaced);
                match open.purpose {
                    ChallengePurpose::StepUp { session_id } => {
                        events.push(UserEvent::StepUpCompleted {
                            session_id,
                            challenge_id: open.id,
                            ctx,
                        });
                    }
                    ChallengePurpose::VerifyContact => {
                        let contact = self
                            .pending_contact
                            .as_ref()
                            .filter(|(id, _)| *id == open.id)
                            .map(|(_, c)| c.clone())
                            .ok_or(UserError::ChallengeNotFound)?;
                        let (email, phone, previous) = match &contact {
                            NewContact::Email(e) => (
                                Some(Some(e.clone())),
                                None,
                                self.email.as_ref().map(|e| e.as_str().to_string()),
                            ),
                            NewContact::Phone(p) => (
                                None,
                                Some(Some(p.clone())),
                                self.phone.as_ref().map(|p| p.as_str().to_string()),
                            ),
                        };
                        events.push(UserEvent::ContactVerified {
                            challenge_id: open.id,
                            contact,
                            previous,
                            ctx: ctx.clone(),
                        });
                        events.push(UserEvent::UserUpdated {
                            roles: None,
                            email,
                            phone,
                            service_account: None,
                            ctx: ctx.clone(),
                        });
                        events.push(self.revoke_all(&ctx));
                    }
                    ChallengePurpose::SignIn | ChallengePurpose::Enrollment => {
                        events.extend(self.start_session(
                            session,
                            &settings,
                            SecondFactorUse::Used { method: kind },
                            ctx.clone(),
                        ));
                        events.push(Self::remember_device(device, ctx));
                    }
                }
                Ok(events)
            }
            Err(reason) => Ok(self.reject(open.id, kind, reason, &settings, ctx)),
        }
    }

    fn reject(
        &self,
        challenge_id: ChallengeId,
        proof: ProofKind,
        reason: RejectionReason,
        settings: &TwoFactorSettings,
        ctx: Ctx,
    ) -> Vec<UserEvent> {
        let limit = settings.max_invalid_attempts.limit();
        let (failures, locks) = match self.lockout.on_failure(limit) {
            AfterFailure::Counted { failures } => (failures, false),
            AfterFailure::LocksOut { failures } => (failures, true),
        };
        let mut events = vec![UserEvent::CodeRejected {
            challenge_id,
            proof,
            reason,
            failures,
            ctx: ctx.clone(),
        }];
        if locks {
            events.push(UserEvent::UserLockedOut {
                failures,
                ended_sessions: self.sessions.keys().copied().collect(),
                ctx: Ctx::new(ctx.at, Actor::System).with_request(ctx.ip, ctx.user_agent),
            });
        }
        events
    }

    fn resend(&self, reference: ChallengeRef, ctx: Ctx) -> Result<Vec<UserEvent>, UserError> {
        self.require_exists()?;
        let open = self.open_unlocked(&reference)?;
        if open.is_expired(ctx.at) {
            return Err(UserError::ChallengeExpired);
        }
        if !open.method.is_delivered() {
            return Err(UserError::NothingToResend);
        }
        if open.resends_remaining() == Some(0) {
            return Err(UserError::ResendLimitReached);
        }
        Ok(vec![UserEvent::CodeResent {
            challenge_id: open.id,
            method: open.method,
            generation: open.generation + 1,
            resends: open.resends + 1,
            ctx,
        }])
    }

    fn switch(
        &self,
        reference: ChallengeRef,
        method: Method,
        ctx: Ctx,
    ) -> Result<Vec<UserEvent>, UserError> {
        self.require_exists()?;
        let open = self.open_unlocked(&reference)?;
        if open.is_expired(ctx.at) {
            return Err(UserError::ChallengeExpired);
        }
        if method == open.method || !open.methods.contains(&method) {
            return Err(UserError::MethodNotAvailable);
        }
        // A switch to email or SMS sends a code: it counts as a resend, so
        // switching back and forth cannot get round the resend limit.
        if method.is_delivered() && open.resends_remaining() == Some(0) {
            return Err(UserError::ResendLimitReached);
        }
        Ok(vec![UserEvent::ChallengeMethodSwitched {
            challenge_id: open.id,
            from: open.method,
            to: method,
            generation: open.generation + 1,
            ctx,
        }])
    }

    /// Admin actions on a user carry a reason.
    fn require_admin_reason(&self, ctx: &Ctx) -> Result<(), UserError> {
        if matches!(ctx.actor, Actor::Admin(_))
            && ctx.reason.as_deref().is_none_or(|r| r.trim().is_empty())
        {
            return Err(UserError::ReasonRequired);
        }
        Ok(())
    }

    fn complete_enrollment(&self, cmd: CompleteEnrollment) -> Result<Vec<UserEvent>, UserError> {
        self.require_exists()?;
        let CompleteEnrollment {
            challenge,
            matched_step,
            backup_codes,
            settings,
            session,
            device,
            ctx,
        } = cmd;
        let open = self.open_unlocked(&challenge)?;
        if open.purpose != ChallengePurpose::Enrollment {
            return Err(UserError::WrongChallengePurpose);
        }
        if self.pending_totp.is_none() {
            return Err(UserError::NoEnrollmentInProgress);
        }
        let issued = Self::issue_codes(backup_codes, &ctx)?;
        if open.is_expired(ctx.at) {
            return Ok(vec![UserEvent::ChallengeExpired {
                challenge_id: open.id,
                ctx,
            }]);
        }
        self.slowdown(&settings, ctx.at)?;
        let step = matched_step.filter(|s| self.last_totp_step.is_none_or(|l| *s > l));
        let Some(totp_step) = step else {
            let reason = if matched_step.is_some() {
                RejectionReason::ReusedTimeStep
            } else {
                RejectionReason::WrongCode
            };
            return Ok(self.reject(open.id, ProofKind::Totp, reason, &settings, ctx));
        };
        let mut events = vec![UserEvent::EnrollmentCompleted {
            method: Method::Totp,
            totp_step,
            ctx: ctx.clone(),
        }];
        events.extend(issued);
        events.push(UserEvent::CodeVerified {
            challenge_id: open.id,
            method: Method::Totp,
            totp_step: Some(totp_step),
            ctx: ctx.clone(),
        });
        events.extend(self.start_session(
            session,
            &settings,
            SecondFactorUse::Used {
                method: ProofKind::Totp,
            },
            ctx.clone(),
        ));
        events.push(Self::remember_device(device, ctx));
        Ok(events)
    }

    fn handle_command(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        if self.erased {
            return Err(UserError::NotFound);
        }
        match command {
            UserCommand::Register {
                user_id,
                tenant_id,
                username,
                email,
                phone,
                roles,
                service_account,
                password_hash,
                ctx,
            } => {
                if self.exists() {
                    return Err(UserError::AlreadyExists);
                }
                let mut roles = roles;
                roles.sort();
                roles.dedup();
                Ok(vec![UserEvent::UserRegistered {
                    user_id,
                    tenant_id,
                    username,
                    email,
                    phone,
                    roles,
                    service_account,
                    password_hash,
                    ctx,
                }])
            }
            UserCommand::SignIn(cmd) => self.sign_in(cmd),
            UserCommand::VerifyCode(cmd) => self.verify(cmd),
            UserCommand::ResendCode { challenge, ctx } => self.resend(challenge, ctx),
            UserCommand::SwitchMethod {
                challenge,
                method,
                ctx,
            } => self.switch(challenge, method, ctx),
            UserCommand::RecordAuditRead { read, ctx } => {
                self.require_exists()?;
                if !self.is_admin() && !self.is_auditor() {
                    return Err(UserError::NotAReader);
                }
                Ok(vec![UserEvent::AuditRead { read, ctx }])
            }
            UserCommand::TouchSession {
                session_id,
                idle_timeout_secs,
                ctx,
            } => {
                self.require_exists()?;
                let session = self
                    .sessions
                    .get(&session_id)
                    .ok_or(UserError::SessionNotFound)?;
                if session.idle_at(Some(idle_timeout_secs), ctx.at) {
                    return Ok(vec![UserEvent::SessionEnded {
                        session_id,
                        reason: SessionEndReason::Idle,
                        ctx,
                    }]);
                }
                // Recorded now and then, not at every use.
                let every = (idle_timeout_secs / 10).max(60);
                if ctx.at - session.last_used() >= chrono::Duration::seconds(every) {
                    return Ok(vec![UserEvent::SessionUsed { session_id, ctx }]);
                }
                Ok(vec![])
            }
            UserCommand::EndSession {
                session_id,
                reason,
                ctx,
            } => {
                self.require_exists()?;
                if !self.sessions.contains_key(&session_id) {
                    return Err(UserError::SessionNotFound);
                }
                Ok(vec![UserEvent::SessionEnded {
                    session_id,
                    reason,
                    ctx,
                }])
            }
            UserCommand::ChangePassword {
                current_ok,
                new_hash,
                session_id,
                step_up,
                ctx,
            } => {
                self.require_exists()?;
                if !current_ok {
                    return Err(UserError::CurrentPasswordWrong);
                }
                if let Some(session) = step_up {
                    self.require_step_up(session, ctx.at)?;
                }
                let others: Vec<SessionId> = self
                    .sessions
                    .keys()
                    .copied()
                    .filter(|id| *id != session_id)
                    .collect();
                let mut events = vec![UserEvent::PasswordChanged {
                    password_hash: new_hash,
                    ctx: ctx.clone(),
                }];
                if !others.is_empty() {
                    events.push(UserEvent::SessionsRevoked {
                        session_ids: others,
                        devices_forgotten: false,
                        ctx,
                    });
                }
                Ok(events)
            }
            UserCommand::IssueResetLink {
                reset_id,
                expires_at,
                ctx,
            } => {
                self.require_exists()?;
                self.require_admin_reason(&ctx)?;
                if self.email.is_none() {
                    return Err(UserError::NoEmailForLink);
                }
                Ok(vec![UserEvent::PasswordResetLinkIssued {
                    reset_id,
                    expires_at,
                    ctx,
                }])
            }
            UserCommand::ResetPasswordByLink {
                reset_id,
                new_hash,
                ctx,
            } => {
                self.require_exists()?;
                match self.reset_link {
                    Some((id, until)) if id == reset_id && ctx.at < until => {}
                    _ => return Err(UserError::ResetLinkInvalid),
                }
                Ok(vec![
                    UserEvent::PasswordChanged {
                        password_hash: new_hash,
                        ctx: ctx.clone(),
                    },
                    self.revoke_all(&ctx),
                ])
            }
            UserCommand::ResetPassword { new_hash, ctx } => {
                self.require_exists()?;
                if matches!(ctx.actor, Actor::Admin(admin) if Some(admin) == self.id) {
                    return Err(UserError::CannotChangeOwnFactor);
                }
                self.require_admin_reason(&ctx)?;
                Ok(vec![
                    UserEvent::PasswordChanged {
                        password_hash: new_hash,
                        ctx: ctx.clone(),
                    },
                    UserEvent::PasswordChangeRequired { ctx: ctx.clone() },
                    self.revoke_all(&ctx),
                ])
            }
            UserCommand::RequirePasswordChange { ctx } => {
                self.require_exists()?;
                if self.password_must_change {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::PasswordChangeRequired { ctx }])
            }
            UserCommand::StartLoginAs {
                session,
                settings,
                ctx,
            } => {
                self.require_exists()?;
                let Actor::Admin(admin) = ctx.actor else {
                    return Err(UserError::LoginAsNotAllowed);
                };
                if !settings.allow_login_as || self.is_admin() || Some(admin) == self.id {
                    return Err(UserError::LoginAsNotAllowed);
                }
                self.require_admin_reason(&ctx)?;
                if self.lockout.is_locked() {
                    return Err(UserError::LockedOut);
                }
                let short = super::NewSession {
                    expires_at: Some(
                        session
                            .expires_at
                            .unwrap_or(ctx.at + LOGIN_AS_SESSION)
                            .min(ctx.at + LOGIN_AS_SESSION),
                    ),
                    ..session
                };
                let reason = SkipReason::LoginAs;
                Ok(self.start_session(short, &settings, SecondFactorUse::Skipped { reason }, ctx))
            }
            UserCommand::SkipEnrollment {
                challenge,
                settings,
                session,
                ctx,
            } => {
                self.require_exists()?;
                let open = self.open_unlocked(&challenge)?;
                if open.purpose != ChallengePurpose::Enrollment {
                    return Err(UserError::WrongChallengePurpose);
                }
                if settings.enrollment == Enrollment::Required {
                    return Err(UserError::EnrollmentRequired);
                }
                let reason = SkipReason::EnrollmentSkipped;
                let mut events = vec![
                    UserEvent::EnrollmentSkipped {
                        challenge_id: open.id,
                        ctx: ctx.clone(),
                    },
                    UserEvent::SecondFactorSkipped {
                        reason,
                        ctx: ctx.clone(),
                    },
                ];
                events.extend(self.start_session(
                    session,
                    &settings,
                    SecondFactorUse::Skipped { reason },
                    ctx,
                ));
                Ok(events)
            }
            UserCommand::SetPreferredMethod { method, ctx } => {
                self.require_exists()?;
                self.require_admin_reason(&ctx)?;
                if let Some(m) = method {
                    let all = TwoFactorSettings {
                        allowed_methods: Method::ALL.to_vec(),
                        ..TwoFactorSettings::default()
                    };
                    if !self.available_methods(&all).contains(&m) {
                        return Err(UserError::MethodNotAvailable);
                    }
                }
                if method == self.preferred_method {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::PreferredMethodSet { method, ctx }])
            }
            UserCommand::ForgetDevice { device_id, ctx } => {
                self.require_exists()?;
                self.require_admin_reason(&ctx)?;
                if !self.devices.contains_key(&device_id) {
                    return Err(UserError::DeviceNotFound);
                }
                Ok(vec![UserEvent::DeviceForgotten { device_id, ctx }])
            }
            UserCommand::StartTotpEnrollment { sealed, ctx } => {
                self.require_exists()?;
                if self.two_factor == TwoFactorState::Enrolled {
                    return Err(UserError::AlreadyEnrolled);
                }
                Ok(vec![UserEvent::TotpEnrollmentStarted { sealed, ctx }])
            }
            UserCommand::ConfirmTotpEnrollment {
                matched_step,
                backup_codes,
                ctx,
            } => {
                self.require_exists()?;
                if self.two_factor == TwoFactorState::Enrolled {
                    return Err(UserError::AlreadyEnrolled);
                }
                if self.pending_totp.is_none() {
                    return Err(UserError::NoEnrollmentInProgress);
                }
                let issued = Self::issue_codes(backup_codes, &ctx)?;
                let step = matched_step.filter(|s| self.last_totp_step.is_none_or(|l| *s > l));
                Ok(match step {
                    Some(totp_step) => {
                        let mut events = vec![UserEvent::EnrollmentCompleted {
                            method: Method::Totp,
                            totp_step,
                            ctx,
                        }];
                        events.extend(issued);
                        events
                    }
                    None => vec![UserEvent::EnrollmentCodeRejected { ctx }],
                })
            }
            UserCommand::RegenerateBackupCodes {
                backup_codes,
                step_up,
                ctx,
            } => {
                self.require_exists()?;
                match step_up {
                    Some(session) => self.require_step_up(session, ctx.at)?,
                    None => self.require_admin_reason(&ctx)?,
                }
                Self::issue_codes(backup_codes, &ctx)
            }
            UserCommand::Unlock { ctx } => {
                self.require_exists()?;
                if !self.lockout.is_locked() {
                    return Err(UserError::NotLocked);
                }
                self.require_admin_reason(&ctx)?;
                Ok(vec![UserEvent::UserUnlocked { ctx }])
            }
            UserCommand::CompleteEnrollment(cmd) => self.complete_enrollment(cmd),
            UserCommand::StartStepUp {
                session_id,
                challenge,
                settings,
                ctx,
            } => {
                self.require_exists()?;
                if self.lockout.is_locked() {
                    return Err(UserError::LockedOut);
                }
                if self
                    .sessions
                    .get(&session_id)
                    .is_none_or(|s| ctx.at >= s.expires_at)
                {
                    return Err(UserError::SessionNotFound);
                }
                // Any factor the user has counts, whatever the tenant allows for sign-in.
                let all = TwoFactorSettings {
                    allowed_methods: Method::ALL.to_vec(),
                    ..settings.clone()
                };
                let methods = self.available_methods(&all);
                if methods.is_empty() {
                    return Err(UserError::MethodNotAvailable);
                }
                let method = self.first_method(&methods, &settings);
                Ok(vec![self.challenge_issued(
                    challenge,
                    method,
                    methods,
                    &settings,
                    ChallengePurpose::StepUp { session_id },
                    ctx,
                )])
            }
            UserCommand::Update {
                roles,
                email,
                phone,
                service_account,
                ctx,
            } => {
                self.require_exists()?;
                let roles = roles.map(|mut r| {
                    r.sort();
                    r.dedup();
                    r
                });
                let email = email.filter(|e| *e != self.email);
                let phone = phone.filter(|p| *p != self.phone);
                let factor_changed = email.is_some() || phone.is_some();
                let mut events = vec![UserEvent::UserUpdated {
                    roles,
                    email,
                    phone,
                    service_account,
                    ctx: ctx.clone(),
                }];
                if factor_changed {
                    events.push(self.revoke_all(&ctx));
                }
                Ok(events)
            }
            UserCommand::ChangeContact {
                email,
                phone,
                step_up,
                challenge,
                settings,
                ctx,
            } => {
                self.require_exists()?;
                self.require_step_up(step_up, ctx.at)?;
                let email = email.filter(|e| *e != self.email);
                let phone = phone.filter(|p| *p != self.phone);
                let new = match (&email, &phone) {
                    (Some(Some(e)), None) => Some(NewContact::Email(e.clone())),
                    (None, Some(Some(p))) => Some(NewContact::Phone(p.clone())),
                    (Some(Some(_)), Some(_)) | (Some(_), Some(Some(_))) => {
                        return Err(UserError::OneContactAtATime)
                    }
                    _ => None,
                };
                if let Some(contact) = new {
                    let method = contact.method();
                    return Ok(vec![
                        UserEvent::ContactVerificationStarted {
                            challenge_id: challenge.id,
                            contact,
                            ctx: ctx.clone(),
                        },
                        self.challenge_issued(
                            challenge,
                            method,
                            vec![method],
                            &settings,
                            ChallengePurpose::VerifyContact,
                            ctx,
                        ),
                    ]);
                }
                if email.is_none() && phone.is_none() {
                    return Ok(vec![]);
                }
                Ok(vec![
                    UserEvent::UserUpdated {
                        roles: None,
                        email,
                        phone,
                        service_account: None,
                        ctx: ctx.clone(),
                    },
                    self.revoke_all(&ctx),
                ])
            }
            UserCommand::SwitchTwoFactor {
                on,
                tenant_enabled,
                ctx,
            } => {
                self.require_exists()?;
                if on && !tenant_enabled {
                    return Err(UserError::TwoFactorUnavailable);
                }
                if on == self.two_factor_switched_on {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::TwoFactorSwitched { on, ctx }])
            }
            UserCommand::SetVoluntaryTwoFactor {
                on,
                tenant_enabled,
                step_up,
                ctx,
            } => {
                self.require_exists()?;
                if on && !tenant_enabled {
                    return Err(UserError::TwoFactorUnavailable);
                }
                if on == self.two_factor_opted_in {
                    return Ok(vec![]);
                }
                if !on {
                    self.require_step_up(step_up, ctx.at)?;
                }
                Ok(vec![UserEvent::VoluntaryTwoFactorChanged { on, ctx }])
            }
            UserCommand::ResetEnrollment { ctx } => {
                self.require_exists()?;
                if ctx.actor == Actor::Admin(self.id.unwrap_or(UserId(Uuid::nil()))) {
                    return Err(UserError::CannotChangeOwnFactor);
                }
                self.require_admin_reason(&ctx)?;
                // A reset lets the user start over: a lockout ends with it.
                let mut events = vec![UserEvent::EnrollmentReset { ctx: ctx.clone() }];
                if self.lockout.is_locked() {
                    events.push(UserEvent::UserUnlocked { ctx: ctx.clone() });
                }
                events.push(self.revoke_all(&ctx));
                Ok(events)
            }
            UserCommand::RemoveAuthenticator { step_up, ctx } => {
                self.require_exists()?;
                if self.two_factor != TwoFactorState::Enrolled {
                    return Err(UserError::NotEnrolled);
                }
                self.require_step_up(step_up, ctx.at)?;
                Ok(vec![
                    UserEvent::AuthenticatorRemoved { ctx: ctx.clone() },
                    self.revoke_all(&ctx),
                ])
            }
            UserCommand::Erase { ctx } => {
                self.require_exists()?;
                if !matches!(ctx.actor, Actor::Admin(_) | Actor::Operator) {
                    return Err(UserError::NotFound);
                }
                if ctx.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
                    return Err(UserError::ReasonRequired);
                }
                Ok(vec![UserEvent::UserErased { ctx }])
            }
            UserCommand::RevokeSessions {
                forget_devices,
                ctx,
            } => {
                self.require_exists()?;
                self.require_admin_reason(&ctx)?;
                if self.sessions.is_empty() && (!forget_devices || self.devices.is_empty()) {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::SessionsRevoked {
                    session_ids: self.sessions.keys().copied().collect(),
                    devices_forgotten: forget_devices,
                    ctx,
                }])
            }
        }
    }
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;
    type Services = ();

    async fn handle(
        &mut self,
        command: UserCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), UserError> {
        for event in self.handle_command(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: UserEvent) {
        match event {
            UserEvent::UserRegistered {
                user_id,
                tenant_id,
                username,
                email,
                phone,
                roles,
                service_account,
                password_hash,
                ..
            } => {
                self.id = Some(user_id);
                self.tenant_id = Some(tenant_id);
                self.username = Some(username);
                self.email = email;
                self.phone = phone;
                self.roles = roles.into_iter().collect();
                self.service_account = service_account;
                self.password_hash = Some(password_hash);
            }
            UserEvent::PasswordRejected { ctx } => {
                self.password_failures = self.password_failures.saturating_add(1);
                self.last_password_failure_at = Some(ctx.at);
            }
            UserEvent::SignInRefusedLocked { .. }
            | UserEvent::SignInThrottled { .. }
            | UserEvent::EnrollmentCodeRejected { .. } => {}
            UserEvent::SecondFactorSkipped { .. } => self.password_failures = 0,
            UserEvent::ChallengeIssued {
                challenge_id,
                method,
                methods,
                token_hash,
                expires_at,
                resend_limit,
                purpose,
                ctx,
            } => {
                // The password was right: the guessing budget starts over.
                self.password_failures = 0;
                if !matches!(purpose, ChallengePurpose::StepUp { .. }) {
                    self.sign_ins += 1;
                }
                self.challenges.retain(|_, c| !c.is_expired(ctx.at));
                while self.challenges.len() >= MAX_OPEN_CHALLENGES {
                    let oldest = self
                        .challenges
                        .values()
                        .min_by_key(|c| c.issued_at)
                        .map(|c| c.id);
                    match oldest {
                        Some(id) => self.challenges.remove(&id),
                        None => break,
                    };
                }
                self.challenges.insert(
                    challenge_id,
                    Challenge {
                        id: challenge_id,
                        method,
                        methods,
                        token_hash,
                        issued_at: ctx.at,
                        expires_at,
                        resends: 0,
                        resend_limit,
                        generation: 0,
                        purpose,
                    },
                );
            }
            UserEvent::CodeResent {
                challenge_id,
                generation,
                resends,
                ..
            } => {
                if let Some(c) = self.challenges.get_mut(&challenge_id) {
                    c.generation = generation;
                    c.resends = resends;
                }
            }
            UserEvent::ChallengeMethodSwitched {
                challenge_id,
                to,
                generation,
                ..
            } => {
                if let Some(c) = self.challenges.get_mut(&challenge_id) {
                    c.method = to;
                    c.generation = generation;
                    if to.is_delivered() {
                        c.resends += 1;
                    }
                }
            }
            UserEvent::CodeRejected { failures, ctx, .. } => {
                self.lockout = Lockout::Open { failures };
                self.last_failure_at = Some(ctx.at);
            }
            UserEvent::UserLockedOut { failures, .. } => {
                // Open challenges stay, so whoever holds one is told the
                // account is locked; an unlock drops them.
                self.lockout = Lockout::Locked { failures };
                self.sessions.clear();
                self.forget_devices();
            }
            UserEvent::ChallengeExpired { challenge_id, .. } => {
                self.challenges.remove(&challenge_id);
            }
            UserEvent::CodeVerified {
                challenge_id,
                totp_step,
                ..
            } => {
                self.challenges.remove(&challenge_id);
                self.lockout = Lockout::default();
                if totp_step.is_some() {
                    self.last_totp_step = totp_step;
                }
            }
            UserEvent::BackupCodeUsed {
                challenge_id, slot, ..
            } => {
                self.challenges.remove(&challenge_id);
                self.lockout = Lockout::default();
                if let Some(s) = self.backup_codes.get_mut(slot) {
                    s.used = true;
                }
            }
            UserEvent::SessionStarted {
                session_id,
                token_hash,
                expires_at,
                second_factor,
                ctx,
            } => {
                self.sessions.retain(|_, s| ctx.at < s.expires_at);
                if matches!(second_factor, SecondFactorUse::Skipped { .. }) {
                    self.sign_ins += 1;
                }
                let impersonated_by = match (second_factor, &ctx.actor) {
                    (
                        SecondFactorUse::Skipped {
                            reason: SkipReason::LoginAs,
                        },
                        Actor::Admin(admin),
                    ) => Some(*admin),
                    _ => None,
                };
                self.sessions.insert(
                    session_id,
                    SessionState {
                        token_hash,
                        started_at: ctx.at,
                        expires_at,
                        second_factor,
                        stepped_up_at: None,
                        impersonated_by,
                        last_used_at: None,
                    },
                );
            }
            UserEvent::SessionEnded { session_id, .. } => {
                self.sessions.remove(&session_id);
            }
            UserEvent::ContactVerificationStarted {
                challenge_id,
                contact,
                ..
            } => self.pending_contact = Some((challenge_id, contact)),
            UserEvent::ContactVerified { .. } => self.pending_contact = None,
            UserEvent::SessionUsed { session_id, ctx } => {
                if let Some(s) = self.sessions.get_mut(&session_id) {
                    s.last_used_at = Some(ctx.at);
                }
            }
            UserEvent::TotpEnrollmentStarted { sealed, .. } => {
                self.pending_totp = Some(sealed);
                self.two_factor = TwoFactorState::Pending;
            }
            UserEvent::EnrollmentCompleted { totp_step, .. } => {
                if let Some(sealed) = self.pending_totp.take() {
                    self.totp = Some(TotpFactor { sealed });
                }
                self.two_factor = TwoFactorState::Enrolled;
                self.last_totp_step = Some(totp_step);
            }
            UserEvent::BackupCodesIssued { hashes, .. } => {
                self.backup_codes = hashes
                    .into_iter()
                    .map(|hash| BackupCodeSlot { hash, used: false })
                    .collect();
                // New codes: a sealed copy, if any, follows.
                self.sealed_backup_codes = None;
            }
            UserEvent::BackupCodesSealed { sealed, .. } => {
                self.sealed_backup_codes = Some(sealed);
            }
            UserEvent::BackupCodeReplaced { slot, hash, .. } => {
                if let Some(s) = self.backup_codes.get_mut(slot) {
                    *s = BackupCodeSlot { hash, used: false };
                }
            }
            UserEvent::UserUnlocked { .. } => {
                self.lockout = Lockout::default();
                self.challenges.clear();
            }
            UserEvent::DeviceForgotten { device_id, .. } => {
                self.devices.remove(&device_id);
            }
            UserEvent::PreferredMethodSet { method, .. } => self.preferred_method = method,
            UserEvent::EnrollmentSkipped { challenge_id, .. } => {
                self.challenges.remove(&challenge_id);
            }
            UserEvent::SignInRefusedNoMethod { .. } => self.password_failures = 0,
            UserEvent::PasswordResetLinkIssued {
                reset_id,
                expires_at,
                ..
            } => self.reset_link = Some((reset_id, expires_at)),
            UserEvent::PasswordChanged { password_hash, .. } => {
                self.reset_link = None;
                self.password_hash = Some(password_hash);
                self.password_must_change = false;
                self.password_failures = 0;
            }
            UserEvent::PasswordChangeRequired { .. } => self.password_must_change = true,
            UserEvent::DeviceRemembered {
                device_id,
                token_hash,
                ctx,
            } => {
                if self.devices.len() >= MAX_REMEMBERED {
                    let oldest = self
                        .devices
                        .iter()
                        .min_by_key(|(_, d)| d.remembered_at)
                        .map(|(id, _)| *id);
                    if let Some(id) = oldest {
                        self.devices.remove(&id);
                    }
                }
                self.devices.insert(
                    device_id,
                    DeviceState {
                        token_hash,
                        remembered_at: ctx.at,
                    },
                );
                if let Some(ip) = ctx.ip {
                    self.trusted_ips.retain(|t| *t != ip);
                    self.trusted_ips.push(ip);
                    if self.trusted_ips.len() > MAX_REMEMBERED {
                        self.trusted_ips.remove(0);
                    }
                }
            }
            UserEvent::StepUpCompleted {
                session_id, ctx, ..
            } => {
                if let Some(s) = self.sessions.get_mut(&session_id) {
                    s.stepped_up_at = Some(ctx.at);
                }
            }
            UserEvent::UserUpdated {
                roles,
                email,
                phone,
                service_account,
                ..
            } => {
                if let Some(roles) = roles {
                    self.roles = roles.into_iter().collect();
                }
                if let Some(email) = email {
                    self.email = email;
                }
                if let Some(phone) = phone {
                    self.phone = phone;
                }
                if let Some(flag) = service_account {
                    self.service_account = flag;
                }
            }
            UserEvent::TwoFactorSwitched { on, .. } => self.two_factor_switched_on = on,
            UserEvent::VoluntaryTwoFactorChanged { on, .. } => self.two_factor_opted_in = on,
            UserEvent::EnrollmentReset { .. } | UserEvent::AuthenticatorRemoved { .. } => {
                self.totp = None;
                self.pending_totp = None;
                self.two_factor = TwoFactorState::NotStarted;
                self.backup_codes.clear();
                self.sealed_backup_codes = None;
            }
            UserEvent::SessionsRevoked {
                session_ids,
                devices_forgotten,
                ..
            } => {
                for id in session_ids {
                    self.sessions.remove(&id);
                }
                if devices_forgotten {
                    self.forget_devices();
                }
            }
            UserEvent::UserErased { .. } => {
                // Nothing is kept but the ids: no contacts, password,
                // factors, sessions or devices.
                *self = User {
                    id: self.id,
                    tenant_id: self.tenant_id,
                    erased: true,
                    ..User::default()
                };
            }
            UserEvent::AuditRead { .. } => {}
        }
    }
}

impl User {
    /// The events a command would produce on this state, without appending
    /// anything (to see what it would do before paying for it).
    pub fn decide(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        self.handle_command(command)
    }

    /// The events a command would produce, without the event store (tests).
    #[cfg(test)]
    pub(crate) fn handle_for_tests(
        self,
        command: UserCommand,
    ) -> Result<Vec<UserEvent>, UserError> {
        self.handle_command(command)
    }

    fn forget_devices(&mut self) {
        self.devices.clear();
        self.trusted_ips.clear();
    }
}
