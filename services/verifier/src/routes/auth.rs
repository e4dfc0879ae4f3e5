//! Signing in: the password step, the challenge (verify, resend, switch), and
//! the session (introspection, sign-out).

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;
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

use base64::Engine;
use twofold_domain::tenant::settings::Enrollment;

use crate::backup_codes;
use crate::error::ApiError;
use crate::extract::{ApiJson, RequestMeta, SignedIn};
use crate::state::{AppState, Memory, UserKey};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignInRequest {
    username: String,
    password: SecretString,
    /// The remembered-device token, for clients that do not keep cookies.
    #[serde(default)]
    device_token: Option<SecretString>,
}

/// The cookie that carries the remembered-device token.
pub const DEVICE_COOKIE: &str = "twofold_device";

fn device_cookie(headers: &HeaderMap) -> Option<SecretString> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == DEVICE_COOKIE)
        .map(|(_, value)| SecretString::from(value.to_string()))
}

#[derive(Serialize)]
struct SessionBody {
    token: String,
    expires_at: DateTime<Utc>,
}

#[derive(Serialize)]
struct ChallengeBody {
    token: String,
    method: Method,
    methods: Vec<Method>,
    expires_at: DateTime<Utc>,
    resends_remaining: Option<u32>,
}

fn second_factor_json(use_: SecondFactorUse) -> serde_json::Value {
    match use_ {
        SecondFactorUse::Used { method } => json!({"used": true, "method": method.as_str()}),
        SecondFactorUse::Skipped { reason } => json!({"used": false, "skipped_because": reason}),
    }
}

/// The answer for a sign-in that opened a session; with the remembered-device
/// token (JSON and cookie) when this sign-in remembered the device, and any
/// `extra` fields (backup codes after enrollment).
fn signed_in_response(
    token: &SecretString,
    device_token: Option<&SecretString>,
    events: &[UserEvent],
    extra: serde_json::Value,
) -> Option<Response> {
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
    let mut body = json!({
        "status": "signed_in",
        "session": SessionBody { token: token.expose_secret().to_string(), expires_at },
        "second_factor": second_factor_json(second_factor),
    });
    if let (Some(obj), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        obj.extend(extra.clone());
    }
    let device = device_token.filter(|_| remembered);
    if let (Some(obj), Some(device)) = (body.as_object_mut(), device) {
        obj.insert("device_token".into(), json!(device.expose_secret()));
    }
    let mut response = Json(body).into_response();
    if let Some(device) = device {
        let cookie = format!(
            "{DEVICE_COOKIE}={}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
            device.expose_secret(),
            DEVICE_MAX_AGE_SECS
        );
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
    }
    Some(response)
}

/// How long a browser keeps the remembered-device cookie.
const DEVICE_MAX_AGE_SECS: i64 = 400 * 24 * 3600;

