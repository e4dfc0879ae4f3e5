//! What every page shares underneath: the browser's cookies (session,
//! pending challenge, form nonce), the anti-forgery check on every posted
//! form, the signed-in extractors, and errors shown as pages.

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use maud::html;
use rand::RngCore;
use secrecy::SecretString;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use twofold_app::{AdminSession, AppError, ReaderSession, Session};

use crate::error::status_of;
use crate::ApiState;

use super::layout;

/// The browser's session token.
pub const SESSION_COOKIE: &str = "twofold_session";
/// A sign-in waiting for its second factor (the challenge token).
pub const CHALLENGE_COOKIE: &str = "twofold_challenge";
/// The random nonce the browser's form tokens are derived from.
const NONCE_COOKIE: &str = "twofold_form";
/// The form field that carries the token.
pub const TOKEN_FIELD: &str = "form_token";

/// This browser's form nonce (set by [`ensure_nonce`] on its first visit).
#[derive(Clone)]
pub struct FormNonce(String);

impl FormNonce {
    /// The token every form on the page carries.
    pub fn token(&self, api: &ApiState) -> String {
        api.app.keys.form_token(&self.0)
    }
}

/// A form with no fields but its token (a button).
#[derive(Deserialize)]
pub struct NoFields {}

/// Gives every browser a form nonce cookie, so its forms can carry a token
/// a cross-site page cannot know.
pub async fn ensure_nonce(
    State(api): State<ApiState>,
    jar: CookieJar,
    mut request: Request,
    next: Next,
) -> Response {
    let existing = jar
        .get(NONCE_COOKIE)
        .map(|c| c.value().to_string())
        .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()));
    let fresh = existing.is_none();
    let nonce = existing.unwrap_or_else(|| {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        hex::encode(bytes)
    });
    request.extensions_mut().insert(FormNonce(nonce.clone()));
    let secure = api.secure_cookies;
    let mut response = next.run(request).await;
    if fresh {
        let cookie = Cookie::build((NONCE_COOKIE, nonce))
            .path("/")
            .http_only(true)
            .secure(secure)
            .same_site(SameSite::Strict)
            .build();
        if let Ok(value) = HeaderValue::from_str(&cookie.to_string()) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

impl<S: Send + Sync> FromRequestParts<S> for FormNonce {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, PageError> {
        parts
            .extensions
            .get::<FormNonce>()
            .cloned()
            .ok_or_else(|| PageError::from(AppError::unexpected(anyhow::anyhow!("no form nonce"))))
    }
}

/// A posted form whose anti-forgery token matched; the fields as `T`.
pub struct CheckedForm<T>(pub T);

impl<S, T> FromRequest<S> for CheckedForm<T>
where
    S: Send + Sync,
    ApiState: FromRef<S>,
    T: DeserializeOwned,
{
    type Rejection = PageError;

    async fn from_request(request: Request, state: &S) -> Result<Self, PageError> {
        let api = ApiState::from_ref(state);
        let nonce = request.extensions().get::<FormNonce>().cloned();
        let jar = CookieJar::from_headers(request.headers());
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|_| PageError::forged())?;
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_bytes(&body).map_err(|_| PageError::forged())?;
        let presented = pairs
            .iter()
            .find(|(k, _)| k == TOKEN_FIELD)
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        // The nonce must be the browser's own cookie, not one just minted.
        let cookie = jar.get(NONCE_COOKIE).map(|c| c.value().to_string());
        let ok = matches!((nonce, cookie), (Some(FormNonce(n)), Some(c)) if n == c)
            && jar
                .get(NONCE_COOKIE)
                .is_some_and(|c| api.app.keys.form_token_matches(c.value(), presented));
        if !ok {
            return Err(PageError::forged());
        }
        serde_urlencoded::from_bytes(&body)
            .map(CheckedForm)
            .map_err(|e| {
                PageError::from(AppError::bad_input(
                    "invalid_form",
                    format!("The form could not be read: {e}."),
                ))
            })
    }
}

/// A cookie scoped to one tenant's pages.
pub fn tenant_cookie(
    name: &'static str,
    value: String,
    tenant: &str,
    secure: bool,
) -> Cookie<'static> {
    Cookie::build((name, value))
        .path(format!("/t/{tenant}"))
        .http_only(true)
        .secure(secure)
        .same_site(SameSite::Strict)
        .build()
}

/// The tenant id as written in the path.
async fn raw_tenant<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<String, PageError> {
    let Path(params): Path<std::collections::HashMap<String, String>> =
        Path::from_request_parts(parts, state)
            .await
            .map_err(|_| PageError::from(AppError::TenantNotFound))?;
    params
        .get("tenant")
        .cloned()
        .ok_or_else(|| AppError::TenantNotFound.into())
}

