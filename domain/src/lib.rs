//! The pure domain of twofold: tenants, users and their sign-ins as event-sourced
//! aggregates. No I/O and no clock: the services look data up (password checks,
//! TOTP matches, tenant policy, the time) and put it into the commands.

pub mod context;
pub mod ids;
pub mod secrets;
pub mod tenant;
pub mod user;
pub mod values;

pub use context::{Actor, Ctx};
pub use ids::{ChallengeId, SessionId, TenantId, UserId};
