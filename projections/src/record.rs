//! One committed event as the projections see it: the event store's row,
//! whether read from PostgreSQL (rebuild, `as_of`) or from JetStream (live).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use twofold_domain::tenant::TenantEvent;
use twofold_domain::user::UserEvent;
use twofold_domain::Ctx;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct EventRecord {
    pub global_position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

/// The event, typed, for the aggregates the projections know.
#[derive(Debug, Clone)]
pub enum Typed {
    User(Box<UserEvent>),
    Tenant(Box<TenantEvent>),
    /// Another aggregate's event (kept in the audit history as it is).
    Other,
}

impl EventRecord {
    pub fn typed(&self) -> anyhow::Result<Typed> {
        Ok(match self.aggregate_type.as_str() {
            "user" => Typed::User(Box::new(UserEvent::deserialize(&self.payload)?)),
            "tenant" => Typed::Tenant(Box::new(TenantEvent::deserialize(&self.payload)?)),
            _ => Typed::Other,
        })
    }

    /// The tenant the event belongs to: from the metadata the store writes,
    /// or, for a tenant's own stream, its id.
    pub fn tenant_id(&self) -> Option<String> {
        if self.aggregate_type == "tenant" {
            return Some(self.aggregate_id.clone());
        }
        self.metadata
            .get("tenant_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| {
                // UserRegistered names the tenant itself.
                self.payload
                    .get("UserRegistered")
                    .and_then(|p| p.get("tenant_id"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
    }

    /// The event's `ctx` (time, actor, IP, reason), wherever the variant keeps it.
    pub fn ctx(&self) -> Option<Ctx> {
        let inner = self.payload.as_object()?.values().next()?;
        serde_json::from_value(inner.get("ctx")?.clone()).ok()
    }
}

/// `json` columns decode straight into `Value`: no jsonb round trip in PostgreSQL.
pub(crate) const SELECT: &str =
    "SELECT global_position, aggregate_type, aggregate_id, sequence, event_type, \
     event_version, payload, metadata, recorded_at FROM events";

/// Events after `after`, in commit order, at most `limit`.
pub async fn load_batch(pool: &PgPool, after: i64, limit: i64) -> anyhow::Result<Vec<EventRecord>> {
    Ok(sqlx::query_as(&format!(
        "{SELECT} WHERE global_position > $1 ORDER BY global_position LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Every event of one tenant's users and the tenant itself, in commit order.
pub async fn load_tenant(pool: &PgPool, tenant_id: &str) -> anyhow::Result<Vec<EventRecord>> {
    Ok(sqlx::query_as(&format!(
        "{SELECT} WHERE (aggregate_type = 'tenant' AND aggregate_id = $1) \
         OR (aggregate_type = 'user' AND aggregate_id IN \
             (SELECT user_id::text FROM usernames WHERE tenant_id::text = $1)) \
         OR metadata::jsonb ->> 'tenant_id' = $1 \
         ORDER BY global_position"
    ))
    .bind(tenant_id)
    .fetch_all(pool)
    .await?)
}
