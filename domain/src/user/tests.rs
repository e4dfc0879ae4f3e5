//! Given/when/then tests for the commands of the user aggregate: registration,
//! sign-in, answering, resending and switching challenges, lockout, sessions,
//! enrollment, backup codes and unlock; plus the snapshot round trip and the
//! secrecy of what the domain holds.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use cqrs_es::Aggregate;
use uuid::Uuid;

use super::*;
use crate::context::{Actor, Ctx};
use crate::ids::{ChallengeId, SessionId, TenantId, UserId};
use crate::secrets::{PasswordHash, SealedSecret, SecretHash};
use crate::tenant::settings::{CodeTimeout, Enforcement, MaxInvalidAttempts, ResendLimit};
use crate::tenant::TwoFactorSettings;
use crate::values::{Email, Method, Phone, Role, Username};

type Given = TestFramework<User>;

const IP: &str = "203.0.113.9";
const AGENT: &str = "agent/1.0";
const PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g";
const SEALED: &str = "bm9uY2Vub25jZQ-ciphertext";
/// The last TOTP step accepted in [`enrolled`].
const ENROLLED_STEP: u64 = 1000;

// ---------------------------------------------------------------- fixtures

fn t(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 8, 0, 0).unwrap() + Duration::seconds(secs)
}
fn uid() -> UserId {
    UserId(Uuid::from_u128(7))
}
fn ctx(secs: i64) -> Ctx {
    Ctx::new(t(secs), Actor::User(uid())).with_request(Some(IP.into()), Some(AGENT.into()))
}
fn admin(secs: i64) -> Ctx {
    Ctx::new(t(secs), Actor::Admin(UserId(Uuid::from_u128(99)))).with_reason("ticket 42")
}
/// What the aggregate itself does on the user's behalf (lockout, eviction).
fn system(secs: i64) -> Ctx {
    Ctx::new(t(secs), Actor::System)
}

/// A stand-in for the service's keyed hash: the plaintext does not survive it.
fn keyed(plain: &str) -> SecretHash {
    let mut h = DefaultHasher::new();
    plain.hash(&mut h);
    SecretHash(format!("hash-of-{:016x}", h.finish()))
}
fn challenge_id(n: u128) -> ChallengeId {
    ChallengeId(Uuid::from_u128(500 + n))
}
fn challenge_token(n: u128) -> String {
    format!("plain-challenge-token-{n}")
}
fn cref(n: u128) -> ChallengeRef {
    ChallengeRef {
        id: challenge_id(n),
        token_hash: keyed(&challenge_token(n)),
    }
}
fn session_id(n: u128) -> SessionId {
    SessionId(Uuid::from_u128(10_000 + n))
}
fn session_token(n: u128) -> String {
    format!("plain-session-token-{n}")
}
fn device_id(n: u128) -> Uuid {
    Uuid::from_u128(20_000 + n)
}
fn device_token(n: u128) -> String {
    format!("plain-device-token-{n}")
}
fn backup_code(set: &str, i: usize) -> String {
    format!("plain-backup-{set}-{i}")
}
fn backup_hashes(set: &str) -> Vec<SecretHash> {
    (0..BACKUP_CODE_COUNT)
        .map(|i| keyed(&backup_code(set, i)))
        .collect()
}
fn sealed(tag: &str) -> SealedSecret {
    SealedSecret {
        key_id: "k1".into(),
        sealed: format!("{SEALED}-{tag}"),
    }
}

fn registration(email: bool, phone: bool, service_account: bool) -> UserEvent {
    UserEvent::UserRegistered {
        user_id: uid(),
        tenant_id: TenantId(Uuid::from_u128(1)),
        username: Username::parse("ida").unwrap(),
        email: email.then(|| Email::parse("ida@acme.test").unwrap()),
        phone: phone.then(|| Phone::parse("+4915112345678").unwrap()),
        roles: vec![],
        service_account,
        password_hash: PasswordHash(PASSWORD_HASH.into()),
        ctx: admin(0),
    }
}
/// A user with an email address, nothing else.
fn registered() -> UserEvent {
    registration(true, false, false)
}
/// A user with an email address and an enrolled authenticator (last step
/// [`ENROLLED_STEP`]) with the backup code set "a".
fn enrolled() -> Vec<UserEvent> {
    vec![
        registered(),
        UserEvent::TotpEnrollmentStarted {
            sealed: sealed("1"),
            ctx: ctx(1),
        },
        UserEvent::EnrollmentCompleted {
            method: Method::Totp,
            totp_step: ENROLLED_STEP,
            ctx: ctx(2),
        },
        UserEvent::BackupCodesIssued {
            hashes: backup_hashes("a"),
            ctx: ctx(2),
        },
    ]
}

fn two_factor(methods: &[Method], default_method: Method) -> TwoFactorSettings {
    TwoFactorSettings {
        enabled: true,
        enforcement: Enforcement::EveryLogin,
        allowed_methods: methods.to_vec(),
        default_method,
        sms_provider: Some("webhook".into()),
        ..TwoFactorSettings::default()
    }
}
fn email_only() -> TwoFactorSettings {
    two_factor(&[Method::Email], Method::Email)
}
fn totp_and_email() -> TwoFactorSettings {
    two_factor(&[Method::Totp, Method::Email], Method::Totp)
}

// ---------------------------------------------------------------- commands

fn new_session(n: u128) -> NewSession {
    NewSession {
        id: session_id(n),
        token_hash: keyed(&session_token(n)),
        expires_at: None,
    }
}
fn sign_in_cmd(n: u128, settings: &TwoFactorSettings, secs: i64) -> SignIn {
    SignIn {
        password_ok: true,
        address_retry_after: None,
        settings: settings.clone(),
        challenge: NewChallenge {
            id: challenge_id(n),
            token_hash: keyed(&challenge_token(n)),
        },
        session: new_session(n),
        device: None,
        enrollment_seed: None,
        ctx: ctx(secs),
    }
}
fn sign_in(n: u128, settings: &TwoFactorSettings, secs: i64) -> UserCommand {
    UserCommand::SignIn(sign_in_cmd(n, settings, secs))
}
fn verify_with(
    challenge: ChallengeRef,
    n: u128,
    proof: Proof,
    settings: &TwoFactorSettings,
    secs: i64,
) -> UserCommand {
    UserCommand::VerifyCode(VerifyCode {
        replacement: None,
        challenge,
        proof,
        settings: settings.clone(),
        session: new_session(n),
        device: NewDevice {
            id: device_id(n),
            token_hash: keyed(&device_token(n)),
        },
        ctx: ctx(secs),
    })
}
/// Answers challenge `n`; a session opened by it is session `n`.
fn verify(n: u128, proof: Proof, settings: &TwoFactorSettings, secs: i64) -> UserCommand {
    verify_with(cref(n), n, proof, settings, secs)
}
fn totp(step: Option<u64>) -> Proof {
    Proof::Totp { matched_step: step }
}
fn delivered(matches: bool) -> Proof {
    Proof::Delivered { matches }
}
fn backup(set: &str, i: usize) -> Proof {
    Proof::Backup {
        hash: keyed(&backup_code(set, i)),
    }
}
fn resend(n: u128, secs: i64) -> UserCommand {
    UserCommand::ResendCode {
        challenge: cref(n),
        ctx: ctx(secs),
    }
}
fn switch(n: u128, method: Method, secs: i64) -> UserCommand {
    UserCommand::SwitchMethod {
        challenge: cref(n),
        method,
        ctx: ctx(secs),
    }
}
fn confirm(step: Option<u64>, codes: Vec<SecretHash>, secs: i64) -> UserCommand {
    UserCommand::ConfirmTotpEnrollment {
        matched_step: step,
        backup_codes: codes.into(),
        ctx: ctx(secs),
    }
}

// ---------------------------------------------------------------- events

