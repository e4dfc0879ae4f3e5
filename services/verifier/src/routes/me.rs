//! The signed-in user's own account: profile and authenticator enrollment.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use twofold_domain::user::{NewChallenge, UserCommand, UserError, UserEvent};
use twofold_domain::values::{Email, OtpCode, Phone};
use twofold_domain::{ChallengeId, Ctx};
use twofold_platform::tokens::{self, TokenKind};
use twofold_platform::{qr, totp};
use uuid::Uuid;

use crate::backup_codes;
use crate::error::ApiError;
use crate::extract::{ApiJson, RequestMeta, SignedIn};
use crate::state::AppState;

/// `GET /v1/tenants/{tenant}/me`
pub async fn profile(signed_in: SignedIn) -> Json<serde_json::Value> {
    let u = &signed_in.user;
    Json(json!({
        "user_id": signed_in.user_id,
        "username": u.username.as_ref().map(|n| n.as_str()),
        "email": u.email.as_ref().map(|e| e.as_str()),
        "phone": u.phone.as_ref().map(|p| p.as_str()),
        "roles": u.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "service_account": u.service_account,
        "two_factor": u.two_factor,
        "two_factor_opted_in": u.two_factor_opted_in,
        "backup_codes_left": u.backup_codes_left(),
    }))
}

async fn issuer(state: &AppState, signed_in: &SignedIn) -> Result<String, ApiError> {
    Ok(state.tenant(&signed_in.tenant_id.to_string()).await?.1.name)
}

fn pending_seed(state: &AppState, signed_in: &SignedIn) -> Result<Vec<u8>, ApiError> {
    let sealed = signed_in
        .user
        .pending_totp
        .as_ref()
        .ok_or(UserError::NoEnrollmentInProgress)?;
    Ok(state
        .keys
        .open(sealed, signed_in.user_id.as_uuid().as_bytes())?)
}

/// `POST /v1/tenants/{tenant}/me/totp`: starts enrolling an authenticator app.
/// Answers the otpauth URI, the seed in base32 for typing in, and the QR code.
pub async fn start_totp(
    State(state): State<AppState>,
    meta: RequestMeta,
    signed_in: SignedIn,
) -> Result<Response, ApiError> {
    let seed = totp::new_secret();
    let sealed = state
        .keys
        .seal(&seed, signed_in.user_id.as_uuid().as_bytes())?;
    let ctx = meta.ctx(state.now(), signed_in.actor());
    state
        .users
        .execute(&signed_in.user_id.to_string(), |_| {
            Ok(UserCommand::StartTotpEnrollment {
                sealed: sealed.clone(),
                ctx: ctx.clone(),
            })
        })
        .await?;
    let account = signed_in
        .user
        .username
        .as_ref()
        .map(|u| u.as_str().to_string())
        .unwrap_or_default();
    let uri = totp::otpauth_uri(&seed, &issuer(&state, &signed_in).await?, &account)?;
    let png = qr::png(&uri)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "otpauth_uri": uri,
            "secret": totp::base32(&seed),
            "qr_png_base64": B64.encode(png),
        })),
    )
        .into_response())
}

/// `GET /v1/tenants/{tenant}/me/totp/qr.png`: the pending enrollment's QR code.
pub async fn totp_qr(
    State(state): State<AppState>,
    signed_in: SignedIn,
) -> Result<Response, ApiError> {
    let seed = pending_seed(&state, &signed_in)?;
    let account = signed_in
        .user
        .username
        .as_ref()
        .map(|u| u.as_str().to_string())
        .unwrap_or_default();
    let uri = totp::otpauth_uri(&seed, &issuer(&state, &signed_in).await?, &account)?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        qr::png(&uri)?,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmRequest {
    code: String,
}

/// `POST /v1/tenants/{tenant}/me/totp/confirm`: activates the authenticator
/// once a valid code shows the app has the seed; answers the 8 backup codes,
/// shown this once.
pub async fn confirm_totp(
    State(state): State<AppState>,
    meta: RequestMeta,
    signed_in: SignedIn,
    ApiJson(body): ApiJson<ConfirmRequest>,
) -> Result<Response, ApiError> {
    let code = OtpCode::parse(&body.code)
        .map_err(|e| ApiError::bad_request("invalid_code_format", format!("The {e}.")))?;
    let seed = pending_seed(&state, &signed_in)?;
    let at = state.now();
    let matched_step = totp::matching_step(&seed, &code, at)?;
    let user_bytes = signed_in.user_id.as_uuid();
    let (codes, hashes) = backup_codes::issue(&state.keys, user_bytes.as_bytes());
    let ctx = meta.ctx(at, signed_in.actor());
    let events = state
        .users
        .execute(&signed_in.user_id.to_string(), |_| {
            Ok(UserCommand::ConfirmTotpEnrollment {
                matched_step,
                backup_codes: hashes.clone(),
                ctx: ctx.clone(),
            })
        })
        .await?;
    if events
        .iter()
        .any(|e| matches!(e, UserEvent::EnrollmentCompleted { .. }))
    {
        metrics::counter!("twofold_enrollments_total", "method" => "totp").increment(1);
        Ok(Json(json!({ "two_factor": "enrolled", "backup_codes": codes })).into_response())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_code",
            "The code does not match the authenticator. Check the app's clock and try the current code.",
        ))
    }
}

