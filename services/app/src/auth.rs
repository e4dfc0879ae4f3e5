//! Signing in: the password step, the challenge (verify, resend, switch),
//! enrollment required at sign-in, and the session (introspection, sign-out).

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use twofold_domain::tenant::settings::Enrollment;
use twofold_domain::tenant::{Tenant, TwoFactorSettings};
use twofold_domain::user::{
    Challenge, ChallengePurpose, ChallengeRef, CompleteEnrollment, NewChallenge, NewDevice,
    NewSession, PresentedDevice, Proof, ProofKind, SecondFactorUse, SessionEndReason, SignIn, User,
    UserCommand, UserError, UserEvent, VerifyCode,
};
use twofold_domain::values::{Method, OtpCode, Username};
use twofold_domain::{Actor, ChallengeId, Ctx, SessionId, TenantId, UserId};
use twofold_platform::store::{Basis, ExecError, StoreError, Versioned};
use twofold_platform::tokens::{self, TokenKind};
use twofold_platform::{qr, totp};
use uuid::Uuid;

use crate::budgets::Budget;
use crate::session::Session;
use crate::{backup_codes, observe, App, AppError, Memory, Origin, UserKey};

/// The longest password looked at (argon2id of more is only a cost to us).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// A sign-in as the user typed it.
pub struct SignInRequest {
    pub username: String,
    pub password: SecretString,
    /// The remembered-device token (cookie or JSON), if the client has one.
    pub device_token: Option<SecretString>,
}

/// A session opened by a sign-in.
#[derive(Debug)]
pub struct SignedIn {
    pub session_token: SecretString,
    pub expires_at: DateTime<Utc>,
    pub second_factor: SecondFactorUse,
    /// A new remembered-device token, when this sign-in remembered the device.
    pub device_token: Option<SecretString>,
    /// Backup codes issued with this sign-in (after enrollment), shown once.
    pub backup_codes: Vec<String>,
    /// The new code that took the place of a backup code this sign-in used
    /// (when the tenant keeps 8).
    pub replacement_code: Option<String>,
    /// The password is a one-time one: it must be changed before anything else.
    pub password_change_required: bool,
}

/// A challenge waiting for a code.
#[derive(Debug)]
pub struct IssuedChallenge {
    pub token: SecretString,
    pub state: ChallengeState,
}

/// Where a challenge stands.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChallengeState {
    pub method: Method,
    pub methods: Vec<Method>,
    pub expires_at: DateTime<Utc>,
    pub resends_remaining: Option<u32>,
    /// What answering it leads to (a page words itself by it).
    pub purpose: ChallengePurpose,
}

/// A new authenticator to scan or type in.
#[derive(Debug)]
pub struct NewAuthenticator {
    pub otpauth_uri: String,
    /// The seed in base32, for typing in.
    pub secret: String,
    pub qr_png: Vec<u8>,
}

impl NewAuthenticator {
    pub(crate) fn new(seed: &[u8], issuer: &str, account: &str) -> Result<Self, AppError> {
        let otpauth_uri = totp::otpauth_uri(seed, issuer, account)?;
        let qr_png = qr::png(&otpauth_uri)?;
        Ok(Self {
            secret: totp::base32(seed),
            otpauth_uri,
            qr_png,
        })
    }
}

pub enum SignInOutcome {
    SignedIn(SignedIn),
    Challenge(IssuedChallenge),
    /// The user must set up an authenticator (the tenant requires one, or
    /// the user has no usable method): enroll this one, then
    /// `complete_enrollment` opens the session. When `skippable` (optional
    /// enrollment), `skip_enrollment` opens it without, and says so.
    EnrollmentRequired {
        challenge: IssuedChallenge,
        enrollment: NewAuthenticator,
        skippable: bool,
    },
}

fn new_device(user_id: UserId) -> (SecretString, NewDevice) {
    let id = Uuid::new_v4();
    let (token, token_hash) = tokens::issue(TokenKind::Device, user_id, id);
    (token, NewDevice { id, token_hash })
}

pub(crate) fn new_session_for(user_id: UserId) -> (SecretString, NewSession) {
    new_session(user_id)
}