fn issued(
    n: u128,
    method: Method,
    methods: &[Method],
    settings: &TwoFactorSettings,
    secs: i64,
) -> UserEvent {
    UserEvent::ChallengeIssued {
        challenge_id: challenge_id(n),
        method,
        methods: methods.to_vec(),
        token_hash: keyed(&challenge_token(n)),
        expires_at: t(secs) + settings.code_timeout.duration(),
        resend_limit: settings.resend_limit.limit(),
        purpose: ChallengePurpose::SignIn,
        ctx: ctx(secs),
    }
}
fn rejected(
    n: u128,
    proof: ProofKind,
    reason: RejectionReason,
    failures: u32,
    secs: i64,
) -> UserEvent {
    UserEvent::CodeRejected {
        challenge_id: challenge_id(n),
        proof,
        reason,
        failures,
        ctx: ctx(secs),
    }
}
fn wrong(n: u128, proof: ProofKind, failures: u32, secs: i64) -> UserEvent {
    rejected(n, proof, RejectionReason::WrongCode, failures, secs)
}
fn locked_out(failures: u32, ended_sessions: Vec<SessionId>, secs: i64) -> UserEvent {
    UserEvent::UserLockedOut {
        failures,
        ended_sessions,
        ctx: system(secs).with_request(Some(IP.into()), Some(AGENT.into())),
    }
}
fn verified(n: u128, method: Method, totp_step: Option<u64>, secs: i64) -> UserEvent {
    UserEvent::CodeVerified {
        challenge_id: challenge_id(n),
        method,
        totp_step,
        ctx: ctx(secs),
    }
}
fn used(method: ProofKind) -> SecondFactorUse {
    SecondFactorUse::Used { method }
}
/// Session `n` started at `secs` for the default 90 days.
fn started(n: u128, second_factor: SecondFactorUse, secs: i64) -> UserEvent {
    UserEvent::SessionStarted {
        session_id: session_id(n),
        token_hash: keyed(&session_token(n)),
        expires_at: t(secs) + Duration::days(90),
        second_factor,
        ctx: ctx(secs),
    }
}
fn remembered(n: u128, secs: i64) -> UserEvent {
    UserEvent::DeviceRemembered {
        device_id: device_id(n),
        token_hash: keyed(&device_token(n)),
        ctx: ctx(secs),
    }
}
/// What completing challenge `n` with a second factor opens.
fn opened(n: u128, method: ProofKind, secs: i64) -> Vec<UserEvent> {
    vec![started(n, used(method), secs), remembered(n, secs)]
}
fn skipped(n: u128, reason: SkipReason, secs: i64) -> Vec<UserEvent> {
    vec![
        UserEvent::SecondFactorSkipped {
            reason,
            ctx: ctx(secs),
        },
        started(n, SecondFactorUse::Skipped { reason }, secs),
    ]
}
fn resent(n: u128, method: Method, generation: u32, secs: i64) -> UserEvent {
    UserEvent::CodeResent {
        challenge_id: challenge_id(n),
        method,
        generation,
        resends: generation,
        ctx: ctx(secs),
    }
}

/// A registered user with email challenge 1 open since second 10.
fn email_challenge() -> Vec<UserEvent> {
    vec![
        registered(),
        issued(1, Method::Email, &[Method::Email], &email_only(), 10),
    ]
}
/// An enrolled user with TOTP challenge 1 (email as fallback) open since second 10.
fn totp_challenge() -> Vec<UserEvent> {
    let mut events = enrolled();
    events.push(issued(
        1,
        Method::Totp,
        &[Method::Totp, Method::Email],
        &totp_and_email(),
        10,
    ));
    events
}
/// [`email_challenge`] after three wrong codes: locked out.
fn locked() -> Vec<UserEvent> {
    let mut events = email_challenge();
    events.extend([
        wrong(1, ProofKind::Email, 1, 11),
        wrong(1, ProofKind::Email, 2, 12),
        wrong(1, ProofKind::Email, 3, 13),
        locked_out(3, vec![], 13),
    ]);
    events
}

fn fold(events: &[UserEvent]) -> User {
    let mut user = User::default();
    for e in events {
        user.apply(e.clone());
    }
    user
}
/// Handles `command` on the user folded from `history`, appends and returns
/// the events it produced.
fn run(history: &mut Vec<UserEvent>, command: UserCommand) -> Vec<UserEvent> {
    let events = fold(history)
        .handle_for_tests(command)
        .expect("the command is accepted");
    history.extend(events.clone());
    events
}

// ---------------------------------------------------------------- Register

#[test]
fn register_records_the_user_with_roles_sorted_and_deduplicated() {
    let roles =
        |names: &[&str]| -> Vec<Role> { names.iter().map(|r| Role::parse(r).unwrap()).collect() };
    let command = UserCommand::Register {
        user_id: uid(),
        tenant_id: TenantId(Uuid::from_u128(1)),
        username: Username::parse("ida").unwrap(),
        email: Some(Email::parse("ida@acme.test").unwrap()),
        phone: None,
        roles: roles(&["staff", "admin", "staff", "finance"]),
        service_account: false,
        password_hash: PasswordHash(PASSWORD_HASH.into()),
        ctx: admin(0),
    };
    Given::with(())
        .given_no_previous_events()
        .when(command)
        .then_expect_events(vec![UserEvent::UserRegistered {
            user_id: uid(),
            tenant_id: TenantId(Uuid::from_u128(1)),
            username: Username::parse("ida").unwrap(),
            email: Some(Email::parse("ida@acme.test").unwrap()),
            phone: None,
            roles: roles(&["admin", "finance", "staff"]),
            service_account: false,
            password_hash: PasswordHash(PASSWORD_HASH.into()),
            ctx: admin(0),
        }]);
}

#[test]
fn register_twice_is_refused() {
    let UserEvent::UserRegistered {
        user_id,
        tenant_id,
        username,
        email,
        phone,
        roles,
        service_account,
        password_hash,
        ctx,
    } = registered()
    else {
        unreachable!()
    };
    Given::with(())
        .given(vec![registered()])
        .when(UserCommand::Register {
            user_id,
            tenant_id,
            username,
            email,
            phone,
            roles,
            service_account,
            password_hash,
            ctx,
        })
        .then_expect_error(UserError::AlreadyExists);
}

#[test]
fn commands_for_an_unregistered_user_are_refused() {
    let s = email_only();
    let commands = vec![
        sign_in(1, &s, 10),
        verify(1, delivered(true), &s, 10),
        resend(1, 10),
        switch(1, Method::Totp, 10),
        UserCommand::EndSession {
            session_id: session_id(1),
            reason: SessionEndReason::SignedOut,
            ctx: ctx(10),
        },
        UserCommand::StartTotpEnrollment {
            sealed: sealed("1"),
            ctx: ctx(10),
        },
        confirm(Some(5), backup_hashes("a"), 10),
        UserCommand::RegenerateBackupCodes {
            backup_codes: backup_hashes("a").into(),
            step_up: None,
            ctx: admin(10),
        },
        UserCommand::Unlock { ctx: admin(10) },
    ];
    for command in commands {
        Given::with(())
            .given_no_previous_events()
            .when(command)
            .then_expect_error(UserError::NotFound);
    }
}

// ---------------------------------------------------------------- SignIn

#[test]
fn a_wrong_password_is_recorded_and_opens_nothing() {
    let command = UserCommand::SignIn(SignIn {
        password_ok: false,
        ..sign_in_cmd(1, &email_only(), 10)
    });
    Given::with(())
        .given(vec![registered()])
        .when(command.clone())
        .then_expect_events(vec![UserEvent::PasswordRejected { ctx: ctx(10) }]);
    // A wrong password does not count towards the lockout.
    let mut history = vec![registered()];
    for _ in 0..5 {
        run(&mut history, command.clone());
    }
    assert_eq!(fold(&history).lockout, Lockout::Open { failures: 0 });
}

