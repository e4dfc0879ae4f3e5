//! The long-running workers: verifier, relay, dispatcher, projector.

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
    let pool = twofold_platform::db::connect(config).await?;
    twofold_platform::db::migrate(&pool).await?;
    let relay = twofold_relay::Relay::connect(pool, config).await?;
    let metrics = serve_metrics(config).await?;
    eprintln!(
        "twofold: relay to {} (stream {})",
        config.nats_url, config.nats_stream
    );
    let result = relay
        .run_until_stopped(&config.nats_stream, shutdown_signal())
        .await;
    metrics.abort();
    result
}

pub async fn dispatcher(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<()> {
    let pool = twofold_platform::db::connect(config).await?;
    twofold_platform::db::migrate(&pool).await?;
    let source = twofold_dispatcher::Source::from_config(config);
    let metrics = serve_metrics(config).await?;
    let dispatcher = loop {
        match twofold_dispatcher::Dispatcher::connect(pool.clone(), config, &source, clock.clone())
            .await
        {
            Ok(d) => break d,
            Err(e) => {
                eprintln!("twofold: {e:#}; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    };
    eprintln!(
        "twofold: dispatcher on stream {} (SMTP {}:{})",
        config.nats_stream, config.smtp_host, config.smtp_port
    );
    dispatcher.run_until_stopped(shutdown_signal()).await;
    metrics.abort();
    Ok(())
}

pub async fn projector(config: &Config) -> anyhow::Result<()> {
    let pool = twofold_platform::db::connect(config).await?;
    twofold_platform::db::migrate(&pool).await?;
    let source = twofold_projections::consumer::Source {
        nats_url: config.nats_url.clone(),
        stream: config.nats_stream.clone(),
        filter_subject: format!("{}.events.>", config.nats_subject_prefix),
        durable_prefix: "projector".to_string(),
        ack_wait: std::time::Duration::from_secs(30),
    };
    let metrics = serve_metrics(config).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut builders = Vec::new();
    for builder in twofold_projections::store::Builder::ALL {
        let projector = loop {
            match twofold_projections::consumer::Projector::connect(pool.clone(), &source, builder)
                .await
            {
                Ok(p) => break p,
                Err(e) => {
                    eprintln!("twofold: {e:#}; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        };
        let mut stopped = stopped.clone();
        builders.push(tokio::spawn(projector.run_until_stopped(async move {
            let _ = stopped.changed().await;
        })));
    }
    eprintln!("twofold: projector on stream {}", config.nats_stream);
    shutdown_signal().await;
    let _ = stop.send(true);
    for b in builders {
        let _ = b.await;
    }
    metrics.abort();
    Ok(())
}

/// Prometheus metrics on the worker's own port.
async fn serve_metrics(config: &Config) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let handle = twofold_platform::telemetry::metrics_handle()?;
    let listener = twofold_platform::telemetry::bind(config.metrics_addr).await?;
    Ok(tokio::spawn(async move {
        let _ =
            twofold_platform::telemetry::serve_metrics(listener, handle, std::future::pending())
                .await;
    }))
}
