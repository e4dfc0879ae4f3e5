//! Setting the stage without the API: users, authenticators and open
//! challenges written through the same event store and domain commands the
//! verifier uses, with the verifier's keys, so that a scenario's timed phase
//! measures only what it names. (Going through the API would cost an argon2id
//! hash per user and per challenge, minutes of set-up for thousands.)

use anyhow::{anyhow, Context};
use argon2::password_hash::{PasswordHasher, SaltString};
use futures::stream::{self, StreamExt, TryStreamExt};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use twofold_domain::secrets::PasswordHash;
use twofold_domain::tenant::TwoFactorSettings;
use twofold_domain::user::{NewChallenge, NewSession, SignIn, User, UserCommand, UserEvent};
use twofold_domain::values::{Email, Phone, Username};
use twofold_domain::{Actor, ChallengeId, Ctx, SessionId, TenantId, UserId};
use twofold_platform::crypto::Keyring;
use twofold_platform::personal::Personal;
use twofold_platform::store::Store;
use twofold_platform::tokens::{self, TokenKind};
use twofold_platform::totp;
use uuid::Uuid;

use crate::wall_now;

/// The password every seeded user has.
pub const PASSWORD: &str = "correct horse battery";
/// Users seeded at once.
const CONCURRENCY: usize = 16;

pub struct Seeder {
    /// Numbers the phones handed out, so each user has one of their own.
    phones: std::sync::atomic::AtomicU64,
    pool: PgPool,
    users: Store<User>,
    keys: Keyring,
    tenant: TenantId,
    password_hash: PasswordHash,
}

#[derive(Debug, Clone)]
pub struct Seeded {
    pub id: UserId,
    pub name: String,
    /// The authenticator's seed, when one is enrolled.
    pub seed: Option<Vec<u8>>,
}

/// What a seeded user has set up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Profile {
    pub email: bool,
    pub phone: bool,
    pub totp: bool,
    /// An admin of the tenant.
    pub admin: bool,
}

impl Seeder {
    pub async fn new(pool: PgPool, keys: Keyring, tenant: TenantId) -> anyhow::Result<Self> {
        // One real argon2id hash at the production parameters, shared by all.
        let phc = tokio::task::spawn_blocking(|| {
            let salt = SaltString::encode_b64(b"bench-seed-salt!").map_err(|e| anyhow!("{e}"))?;
            twofold_platform::password::argon2()
                .hash_password(PASSWORD.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| anyhow!("{e}"))
        })
        .await??;
        Ok(Self {
            phones: std::sync::atomic::AtomicU64::new(0),
            // Sealing personal data as the verifier's store does, with a
            // data key per user that the verifier and the workers open.
            users: Store::new(pool.clone()).sealing(Personal::new(keys.clone())),
            pool,
            keys,
            tenant,
            password_hash: PasswordHash(phc),
        })
    }

    pub fn store(&self) -> &Store<User> {
        &self.users
    }

    /// `n` users named `{prefix}{i}`.
    pub async fn users(
        &self,
        prefix: &str,
        n: usize,
        profile: Profile,
    ) -> anyhow::Result<Vec<Seeded>> {
        stream::iter(0..n)
            .map(|i| self.user(format!("{prefix}{i}"), profile))
            .buffered(CONCURRENCY)
            .try_collect()
            .await
    }

    async fn run(&self, id: UserId, command: UserCommand) -> anyhow::Result<Vec<UserEvent>> {
        self.users
            .execute(&id.to_string(), |_| Ok(command.clone()))
            .await
            .map_err(|e| anyhow::Error::new(e).context(format!("seeding {id}")))
    }

