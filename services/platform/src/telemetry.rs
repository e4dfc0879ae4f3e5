//! Prometheus metrics and health answers: one recorder per process, served
//! on the worker's own port with `/health/live` and `/health/ready`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::consumer::PullConsumer;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio::net::TcpListener;

pub mod catalog;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static INSTALLING: Mutex<()> = Mutex::new(());

/// The process-wide recorder, installed on first use (several in-process
/// services, as in tests, share it), with every metric's HELP text, the
/// build-info gauge and the process metrics.
pub fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let _installing = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".to_string()),
            catalog::SECONDS_BUCKETS,
        )
        .context("configuring histogram buckets")?
        .set_buckets_for_metric(
            Matcher::Full("twofold_store_batch_appends".to_string()),
            catalog::BATCH_BUCKETS,
        )
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    catalog::describe();
    process_collector().describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The workers whose database pool and NATS connection are shown as gauges
/// (each as long as its readiness lives).
static WATCHED: Mutex<Vec<Watched>> = Mutex::new(Vec::new());

/// A worker's name and its readiness's parts, while they live.
type Watched = (&'static str, Weak<RwLock<Parts>>);

/// Brings the gauges read at scrape time up to date: the process metrics,
/// and each watched worker's pool and NATS connection.
fn refresh_gauges() {
    process_collector().collect();
    let mut watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
    watched.retain(|(worker, parts)| {
        let Some(parts) = parts.upgrade() else {
            return false;
        };
        let parts = parts.read().unwrap_or_else(|p| p.into_inner());
        let worker = *worker;
        if let Some(pool) = &parts.pool {
            metrics::gauge!("twofold_db_pool_connections", "worker" => worker).set(pool.size());
            metrics::gauge!("twofold_db_pool_idle_connections", "worker" => worker)
                .set(pool.num_idle() as f64);
            metrics::gauge!("twofold_db_pool_max_connections", "worker" => worker)
                .set(pool.options().get_max_connections());
        }
        if let Some(nats) = &parts.nats {
            let up = nats.connection_state() == async_nats::connection::State::Connected;
            metrics::gauge!("twofold_nats_connected", "worker" => worker).set(if up {
                1.0
            } else {
                0.0
            });
        }
        true
    });
}

fn metrics_router(handle: PrometheusHandle) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                refresh_gauges();
                handle.render()
            }
        }),
    )
}

/// Serves `GET /metrics` in Prometheus text format until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, metrics_router(handle))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving metrics")
}

/// Serves `GET /metrics`, `GET /health/live` (200 while the process runs)
/// and `GET /health/ready` (200 when `readiness` holds, else 503 and why)
/// until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = metrics_router(handle)
        .route("/health/live", get(|| async { "live\n" }))
        .route(
            "/health/ready",
            get(move || {
                let readiness = readiness.clone();
                async move { ready_answer(&readiness).await }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving metrics and health")
}

/// The answer to `GET /health/ready`: 200 `ready`, or 503 and the reason.
pub async fn ready_answer(readiness: &Readiness) -> (StatusCode, String) {
    match readiness.check().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// What a worker's `/health/ready` checks, filled in as it connects: its
/// database, its NATS connection (if it uses NATS) and its JetStream consumers.
#[derive(Clone)]
pub struct Readiness {
    uses_nats: bool,
    parts: Arc<RwLock<Parts>>,
}

#[derive(Default)]
struct Parts {
    pool: Option<PgPool>,
    nats: Option<async_nats::Client>,
    refusal: Option<crate::jetstream::Refusal>,
    consumers: Vec<PullConsumer>,
}

/// Longest a readiness probe waits on one dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Readiness {
    pub fn new(uses_nats: bool) -> Self {
        Self {
            uses_nats,
            parts: Arc::default(),
        }
    }

    /// Shows this worker's pool and NATS connection in the metrics
    /// (`twofold_db_pool_*`, `twofold_nats_connected`, labelled `worker`)
    /// while this readiness lives, and starts its counters at zero.
    pub fn observed(self, worker: &'static str) -> Self {
        if metrics_handle().is_ok() {
            catalog::register_zeros(worker);
        }
        WATCHED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((worker, Arc::downgrade(&self.parts)));
        self
    }

    fn parts(&self) -> std::sync::RwLockWriteGuard<'_, Parts> {
        self.parts.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_pool(&self, pool: &PgPool) {
        self.parts().pool = Some(pool.clone());
    }

    pub fn set_nats(&self, client: &async_nats::Client) {
        self.parts().nats = Some(client.clone());
    }

    /// Where the NATS client notes that the server refused its credentials.
    pub fn set_nats_refusal(&self, refusal: &crate::jetstream::Refusal) {
        self.parts().refusal = Some(refusal.clone());
    }

    pub fn add_consumer(&self, consumer: &PullConsumer) {
        self.parts().consumers.push(consumer.clone());
    }

    /// `Ok` when every dependency answers; else a short reason (no secrets:
    /// no connection strings).
    pub async fn check(&self) -> Result<(), String> {
        let (pool, nats, refusal, consumers) = {
            let parts = self.parts();
            (
                parts.pool.clone(),
                parts.nats.clone(),
                parts.refusal.clone(),
                parts.consumers.clone(),
            )
        };
        let pool = pool.ok_or("not connected to PostgreSQL yet")?;
        match tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&pool)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return Err("PostgreSQL is not answering".into()),
        }
        if self.uses_nats {
            let nats = nats.ok_or("not connected to NATS yet")?;
            if nats.connection_state() != async_nats::connection::State::Connected {
                if refusal.is_some_and(|r| r.refused()) {
                    return Err("NATS refused the credentials (check nats_token, nats_user and nats_password, or nats_credentials_file)".into());
                }
                return Err("NATS is disconnected".into());
            }
            for consumer in &consumers {
                match tokio::time::timeout(PROBE_TIMEOUT, consumer.get_info()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => return Err("a JetStream consumer is not usable".into()),
                }
            }
        }
        Ok(())
    }
}

