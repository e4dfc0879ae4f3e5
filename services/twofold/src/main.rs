//! `twofold`: one binary, a subcommand per worker, plus the operator's tools.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::SecretString;
use tracing_subscriber::EnvFilter;
use twofold_domain::tenant::TwoFactorSettings;
use twofold_domain::{Actor, Ctx, TenantId};
use twofold_platform::{Clock, Config, SystemClock};
use twofold_verifier::accounts::{self, NewUser};
use twofold_verifier::error::ApiError;

#[derive(Parser)]
#[command(
    name = "twofold",
    version,
    about = "Event-sourced two-factor authentication backend"
)]
struct Cli {
    /// A TOML configuration file (also TWOFOLD_CONFIG); TWOFOLD_* variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database migrations and exit.
    Migrate,
    /// Serve the HTTP API.
    Verifier,
    /// Publish committed events from the outbox to NATS JetStream.
    Relay,
    /// Keep the read models up to date from JetStream.
    Projector,
    /// Deliver email and SMS codes (run as many as the load needs).
    Dispatcher,
    /// Print a new random server key (64 hex digits) for TWOFOLD_KEYS.
    Keygen,
    /// Tenants: create one with its first admin, or change its settings.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Users: create one.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Read models: rebuild them from the event store.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Audit exports: check one is complete and unaltered.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// Replay every event into fresh read models (stop the projectors first).
    Rebuild,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify an NDJSON or CSV export from GET /audit: exit 0 when it is
    /// complete and unaltered, 1 otherwise.
    Verify {
        /// The export file; `-` reads standard input.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant and its first admin; prints the admin's one-time password.
    Create {
        /// Shown as the issuer in authenticator apps.
        #[arg(long)]
        name: String,
        #[arg(long)]
        admin_username: String,
        #[arg(long)]
        admin_email: Option<String>,
    },
    /// Replace the tenant's two-factor settings with the JSON given.
    Settings {
        #[arg(long)]
        tenant: TenantId,
        /// The settings as JSON (see README, "Settings"); `-` reads standard input.
        #[arg(long)]
        json: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user; the password is read from standard input.
    Create {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        username: String,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        phone: Option<String>,
        /// Comma-separated roles.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        #[arg(long)]
        service_account: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("TWOFOLD_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Keygen = cli.command {
        println!("{}", twofold_platform::crypto::new_key_hex());
        return Ok(());
    }
    if let Command::Audit {
        command: AuditCommand::Verify { file },
    } = &cli.command
    {
        return verify_export(file);
    }
    let config = Config::load(cli.config.as_deref())?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    match cli.command {
        Command::Keygen | Command::Audit { .. } => Ok(()),
        Command::Projections {
            command: ProjectionsCommand::Rebuild,
        } => {
            let pool = twofold_platform::db::connect(&config).await?;
            twofold_platform::db::migrate(&pool).await?;
            let total: i64 = sqlx_count(&pool).await?;
            let done = twofold_projections::rebuild::rebuild(&pool, |n| {
                eprint!("\r{}", progress_bar(n, total.max(0) as u64));
            })
            .await?;
            eprintln!();
            println!(
                "{}",
                serde_json::json!({
                    "events": done.events,
                    "users": done.users,
                    "seconds": done.seconds,
                    "events_per_second": done.events as f64 / done.seconds.max(1e-9),
                })
            );
            Ok(())
        }
        Command::Migrate => {
            let pool = twofold_platform::db::connect(&config).await?;
            twofold_platform::db::migrate(&pool).await?;
            eprintln!("twofold: migrations applied");
            Ok(())
        }
        Command::Verifier => {
            let verifier = twofold_verifier::Verifier::build(&config, clock).await?;
            eprintln!(
                "twofold: verifier on http://{} (metrics on http://{}/metrics)",
                verifier.local_addr()?,
                verifier.metrics_addr()?
            );
            verifier.run_until_stopped(shutdown_signal()).await
        }
        Command::Relay => {
            let pool = twofold_platform::db::connect(&config).await?;
            twofold_platform::db::migrate(&pool).await?;
            let relay = twofold_relay::Relay::connect(pool, &config).await?;
            let metrics = serve_metrics(&config).await?;
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
        Command::Dispatcher => {
            let pool = twofold_platform::db::connect(&config).await?;
            twofold_platform::db::migrate(&pool).await?;
            let source = twofold_dispatcher::Source::from_config(&config);
            let metrics = serve_metrics(&config).await?;
            let dispatcher = loop {
                match twofold_dispatcher::Dispatcher::connect(
                    pool.clone(),
                    &config,
                    &source,
                    clock.clone(),
                )
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
        Command::Projector => {
            let pool = twofold_platform::db::connect(&config).await?;
            twofold_platform::db::migrate(&pool).await?;
            let source = twofold_projections::consumer::Source {
                nats_url: config.nats_url.clone(),
                stream: config.nats_stream.clone(),
                filter_subject: format!("{}.events.>", config.nats_subject_prefix),
                durable_prefix: "projector".to_string(),
                ack_wait: std::time::Duration::from_secs(30),
            };
            let metrics = serve_metrics(&config).await?;
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let mut builders = Vec::new();
            for builder in twofold_projections::store::Builder::ALL {
                let projector = loop {
                    match twofold_projections::consumer::Projector::connect(
                        pool.clone(),
                        &source,
                        builder,
                    )
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
        Command::Tenant { command } => {
            let state = twofold_verifier::connect(&config, clock.clone()).await?;
            let ctx = Ctx::new(clock.now(), Actor::Operator);
            match command {
                TenantCommand::Create {
                    name,
                    admin_username,
                    admin_email,
                } => {
                    let created =
                        accounts::create_tenant(&state, &name, &admin_username, admin_email, ctx)
                            .await
                            .map_err(api)?;
                    println!("{}", serde_json::to_string_pretty(&created)?);
                    eprintln!("twofold: the one-time password is shown only now; keep it safe");
                    Ok(())
                }
                TenantCommand::Settings {
                    tenant,
                    json,
                    reason,
                } => {
                    let json = if json == "-" { read_stdin()? } else { json };
                    let settings: TwoFactorSettings =
                        serde_json::from_str(&json).context("reading the settings JSON")?;
                    let ctx = match reason {
                        Some(r) => ctx.with_reason(r),
                        None => ctx,
                    };
                    let stored = accounts::change_settings(&state, tenant, settings, ctx)
                        .await
                        .map_err(api)?;
                    println!("{}", serde_json::to_string_pretty(&stored)?);
                    Ok(())
                }
            }
        }
        Command::User {
            command:
                UserCommand::Create {
                    tenant,
                    username,
                    email,
                    phone,
                    roles,
                    service_account,
                },
        } => {
            let state = twofold_verifier::connect(&config, clock.clone()).await?;
            state.tenant(&tenant.to_string()).await.map_err(api)?;
            let password = read_stdin()?;
            let password = password.trim_end_matches(['\r', '\n']).to_string();
            let ctx = Ctx::new(clock.now(), Actor::Operator);
            let new = NewUser {
                username,
                password: SecretString::from(password),
                email,
                phone,
                roles,
                service_account,
            };
            let user_id = accounts::create_user(&state, tenant, new, ctx)
                .await
                .map_err(api)?;
            println!("{}", serde_json::json!({ "user_id": user_id }));
            Ok(())
        }
    }
}

async fn sqlx_count(pool: &twofold_platform::db::PgPool) -> anyhow::Result<i64> {
    twofold_platform::db::count_events(pool).await
}

/// `[#####.....] 5000/10000 events`
fn progress_bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let filled = (done.min(total) * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH);
    format!(
        "[{}{}] {done}/{total} events",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize)
    )
}

fn verify_export(file: &std::path::Path) -> anyhow::Result<()> {
    let text = if file.as_os_str() == "-" {
        read_stdin()?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    match twofold_projections::audit::verify(&text) {
        Ok(v) => {
            println!(
                "ok: {} entries, complete and unaltered (head {})",
                v.entries, v.head
            );
            Ok(())
        }
        Err(e) => {
            println!("FAILED: {e}");
            std::process::exit(1);
        }
    }
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

fn read_stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading standard input")?;
    Ok(s)
}

/// An API error as a CLI error: its code and message.
fn api(e: ApiError) -> anyhow::Error {
    anyhow::anyhow!("{} ({})", e.message, e.code)
}

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("twofold: shutting down");
}
