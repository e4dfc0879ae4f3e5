//! The end user's pages: sign-in, the second-factor challenge, enrollment
//! (required at sign-in, or chosen on the account page), recovery codes, and
//! the account page with its sensitive changes behind a step-up.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use axum_extra::extract::cookie::{Cookie, CookieJar};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use maud::{html, Markup};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use twofold_app::auth::{
    ChallengeState, NewAuthenticator, SignInOutcome, SignInRequest, SignedIn, VerifyOutcome,
    VerifyRequest,
};
use twofold_app::me::ContactChange;
use twofold_app::{AppError, Session};
use twofold_domain::user::{
    ChallengePurpose, ProofKind, SecondFactorUse, SkipReason, TwoFactorState,
};
use twofold_domain::values::Method;
use twofold_domain::SessionId;
use uuid::Uuid;

use super::forms::{
    tenant_cookie, BrowserSession, CheckedForm, FormNonce, NoFields, PageError, CHALLENGE_COOKIE,
    SESSION_COOKIE,
};
use super::layout::{self, message, token_input, when, Frame};
use crate::extract::RequestMeta;
use crate::routes::auth::DEVICE_COOKIE;
use crate::ApiState;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route(
            "/",
            get(|Path(t): Path<String>| async move { Redirect::to(&format!("/t/{t}/account")) }),
        )
        .route("/sign-in", get(sign_in_page).post(sign_in))
        .route("/challenge", get(challenge_page).post(verify))
        .route("/challenge/resend", post(resend))
        .route("/challenge/switch", post(switch))
        .route("/enroll", get(enroll_page).post(complete_enrollment))
        .route("/enroll/skip", post(skip_enrollment))
        .route("/sign-out", post(sign_out))
        .route("/account", get(account))
        .route("/account/totp", post(start_totp))
        .route("/account/totp/confirm", post(confirm_totp))
        .route("/account/totp/remove", post(remove_totp))
        .route("/account/backup-codes", post(regenerate_codes))
        .route("/account/recovery-codes", post(show_codes))
        .route("/account/two-factor", post(set_voluntary))
        .route("/account/preferred-method", post(set_preferred))
        .route("/account/password", post(change_password))
        .route("/account/contact", post(change_contact))
        .route("/reset", get(reset_page).post(reset_password))
        .route("/account/step-up", post(step_up))
        .route("/account/sessions/{session}/end", post(end_session))
        .route("/account/devices/{device}/forget", post(forget_device))
}

type Page = Result<Response, PageError>;

/// The frame of a page for someone not signed in.
fn anonymous<'a>(tenant: &'a str, name: &'a str) -> Frame<'a> {
    Frame {
        tenant_id: tenant,
        tenant_name: name,
        signed_in: None,
        console: false,
        tab: None,
    }
}

/// The frame of a signed-in user's page.
fn signed_in_frame<'a>(session: &'a Session, tenant: &'a str, token: &'a str) -> Frame<'a> {
    Frame {
        tenant_id: tenant,
        tenant_name: &session.tenant.name,
        signed_in: Some(token),
        console: session.user.is_admin() || session.user.is_auditor(),
        tab: None,
    }
}

async fn tenant_name(api: &ApiState, tenant: &str) -> Result<String, PageError> {
    Ok(api.app.tenant(tenant).await?.1.name)
}

fn challenge_token(jar: &CookieJar) -> Option<SecretString> {
    jar.get(CHALLENGE_COOKIE)
        .map(|c| SecretString::from(c.value().to_string()))
}

/// Drops a tenant-scoped cookie.
fn forget(jar: CookieJar, name: &'static str, tenant: &str) -> CookieJar {
    jar.remove(Cookie::build(name).path(format!("/t/{tenant}")))
}

#[derive(Deserialize, Default)]
pub struct Notice {
    #[serde(default)]
    pub done: Option<String>,
}

/// A fixed sentence for a redirect's `?done=` (never the query's own text).
fn notice_text(done: Option<&str>) -> Option<&'static str> {
    Some(match done? {
        "signed_out" => "You are signed out.",
        "stepped_up" => {
            "Confirmed. For the next 10 minutes you can change your two-factor settings."
        }
        "removed" => "The authenticator app is removed. Every session was ended; sign in again.",
        "contact" => "Your contact details are changed. Every session was ended; sign in again.",
        "voluntary_on" => "Two-factor authentication is on for your account.",
        "voluntary_off" => "Two-factor authentication is off for your account.",
        "session_ended" => "The session is ended.",
        "preferred" => "Saved: that method is asked first from your next sign-in.",
        "password" => "Your password is changed. Your other sessions were ended.",
        "device_forgotten" => {
            "The device is forgotten: it will be asked for a second factor again."
        }
        "expired" => "That sign-in took too long. Start again.",
        "password_reset" => {
            "Your new password is set and every session was ended. Sign in with it (your second factor is still asked)."
        }
        "settings_saved" => {
            "Settings saved. Sign out and in again with a second factor to keep using the console."
        }
        _ => return None,
    })
}

// ---------------------------------------------------------------- sign-in

fn sign_in_form(tenant: &str, token: &str, username: &str, error: Option<&str>) -> Markup {
    html! {
        @if let Some(e) = error { (message("error", e)) }
        form method="post" action={ "/t/" (tenant) "/sign-in" } {
            (token_input(token))
            label for="username" { "Username" }
            input #username type="text" name="username" value=(username) autocomplete="username"
                autocapitalize="none" required autofocus;
            label for="password" { "Password" }
            input #password type="password" name="password" autocomplete="current-password" required;
            button type="submit" { "Sign in" }
        }
    }
}

