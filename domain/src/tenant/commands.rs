//! What can be asked of a tenant.

use super::settings::TwoFactorSettings;
use crate::context::Ctx;
use crate::ids::TenantId;

#[derive(Debug, Clone, PartialEq)]
pub enum TenantCommand {
    Create {
        tenant_id: TenantId,
        name: String,
        ctx: Ctx,
    },
    ChangeTwoFactorSettings {
        settings: TwoFactorSettings,
        ctx: Ctx,
    },
}