#[test]
fn a_locked_user_is_refused_whether_the_password_is_right_or_wrong() {
    Given::with(())
        .given(locked())
        .when(sign_in(2, &email_only(), 20))
        .then_expect_events(vec![UserEvent::SignInRefusedLocked { ctx: ctx(20) }]);
    // Even with 2FA off: the lockout holds.
    let off = TwoFactorSettings {
        enabled: false,
        ..email_only()
    };
    Given::with(())
        .given(locked())
        .when(sign_in(2, &off, 20))
        .then_expect_events(vec![UserEvent::SignInRefusedLocked { ctx: ctx(20) }]);
    Given::with(())
        .given(locked())
        .when(UserCommand::SignIn(SignIn {
            password_ok: false,
            ..sign_in_cmd(2, &email_only(), 20)
        }))
        // The same answer: a lockout is no oracle for the password.
        .then_expect_events(vec![UserEvent::SignInRefusedLocked { ctx: ctx(20) }]);
}

#[test]
fn wrong_passwords_in_a_row_make_each_next_try_wait_longer_until_a_right_one() {
    let s = email_only();
    let wrong = |secs: i64| {
        UserCommand::SignIn(SignIn {
            password_ok: false,
            ..sign_in_cmd(9, &s, secs)
        })
    };
    let mut history = vec![registered()];
    // Five free wrong passwords.
    for i in 0..5 {
        assert_eq!(
            run(&mut history, wrong(10 + i)),
            vec![UserEvent::PasswordRejected { ctx: ctx(10 + i) }]
        );
    }
    // The sixth try waits 1 s after the fifth failure, right password or not.
    for password_ok in [false, true] {
        let events = fold(&history)
            .handle_for_tests(UserCommand::SignIn(SignIn {
                password_ok,
                ..sign_in_cmd(9, &s, 14)
            }))
            .unwrap();
        assert_eq!(
            events,
            vec![UserEvent::SignInThrottled {
                retry_after_secs: 1,
                budget: GuessBudget::Account,
                ctx: ctx(14)
            }]
        );
    }
    assert_eq!(
        run(&mut history, wrong(15)),
        vec![UserEvent::PasswordRejected { ctx: ctx(15) }]
    );
    // Then 2 s.
    assert!(matches!(
        fold(&history).handle_for_tests(wrong(16)).unwrap()[0],
        UserEvent::SignInThrottled {
            retry_after_secs: 1,
            ..
        }
    ));
    // A right password once allowed starts the budget over.
    let events = run(&mut history, sign_in(9, &s, 17));
    assert!(matches!(events[0], UserEvent::ChallengeIssued { .. }));
    assert_eq!(fold(&history).password_failures, 0);
}

#[test]
fn with_two_factor_off_the_password_opens_a_session_for_the_tenants_duration() {
    let settings = TwoFactorSettings {
        enabled: false,
        session_duration_secs: 3600,
        ..email_only()
    };
    let reason = SkipReason::TwoFactorDisabled;
    Given::with(())
        .given(vec![registered()])
        .when(sign_in(1, &settings, 10))
        .then_expect_events(vec![
            UserEvent::SecondFactorSkipped {
                reason,
                ctx: ctx(10),
            },
            UserEvent::SessionStarted {
                session_id: session_id(1),
                token_hash: keyed(&session_token(1)),
                expires_at: t(10) + Duration::hours(1),
                second_factor: SecondFactorUse::Skipped { reason },
                ctx: ctx(10),
            },
        ]);
    // The default duration is 90 days.
    let default_duration = TwoFactorSettings {
        enabled: false,
        ..email_only()
    };
    Given::with(())
        .given(vec![registered()])
        .when(sign_in(1, &default_duration, 10))
        .then_expect_events(skipped(1, reason, 10));
    // An expiry given with the command wins.
    let mut explicit = sign_in_cmd(1, &settings, 10);
    explicit.session.expires_at = Some(t(500));
    let events = Given::with(())
        .given(vec![registered()])
        .when(UserCommand::SignIn(explicit))
        .inspect_result()
        .unwrap();
    assert!(matches!(
        events.as_slice(),
        [
            UserEvent::SecondFactorSkipped { .. },
            UserEvent::SessionStarted { expires_at, .. }
        ] if *expires_at == t(500)
    ));
}

#[test]
fn a_service_account_skips_the_second_factor() {
    Given::with(())
        .given(vec![registration(true, false, true)])
        .when(sign_in(1, &email_only(), 10))
        .then_expect_events(skipped(1, SkipReason::ServiceAccount, 10));
}

#[test]
fn a_user_with_no_usable_method_is_never_let_in_on_the_password_alone() {
    // No email address, email is the only method, nothing to set up: refused.
    Given::with(())
        .given(vec![registration(false, false, false)])
        .when(sign_in(1, &email_only(), 10))
        .then_expect_events(vec![UserEvent::SignInRefusedNoMethod { ctx: ctx(10) }]);
    // Only the authenticator app is allowed and none is enrolled: sent to
    // set it up, even where enrollment is optional.
    let totp_only = two_factor(&[Method::Totp], Method::Totp);
    let mut cmd = sign_in_cmd(1, &totp_only, 10);
    cmd.enrollment_seed = Some(sealed("seed"));
    let mut history = vec![registered()];
    let events = run(&mut history, UserCommand::SignIn(cmd));
    assert!(matches!(events[0], UserEvent::TotpEnrollmentStarted { .. }));
    assert!(matches!(
        events[1],
        UserEvent::ChallengeIssued {
            purpose: ChallengePurpose::Enrollment,
            ..
        }
    ));
    // Optional enrollment: the user may skip it, and the skip says so.
    let skip = |settings: &TwoFactorSettings| UserCommand::SkipEnrollment {
        challenge: cref(1),
        settings: settings.clone(),
        session: new_session(1),
        ctx: ctx(11),
    };
    let reason = SkipReason::EnrollmentSkipped;
    let mut expected = vec![
        UserEvent::EnrollmentSkipped {
            challenge_id: challenge_id(1),
            ctx: ctx(11),
        },
        UserEvent::SecondFactorSkipped {
            reason,
            ctx: ctx(11),
        },
    ];
    expected.push(started(1, SecondFactorUse::Skipped { reason }, 11));
    Given::with(())
        .given(history.clone())
        .when(skip(&totp_only))
        .then_expect_events(expected);
    // Required: no skipping.
    let required = TwoFactorSettings {
        enrollment: crate::tenant::settings::Enrollment::Required,
        ..totp_only
    };
    Given::with(())
        .given(history)
        .when(skip(&required))
        .then_expect_error(UserError::EnrollmentRequired);
}

#[test]
fn an_email_user_gets_a_challenge_by_the_default_method_listing_the_others() {
    let settings = two_factor(&[Method::Totp, Method::Email, Method::Sms], Method::Email);
    Given::with(())
        .given(vec![registration(true, true, false)])
        .when(sign_in(1, &settings, 10))
        .then_expect_events(vec![UserEvent::ChallengeIssued {
            challenge_id: challenge_id(1),
            method: Method::Email,
            methods: vec![Method::Email, Method::Sms],
            token_hash: keyed(&challenge_token(1)),
            expires_at: t(10) + Duration::hours(4),
            resend_limit: None,
            purpose: ChallengePurpose::SignIn,
            ctx: ctx(10),
        }]);
    // The resend limit and the code timeout come from the settings.
    let limited = TwoFactorSettings {
        resend_limit: ResendLimit::Five,
        code_timeout: CodeTimeout::M15,
        ..settings
    };
    Given::with(())
        .given(vec![registration(true, true, false)])
        .when(sign_in(1, &limited, 10))
        .then_expect_events(vec![UserEvent::ChallengeIssued {
            challenge_id: challenge_id(1),
            method: Method::Email,
            methods: vec![Method::Email, Method::Sms],
            token_hash: keyed(&challenge_token(1)),
            expires_at: t(10) + Duration::minutes(15),
            resend_limit: Some(5),
            purpose: ChallengePurpose::SignIn,
            ctx: ctx(10),
        }]);
}

