//! Creating tenants and users: shared by the admin API and the `twofold` CLI.

use rand::distributions::{Alphanumeric, DistString};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use twofold_domain::tenant::{TenantCommand, TwoFactorSettings};
use twofold_domain::user::UserCommand;
use twofold_domain::values::{Email, Phone, Role, Username, ValueError};
use twofold_domain::{Ctx, TenantId, UserId};
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;
use axum::http::StatusCode;

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
pub const MAX_PASSWORD_BYTES: usize = 1024;

pub fn check_password(password: &SecretString) -> Result<(), ApiError> {
    let p = password.expose_secret();
    if p.chars().count() < MIN_PASSWORD_CHARS || p.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::invalid_value(ValueError {
            field: "password",
            message: "must be 8 characters to 1024 bytes long",
        }));
    }
    Ok(())
}

/// Registers a user: claims the username, hashes the password, appends
/// `UserRegistered`. The claim is released again if registration fails.
pub async fn create_user(
    state: &AppState,
    tenant_id: TenantId,
    new: NewUser,
    ctx: Ctx,
) -> Result<UserId, ApiError> {
    let username = Username::parse(&new.username).map_err(ApiError::invalid_value)?;
    let email = new
        .email
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(Email::parse)
        .transpose()
        .map_err(ApiError::invalid_value)?;
    let phone = new
        .phone
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(Phone::parse)
        .transpose()
        .map_err(ApiError::invalid_value)?;
    let roles = new
        .roles
        .iter()
        .map(|r| Role::parse(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::invalid_value)?;
    check_password(&new.password)?;
    let password_hash = state.passwords.hash(&new.password).await?;

    let user_id = UserId(Uuid::new_v4());
    let claimed = sqlx::query(
        "INSERT INTO usernames (tenant_id, username, user_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(tenant_id.as_uuid())
    .bind(username.as_str())
    .bind(user_id.as_uuid())
    .execute(&state.pool)
    .await?
    .rows_affected();
    if claimed == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "username_taken",
            "A user with this username already exists in the tenant.",
        ));
    }
    let result = state
        .users
        .execute(&user_id.to_string(), |_| {
            Ok(UserCommand::Register {
                user_id,
                tenant_id,
                username: username.clone(),
                email: email.clone(),
                phone: phone.clone(),
                roles: roles.clone(),
                service_account: new.service_account,
                password_hash: password_hash.clone(),
                ctx: ctx.clone(),
            })
        })
        .await;
    if let Err(e) = result {
        let _ = sqlx::query("DELETE FROM usernames WHERE user_id = $1")
            .bind(user_id.as_uuid())
            .execute(&state.pool)
            .await;
        return Err(e.into());
    }
    metrics::counter!("twofold_users_created_total").increment(1);
    Ok(user_id)
}

#[derive(Debug, Serialize)]
pub struct CreatedTenant {
    pub tenant_id: TenantId,
    pub admin_user_id: UserId,
    pub admin_username: String,
    /// Shown once; only its argon2id hash is kept.
    pub one_time_password: String,
}

/// A tenant and its first admin, whose generated password is returned once.
pub async fn create_tenant(
    state: &AppState,
    name: &str,
    admin_username: &str,
    admin_email: Option<String>,
    ctx: Ctx,
) -> Result<CreatedTenant, ApiError> {
    let tenant_id = TenantId(Uuid::new_v4());
    // Check the admin's fields before the tenant exists, so a typo leaves nothing behind.
    Username::parse(admin_username).map_err(ApiError::invalid_value)?;
    if let Some(e) = admin_email.as_deref() {
        Email::parse(e).map_err(ApiError::invalid_value)?;
    }
    state
        .tenants
        .execute(&tenant_id.to_string(), |_| {
            Ok(TenantCommand::Create {
                tenant_id,
                name: name.to_string(),
                ctx: ctx.clone(),
            })
        })
        .await?;
    let password = Alphanumeric.sample_string(&mut rand::rngs::OsRng, 20);
    let admin_user_id = create_user(
        state,
        tenant_id,
        NewUser {
            username: admin_username.to_string(),
            password: SecretString::from(password.clone()),
            email: admin_email,
            phone: None,
            roles: vec![Role::ADMIN.to_string()],
            service_account: false,
        },
        ctx,
    )
    .await?;
    Ok(CreatedTenant {
        tenant_id,
        admin_user_id,
        admin_username: admin_username.to_lowercase(),
        one_time_password: password,
    })
}

pub async fn change_settings(
    state: &AppState,
    tenant_id: TenantId,
    settings: TwoFactorSettings,
    ctx: Ctx,
) -> Result<TwoFactorSettings, ApiError> {
    state
        .tenants
        .execute(&tenant_id.to_string(), |_| {
            Ok(TenantCommand::ChangeTwoFactorSettings {
                settings: settings.clone(),
                ctx: ctx.clone(),
            })
        })
        .await?;
    Ok(state.tenant(&tenant_id.to_string()).await?.1.settings)
}
