//! The verifier: twofold's HTTP API (axum). Stateless; run as many as needed
//! behind a load balancer. `build` prepares it, `run_until_stopped` serves.

pub mod error;
pub mod extract;
pub mod layers;
pub mod openapi;
pub mod pages;
pub mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;
use twofold_app::App;
use twofold_platform::{telemetry, Clock, Config};
use twofold_projections::checkpoints::CheckpointPolicy;

use error::ApiError;

/// What every handler shares: the application and what only HTTP needs.
#[derive(Clone)]
pub struct ApiState {
    pub app: App,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
    /// Whether browser cookies are marked `Secure`.
    pub secure_cookies: bool,
    /// The SMS providers configured, by name (for the settings page).
    pub sms_providers: Arc<[String]>,
}

/// Cookies are `Secure` unless the pages are served over plain http on
/// loopback (a developer's machine), where a browser would not send them back.
pub fn secure_cookies(public_url: &str) -> bool {
    let Some(rest) = public_url.strip_prefix("http://") else {
        return true;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// The API's routes over `state`, with `/health` (answers `ok`, touching
/// nothing), `/health/live` and `/health/ready` (a query on the database).
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    use routes::{admin, auth, me, reports};
    let tenant = Router::new()
        .route("/sign-in", post(auth::sign_in))
        .route("/challenge/verify", post(auth::verify))
        .route("/challenge/resend", post(auth::resend))
        .route("/challenge/switch", post(auth::switch))
        .route("/sessions/introspect", post(auth::introspect))
        .route("/sign-out", post(auth::sign_out))
        .route("/password/reset", post(auth::reset_with_link))
        .route("/enrollment/complete", post(auth::complete_enrollment))
        .route("/enrollment/skip", post(auth::skip_enrollment))
        .route("/me", get(me::profile).patch(me::change_contact))
        .route("/me/step-up", post(me::step_up))
        .route("/me/two-factor", post(me::set_voluntary))
        .route("/me/preferred-method", post(me::set_preferred_method))
        .route("/me/password", post(me::change_password))
        .route(
            "/me/backup-codes",
            get(me::backup_codes).post(me::regenerate_backup_codes),
        )
        .route("/me/totp", post(me::start_totp).delete(me::remove_totp))
        .route("/me/totp/qr.png", get(me::totp_qr))
        .route("/me/totp/confirm", post(me::confirm_totp))
        .route("/users", post(admin::create_user).get(reports::directory))
        .route("/users/{user}/history", get(reports::user_history))
        .route("/overview", get(reports::overview))
        .route("/overview/daily", get(reports::daily))
        .route("/overview/delivery", get(reports::delivery))
        .route("/audit", get(reports::audit_export))
        .route("/audit/keys", get(reports::audit_keys))
        .route("/audit/checkpoints", get(reports::audit_checkpoints))
        .route(
            "/users/{user}",
            get(admin::get_user).patch(admin::update_user),
        )
        .route("/users/{user}/login-as", post(admin::login_as))
        .route("/users/{user}/erase", post(admin::erase_user))
        .route("/users/{user}/reset-password", post(admin::reset_password))
        .route(
            "/users/{user}/reset-enrollment",
            post(admin::reset_enrollment),
        )
        .route("/users/{user}/unlock", post(admin::unlock))
        .route(
            "/users/{user}/revoke-sessions",
            post(admin::revoke_sessions),
        )
        .route(
            "/users/{user}/devices/{device}/forget",
            post(admin::forget_device),
        )
        .route(
            "/users/{user}/backup-codes",
            post(admin::regenerate_backup_codes),
        )
        .route("/sessions/revoke-all", post(admin::revoke_all_sessions))
        .route(
            "/settings",
            get(admin::get_settings).put(admin::put_settings),
        );
    Router::new()
        .nest("/v1/tenants/{tenant}", tenant)
        .nest("/t/{tenant}", pages::router(state.clone()))
        .merge(pages::assets())
        .merge(openapi::routes())
        .merge(pages::api_reference())
        .route("/health", get(|| async { "ok" }))
        .merge(health(&state.app))
        .fallback(|| async { ApiError::not_found() })
        .layer(middleware::from_fn(record_request))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(
            max_body_bytes,
            layers::read_body,
        ))
        .layer(middleware::from_fn(layers::timeout))
        .layer(TraceLayer::new_for_http().make_span_with(layers::request_span))
        .layer(middleware::from_fn(layers::request_id))
        .with_state(state)
}