/// The session a command's events opened (no device, no codes).
pub(crate) fn signed_in_by(token: SecretString, events: &[UserEvent]) -> Option<SignedIn> {
    signed_in(token, None, events, Vec::new())
}

fn new_session(user_id: UserId) -> (SecretString, NewSession) {
    let id = SessionId(Uuid::new_v4());
    let (token, token_hash) = tokens::issue(TokenKind::Session, user_id, id.as_uuid());
    (
        token,
        NewSession {
            id,
            token_hash,
            expires_at: None,
        },
    )
}

pub(crate) fn new_challenge_for(user_id: UserId) -> (SecretString, NewChallenge) {
    let id = ChallengeId(Uuid::new_v4());
    let (token, token_hash) = tokens::issue(TokenKind::Challenge, user_id, id.as_uuid());
    (token, NewChallenge { id, token_hash })
}

/// The session a command's events opened, with the tokens the caller keeps.
fn signed_in(
    session_token: SecretString,
    device_token: Option<SecretString>,
    events: &[UserEvent],
    backup_codes: Vec<String>,
) -> Option<SignedIn> {
    let (expires_at, second_factor) = events.iter().find_map(|e| match e {
        UserEvent::SessionStarted {
            expires_at,
            second_factor,
            ..
        } => Some((*expires_at, *second_factor)),
        _ => None,
    })?;
    let remembered = events
        .iter()
        .any(|e| matches!(e, UserEvent::DeviceRemembered { .. }));
    Some(SignedIn {
        session_token,
        expires_at,
        second_factor,
        device_token: device_token.filter(|_| remembered),
        backup_codes,
        replacement_code: None,
        password_change_required: false,
    })
}

/// The challenge a command's events issued.
pub(crate) fn issued(token: SecretString, events: &[UserEvent]) -> Option<IssuedChallenge> {
    events.iter().find_map(|e| match e {
        UserEvent::ChallengeIssued {
            method,
            methods,
            expires_at,
            resend_limit,
            purpose,
            ..
        } => Some(IssuedChallenge {
            token: token.clone(),
            state: ChallengeState {
                method: *method,
                methods: methods.clone(),
                expires_at: *expires_at,
                resends_remaining: *resend_limit,
                purpose: *purpose,
            },
        }),
        _ => None,
    })
}

impl App {
    /// Runs a user's command decided under the tenant's settings as read; if
    /// they change before the append, it is decided again under the new ones.
    /// Answers the events and the tenant they were decided under.
    async fn under_tenant_settings(
        &self,
        tenant_id: TenantId,
        mut tenant: Basis<Tenant>,
        user_id: UserId,
        mut basis: Option<Basis<User>>,
        mut build: impl FnMut(&TwoFactorSettings, &User) -> Result<UserCommand, ExecError<UserError>>,
    ) -> Result<(Vec<UserEvent>, Tenant), AppError> {
        loop {
            let settings = tenant.state().settings.clone();
            let reads = [tenant.read::<Tenant>(tenant_id.to_string())];
            let executed = self
                .users
                .execute_with(&user_id.to_string(), basis.take(), &reads, |user| {
                    build(&settings, user)
                })
                .await;
            match executed {
                Err(ExecError::ReadMoved) => tenant = self.tenant_now(tenant_id).await?,
                other => return Ok((other?, tenant.versioned.state)),
            }
        }
    }

