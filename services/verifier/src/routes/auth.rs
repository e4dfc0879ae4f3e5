//! Signing in over HTTP: the password step, the challenge (verify, resend,
//! switch), required enrollment, and the session (introspection, sign-out).
//! Each handler parses the request, calls one use case and renders its answer.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};
use twofold_app::auth::{
    IssuedChallenge, NewAuthenticator, SignInOutcome, SignInRequest, SignedIn, VerifyOutcome,
    VerifyRequest,
};
use twofold_domain::user::SecondFactorUse;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::extract::{self, ApiJson, RequestMeta};
use crate::openapi::{
    AnyErrors, BodyErrors, ChallengeState, ErrorBody, Introspection, SessionErrors, SignInAnswer,
    TenantPath,
};
use crate::ApiState;

/// The cookie that carries the remembered-device token.
pub const DEVICE_COOKIE: &str = "twofold_device";

/// How long a browser keeps the remembered-device cookie.
const DEVICE_MAX_AGE: time::Duration = time::Duration::days(400);

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignInBody {
    username: String,
    #[schema(value_type = String)]
    password: SecretString,
    /// The remembered-device token, for clients that do not keep cookies.
    #[serde(default)]
    #[schema(value_type = Option<String>, required = false)]
    device_token: Option<SecretString>,
}

pub fn second_factor_json(use_: SecondFactorUse) -> Value {
    match use_ {
        SecondFactorUse::Used { method } => json!({"used": true, "method": method.as_str()}),
        SecondFactorUse::Skipped { reason } => json!({"used": false, "skipped_because": reason}),
    }
}

pub fn challenge_json(challenge: &IssuedChallenge) -> Value {
    let mut body = json!(challenge.state);
    if let Some(obj) = body.as_object_mut() {
        obj.insert("token".into(), json!(challenge.token.expose_secret()));
    }
    body
}

pub fn enrollment_json(enrollment: &NewAuthenticator) -> Value {
    json!({
        "otpauth_uri": enrollment.otpauth_uri,
        "secret": enrollment.secret,
        "qr_png_base64": B64.encode(&enrollment.qr_png),
    })
}

/// The answer for a sign-in that opened a session, with the remembered-device
/// token (JSON and cookie) when it remembered the device, and the backup
/// codes when it issued them.
fn signed_in_response(jar: CookieJar, signed_in: SignedIn) -> Response {
    let mut body = json!({
        "status": "signed_in",
        "session": {
            "token": signed_in.session_token.expose_secret(),
            "expires_at": signed_in.expires_at,
        },
        "second_factor": second_factor_json(signed_in.second_factor),
    });
    if let Some(obj) = body.as_object_mut() {
        if !signed_in.backup_codes.is_empty() {
            obj.insert("backup_codes".into(), json!(signed_in.backup_codes));
        }
        if let Some(device) = &signed_in.device_token {
            obj.insert("device_token".into(), json!(device.expose_secret()));
        }
        if let Some(code) = &signed_in.replacement_code {
            obj.insert("backup_code_replacement".into(), json!(code));
        }
        if signed_in.password_change_required {
            obj.insert("password_change_required".into(), json!(true));
        }
    }
    let jar = match signed_in.device_token {
        Some(device) => jar.add(
            Cookie::build((DEVICE_COOKIE, device.expose_secret().to_string()))
                .path("/")
                .max_age(DEVICE_MAX_AGE)
                .http_only(true)
                .secure(true)
                .same_site(SameSite::Lax),
        ),
        None => jar,
    };
    (jar, Json(body)).into_response()
}

/// Sign in with a password
///
/// Opens a session, or asks a second factor (`challenge`), or asks to set
/// up an authenticator first (`enrollment_required`).
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/sign-in", tag = "sign-in", params(TenantPath),
    request_body = SignInBody,
    responses(
        (status = 200, description = "`signed_in`, `challenge` or `enrollment_required`", body = SignInAnswer),
        AnyErrors, BodyErrors,
        (status = 401, description = "`invalid_credentials` (unknown user and wrong password alike)", body = ErrorBody),
        (status = 403, description = "`second_factor_unavailable`: no usable method", body = ErrorBody),
        (status = 423, description = "`account_locked`", body = ErrorBody),
        (status = 429, description = "`too_many_attempts` with `retry_after_secs`", body = ErrorBody),
    )
)]
pub async fn sign_in(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    jar: CookieJar,
    ApiJson(body): ApiJson<SignInBody>,
) -> Result<Response, ApiError> {
    let device_token = body.device_token.or_else(|| {
        jar.get(DEVICE_COOKIE)
            .map(|c| SecretString::from(c.value().to_string()))
    });
    let request = SignInRequest {
        username: body.username,
        password: body.password,
        device_token,
    };
    Ok(match api.app.sign_in(&tenant, request, &origin).await? {
        SignInOutcome::SignedIn(signed_in) => signed_in_response(jar, signed_in),
        SignInOutcome::Challenge(challenge) => {
            Json(json!({ "status": "challenge", "challenge": challenge_json(&challenge) }))
                .into_response()
        }
        SignInOutcome::EnrollmentRequired {
            challenge,
            enrollment,
            skippable,
        } => Json(json!({
            "status": "enrollment_required",
            "challenge": challenge_json(&challenge),
            "enrollment": enrollment_json(&enrollment),
            "skippable": skippable,
        }))
        .into_response(),
    })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyBody {
    #[schema(value_type = String)]
    challenge_token: SecretString,
    /// The code sent or shown by the authenticator (or `backup_code`, not both).
    #[serde(default)]
    #[schema(required = false)]
    code: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>, required = false)]
    backup_code: Option<SecretString>,
}

