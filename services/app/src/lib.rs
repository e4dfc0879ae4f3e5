//! The application layer: one function per use case (sign-in, verification,
//! enrollment, step-up, self-service, admin actions, reports). It owns the
//! decide-and-retry loop over the event store, the username claim, tokens and
//! proofs, and the metrics taken from events. The HTTP API, the pages and the
//! CLI are thin adapters over it: they parse input, call one use case and
//! render its typed answer.

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod backup_codes;
mod budgets;
pub mod console;
pub mod error;
pub mod me;
mod observe;
pub mod operator;
mod reads;
pub mod reports;
pub mod session;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use twofold_domain::tenant::Tenant;
use twofold_domain::user::User;
use twofold_domain::{Actor, Ctx, TenantId, UserId};
use twofold_platform::crypto::Keyring;
use twofold_platform::password::Passwords;
use twofold_platform::personal::Personal;
use twofold_platform::store::{Cache, Store};
use twofold_platform::{db, Clock, Config};

pub use error::AppError;
pub use reads::{Memory, UserKey};
pub use session::{AdminSession, ReaderSession, Session};

/// Usernames remembered per process.
const REMEMBERED_USERNAMES: usize = 16_384;
/// Overview checkpoints kept parsed (2 to 4; one of a large tenant is tens
/// of MB).
const REMEMBERED_CHECKPOINTS: usize = 4;

/// What every use case works with; cheap to clone.
#[derive(Clone)]
pub struct App(Arc<Inner>);

pub struct Inner {
    pub pool: PgPool,
    pub tenants: Store<Tenant>,
    pub users: Store<User>,
    /// Usernames seen at sign-in, by tenant: a registered username never
    /// changes hands, so remembering it saves a read.
    pub usernames: Cache<(TenantId, String), UserId>,
    pub passwords: Passwords,
    pub keys: Keyring,
    /// Seals and opens personal data (per-user data keys).
    pub personal: Personal,
    pub clock: Arc<dyn Clock>,
    /// The SMS providers configured, by name: tenant settings may name only these.
    pub sms_providers: Vec<String>,
    /// A few connections for the budgets, committing without waiting for
    /// the WAL flush: a budget's last uses lost in a crash cost nothing, and
    /// a sign-in should not pay two more flushes for them.
    pub budgets_pool: PgPool,
    /// The Overview's checkpoints last used by `as_of`, parsed.
    pub overview_checkpoints: twofold_projections::as_of::Remembered,
    /// The directory counts matching users up to this many.
    pub directory_count_limit: u32,
    /// A permit per tenant-wide audit export streaming now; none left, and
    /// the next is refused.
    pub audit_exports: Arc<tokio::sync::Semaphore>,
    pub audit_exports_at_once: usize,
    /// How long an export waits for its client to take the next chunk
    /// before it is cut short and gives its place up.
    pub audit_export_idle: std::time::Duration,
}

/// How far the admins' and auditors' reads go at once (see `Config`).
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// The directory counts matching users up to this many.
    pub directory_count_limit: u32,
    /// Audit exports streamed at once.
    pub audit_exports_at_once: usize,
    /// How long an export waits for its client to take a chunk.
    pub audit_export_idle: std::time::Duration,
}

impl std::ops::Deref for App {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl App {
    pub fn new(
        pool: PgPool,
        passwords: Passwords,
        keys: Keyring,
        clock: Arc<dyn Clock>,
        remembered_streams: usize,
        sms_providers: Vec<String>,
        limits: ReadLimits,
    ) -> Self {
        let ReadLimits {
            directory_count_limit,
            audit_exports_at_once,
            audit_export_idle,
        } = limits;
        let budget_connections = (*pool.connect_options())
            .clone()
            .options([("synchronous_commit", "off")]);
        let budgets_pool =
            twofold_platform::db::pool_options(4).connect_lazy_with(budget_connections);
        let personal = Personal::new(keys.clone());
        Self(Arc::new(Inner {
            budgets_pool,
            sms_providers,
            directory_count_limit,
            audit_exports: Arc::new(tokio::sync::Semaphore::new(audit_exports_at_once)),
            audit_exports_at_once,
            audit_export_idle,
            tenants: Store::remembering(pool.clone(), remembered_streams),
            users: Store::remembering(pool.clone(), remembered_streams).sealing(personal.clone()),
            personal,
            usernames: Cache::new(REMEMBERED_USERNAMES),
            overview_checkpoints: Cache::new(REMEMBERED_CHECKPOINTS),
            pool,
            passwords,
            keys,
            clock,
        }))
    }

    /// Connects to PostgreSQL as configured and applies the migrations.
    pub async fn connect(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let pool = db::connect(config).await?;
        db::migrate(&pool).await?;
        Ok(Self::new(
            pool,
            Passwords::for_this_machine()?,
            config.keyring()?,
            clock,
            config.remembered_streams,
            config.sms_providers.keys().cloned().collect(),
            ReadLimits {
                directory_count_limit: config.directory_count_limit,
                audit_exports_at_once: config.audit_exports_at_once,
                audit_export_idle: std::time::Duration::from_secs(config.audit_export_idle_secs),
            },
        ))
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
}

/// Where a request came from, for the audit record (the adapters fill it:
/// HTTP from the peer and trusted proxies, the CLI with nothing).
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

impl Origin {
    /// The context of a command by `actor`, now.
    pub fn ctx(&self, at: DateTime<Utc>, actor: Actor) -> Ctx {
        Ctx::new(at, actor).with_request(self.ip.clone(), self.user_agent.clone())
    }
}
