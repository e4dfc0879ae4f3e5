//! What happened to a tenant. Shipped event shapes are versioned, never changed.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use super::settings::TwoFactorSettings;
use crate::context::Ctx;
use crate::ids::TenantId;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TenantEvent {
    TenantCreated {
        tenant_id: TenantId,
        name: String,
        settings: TwoFactorSettings,
        ctx: Ctx,
    },
    TwoFactorSettingsChanged {
        settings: TwoFactorSettings,
        ctx: Ctx,
    },
}

impl DomainEvent for TenantEvent {
    fn event_type(&self) -> String {
        match self {
            TenantEvent::TenantCreated { .. } => "TenantCreated",
            TenantEvent::TwoFactorSettingsChanged { .. } => "TwoFactorSettingsChanged",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