/// `GET /health/live` (200 while the process runs) and `GET /health/ready`
/// (200 when PostgreSQL answers a query, else 503 and why), for load balancers.
fn health(app: &App) -> Router<ApiState> {
    let readiness = telemetry::Readiness::new(false);
    readiness.set_pool(&app.pool);
    Router::new()
        .route("/health/live", get(|| async { "live\n" }))
        .route(
            "/health/ready",
            get(move || async move { telemetry::ready_answer(&readiness).await }),
        )
}

/// Request latency by route and status.
async fn record_request(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::histogram!(
        "twofold_http_request_duration_seconds",
        "route" => route,
        "method" => method,
        "status" => response.status().as_u16().to_string(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// A verifier bound to its ports, ready to serve.
pub struct Verifier {
    listener: TcpListener,
    metrics_listener: TcpListener,
    router: Router,
    app: App,
    checkpoints: CheckpointPolicy,
}

/// How often a verifier extends the tenants' audit chains and signs the
/// checkpoints that are due (their timing is the policy's, by the clock).
const CHECKPOINTS_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Signs the audit checkpoints due, then prunes the audit entries past each
/// tenant's retention, every [`CHECKPOINTS_EVERY`].
async fn record_checkpoints(app: App, policy: CheckpointPolicy) {
    let mut every = tokio::time::interval_at(
        tokio::time::Instant::now() + CHECKPOINTS_EVERY,
        CHECKPOINTS_EVERY,
    );
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = app.record_audit_checkpoints(&policy).await {
            tracing::warn!(error = %format!("{e:#}"), "signing audit checkpoints");
        }
        if let Err(e) = app.prune_audit().await {
            tracing::warn!(error = %format!("{e:#}"), "pruning audit entries past retention");
        }
    }
}

impl Verifier {
    /// Connects to PostgreSQL, applies migrations, binds the API and metrics ports.
    pub async fn build(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let app = App::connect(config, clock).await?;
        let listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding the API port {}", config.http_addr))?;
        let metrics_listener = telemetry::bind(config.metrics_addr).await?;
        let state = ApiState {
            app: app.clone(),
            trusted_proxies: config.trusted_proxies.clone().into(),
            secure_cookies: secure_cookies(&config.public_url),
            sms_providers: config.sms_providers.keys().cloned().collect(),
        };
        let router = router(state, config.max_body_bytes);
        Ok(Self {
            listener,
            metrics_listener,
            router,
            app,
            checkpoints: CheckpointPolicy::from_config(config),
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    pub fn metrics_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.metrics_listener.local_addr()?)
    }

    /// The application this verifier serves (tests drive it directly).
    pub fn app(&self) -> App {
        self.app.clone()
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let handle = telemetry::metrics_handle()?;
        let readiness = telemetry::Readiness::new(false).observed("verifier");
        readiness.set_pool(&self.app.pool);
        let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics = tokio::spawn(telemetry::serve(
            self.metrics_listener,
            handle,
            readiness,
            async {
                let _ = metrics_stopped.await;
            },
        ));
        let checkpoints = tokio::spawn(record_checkpoints(self.app.clone(), self.checkpoints));
        tracing::info!(addr = %self.listener.local_addr()?, "verifier listening");
        // Without Nagle's delay: a streamed answer's small chunks (an
        // export's lines) otherwise wait for the client's delayed ACK.
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let served = axum::serve(
            listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving the API");
        checkpoints.abort();
        let _ = stop_metrics.send(());
        let _ = metrics.await;
        served
    }
}
