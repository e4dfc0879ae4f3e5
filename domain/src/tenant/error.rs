//! Why a tenant command was refused.

use super::settings::SettingsError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TenantError {
    #[error("the tenant already exists")]
    AlreadyExists,
    #[error("no such tenant")]
    NotFound,
    #[error("the tenant name must be 1 to 100 characters")]
    InvalidName,
    #[error("invalid two-factor settings: {0}")]
    InvalidSettings(#[from] SettingsError),
    #[error("only an admin may change the tenant's settings")]
    NotAnAdmin,
}