#[test]
fn a_default_method_the_user_lacks_falls_to_the_first_available() {
    // Default totp, not enrolled: email, the first the user has.
    let settings = two_factor(&[Method::Totp, Method::Email, Method::Sms], Method::Totp);
    Given::with(())
        .given(vec![registration(true, true, false)])
        .when(sign_in(1, &settings, 10))
        .then_expect_events(vec![issued(
            1,
            Method::Email,
            &[Method::Email, Method::Sms],
            &settings,
            10,
        )]);
    // Default SMS, no phone, enrolled: the authenticator app comes first.
    let sms_default = two_factor(&[Method::Totp, Method::Email, Method::Sms], Method::Sms);
    Given::with(())
        .given(enrolled())
        .when(sign_in(1, &sms_default, 10))
        .then_expect_events(vec![issued(
            1,
            Method::Totp,
            &[Method::Totp, Method::Email],
            &sms_default,
            10,
        )]);
}

#[test]
fn without_fallback_the_challenge_lists_only_its_method() {
    let settings = TwoFactorSettings {
        allow_fallback: false,
        ..two_factor(&[Method::Totp, Method::Email], Method::Email)
    };
    Given::with(())
        .given(enrolled())
        .when(sign_in(1, &settings, 10))
        .then_expect_events(vec![issued(
            1,
            Method::Email,
            &[Method::Email],
            &settings,
            10,
        )]);
}

#[test]
fn an_enrolled_user_gets_an_authenticator_challenge() {
    let settings = TwoFactorSettings {
        code_timeout: CodeTimeout::M5,
        ..totp_and_email()
    };
    Given::with(())
        .given(enrolled())
        .when(sign_in(1, &settings, 10))
        .then_expect_events(vec![UserEvent::ChallengeIssued {
            challenge_id: challenge_id(1),
            method: Method::Totp,
            methods: vec![Method::Totp, Method::Email],
            token_hash: keyed(&challenge_token(1)),
            expires_at: t(10) + Duration::minutes(5),
            resend_limit: None,
            purpose: ChallengePurpose::SignIn,
            ctx: ctx(10),
        }]);
}

// ---------------------------------------------------------------- VerifyCode

#[test]
fn a_matching_totp_step_verifies_and_opens_a_session() {
    let step = ENROLLED_STEP + 1;
    let mut expected = vec![verified(1, Method::Totp, Some(step), 20)];
    expected.extend(opened(1, ProofKind::Totp, 20));
    Given::with(())
        .given(totp_challenge())
        .when(verify(1, totp(Some(step)), &totp_and_email(), 20))
        .then_expect_events(expected.clone());
    let mut history = totp_challenge();
    history.extend(expected);
    let user = fold(&history);
    assert_eq!(user.last_totp_step, Some(step));
    assert!(user.challenges.is_empty());
    assert!(user
        .live_session(session_id(1), &keyed(&session_token(1)), t(21))
        .is_some());
}

#[test]
fn a_totp_step_at_or_before_the_last_accepted_is_a_reuse() {
    for step in [ENROLLED_STEP, ENROLLED_STEP - 1] {
        Given::with(())
            .given(totp_challenge())
            .when(verify(1, totp(Some(step)), &totp_and_email(), 20))
            .then_expect_events(vec![rejected(
                1,
                ProofKind::Totp,
                RejectionReason::ReusedTimeStep,
                1,
                20,
            )]);
    }
    // A step accepted at a sign-in is not accepted again at the next.
    let settings = totp_and_email();
    let mut history = totp_challenge();
    run(&mut history, verify(1, totp(Some(2000)), &settings, 20));
    run(&mut history, sign_in(2, &settings, 25));
    Given::with(())
        .given(history)
        .when(verify(2, totp(Some(2000)), &settings, 26))
        .then_expect_events(vec![rejected(
            2,
            ProofKind::Totp,
            RejectionReason::ReusedTimeStep,
            1,
            26,
        )]);
}

#[test]
fn a_totp_code_matching_no_step_is_a_wrong_code() {
    Given::with(())
        .given(totp_challenge())
        .when(verify(1, totp(None), &totp_and_email(), 20))
        .then_expect_events(vec![wrong(1, ProofKind::Totp, 1, 20)]);
}

#[test]
fn the_third_wrong_code_in_a_row_locks_out_and_ends_every_session() {
    let s = email_only();
    let mut history = vec![
        registered(),
        started(11, used(ProofKind::Email), 1),
        started(12, used(ProofKind::Email), 2),
        issued(1, Method::Email, &[Method::Email], &s, 10),
    ];
    assert_eq!(
        run(&mut history, verify(1, delivered(false), &s, 11)),
        vec![wrong(1, ProofKind::Email, 1, 11)]
    );
    assert_eq!(
        run(&mut history, verify(1, delivered(false), &s, 12)),
        vec![wrong(1, ProofKind::Email, 2, 12)]
    );
    Given::with(())
        .given(history.clone())
        .when(verify(1, delivered(false), &s, 13))
        .then_expect_events(vec![
            wrong(1, ProofKind::Email, 3, 13),
            locked_out(3, vec![session_id(11), session_id(12)], 13),
        ]);
    run(&mut history, verify(1, delivered(false), &s, 13));
    let user = fold(&history);
    assert_eq!(user.lockout, Lockout::Locked { failures: 3 });
    assert!(user.sessions.is_empty());
}

#[test]
fn failures_count_across_challenges() {
    let s = email_only();
    let mut history = vec![registered()];
    run(&mut history, sign_in(1, &s, 10));
    assert_eq!(
        run(&mut history, verify(1, delivered(false), &s, 11)),
        vec![wrong(1, ProofKind::Email, 1, 11)]
    );
    run(&mut history, sign_in(2, &s, 20));
    assert_eq!(
        run(&mut history, verify(2, delivered(false), &s, 21)),
        vec![wrong(2, ProofKind::Email, 2, 21)]
    );
    Given::with(())
        .given(history)
        .when(verify(1, delivered(false), &s, 22))
        .then_expect_events(vec![
            wrong(1, ProofKind::Email, 3, 22),
            locked_out(3, vec![], 22),
        ]);
}

#[test]
fn a_resend_or_a_method_switch_does_not_reset_the_failures() {
    let s = two_factor(&[Method::Totp, Method::Email], Method::Email);
    let mut history = enrolled();
    assert_eq!(
        run(&mut history, sign_in(1, &s, 10)),
        vec![issued(
            1,
            Method::Email,
            &[Method::Totp, Method::Email],
            &s,
            10
        )]
    );
    run(&mut history, verify(1, delivered(false), &s, 11));
    run(&mut history, resend(1, 12));
    assert_eq!(
        run(&mut history, verify(1, delivered(false), &s, 13)),
        vec![wrong(1, ProofKind::Email, 2, 13)]
    );
    run(&mut history, switch(1, Method::Totp, 14));
    Given::with(())
        .given(history)
        .when(verify(1, totp(None), &s, 15))
        .then_expect_events(vec![
            wrong(1, ProofKind::Totp, 3, 15),
            locked_out(3, vec![], 15),
        ]);
}

#[test]
fn a_verified_code_resets_the_failures() {
    let s = email_only();
    let mut history = vec![registered()];
    run(&mut history, sign_in(1, &s, 10));
    run(&mut history, verify(1, delivered(false), &s, 11));
    run(&mut history, verify(1, delivered(false), &s, 12));
    let mut success = vec![verified(1, Method::Email, None, 13)];
    success.extend(opened(1, ProofKind::Email, 13));
    assert_eq!(
        run(&mut history, verify(1, delivered(true), &s, 13)),
        success
    );
    run(&mut history, sign_in(2, &s, 20));
    Given::with(())
        .given(history)
        .when(verify(2, delivered(false), &s, 21))
        .then_expect_events(vec![wrong(2, ProofKind::Email, 1, 21)]);
}

