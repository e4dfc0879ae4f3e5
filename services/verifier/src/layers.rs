//! The HTTP layers around every route: request ids, a per-request log span,
//! a deadline, and reading the request body before any handler answers.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::CONNECTION;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Span;

use crate::error::ApiError;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How long one request may take before the client gets `timeout` (503).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A caller's id is kept when it is short printable ASCII (safe in a log
/// line); anything else is replaced by a fresh UUID.
fn sane(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
}

/// Gives the request an `x-request-id` (the caller's when sane) and echoes it
/// on the response.
pub async fn request_id(mut request: Request, next: Next) -> Response {
    let id = match request.headers().get(&REQUEST_ID) {
        Some(value) if sane(value) => value.clone(),
        _ => HeaderValue::try_from(uuid::Uuid::new_v4().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
    };
    request.headers_mut().insert(REQUEST_ID.clone(), id.clone());
    let mut response = next.run(request).await;
    response.headers_mut().insert(REQUEST_ID.clone(), id);
    response
}

/// The span every log line of a request is recorded in.
pub fn request_span(request: &Request) -> Span {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
    )
}

/// Answers `timeout` (503, the API's error shape) when the handler runs
/// past [`REQUEST_TIMEOUT`]; the handler's future is dropped.
pub async fn timeout(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!("request timed out");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "The request took too long; try again.",
            )
            .into_response()
        }
    }
}

/// Reads the whole request body (at most the body limit) before the handler
/// runs. hyper keeps a connection alive only when the request body was read
/// to its end by the time the response is written; a handler that answers
/// early (a 401 on a bad token) left the body unread, and hyper then closed
/// the connection without `Connection: close`, so a client's next request on
/// it failed. Bodies past the limit get 413 and the connection is closed.
pub async fn read_body(State(limit): State<usize>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "The request body is too large.",
            )
            .into_response();
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}
