//! A large, realistic event store for the rebuild scenario: users with the
//! events a sign-in with a second factor leaves, written with COPY.

use chrono::{Duration, TimeZone, Utc};
use sqlx::postgres::PgPoolCopyExt;
use twofold_domain::secrets::{PasswordHash, SecretHash};
use twofold_domain::user::{ProofKind, SecondFactorUse, SessionEndReason, UserEvent};
use twofold_domain::values::{Email, Method, Role, Username};
use twofold_domain::{Actor, ChallengeId, Ctx, SessionId, TenantId, UserId};
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

pub async fn write_events(pool: &sqlx::PgPool, total: u64) -> anyhow::Result<()> {
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
        let mut seq = 0u64;
        let ctx = |s: u64| {
            Ctx::new(
                start + Duration::seconds((u * 1000 + s) as i64),
                Actor::User(user),
            )
            .with_request(Some("192.0.2.10".into()), Some("bench".into()))
        };
        let mut push = |event: UserEvent, seq: &mut u64| {
            *seq += 1;
            let payload = serde_json::to_string(&event).unwrap_or_default();
            let metadata = format!("{{\"tenant_id\":\"{tenant}\"}}");
            buf.push_str(&format!(
                "user,{user},{seq},{},1.0,{},{}\n",
                event.name(),
                csv(&payload),
                csv(&metadata)
            ));
        };
        if let (Ok(username), Ok(email), Ok(role)) = (
            Username::parse(&format!("user{u}")),
            Email::parse(&format!("user{u}@bench.test")),
            Role::parse(if u % 3 == 0 { "finance" } else { "staff" }),
        ) {
            push(
                UserEvent::UserRegistered {
                    user_id: user,
                    tenant_id: tenant,
                    username,
                    email: Some(email),
                    phone: None,
                    roles: vec![role],
                    service_account: false,
                    password_hash: PasswordHash(
                        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
                    ),
                    ctx: ctx(0),
                },
                &mut seq,
            );
        }
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
                    push(event, &mut seq);
                }
            }
        }
        written += seq;
        if (u + 1) % USERS_PER_COPY == 0 || written >= total {
            copy(pool, std::mem::take(&mut buf)).await?;
        }
        if written >= total {
            break;
        }
    }
    if !buf.is_empty() {
        copy(pool, buf).await?;
    }
    sqlx::query("ANALYZE events").execute(pool).await?;
    Ok(())
}
