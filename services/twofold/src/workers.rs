//! The long-running workers: verifier, relay, dispatcher, projector. Each is
//! built (connecting, and waiting for what it connects to) and then runs
//! until SIGTERM or ctrl-c, serving its metrics and health on `metrics_addr`.

use std::future::Future;
use std::sync::Arc;

use twofold_platform::{Clock, Config};

use crate::shutdown_signal;

pub async fn verifier(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<()> {
    let verifier = twofold_verifier::Verifier::build(config, clock).await?;
    eprintln!(
        "twofold: verifier on http://{} (metrics on http://{}/metrics)",
        verifier.local_addr()?,
        verifier.metrics_addr()?
    );
    verifier.run_until_stopped(shutdown_signal()).await
}

pub async fn relay(config: &Config) -> anyhow::Result<()> {
    let Some(relay) = built(config, twofold_relay::Relay::build(config)).await? else {
        return Ok(());
    };
    eprintln!(
        "twofold: relay to {} (stream {})",
        config.nats_url, config.nats_stream
    );
    relay.run_until_stopped(shutdown_signal()).await
}

pub async fn dispatcher(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<()> {
    let Some(dispatcher) =
        built(config, twofold_dispatcher::Dispatcher::build(config, clock)).await?
    else {
        return Ok(());
    };
    eprintln!("twofold: dispatcher on stream {}", config.nats_stream);
    dispatcher.run_until_stopped(shutdown_signal()).await;
    Ok(())
}

pub async fn projector(config: &Config) -> anyhow::Result<()> {
    let Some(projector) = built(
        config,
        twofold_projections::consumer::Projector::build(config),
    )
    .await?
    else {
        return Ok(());
    };
    eprintln!("twofold: projector on stream {}", config.nats_stream);
    projector.run_until_stopped(shutdown_signal()).await;
    Ok(())
}

/// The worker `build` makes, or `None` when the process is told to stop
/// while it still waits for PostgreSQL or NATS.
async fn built<W>(
    config: &Config,
    build: impl Future<Output = anyhow::Result<W>>,
) -> anyhow::Result<Option<W>> {
    eprintln!(
        "twofold: metrics and health on http://{}; connecting",
        config.metrics_addr
    );
    tokio::select! {
        worker = build => worker.map(Some),
        _ = shutdown_signal() => Ok(None),
    }
}
