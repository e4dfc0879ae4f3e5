//! `twofold`: one binary, a subcommand per worker, plus the operator's tools.

mod cli;
mod operator;
mod workers;

use std::sync::Arc;

use clap::Parser;
use twofold_platform::{Clock, Config, SystemClock};

use cli::{AuditCommand, Cli, Command, ProjectionsCommand};

/// mimalloc rather than glibc's malloc: the workers allocate and free many
/// small buffers from several threads (README, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    twofold_platform::telemetry::init_tracing()?;
    let cli = Cli::parse();
    // Commands that need no configuration.
    match &cli.command {
        Command::Keygen { audit: false } => {
            println!("{}", twofold_platform::crypto::new_key_hex());
            return Ok(());
        }
        Command::Keygen { audit: true } => {
            let (seed, public) = twofold_platform::audit_signing::new_seed();
            println!("{seed}");
            eprintln!("twofold: its public key (ed25519, base64): {public}");
            return Ok(());
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    file,
                    public_key,
                    extends,
                    checkpoints,
                },
        } => {
            return operator::verify_export(
                file,
                public_key.as_deref(),
                extends.as_deref(),
                checkpoints.as_deref(),
            )
        }
        _ => {}
    }
    let config = Config::load(cli.config.as_deref())?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    match cli.command {
        Command::Audit {
            command:
                AuditCommand::Export {
                    tenant,
                    format,
                    user_id,
                },
        } => operator::audit_export(&config, clock, tenant, format, user_id).await,
        Command::Audit {
            command: AuditCommand::PublicKey { key_id },
        } => operator::audit_public_keys(&config, key_id.as_deref()),
        Command::Audit {
            command: AuditCommand::Checkpoints { tenant, from, to },
        } => operator::audit_checkpoints(&config, tenant, from, to).await,
        Command::Keygen { .. }
        | Command::Audit {
            command: AuditCommand::Verify { .. },
        } => Ok(()),
        Command::Overview { tenant } => operator::overview(&config, clock, tenant).await,
        Command::Migrate => {
            let pool = twofold_platform::db::connect(&config).await?;
            twofold_platform::db::migrate(&pool).await?;
            eprintln!("twofold: migrations applied");
            Ok(())
        }
        Command::Verifier => workers::verifier(&config, clock, stop_on_signal()).await,
        Command::Relay => workers::relay(&config, stop_on_signal()).await,
        Command::Dispatcher => workers::dispatcher(&config, clock, stop_on_signal()).await,
        Command::Projector => workers::projector(&config, stop_on_signal()).await,
        Command::All => workers::all(&config, clock).await,
        Command::Projections {
            command: ProjectionsCommand::Rebuild,
        } => operator::rebuild(&config).await,
        Command::Tenant { command } => operator::tenant(&config, clock, command).await,
        Command::User { command } => operator::user(&config, clock, command).await,
    }
}

/// A worker's stop: SIGTERM or ctrl-c.
fn stop_on_signal() -> workers::Stop {
    workers::Stop::on_signal().1
}

/// Resolves on SIGTERM or ctrl-c.
pub(crate) async fn shutdown_signal() {
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