fn new_device(user_id: UserId) -> (SecretString, NewDevice) {
    let id = Uuid::new_v4();
    let (token, token_hash) = tokens::issue(TokenKind::Device, user_id, id);
    (token, NewDevice { id, token_hash })
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

/// `POST /v1/tenants/{tenant}/sign-in`
pub async fn sign_in(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    meta: RequestMeta,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SignInRequest>,
) -> Result<Response, ApiError> {
    // The tenant and the user, remembered or read together; a malformed
    // username finds no user.
    let (tenant_id, mut tenant, found) = match Username::parse(&body.username) {
        Ok(name) => {
            state
                .tenant_and_user(&tenant, UserKey::Name(name.as_str()), Memory::Use)
                .await?
        }
        Err(_) => {
            // No user to sign in; the tenant is only checked to exist.
            let (id, tenant) = state.tenant(&tenant).await?;
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
    if body.password.expose_secret().len() > crate::accounts::MAX_PASSWORD_BYTES {
        return Err(ApiError::bad_request(
            "password_too_long",
            "The password is too long.",
        ));
    }
    // An unknown or malformed username costs an argon2id check all the same.
    let stored = found
        .as_ref()
        .and_then(|(_, u)| u.state().password_hash.as_ref());
    let password_ok = state.passwords.verify(stored, &body.password).await?;
    let Some((user_id, basis)) = found else {
        metrics::counter!("twofold_sign_ins_total", "outcome" => "invalid_credentials")
            .increment(1);
        return Err(ApiError::invalid_credentials());
    };
    let device = body
        .device_token
        .or_else(|| device_cookie(&headers))
        .and_then(|t| tokens::parse(TokenKind::Device, &t))
        .filter(|claim| claim.user_id == user_id)
        .map(|claim| PresentedDevice {
            id: claim.item,
            token_hash: claim.hash,
        });
    let challenge_id = ChallengeId(Uuid::new_v4());
    let (challenge_token, challenge_hash) =
        tokens::issue(TokenKind::Challenge, user_id, challenge_id.as_uuid());
    let (session_token, session) = new_session(user_id);
    let ctx = meta.ctx(state.now(), Actor::User(user_id));
    let account = basis
        .state()
        .username
        .as_ref()
        .map(|u| u.as_str().to_string());
    let mut basis = Some(basis);
    // Decided under the tenant's settings as read; if they change before the
    // append, it is decided again under the new ones.
    let (events, enrollment) = loop {
        let settings = tenant.state().settings.clone();
        // A seed ready in case the tenant requires enrollment and the user has none.
        let enrollment = if settings.enrollment == Enrollment::Required {
            let seed = totp::new_secret();
            let sealed = state.keys.seal(&seed, user_id.as_uuid().as_bytes())?;
            Some((seed, sealed))
        } else {
            None
        };
        let reads = [tenant.read::<Tenant>(tenant_id.to_string())];
        let executed = state
            .users
            .execute_with(&user_id.to_string(), basis.take(), &reads, |_| {
                Ok(UserCommand::SignIn(SignIn {
                    password_ok,
                    settings: settings.clone(),
                    challenge: NewChallenge {
                        id: challenge_id,
                        token_hash: challenge_hash.clone(),
                    },
                    session: session.clone(),
                    device: device.clone(),
                    enrollment_seed: enrollment.as_ref().map(|(_, sealed)| sealed.clone()),
                    ctx: ctx.clone(),
                }))
            })
            .await;
        match executed {
            Err(ExecError::ReadMoved) => tenant = state.tenant_now(tenant_id).await?,
            other => break (other?, enrollment),
        }
    };
    let tenant = tenant.versioned.state;

    for event in &events {
        match event {
            UserEvent::PasswordRejected { .. } => {
                metrics::counter!("twofold_sign_ins_total", "outcome" => "invalid_credentials")
                    .increment(1);
                return Err(ApiError::invalid_credentials());
            }
            UserEvent::SignInRefusedLocked { .. } => {
                metrics::counter!("twofold_sign_ins_total", "outcome" => "locked").increment(1);
                return Err(ApiError::locked());
            }
            UserEvent::ChallengeIssued {
                method,
                methods,
                expires_at,
                resend_limit,
                purpose,
                ..
            } => {
                metrics::counter!("twofold_sign_ins_total", "outcome" => "challenged").increment(1);
                metrics::counter!("twofold_challenges_issued_total", "method" => method.as_str())
                    .increment(1);
                let challenge = ChallengeBody {
                    token: challenge_token.expose_secret().to_string(),
                    method: *method,
                    methods: methods.clone(),
                    expires_at: *expires_at,
                    resends_remaining: *resend_limit,
                };
                if let (ChallengePurpose::Enrollment, Some((seed, _))) = (purpose, &enrollment) {
                    let uri =
                        totp::otpauth_uri(seed, &tenant.name, account.as_deref().unwrap_or(""))?;
                    let png = qr::png(&uri)?;
                    return Ok(Json(json!({
                        "status": "enrollment_required",
                        "challenge": challenge,
                        "enrollment": {
                            "otpauth_uri": uri,
                            "secret": totp::base32(seed),
                            "qr_png_base64": base64::engine::general_purpose::STANDARD.encode(png),
                        },
                    }))
                    .into_response());
                }
                return Ok(
                    Json(json!({ "status": "challenge", "challenge": challenge })).into_response(),
                );
            }
            _ => {}
        }
    }
    metrics::counter!("twofold_sign_ins_total", "outcome" => "signed_in").increment(1);
    signed_in_response(&session_token, None, &events, json!({}))
        .ok_or_else(|| ApiError::unexpected("sign-in produced neither a challenge nor a session"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    challenge_token: SecretString,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    backup_code: Option<SecretString>,
}

/// What the client presented, parsed before anything is loaded.
enum Presented {
    Code(OtpCode),
    Backup(String),
}

fn challenge_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "challenge_not_found",
        "No such challenge, or it is already finished.",
    )
}

fn challenge_ref(token: &SecretString) -> Result<(UserId, ChallengeRef), ApiError> {
    let claim = tokens::parse(TokenKind::Challenge, token).ok_or_else(challenge_not_found)?;
    Ok((
        claim.user_id,
        ChallengeRef {
            id: ChallengeId(claim.item),
            token_hash: claim.hash,
        },
    ))
}

/// A challenge token names its user; that user must belong to the tenant in
/// the path (checked on the state the command is decided on).
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

/// Works out what a presented code proves against the user's current state.
fn proof_for(
    state: &AppState,
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
            hash: backup_codes::hash_for(&state.keys, user, code),
        }),
        Presented::Code(code) => match open.method {
            Method::Totp => {
                let factor = user
                    .totp
                    .as_ref()
                    .ok_or(ExecError::Refused(UserError::ProofDoesNotFitChallenge))?;
                let user_id = user.id.map(|u| u.as_uuid()).unwrap_or_default();
                let seed = state
                    .keys
                    .open(&factor.sealed, user_id.as_bytes())
                    .map_err(unexpected)?;
                let matched_step = totp::matching_step(&seed, code, at).map_err(unexpected)?;
                Ok(Proof::Totp { matched_step })
            }
            Method::Email | Method::Sms => {
                let expected = state.keys.delivered_code(open.id, open.generation);
                let matches = expected.as_bytes().ct_eq(code.expose().as_bytes()).into();
                Ok(Proof::Delivered { matches })
            }
        },
    }
}