#[test]
fn a_locked_user_cannot_answer_even_with_the_right_code() {
    Given::with(())
        .given(locked())
        .when(verify(1, delivered(true), &email_only(), 20))
        .then_expect_error(UserError::LockedOut);
    // Without the challenge's token, nothing about the account is told.
    let stranger = ChallengeRef {
        token_hash: keyed("a guess"),
        ..cref(1)
    };
    Given::with(())
        .given(locked())
        .when(verify_with(stranger, 1, delivered(true), &email_only(), 20))
        .then_expect_error(UserError::ChallengeNotFound);
}

#[test]
fn a_wrong_token_an_unknown_or_a_finished_challenge_is_not_found() {
    let s = email_only();
    let wrong_token = ChallengeRef {
        token_hash: keyed(&challenge_token(2)),
        ..cref(1)
    };
    Given::with(())
        .given(email_challenge())
        .when(verify_with(wrong_token, 1, delivered(true), &s, 20))
        .then_expect_error(UserError::ChallengeNotFound);
    Given::with(())
        .given(email_challenge())
        .when(verify(9, delivered(true), &s, 20))
        .then_expect_error(UserError::ChallengeNotFound);
    let mut history = email_challenge();
    run(&mut history, verify(1, delivered(true), &s, 20));
    Given::with(())
        .given(history)
        .when(verify(1, delivered(true), &s, 21))
        .then_expect_error(UserError::ChallengeNotFound);
}

#[test]
fn an_expired_challenge_is_recorded_once_and_then_gone() {
    let s = email_only();
    let expiry = 10 + 4 * 3600;
    // One second before the expiry the code still counts.
    let mut accepted = vec![verified(1, Method::Email, None, expiry - 1)];
    accepted.extend(opened(1, ProofKind::Email, expiry - 1));
    Given::with(())
        .given(email_challenge())
        .when(verify(1, delivered(true), &s, expiry - 1))
        .then_expect_events(accepted);
    let expired = UserEvent::ChallengeExpired {
        challenge_id: challenge_id(1),
        ctx: ctx(expiry),
    };
    Given::with(())
        .given(email_challenge())
        .when(verify(1, delivered(true), &s, expiry))
        .then_expect_events(vec![expired.clone()]);
    let mut history = email_challenge();
    history.push(expired);
    Given::with(())
        .given(history)
        .when(verify(1, delivered(true), &s, expiry + 1))
        .then_expect_error(UserError::ChallengeNotFound);
}

#[test]
fn a_proof_must_fit_the_challenges_method() {
    Given::with(())
        .given(totp_challenge())
        .when(verify(1, delivered(true), &totp_and_email(), 20))
        .then_expect_error(UserError::ProofDoesNotFitChallenge);
    Given::with(())
        .given(email_challenge())
        .when(verify(1, totp(Some(5000)), &email_only(), 20))
        .then_expect_error(UserError::ProofDoesNotFitChallenge);
}

#[test]
fn a_matching_delivered_code_verifies_an_email_challenge() {
    let mut expected = vec![verified(1, Method::Email, None, 20)];
    expected.extend(opened(1, ProofKind::Email, 20));
    Given::with(())
        .given(email_challenge())
        .when(verify(1, delivered(true), &email_only(), 20))
        .then_expect_events(expected);
    Given::with(())
        .given(email_challenge())
        .when(verify(1, delivered(false), &email_only(), 20))
        .then_expect_events(vec![wrong(1, ProofKind::Email, 1, 20)]);
}

#[test]
fn after_a_switch_to_sms_the_sms_code_answers() {
    let s = two_factor(&[Method::Email, Method::Sms], Method::Email);
    let mut history = vec![registration(true, true, false)];
    run(&mut history, sign_in(1, &s, 10));
    run(&mut history, switch(1, Method::Sms, 11));
    Given::with(())
        .given(history.clone())
        .when(verify(1, delivered(false), &s, 12))
        .then_expect_events(vec![wrong(1, ProofKind::Sms, 1, 12)]);
    let mut expected = vec![verified(1, Method::Sms, None, 12)];
    expected.extend(opened(1, ProofKind::Sms, 12));
    Given::with(())
        .given(history)
        .when(verify(1, delivered(true), &s, 12))
        .then_expect_events(expected);
}

#[test]
fn a_backup_code_opens_a_session_once() {
    let s = totp_and_email();
    let mut first = vec![UserEvent::BackupCodeUsed {
        challenge_id: challenge_id(1),
        slot: 3,
        remaining: 7,
        ctx: ctx(20),
    }];
    first.extend(opened(1, ProofKind::BackupCode, 20));
    Given::with(())
        .given(totp_challenge())
        .when(verify(1, backup("a", 3), &s, 20))
        .then_expect_events(first.clone());

    let mut history = totp_challenge();
    history.extend(first);
    run(&mut history, sign_in(2, &s, 30));
    assert_eq!(fold(&history).backup_codes_left(), 7);
    // The same code again is a wrong code.
    Given::with(())
        .given(history.clone())
        .when(verify(2, backup("a", 3), &s, 31))
        .then_expect_events(vec![wrong(2, ProofKind::BackupCode, 1, 31)]);
    // Another unused one works.
    let mut second = vec![UserEvent::BackupCodeUsed {
        challenge_id: challenge_id(2),
        slot: 5,
        remaining: 6,
        ctx: ctx(31),
    }];
    second.extend(opened(2, ProofKind::BackupCode, 31));
    Given::with(())
        .given(history)
        .when(verify(2, backup("a", 5), &s, 31))
        .then_expect_events(second);
}

#[test]
fn a_used_backup_code_is_replaced_when_the_tenant_keeps_eight() {
    let keep = TwoFactorSettings {
        replace_backup_codes_on_use: true,
        ..totp_and_email()
    };
    let with_replacement = |settings: &TwoFactorSettings| {
        let UserCommand::VerifyCode(mut cmd) = verify(1, backup("a", 3), settings, 20) else {
            unreachable!()
        };
        cmd.replacement = Some(ReplacementCode {
            hash: keyed("new code"),
            sealed: Some(sealed("codes again")),
        });
        UserCommand::VerifyCode(cmd)
    };
    let mut expected = vec![
        UserEvent::BackupCodeUsed {
            challenge_id: challenge_id(1),
            slot: 3,
            remaining: 7,
            ctx: ctx(20),
        },
        UserEvent::BackupCodeReplaced {
            slot: 3,
            hash: keyed("new code"),
            ctx: ctx(20),
        },
        UserEvent::BackupCodesSealed {
            sealed: sealed("codes again"),
            ctx: ctx(20),
        },
    ];
    expected.extend(opened(1, ProofKind::BackupCode, 20));
    Given::with(())
        .given(totp_challenge())
        .when(with_replacement(&keep))
        .then_expect_events(expected.clone());
    let mut history = totp_challenge();
    history.extend(expected);
    let user = fold(&history);
    assert_eq!(user.backup_codes_left(), 8);
    assert_eq!(user.sealed_backup_codes, Some(sealed("codes again")));
    // Without the setting, a replacement brought along is not used.
    let mut plain = vec![UserEvent::BackupCodeUsed {
        challenge_id: challenge_id(1),
        slot: 3,
        remaining: 7,
        ctx: ctx(20),
    }];
    plain.extend(opened(1, ProofKind::BackupCode, 20));
    Given::with(())
        .given(totp_challenge())
        .when(with_replacement(&totp_and_email()))
        .then_expect_events(plain);
}

