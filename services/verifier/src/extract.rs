//! Request extractors: JSON bodies with API-style errors, where a request came
//! from (IP, user agent) for events, and the signed-in session.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRef, FromRequest, FromRequestParts, Path};
use axum::http::header;
use axum::http::request::Parts;
use secrecy::SecretString;
use twofold_app::{AdminSession, AppError, Origin, ReaderSession, Session};

use crate::error::ApiError;
use crate::ApiState;

/// `axum::Json`, but malformed bodies answer with an [`ApiError`].
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// The client's address: the peer's, unless the peer is a trusted proxy; then
/// the nearest address in `X-Forwarded-For` that is not a trusted proxy.
pub fn client_ip(
    peer: Option<IpAddr>,
    forwarded_for: Option<&str>,
    trusted: &[ipnet::IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = peer?;
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let mut client = peer;
    for hop in forwarded_for.unwrap_or("").rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            // A hop we cannot read ends what we can believe.
            Err(_) => break,
        }
    }
    Some(client)
}

/// Where a request came from, for the audit record.
pub struct RequestMeta(pub Origin);

impl<S> FromRequestParts<S> for RequestMeta
where
    S: Send + Sync,
    ApiState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let api = ApiState::from_ref(state);
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        let forwarded = parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let ip = client_ip(peer, forwarded, &api.trusted_proxies).map(|ip| ip.to_string());
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect());
        Ok(Self(Origin { ip, user_agent }))
    }
}

/// The tenant id as written in the path.
async fn raw_tenant<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<String, ApiError> {
    let Path(params): Path<std::collections::HashMap<String, String>> =
        Path::from_request_parts(parts, state)
            .await
            .map_err(|_| AppError::TenantNotFound)?;
    Ok(params
        .get("tenant")
        .cloned()
        .ok_or(AppError::TenantNotFound)?)
}

/// A live session (`Authorization: Bearer <token>`) of a user of the tenant
/// in the path.
pub struct SignedIn(pub Session);

impl<S> FromRequestParts<S> for SignedIn
where
    S: Send + Sync,
    ApiState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let api = ApiState::from_ref(state);
        let tenant = raw_tenant(parts, state).await?;
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| SecretString::from(t.trim().to_string()));
        Ok(Self(api.app.session(&tenant, token.as_ref()).await?))
    }
}

/// A signed-in reader of the tenant's reports: an admin or an auditor (see
/// `Session::reader`).
pub struct SignedInReader(pub ReaderSession);

impl<S> FromRequestParts<S> for SignedInReader
where
    S: Send + Sync,
    ApiState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let SignedIn(session) = SignedIn::from_request_parts(parts, state).await?;
        Ok(Self(session.reader()?))
    }
}

/// A signed-in admin of the tenant (see `Session::admin`).
pub struct SignedInAdmin(pub AdminSession);

impl<S> FromRequestParts<S> for SignedInAdmin
where
    S: Send + Sync,
    ApiState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let SignedIn(session) = SignedIn::from_request_parts(parts, state).await?;
        Ok(Self(session.admin()?))
    }
}

#[cfg(test)]
mod tests {
    use super::client_ip;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxy: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = Some("203.0.113.9, 198.51.100.7, 10.0.0.2");
        assert_eq!(
            client_ip(Some(proxy), xff, &trusted).unwrap().to_string(),
            "198.51.100.7"
        );
        let stranger: std::net::IpAddr = "192.0.2.5".parse().unwrap();
        assert_eq!(client_ip(Some(stranger), xff, &trusted), Some(stranger));
        assert_eq!(client_ip(Some(proxy), xff, &[]), Some(proxy));
        assert_eq!(
            client_ip(Some(proxy), Some("nonsense"), &trusted),
            Some(proxy)
        );
    }
}
