//! A large, realistic event store for the rebuild scenario: users with the
//! events a sign-in with a second factor leaves, written with COPY, their
//! personal data sealed under data keys of their own as the verifier's
//! store seals it.

use chrono::{Duration, TimeZone, Utc};
use sqlx::postgres::PgPoolCopyExt;
use twofold_domain::secrets::{PasswordHash, SecretHash};
use twofold_domain::user::{ProofKind, SecondFactorUse, SessionEndReason, UserEvent};
use twofold_domain::values::{Email, Method, Role, Username};
use twofold_domain::{Actor, ChallengeId, Ctx, SessionId, TenantId, UserId};
use twofold_platform::personal::{DataKey, Personal};
use uuid::Uuid;

/// Users per COPY.
const USERS_PER_COPY: u64 = 200;

async fn copy(pool: &sqlx::PgPool, buf: String) -> anyhow::Result<()> {
    let mut copy = pool
        .copy_in_raw(
            "COPY events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) FROM STDIN WITH (FORMAT csv)",
        )
        .await?;
    copy.send(buf.into_bytes()).await?;
    copy.finish().await?;
    Ok(())
}

const EVENTS_PER_USER: u64 = 100;

fn csv(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Seals users' events as the verifier's event store does: each user gets a
/// data key of their own (kept in `data_keys`, wrapped under the server
/// key), and the personal strings of their events (username, email, the
/// request's address and user agent) are sealed under it, so that readers
/// of this history open them as they open production's.
struct Sealing<'p> {
    personal: &'p Personal,
    /// `data_keys` rows not written yet, as CSV.
    keys: String,
}

impl<'p> Sealing<'p> {
    fn new(personal: &'p Personal) -> Self {
        Self {
            personal,
            keys: String::new(),
        }
    }

    /// A new user's data key.
    fn key(&mut self, user: UserId) -> anyhow::Result<DataKey> {
        let made = self.personal.new_key(&user.to_string())?;
        self.keys.push_str(&format!(
            "{user},{},{}\n",
            csv(&made.server_key_id),
            csv(&made.wrapped)
        ));
        Ok(made.key)
    }

    /// An event's payload as stored: its personal strings sealed.
    fn payload(&self, user: UserId, key: &DataKey, event: &UserEvent) -> anyhow::Result<String> {
        self.personal.seal_payload(
            &user.to_string(),
            key,
            event.name(),
            serde_json::to_string(event)?,
        )
    }

    /// Writes the keys made since the last time.
    async fn flush(&mut self, pool: &sqlx::PgPool) -> anyhow::Result<()> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let mut copy = pool
            .copy_in_raw(
                "COPY data_keys (user_id, server_key_id, wrapped) FROM STDIN WITH (FORMAT csv)",
            )
            .await?;
        copy.send(std::mem::take(&mut self.keys).into_bytes())
            .await?;
        copy.finish().await?;
        Ok(())
    }
}

