//! The user aggregate: decides on commands and folds events into state.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use super::commands::{ChallengeRef, Proof, SignIn, UserCommand, VerifyCode};
use super::events::{
    ProofKind, RejectionReason, SecondFactorUse, SessionEndReason, SkipReason, UserEvent,
};
use super::lockout::{AfterFailure, Lockout};
use super::{Challenge, UserError, BACKUP_CODE_COUNT, MAX_ACTIVE_SESSIONS, MAX_OPEN_CHALLENGES};
use crate::context::{Actor, Ctx};
use crate::ids::{ChallengeId, SessionId, TenantId, UserId};
use crate::secrets::{PasswordHash, SealedSecret, SecretHash};
use crate::tenant::TwoFactorSettings;
use crate::values::{Email, Method, Phone, Role, Username};

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
    pub lockout: Lockout,
    pub challenges: BTreeMap<ChallengeId, Challenge>,
    pub sessions: BTreeMap<SessionId, SessionState>,
    pub sign_ins: u64,
}

impl User {
    pub fn exists(&self) -> bool {
        self.id.is_some()
    }

    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r.as_str() == Role::ADMIN)
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

    /// An open challenge whose token matches, or `ChallengeNotFound`.
    pub fn open_challenge(&self, reference: &ChallengeRef) -> Result<&Challenge, UserError> {
        self.challenges
            .get(&reference.id)
            .filter(|c| c.token_hash.matches(&reference.token_hash))
            .ok_or(UserError::ChallengeNotFound)
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

    fn sign_in(&self, cmd: SignIn) -> Result<Vec<UserEvent>, UserError> {
        self.require_exists()?;
        let SignIn {
            password_ok,
            settings,
            challenge,
            session,
            ctx,
        } = cmd;
        if !password_ok {
            return Ok(vec![UserEvent::PasswordRejected { ctx }]);
        }
        if self.lockout.is_locked() {
            return Ok(vec![UserEvent::SignInRefusedLocked { ctx }]);
        }
        let skip = if !settings.enabled {
            Some(SkipReason::TwoFactorDisabled)
        } else if self.service_account {
            Some(SkipReason::ServiceAccount)
        } else {
            None
        };
        let methods = self.available_methods(&settings);
        let skip = skip.or_else(|| methods.is_empty().then_some(SkipReason::NoMethodAvailable));
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
        let method = if methods.contains(&settings.default_method) {
            settings.default_method
        } else {
            methods[0]
        };
        let methods = if settings.allow_fallback {
            methods
        } else {
            vec![method]
        };
        Ok(vec![UserEvent::ChallengeIssued {
            challenge_id: challenge.id,
            method,
            methods,
            token_hash: challenge.token_hash,
            expires_at: ctx.at + settings.code_timeout.duration(),
            resend_limit: settings.resend_limit.limit(),
            ctx,
        }])
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
            ctx,
        } = cmd;
        let open = self.open_challenge(&challenge)?;
        if self.lockout.is_locked() {
            return Err(UserError::LockedOut);
        }
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
                let mut events = vec![accepted];
                events.extend(self.start_session(
                    session,
                    &settings,
                    SecondFactorUse::Used { method: kind },
                    ctx,
                ));
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
        let open = self.open_challenge(&reference)?;
        if self.lockout.is_locked() {
            return Err(UserError::LockedOut);
        }
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
        let open = self.open_challenge(&reference)?;
        if self.lockout.is_locked() {
            return Err(UserError::LockedOut);
        }
        if open.is_expired(ctx.at) {
            return Err(UserError::ChallengeExpired);
        }
        if method == open.method || !open.methods.contains(&method) {
            return Err(UserError::MethodNotAvailable);
        }
        Ok(vec![UserEvent::ChallengeMethodSwitched {
            challenge_id: open.id,
            from: open.method,
            to: method,
            generation: open.generation + 1,
            ctx,
        }])
    }

    fn handle_command(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
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
                if backup_codes.len() != BACKUP_CODE_COUNT {
                    return Err(UserError::WrongBackupCodeCount {
                        expected: BACKUP_CODE_COUNT,
                    });
                }
                let step = matched_step.filter(|s| self.last_totp_step.is_none_or(|l| *s > l));
                Ok(match step {
                    Some(totp_step) => vec![
                        UserEvent::EnrollmentCompleted {
                            method: Method::Totp,
                            totp_step,
                            ctx: ctx.clone(),
                        },
                        UserEvent::BackupCodesIssued {
                            hashes: backup_codes,
                            ctx,
                        },
                    ],
                    None => vec![UserEvent::EnrollmentCodeRejected { ctx }],
                })
            }
            UserCommand::RegenerateBackupCodes { backup_codes, ctx } => {
                self.require_exists()?;
                if backup_codes.len() != BACKUP_CODE_COUNT {
                    return Err(UserError::WrongBackupCodeCount {
                        expected: BACKUP_CODE_COUNT,
                    });
                }
                Ok(vec![UserEvent::BackupCodesIssued {
                    hashes: backup_codes,
                    ctx,
                }])
            }
            UserCommand::Unlock { ctx } => {
                self.require_exists()?;
                if !self.lockout.is_locked() {
                    return Err(UserError::NotLocked);
                }
                if matches!(ctx.actor, Actor::Admin(_))
                    && ctx.reason.as_deref().is_none_or(|r| r.trim().is_empty())
                {
                    return Err(UserError::ReasonRequired);
                }
                Ok(vec![UserEvent::UserUnlocked { ctx }])
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
            UserEvent::PasswordRejected { .. }
            | UserEvent::SignInRefusedLocked { .. }
            | UserEvent::SecondFactorSkipped { .. }
            | UserEvent::EnrollmentCodeRejected { .. } => {}
            UserEvent::ChallengeIssued {
                challenge_id,
                method,
                methods,
                token_hash,
                expires_at,
                resend_limit,
                ctx,
            } => {
                self.sign_ins += 1;
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
                }
            }
            UserEvent::CodeRejected { failures, .. } => {
                self.lockout = Lockout::Open { failures };
            }
            UserEvent::UserLockedOut { failures, .. } => {
                self.lockout = Lockout::Locked { failures };
                self.challenges.clear();
                self.sessions.clear();
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
                self.sessions.insert(
                    session_id,
                    SessionState {
                        token_hash,
                        started_at: ctx.at,
                        expires_at,
                        second_factor,
                    },
                );
            }
            UserEvent::SessionEnded { session_id, .. } => {
                self.sessions.remove(&session_id);
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
            }
            UserEvent::UserUnlocked { .. } => self.lockout = Lockout::default(),
        }
    }
}