    /// `sign-in`: the password, then a challenge, required enrollment or a session.
    #[tracing::instrument(skip_all)]
    pub async fn sign_in(
        &self,
        raw_tenant: &str,
        request: SignInRequest,
        origin: &Origin,
    ) -> Result<SignInOutcome, AppError> {
        // The tenant and the user, remembered or read together; a malformed
        // username finds no user.
        let (tenant_id, tenant, found) = match Username::parse(&request.username) {
            Ok(name) => {
                self.tenant_and_user(raw_tenant, UserKey::Name(name.as_str()), Memory::Use)
                    .await?
            }
            Err(_) => {
                // No user to sign in; the tenant is only checked to exist.
                let (id, tenant) = self.tenant(raw_tenant).await?;
                let basis = Basis {
                    versioned: Versioned {
                        state: tenant,
                        ..Versioned::default()
                    },
                    fresh: true,
                };
                (id, basis, None)
            }
        };
        if request.password.expose_secret().len() > MAX_PASSWORD_BYTES {
            return Err(AppError::bad_input(
                "password_too_long",
                "The password is too long.",
            ));
        }
        // Every try from an address takes from its hourly budget of wrong
        // passwords across accounts, before anything is looked at; only a
        // sign-in that gets through gives it back.
        let now = self.now();
        let address_budget = match origin.ip.as_deref() {
            Some(ip) => Some(
                self.take_budget(
                    tenant_id,
                    Budget::PasswordsPerAddress,
                    ip,
                    tenant
                        .state()
                        .settings
                        .password_failures_per_address_per_hour,
                    now,
                )
                .await?,
            ),
            None => None,
        };
        let address_retry_after = match &address_budget {
            Some(Err(spent)) => Some(spent.retry_after_secs),
            _ => None,
        };
        // An unknown or malformed username costs an argon2id check all the
        // same; a spent budget costs it too, so its answer takes as long.
        let stored = found
            .as_ref()
            .and_then(|(_, u)| u.state().password_hash.as_ref());
        let password_ok = self.passwords.verify(stored, &request.password).await?;
        let Some((user_id, basis)) = found else {
            // A commit, as an account's wrong password has (its event).
            let _ = self
                .take_budget(
                    tenant_id,
                    Budget::UnknownNamesPerAddress,
                    origin.ip.as_deref().unwrap_or("unknown"),
                    u32::MAX,
                    now,
                )
                .await?;
            if let Some(retry_after_secs) = address_retry_after {
                observe::sign_in("throttled");
                return Err(UserError::TooManyAttempts { retry_after_secs }.into());
            }
            observe::sign_in("invalid_credentials");
            return Err(AppError::InvalidCredentials);
        };
        let device = request
            .device_token
            .and_then(|t| tokens::parse(TokenKind::Device, &t))
            .filter(|claim| claim.user_id == user_id)
            .map(|claim| PresentedDevice {
                id: claim.item,
                token_hash: claim.hash,
            });
        let (challenge_token, challenge) = new_challenge_for(user_id);
        let (session_token, session) = new_session(user_id);
        let ctx = origin.ctx(now, Actor::User(user_id));
        let must_change = basis.state().password_must_change;
        let account = basis
            .state()
            .username
            .as_ref()
            .map(|u| u.as_str().to_string())
            .unwrap_or_default();
        // A seed ready in case the tenant requires enrollment and the user has none.
        let seed = totp::new_secret();
        let sealed = self.keys.seal(&seed, user_id.as_uuid().as_bytes())?;
        let command = |settings: &TwoFactorSettings| {
            UserCommand::SignIn(SignIn {
                password_ok,
                address_retry_after,
                settings: settings.clone(),
                challenge: challenge.clone(),
                session: session.clone(),
                device: device.clone(),
                enrollment_seed: settings.allows(Method::Totp).then(|| sealed.clone()),
                ctx: ctx.clone(),
            })
        };
        let settings = &tenant.state().settings;
        let fee = self
            .pay_for_code(
                tenant_id,
                settings,
                user_id,
                basis.state(),
                &command(settings),
                origin.ip.as_deref(),
            )
            .await?;
        let decided = self
            .under_tenant_settings(tenant_id, tenant, user_id, Some(basis), |settings, _| {
                Ok(command(settings))
            })
            .await;
        self.settle(fee, decided.as_ref().ok().map(|(e, _)| e.as_slice()))
            .await;
        let (events, tenant) = decided?;

        let refused = events.iter().any(|e| {
            matches!(
                e,
                UserEvent::PasswordRejected { .. }
                    | UserEvent::SignInRefusedLocked { .. }
                    | UserEvent::SignInThrottled { .. }
            )
        });
        if let (false, Some(Ok(taken))) = (refused, address_budget) {
            // Off the answer's path: a sign-in that got through is not kept
            // waiting for its use to be handed back.
            let app = self.clone();
            tokio::spawn(async move {
                if let Err(e) = app.give_back(taken).await {
                    tracing::warn!(error = %e, "a password budget's use could not be given back");
                }
            });
        }
        for event in &events {
            match event {
                UserEvent::PasswordRejected { .. } => {
                    observe::sign_in("invalid_credentials");
                    return Err(AppError::InvalidCredentials);
                }
                UserEvent::SignInRefusedLocked { .. } => {
                    observe::sign_in("locked");
                    return Err(AppError::Locked);
                }
                UserEvent::SignInThrottled {
                    retry_after_secs, ..
                } => {
                    observe::sign_in("throttled");
                    return Err(UserError::TooManyAttempts {
                        retry_after_secs: *retry_after_secs,
                    }
                    .into());
                }
                UserEvent::SignInRefusedNoMethod { .. } => {
                    observe::sign_in("no_method");
                    return Err(AppError::NoUsableMethod);
                }
                UserEvent::ChallengeIssued {
                    method, purpose, ..
                } => {
                    observe::sign_in("challenged");
                    observe::challenge_issued(*method);
                    let challenge = issued(challenge_token, &events)
                        .ok_or_else(|| AppError::unexpected(anyhow::anyhow!("no challenge")))?;
                    if *purpose == ChallengePurpose::Enrollment {
                        let enrollment = NewAuthenticator::new(&seed, &tenant.name, &account)?;
                        return Ok(SignInOutcome::EnrollmentRequired {
                            challenge,
                            enrollment,
                            skippable: tenant.settings.enrollment == Enrollment::Optional,
                        });
                    }
                    return Ok(SignInOutcome::Challenge(challenge));
                }
                _ => {}
            }
        }
        observe::sign_in("signed_in");
        signed_in(session_token, None, &events, Vec::new())
            .map(|mut s| {
                s.password_change_required = must_change;
                SignInOutcome::SignedIn(s)
            })
            .ok_or_else(|| {
                AppError::unexpected(anyhow::anyhow!(
                    "sign-in produced neither a challenge nor a session"
                ))
            })
    }
}

