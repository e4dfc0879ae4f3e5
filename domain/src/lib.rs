//! The pure domain of twofold: tenants, users and their sign-ins as event-sourced
//! aggregates. No I/O and no clock: the services look data up (password checks,
//! TOTP matches, tenant policy, the time) and put it into the commands.

pub mod context;
pub mod delivery;
pub mod ids;
pub mod secrets;
pub mod tenant;
pub mod user;
pub mod values;

pub use context::{Actor, Ctx};

/// Aggregates that belong to one tenant; the store writes the tenant into
/// each event's metadata so the relay and projections can route by it.
pub trait TenantScoped {
    fn tenant(&self) -> Option<TenantId>;
}

impl TenantScoped for tenant::Tenant {
    fn tenant(&self) -> Option<TenantId> {
        self.id
    }
}

impl TenantScoped for user::User {
    fn tenant(&self) -> Option<TenantId> {
        self.tenant_id
    }
}
pub use ids::{ChallengeId, SessionId, TenantId, UserId};