/// `POST /v1/tenants/{tenant}/challenge/verify`
pub async fn verify(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    meta: RequestMeta,
    ApiJson(body): ApiJson<VerifyRequest>,
) -> Result<Response, ApiError> {
    // The token names the user, so the tenant and the user are remembered
    // or read together.
    let claimed = challenge_ref(&body.challenge_token);
    let read = match &claimed {
        Ok((user_id, _)) => Some(
            state
                .tenant_and_user(&tenant, UserKey::Id(*user_id), Memory::Use)
                .await?,
        ),
        Err(_) => {
            state.tenant(&tenant).await?;
            None
        }
    };
    let presented = match (&body.code, &body.backup_code) {
        (Some(code), None) => Presented::Code(
            OtpCode::parse(code)
                .map_err(|e| ApiError::bad_request("invalid_code_format", format!("The {e}.")))?,
        ),
        (None, Some(backup)) => Presented::Backup(
            backup_codes::normalize(backup.expose_secret()).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_backup_code_format",
                    "A backup code is 10 letters and digits, like abcde-23456.",
                )
            })?,
        ),
        _ => {
            return Err(ApiError::bad_request(
                "code_required",
                "Send exactly one of code or backup_code.",
            ))
        }
    };
    let ((user_id, reference), Some((tenant_id, mut tenant, found))) = (claimed?, read) else {
        return Err(challenge_not_found());
    };
    let (session_token, session) = new_session(user_id);
    let (device_token, device) = new_device(user_id);
    let ctx = meta.ctx(state.now(), Actor::User(user_id));
    let mut basis = Some(found.map(|(_, basis)| basis).unwrap_or(Basis {
        versioned: Versioned::default(),
        fresh: true,
    }));
    let (events, settings) = loop {
        let settings: TwoFactorSettings = tenant.state().settings.clone();
        let reads = [tenant.read::<Tenant>(tenant_id.to_string())];
        let executed = state
            .users
            .execute_with(&user_id.to_string(), basis.take(), &reads, |user| {
                owned_by(user, tenant_id)?;
                let open = user.open_challenge(&reference).map_err(ExecError::Refused)?;
                let proof = proof_for(&state, user, open, &presented, ctx.at)?;
                Ok(UserCommand::VerifyCode(VerifyCode {
                    challenge: reference.clone(),
                    proof,
                    settings: settings.clone(),
                    session: session.clone(),
                    device: device.clone(),
                    ctx: ctx.clone(),
                }))
            })
            .await
            .inspect_err(|e| {
                if matches!(e, ExecError::Refused(UserError::LockedOut)) {
                    metrics::counter!("twofold_verifications_total", "method" => "any", "outcome" => "locked")
                        .increment(1);
                }
            });
        match executed {
            Err(ExecError::ReadMoved) => tenant = state.tenant_now(tenant_id).await?,
            other => break (other?, settings),
        }
    };

    rejection_or(&events, &settings)?;
    if events
        .iter()
        .any(|e| matches!(e, UserEvent::StepUpCompleted { .. }))
    {
        return Ok(Json(json!({ "status": "stepped_up" })).into_response());
    }
    signed_in_response(&session_token, Some(&device_token), &events, json!({}))
        .ok_or_else(|| ApiError::unexpected("verification produced no session"))
}