/// What the client presented to a challenge, as sent.
pub struct VerifyRequest {
    pub challenge_token: SecretString,
    pub code: Option<String>,
    pub backup_code: Option<SecretString>,
}

pub enum VerifyOutcome {
    SignedIn(SignedIn),
    /// A step-up challenge was answered: this session may make sensitive
    /// changes for a while.
    SteppedUp,
    /// The code sent to a new email address or phone number came back: it
    /// is the user's now, and every session ended.
    ContactVerified,
}

/// What the client presented, parsed before anything is decided. A code or
/// backup code of the wrong shape is still an attempt: it counts as a wrong one.
enum Presented {
    Code(OtpCode),
    Backup(String),
    MalformedCode,
    MalformedBackup,
}

pub(crate) fn parse_code(code: &str) -> Result<OtpCode, AppError> {
    OtpCode::parse(code)
        .map_err(|e| AppError::bad_input("invalid_code_format", format!("The {e}.")))
}

impl Presented {
    fn parse(code: Option<&str>, backup: Option<&SecretString>) -> Result<Self, AppError> {
        match (code, backup) {
            (Some(code), None) => Ok(parse_code(code)
                .map(Self::Code)
                .unwrap_or(Self::MalformedCode)),
            (None, Some(backup)) => Ok(backup_codes::normalize(backup.expose_secret())
                .map(Self::Backup)
                .unwrap_or(Self::MalformedBackup)),
            _ => Err(AppError::bad_input(
                "code_required",
                "Send exactly one of code or backup_code.",
            )),
        }
    }
}

fn challenge_ref(token: &SecretString) -> Result<(UserId, ChallengeRef), AppError> {
    let claim = tokens::parse(TokenKind::Challenge, token).ok_or(AppError::ChallengeNotFound)?;
    Ok((
        claim.user_id,
        ChallengeRef {
            id: ChallengeId(claim.item),
            token_hash: claim.hash,
        },
    ))
}

/// A challenge token names its user; that user must belong to the tenant in
/// the request (checked on the state the command is decided on).
fn owned_by(user: &User, tenant_id: TenantId) -> Result<(), ExecError<UserError>> {
    if user.exists() && user.tenant_id == Some(tenant_id) {
        Ok(())
    } else {
        Err(ExecError::Refused(UserError::ChallengeNotFound))
    }
}

fn unexpected<E: std::error::Error>(e: anyhow::Error) -> ExecError<E> {
    ExecError::Store(StoreError::Unexpected(e))
}

