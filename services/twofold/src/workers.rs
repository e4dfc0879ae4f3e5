//! The long-running workers: verifier, relay, dispatcher, projector. Each is
//! built (connecting, and waiting for what it connects to) and then runs
//! until it is told to stop (SIGTERM or ctrl-c), serving its metrics and
//! health on `metrics_addr`. `all` runs the four as tasks of one process.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use twofold_platform::{Clock, Config};

use crate::shutdown_signal;

/// When to stop: SIGTERM or ctrl-c, or (in `all`) another worker ending.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Stops on SIGTERM or ctrl-c; the sender stops it sooner.
    pub fn on_signal() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        let signalled = tx.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = signalled.send(true);
        });
        (tx, Self(rx))
    }

    /// Resolves once stopping was asked for (or nobody can ask any more).
    pub fn requested(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

pub async fn verifier(config: &Config, clock: Arc<dyn Clock>, stop: Stop) -> anyhow::Result<()> {
    let verifier = tokio::select! {
        built = twofold_verifier::Verifier::build(config, clock) => built?,
        _ = stop.requested() => return Ok(()),
    };
    eprintln!(
        "twofold: verifier on http://{} (metrics and health on http://{})",
        verifier.local_addr()?,
        verifier.metrics_addr()?
    );
    verifier.run_until_stopped(stop.requested()).await
}

pub async fn relay(config: &Config, stop: Stop) -> anyhow::Result<()> {
    let Some(relay) = built("relay", config, twofold_relay::Relay::build(config), &stop).await?
    else {
        return Ok(());
    };
    eprintln!(
        "twofold: relay to {} (stream {})",
        config.nats_url, config.nats_stream
    );
    relay.run_until_stopped(stop.requested()).await
}

pub async fn dispatcher(config: &Config, clock: Arc<dyn Clock>, stop: Stop) -> anyhow::Result<()> {
    let Some(dispatcher) = built(
        "dispatcher",
        config,
        twofold_dispatcher::Dispatcher::build(config, clock),
        &stop,
    )
    .await?
    else {
        return Ok(());
    };
    eprintln!("twofold: dispatcher on stream {}", config.nats_stream);
    dispatcher.run_until_stopped(stop.requested()).await;
    Ok(())
}

pub async fn projector(config: &Config, stop: Stop) -> anyhow::Result<()> {
    let Some(projector) = built(
        "projector",
        config,
        twofold_projections::consumer::Projector::build(config),
        &stop,
    )
    .await?
    else {
        return Ok(());
    };
    eprintln!("twofold: projector on stream {}", config.nats_stream);
    projector.run_until_stopped(stop.requested()).await;
    Ok(())
}

/// The four workers of `all`, in the order of their metrics ports.
pub const ALL: [&str; 4] = ["verifier", "relay", "dispatcher", "projector"];

/// `metrics_addr` for the `index`th worker of `all`: the configured port
/// plus `index` (port 0 stays 0: a free port each).
pub fn nth_metrics_addr(base: SocketAddr, index: u16) -> anyhow::Result<SocketAddr> {
    if base.port() == 0 {
        return Ok(base);
    }
    let port = base
        .port()
        .checked_add(index)
        .with_context(|| format!("metrics_addr {base}: no room for {} ports", ALL.len()))?;
    Ok(SocketAddr::new(base.ip(), port))
}

/// Verifier, relay, dispatcher and projector as tasks of one process (for
/// development). Each serves its metrics and health on a port of its own:
/// `metrics_addr`'s port for the verifier, the next three for the relay,
/// the dispatcher and the projector. SIGTERM or ctrl-c stops all of them;
/// so does any one of them ending, and its error is the process's.
pub async fn all(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<()> {
    let (stop_all, stop) = Stop::on_signal();
    let at = |index: u16| -> anyhow::Result<Config> {
        Ok(Config {
            metrics_addr: nth_metrics_addr(config.metrics_addr, index)?,
            ..config.clone()
        })
    };
    let (verifier_config, relay_config, dispatcher_config, projector_config) =
        (at(0)?, at(1)?, at(2)?, at(3)?);
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (clock, stop) = (clock.clone(), stop.clone());
        tasks.spawn(async move { ("verifier", verifier(&verifier_config, clock, stop).await) });
    }
    {
        let stop = stop.clone();
        tasks.spawn(async move { ("relay", relay(&relay_config, stop).await) });
    }
    {
        let stop = stop.clone();
        tasks.spawn(async move {
            let done = dispatcher(&dispatcher_config, clock, stop).await;
            ("dispatcher", done)
        });
    }
    tasks.spawn(async move { ("projector", projector(&projector_config, stop).await) });

    let mut outcome = Ok(());
    while let Some(joined) = tasks.join_next().await {
        // One ends: the others stop too (a development stack half up would mislead).
        let _ = stop_all.send(true);
        let failed = match joined {
            Ok((_, Ok(()))) => None,
            Ok((name, Err(e))) => Some(e.context(format!("the {name} stopped"))),
            Err(e) => Some(anyhow::anyhow!("a worker task failed: {e}")),
        };
        if let Some(e) = failed {
            eprintln!("twofold: {e:#}");
            if outcome.is_ok() {
                outcome = Err(e);
            }
        }
    }
    outcome
}

/// The worker `build` makes, or `None` when the process is told to stop
/// while it still waits for PostgreSQL or NATS.
async fn built<W>(
    name: &str,
    config: &Config,
    build: impl Future<Output = anyhow::Result<W>>,
    stop: &Stop,
) -> anyhow::Result<Option<W>> {
    eprintln!(
        "twofold: {name}: metrics and health on http://{}; connecting",
        config.metrics_addr
    );
    tokio::select! {
        worker = build => worker.map(Some),
        _ = stop.requested() => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_gives_each_worker_the_next_metrics_port() {
        let base: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        let ports: Vec<u16> = (0..4)
            .map(|i| nth_metrics_addr(base, i).unwrap().port())
            .collect();
        assert_eq!(ports, [9464, 9465, 9466, 9467]);
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(nth_metrics_addr(any, 3).ok(), Some(any));
        let top: SocketAddr = "127.0.0.1:65534".parse().unwrap();
        assert!(nth_metrics_addr(top, 3).is_err());
    }
}
