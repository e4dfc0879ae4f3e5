//! The operator's tools: tenants and users, read-model rebuilds, audit checks.

use std::io::Read;
use std::sync::Arc;

use anyhow::Context;
use secrecy::SecretString;
use twofold_app::accounts::NewUser;
use twofold_app::admin::UserAction;
use twofold_app::{App, AppError};
use twofold_domain::tenant::TwoFactorSettings;
use twofold_domain::{Actor, Ctx, TenantId};
use twofold_platform::audit_signing::VerifyingKeys;
use twofold_platform::{Clock, Config};
use twofold_projections::{audit, checkpoints};

use crate::cli::{TenantCommand, UserCommand};

/// `twofold projections rebuild`
pub async fn rebuild(config: &Config) -> anyhow::Result<()> {
    let pool = twofold_platform::db::connect(config).await?;
    twofold_platform::db::migrate(&pool).await?;
    let total: i64 = sqlx_count(&pool).await?;
    // indicatif draws on stderr only when it is a terminal; piped or
    // captured runs print nothing but the summary.
    let bar = indicatif::ProgressBar::new(total.max(0) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "[{elapsed_precise}] {wide_bar} {pos}/{len} events ({per_sec}, {eta} left)",
        )
        .context("the progress bar's template")?,
    );
    let done = twofold_projections::rebuild::rebuild(
        &pool,
        &twofold_platform::personal::Personal::new(config.keyring()?),
        |n| bar.set_position(n),
    )
    .await?;
    bar.finish_and_clear();
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

/// `twofold tenant ...`
pub async fn tenant(
    config: &Config,
    clock: Arc<dyn Clock>,
    command: TenantCommand,
) -> anyhow::Result<()> {
    let app = App::connect(config, clock.clone()).await?;
    let ctx = Ctx::new(clock.now(), Actor::Operator);
    match command {
        TenantCommand::Create {
            name,
            admin_username,
            admin_email,
        } => {
            let created = app
                .create_tenant(&name, &admin_username, admin_email, ctx)
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
            let ctx = ctx.with_reason(reason);
            let stored = app
                .change_settings(tenant, settings, ctx)
                .await
                .map_err(api)?;
            println!("{}", serde_json::to_string_pretty(&stored)?);
            Ok(())
        }
    }
}

/// `twofold user ...`
pub async fn user(
    config: &Config,
    clock: Arc<dyn Clock>,
    command: UserCommand,
) -> anyhow::Result<()> {
    let (act, action) = match command {
        UserCommand::Create {
            tenant,
            username,
            email,
            phone,
            roles,
            service_account,
        } => {
            let new = NewUser {
                username,
                password: SecretString::from(String::new()),
                email,
                phone,
                roles,
                service_account,
            };
            return create_user(config, clock, tenant, new).await;
        }
        UserCommand::Show { tenant, username } => {
            let app = App::connect(config, clock).await?;
            let user = app.operator_user(tenant, &username).await.map_err(api)?;
            println!("{}", serde_json::to_string_pretty(&user)?);
            return Ok(());
        }
        UserCommand::Unlock(act) => (act, UserAction::Unlock),
        UserCommand::ResetEnrollment(act) => (act, UserAction::ResetEnrollment),
        UserCommand::RevokeSessions(act) => (act, UserAction::RevokeSessions),
        UserCommand::Erase(act) => {
            let app = App::connect(config, clock).await?;
            app.operator_erase(act.tenant, &act.username, &act.reason)
                .await
                .map_err(api)?;
            eprintln!("twofold: erased; recorded with the operator as actor and your reason");
            return Ok(());
        }
    };
    let app = App::connect(config, clock).await?;
    app.operator_act(act.tenant, &act.username, action, &act.reason)
        .await
        .map_err(api)?;
    eprintln!("twofold: done; recorded with the operator as actor and your reason");
    Ok(())
}