/// The answer to a verification the events refused, if they did.
fn refusal(events: &[UserEvent], settings: &TwoFactorSettings) -> Result<(), AppError> {
    let limit = settings.max_invalid_attempts.limit();
    let mut rejected = None;
    for event in events {
        match event {
            UserEvent::ChallengeExpired { .. } => {
                return Err(UserError::ChallengeExpired.into());
            }
            UserEvent::UserLockedOut { .. } => return Err(AppError::Locked),
            UserEvent::CodeRejected {
                proof, failures, ..
            } => rejected = Some((*proof, *failures)),
            _ => {}
        }
    }
    match rejected {
        Some((proof, failures)) => {
            let kind = if proof == ProofKind::BackupCode {
                "backup code"
            } else {
                "code"
            };
            Err(AppError::InvalidCode {
                message: format!("The {kind} is wrong or was already used."),
                attempts_remaining: Some(limit.saturating_sub(failures)),
            })
        }
        None => Ok(()),
    }
}

impl App {
    /// Works out what a presented code proves against the user's current state.
    fn proof_for(
        &self,
        user: &User,
        open: &Challenge,
        presented: &Presented,
        at: DateTime<Utc>,
    ) -> Result<Proof, ExecError<UserError>> {
        if open.purpose == ChallengePurpose::Enrollment {
            return Err(ExecError::Refused(UserError::WrongChallengePurpose));
        }
        match presented {
            Presented::Backup(code) => Ok(Proof::Backup {
                hash: backup_codes::hash_for(&self.keys, user, code),
            }),
            // Counted like a wrong code of its kind.
            Presented::MalformedBackup => Ok(Proof::Backup {
                hash: twofold_domain::secrets::SecretHash(String::new()),
            }),
            Presented::MalformedCode => Ok(match open.method {
                Method::Totp => Proof::Totp { matched_step: None },
                Method::Email | Method::Sms => Proof::Delivered { matches: false },
            }),
            Presented::Code(code) => match open.method {
                Method::Totp => {
                    let factor = user
                        .totp
                        .as_ref()
                        .ok_or(ExecError::Refused(UserError::ProofDoesNotFitChallenge))?;
                    let user_id = user.id.map(|u| u.as_uuid()).unwrap_or_default();
                    let seed = self
                        .keys
                        .open(&factor.sealed, user_id.as_bytes())
                        .map_err(unexpected)?;
                    let matched_step = totp::matching_step(&seed, code, at).map_err(unexpected)?;
                    Ok(Proof::Totp { matched_step })
                }
                Method::Email | Method::Sms => {
                    let expected = self.keys.delivered_code(open.id, open.generation);
                    let matches = expected.as_bytes().ct_eq(code.expose().as_bytes()).into();
                    Ok(Proof::Delivered { matches })
                }
            },
        }
    }

