//! The command line: one subcommand per worker, plus the operator's tools.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use twofold_domain::TenantId;

#[derive(Parser)]
#[command(
    name = "twofold",
    version,
    about = "Event-sourced two-factor authentication backend"
)]
pub struct Cli {
    /// A TOML configuration file (also TWOFOLD_CONFIG); TWOFOLD_* variables override it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Run verifier, relay, dispatcher and projector in this one process (for
    /// development). Each serves metrics and health on its own port:
    /// metrics_addr's port for the verifier, the next three for the relay,
    /// the dispatcher and the projector.
    All,
    /// Print a new random server key (64 hex digits) for TWOFOLD_KEYS, or
    /// with --audit an audit signing seed for TWOFOLD_AUDIT_SIGNING_KEYS.
    Keygen {
        /// An Ed25519 audit signing seed (64 hex digits) on standard output,
        /// its public key on standard error.
        #[arg(long)]
        audit: bool,
    },
    /// Tenants: create one with its first admin, or change its settings.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Users: create one; the break-glass actions on one, and show one.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Read models: rebuild them from the event store.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Audit exports: write one, check one, show the keys that sign them.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a tenant's Overview (adoption figures) as JSON.
    Overview {
        #[arg(long)]
        tenant: TenantId,
    },
}

#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// Replay every event into fresh read models (stop the projectors first).
    Rebuild,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify an NDJSON or CSV export from GET /audit: exit 0 when it is
    /// complete and unaltered (and, with --public-key, signed by this
    /// server), 1 otherwise.
    Verify {
        /// The export file; `-` reads standard input.
        file: PathBuf,
        /// The server's public keys: the JSON of GET /audit/keys or `twofold
        /// audit public-key` (or a file holding it), `id=key,...`, or one key
        /// (base64 or hex). Without it only the chain is checked.
        #[arg(long)]
        public_key: Option<String>,
        /// An export of the same tenant and filter taken earlier: check too
        /// that this one extends it (nothing it showed was removed or
        /// altered since).
        #[arg(long)]
        extends: Option<PathBuf>,
        /// The tenant's signed checkpoints (the JSON of GET
        /// /audit/checkpoints or `twofold audit checkpoints`): check too
        /// that this unfiltered export holds, at each checkpoint's
        /// position, the count and chain head it signed.
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
    /// Print a tenant's signed checkpoints of its audit chain, as JSON (as
    /// GET /audit/checkpoints).
    Checkpoints {
        #[arg(long)]
        tenant: TenantId,
        /// Only those signed at or after this time (RFC 3339).
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// Only those signed at or before this time (RFC 3339).
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Print the public keys audit exports are signed with, as JSON (never a
    /// secret).
    PublicKey {
        /// Only this key.
        #[arg(long)]
        key_id: Option<String>,
    },
    /// Write a tenant's audit export (as GET /audit) to standard output.
    Export {
        #[arg(long)]
        tenant: TenantId,
        /// `ndjson` or `csv`.
        #[arg(long, default_value = "ndjson")]
        format: String,
        /// Only the history of this user (id).
        #[arg(long)]
        user_id: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum TenantCommand {
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
        /// Why (kept in the audit history).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum UserCommand {
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
    /// End a user's lockout (break-glass: no session needed).
    Unlock(UserAct),
    /// Make a user enroll again; their sessions and devices end, a lockout too.
    ResetEnrollment(UserAct),
    /// End a user's sessions and remembered devices.
    RevokeSessions(UserAct),
    /// Erase a user (crypto-shredding, as POST /users/{id}/erase): their
    /// data key is deleted, so their personal data reads `[erased]`
    /// everywhere, and the account can no longer sign in. Cannot be undone.
    Erase(UserAct),
    /// Print a user as an admin sees them.
    Show {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        username: String,
    },
}

/// A break-glass action on one user, recorded with the operator as actor.
#[derive(clap::Args)]
pub struct UserAct {
    #[arg(long)]
    pub tenant: TenantId,
    #[arg(long)]
    pub username: String,
    /// Why (kept in the audit history).
    #[arg(long)]
    pub reason: String,
}