/// `twofold user create`: the password comes from standard input.
async fn create_user(
    config: &Config,
    clock: Arc<dyn Clock>,
    tenant: TenantId,
    new: NewUser,
) -> anyhow::Result<()> {
    let app = App::connect(config, clock.clone()).await?;
    app.tenant(&tenant.to_string()).await.map_err(api)?;
    let password = read_stdin()?;
    let password = password.trim_end_matches(['\r', '\n']).to_string();
    let ctx = Ctx::new(clock.now(), Actor::Operator);
    let new = NewUser {
        password: SecretString::from(password),
        ..new
    };
    let user_id = app.create_user(tenant, new, ctx).await.map_err(api)?;
    println!("{}", serde_json::json!({ "user_id": user_id }));
    Ok(())
}

/// `twofold overview --tenant`
pub async fn overview(
    config: &Config,
    clock: Arc<dyn Clock>,
    tenant: TenantId,
) -> anyhow::Result<()> {
    let app = App::connect(config, clock).await?;
    let figures = app.operator_overview(tenant).await.map_err(api)?;
    println!("{}", serde_json::to_string_pretty(&figures)?);
    Ok(())
}

/// `twofold audit export --tenant`: the export on standard output.
pub async fn audit_export(
    config: &Config,
    clock: Arc<dyn Clock>,
    tenant: TenantId,
    format: String,
    user_id: Option<String>,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    use std::io::Write;
    // Standard output is the export's one reader, and no other export here
    // waits for its place: one read slowly (`| less`) is not cut short.
    let config = Config {
        audit_export_idle_secs: u64::MAX,
        ..config.clone()
    };
    let app = App::connect(&config, clock).await?;
    let q = twofold_projections::queries::AuditQuery {
        user_id,
        format: Some(format),
        ..Default::default()
    };
    let (_, lines) = app.operator_audit_export(tenant, q).await.map_err(api)?;
    let mut lines = std::pin::pin!(lines);
    let mut out = std::io::stdout().lock();
    while let Some(line) = lines.next().await {
        out.write_all(line?.as_bytes())?;
    }
    Ok(())
}

async fn sqlx_count(pool: &twofold_platform::db::PgPool) -> anyhow::Result<i64> {
    twofold_platform::db::count_events(pool).await
}

/// `twofold audit public-key`: the published keys as GET /audit/keys
/// answers them (public halves only).
pub fn audit_public_keys(config: &Config, key_id: Option<&str>) -> anyhow::Result<()> {
    let mut published = config.keyring()?.audit_signer().published();
    if let Some(id) = key_id {
        published.keys.retain(|k| k.key_id == id);
        if published.keys.is_empty() {
            anyhow::bail!("no audit signing key has the id {id:?}");
        }
    }
    println!("{}", serde_json::to_string_pretty(&published)?);
    Ok(())
}

/// `twofold audit checkpoints --tenant`: the tenant's signed checkpoints as
/// GET /audit/checkpoints answers them.
pub async fn audit_checkpoints(
    config: &Config,
    tenant: TenantId,
    from: Option<chrono::DateTime<chrono::Utc>>,
    to: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<()> {
    let pool = twofold_platform::db::connect(config).await?;
    twofold_platform::db::migrate(&pool).await?;
    let checkpoints = checkpoints::list(&pool, &tenant.to_string(), from, to).await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({ "checkpoints": checkpoints }))?
    );
    Ok(())
}

/// `--public-key`: a file holding the keys when one is there by that
/// name, else the keys themselves.
fn verifying_keys(given: &str) -> anyhow::Result<VerifyingKeys> {
    let path = std::path::Path::new(given);
    let text = if path.is_file() {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    } else {
        given.to_string()
    };
    VerifyingKeys::parse(&text).context("reading --public-key")
}

/// An export's text; `-` is standard input.
fn read_export(file: &std::path::Path) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        read_stdin()
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
    }
}