/// Counts what a verification's events say and turns a refusal into its answer.
fn rejection_or(events: &[UserEvent], settings: &TwoFactorSettings) -> Result<(), ApiError> {
    let limit = settings.max_invalid_attempts.limit();
    let mut rejected = None;
    for event in events {
        match event {
            UserEvent::CodeVerified { method, .. } => {
                metrics::counter!("twofold_verifications_total", "method" => method.as_str(), "outcome" => "verified")
                    .increment(1);
            }
            UserEvent::BackupCodeUsed { .. } => {
                metrics::counter!("twofold_verifications_total", "method" => "backup_code", "outcome" => "verified")
                    .increment(1);
            }
            UserEvent::ChallengeExpired { .. } => {
                metrics::counter!("twofold_verifications_total", "method" => "any", "outcome" => "expired")
                    .increment(1);
                return Err(UserError::ChallengeExpired.into());
            }
            UserEvent::CodeRejected {
                proof, failures, ..
            } => {
                metrics::counter!("twofold_verifications_total", "method" => proof.as_str(), "outcome" => "rejected")
                    .increment(1);
                rejected = Some((*proof, *failures));
            }
            UserEvent::UserLockedOut { .. } => {
                metrics::counter!("twofold_lockouts_total").increment(1);
                return Err(ApiError::locked());
            }
            _ => {}
        }
    }
    if let Some((proof, failures)) = rejected {
        let kind = if proof == ProofKind::BackupCode {
            "backup code"
        } else {
            "code"
        };
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_code",
            format!("The {kind} is wrong or was already used."),
        )
        .with_details(json!({ "attempts_remaining": limit.saturating_sub(failures) })));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteEnrollmentRequest {
    challenge_token: SecretString,
    code: String,
}