    /// `challenge/verify`: a code or a backup code for an open challenge.
    #[tracing::instrument(skip_all)]
    pub async fn verify(
        &self,
        raw_tenant: &str,
        request: VerifyRequest,
        origin: &Origin,
    ) -> Result<VerifyOutcome, AppError> {
        // The token names the user, so the tenant and the user are remembered
        // or read together.
        let claimed = challenge_ref(&request.challenge_token);
        let read = match &claimed {
            Ok((user_id, _)) => Some(
                self.tenant_and_user(raw_tenant, UserKey::Id(*user_id), Memory::Use)
                    .await?,
            ),
            Err(_) => {
                self.tenant(raw_tenant).await?;
                None
            }
        };
        let presented = Presented::parse(request.code.as_deref(), request.backup_code.as_ref())?;
        let ((user_id, reference), Some((tenant_id, tenant, found))) = (claimed?, read) else {
            return Err(AppError::ChallengeNotFound);
        };
        let (session_token, session) = new_session(user_id);
        let (device_token, device) = new_device(user_id);
        let ctx = origin.ctx(self.now(), Actor::User(user_id));
        let must_change = found
            .as_ref()
            .is_some_and(|(_, b)| b.state().password_must_change);
        let basis = found.map(|(_, basis)| basis).unwrap_or(Basis {
            versioned: Versioned::default(),
            fresh: true,
        });
        // A new code ready in case a backup code is used and the tenant keeps 8.
        // Made only when a backup code is used and the tenant keeps 8.
        let mut new_code: Option<String> = None;
        let (events, tenant) = self
            .under_tenant_settings(tenant_id, tenant, user_id, Some(basis), |settings, user| {
                owned_by(user, tenant_id)?;
                let open = user
                    .open_challenge(&reference)
                    .map_err(ExecError::Refused)?;
                let proof = self.proof_for(user, open, &presented, ctx.at)?;
                let replacement = match &proof {
                    Proof::Backup { hash } if settings.replace_backup_codes_on_use => Some(
                        backup_codes::replacement(
                            &self.keys,
                            user,
                            hash,
                            new_code.get_or_insert_with(backup_codes::new_code),
                        )
                        .map_err(unexpected)?,
                    ),
                    _ => None,
                };
                Ok(UserCommand::VerifyCode(VerifyCode {
                    challenge: reference.clone(),
                    proof,
                    settings: settings.clone(),
                    session: session.clone(),
                    device: device.clone(),
                    replacement,
                    ctx: ctx.clone(),
                }))
            })
            .await
            .inspect_err(|e| {
                if matches!(e, AppError::Locked) {
                    observe::verification_locked();
                }
            })?;
        observe::verification(&events);
        refusal(&events, &tenant.settings)?;
        if events
            .iter()
            .any(|e| matches!(e, UserEvent::StepUpCompleted { .. }))
        {
            return Ok(VerifyOutcome::SteppedUp);
        }
        if events
            .iter()
            .any(|e| matches!(e, UserEvent::ContactVerified { .. }))
        {
            return Ok(VerifyOutcome::ContactVerified);
        }
        let replaced = events
            .iter()
            .any(|e| matches!(e, UserEvent::BackupCodeReplaced { .. }));
        signed_in(session_token, Some(device_token), &events, Vec::new())
            .map(|mut s| {
                s.replacement_code = new_code.filter(|_| replaced);
                s.password_change_required = must_change;
                VerifyOutcome::SignedIn(s)
            })
            .ok_or_else(|| AppError::unexpected(anyhow::anyhow!("verification opened no session")))
    }

    /// `enrollment/complete`: enrollment required at sign-in. The new
    /// authenticator's first code activates it and completes the sign-in,
    /// with the 8 backup codes, shown once.
    #[tracing::instrument(skip_all)]
    pub async fn complete_enrollment(
        &self,
        raw_tenant: &str,
        challenge_token: &SecretString,
        code: &str,
        origin: &Origin,
    ) -> Result<SignedIn, AppError> {
        let (tenant_id, tenant) = self.tenant(raw_tenant).await?;
        let code = parse_code(code)?;
        let (user_id, reference) = challenge_ref(challenge_token)?;
        let (session_token, session) = new_session(user_id);
        let (device_token, device) = new_device(user_id);
        let (codes, hashes) = backup_codes::issue(&self.keys, user_id.as_uuid().as_bytes())?;
        let ctx = origin.ctx(self.now(), Actor::User(user_id));
        let settings = tenant.settings;
        let events = self
            .users
            .execute(&user_id.to_string(), |user| {
                owned_by(user, tenant_id)?;
                user.open_challenge(&reference)
                    .map_err(ExecError::Refused)?;
                let sealed = user
                    .pending_totp
                    .as_ref()
                    .ok_or(ExecError::Refused(UserError::NoEnrollmentInProgress))?;
                let seed = self
                    .keys
                    .open(sealed, user_id.as_uuid().as_bytes())
                    .map_err(unexpected)?;
                let matched_step = totp::matching_step(&seed, &code, ctx.at).map_err(unexpected)?;
                Ok(UserCommand::CompleteEnrollment(CompleteEnrollment {
                    challenge: reference.clone(),
                    matched_step,
                    backup_codes: hashes.clone(),
                    settings: settings.clone(),
                    session: session.clone(),
                    device: device.clone(),
                    ctx: ctx.clone(),
                }))
            })
            .await?;
        observe::verification(&events);
        refusal(&events, &settings)?;
        observe::enrollment(Method::Totp);
        signed_in(session_token, Some(device_token), &events, codes)
            .ok_or_else(|| AppError::unexpected(anyhow::anyhow!("enrollment opened no session")))
    }