#[test]
fn issued_codes_may_come_sealed_to_be_shown_again() {
    let history = totp_challenge();
    let codes = NewBackupCodes {
        hashes: backup_hashes("z"),
        sealed: Some(sealed("z codes")),
    };
    let events = fold(&history)
        .handle_for_tests(UserCommand::RegenerateBackupCodes {
            backup_codes: codes,
            step_up: None,
            ctx: ctx(40).with_reason("lost them"),
        })
        .unwrap();
    assert!(matches!(events[0], UserEvent::BackupCodesIssued { .. }));
    assert_eq!(
        events[1],
        UserEvent::BackupCodesSealed {
            sealed: sealed("z codes"),
            ctx: ctx(40).with_reason("lost them"),
        }
    );
}

#[test]
fn the_attempt_limit_follows_the_settings() {
    for (limit, max) in [
        (MaxInvalidAttempts::Five, 5u32),
        (MaxInvalidAttempts::Ten, 10),
        (MaxInvalidAttempts::Unlimited, 100),
    ] {
        let s = TwoFactorSettings {
            max_invalid_attempts: limit,
            ..email_only()
        };
        let mut history = vec![registered()];
        // A fresh sign-in for each guess, spaced beyond the "no limit" slow-down.
        for k in 1..max {
            let (n, secs) = (u128::from(k), i64::from(k) * 1000);
            run(&mut history, sign_in(n, &s, secs));
            assert_eq!(
                run(&mut history, verify(n, delivered(false), &s, secs)),
                vec![wrong(n, ProofKind::Email, k, secs)],
                "{limit:?}, failure {k}"
            );
        }
        let (n, secs) = (u128::from(max), i64::from(max) * 1000);
        run(&mut history, sign_in(n, &s, secs));
        Given::with(())
            .given(history)
            .when(verify(n, delivered(false), &s, secs))
            .then_expect_events(vec![
                wrong(n, ProofKind::Email, max, secs),
                locked_out(max, vec![], secs),
            ]);
    }
}

#[test]
fn a_new_session_at_the_cap_first_evicts_the_oldest_live_one() {
    let s = email_only();
    let cap = MAX_ACTIVE_SESSIONS as u128;
    let mut history = vec![registered()];
    // Sessions 100.. started one second apart; 100 is the oldest.
    for k in 0..cap {
        history.push(started(100 + k, used(ProofKind::Email), 10 + k as i64));
    }
    history.push(issued(1, Method::Email, &[Method::Email], &s, 100));
    let mut expected = vec![
        verified(1, Method::Email, None, 200),
        UserEvent::SessionEnded {
            session_id: session_id(100),
            reason: SessionEndReason::Evicted,
            ctx: system(200),
        },
    ];
    expected.extend(opened(1, ProofKind::Email, 200));
    Given::with(())
        .given(history.clone())
        .when(verify(1, delivered(true), &s, 200))
        .then_expect_events(expected);
    run(&mut history, verify(1, delivered(true), &s, 200));
    let user = fold(&history);
    assert_eq!(user.sessions.len(), MAX_ACTIVE_SESSIONS);
    assert!(!user.sessions.contains_key(&session_id(100)));
    assert!(user.sessions.contains_key(&session_id(1)));

    // An expired session does not count towards the cap.
    let mut history = vec![registered()];
    history.push(UserEvent::SessionStarted {
        session_id: session_id(100),
        token_hash: keyed(&session_token(100)),
        expires_at: t(150),
        second_factor: used(ProofKind::Email),
        ctx: ctx(10),
    });
    for k in 1..cap {
        history.push(started(100 + k, used(ProofKind::Email), 10 + k as i64));
    }
    history.push(issued(1, Method::Email, &[Method::Email], &s, 100));
    let mut expected = vec![verified(1, Method::Email, None, 200)];
    expected.extend(opened(1, ProofKind::Email, 200));
    Given::with(())
        .given(history)
        .when(verify(1, delivered(true), &s, 200))
        .then_expect_events(expected);
}

// ---------------------------------------------------------------- ResendCode

#[test]
fn a_resend_moves_an_email_challenge_to_the_next_generation() {
    Given::with(())
        .given(email_challenge())
        .when(resend(1, 20))
        .then_expect_events(vec![resent(1, Method::Email, 1, 20)]);
    let mut history = email_challenge();
    history.push(resent(1, Method::Email, 1, 20));
    Given::with(())
        .given(history)
        .when(resend(1, 30))
        .then_expect_events(vec![resent(1, Method::Email, 2, 30)]);
}

#[test]
fn the_resend_limit_is_enforced() {
    let s = TwoFactorSettings {
        resend_limit: ResendLimit::Three,
        ..email_only()
    };
    let mut history = vec![registered()];
    run(&mut history, sign_in(1, &s, 10));
    for k in 1..=3u32 {
        let secs = 10 + i64::from(k);
        assert_eq!(
            run(&mut history, resend(1, secs)),
            vec![resent(1, Method::Email, k, secs)]
        );
    }
    Given::with(())
        .given(history)
        .when(resend(1, 20))
        .then_expect_error(UserError::ResendLimitReached);
}

#[test]
fn an_authenticator_challenge_has_nothing_to_resend() {
    Given::with(())
        .given(totp_challenge())
        .when(resend(1, 20))
        .then_expect_error(UserError::NothingToResend);
}

#[test]
fn an_expired_challenge_is_not_resent() {
    Given::with(())
        .given(email_challenge())
        .when(resend(1, 10 + 4 * 3600))
        .then_expect_error(UserError::ChallengeExpired);
}

#[test]
fn a_locked_user_cannot_resend_or_switch() {
    Given::with(())
        .given(locked())
        .when(resend(1, 20))
        .then_expect_error(UserError::LockedOut);
    Given::with(())
        .given(locked())
        .when(switch(1, Method::Sms, 20))
        .then_expect_error(UserError::LockedOut);
    Given::with(())
        .given(email_challenge())
        .when(resend(9, 20))
        .then_expect_error(UserError::ChallengeNotFound);
}

// ---------------------------------------------------------------- SwitchMethod

#[test]
fn a_switch_to_another_listed_method_moves_the_generation_on() {
    let s = two_factor(&[Method::Totp, Method::Email], Method::Email);
    let mut history = enrolled();
    history.push(issued(
        1,
        Method::Email,
        &[Method::Totp, Method::Email],
        &s,
        10,
    ));
    let switched = |generation, secs| UserEvent::ChallengeMethodSwitched {
        challenge_id: challenge_id(1),
        from: Method::Email,
        to: Method::Totp,
        generation,
        ctx: ctx(secs),
    };
    Given::with(())
        .given(history.clone())
        .when(switch(1, Method::Totp, 20))
        .then_expect_events(vec![switched(1, 20)]);
    history.push(resent(1, Method::Email, 1, 15));
    Given::with(())
        .given(history.clone())
        .when(switch(1, Method::Totp, 20))
        .then_expect_events(vec![switched(2, 20)]);
    // Now the authenticator code answers it.
    history.push(switched(2, 20));
    let step = ENROLLED_STEP + 7;
    let mut expected = vec![verified(1, Method::Totp, Some(step), 21)];
    expected.extend(opened(1, ProofKind::Totp, 21));
    Given::with(())
        .given(history)
        .when(verify(1, totp(Some(step)), &s, 21))
        .then_expect_events(expected);
}

#[test]
fn a_switch_to_the_current_or_an_unlisted_method_is_refused() {
    let s = two_factor(&[Method::Totp, Method::Email], Method::Email);
    let mut history = enrolled();
    history.push(issued(
        1,
        Method::Email,
        &[Method::Totp, Method::Email],
        &s,
        10,
    ));
    for method in [Method::Email, Method::Sms] {
        Given::with(())
            .given(history.clone())
            .when(switch(1, method, 20))
            .then_expect_error(UserError::MethodNotAvailable);
    }
    // Without fallback the challenge lists only its own method.
    Given::with(())
        .given(email_challenge())
        .when(switch(1, Method::Totp, 20))
        .then_expect_error(UserError::MethodNotAvailable);
    Given::with(())
        .given(history)
        .when(switch(1, Method::Totp, 10 + 4 * 3600))
        .then_expect_error(UserError::ChallengeExpired);
}

