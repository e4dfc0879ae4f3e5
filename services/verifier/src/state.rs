//! What every request handler shares.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use twofold_domain::tenant::Tenant;
use twofold_domain::user::User;
use twofold_domain::{TenantId, UserId};
use twofold_platform::crypto::Keyring;
use twofold_platform::password::Passwords;
use twofold_platform::store::{read_streams, Basis, Cache, Store, StreamKey};
use twofold_platform::Clock;

use crate::error::ApiError;

/// Usernames remembered per process.
const REMEMBERED_USERNAMES: usize = 16_384;

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

pub struct Inner {
    pub pool: PgPool,
    pub tenants: Store<Tenant>,
    pub users: Store<User>,
    /// Usernames seen at sign-in, by tenant: a registered username never
    /// changes hands, so remembering it saves a read.
    pub usernames: Cache<(TenantId, String), UserId>,
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
        remembered_streams: usize,
    ) -> Self {
        Self(Arc::new(Inner {
            tenants: Store::remembering(pool.clone(), remembered_streams),
            users: Store::remembering(pool.clone(), remembered_streams),
            usernames: Cache::new(REMEMBERED_USERNAMES),
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

    /// The tenant named in a path and one of its users, to decide a command
    /// on: remembered from earlier requests when both are (no read at all;
    /// the append checks they are still current), else read together in one
    /// round trip. `Fresh` always reads. The user is `None` when there is no
    /// such user in this tenant.
    pub async fn tenant_and_user(
        &self,
        raw_tenant: &str,
        user: UserKey<'_>,
        memory: Memory,
    ) -> Result<(TenantId, Basis<Tenant>, Option<(UserId, Basis<User>)>), ApiError> {
        let tenant_id: TenantId = raw_tenant
            .parse()
            .map_err(|_| ApiError::tenant_not_found())?;
        let tenant_key = tenant_id.to_string();
        if memory == Memory::Use {
            let user_id = match user {
                UserKey::Id(id) => Some(id),
                UserKey::Name(name) => self.usernames.get(&(tenant_id, name.to_string())),
            };
            let tenant = self.tenants.remembered(&tenant_key);
            let known = user_id.and_then(|id| Some((id, self.users.remembered(&id.to_string())?)));
            if let (Some(tenant), Some((user_id, basis))) = (tenant, known) {
                if basis.state().tenant_id == Some(tenant_id) {
                    return Ok((tenant_id, tenant, Some((user_id, basis))));
                }
            }
        }
        let user_key = match user {
            UserKey::Id(id) => format!("{id}"),
            UserKey::Name(_) => String::new(),
        };
        let keys = [
            StreamKey::Id {
                aggregate_type: "tenant",
                aggregate_id: &tenant_key,
            },
            match user {
                UserKey::Id(_) => StreamKey::Id {
                    aggregate_type: "user",
                    aggregate_id: &user_key,
                },
                UserKey::Name(username) => StreamKey::UserByName {
                    tenant_id: tenant_id.as_uuid(),
                    username,
                },
            },
        ];
        let mut read = read_streams(&self.pool, &keys).await?.into_iter();
        let (tenant_rows, user_rows) = (read.next().flatten(), read.next().flatten());
        let tenant = self.tenants.from_rows(&tenant_key, tenant_rows).await?;
        if !tenant.state.exists() {
            return Err(ApiError::tenant_not_found());
        }
        let tenant = self.tenants.read_now(&tenant_key, tenant);
        let user = match user_rows {
            Some(rows) => {
                let id = rows.aggregate_id.clone();
                let loaded = self.users.from_rows(&id, Some(rows)).await?;
                match (loaded.state.id, loaded.state.tenant_id) {
                    (Some(user_id), Some(t)) if t == tenant_id => {
                        if let UserKey::Name(name) = user {
                            self.usernames.put((tenant_id, name.to_string()), user_id);
                        }
                        Some((user_id, self.users.read_now(&id, loaded)))
                    }
                    _ => None,
                }
            }
            None => None,
        };
        Ok((tenant_id, tenant, user))
    }

    /// The tenant as it stands now, to decide again after a command found
    /// it had moved (`ExecError::ReadMoved`).
    pub async fn tenant_now(&self, tenant_id: TenantId) -> Result<Basis<Tenant>, ApiError> {
        let key = tenant_id.to_string();
        let loaded = self.tenants.load_versioned(&key).await?;
        Ok(self.tenants.read_now(&key, loaded))
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

/// Whether state remembered from earlier requests may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// For commands, whose appends check that what they read is current.
    Use,
    /// For answers read straight back to the caller (introspection).
    Fresh,
}

/// How a request names its user.
#[derive(Debug, Clone, Copy)]
pub enum UserKey<'a> {
    Id(UserId),
    /// A username as typed at sign-in (already parsed and normalized).
    Name(&'a str),
}