/// `POST /v1/tenants/{tenant}/enrollment/complete`: required enrollment at
/// sign-in. The new authenticator's first code activates it and completes the
/// sign-in; answers the session and the 8 backup codes, shown once.
pub async fn complete_enrollment(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    meta: RequestMeta,
    ApiJson(body): ApiJson<CompleteEnrollmentRequest>,
) -> Result<Response, ApiError> {
    let (tenant_id, tenant) = state.tenant(&tenant).await?;
    let code = OtpCode::parse(&body.code)
        .map_err(|e| ApiError::bad_request("invalid_code_format", format!("The {e}.")))?;
    let (user_id, reference) = challenge_ref(&body.challenge_token)?;
    let (session_token, session) = new_session(user_id);
    let (device_token, device) = new_device(user_id);
    let (codes, hashes) = backup_codes::issue(&state.keys, user_id.as_uuid().as_bytes());
    let ctx = meta.ctx(state.now(), Actor::User(user_id));
    let settings = tenant.settings;
    let events = state
        .users
        .execute(&user_id.to_string(), |user| {
            owned_by(user, tenant_id)?;
            user.open_challenge(&reference)
                .map_err(ExecError::Refused)?;
            let sealed = user
                .pending_totp
                .as_ref()
                .ok_or(ExecError::Refused(UserError::NoEnrollmentInProgress))?;
            let seed = state
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
    rejection_or(&events, &settings)?;
    metrics::counter!("twofold_enrollments_total", "method" => "totp").increment(1);
    signed_in_response(
        &session_token,
        Some(&device_token),
        &events,
        json!({ "backup_codes": codes }),
    )
    .ok_or_else(|| ApiError::unexpected("enrollment produced no session"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    challenge_token: SecretString,
    #[serde(default)]
    method: Option<String>,
}

/// Runs one command on the open challenge a token names, for the tenant in
/// the path, and answers the challenge's state after it.
async fn challenge_command(
    state: &AppState,
    tenant: &str,
    meta: &RequestMeta,
    token: &SecretString,
    command: impl Fn(ChallengeRef, Ctx) -> UserCommand,
) -> Result<Response, ApiError> {
    let (tenant_id, _) = state.tenant(tenant).await?;
    let (user_id, reference) = challenge_ref(token)?;
    let ctx = meta.ctx(state.now(), Actor::User(user_id));
    state
        .users
        .execute(&user_id.to_string(), |user| {
            owned_by(user, tenant_id)?;
            Ok(command(reference.clone(), ctx.clone()))
        })
        .await?;
    challenge_state(state, user_id, &reference).await
}

/// `POST /v1/tenants/{tenant}/challenge/resend`
pub async fn resend(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    meta: RequestMeta,
    ApiJson(body): ApiJson<ChallengeRequest>,
) -> Result<Response, ApiError> {
    challenge_command(
        &state,
        &tenant,
        &meta,
        &body.challenge_token,
        |challenge, ctx| UserCommand::ResendCode { challenge, ctx },
    )
    .await
}

/// `POST /v1/tenants/{tenant}/challenge/switch`
pub async fn switch(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    meta: RequestMeta,
    ApiJson(body): ApiJson<ChallengeRequest>,
) -> Result<Response, ApiError> {
    let method =
        Method::parse(body.method.as_deref().unwrap_or("")).map_err(ApiError::invalid_value)?;
    let answer = challenge_command(
        &state,
        &tenant,
        &meta,
        &body.challenge_token,
        |challenge, ctx| UserCommand::SwitchMethod {
            challenge,
            method,
            ctx,
        },
    )
    .await?;
    metrics::counter!("twofold_challenges_issued_total", "method" => method.as_str()).increment(1);
    Ok(answer)
}

async fn challenge_state(
    state: &AppState,
    user_id: UserId,
    reference: &ChallengeRef,
) -> Result<Response, ApiError> {
    let user = state.users.load(&user_id.to_string()).await?;
    let open = user.open_challenge(reference)?;
    Ok(Json(json!({
        "method": open.method,
        "methods": open.methods,
        "expires_at": open.expires_at,
        "resends_remaining": open.resends_remaining(),
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectRequest {
    token: SecretString,
}

/// `POST /v1/tenants/{tenant}/sessions/introspect`: what a portal calls to
/// check a session token.
pub async fn introspect(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<IntrospectRequest>,
) -> Result<Response, ApiError> {
    let inactive = || Ok(Json(json!({ "active": false })).into_response());
    let Some(claim) = tokens::parse(TokenKind::Session, &body.token) else {
        state.tenant(&tenant).await?;
        return inactive();
    };
    let (_, _, found) = state
        .tenant_and_user(&tenant, UserKey::Id(claim.user_id), Memory::Fresh)
        .await?;
    let Some((
        _,
        Basis {
            versioned: Versioned { state: user, .. },
            ..
        },
    )) = found
    else {
        return inactive();
    };
    let Some(session) = user.live_session(SessionId(claim.item), &claim.hash, state.now()) else {
        return inactive();
    };
    Ok(Json(json!({
        "active": true,
        "user_id": claim.user_id,
        "username": user.username.as_ref().map(|u| u.as_str()),
        "roles": user.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "session_id": claim.item,
        "started_at": session.started_at,
        "expires_at": session.expires_at,
        "second_factor": second_factor_json(session.second_factor),
    }))
    .into_response())
}

/// `POST /v1/tenants/{tenant}/sign-out`
pub async fn sign_out(
    State(state): State<AppState>,
    meta: RequestMeta,
    signed_in: SignedIn,
) -> Result<StatusCode, ApiError> {
    let ctx = meta.ctx(state.now(), signed_in.actor());
    state
        .users
        .execute(&signed_in.user_id.to_string(), |_| {
            Ok(UserCommand::EndSession {
                session_id: signed_in.session_id,
                reason: SessionEndReason::SignedOut,
                ctx: ctx.clone(),
            })
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