// ---------------------------------------------------------------- EndSession

#[test]
fn ending_a_session() {
    let history = vec![registered(), started(1, used(ProofKind::Email), 10)];
    let end = |n, secs| UserCommand::EndSession {
        session_id: session_id(n),
        reason: SessionEndReason::SignedOut,
        ctx: ctx(secs),
    };
    let ended = UserEvent::SessionEnded {
        session_id: session_id(1),
        reason: SessionEndReason::SignedOut,
        ctx: ctx(20),
    };
    Given::with(())
        .given(history.clone())
        .when(end(1, 20))
        .then_expect_events(vec![ended.clone()]);
    Given::with(())
        .given(history.clone())
        .when(end(2, 20))
        .then_expect_error(UserError::SessionNotFound);
    let mut history = history;
    history.push(ended);
    Given::with(())
        .given(history)
        .when(end(1, 30))
        .then_expect_error(UserError::SessionNotFound);
}

// ---------------------------------------------------------------- enrollment

#[test]
fn starting_enrollment_records_the_sealed_seed() {
    let start = |tag, secs| UserCommand::StartTotpEnrollment {
        sealed: sealed(tag),
        ctx: ctx(secs),
    };
    Given::with(())
        .given(vec![registered()])
        .when(start("1", 10))
        .then_expect_events(vec![UserEvent::TotpEnrollmentStarted {
            sealed: sealed("1"),
            ctx: ctx(10),
        }]);
    // Starting over while pending replaces the seed.
    let pending = vec![
        registered(),
        UserEvent::TotpEnrollmentStarted {
            sealed: sealed("1"),
            ctx: ctx(10),
        },
    ];
    let mut history = pending.clone();
    run(&mut history, start("2", 20));
    assert_eq!(fold(&history).pending_totp, Some(sealed("2")));
    assert_eq!(fold(&history).two_factor, TwoFactorState::Pending);
    Given::with(())
        .given(enrolled())
        .when(start("2", 20))
        .then_expect_error(UserError::AlreadyEnrolled);
}

fn pending() -> Vec<UserEvent> {
    vec![
        registered(),
        UserEvent::TotpEnrollmentStarted {
            sealed: sealed("1"),
            ctx: ctx(10),
        },
    ]
}

#[test]
fn a_matching_confirmation_completes_enrollment_with_backup_codes() {
    let expected = vec![
        UserEvent::EnrollmentCompleted {
            method: Method::Totp,
            totp_step: 1234,
            ctx: ctx(20),
        },
        UserEvent::BackupCodesIssued {
            hashes: backup_hashes("a"),
            ctx: ctx(20),
        },
    ];
    Given::with(())
        .given(pending())
        .when(confirm(Some(1234), backup_hashes("a"), 20))
        .then_expect_events(expected.clone());
    let mut history = pending();
    history.extend(expected);
    let user = fold(&history);
    assert_eq!(user.two_factor, TwoFactorState::Enrolled);
    assert_eq!(
        user.totp,
        Some(TotpFactor {
            sealed: sealed("1")
        })
    );
    assert_eq!(user.pending_totp, None);
    assert_eq!(user.last_totp_step, Some(1234));
    assert_eq!(user.backup_codes_left(), BACKUP_CODE_COUNT);
}

#[test]
fn a_confirmation_code_matching_no_step_is_rejected() {
    Given::with(())
        .given(pending())
        .when(confirm(None, backup_hashes("a"), 20))
        .then_expect_events(vec![UserEvent::EnrollmentCodeRejected { ctx: ctx(20) }]);
    let mut history = pending();
    run(&mut history, confirm(None, backup_hashes("a"), 20));
    assert_eq!(fold(&history).two_factor, TwoFactorState::Pending);
}

#[test]
fn re_enrollment_does_not_accept_a_step_used_before() {
    let mut history = enrolled();
    history.extend([
        UserEvent::EnrollmentReset { ctx: admin(20) },
        UserEvent::TotpEnrollmentStarted {
            sealed: sealed("2"),
            ctx: ctx(30),
        },
    ]);
    Given::with(())
        .given(history.clone())
        .when(confirm(Some(ENROLLED_STEP), backup_hashes("b"), 40))
        .then_expect_events(vec![UserEvent::EnrollmentCodeRejected { ctx: ctx(40) }]);
    Given::with(())
        .given(history)
        .when(confirm(Some(ENROLLED_STEP + 1), backup_hashes("b"), 40))
        .then_expect_events(vec![
            UserEvent::EnrollmentCompleted {
                method: Method::Totp,
                totp_step: ENROLLED_STEP + 1,
                ctx: ctx(40),
            },
            UserEvent::BackupCodesIssued {
                hashes: backup_hashes("b"),
                ctx: ctx(40),
            },
        ]);
}

#[test]
fn confirming_needs_a_pending_enrollment_and_no_active_one() {
    Given::with(())
        .given(vec![registered()])
        .when(confirm(Some(5), backup_hashes("a"), 20))
        .then_expect_error(UserError::NoEnrollmentInProgress);
    Given::with(())
        .given(enrolled())
        .when(confirm(Some(ENROLLED_STEP + 1), backup_hashes("b"), 20))
        .then_expect_error(UserError::AlreadyEnrolled);
}

#[test]
fn confirming_needs_exactly_the_backup_code_count() {
    for count in [0, BACKUP_CODE_COUNT - 1, BACKUP_CODE_COUNT + 1] {
        let codes = (0..count).map(|i| keyed(&backup_code("a", i))).collect();
        Given::with(())
            .given(pending())
            .when(confirm(Some(5), codes, 20))
            .then_expect_error(UserError::WrongBackupCodeCount {
                expected: BACKUP_CODE_COUNT,
            });
    }
}

// ---------------------------------------------------------------- RegenerateBackupCodes

fn regenerate(set: &str, step_up: Option<SessionId>, ctx: Ctx) -> UserCommand {
    UserCommand::RegenerateBackupCodes {
        backup_codes: backup_hashes(set).into(),
        step_up,
        ctx,
    }
}

#[test]
fn a_user_regenerates_backup_codes_after_a_recent_step_up() {
    let mut history = enrolled();
    history.push(started(1, used(ProofKind::Totp), 10));
    Given::with(())
        .given(history.clone())
        .when(regenerate("b", Some(session_id(1)), ctx(40)))
        .then_expect_error(UserError::StepUpRequired);
    history.push(UserEvent::StepUpCompleted {
        session_id: session_id(1),
        challenge_id: challenge_id(9),
        ctx: ctx(30),
    });
    Given::with(())
        .given(history.clone())
        .when(regenerate("b", Some(session_id(1)), ctx(40)))
        .then_expect_events(vec![UserEvent::BackupCodesIssued {
            hashes: backup_hashes("b"),
            ctx: ctx(40),
        }]);
    // Ten minutes after the step-up it has lapsed.
    Given::with(())
        .given(history.clone())
        .when(regenerate("b", Some(session_id(1)), ctx(30 + 600)))
        .then_expect_error(UserError::StepUpRequired);

    // The old codes stop working, the new ones work.
    let s = totp_and_email();
    run(&mut history, regenerate("b", Some(session_id(1)), ctx(40)));
    run(&mut history, sign_in(2, &s, 50));
    Given::with(())
        .given(history.clone())
        .when(verify(2, backup("a", 0), &s, 51))
        .then_expect_events(vec![wrong(2, ProofKind::BackupCode, 1, 51)]);
    let mut expected = vec![UserEvent::BackupCodeUsed {
        challenge_id: challenge_id(2),
        slot: 0,
        remaining: BACKUP_CODE_COUNT - 1,
        ctx: ctx(51),
    }];
    expected.extend(opened(2, ProofKind::BackupCode, 51));
    Given::with(())
        .given(history)
        .when(verify(2, backup("b", 0), &s, 51))
        .then_expect_events(expected);
}

