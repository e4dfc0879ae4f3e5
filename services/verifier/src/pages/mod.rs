//! The pages people see: end users sign in, enroll and manage their account
//! under `/t/{tenant}/`, admins and auditors use the console under
//! `/t/{tenant}/admin`. Server-rendered HTML (maud) over the application
//! layer; every flow works without JavaScript. Forms carry an anti-forgery
//! token, cookies are `HttpOnly; SameSite=Strict`, and every page is sent with
//! a Content-Security-Policy that allows no inline script.

mod admin;
mod api;
mod forms;
mod layout;
mod user;

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::ApiState;

pub use forms::{PageError, SESSION_COOKIE};

/// The pages, to be nested under `/t/{tenant}`.
pub fn router(state: ApiState) -> Router<ApiState> {
    user::routes()
        .merge(admin::routes())
        .layer(middleware::from_fn_with_state(state, forms::ensure_nonce))
        .layer(middleware::from_fn(security_headers))
}

/// `GET /api`: the HTTP API reference, from the OpenAPI document (no auth).
pub fn api_reference() -> Router<ApiState> {
    Router::new()
        .route(
            "/api",
            get(|| async {
                let doc = serde_json::to_value(crate::openapi::document()).unwrap_or_default();
                api::page(&doc)
            }),
        )
        .layer(middleware::from_fn(security_headers))
}

/// The stylesheet and the one enhancement script, at `/assets/...`.
pub fn assets() -> Router<ApiState> {
    Router::new()
        .route(
            "/assets/twofold.css",
            get(|| async { asset("text/css", include_str!("../../assets/twofold.css")) }),
        )
        .route(
            "/assets/twofold.js",
            get(|| async { asset("text/javascript", include_str!("../../assets/twofold.js")) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// No inline script or style, no framing, no caching of pages that show
/// secrets (QR codes, recovery codes).
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let set = |headers: &mut axum::http::HeaderMap, name, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::REFERRER_POLICY, "same-origin");
    set(headers, header::CACHE_CONTROL, "no-store");
    response
}