/// Answer a challenge with a code or a backup code
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/challenge/verify", tag = "sign-in", params(TenantPath),
    request_body = VerifyBody,
    responses(
        (status = 200, description = "`signed_in` with a session, `stepped_up` or `contact_verified`", body = SignInAnswer),
        AnyErrors, BodyErrors,
        (status = 400, description = "`code_required` (neither or both of `code` and `backup_code`), `malformed_json`", body = ErrorBody),
        (status = 401, description = "`invalid_code` with `attempts_remaining`", body = ErrorBody),
        (status = 404, description = "`challenge_not_found`, `tenant_not_found`", body = ErrorBody),
        (status = 409, description = "the challenge does not take this kind of proof", body = ErrorBody),
        (status = 410, description = "`challenge_expired`", body = ErrorBody),
        (status = 423, description = "`account_locked`", body = ErrorBody),
        (status = 429, description = "`too_many_attempts`", body = ErrorBody),
    )
)]
pub async fn verify(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    jar: CookieJar,
    ApiJson(body): ApiJson<VerifyBody>,
) -> Result<Response, ApiError> {
    let request = VerifyRequest {
        challenge_token: body.challenge_token,
        code: body.code,
        backup_code: body.backup_code,
    };
    Ok(match api.app.verify(&tenant, request, &origin).await? {
        VerifyOutcome::SignedIn(signed_in) => signed_in_response(jar, signed_in),
        VerifyOutcome::SteppedUp => Json(json!({ "status": "stepped_up" })).into_response(),
        VerifyOutcome::ContactVerified => {
            Json(json!({ "status": "contact_verified" })).into_response()
        }
    })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteEnrollmentBody {
    #[schema(value_type = String)]
    challenge_token: SecretString,
    code: String,
}

/// Finish the enrollment a sign-in required, with the authenticator's first code
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/enrollment/complete", tag = "sign-in", params(TenantPath),
    request_body = CompleteEnrollmentBody,
    responses(
        (status = 200, description = "`signed_in`, with the backup codes", body = SignInAnswer),
        AnyErrors, BodyErrors,
        (status = 401, description = "`invalid_code` with `attempts_remaining`", body = ErrorBody),
        (status = 404, description = "`challenge_not_found`, `tenant_not_found`", body = ErrorBody),
        (status = 409, description = "not an enrollment challenge", body = ErrorBody),
        (status = 410, description = "`challenge_expired`", body = ErrorBody),
        (status = 423, description = "`account_locked`", body = ErrorBody),
        (status = 429, description = "`too_many_attempts`", body = ErrorBody),
    )
)]
pub async fn complete_enrollment(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    jar: CookieJar,
    ApiJson(body): ApiJson<CompleteEnrollmentBody>,
) -> Result<Response, ApiError> {
    let signed_in = api
        .app
        .complete_enrollment(&tenant, &body.challenge_token, &body.code, &origin)
        .await?;
    Ok(signed_in_response(jar, signed_in))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkipEnrollmentBody {
    #[schema(value_type = String)]
    challenge_token: SecretString,
}

/// Go on without the authenticator offered at sign-in
///
/// Only where enrollment is optional.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/enrollment/skip", tag = "sign-in", params(TenantPath),
    request_body = SkipEnrollmentBody,
    responses(
        (status = 200, description = "`signed_in`", body = SignInAnswer),
        AnyErrors, BodyErrors,
        (status = 404, description = "`challenge_not_found`, `tenant_not_found`", body = ErrorBody),
        (status = 409, description = "`enrollment_required`, or not an enrollment challenge", body = ErrorBody),
        (status = 410, description = "`challenge_expired`", body = ErrorBody),
    )
)]
pub async fn skip_enrollment(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    jar: CookieJar,
    ApiJson(body): ApiJson<SkipEnrollmentBody>,
) -> Result<Response, ApiError> {
    let signed_in = api
        .app
        .skip_enrollment(&tenant, &body.challenge_token, &origin)
        .await?;
    Ok(signed_in_response(jar, signed_in))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChallengeBody {
    #[schema(value_type = String)]
    challenge_token: SecretString,
    /// For `/challenge/switch`: `totp`, `email` or `sms`.
    #[serde(default)]
    #[schema(required = false)]
    method: Option<String>,
}

/// Send a new code for an email or SMS challenge
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/challenge/resend", tag = "sign-in", params(TenantPath),
    request_body = ChallengeBody,
    responses(
        (status = 200, description = "the challenge, with a new code on its way", body = ChallengeState),
        AnyErrors, BodyErrors,
        (status = 404, description = "`challenge_not_found`, `tenant_not_found`", body = ErrorBody),
        (status = 409, description = "`nothing_to_resend`", body = ErrorBody),
        (status = 410, description = "`challenge_expired`", body = ErrorBody),
        (status = 423, description = "`account_locked`", body = ErrorBody),
        (status = 429, description = "`resend_limit_reached`, or a code budget spent (`retry_after_secs`)", body = ErrorBody),
    )
)]
pub async fn resend(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    ApiJson(body): ApiJson<ChallengeBody>,
) -> Result<Response, ApiError> {
    let state = api
        .app
        .resend(&tenant, &body.challenge_token, &origin)
        .await?;
    Ok(Json(state).into_response())
}