    /// `enrollment/skip`: go on without setting up the authenticator offered
    /// at sign-in, where the tenant's enrollment is optional; recorded as a
    /// skip with its reason.
    #[tracing::instrument(skip_all)]
    pub async fn skip_enrollment(
        &self,
        raw_tenant: &str,
        challenge_token: &SecretString,
        origin: &Origin,
    ) -> Result<SignedIn, AppError> {
        let (tenant_id, tenant) = self.tenant(raw_tenant).await?;
        let (user_id, reference) = challenge_ref(challenge_token)?;
        let (session_token, session) = new_session(user_id);
        let ctx = origin.ctx(self.now(), Actor::User(user_id));
        let events = self
            .users
            .execute(&user_id.to_string(), |user| {
                owned_by(user, tenant_id)?;
                Ok(UserCommand::SkipEnrollment {
                    challenge: reference.clone(),
                    settings: tenant.settings.clone(),
                    session: session.clone(),
                    ctx: ctx.clone(),
                })
            })
            .await?;
        observe::sign_in("signed_in");
        signed_in(session_token, None, &events, Vec::new())
            .ok_or_else(|| AppError::unexpected(anyhow::anyhow!("skipping opened no session")))
    }

    /// Runs one command on the open challenge a token names, for the tenant
    /// in the request, and answers the challenge's state after it.
    async fn challenge_command(
        &self,
        raw_tenant: &str,
        token: &SecretString,
        origin: &Origin,
        command: impl Fn(ChallengeRef, Ctx) -> UserCommand,
    ) -> Result<ChallengeState, AppError> {
        let (tenant_id, tenant) = self.tenant(raw_tenant).await?;
        let (user_id, reference) = challenge_ref(token)?;
        let user = self
            .user_in(tenant_id, user_id)
            .await?
            .ok_or(AppError::ChallengeNotFound)?;
        let now = self.now();
        let ctx = origin.ctx(now, Actor::User(user_id));
        // A resend or a switch to a delivered method pays for its code.
        let fee = self
            .pay_for_code(
                tenant_id,
                &tenant.settings,
                user_id,
                &user,
                &command(reference.clone(), ctx.clone()),
                origin.ip.as_deref(),
            )
            .await?;
        let executed = self
            .users
            .execute(&user_id.to_string(), |user| {
                owned_by(user, tenant_id)?;
                Ok(command(reference.clone(), ctx.clone()))
            })
            .await;
        self.settle(fee, executed.as_ref().ok().map(Vec::as_slice))
            .await;
        executed?;
        self.challenge(raw_tenant, token).await
    }

    /// The open challenge a token names, as it stands (for a page to show).
    #[tracing::instrument(skip_all)]
    pub async fn challenge(
        &self,
        raw_tenant: &str,
        challenge_token: &SecretString,
    ) -> Result<ChallengeState, AppError> {
        let (_, user, reference) = self.challenged_user(raw_tenant, challenge_token).await?;
        let open = user.open_challenge(&reference)?;
        Ok(ChallengeState {
            method: open.method,
            methods: open.methods.clone(),
            expires_at: open.expires_at,
            resends_remaining: open.resends_remaining(),
            purpose: open.purpose,
        })
    }

    /// The authenticator a sign-in that requires enrollment is waiting for,
    /// to show its QR code again.
    #[tracing::instrument(skip_all)]
    pub async fn pending_enrollment(
        &self,
        raw_tenant: &str,
        challenge_token: &SecretString,
    ) -> Result<NewAuthenticator, AppError> {
        let (tenant_id, user, reference) =
            self.challenged_user(raw_tenant, challenge_token).await?;
        let open = user.open_challenge(&reference)?;
        if open.purpose != ChallengePurpose::Enrollment {
            return Err(UserError::WrongChallengePurpose.into());
        }
        let sealed = user
            .pending_totp
            .as_ref()
            .ok_or(UserError::NoEnrollmentInProgress)?;
        let user_id = user.id.map(|u| u.as_uuid()).unwrap_or_default();
        let seed = self.keys.open(sealed, user_id.as_bytes())?;
        let tenant = self.tenant(&tenant_id.to_string()).await?.1;
        let account = user.username.as_ref().map(|u| u.as_str()).unwrap_or("");
        NewAuthenticator::new(&seed, &tenant.name, account)
    }