    async fn user(&self, name: String, profile: Profile) -> anyhow::Result<Seeded> {
        let id = UserId(Uuid::new_v4());
        let ctx = || Ctx::new(wall_now(), Actor::Operator);
        sqlx::query("INSERT INTO usernames (tenant_id, username, user_id) VALUES ($1, $2, $3)")
            .bind(self.tenant.as_uuid())
            .bind(&name)
            .bind(id.as_uuid())
            .execute(&self.pool)
            .await
            .context("claiming a username")?;
        let email = format!("{name}@bench.test");
        self.run(
            id,
            UserCommand::Register {
                user_id: id,
                tenant_id: self.tenant,
                username: Username::parse(&name).map_err(|e| anyhow!("{e}"))?,
                email: profile
                    .email
                    .then(|| Email::parse(&email))
                    .transpose()
                    .map_err(|e| anyhow!("{e}"))?,
                phone: profile
                    .phone
                    .then(|| {
                        let n = self
                            .phones
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Phone::parse(&format!("+1555{n:07}"))
                    })
                    .transpose()
                    .map_err(|e| anyhow!("{e}"))?,
                roles: if profile.admin {
                    vec![twofold_domain::values::Role::parse("admin").map_err(|e| anyhow!("{e}"))?]
                } else {
                    Vec::new()
                },
                service_account: false,
                password_hash: self.password_hash.clone(),
                ctx: ctx(),
            },
        )
        .await?;
        let seed = if profile.totp {
            let seed = totp::new_secret();
            let sealed = self.keys.seal(&seed, id.as_uuid().as_bytes())?;
            self.run(id, UserCommand::StartTotpEnrollment { sealed, ctx: ctx() })
                .await?;
            let backup_codes = (0..twofold_domain::user::BACKUP_CODE_COUNT)
                .map(|i| {
                    self.keys
                        .backup_code_hash(id.as_uuid().as_bytes(), &format!("bench{i:05}"))
                })
                .collect();
            // Enrolled with a step well in the past, so the steps around now
            // are all still unused.
            self.run(
                id,
                UserCommand::ConfirmTotpEnrollment {
                    matched_step: Some(totp::step_of(wall_now()) - 10),
                    backup_codes,
                    ctx: ctx(),
                },
            )
            .await?;
            Some(seed)
        } else {
            None
        };
        Ok(Seeded { id, name, seed })
    }

    /// Opens a sign-in challenge for `user` under `settings`, as a correct
    /// password would; answers the challenge token the client presents.
    pub async fn challenge(
        &self,
        user: &Seeded,
        settings: &TwoFactorSettings,
    ) -> anyhow::Result<SecretString> {
        let (token, command) = sign_in(user.id, settings, wall_now());
        let events = self.run(user.id, command).await?;
        if !events
            .iter()
            .any(|e| matches!(e, UserEvent::ChallengeIssued { .. }))
        {
            anyhow::bail!("no challenge was issued for {}", user.name);
        }
        Ok(token)
    }

    /// `per_user` challenges for each user, in the users' order.
    pub async fn challenges(
        &self,
        users: &[Seeded],
        settings: &TwoFactorSettings,
        per_user: usize,
    ) -> anyhow::Result<Vec<Vec<String>>> {
        stream::iter(users)
            .map(|u| async move {
                let mut tokens = Vec::with_capacity(per_user);
                for _ in 0..per_user {
                    tokens.push(
                        self.challenge(u, settings)
                            .await?
                            .expose_secret()
                            .to_string(),
                    );
                }
                anyhow::Ok(tokens)
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await
    }
}

/// What a correct password at `at` asks of a user's stream (a challenge or a
/// session, as `settings` say), and the challenge token a client would hold.
pub fn sign_in(
    user: UserId,
    settings: &TwoFactorSettings,
    at: chrono::DateTime<chrono::Utc>,
) -> (SecretString, UserCommand) {
    let challenge_id = ChallengeId(Uuid::new_v4());
    let (token, token_hash) = tokens::issue(TokenKind::Challenge, user, challenge_id.as_uuid());
    let (_, session_hash) = tokens::issue(TokenKind::Session, user, Uuid::new_v4());
    let command = UserCommand::SignIn(SignIn {
        password_ok: true,
        address_retry_after: None,
        settings: settings.clone(),
        challenge: NewChallenge {
            id: challenge_id,
            token_hash,
        },
        session: NewSession {
            id: SessionId(Uuid::new_v4()),
            token_hash: session_hash,
            expires_at: None,
        },
        device: None,
        enrollment_seed: None,
        ctx: Ctx::new(at, Actor::User(user))
            .with_request(Some("192.0.2.7".into()), Some("twofold-bench".into())),
    });
    (token, command)
}
