//! Request extractors: JSON bodies with API-style errors, the request context
//! (IP, user agent) for events, and the signed-in session.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRef, FromRequest, FromRequestParts, Path};
use axum::http::header;
use axum::http::request::Parts;
use secrecy::SecretString;
use twofold_domain::user::User;
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

impl<S: Send + Sync> FromRequestParts<S> for RequestMeta {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        // Forwarding headers are not trusted here: the peer address is the client.
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip().to_string());
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
    pub user_id: UserId,
    pub session_id: SessionId,
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
        let (tenant_id, _) = app.tenant(raw_tenant).await?;
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
        if user
            .live_session(session_id, &claim.hash, app.now())
            .is_none()
        {
            return Err(ApiError::unauthenticated());
        }
        Ok(Self {
            tenant_id,
            user_id: claim.user_id,
            session_id,
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
        if signed_in.user.is_admin() {
            Ok(Self(signed_in))
        } else {
            Err(ApiError::forbidden())
        }
    }
}
