//! The operator's break-glass path at the command line: act on a user, read
//! a user, the Overview and the audit export of a tenant without any session
//! (for an admin locked out of the console). Every action is recorded with
//! the operator as actor and the reason given.

use futures::Stream;
use twofold_domain::{Actor, Ctx, TenantId, UserId};
use twofold_projections::audit::Format;
use twofold_projections::overview::Overview;
use twofold_projections::queries::AuditQuery;

use crate::admin::{UserAction, UserDetail};
use crate::{App, AppError};

impl App {
    /// The user of `tenant_id` with this username.
    async fn user_by_name(&self, tenant_id: TenantId, username: &str) -> Result<UserId, AppError> {
        let id: Option<uuid::Uuid> = sqlx::query_scalar(
            "SELECT user_id FROM usernames WHERE tenant_id = $1 AND username = $2",
        )
        .bind(tenant_id.as_uuid())
        .bind(username.trim().to_lowercase())
        .fetch_optional(&self.pool)
        .await?;
        id.map(UserId).ok_or(AppError::UserNotFound)
    }

    /// The user a break-glass command acts on, and the context it is
    /// recorded with: the operator as actor, the reason given (required).
    async fn operator_target(
        &self,
        tenant_id: TenantId,
        username: &str,
        reason: &str,
    ) -> Result<(UserId, Ctx), AppError> {
        if reason.trim().is_empty() {
            return Err(twofold_domain::user::UserError::ReasonRequired.into());
        }
        self.tenant(&tenant_id.to_string()).await?;
        let user_id = self.user_by_name(tenant_id, username).await?;
        Ok((
            user_id,
            Ctx::new(self.now(), Actor::Operator).with_reason(reason.trim()),
        ))
    }

    /// `twofold user unlock|reset-enrollment|revoke-sessions`.
    #[tracing::instrument(skip_all)]
    pub async fn operator_act(
        &self,
        tenant_id: TenantId,
        username: &str,
        action: UserAction,
        reason: &str,
    ) -> Result<(), AppError> {
        let (user_id, ctx) = self.operator_target(tenant_id, username, reason).await?;
        self.users
            .execute(&user_id.to_string(), |_| Ok(action.command(ctx.clone())))
            .await?;
        Ok(())
    }

    /// `twofold user erase`: the erasure of `POST /users/{id}/erase`
    /// (crypto-shredding), recorded with the operator as actor.
    #[tracing::instrument(skip_all)]
    pub async fn operator_erase(
        &self,
        tenant_id: TenantId,
        username: &str,
        reason: &str,
    ) -> Result<(), AppError> {
        let (user_id, ctx) = self.operator_target(tenant_id, username, reason).await?;
        self.erase(user_id, ctx).await
    }

    /// `twofold user show`.
    pub async fn operator_user(
        &self,
        tenant_id: TenantId,
        username: &str,
    ) -> Result<UserDetail, AppError> {
        let user_id = self.user_by_name(tenant_id, username).await?;
        self.user_detail_in(tenant_id, &user_id.to_string()).await
    }

    /// `twofold overview`.
    pub async fn operator_overview(&self, tenant_id: TenantId) -> Result<Overview, AppError> {
        self.tenant(&tenant_id.to_string()).await?;
        self.overview_in(tenant_id, None).await
    }

    /// `twofold audit export`: the same export as `GET /audit`.
    pub async fn operator_audit_export(
        &self,
        tenant_id: TenantId,
        q: AuditQuery,
    ) -> Result<
        (
            Format,
            impl Stream<Item = Result<String, std::io::Error>> + Send + 'static,
        ),
        AppError,
    > {
        self.tenant(&tenant_id.to_string()).await?;
        self.audit_export_in(tenant_id, q)
    }
}
