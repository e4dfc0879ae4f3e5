//! Reading what a command is decided on: the tenant and the user, remembered
//! from earlier requests where that is safe, else read together.

use twofold_domain::tenant::Tenant;
use twofold_domain::user::User;
use twofold_domain::{TenantId, UserId};
use twofold_platform::store::{read_streams, Basis, StreamKey};

use crate::{App, AppError};

impl App {
    /// The tenant named in a path, or 404 for a malformed or unknown id.
    pub async fn tenant(&self, raw_id: &str) -> Result<(TenantId, Tenant), AppError> {
        let id: TenantId = raw_id.parse().map_err(|_| AppError::TenantNotFound)?;
        let tenant = self.tenants.load(&id.to_string()).await?;
        if tenant.exists() {
            Ok((id, tenant))
        } else {
            Err(AppError::TenantNotFound)
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
    ) -> Result<(TenantId, Basis<Tenant>, Option<(UserId, Basis<User>)>), AppError> {
        let tenant_id: TenantId = raw_tenant.parse().map_err(|_| AppError::TenantNotFound)?;
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
            return Err(AppError::TenantNotFound);
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
    pub async fn tenant_now(&self, tenant_id: TenantId) -> Result<Basis<Tenant>, AppError> {
        let key = tenant_id.to_string();
        let loaded = self.tenants.load_versioned(&key).await?;
        Ok(self.tenants.read_now(&key, loaded))
    }

    /// A user of `tenant` (one of another tenant is treated as absent).
    pub async fn user_in(&self, tenant: TenantId, user: UserId) -> Result<Option<User>, AppError> {
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
