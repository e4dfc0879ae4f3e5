//! What every request handler shares.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use twofold_domain::tenant::Tenant;
use twofold_domain::user::User;
use twofold_domain::{TenantId, UserId};
use twofold_platform::crypto::Keyring;
use twofold_platform::password::Passwords;
use twofold_platform::store::Store;
use twofold_platform::Clock;

use crate::error::ApiError;

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

pub struct Inner {
    pub pool: PgPool,
    pub tenants: Store<Tenant>,
    pub users: Store<User>,
    pub passwords: Passwords,
    pub keys: Keyring,
    pub clock: Arc<dyn Clock>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(
        pool: PgPool,
        passwords: Passwords,
        keys: Keyring,
        clock: Arc<dyn Clock>,
        trusted_proxies: Vec<ipnet::IpNet>,
    ) -> Self {
        Self(Arc::new(Inner {
            tenants: Store::new(pool.clone()),
            users: Store::new(pool.clone()),
            pool,
            passwords,
            keys,
            clock,
            trusted_proxies,
        }))
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The tenant named in a path, or 404 for a malformed or unknown id.
    pub async fn tenant(&self, raw_id: &str) -> Result<(TenantId, Tenant), ApiError> {
        let id: TenantId = raw_id.parse().map_err(|_| ApiError::tenant_not_found())?;
        let tenant = self.tenants.load(&id.to_string()).await?;
        if tenant.exists() {
            Ok((id, tenant))
        } else {
            Err(ApiError::tenant_not_found())
        }
    }

    /// The user with this username in this tenant, if any.
    pub async fn user_id_by_name(
        &self,
        tenant: TenantId,
        username: &str,
    ) -> Result<Option<UserId>, ApiError> {
        let row: Option<(uuid::Uuid,)> =
            sqlx::query_as("SELECT user_id FROM usernames WHERE tenant_id = $1 AND username = $2")
                .bind(tenant.as_uuid())
                .bind(username)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(id,)| UserId(id)))
    }

    /// A user of `tenant` (one of another tenant is treated as absent).
    pub async fn user_in(&self, tenant: TenantId, user: UserId) -> Result<Option<User>, ApiError> {
        let loaded = self.users.load(&user.to_string()).await?;
        Ok((loaded.exists() && loaded.tenant_id == Some(tenant)).then_some(loaded))
    }
}
