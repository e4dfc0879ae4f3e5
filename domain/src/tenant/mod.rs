//! The tenant: a portal or company, the issuer name in QR labels, and its
//! two-factor settings.

mod aggregate;
mod commands;
mod error;
mod events;
pub mod settings;

pub use aggregate::Tenant;
pub use commands::TenantCommand;
pub use error::TenantError;
pub use events::TenantEvent;
pub use settings::TwoFactorSettings;