/// Runs one command on the signed-in user's own account.
async fn own_command(
    state: &AppState,
    meta: &RequestMeta,
    signed_in: &SignedIn,
    command: impl Fn(Ctx) -> UserCommand,
) -> Result<(), ApiError> {
    let ctx = meta.ctx(state.now(), signed_in.actor());
    state
        .users
        .execute(&signed_in.user_id.to_string(), |_| Ok(command(ctx.clone())))
        .await?;
    Ok(())
}

/// `POST /v1/tenants/{tenant}/me/step-up`: asks for a current factor before a
/// sensitive change. Answer the challenge at `/challenge/verify`; the session
/// may then make sensitive changes for 10 minutes.
pub async fn step_up(
    State(state): State<AppState>,
    meta: RequestMeta,
    signed_in: SignedIn,
) -> Result<Response, ApiError> {
    let user_id = signed_in.user_id;
    let challenge_id = ChallengeId(Uuid::new_v4());
    let (token, token_hash) = tokens::issue(TokenKind::Challenge, user_id, challenge_id.as_uuid());
    let ctx = meta.ctx(state.now(), signed_in.actor());
    let settings = signed_in.tenant.settings.clone();
    let events = state
        .users
        .execute(&user_id.to_string(), |_| {
            Ok(UserCommand::StartStepUp {
                session_id: signed_in.session_id,
                challenge: NewChallenge {
                    id: challenge_id,
                    token_hash: token_hash.clone(),
                },
                settings: settings.clone(),
                ctx: ctx.clone(),
            })
        })
        .await?;
    let issued = events.iter().find_map(|e| match e {
        UserEvent::ChallengeIssued {
            method,
            methods,
            expires_at,
            resend_limit,
            ..
        } => Some(json!({
            "status": "challenge",
            "challenge": {
                "token": token.expose_secret(),
                "method": method,
                "methods": methods,
                "expires_at": expires_at,
                "resends_remaining": resend_limit,
            }
        })),
        _ => None,
    });
    issued
        .map(|body| Json(body).into_response())
        .ok_or_else(|| ApiError::unexpected("step-up issued no challenge"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoluntaryRequest {
    enabled: bool,
}

/// `POST /v1/tenants/{tenant}/me/two-factor`: opt in to (or, after a step-up,
/// out of) 2FA where the tenant leaves it to each user.
pub async fn set_voluntary(
    State(state): State<AppState>,
    meta: RequestMeta,
    signed_in: SignedIn,
    ApiJson(body): ApiJson<VoluntaryRequest>,
) -> Result<StatusCode, ApiError> {
    let tenant_enabled = signed_in.tenant.settings.enabled;
    own_command(&state, &meta, &signed_in, |ctx| {
        UserCommand::SetVoluntaryTwoFactor {
            on: body.enabled,
            tenant_enabled,
            step_up: signed_in.session_id,
            ctx,
        }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/tenants/{tenant}/me/backup-codes`: new codes (after a step-up);
/// the old ones stop working.
pub async fn regenerate_backup_codes(
    State(state): State<AppState>,
    meta: RequestMeta,
    signed_in: SignedIn,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (codes, hashes) = backup_codes::issue(&state.keys, signed_in.user_id.as_uuid().as_bytes());
    own_command(&state, &meta, &signed_in, |ctx| {
        UserCommand::RegenerateBackupCodes {
            backup_codes: hashes.clone(),
            step_up: Some(signed_in.session_id),
            ctx,
        }
    })
    .await?;
    Ok(Json(json!({ "backup_codes": codes })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContactRequest {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    phone: Option<String>,
}

/// `PATCH /v1/tenants/{tenant}/me`: change the email or phone codes go to
/// (after a step-up). A factor change ends every session, this one included.
pub async fn change_contact(
    State(state): State<AppState>,
    meta: RequestMeta,
    signed_in: SignedIn,
    ApiJson(body): ApiJson<ContactRequest>,
) -> Result<StatusCode, ApiError> {
    let email = body
        .email
        .map(|e| Email::parse(&e).map(Some))
        .transpose()
        .map_err(ApiError::invalid_value)?;
    let phone = body
        .phone
        .map(|p| Phone::parse(&p).map(Some))
        .transpose()
        .map_err(ApiError::invalid_value)?;
    own_command(&state, &meta, &signed_in, |ctx| {
        UserCommand::ChangeContact {
            email: email.clone(),
            phone: phone.clone(),
            step_up: signed_in.session_id,
            ctx,
        }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/tenants/{tenant}/me/totp`: remove the authenticator (after a
/// step-up); every session ends.
pub async fn remove_totp(
    State(state): State<AppState>,
    meta: RequestMeta,
    signed_in: SignedIn,
) -> Result<StatusCode, ApiError> {
    own_command(&state, &meta, &signed_in, |ctx| {
        UserCommand::RemoveAuthenticator {
            step_up: signed_in.session_id,
            ctx,
        }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
