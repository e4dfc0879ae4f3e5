//! The PostgreSQL pool and the schema migrations in `migrations/`.

use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::Connection;
pub use sqlx::PgPool;

use crate::Config;

/// A connection idle longer than this is checked before it is handed out.
const IDLE_BEFORE_CHECK: Duration = Duration::from_secs(2);

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A pool that fails fast when PostgreSQL is down, so callers answer 503
/// promptly instead of hanging.
pub async fn connect(config: &Config) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = config
        .database_url
        .expose_secret()
        .parse()
        .context("the database URL is not a valid PostgreSQL connection string")?;
    pool_options(config.database_max_connections)
        .connect_with(options)
        .await
        .context("connecting to PostgreSQL (is it running? try ops/deps)")
}

/// The pool every worker uses, with at most `max_connections`.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        // sqlx pings every connection it hands out: a round trip before each
        // query. Only a connection that sat idle for a while is checked here;
        // one in steady use is not, and a broken one fails its query (503)
        // and is dropped.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > IDLE_BEFORE_CHECK {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// A pool on a migrated database, waiting (with backoff) until PostgreSQL is
/// there: how a worker connects at start.
pub async fn connect_and_migrate(config: &Config) -> PgPool {
    crate::retrying("connecting to PostgreSQL", || async {
        let pool = connect(config).await?;
        migrate(&pool).await?;
        Ok(pool)
    })
    .await
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("applying the database migrations")
}

/// How many events the store holds.
pub async fn count_events(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?)
}
