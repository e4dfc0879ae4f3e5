//! One committed event as the projections see it: the platform's
//! [`Envelope`], whether read from PostgreSQL (rebuild, `as_of`) or from
//! JetStream (live).

use serde::Deserialize;
use sqlx::PgPool;
use twofold_domain::tenant::TenantEvent;
use twofold_domain::user::UserEvent;
use twofold_platform::envelope::COLUMNS;
use twofold_platform::personal::Personal;

pub use twofold_platform::envelope::Envelope as EventRecord;

/// The event, typed, for the aggregates the projections know.
#[derive(Debug, Clone)]
pub enum Typed {
    User(Box<UserEvent>),
    Tenant(Box<TenantEvent>),
    /// Another aggregate's event (kept in the audit history as it is).
    Other,
}

/// What the projections read from an event beyond its envelope.
pub trait RecordExt {
    fn typed(&self) -> anyhow::Result<Typed>;
    /// The tenant the event belongs to: the one the store recorded, or, for
    /// a tenant's own stream, its id, or the one a `UserRegistered` names.
    fn owning_tenant(&self) -> Option<String>;
}

impl RecordExt for EventRecord {
    fn typed(&self) -> anyhow::Result<Typed> {
        Ok(match self.aggregate_type.as_str() {
            "user" => Typed::User(Box::new(self.event()?)),
            "tenant" => Typed::Tenant(Box::new(self.event()?)),
            _ => Typed::Other,
        })
    }

    fn owning_tenant(&self) -> Option<String> {
        if self.aggregate_type == "tenant" {
            return Some(self.aggregate_id.clone());
        }
        if let Some(tenant) = &self.tenant_id {
            return Some(tenant.clone());
        }
        // UserRegistered names the tenant itself.
        match self.event::<Registered>() {
            Ok(Registered::UserRegistered { tenant_id }) if self.aggregate_type == "user" => {
                Some(tenant_id)
            }
            _ => None,
        }
    }
}

/// The one field read from a `UserRegistered` (any other event fails to parse).
#[derive(Deserialize)]
enum Registered {
    UserRegistered { tenant_id: String },
}

/// Events after `after`, in commit order, at most `limit`.
pub async fn load_batch(pool: &PgPool, after: i64, limit: i64) -> anyhow::Result<Vec<EventRecord>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM events WHERE global_position > $1 ORDER BY global_position LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

fn tenant_query() -> String {
    format!(
        "SELECT {COLUMNS} FROM events WHERE (aggregate_type = 'tenant' AND aggregate_id = $1) \
         OR (aggregate_type = 'user' AND aggregate_id IN \
             (SELECT user_id::text FROM usernames WHERE tenant_id::text = $1)) \
         OR metadata::jsonb ->> 'tenant_id' = $1 \
         ORDER BY global_position"
    )
}

/// Every event of one tenant's users and the tenant itself, in commit order,
/// opened.
pub async fn load_tenant(
    pool: &PgPool,
    personal: &Personal,
    tenant_id: &str,
) -> anyhow::Result<Vec<EventRecord>> {
    let mut records = sqlx::query_as(&tenant_query())
        .bind(tenant_id)
        .fetch_all(pool)
        .await?;
    personal.open_envelopes(pool, &mut records).await?;
    Ok(records)
}

/// The events [`load_tenant`] loads, handed to `each` in batches of at most
/// `batch`, opened, without holding them all.
pub async fn each_of_tenant(
    pool: &PgPool,
    personal: &Personal,
    tenant_id: &str,
    batch: usize,
    mut each: impl FnMut(&[EventRecord]),
) -> anyhow::Result<()> {
    use futures::TryStreamExt;
    let query = tenant_query();
    let mut rows = sqlx::query_as::<_, EventRecord>(&query)
        .bind(tenant_id)
        .fetch(pool)
        .try_chunks(batch);
    while let Some(mut records) = rows.try_next().await.map_err(|e| e.1)? {
        personal.open_envelopes(pool, &mut records).await?;
        each(&records);
    }
    Ok(())
}