/// Fall back to another method the challenge lists
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/challenge/switch", tag = "sign-in", params(TenantPath),
    request_body = ChallengeBody,
    responses(
        (status = 200, description = "the challenge, now for that method", body = ChallengeState),
        AnyErrors, BodyErrors,
        (status = 404, description = "`challenge_not_found`, `tenant_not_found`", body = ErrorBody),
        (status = 409, description = "`method_not_available`", body = ErrorBody),
        (status = 410, description = "`challenge_expired`", body = ErrorBody),
        (status = 423, description = "`account_locked`", body = ErrorBody),
        (status = 429, description = "a code budget spent (`retry_after_secs`)", body = ErrorBody),
    )
)]
pub async fn switch(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    ApiJson(body): ApiJson<ChallengeBody>,
) -> Result<Response, ApiError> {
    let method = body.method.unwrap_or_default();
    let state = api
        .app
        .switch(&tenant, &body.challenge_token, &method, &origin)
        .await?;
    Ok(Json(state).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntrospectBody {
    #[schema(value_type = String)]
    token: SecretString,
}

/// Check a session token
///
/// What a portal calls to learn whether a token is a live session, and whose.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/sessions/introspect", tag = "sign-in", params(TenantPath),
    request_body = IntrospectBody,
    responses(
        (status = 200, description = "`{\"active\": false}` or the live session", body = Introspection),
        AnyErrors, BodyErrors,
    )
)]
pub async fn introspect(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<IntrospectBody>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        match api.app.introspect(&tenant, &body.token).await? {
            None => json!({ "active": false }),
            Some(s) => json!({
                "active": true,
                "user_id": s.user_id,
                "username": s.username,
                "roles": s.roles,
                "session_id": s.session_id,
                "started_at": s.started_at,
                "expires_at": s.expires_at,
                "second_factor": second_factor_json(s.second_factor),
                "impersonated_by": s.impersonated_by,
            }),
        },
    ))
}

/// End this session
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/sign-out", tag = "sign-in", params(TenantPath),
    security(("session" = [])),
    responses((status = 204, description = "signed out"), AnyErrors, SessionErrors)
)]
pub async fn sign_out(
    State(api): State<ApiState>,
    RequestMeta(origin): RequestMeta,
    extract::SignedIn(session): extract::SignedIn,
) -> Result<StatusCode, ApiError> {
    api.app.sign_out(&session, &origin).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetWithLinkBody {
    /// The token of the emailed reset link.
    #[schema(value_type = String)]
    token: SecretString,
    #[schema(value_type = String)]
    new_password: SecretString,
}

/// Choose a new password through an emailed reset link
///
/// Every session ends, and the next sign-in asks the second factor as always.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/password/reset", tag = "sign-in", params(TenantPath),
    request_body = ResetWithLinkBody,
    responses(
        (status = 204, description = "the password is changed"),
        AnyErrors, BodyErrors,
        (status = 410, description = "`reset_link_invalid`: used, replaced, expired or forged", body = ErrorBody),
        (status = 422, description = "`invalid_field` (the password's length), `invalid_body`", body = ErrorBody),
    )
)]
pub async fn reset_with_link(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    ApiJson(body): ApiJson<ResetWithLinkBody>,
) -> Result<StatusCode, ApiError> {
    api.app
        .reset_password_with_link(&tenant, &body.token, &body.new_password, &origin)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