    /// The user a challenge token names, read fresh, if they belong to the tenant.
    async fn challenged_user(
        &self,
        raw_tenant: &str,
        challenge_token: &SecretString,
    ) -> Result<(TenantId, User, ChallengeRef), AppError> {
        let (tenant_id, _) = self.tenant(raw_tenant).await?;
        let (user_id, reference) = challenge_ref(challenge_token)?;
        let user = self
            .user_in(tenant_id, user_id)
            .await?
            .ok_or(AppError::ChallengeNotFound)?;
        Ok((tenant_id, user, reference))
    }

    /// `challenge/resend`: a new code for an email or SMS challenge.
    #[tracing::instrument(skip_all)]
    pub async fn resend(
        &self,
        raw_tenant: &str,
        challenge_token: &SecretString,
        origin: &Origin,
    ) -> Result<ChallengeState, AppError> {
        self.challenge_command(raw_tenant, challenge_token, origin, |challenge, ctx| {
            UserCommand::ResendCode { challenge, ctx }
        })
        .await
    }

    /// `challenge/switch`: another of the challenge's listed methods.
    #[tracing::instrument(skip_all)]
    pub async fn switch(
        &self,
        raw_tenant: &str,
        challenge_token: &SecretString,
        method: &str,
        origin: &Origin,
    ) -> Result<ChallengeState, AppError> {
        let method = Method::parse(method)?;
        let state = self
            .challenge_command(raw_tenant, challenge_token, origin, |challenge, ctx| {
                UserCommand::SwitchMethod {
                    challenge,
                    method,
                    ctx,
                }
            })
            .await?;
        observe::challenge_issued(method);
        Ok(state)
    }

    /// `sessions/introspect`: what a portal asks of a session token. `None`
    /// for a token that opens nothing (unknown, ended, expired, malformed).
    #[tracing::instrument(skip_all)]
    pub async fn introspect(
        &self,
        raw_tenant: &str,
        token: &SecretString,
    ) -> Result<Option<Introspected>, AppError> {
        let Some(claim) = tokens::parse(TokenKind::Session, token) else {
            self.tenant(raw_tenant).await?;
            return Ok(None);
        };
        let (_, tenant, found) = self
            .tenant_and_user(raw_tenant, UserKey::Id(claim.user_id), Memory::Fresh)
            .await?;
        let Some((_, basis)) = found else {
            return Ok(None);
        };
        let user = basis.versioned.state;
        let now = self.now();
        let Some(session) = user.live_session(SessionId(claim.item), &claim.hash, now) else {
            return Ok(None);
        };
        if !self
            .keep_alive(
                &tenant.versioned.state,
                claim.user_id,
                SessionId(claim.item),
                session,
                now,
            )
            .await?
        {
            return Ok(None);
        }
        Ok(Some(Introspected {
            impersonated_by: session.impersonated_by,
            user_id: claim.user_id,
            session_id: SessionId(claim.item),
            started_at: session.started_at,
            expires_at: session.expires_at,
            second_factor: session.second_factor,
            username: user.username.as_ref().map(|u| u.as_str().to_string()),
            roles: user.roles.iter().map(|r| r.as_str().to_string()).collect(),
        }))
    }

    /// `sign-out`: ends the session.
    #[tracing::instrument(skip_all)]
    pub async fn sign_out(&self, session: &Session, origin: &Origin) -> Result<(), AppError> {
        let ctx = session.ctx(origin, self.now());
        self.users
            .execute(&session.user_id.to_string(), |_| {
                Ok(UserCommand::EndSession {
                    session_id: session.session_id,
                    reason: SessionEndReason::SignedOut,
                    ctx: ctx.clone(),
                })
            })
            .await?;
        Ok(())
    }
}

/// A live session, as a portal sees it.
#[derive(Debug)]
pub struct Introspected {
    pub user_id: UserId,
    pub session_id: SessionId,
    pub username: Option<String>,
    pub roles: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub second_factor: SecondFactorUse,
    /// The admin who opened this session as the user (Login As).
    pub impersonated_by: Option<UserId>,
}
