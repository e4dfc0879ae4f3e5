//! Creating tenants and users, and changing a tenant's settings: shared by
//! the admin API and the `twofold` CLI.

use rand::distributions::{Alphanumeric, DistString};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use twofold_domain::tenant::{TenantCommand, TwoFactorSettings};
use twofold_domain::user::{UserCommand, UserError};
use twofold_domain::values::{Email, Phone, Role, Username, ValueError};
use twofold_domain::{Actor, Ctx, TenantId, UserId};
use twofold_platform::store::Claim;
use uuid::Uuid;

use crate::auth::MAX_PASSWORD_BYTES;
use crate::{observe, App, AppError};

/// A user to create, as given (parsed here, once).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub username: String,
    pub password: SecretString,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub service_account: bool,
}

pub const MIN_PASSWORD_CHARS: usize = 8;

pub(crate) fn check_password(password: &SecretString) -> Result<(), AppError> {
    let p = password.expose_secret();
    if p.chars().count() < MIN_PASSWORD_CHARS || p.len() > MAX_PASSWORD_BYTES {
        return Err(AppError::InvalidField(ValueError {
            field: "password",
            message: "must be 8 characters to 1024 bytes long",
        }));
    }
    Ok(())
}

/// An optional field: absent or empty is none.
fn optional<T>(
    raw: Option<&str>,
    parse: impl Fn(&str) -> Result<T, ValueError>,
) -> Result<Option<T>, AppError> {
    Ok(raw.filter(|s| !s.is_empty()).map(parse).transpose()?)
}

impl App {
    /// Registers a user: hashes the password, then claims the username and
    /// appends `UserRegistered` in one transaction (both or neither).
    #[tracing::instrument(skip_all)]
    pub async fn create_user(
        &self,
        tenant_id: TenantId,
        new: NewUser,
        ctx: Ctx,
    ) -> Result<UserId, AppError> {
        let username = Username::parse(&new.username)?;
        let email = optional(new.email.as_deref(), Email::parse)?;
        let phone = optional(new.phone.as_deref(), Phone::parse)?;
        let roles = new
            .roles
            .iter()
            .map(|r| Role::parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        check_password(&new.password)?;
        let password_hash = self.passwords.hash(&new.password).await?;
        let user_id = UserId(Uuid::new_v4());
        self.users
            .create_claiming(
                &user_id.to_string(),
                UserCommand::Register {
                    user_id,
                    tenant_id,
                    username: username.clone(),
                    email,
                    phone,
                    roles,
                    service_account: new.service_account,
                    password_hash,
                    ctx,
                },
                Claim::Username {
                    tenant_id: tenant_id.as_uuid(),
                    username: username.as_str(),
                    user_id: user_id.as_uuid(),
                },
            )
            .await?;
        observe::user_created();
        Ok(user_id)
    }

    /// A tenant and its first admin, whose generated password is returned once.
    #[tracing::instrument(skip_all)]
    pub async fn create_tenant(
        &self,
        name: &str,
        admin_username: &str,
        admin_email: Option<String>,
        ctx: Ctx,
    ) -> Result<CreatedTenant, AppError> {
        let tenant_id = TenantId(Uuid::new_v4());
        // Check the admin's fields before the tenant exists, so a typo leaves nothing behind.
        Username::parse(admin_username)?;
        if let Some(e) = admin_email.as_deref() {
            Email::parse(e)?;
        }
        self.tenants
            .execute(&tenant_id.to_string(), |_| {
                Ok(TenantCommand::Create {
                    tenant_id,
                    name: name.to_string(),
                    ctx: ctx.clone(),
                })
            })
            .await?;
        let password = Alphanumeric.sample_string(&mut rand::rngs::OsRng, 20);
        let admin_user_id = self
            .create_user(
                tenant_id,
                NewUser {
                    username: admin_username.to_string(),
                    password: SecretString::from(password.clone()),
                    email: admin_email,
                    phone: None,
                    roles: vec![Role::ADMIN.to_string()],
                    service_account: false,
                },
                ctx.clone(),
            )
            .await?;
        let ctx_after = ctx;
        // The generated password is for the first sign-in only.
        self.users
            .execute(&admin_user_id.to_string(), |_| {
                Ok(UserCommand::RequirePasswordChange {
                    ctx: ctx_after.clone(),
                })
            })
            .await?;
        Ok(CreatedTenant {
            tenant_id,
            admin_user_id,
            admin_username: admin_username.to_lowercase(),
            one_time_password: password,
        })
    }

    /// Replaces the tenant's two-factor settings (with the reason, which the
    /// audit history keeps); answers them as stored.
    #[tracing::instrument(skip_all)]
    pub async fn change_settings(
        &self,
        tenant_id: TenantId,
        settings: TwoFactorSettings,
        ctx: Ctx,
    ) -> Result<TwoFactorSettings, AppError> {
        if ctx.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
            return Err(twofold_domain::user::UserError::ReasonRequired.into());
        }
        self.check_sms_provider(&settings)?;
        self.tenants
            .execute(&tenant_id.to_string(), |_| {
                Ok(TenantCommand::ChangeTwoFactorSettings {
                    settings: settings.clone(),
                    ctx: ctx.clone(),
                })
            })
            .await?;
        Ok(self.tenant(&tenant_id.to_string()).await?.1.settings)
    }
}

#[derive(Debug, Serialize)]
pub struct CreatedTenant {
    pub tenant_id: TenantId,
    pub admin_user_id: UserId,
    pub admin_username: String,
    /// Shown once; only its argon2id hash is kept.
    pub one_time_password: String,
}

impl App {
    /// Settings may name only an SMS provider this deployment has configured.
    fn check_sms_provider(&self, settings: &TwoFactorSettings) -> Result<(), AppError> {
        match &settings.sms_provider {
            Some(name) if !self.sms_providers.iter().any(|p| p == name) => {
                Err(AppError::UnknownSmsProvider {
                    configured: self.sms_providers.clone(),
                })
            }
            _ => Ok(()),
        }
    }
}

impl App {
    /// A new password through a reset link's token: every session ends; the
    /// next sign-in asks the second factor as always.
    #[tracing::instrument(skip_all)]
    pub async fn reset_password_with_link(
        &self,
        raw_tenant: &str,
        token: &SecretString,
        new_password: &SecretString,
        origin: &crate::Origin,
    ) -> Result<(), AppError> {
        let (tenant_id, _) = self.tenant(raw_tenant).await?;
        let invalid = || AppError::Refused(UserError::ResetLinkInvalid);
        let mut parts = token.expose_secret().splitn(3, '.');
        let (Some(user), Some(reset), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let (Ok(user_id), Ok(reset_id)) = (user.parse::<UserId>(), reset.parse::<Uuid>()) else {
            return Err(invalid());
        };
        if !self
            .keys
            .reset_link_matches(user_id.as_uuid().as_bytes(), reset_id.as_bytes(), secret)
        {
            return Err(invalid());
        }
        self.user_in(tenant_id, user_id)
            .await?
            .ok_or_else(invalid)?;
        check_password(new_password)?;
        let new_hash = self.passwords.hash(new_password).await?;
        let ctx = origin.ctx(self.now(), Actor::User(user_id));
        self.users
            .execute(&user_id.to_string(), |_| {
                Ok(UserCommand::ResetPasswordByLink {
                    reset_id,
                    new_hash: new_hash.clone(),
                    ctx: ctx.clone(),
                })
            })
            .await?;
        Ok(())
    }
}

/// How long a password reset link works.
pub const RESET_LINK_HOURS: i64 = 1;