/// `twofold audit verify FILE [--public-key KEY] [--extends EARLIER]
/// [--checkpoints CHECKPOINTS]`
pub fn verify_export(
    file: &std::path::Path,
    public_key: Option<&str>,
    extends: Option<&std::path::Path>,
    checkpoints_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let keys = public_key.map(verifying_keys).transpose()?;
    let text = read_export(file)?;
    let given = checkpoints_file
        .map(|f| {
            std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))
                .and_then(|t| checkpoints::parse(&t))
        })
        .transpose()?;
    let mut held = None;
    let check = |text: &str| match &keys {
        Some(keys) => audit::verify_signed(text, keys),
        None => audit::verify(text),
    };
    let mut extended = None;
    let result = match (extends, &given) {
        (None, Some(given)) => {
            checkpoints::verify_against(&text, keys.as_ref(), given).map(|checked| {
                let before = if checked.pruned > 0 {
                    format!("; {} signed before the pruned mark cover entries no longer in the read models", checked.pruned)
                } else {
                    String::new()
                };
                held = Some(format!(
                    "and it holds the {} checkpoints signed up to its last entry, each at its position with the count and head it signed ({} signed later say nothing of it{before}{})",
                    checked.covered,
                    checked.later,
                    if keys.is_some() { "" } else { "; their signatures were not checked: give --public-key" }
                ));
                checked.verified
            })
        }
        (Some(_), Some(_)) => Err(anyhow::anyhow!(
            "give --extends or --checkpoints, not both: check the export against each in turn"
        )),
        (None, None) => check(&text),
        (Some(earlier_file), None) => check(&read_export(earlier_file)?)
            .map_err(|e| e.context(format!("the earlier export {}", earlier_file.display())))
            .and_then(|earlier| {
                let later = audit::verify_extends(&text, keys.as_ref(), &earlier)?;
                extended = Some(match later.chain_start() {
                    Some(p) if earlier.chain_start() != Some(p) => format!(
                        "and it extends {}: its chain goes on from that export's, unchanged up to position {} ({} entries; those up to position {} were pruned since)",
                        earlier_file.display(),
                        earlier.last_position.unwrap_or_default(),
                        earlier.chained(),
                        p.position
                    ),
                    _ => format!(
                        "and it extends {}: its first {} entries are that export's, unchanged",
                        earlier_file.display(),
                        earlier.entries
                    ),
                });
                Ok(later)
            }),
    };
    match result {
        Ok(v) => {
            let range = match (v.first_position, v.last_position) {
                (Some(first), Some(last)) => format!("positions {first} to {last}"),
                _ => "no positions".to_string(),
            };
            let tenant = v
                .tenant_id
                .as_deref()
                .map(|t| format!(" of tenant {t}"))
                .unwrap_or_default();
            if v.signature_checked {
                println!(
                    "ok: {} entries{tenant} ({range}), complete for its filter and unaltered, signed by this server's key {} (head {})",
                    v.entries,
                    v.key_id.as_deref().unwrap_or_default(),
                    v.head
                );
            } else {
                println!(
                    "ok: {} entries{tenant} ({range}), the chain is intact (head {}); its origin was not checked: give --public-key to check the signature",
                    v.entries, v.head
                );
            }
            if let Some(p) = &v.pruned {
                match v.chain_start() {
                    Some(_) => println!(
                        "entries up to position {} were pruned by the retention setting ({} of them); the chain starts from the head signed at {}: {}",
                        p.position, p.count, p.signed_at, p.head
                    ),
                    None => println!(
                        "entries up to position {} were pruned by the retention setting before this export: it holds only later ones",
                        p.position
                    ),
                }
            }
            if let Some(extended) = extended {
                println!("{extended}");
            }
            if let Some(held) = held {
                println!("{held}");
            }
            Ok(())
        }
        Err(e) => {
            println!("FAILED: {e:#}");
            std::process::exit(1);
        }
    }
}

fn read_stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading standard input")?;
    Ok(s)
}

/// An application error as a CLI error: its message and code.
fn api(e: AppError) -> anyhow::Error {
    anyhow::anyhow!("{} ({})", e.message(), e.code())
}