/// A worker's metrics and health server, from its start (it answers
/// `/health/live` while the worker is still connecting); stops when dropped.
pub struct Telemetry {
    addr: SocketAddr,
    readiness: Readiness,
    server: tokio::task::JoinHandle<()>,
}

impl Telemetry {
    /// Binds `addr` and serves [`serve`] on it in a task of its own.
    pub async fn start(addr: SocketAddr, readiness: Readiness) -> anyhow::Result<Self> {
        let handle = metrics_handle()?;
        let listener = bind(addr).await?;
        let addr = listener.local_addr()?;
        let served = readiness.clone();
        let server = tokio::spawn(async move {
            if let Err(e) = serve(listener, handle, served, std::future::pending()).await {
                tracing::warn!(error = %format!("{e:#}"), "the metrics server stopped");
            }
        });
        Ok(Self {
            addr,
            readiness,
            server,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }
}

/// What a worker on NATS starts from: its metrics and health server (up
/// first, so it answers while the rest is waited for), its migrated
/// database and its NATS client, both watched by `/health/ready`.
pub struct WorkerStart {
    pub telemetry: Telemetry,
    pub pool: PgPool,
    pub nats: async_nats::Client,
}

impl WorkerStart {
    /// Starts `worker` (`relay`, `dispatcher` or `projector`).
    pub async fn begin(config: &crate::Config, worker: &'static str) -> anyhow::Result<Self> {
        let readiness = Readiness::new(true).observed(worker);
        if worker == "dispatcher" {
            catalog::register_sms_providers(config.sms_providers.keys());
        }
        let telemetry = Telemetry::start(config.metrics_addr, readiness).await?;
        let pool = crate::db::connect_and_migrate(config).await;
        telemetry.readiness().set_pool(&pool);
        let refusal = crate::jetstream::Refusal::default();
        telemetry.readiness().set_nats_refusal(&refusal);
        let nats = crate::jetstream::connect_watched(config, &refusal).await?;
        telemetry.readiness().set_nats(&nats);
        Ok(Self {
            telemetry,
            pool,
            nats,
        })
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics port {addr}"))
}

/// Installs the process's log subscriber on stderr: the filter from
/// `TWOFOLD_LOG` (default `info,sqlx=warn`), the format from
/// `TWOFOLD_LOG_FORMAT` (`text`, the default, or `json`). Colour codes only
/// when stderr is a terminal, so piped and collected logs stay plain.
pub fn init_tracing() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;

    let filter = match std::env::var("TWOFOLD_LOG") {
        Ok(spec) => EnvFilter::try_new(&spec)
            .with_context(|| format!("TWOFOLD_LOG: bad filter {spec:?}"))?,
        Err(_) => EnvFilter::new("info,sqlx=warn"),
    };
    let format = std::env::var("TWOFOLD_LOG_FORMAT").unwrap_or_else(|_| "text".to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format.as_str() {
        "text" => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        "json" => builder.json().with_ansi(false).try_init(),
        other => anyhow::bail!("TWOFOLD_LOG_FORMAT: expected text or json, got {other:?}"),
    };
    installed.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}
