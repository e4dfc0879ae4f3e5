//! Request extractors: JSON bodies with API-style errors, the request context
//! (IP, user agent) for events, and the signed-in session.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRef, FromRequest, FromRequestParts, Path};
use axum::http::header;
use axum::http::request::Parts;
use secrecy::SecretString;
use twofold_domain::tenant::Tenant;
use twofold_domain::user::{SecondFactorUse, SkipReason, User};
use twofold_domain::{Actor, Ctx, SessionId, TenantId, UserId};
use twofold_platform::tokens::{self, TokenKind};

use crate::error::ApiError;
use crate::state::AppState;

/// `axum::Json`, but malformed bodies answer with an [`ApiError`].
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Where a request came from, for the audit record.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

impl RequestMeta {
    pub fn ctx(&self, at: chrono::DateTime<chrono::Utc>, actor: Actor) -> Ctx {
        Ctx::new(at, actor).with_request(self.ip.clone(), self.user_agent.clone())
    }
}

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

impl<S> FromRequestParts<S> for RequestMeta
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let app = AppState::from_ref(state);
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        let forwarded = parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let ip = client_ip(peer, forwarded, &app.trusted_proxies).map(|ip| ip.to_string());
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect());
        Ok(Self { ip, user_agent })
    }
}

/// A live session of a user of the tenant in the path.
pub struct SignedIn {
    pub tenant_id: TenantId,
    pub tenant: Tenant,
    pub user_id: UserId,
    pub session_id: SessionId,
    pub second_factor: SecondFactorUse,
    pub user: User,
}

impl SignedIn {
    pub fn actor(&self) -> Actor {
        Actor::User(self.user_id)
    }
}

impl<S> FromRequestParts<S> for SignedIn
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let app = AppState::from_ref(state);
        let Path(params): Path<std::collections::HashMap<String, String>> =
            Path::from_request_parts(parts, state)
                .await
                .map_err(|_| ApiError::tenant_not_found())?;
        let raw_tenant = params
            .get("tenant")
            .ok_or_else(ApiError::tenant_not_found)?;
        let (tenant_id, tenant) = app.tenant(raw_tenant).await?;
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| SecretString::from(t.trim().to_string()))
            .ok_or_else(ApiError::unauthenticated)?;
        let claim =
            tokens::parse(TokenKind::Session, &token).ok_or_else(ApiError::unauthenticated)?;
        let user = app
            .user_in(tenant_id, claim.user_id)
            .await?
            .ok_or_else(ApiError::unauthenticated)?;
        let session_id = SessionId(claim.item);
        let second_factor = user
            .live_session(session_id, &claim.hash, app.now())
            .ok_or_else(ApiError::unauthenticated)?
            .second_factor;
        Ok(Self {
            tenant_id,
            tenant,
            user_id: claim.user_id,
            session_id,
            second_factor,
            user,
        })
    }
}

/// A signed-in admin of the tenant.
pub struct SignedInAdmin(pub SignedIn);

impl SignedInAdmin {
    pub fn actor(&self) -> Actor {
        Actor::Admin(self.0.user_id)
    }
}

impl<S> FromRequestParts<S> for SignedInAdmin
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let signed_in = SignedIn::from_request_parts(parts, state).await?;
        if !signed_in.user.is_admin() {
            return Err(ApiError::forbidden());
        }
        // With 2FA on, the admin's own session must have met the tenant's
        // policy: a second factor passed, a device remembered by one, or a
        // scope that does not ask this admin. A session from before 2FA was
        // switched on, or of an admin with no factor set up, is not enough.
        let checked = matches!(
            signed_in.second_factor,
            SecondFactorUse::Used { .. }
                | SecondFactorUse::Skipped {
                    reason: SkipReason::KnownDevice | SkipReason::NotRequired
                }
        );
        if signed_in.tenant.settings.enabled && !checked {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "second_factor_required",
                "Admin actions need a session signed in with a second factor. Sign in again.",
            ));
        }
        Ok(Self(signed_in))
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