/// A user's registration as the verifier records it, with an email address
/// at `bench.test` and one role.
fn registration(
    user: UserId,
    tenant: TenantId,
    name: &str,
    role: &str,
    service_account: bool,
    ctx: Ctx,
) -> anyhow::Result<UserEvent> {
    let (Ok(username), Ok(email), Ok(role)) = (
        Username::parse(name),
        Email::parse(&format!("{name}@bench.test")),
        Role::parse(role),
    ) else {
        anyhow::bail!("a synthetic user does not parse");
    };
    Ok(UserEvent::UserRegistered {
        user_id: user,
        tenant_id: tenant,
        username,
        email: Some(email),
        phone: None,
        roles: vec![role],
        service_account,
        password_hash: PasswordHash("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
        ctx,
    })
}

pub async fn write_events(
    pool: &sqlx::PgPool,
    personal: &Personal,
    total: u64,
) -> anyhow::Result<()> {
    let mut sealing = Sealing::new(personal);
    let tenant = TenantId(Uuid::new_v4());
    let users = total.div_ceil(EVENTS_PER_USER);
    let start = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    let mut written = 0u64;
    let mut buf = String::with_capacity(4 * 1024 * 1024);
    for u in 0..users {
        let user = UserId(Uuid::new_v4());
        let key = sealing.key(user)?;
        let mut seq = 0u64;
        let ctx = |s: u64| {
            Ctx::new(
                start + Duration::seconds((u * 1000 + s) as i64),
                Actor::User(user),
            )
            .with_request(Some("192.0.2.10".into()), Some("bench".into()))
        };
        let mut push = |event: UserEvent, seq: &mut u64| -> anyhow::Result<()> {
            *seq += 1;
            let payload = sealing.payload(user, &key, &event)?;
            let metadata = format!("{{\"tenant_id\":\"{tenant}\"}}");
            buf.push_str(&format!(
                "user,{user},{seq},{},1.0,{},{}\n",
                event.name(),
                csv(&payload),
                csv(&metadata)
            ));
            Ok(())
        };
        push(
            registration(
                user,
                tenant,
                &format!("user{u}"),
                if u % 3 == 0 { "finance" } else { "staff" },
                false,
                ctx(0),
            )?,
            &mut seq,
        )?;
        while seq < EVENTS_PER_USER && written + seq < total {
            let challenge = ChallengeId(Uuid::new_v4());
            let session = SessionId(Uuid::new_v4());
            let c = ctx(seq);
            let round = [
                UserEvent::ChallengeIssued {
                    challenge_id: challenge,
                    method: Method::Email,
                    methods: vec![Method::Email],
                    token_hash: SecretHash("0".repeat(64)),
                    expires_at: c.at + Duration::hours(4),
                    resend_limit: None,
                    purpose: Default::default(),
                    ctx: c.clone(),
                },
                UserEvent::CodeVerified {
                    challenge_id: challenge,
                    method: Method::Email,
                    totp_step: None,
                    ctx: c.clone(),
                },
                UserEvent::SessionStarted {
                    session_id: session,
                    token_hash: SecretHash("1".repeat(64)),
                    expires_at: c.at + Duration::days(90),
                    second_factor: SecondFactorUse::Used {
                        method: ProofKind::Email,
                    },
                    ctx: c.clone(),
                },
                UserEvent::SessionEnded {
                    session_id: session,
                    reason: SessionEndReason::SignedOut,
                    ctx: c,
                },
            ];
            for event in round {
                if seq < EVENTS_PER_USER && written + seq < total {
                    push(event, &mut seq)?;
                }
            }
        }
        written += seq;
        if (u + 1) % USERS_PER_COPY == 0 || written >= total {
            copy(pool, std::mem::take(&mut buf)).await?;
            sealing.flush(pool).await?;
        }
        if written >= total {
            break;
        }
    }
    if !buf.is_empty() {
        copy(pool, buf).await?;
    }
    sealing.flush(pool).await?;
    sqlx::query("ANALYZE events").execute(pool).await?;
    sqlx::query("ANALYZE data_keys").execute(pool).await?;
    Ok(())
}

/// The shape of a tenant for the scale scenario.
pub struct Shape {
    pub tenant: TenantId,
    pub users: u64,
    /// Events of each user (about: a round of a sign-in is four events).
    pub events_per_user: u64,
    /// The history runs from `start` to `start + span`: users register over
    /// its first half and sign in evenly from then to its end.
    pub start: chrono::DateTime<Utc>,
    pub span: Duration,
}

/// A tenant's users and their history, written with COPY (events and the
/// username claims), as the verifier would have written them: a mix of
/// users enrolled with an authenticator and backup codes (some low on them),
/// by email code, not started, locked, service accounts, over several roles.
/// Answers the events written.
pub async fn write_tenant(
    pool: &sqlx::PgPool,
    personal: &Personal,
    shape: Shape,
) -> anyhow::Result<u64> {
    let mut sealing = Sealing::new(personal);
    let Shape {
        tenant,
        users,
        events_per_user,
        start,
        span,
    } = shape;
    let step = |fraction: f64| {
        start + Duration::milliseconds((span.num_milliseconds() as f64 * fraction) as i64)
    };
    let metadata = csv(&format!("{{\"tenant_id\":\"{tenant}\"}}"));
    let mut written = 0u64;
    let (mut buf, mut names) = (String::with_capacity(4 << 20), String::new());
    for u in 0..users {
        let user = UserId(Uuid::new_v4());
        let key = sealing.key(user)?;
        let registered = (u as f64 + 0.5) / users as f64 / 2.0;
        let mut seq = 0u64;
        let mut push = |event: UserEvent| -> anyhow::Result<()> {
            seq += 1;
            let payload = sealing.payload(user, &key, &event)?;
            buf.push_str(&format!(
                "user,{user},{seq},{},1.0,{},{metadata}\n",
                event.name(),
                csv(&payload),
            ));
            Ok(())
        };
        let ctx = |fraction: f64| {
            Ctx::new(step(fraction), Actor::User(user))
                .with_request(Some("192.0.2.10".into()), Some("bench".into()))
        };
        let name = format!("user{u:06}");
        push(registration(
            user,
            tenant,
            &name,
            ["staff", "finance", "support", "engineering"][(u % 4) as usize],
            u % 50 == 49,
            ctx(registered),
        )?)?;
        names.push_str(&format!("{tenant},{name},{user}\n"));
        // Rounds of sign-ins from registration to the end of the history.
        let rounds = events_per_user.div_ceil(4).max(1);
        let at = |k: u64| registered + (1.0 - registered) * (k as f64 + 0.5) / rounds as f64;
        let totp = u % 3 == 0;
        let not_started = u % 7 == 3;
        if totp {
            let c = ctx(registered);
            push(UserEvent::EnrollmentCompleted {
                method: Method::Totp,
                totp_step: 1,
                ctx: c.clone(),
            })?;
            push(UserEvent::BackupCodesIssued {
                hashes: vec![SecretHash("2".repeat(64)); 10],
                ctx: c,
            })?;
        }
        for k in 0..rounds {
            let c = ctx(at(k));
            let session = SessionId(Uuid::new_v4());
            let method = if totp {
                ProofKind::Totp
            } else {
                ProofKind::Email
            };
            if !not_started {
                let challenge = ChallengeId(Uuid::new_v4());
                let m = if totp { Method::Totp } else { Method::Email };
                push(UserEvent::ChallengeIssued {
                    challenge_id: challenge,
                    method: m,
                    methods: vec![m],
                    token_hash: SecretHash("0".repeat(64)),
                    expires_at: c.at + Duration::hours(4),
                    resend_limit: None,
                    purpose: Default::default(),
                    ctx: c.clone(),
                })?;
                push(UserEvent::CodeVerified {
                    challenge_id: challenge,
                    method: m,
                    totp_step: None,
                    ctx: c.clone(),
                })?;
            }
            push(UserEvent::SessionStarted {
                session_id: session,
                token_hash: SecretHash("1".repeat(64)),
                expires_at: c.at + Duration::days(90),
                second_factor: if not_started {
                    SecondFactorUse::Skipped {
                        reason: twofold_domain::user::SkipReason::TwoFactorDisabled,
                    }
                } else {
                    SecondFactorUse::Used { method }
                },
                ctx: c.clone(),
            })?;
            push(UserEvent::SessionEnded {
                session_id: session,
                reason: SessionEndReason::SignedOut,
                ctx: c,
            })?;
        }
        if totp && u % 30 == 0 {
            push(UserEvent::BackupCodeUsed {
                challenge_id: ChallengeId(Uuid::new_v4()),
                slot: 0,
                remaining: (u / 30 % 3) as usize,
                ctx: ctx(at(rounds - 1)),
            })?;
        }
        if u % 97 == 5 {
            push(UserEvent::UserLockedOut {
                failures: 5,
                ended_sessions: Vec::new(),
                ctx: ctx(at(rounds - 1)),
            })?;
        }
        written += seq;
        if (u + 1) % USERS_PER_COPY == 0 {
            copy(pool, std::mem::take(&mut buf)).await?;
            sealing.flush(pool).await?;
        }
    }
    if !buf.is_empty() {
        copy(pool, buf).await?;
    }
    sealing.flush(pool).await?;
    let mut copy = pool
        .copy_in_raw("COPY usernames (tenant_id, username, user_id) FROM STDIN WITH (FORMAT csv)")
        .await?;
    copy.send(names.into_bytes()).await?;
    copy.finish().await?;
    sqlx::query("ANALYZE events").execute(pool).await?;
    sqlx::query("ANALYZE usernames").execute(pool).await?;
    sqlx::query("ANALYZE data_keys").execute(pool).await?;
    Ok(written)
}