#[derive(Deserialize)]
struct ResetQuery {
    #[serde(default)]
    token: String,
}

fn reset_form(tenant: &str, form_token: &str, token: &str, error: Option<&str>) -> Markup {
    html! {
        @if let Some(e) = error { (message("error", e)) }
        p { "Choose a new password for your account. The link works once, for an hour." }
        form method="post" action={ "/t/" (tenant) "/reset" } {
            (token_input(form_token))
            input type="hidden" name="token" value=(token);
            label for="new_password" { "New password" p.hint { "At least 8 characters." } }
            input #new_password type="password" name="new_password" autocomplete="new-password" minlength="8" required autofocus;
            button type="submit" { "Set the new password" }
        }
    }
}

/// The page a password reset link opens.
async fn reset_page(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    nonce: FormNonce,
    Query(q): Query<ResetQuery>,
) -> Page {
    let name = tenant_name(&api, &tenant).await?;
    let body = reset_form(&tenant, &nonce.token(&api), &q.token, None);
    Ok(layout::page(
        &anonymous(&tenant, &name),
        "Choose a new password",
        true,
        body,
    )
    .into_response())
}

#[derive(Deserialize)]
struct ResetForm {
    token: SecretString,
    new_password: SecretString,
}

async fn reset_password(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    nonce: FormNonce,
    CheckedForm(form): CheckedForm<ResetForm>,
) -> Page {
    match api
        .app
        .reset_password_with_link(&tenant, &form.token, &form.new_password, &origin)
        .await
    {
        Ok(()) => {
            Ok(Redirect::to(&format!("/t/{tenant}/sign-in?done=password_reset")).into_response())
        }
        Err(e @ (AppError::Refused(_) | AppError::InvalidField(_))) => {
            let name = tenant_name(&api, &tenant).await?;
            let body = reset_form(
                &tenant,
                &nonce.token(&api),
                form.token.expose_secret(),
                Some(&e.message()),
            );
            let page = layout::page(
                &anonymous(&tenant, &name),
                "Choose a new password",
                true,
                body,
            );
            Ok((crate::error::status_of(&e), page).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

async fn sign_in_page(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    nonce: FormNonce,
    Query(notice): Query<Notice>,
) -> Page {
    let name = tenant_name(&api, &tenant).await?;
    let body = html! {
        @if let Some(text) = notice_text(notice.done.as_deref()) { (message("notice", text)) }
        (sign_in_form(&tenant, &nonce.token(&api), "", None))
    };
    Ok(layout::page(&anonymous(&tenant, &name), "Sign in", true, body).into_response())
}

#[derive(Deserialize)]
struct SignInForm {
    username: String,
    password: SecretString,
}

async fn sign_in(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    nonce: FormNonce,
    jar: CookieJar,
    CheckedForm(form): CheckedForm<SignInForm>,
) -> Page {
    let request = SignInRequest {
        username: form.username.clone(),
        password: form.password,
        device_token: jar
            .get(DEVICE_COOKIE)
            .map(|c| SecretString::from(c.value().to_string())),
    };
    let outcome = match api.app.sign_in(&tenant, request, &origin).await {
        Ok(outcome) => outcome,
        Err(e @ (AppError::InvalidCredentials | AppError::Locked | AppError::BadInput { .. })) => {
            let name = tenant_name(&api, &tenant).await?;
            let body = sign_in_form(
                &tenant,
                &nonce.token(&api),
                &form.username,
                Some(&e.message()),
            );
            let page = layout::page(&anonymous(&tenant, &name), "Sign in", true, body);
            return Ok((crate::error::status_of(&e), page).into_response());
        }
        Err(e) => return Err(e.into()),
    };
    let secure = api.secure_cookies;
    Ok(match outcome {
        SignInOutcome::SignedIn(signed_in) => {
            open_session(jar, &tenant, signed_in, secure, "/account")
        }
        SignInOutcome::Challenge(challenge) => {
            let jar = jar.add(tenant_cookie(
                CHALLENGE_COOKIE,
                challenge.token.expose_secret().to_string(),
                &tenant,
                secure,
            ));
            (jar, Redirect::to(&format!("/t/{tenant}/challenge"))).into_response()
        }
        SignInOutcome::EnrollmentRequired { challenge, .. } => {
            let jar = jar.add(tenant_cookie(
                CHALLENGE_COOKIE,
                challenge.token.expose_secret().to_string(),
                &tenant,
                secure,
            ));
            (jar, Redirect::to(&format!("/t/{tenant}/enroll"))).into_response()
        }
    })
}

/// Sets the session (and remembered-device) cookies and goes on to `next`,
/// or shows the recovery codes first when the sign-in issued them.
fn open_session(
    jar: CookieJar,
    tenant: &str,
    signed_in: SignedIn,
    secure: bool,
    next: &str,
) -> Response {
    let mut jar = forget(jar, CHALLENGE_COOKIE, tenant).add(tenant_cookie(
        SESSION_COOKIE,
        signed_in.session_token.expose_secret().to_string(),
        tenant,
        secure,
    ));
    if let Some(device) = &signed_in.device_token {
        jar = jar.add(
            Cookie::build((DEVICE_COOKIE, device.expose_secret().to_string()))
                .path("/")
                .max_age(time::Duration::days(400))
                .http_only(true)
                .secure(secure)
                .same_site(axum_extra::extract::cookie::SameSite::Lax)
                .build(),
        );
    }
    if let Some(code) = &signed_in.replacement_code {
        let body = html! {
            p { "You used a recovery code. It no longer works; this new code takes its place, so you still have 8:" }
            ul.codes #replacement-code aria-label="New recovery code" { li { (code) } }
            p.hint { "Add it to where you keep the others. You can see all of them on your account page after confirming it's you." }
            a.button href={ "/t/" (tenant) (next) } { "I saved it, continue" }
        };
        let frame = Frame {
            tenant_id: tenant,
            tenant_name: "",
            signed_in: None,
            console: false,
            tab: None,
        };
        (
            jar,
            layout::page(&frame, "Your new recovery code", true, body),
        )
            .into_response()
    } else if signed_in.backup_codes.is_empty() {
        (jar, Redirect::to(&format!("/t/{tenant}{next}"))).into_response()
    } else {
        let body = recovery_codes(tenant, &signed_in.backup_codes, next);
        let frame = Frame {
            tenant_id: tenant,
            tenant_name: "",
            signed_in: None,
            console: false,
            tab: None,
        };
        (
            jar,
            layout::page(&frame, "Save your recovery codes", true, body),
        )
            .into_response()
    }
}

/// The recovery codes, shown once, with copy and download.
fn recovery_codes(tenant: &str, codes: &[String], next: &str) -> Markup {
    let text = codes.join("\n") + "\n";
    let href = format!("data:text/plain;base64,{}", B64.encode(text.as_bytes()));
    html! {
        p { "Two-factor authentication is active. Each recovery code signs you in once if you lose your authenticator. Store them somewhere safe, apart from your phone." }
        div.warning role="status" { "These codes are shown only now." }
        ul.codes #recovery-codes aria-label="Recovery codes" {
            @for code in codes { li { (code) } }
        }
        div.row {
            a.button.secondary href=(href) download="twofold-recovery-codes.txt" { "Download" }
            button.secondary.js-only type="button" data-copy="recovery-codes" { "Copy" }
            a.button href={ "/t/" (tenant) (next) } { "I saved them, continue" }
        }
    }
}

// -------------------------------------------------------------- challenge

fn method_label(method: Method) -> &'static str {
    match method {
        Method::Totp => "authenticator app",
        Method::Email => "email",
        Method::Sms => "text message (SMS)",
    }
}

#[derive(Deserialize, Default)]
pub struct ChallengeQuery {
    #[serde(default)]
    recovery: Option<String>,
    #[serde(default)]
    sent: Option<String>,
}

fn challenge_body(
    tenant: &str,
    token: &str,
    state: &ChallengeState,
    recovery: bool,
    error: Option<&str>,
    note: Option<&str>,
) -> Markup {
    html! {
        @if let Some(e) = error { (message("error", e)) }
        @if let Some(n) = note { (message("success", n)) }
        @if state.purpose == ChallengePurpose::VerifyContact {
            p {
                @if state.method == Method::Sms {
                    "We sent a 6-digit code by text message to your new phone number. Enter it to start using that number. Until then, codes keep going where they went before."
                } @else {
                    "We sent a 6-digit code to your new email address. Enter it to start using that address. Until then, codes keep going where they went before."
                }
            }
            form method="post" action={ "/t/" (tenant) "/challenge" } {
                (token_input(token))
                label for="code" { "Code" }
                input.code #code type="text" name="code" inputmode="numeric" pattern="[0-9]*"
                    autocomplete="one-time-code" maxlength="6" required autofocus;
                button type="submit" { "Confirm" }
            }
            form.inline method="post" action={ "/t/" (tenant) "/challenge/resend" } {
                (token_input(token))
                button.secondary type="submit" { "Resend code" }
            }
        } @else if recovery {
            p { "Enter one of your unused recovery codes." }
            form method="post" action={ "/t/" (tenant) "/challenge" } {
                (token_input(token))
                label for="backup_code" { "Recovery code" }
                input #backup_code type="text" name="backup_code" autocomplete="one-time-code"
                    autocapitalize="none" spellcheck="false" placeholder="abcde-23456" required autofocus;
                button type="submit" { "Sign in" }
            }
            p { a href={ "/t/" (tenant) "/challenge" } { "Use a code instead" } }
        } @else {
            p {
                @match state.method {
                    Method::Totp => "Enter the 6-digit code from your authenticator app.",
                    Method::Email => "We sent a 6-digit code to your email address. Enter it below.",
                    Method::Sms => "We sent a 6-digit code by text message. Enter it below.",
                }
            }
            form method="post" action={ "/t/" (tenant) "/challenge" } {
                (token_input(token))
                label for="code" { "Code" }
                input.code #code type="text" name="code" inputmode="numeric" pattern="[0-9]*"
                    autocomplete="one-time-code" maxlength="6" required autofocus;
                button type="submit" { "Verify" }
            }
            @if state.method != Method::Totp {
                form.inline method="post" action={ "/t/" (tenant) "/challenge/resend" } {
                    (token_input(token))
                    @match state.resends_remaining {
                        Some(0) => { button.secondary type="submit" disabled { "No resends left" } }
                        Some(n) => { button.secondary type="submit" { "Resend code (" (n) " left)" } }
                        None => { button.secondary type="submit" { "Resend code" } }
                    }
                }
            }
            @let others: Vec<Method> = state.methods.iter().copied().filter(|m| *m != state.method).collect();
            @if !others.is_empty() {
                h2 { "Other ways to verify" }
                @for m in others {
                    form.inline method="post" action={ "/t/" (tenant) "/challenge/switch" } {
                        (token_input(token))
                        input type="hidden" name="method" value=(m.as_str());
                        button.secondary type="submit" { "Use " (method_label(m)) }
                    }
                }
            }
            p { a href={ "/t/" (tenant) "/challenge?recovery=1" } { "Use a recovery code instead" } }
        }
        p.hint { "This step expires at " (when(&state.expires_at)) "." }
    }
}

/// The pending challenge's state, or the sign-in page when there is none.
async fn pending(
    api: &ApiState,
    tenant: &str,
    jar: &CookieJar,
) -> Result<Result<(SecretString, ChallengeState), Response>, PageError> {
    let Some(token) = challenge_token(jar) else {
        return Ok(Err(
            Redirect::to(&format!("/t/{tenant}/sign-in")).into_response()
        ));
    };
    match api.app.challenge(tenant, &token).await {
        Ok(state) => Ok(Ok((token, state))),
        Err(AppError::ChallengeNotFound | AppError::Refused(_)) => Ok(Err((
            forget(jar.clone(), CHALLENGE_COOKIE, tenant),
            Redirect::to(&format!("/t/{tenant}/sign-in?done=expired")),
        )
            .into_response())),
        Err(e) => Err(e.into()),
    }
}

async fn challenge_page(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    Query(q): Query<ChallengeQuery>,
    nonce: FormNonce,
    jar: CookieJar,
) -> Page {
    let (_, state) = match pending(&api, &tenant, &jar).await? {
        Ok(found) => found,
        Err(redirect) => return Ok(redirect),
    };
    let name = tenant_name(&api, &tenant).await?;
    let note = q.sent.as_deref().map(|_| "A new code is on its way.");
    let body = challenge_body(
        &tenant,
        &nonce.token(&api),
        &state,
        q.recovery.is_some(),
        None,
        note,
    );
    Ok(layout::page(
        &anonymous(&tenant, &name),
        "Two-factor authentication",
        true,
        body,
    )
    .into_response())
}

#[derive(Deserialize)]
struct VerifyForm {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    backup_code: Option<SecretString>,
}

async fn verify(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    nonce: FormNonce,
    jar: CookieJar,
    CheckedForm(form): CheckedForm<VerifyForm>,
) -> Page {
    let (token, state) = match pending(&api, &tenant, &jar).await? {
        Ok(found) => found,
        Err(redirect) => return Ok(redirect),
    };
    let recovery = form.backup_code.is_some();
    let request = VerifyRequest {
        challenge_token: token,
        code: form.code.filter(|c| !c.is_empty()),
        backup_code: form.backup_code,
    };
    match api.app.verify(&tenant, request, &origin).await {
        Ok(VerifyOutcome::SignedIn(signed_in)) => Ok(open_session(
            jar,
            &tenant,
            signed_in,
            api.secure_cookies,
            "/account",
        )),
        Ok(VerifyOutcome::SteppedUp) => Ok((
            forget(jar, CHALLENGE_COOKIE, &tenant),
            Redirect::to(&format!("/t/{tenant}/account?done=stepped_up")),
        )
            .into_response()),
        Ok(VerifyOutcome::ContactVerified) => Ok(signed_out_after(
            forget(jar, CHALLENGE_COOKIE, &tenant),
            &tenant,
            "contact",
        )),
        Err(
            e @ (AppError::InvalidCode { .. } | AppError::BadInput { .. } | AppError::Refused(_)),
        ) => {
            let text = match e.details().and_then(|d| d["attempts_remaining"].as_u64()) {
                Some(n) => format!(
                    "{} {n} attempt{} left.",
                    e.message(),
                    if n == 1 { "" } else { "s" }
                ),
                None => e.message(),
            };
            let name = tenant_name(&api, &tenant).await?;
            let body = challenge_body(
                &tenant,
                &nonce.token(&api),
                &state,
                recovery,
                Some(&text),
                None,
            );
            let page = layout::page(
                &anonymous(&tenant, &name),
                "Two-factor authentication",
                true,
                body,
            );
            Ok((crate::error::status_of(&e), page).into_response())
        }
        Err(e @ AppError::Locked) => {
            let name = tenant_name(&api, &tenant).await?;
            let body = html! {
                (message("error", &e.message()))
                p { a href={ "/t/" (tenant) "/sign-in" } { "Back to sign-in" } }
            };
            let page = layout::page(&anonymous(&tenant, &name), "Account locked", true, body);
            Ok((
                forget(jar, CHALLENGE_COOKIE, &tenant),
                (crate::error::status_of(&e), page),
            )
                .into_response())
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
struct SwitchForm {
    method: String,
}

async fn resend(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    jar: CookieJar,
    CheckedForm(NoFields {}): CheckedForm<NoFields>,
) -> Page {
    let Some(token) = challenge_token(&jar) else {
        return Ok(Redirect::to(&format!("/t/{tenant}/sign-in")).into_response());
    };
    api.app.resend(&tenant, &token, &origin).await?;
    Ok(Redirect::to(&format!("/t/{tenant}/challenge?sent=1")).into_response())
}

async fn switch(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    jar: CookieJar,
    CheckedForm(form): CheckedForm<SwitchForm>,
) -> Page {
    let Some(token) = challenge_token(&jar) else {
        return Ok(Redirect::to(&format!("/t/{tenant}/sign-in")).into_response());
    };
    let state = api
        .app
        .switch(&tenant, &token, &form.method, &origin)
        .await?;
    let sent = if state.method == Method::Totp {
        ""
    } else {
        "?sent=1"
    };
    Ok(Redirect::to(&format!("/t/{tenant}/challenge{sent}")).into_response())
}

// ------------------------------------------------------------- enrollment

/// The QR code, the secret for typing in, and the confirmation form.
fn enrollment_body(
    action: &str,
    token: &str,
    enrollment: &NewAuthenticator,
    error: Option<&str>,
) -> Markup {
    html! {
        @if let Some(e) = error { (message("error", e)) }
        ol {
            li { "Open your authenticator app (Google Authenticator, Microsoft Authenticator, Authy, 1Password…)." }
            li { "Scan this QR code, or type in the secret key below it." }
            li { "Enter the 6-digit code the app shows." }
        }
        img.qr #qr src={ "data:image/png;base64," (B64.encode(&enrollment.qr_png)) }
            alt="QR code to scan with your authenticator app" width="220" height="220";
        p { "Secret key: " span.secret #secret { (enrollment.secret) } }
        form method="post" action=(action) {
            (token_input(token))
            label for="code" { "Code from the app" }
            input.code #code type="text" name="code" inputmode="numeric" pattern="[0-9]*"
                autocomplete="one-time-code" maxlength="6" required autofocus;
            button type="submit" { "Confirm setup" }
        }
    }
}

async fn enroll_page(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    nonce: FormNonce,
    jar: CookieJar,
) -> Page {
    let Some(token) = challenge_token(&jar) else {
        return Ok(Redirect::to(&format!("/t/{tenant}/sign-in")).into_response());
    };
    let enrollment = api.app.pending_enrollment(&tenant, &token).await?;
    let settings = api.app.tenant(&tenant).await?.1.settings;
    let name = tenant_name(&api, &tenant).await?;
    let form_token = nonce.token(&api);
    let skippable = settings.enrollment == twofold_domain::tenant::settings::Enrollment::Optional;
    let body = html! {
        @if skippable {
            p { "Your organization asks for a second factor at sign-in, and you have none set up yet. Set up an authenticator app now, or skip it this time." }
        } @else {
            p { "Your organization requires two-factor authentication. Set up an authenticator app to finish signing in." }
        }
        (enrollment_body(&format!("/t/{tenant}/enroll"), &form_token, &enrollment, None))
        @if skippable {
            form.inline method="post" action={ "/t/" (tenant) "/enroll/skip" } {
                (token_input(&form_token))
                button.secondary type="submit" { "Skip for now" }
            }
        }
    };
    Ok(layout::page(
        &anonymous(&tenant, &name),
        "Set up your authenticator",
        true,
        body,
    )
    .into_response())
}

#[derive(Deserialize)]
struct CodeForm {
    code: String,
}

async fn complete_enrollment(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    nonce: FormNonce,
    jar: CookieJar,
    CheckedForm(form): CheckedForm<CodeForm>,
) -> Page {
    let Some(token) = challenge_token(&jar) else {
        return Ok(Redirect::to(&format!("/t/{tenant}/sign-in")).into_response());
    };
    match api
        .app
        .complete_enrollment(&tenant, &token, &form.code, &origin)
        .await
    {
        Ok(signed_in) => Ok(open_session(
            jar,
            &tenant,
            signed_in,
            api.secure_cookies,
            "/account",
        )),
        Err(e @ (AppError::InvalidCode { .. } | AppError::BadInput { .. })) => {
            let enrollment = api.app.pending_enrollment(&tenant, &token).await?;
            let name = tenant_name(&api, &tenant).await?;
            let text = e.message();
            let body = enrollment_body(
                &format!("/t/{tenant}/enroll"),
                &nonce.token(&api),
                &enrollment,
                Some(&text),
            );
            let page = layout::page(
                &anonymous(&tenant, &name),
                "Set up your authenticator",
                true,
                body,
            );
            Ok((crate::error::status_of(&e), page).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------- account

async fn sign_out(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    jar: CookieJar,
    BrowserSession(session): BrowserSession,
    CheckedForm(NoFields {}): CheckedForm<NoFields>,
) -> Page {
    api.app.sign_out(&session, &origin).await?;
    Ok((
        forget(jar, SESSION_COOKIE, &tenant),
        Redirect::to(&format!("/t/{tenant}/sign-in?done=signed_out")),
    )
        .into_response())
}

fn status_pill(state: TwoFactorState) -> Markup {
    match state {
        TwoFactorState::Enrolled => html! { span.pill.ok { "Active" } },
        TwoFactorState::Pending => html! { span.pill.warn { "Setup not finished" } },
        TwoFactorState::NotStarted => html! { span.pill { "Not set up" } },
    }
}

fn second_factor_text(use_: SecondFactorUse) -> String {
    match use_ {
        SecondFactorUse::Used { method } => format!(
            "with {}",
            match method {
                ProofKind::Totp => "authenticator app",
                ProofKind::Email => "email code",
                ProofKind::Sms => "text message",
                ProofKind::BackupCode => "recovery code",
            }
        ),
        SecondFactorUse::Skipped { reason } => match reason {
            SkipReason::KnownDevice => "on a remembered device".to_string(),
            SkipReason::KnownIp => "from a known address".to_string(),
            SkipReason::TwoFactorDisabled | SkipReason::NotRequired => "password only".to_string(),
            SkipReason::ServiceAccount => "service account".to_string(),
            SkipReason::NoMethodAvailable => "password only (no method set up)".to_string(),
            SkipReason::EnrollmentSkipped => "password only (setup skipped)".to_string(),
            SkipReason::LoginAs => "opened by an admin (Login As)".to_string(),
        },
    }
}

/// A sensitive action's button: the action itself after a recent step-up,
/// else a button that asks for a code first.
fn sensitive(
    tenant: &str,
    token: &str,
    stepped_up: bool,
    action: &str,
    label: &str,
    danger: bool,
) -> Markup {
    html! {
        @if stepped_up {
            form.inline method="post" action={ "/t/" (tenant) (action) } {
                (token_input(token))
                @if danger { button.danger type="submit" { (label) } } @else { button.secondary type="submit" { (label) } }
            }
        } @else {
            form.inline method="post" action={ "/t/" (tenant) "/account/step-up" } {
                (token_input(token))
                button.secondary type="submit" { (label) " (confirm it's you first)" }
            }
        }
    }
}

async fn account(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    nonce: FormNonce,
    Query(notice): Query<Notice>,
    BrowserSession(session): BrowserSession,
) -> Page {
    let token = nonce.token(&api);
    let now = api.app.now();
    let u = &session.user;
    let stepped_up = u
        .sessions
        .get(&session.session_id)
        .and_then(|s| s.stepped_up_at)
        .is_some_and(|at| (now - at).num_seconds() < twofold_domain::user::STEP_UP_VALID_SECS);
    let settings = &session.tenant.settings;
    let voluntary = settings.enabled
        && matches!(
            settings.scope,
            twofold_domain::tenant::settings::Scope::Voluntary
        );
    let totp_allowed = settings.allowed_methods.contains(&Method::Totp);
    let password_card = html! {
        section.card aria-labelledby="password-h" {
            h2 #password-h { "Password" }
            form method="post" action={ "/t/" (tenant) "/account/password" } {
                (token_input(&token))
                label for="current_password" { "Current password" }
                input #current_password type="password" name="current_password" autocomplete="current-password" required;
                label for="new_password" { "New password" p.hint { "At least 8 characters. Your other sessions end." } }
                input #new_password type="password" name="new_password" autocomplete="new-password" minlength="8" required;
                button type="submit" { "Change password" }
            }
        }
    };
    let body = html! {
        @if session.impersonated_by.is_some() {
            div.warning #impersonation role="status" {
                "An admin opened this session as " strong { (u.username.as_ref().map(|n| n.as_str()).unwrap_or("")) }
                " (Login As). Everything done here is recorded with that admin's name. Sign out to end it."
            }
        }
        @if let Some(text) = notice_text(notice.done.as_deref()) { (message("success", text)) }
        @if u.password_must_change {
            (message("warning", "Your password was set for you and works only until you change it. Choose your own now."))
        }
        @if u.password_must_change { (password_card) }
        section.card aria-labelledby="profile-h" {
            h2 #profile-h { "Profile" }
            p { "Username: " strong { (u.username.as_ref().map(|n| n.as_str()).unwrap_or("")) } }
            p { "Email: " (u.email.as_ref().map(|e| e.as_str()).unwrap_or("none")) }
            p { "Phone: " (u.phone.as_ref().map(|p| p.as_str()).unwrap_or("none")) }
            details {
                summary { "Change where codes are sent" }
                @if stepped_up {
                    form method="post" action={ "/t/" (tenant) "/account/contact" } {
                        (token_input(&token))
                        label for="email" { "Email" }
                        input #email type="email" name="email" autocomplete="email"
                            value=(u.email.as_ref().map(|e| e.as_str()).unwrap_or(""));
                        label for="phone" { "Phone" p.hint { "International format, like +15551234567." } }
                        input #phone type="tel" name="phone" autocomplete="tel"
                            value=(u.phone.as_ref().map(|p| p.as_str()).unwrap_or(""));
                        p.hint { "Changing these ends every session, this one included." }
                        button type="submit" { "Save contact details" }
                    }
                } @else {
                    p.hint { "Changing where codes go needs a code from a current factor." }
                    (sensitive(&tenant, &token, false, "", "Change contact details", false))
                }
            }
        }
        section.card aria-labelledby="tfa-h" {
            h2 #tfa-h { "Two-factor authentication " (status_pill(u.two_factor)) }
            @if voluntary {
                @if u.two_factor_opted_in {
                    p { "You have turned two-factor authentication on." }
                    @if stepped_up {
                        form.inline method="post" action={ "/t/" (tenant) "/account/two-factor" } {
                            (token_input(&token))
                            input type="hidden" name="enabled" value="false";
                            button.secondary type="submit" { "Turn off" }
                        }
                    } @else {
                        (sensitive(&tenant, &token, false, "", "Turn off", false))
                    }
                } @else {
                    p { "Two-factor authentication is optional here. Turn it on to be asked for a code at every sign-in." }
                    form.inline method="post" action={ "/t/" (tenant) "/account/two-factor" } {
                        (token_input(&token))
                        input type="hidden" name="enabled" value="true";
                        button type="submit" { "Turn on" }
                    }
                }
            }
            h3 { "Authenticator app" }
            @match u.two_factor {
                TwoFactorState::Enrolled => {
                    p { "An authenticator app is set up." }
                    (sensitive(&tenant, &token, stepped_up, "/account/totp/remove", "Remove authenticator", true))
                }
                _ => {
                    @if totp_allowed {
                        p { "Use an app on your phone to get sign-in codes." }
                        form.inline method="post" action={ "/t/" (tenant) "/account/totp" } {
                            (token_input(&token))
                            button type="submit" { @if u.two_factor == TwoFactorState::Pending { "Restart setup" } @else { "Set up authenticator" } }
                        }
                    } @else {
                        p.muted { "Your organization does not use authenticator apps." }
                    }
                }
            }
            @let mine = u.available_methods(settings);
            @if settings.enabled && mine.len() > 1 {
                h3 { "Method asked first" }
                form.row method="post" action={ "/t/" (tenant) "/account/preferred-method" } {
                    (token_input(&token))
                    label for="preferred" { "Ask me first with" }
                    select #preferred name="method" {
                        option value="" selected[u.preferred_method.is_none()] { "My organization's default (" (method_label(settings.default_method)) ")" }
                        @for m in &mine {
                            option value=(m.as_str()) selected[u.preferred_method == Some(*m)] { (method_label(*m)) }
                        }
                    }
                    button.secondary type="submit" { "Save" }
                }
            }
            h3 { "Recovery codes" }
            p { (u.backup_codes_left()) " of 8 unused." }
            @if u.backup_codes_left() <= 2 && u.two_factor == TwoFactorState::Enrolled {
                (message("warning", "You are running low on recovery codes. Regenerate them and store the new set."))
            }
            @if !u.backup_codes.is_empty() {
                (sensitive(&tenant, &token, stepped_up, "/account/recovery-codes", "Show recovery codes", false))
            }
            (sensitive(&tenant, &token, stepped_up, "/account/backup-codes", "Regenerate recovery codes", false))
        }
        @if !u.password_must_change { (password_card) }
        section.card aria-labelledby="sessions-h" {
            h2 #sessions-h { "Where you are signed in" }
            div.table-wrap { table {
                thead { tr { th { "Started" } th { "Expires" } th { "Second factor" } th { span.muted { "Action" } } } }
                tbody {
                    @for (id, s) in u.sessions.iter().filter(|(_, s)| now < s.expires_at) {
                        tr {
                            td { (when(&s.started_at)) @if *id == session.session_id { " " span.pill.ok { "this browser" } } }
                            td { (when(&s.expires_at)) }
                            td { (second_factor_text(s.second_factor)) }
                            td {
                                @if *id != session.session_id {
                                    form.inline method="post" action={ "/t/" (tenant) "/account/sessions/" (id.as_uuid()) "/end" } {
                                        (token_input(&token))
                                        button.secondary type="submit" { "Sign out" }
                                    }
                                }
                            }
                        }
                    }
                }
            } }
            h3 { "Remembered devices" }
            @if u.devices.is_empty() {
                p.muted { "No device is remembered." }
            } @else {
                ul {
                    @for (id, d) in &u.devices {
                        li {
                            "Remembered " (when(&d.remembered_at)) " "
                            form.inline method="post" action={ "/t/" (tenant) "/account/devices/" (id) "/forget" } {
                                (token_input(&token))
                                button.secondary type="submit" { "Forget" }
                            }
                        }
                    }
                }
            }
        }
    };
    let frame = signed_in_frame(&session, &tenant, &token);
    Ok(layout::page(&frame, "My account", false, body).into_response())
}

async fn start_totp(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    nonce: FormNonce,
    BrowserSession(session): BrowserSession,
    CheckedForm(NoFields {}): CheckedForm<NoFields>,
) -> Page {
    let enrollment = api.app.start_totp(&session, &origin).await?;
    let token = nonce.token(&api);
    let body = enrollment_body(
        &format!("/t/{tenant}/account/totp/confirm"),
        &token,
        &enrollment,
        None,
    );
    let frame = signed_in_frame(&session, &tenant, &token);
    Ok(layout::page(&frame, "Set up your authenticator", true, body).into_response())
}

async fn confirm_totp(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    nonce: FormNonce,
    BrowserSession(session): BrowserSession,
    CheckedForm(form): CheckedForm<CodeForm>,
) -> Page {
    let token = nonce.token(&api);
    let frame = signed_in_frame(&session, &tenant, &token);
    match api.app.confirm_totp(&session, &form.code, &origin).await {
        Ok(codes) => {
            let body = recovery_codes(&tenant, &codes, "/account");
            Ok(layout::page(&frame, "Save your recovery codes", true, body).into_response())
        }
        Err(e @ (AppError::InvalidCode { .. } | AppError::BadInput { .. })) => {
            let enrollment = api.app.pending_totp(&session)?;
            let text = e.message();
            let body = enrollment_body(
                &format!("/t/{tenant}/account/totp/confirm"),
                &token,
                &enrollment,
                Some(&text),
            );
            Ok((
                crate::error::status_of(&e),
                layout::page(&frame, "Set up your authenticator", true, body),
            )
                .into_response())
        }
        Err(e) => Err(e.into()),
    }
}

async fn step_up(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    jar: CookieJar,
    BrowserSession(session): BrowserSession,
    CheckedForm(NoFields {}): CheckedForm<NoFields>,
) -> Page {
    let challenge = api.app.step_up(&session, &origin).await?;
    let jar = jar.add(tenant_cookie(
        CHALLENGE_COOKIE,
        challenge.token.expose_secret().to_string(),
        &tenant,
        api.secure_cookies,
    ));
    Ok((jar, Redirect::to(&format!("/t/{tenant}/challenge"))).into_response())
}

/// After a change that ended every session: back to sign-in.
fn signed_out_after(jar: CookieJar, tenant: &str, done: &str) -> Response {
    (
        forget(jar, SESSION_COOKIE, tenant),
        Redirect::to(&format!("/t/{tenant}/sign-in?done={done}")),
    )
        .into_response()
}

async fn remove_totp(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    jar: CookieJar,
    BrowserSession(session): BrowserSession,
    CheckedForm(NoFields {}): CheckedForm<NoFields>,
) -> Page {
    api.app.remove_totp(&session, &origin).await?;
    Ok(signed_out_after(jar, &tenant, "removed"))
}

async fn regenerate_codes(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    nonce: FormNonce,
    BrowserSession(session): BrowserSession,
    CheckedForm(NoFields {}): CheckedForm<NoFields>,
) -> Page {
    let codes = api
        .app
        .regenerate_own_backup_codes(&session, &origin)
        .await?;
    let token = nonce.token(&api);
    let frame = signed_in_frame(&session, &tenant, &token);
    let body = recovery_codes(&tenant, &codes, "/account");
    Ok(layout::page(&frame, "Your new recovery codes", true, body).into_response())
}

#[derive(Deserialize)]
struct VoluntaryForm {
    enabled: bool,
}

async fn set_voluntary(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    BrowserSession(session): BrowserSession,
    CheckedForm(form): CheckedForm<VoluntaryForm>,
) -> Page {
    api.app
        .set_voluntary(&session, form.enabled, &origin)
        .await?;
    let done = if form.enabled {
        "voluntary_on"
    } else {
        "voluntary_off"
    };
    Ok(Redirect::to(&format!("/t/{tenant}/account?done={done}")).into_response())
}

#[derive(Deserialize)]
struct ContactForm {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    phone: Option<String>,
}

async fn change_contact(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    jar: CookieJar,
    BrowserSession(session): BrowserSession,
    CheckedForm(form): CheckedForm<ContactForm>,
) -> Page {
    let change = ContactChange {
        email: form.email,
        phone: form.phone,
    };
    match api.app.change_contact(&session, change, &origin).await? {
        // A new address or number: its code is asked on the challenge page.
        Some(challenge) => {
            let jar = jar.add(tenant_cookie(
                CHALLENGE_COOKIE,
                challenge.token.expose_secret().to_string(),
                &tenant,
                api.secure_cookies,
            ));
            Ok((jar, Redirect::to(&format!("/t/{tenant}/challenge"))).into_response())
        }
        None => Ok(signed_out_after(jar, &tenant, "contact")),
    }
}

async fn end_session(
    State(api): State<ApiState>,
    Path((tenant, id)): Path<(String, String)>,
    RequestMeta(origin): RequestMeta,
    BrowserSession(session): BrowserSession,
    CheckedForm(NoFields {}): CheckedForm<NoFields>,
) -> Page {
    let id: Uuid = id
        .parse()
        .map_err(|_| AppError::Refused(twofold_domain::user::UserError::SessionNotFound))?;
    api.app
        .end_own_session(&session, SessionId(id), &origin)
        .await?;
    Ok(Redirect::to(&format!("/t/{tenant}/account?done=session_ended")).into_response())
}

async fn forget_device(
    State(api): State<ApiState>,
    Path((tenant, id)): Path<(String, String)>,
    RequestMeta(origin): RequestMeta,
    BrowserSession(session): BrowserSession,
    CheckedForm(NoFields {}): CheckedForm<NoFields>,
) -> Page {
    let id: Uuid = id
        .parse()
        .map_err(|_| AppError::Refused(twofold_domain::user::UserError::DeviceNotFound))?;
    api.app.forget_own_device(&session, id, &origin).await?;
    Ok(Redirect::to(&format!("/t/{tenant}/account?done=device_forgotten")).into_response())
}

async fn show_codes(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    nonce: FormNonce,
    BrowserSession(session): BrowserSession,
    CheckedForm(NoFields {}): CheckedForm<NoFields>,
) -> Page {
    let codes = api.app.own_backup_codes(&session)?;
    let token = nonce.token(&api);
    let frame = signed_in_frame(&session, &tenant, &token);
    let body = html! {
        p { "Each code signs you in once. Used codes are crossed out." }
        ul.codes #recovery-codes aria-label="Recovery codes" {
            @for c in &codes {
                @if c.used { li { del { (c.code) } span.muted { " used" } } } @else { li { (c.code) } }
            }
        }
        a.button href={ "/t/" (tenant) "/account" } { "Back to my account" }
    };
    Ok(layout::page(&frame, "Your recovery codes", true, body).into_response())
}

#[derive(Deserialize)]
struct PreferredForm {
    #[serde(default)]
    method: String,
}

async fn set_preferred(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    BrowserSession(session): BrowserSession,
    CheckedForm(form): CheckedForm<PreferredForm>,
) -> Page {
    api.app
        .set_preferred_method(&session, Some(form.method.as_str()), &origin)
        .await?;
    Ok(Redirect::to(&format!("/t/{tenant}/account?done=preferred")).into_response())
}

async fn skip_enrollment(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    jar: CookieJar,
    CheckedForm(NoFields {}): CheckedForm<NoFields>,
) -> Page {
    let Some(token) = challenge_token(&jar) else {
        return Ok(Redirect::to(&format!("/t/{tenant}/sign-in")).into_response());
    };
    let signed_in = api.app.skip_enrollment(&tenant, &token, &origin).await?;
    Ok(open_session(
        jar,
        &tenant,
        signed_in,
        api.secure_cookies,
        "/account",
    ))
}

#[derive(Deserialize)]
struct PasswordForm {
    current_password: SecretString,
    new_password: SecretString,
}

async fn change_password(
    State(api): State<ApiState>,
    Path(tenant): Path<String>,
    RequestMeta(origin): RequestMeta,
    BrowserSession(session): BrowserSession,
    CheckedForm(form): CheckedForm<PasswordForm>,
) -> Page {
    api.app
        .change_password(
            &session,
            &form.current_password,
            &form.new_password,
            &origin,
        )
        .await?;
    Ok(Redirect::to(&format!("/t/{tenant}/account?done=password")).into_response())
}