#[test]
fn an_admin_regenerates_backup_codes_with_a_reason() {
    Given::with(())
        .given(enrolled())
        .when(regenerate("b", None, admin(40)))
        .then_expect_events(vec![UserEvent::BackupCodesIssued {
            hashes: backup_hashes("b"),
            ctx: admin(40),
        }]);
    let mut no_reason = admin(40);
    no_reason.reason = None;
    Given::with(())
        .given(enrolled())
        .when(regenerate("b", None, no_reason))
        .then_expect_error(UserError::ReasonRequired);
    Given::with(())
        .given(enrolled())
        .when(UserCommand::RegenerateBackupCodes {
            backup_codes: backup_hashes("b")[1..].to_vec().into(),
            step_up: None,
            ctx: admin(40),
        })
        .then_expect_error(UserError::WrongBackupCodeCount {
            expected: BACKUP_CODE_COUNT,
        });
}

// ---------------------------------------------------------------- Unlock

#[test]
fn unlocking_a_user_who_is_not_locked_is_refused() {
    Given::with(())
        .given(email_challenge())
        .when(UserCommand::Unlock { ctx: admin(20) })
        .then_expect_error(UserError::NotLocked);
}

#[test]
fn an_admin_unlock_needs_a_reason() {
    for reason in [None, Some("   ".to_string())] {
        let mut ctx = admin(20);
        ctx.reason = reason;
        Given::with(())
            .given(locked())
            .when(UserCommand::Unlock { ctx })
            .then_expect_error(UserError::ReasonRequired);
    }
}

#[test]
fn after_an_unlock_the_user_signs_in_again_and_failures_count_from_zero() {
    Given::with(())
        .given(locked())
        .when(UserCommand::Unlock { ctx: admin(20) })
        .then_expect_events(vec![UserEvent::UserUnlocked { ctx: admin(20) }]);
    let s = email_only();
    let mut history = locked();
    run(&mut history, UserCommand::Unlock { ctx: admin(20) });
    assert_eq!(fold(&history).lockout, Lockout::Open { failures: 0 });
    // The challenges open at the lockout are gone.
    Given::with(())
        .given(history.clone())
        .when(verify(1, delivered(true), &s, 30))
        .then_expect_error(UserError::ChallengeNotFound);
    assert_eq!(
        run(&mut history, sign_in(2, &s, 30)),
        vec![issued(2, Method::Email, &[Method::Email], &s, 30)]
    );
    Given::with(())
        .given(history)
        .when(verify(2, delivered(false), &s, 31))
        .then_expect_events(vec![wrong(2, ProofKind::Email, 1, 31)]);
}

// ---------------------------------------------------------------- snapshots and secrets

/// A history touching most of the state: factors, backup codes, open
/// challenges with resends and switches, sessions, a step-up, devices,
/// failures and the per-user switches.
fn rich_history() -> Vec<UserEvent> {
    let s = TwoFactorSettings {
        resend_limit: ResendLimit::Five,
        ..two_factor(&[Method::Totp, Method::Email, Method::Sms], Method::Email)
    };
    let mut history = vec![registration(true, true, false)];
    run(
        &mut history,
        UserCommand::StartTotpEnrollment {
            sealed: sealed("1"),
            ctx: ctx(1),
        },
    );
    run(&mut history, confirm(Some(100), backup_hashes("a"), 2));
    run(&mut history, sign_in(1, &s, 10));
    run(&mut history, verify(1, backup("a", 2), &s, 11));
    run(&mut history, sign_in(2, &s, 20));
    run(&mut history, resend(2, 21));
    run(&mut history, switch(2, Method::Sms, 22));
    run(&mut history, verify(2, delivered(false), &s, 23));
    run(&mut history, sign_in(3, &s, 30));
    history.push(UserEvent::StepUpCompleted {
        session_id: session_id(1),
        challenge_id: challenge_id(9),
        ctx: ctx(31),
    });
    history.push(UserEvent::TwoFactorSwitched {
        on: true,
        ctx: admin(32),
    });
    history
}

#[test]
fn a_folded_user_round_trips_through_json_unchanged() {
    let user = fold(&rich_history());
    // The history reached the parts of the state worth checking.
    assert_eq!(user.challenges.len(), 2);
    assert_eq!(user.challenges[&challenge_id(2)].generation, 2);
    assert_eq!(user.backup_codes_left(), BACKUP_CODE_COUNT - 1);
    assert!(user.sessions[&session_id(1)].stepped_up_at.is_some());
    assert_eq!(user.devices.len(), 1);
    assert_eq!(user.lockout, Lockout::Open { failures: 1 });
    assert!(user.last_failure_at.is_some() && user.two_factor_switched_on);

    let json = serde_json::to_string(&user).unwrap();
    let back: User = serde_json::from_str(&json).unwrap();
    assert_eq!(back, user);

    // So do the events, as the store keeps them.
    for event in rich_history() {
        let json = serde_json::to_value(&event).unwrap();
        let back: UserEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }
}

#[test]
fn debug_output_never_shows_secret_material() {
    let hash = keyed("plain-token");
    assert!(!format!("{hash:?}").contains(&hash.0));
    let password = PasswordHash(PASSWORD_HASH.into());
    assert!(!format!("{password:?}").contains("argon2id"));
    let seed = sealed("1");
    assert!(!format!("{seed:?}").contains(SEALED));

    // Nor does the whole aggregate, or any event, as they land in logs.
    let history = rich_history();
    let user = format!("{:?}", fold(&history));
    let events = format!("{history:?}");
    for printed in [user, events] {
        assert!(!printed.contains("hash-of-"), "a hash in {printed}");
        assert!(
            !printed.contains("argon2id"),
            "the password hash in {printed}"
        );
        assert!(!printed.contains(SEALED), "a sealed seed in {printed}");
    }
}

#[test]
fn events_carry_hashes_of_secrets_never_the_secrets() {
    let history = rich_history();
    let stored: Vec<String> = history
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    let all = stored.join("\n");
    assert!(!all.contains("plain-"), "a plaintext secret in {all}");
    // The check looks where the secrets would be: their hashes are there.
    for hash in [
        keyed(&challenge_token(1)),
        keyed(&session_token(1)),
        keyed(&device_token(1)),
        keyed(&backup_code("a", 0)),
    ] {
        assert!(all.contains(&hash.0), "{} missing", hash.0);
    }
}

// ---------------------------------------------------------------- audited reads

fn with_roles(roles: &[&str]) -> UserEvent {
    let mut e = registered();
    if let UserEvent::UserRegistered { roles: r, .. } = &mut e {
        *r = roles.iter().map(|n| Role::parse(n).unwrap()).collect();
    }
    e
}

fn history_read() -> AuditedRead {
    AuditedRead::UserHistory {
        user_id: "someone".into(),
    }
}

#[test]
fn an_auditors_or_admins_read_is_recorded_as_it_was_made() {
    for role in ["auditor", "admin"] {
        Given::with(())
            .given(vec![with_roles(&[role])])
            .when(UserCommand::RecordAuditRead {
                read: history_read(),
                ctx: ctx(5),
            })
            .then_expect_events(vec![UserEvent::AuditRead {
                read: history_read(),
                ctx: ctx(5),
            }]);
    }
}

#[test]
fn a_read_by_someone_neither_admin_nor_auditor_is_refused() {
    Given::with(())
        .given(vec![with_roles(&["staff"])])
        .when(UserCommand::RecordAuditRead {
            read: history_read(),
            ctx: ctx(5),
        })
        .then_expect_error(UserError::NotAReader);
    Given::with(())
        .given_no_previous_events()
        .when(UserCommand::RecordAuditRead {
            read: history_read(),
            ctx: ctx(5),
        })
        .then_expect_error(UserError::NotFound);
}