/// The browser's live session; without one, the sign-in page.
pub struct BrowserSession(pub Session);

impl<S> FromRequestParts<S> for BrowserSession
where
    S: Send + Sync,
    ApiState: FromRef<S>,
{
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, PageError> {
        let api = ApiState::from_ref(state);
        let tenant = raw_tenant(parts, state).await?;
        let token = CookieJar::from_headers(&parts.headers)
            .get(SESSION_COOKIE)
            .map(|c| SecretString::from(c.value().to_string()));
        match api.app.session(&tenant, token.as_ref()).await {
            Ok(session) => Ok(Self(session)),
            Err(AppError::Unauthenticated) => Err(PageError::SignIn(tenant)),
            Err(e) => Err(e.into()),
        }
    }
}

/// Who may see the console: an admin (who may act) or an auditor (who may
/// only read).
pub struct ConsoleUser {
    pub reader: ReaderSession,
    /// The session as an admin, when it may act.
    pub admin: Option<AdminSession>,
}

impl<S> FromRequestParts<S> for ConsoleUser
where
    S: Send + Sync,
    ApiState: FromRef<S>,
{
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, PageError> {
        let BrowserSession(session) = BrowserSession::from_request_parts(parts, state).await?;
        let tenant = raw_tenant(parts, state).await?;
        let reader = session
            .clone()
            .reader()
            .map_err(|e| offer_step_up(e, tenant, parts, state))?;
        Ok(Self {
            reader,
            admin: session.admin().ok(),
        })
    }
}

impl ConsoleUser {
    /// The console as seen by an admin who is acting.
    pub fn acting(admin: &AdminSession) -> Self {
        Self {
            reader: admin.reader(),
            admin: Some(admin.clone()),
        }
    }
}

/// An admin acting from the console (auditors get 403).
pub struct ConsoleAdmin(pub AdminSession);

impl<S> FromRequestParts<S> for ConsoleAdmin
where
    S: Send + Sync,
    ApiState: FromRef<S>,
{
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, PageError> {
        let BrowserSession(session) = BrowserSession::from_request_parts(parts, state).await?;
        let tenant = raw_tenant(parts, state).await?;
        Ok(Self(
            session
                .admin()
                .map_err(|e| offer_step_up(e, tenant, parts, state))?,
        ))
    }
}

/// A console refusal for want of a second factor becomes an offer to
/// confirm one now (a step-up), rather than a dead end.
fn offer_step_up<S>(err: AppError, tenant: String, parts: &Parts, state: &S) -> PageError
where
    ApiState: FromRef<S>,
{
    match (err, parts.extensions.get::<FormNonce>()) {
        (AppError::SecondFactorRequired, Some(nonce)) => PageError::StepUp {
            tenant,
            token: nonce.token(&ApiState::from_ref(state)),
        },
        (err, _) => err.into(),
    }
}

/// A page that could not be shown: the sign-in page for a browser without a
/// session, an offer to confirm a second factor, else an error page with the
/// application's message.
pub enum PageError {
    SignIn(String),
    StepUp { tenant: String, token: String },
    App(AppError),
}

impl PageError {
    /// A form posted without the browser's anti-forgery token.
    pub fn forged() -> Self {
        Self::App(AppError::bad_input(
            "form_expired",
            "This form has expired or did not come from this site. Go back, reload the page and try again.",
        ))
    }
}

impl From<AppError> for PageError {
    fn from(err: AppError) -> Self {
        Self::App(err)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            Self::SignIn(tenant) => Redirect::to(&format!("/t/{tenant}/sign-in")).into_response(),
            Self::StepUp { tenant, token } => {
                let body = layout::bare(
                    "Confirm it's you",
                    html! {
                        div.notice role="status" {
                            p { "The console needs a session that passed a second factor. Confirm with a code now; it opens the console for the next 10 minutes." }
                        }
                        form method="post" action={ "/t/" (tenant) "/account/step-up" } {
                            (layout::token_input(&token))
                            button type="submit" { "Confirm with a code" }
                        }
                        p { a href={ "/t/" (tenant) "/account" } { "Back to my account" } }
                    },
                );
                (StatusCode::FORBIDDEN, body).into_response()
            }
            Self::App(err) => {
                let status = if err.code() == "form_expired" {
                    StatusCode::FORBIDDEN
                } else {
                    status_of(&err)
                };
                let body = layout::bare(
                    "Something is not right",
                    html! {
                        div.error role="alert" {
                            p { (err.message()) }
                            p.hint { "Code: " code { (err.code()) } }
                        }
                        p.hint { "Use your browser's Back button to return." }
                    },
                );
                (status, body).into_response()
            }
        }
    }
}
