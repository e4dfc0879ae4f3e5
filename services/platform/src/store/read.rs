//! Reading streams: each one's latest snapshot and the events after it, for
//! one stream or several in a single round trip.

use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;

/// A stream to read.
#[derive(Debug, Clone, Copy)]
pub enum StreamKey<'a> {
    Id {
        aggregate_type: &'static str,
        aggregate_id: &'a str,
    },
    /// The user stream a username of a tenant names (see `usernames`).
    UserByName { tenant_id: Uuid, username: &'a str },
}

/// What was read of one stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamRows {
    pub aggregate_id: String,
    /// The snapshot's sequence and state (JSON), if there is one.
    pub snapshot: Option<(i64, String)>,
    /// The events after the snapshot (all of them without one), in order.
    pub events: Vec<(i64, String)>,
    /// A user stream's data key as stored (server key id, wrapped key);
    /// none for other streams and for an erased user.
    pub data_key: Option<(String, String)>,
}

/// Reads `keys` in one statement; `None` for a stream with no events.
pub async fn read_streams(
    pool: &PgPool,
    keys: &[StreamKey<'_>],
) -> Result<Vec<Option<StreamRows>>, StoreError> {
    let mut sql = String::new();
    let mut texts: Vec<String> = Vec::new();
    let mut param = |value: String| {
        texts.push(value);
        format!("${}", texts.len())
    };
    for (k, key) in keys.iter().enumerate() {
        let is_user = match key {
            StreamKey::Id { aggregate_type, .. } => *aggregate_type == "user",
            StreamKey::UserByName { .. } => true,
        };
        let (kind, id) = match key {
            StreamKey::Id {
                aggregate_type,
                aggregate_id,
            } => (
                param(aggregate_type.to_string()),
                param(aggregate_id.to_string()),
            ),
            StreamKey::UserByName {
                tenant_id,
                username,
            } => {
                let kind = param("user".to_string());
                let tenant = param(tenant_id.to_string());
                let name = param(username.to_string());
                let id = format!(
                    "(SELECT user_id::text FROM usernames WHERE tenant_id = {tenant}::uuid AND username = {name})"
                );
                (kind, id)
            }
        };
        if k > 0 {
            sql.push_str(" UNION ALL ");
        }
        sql.push_str(&format!(
            "(SELECT {k} AS k, aggregate_id, 0 AS part, last_sequence AS sequence, payload::text \
               FROM snapshots WHERE aggregate_type = {kind} AND aggregate_id = {id}) \
             UNION ALL \
             (SELECT {k}, aggregate_id, 1, sequence, payload::text FROM events \
               WHERE aggregate_type = {kind} AND aggregate_id = {id} AND sequence > COALESCE( \
                 (SELECT last_sequence FROM snapshots WHERE aggregate_type = {kind} AND aggregate_id = {id}), 0))"
        ));
        // A user's data key comes in the same round trip, to open the
        // personal data in its events.
        if is_user {
            sql.push_str(&format!(
                " UNION ALL (SELECT {k}, user_id, 2, 0, server_key_id || ':' || wrapped \
                   FROM data_keys WHERE user_id = {id})"
            ));
        }
    }
    sql.push_str(" ORDER BY 1, 3, 4");
    let mut query = sqlx::query_as::<_, (i32, String, i32, i64, String)>(&sql);
    for text in &texts {
        query = query.bind(text);
    }
    let rows = query.fetch_all(pool).await?;
    let mut read: Vec<Option<StreamRows>> = vec![None; keys.len()];
    for (k, aggregate_id, part, sequence, payload) in rows {
        let Some(slot) = usize::try_from(k).ok().and_then(|k| read.get_mut(k)) else {
            continue;
        };
        let stream = slot.get_or_insert_with(|| StreamRows {
            aggregate_id,
            ..StreamRows::default()
        });
        if part == 0 {
            stream.snapshot = Some((sequence, payload));
        } else if part == 2 {
            stream.data_key = payload
                .split_once(':')
                .map(|(kid, wrapped)| (kid.to_string(), wrapped.to_string()));
        } else {
            stream.events.push((sequence, payload));
        }
    }
    Ok(read)
}
