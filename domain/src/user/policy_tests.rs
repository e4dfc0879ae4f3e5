//! Given/when/then tests for the tenant policy at sign-in (scopes, enforcement
//! modes, required enrollment, slow-down) and the admin and self-service commands.

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use uuid::Uuid;

use super::*;
use crate::context::{Actor, Ctx};
use crate::ids::{ChallengeId, SessionId, TenantId, UserId};
use crate::secrets::{PasswordHash, SealedSecret, SecretHash};
use crate::tenant::settings::{Enforcement, Enrollment, MaxInvalidAttempts, Scope};
use crate::tenant::TwoFactorSettings;
use crate::values::{Email, Method, Phone, Role, Username};

type Given = TestFramework<User>;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 1, 9, 0, 0).unwrap()
}
fn uid() -> UserId {
    UserId(Uuid::from_u128(7))
}
fn admin_id() -> UserId {
    UserId(Uuid::from_u128(99))
}
fn at(secs: i64) -> Ctx {
    Ctx::new(t0() + Duration::seconds(secs), Actor::User(uid()))
        .with_request(Some("198.51.100.4".into()), None)
}
fn admin(secs: i64) -> Ctx {
    Ctx::new(t0() + Duration::seconds(secs), Actor::Admin(admin_id())).with_reason("ticket 42")
}
fn hash(s: &str) -> SecretHash {
    SecretHash(format!("h-{s}"))
}
fn registered(roles: &[&str]) -> UserEvent {
    UserEvent::UserRegistered {
        user_id: uid(),
        tenant_id: TenantId(Uuid::from_u128(1)),
        username: Username::parse("ida").unwrap(),
        email: Some(Email::parse("ida@acme.test").unwrap()),
        phone: None,
        roles: roles.iter().map(|r| Role::parse(r).unwrap()).collect(),
        service_account: false,
        password_hash: PasswordHash("$argon2id$stub".into()),
        ctx: at(0),
    }
}
fn on(enforcement: Enforcement) -> TwoFactorSettings {
    TwoFactorSettings {
        enabled: true,
        enforcement,
        ..TwoFactorSettings::default()
    }
}
fn sign_in(settings: TwoFactorSettings, device: Option<PresentedDevice>, ctx: Ctx) -> UserCommand {
    UserCommand::SignIn(SignIn {
        password_ok: true,
        address_retry_after: None,
        settings,
        challenge: NewChallenge {
            id: ChallengeId(Uuid::from_u128(500)),
            token_hash: hash("challenge"),
        },
        session: NewSession {
            id: SessionId(Uuid::from_u128(600)),
            token_hash: hash("session"),
            expires_at: None,
        },
        device,
        enrollment_seed: Some(SealedSecret {
            key_id: "k".into(),
            sealed: "sealed-seed".into(),
        }),
        ctx,
    })
}
fn skipped(reason: SkipReason, ctx: Ctx, settings: &TwoFactorSettings) -> Vec<UserEvent> {
    vec![
        UserEvent::SecondFactorSkipped {
            reason,
            ctx: ctx.clone(),
        },
        UserEvent::SessionStarted {
            session_id: SessionId(Uuid::from_u128(600)),
            token_hash: hash("session"),
            expires_at: ctx.at + settings.session_duration(),
            second_factor: SecondFactorUse::Skipped { reason },
            ctx,
        },
    ]
}
fn email_challenge(settings: &TwoFactorSettings, ctx: Ctx) -> UserEvent {
    UserEvent::ChallengeIssued {
        challenge_id: ChallengeId(Uuid::from_u128(500)),
        method: Method::Email,
        methods: vec![Method::Email],
        token_hash: hash("challenge"),
        expires_at: ctx.at + settings.code_timeout.duration(),
        resend_limit: None,
        purpose: ChallengePurpose::SignIn,
        ctx,
    }
}
fn remembered(ip: &str) -> UserEvent {
    UserEvent::DeviceRemembered {
        device_id: Uuid::from_u128(800),
        token_hash: hash("device"),
        ctx: Ctx::new(t0(), Actor::User(uid())).with_request(Some(ip.into()), None),
    }
}
fn session_started(id: u128, secs: i64) -> UserEvent {
    UserEvent::SessionStarted {
        session_id: SessionId(Uuid::from_u128(id)),
        token_hash: hash("s"),
        expires_at: t0() + Duration::days(90),
        second_factor: SecondFactorUse::Used {
            method: ProofKind::Email,
        },
        ctx: at(secs),
    }
}
fn stepped_up(id: u128, secs: i64) -> UserEvent {
    UserEvent::StepUpCompleted {
        session_id: SessionId(Uuid::from_u128(id)),
        challenge_id: ChallengeId(Uuid::from_u128(1)),
        ctx: at(secs),
    }
}

#[test]
fn selected_roles_ask_only_users_with_those_roles() {
    let settings = TwoFactorSettings {
        scope: Scope::SelectedRoles {
            roles: vec![Role::parse("finance").unwrap()],
        },
        ..on(Enforcement::EveryLogin)
    };
    Given::with(())
        .given(vec![registered(&["staff"])])
        .when(sign_in(settings.clone(), None, at(10)))
        .then_expect_events(skipped(SkipReason::NotRequired, at(10), &settings));
    Given::with(())
        .given(vec![registered(&["finance"])])
        .when(sign_in(settings.clone(), None, at(10)))
        .then_expect_events(vec![email_challenge(&settings, at(10))]);
}

#[test]
fn per_user_scope_asks_only_switched_on_users() {
    let settings = TwoFactorSettings {
        scope: Scope::PerUser,
        ..on(Enforcement::EveryLogin)
    };
    Given::with(())
        .given(vec![registered(&[])])
        .when(sign_in(settings.clone(), None, at(10)))
        .then_expect_events(skipped(SkipReason::NotRequired, at(10), &settings));
    Given::with(())
        .given(vec![
            registered(&[]),
            UserEvent::TwoFactorSwitched {
                on: true,
                ctx: admin(5),
            },
        ])
        .when(sign_in(settings.clone(), None, at(10)))
        .then_expect_events(vec![email_challenge(&settings, at(10))]);
}

#[test]
fn voluntary_scope_asks_users_who_opted_in() {
    let settings = TwoFactorSettings {
        scope: Scope::Voluntary,
        ..on(Enforcement::EveryLogin)
    };
    Given::with(())
        .given(vec![
            registered(&[]),
            UserEvent::VoluntaryTwoFactorChanged {
                on: true,
                ctx: at(5),
            },
        ])
        .when(sign_in(settings.clone(), None, at(10)))
        .then_expect_events(vec![email_challenge(&settings, at(10))]);
}

#[test]
fn unrecognized_devices_mode_skips_a_remembered_device() {
    let settings = on(Enforcement::UnrecognizedDevices);
    let device = PresentedDevice {
        id: Uuid::from_u128(800),
        token_hash: hash("device"),
    };
    let elsewhere = at(10).with_request(Some("203.0.113.50".into()), None);
    Given::with(())
        .given(vec![registered(&[]), remembered("192.0.2.1")])
        .when(sign_in(
            settings.clone(),
            Some(device.clone()),
            elsewhere.clone(),
        ))
        .then_expect_events(skipped(
            SkipReason::KnownDevice,
            elsewhere.clone(),
            &settings,
        ));
    // A forged token for the same device id is not recognized.
    let forged = PresentedDevice {
        token_hash: hash("forged"),
        ..device.clone()
    };
    Given::with(())
        .given(vec![registered(&[]), remembered("192.0.2.1")])
        .when(sign_in(settings.clone(), Some(forged), elsewhere.clone()))
        .then_expect_events(vec![email_challenge(&settings, elsewhere)]);
    // Every-login mode ignores the device.
    let every = on(Enforcement::EveryLogin);
    Given::with(())
        .given(vec![registered(&[]), remembered("192.0.2.1")])
        .when(sign_in(every.clone(), Some(device), at(10)))
        .then_expect_events(vec![email_challenge(&every, at(10))]);
}

#[test]
fn unrecognized_devices_mode_skips_a_known_ip_only_when_the_tenant_trusts_them() {
    let settings = TwoFactorSettings {
        trust_known_ips: true,
        ..on(Enforcement::UnrecognizedDevices)
    };
    Given::with(())
        .given(vec![registered(&[]), remembered("198.51.100.4")])
        .when(sign_in(settings.clone(), None, at(10)))
        .then_expect_events(skipped(SkipReason::KnownIp, at(10), &settings));
    // Off by default: the address alone recognizes nobody.
    let default = on(Enforcement::UnrecognizedDevices);
    Given::with(())
        .given(vec![registered(&[]), remembered("198.51.100.4")])
        .when(sign_in(default.clone(), None, at(10)))
        .then_expect_events(vec![email_challenge(&default, at(10))]);
}

#[test]
fn a_remembered_device_is_recognized_only_for_the_tenants_days() {
    let settings = TwoFactorSettings {
        remembered_device_days: 30,
        ..on(Enforcement::UnrecognizedDevices)
    };
    let device = || {
        Some(PresentedDevice {
            id: Uuid::from_u128(900),
            token_hash: hash("device"),
        })
    };
    let history = vec![
        registered(&[]),
        UserEvent::DeviceRemembered {
            device_id: Uuid::from_u128(900),
            token_hash: hash("device"),
            ctx: at(0),
        },
    ];
    let day = 24 * 3600;
    Given::with(())
        .given(history.clone())
        .when(sign_in(settings.clone(), device(), at(29 * day)))
        .then_expect_events(skipped(SkipReason::KnownDevice, at(29 * day), &settings));
    Given::with(())
        .given(history)
        .when(sign_in(settings.clone(), device(), at(31 * day)))
        .then_expect_events(vec![email_challenge(&settings, at(31 * day))]);
}

#[test]
fn required_enrollment_starts_it_at_sign_in_before_any_session() {
    let settings = TwoFactorSettings {
        enrollment: Enrollment::Required,
        allowed_methods: vec![Method::Totp, Method::Email],
        ..on(Enforcement::EveryLogin)
    };
    Given::with(())
        .given(vec![registered(&[])])
        .when(sign_in(settings.clone(), None, at(10)))
        .then_expect_events(vec![
            UserEvent::TotpEnrollmentStarted {
                sealed: SealedSecret {
                    key_id: "k".into(),
                    sealed: "sealed-seed".into(),
                },
                ctx: at(10),
            },
            UserEvent::ChallengeIssued {
                challenge_id: ChallengeId(Uuid::from_u128(500)),
                method: Method::Totp,
                methods: vec![Method::Totp],
                token_hash: hash("challenge"),
                expires_at: at(10).at + settings.code_timeout.duration(),
                resend_limit: None,
                purpose: ChallengePurpose::Enrollment,
                ctx: at(10),
            },
        ]);
}

fn enrollment_history() -> Vec<UserEvent> {
    let settings = TwoFactorSettings {
        enrollment: Enrollment::Required,
        allowed_methods: vec![Method::Totp],
        default_method: Method::Totp,
        ..on(Enforcement::EveryLogin)
    };
    let mut user = User::default();
    let mut events = vec![registered(&[])];
    for e in &events {
        cqrs_es::Aggregate::apply(&mut user, e.clone());
    }
    let issued = user
        .clone()
        .handle_for_tests(sign_in(settings, None, at(10)))
        .unwrap();
    events.extend(issued);
    events
}

fn complete(matched_step: Option<u64>, secs: i64) -> UserCommand {
    UserCommand::CompleteEnrollment(CompleteEnrollment {
        challenge: ChallengeRef {
            id: ChallengeId(Uuid::from_u128(500)),
            token_hash: hash("challenge"),
        },
        matched_step,
        backup_codes: (0..8).map(|i| hash(&format!("b{i}"))).collect(),
        settings: TwoFactorSettings::default(),
        session: NewSession {
            id: SessionId(Uuid::from_u128(601)),
            token_hash: hash("session2"),
            expires_at: None,
        },
        device: NewDevice {
            id: Uuid::from_u128(801),
            token_hash: hash("device2"),
        },
        ctx: at(secs),
    })
}

#[test]
fn completing_required_enrollment_activates_it_and_opens_a_session() {
    let events = Given::with(())
        .given(enrollment_history())
        .when(complete(Some(1000), 20))
        .inspect_result()
        .unwrap();
    let names: Vec<_> = events.iter().map(|e| e.name()).collect();
    assert_eq!(
        names,
        [
            "EnrollmentCompleted",
            "BackupCodesIssued",
            "CodeVerified",
            "SessionStarted",
            "DeviceRemembered"
        ]
    );
}

#[test]
fn a_wrong_enrollment_code_counts_as_a_failure() {
    let events = Given::with(())
        .given(enrollment_history())
        .when(complete(None, 20))
        .inspect_result()
        .unwrap();
    assert!(matches!(
        events.as_slice(),
        [UserEvent::CodeRejected {
            failures: 1,
            reason: RejectionReason::WrongCode,
            ..
        }]
    ));
}

#[test]
fn an_enrollment_challenge_is_not_answered_at_verify() {
    Given::with(())
        .given(enrollment_history())
        .when(UserCommand::VerifyCode(VerifyCode {
            replacement: None,
            challenge: ChallengeRef {
                id: ChallengeId(Uuid::from_u128(500)),
                token_hash: hash("challenge"),
            },
            proof: Proof::Totp {
                matched_step: Some(5),
            },
            settings: TwoFactorSettings::default(),
            session: NewSession {
                id: SessionId(Uuid::from_u128(601)),
                token_hash: hash("s"),
                expires_at: None,
            },
            device: NewDevice {
                id: Uuid::from_u128(801),
                token_hash: hash("d"),
            },
            ctx: at(20),
        }))
        .then_expect_error(UserError::WrongChallengePurpose);
}

#[test]
fn without_a_limit_guessing_slows_down_but_is_not_refused_forever() {
    let settings = TwoFactorSettings {
        max_invalid_attempts: MaxInvalidAttempts::Unlimited,
        ..on(Enforcement::EveryLogin)
    };
    let mut history = vec![registered(&[]), email_challenge(&settings, at(1))];
    for n in 1..=5 {
        history.push(UserEvent::CodeRejected {
            challenge_id: ChallengeId(Uuid::from_u128(500)),
            proof: ProofKind::Email,
            reason: RejectionReason::WrongCode,
            failures: n,
            ctx: at(10),
        });
    }
    let verify = |secs| {
        UserCommand::VerifyCode(VerifyCode {
            replacement: None,
            challenge: ChallengeRef {
                id: ChallengeId(Uuid::from_u128(500)),
                token_hash: hash("challenge"),
            },
            proof: Proof::Delivered { matches: false },
            settings: settings.clone(),
            session: NewSession {
                id: SessionId(Uuid::from_u128(601)),
                token_hash: hash("s"),
                expires_at: None,
            },
            device: NewDevice {
                id: Uuid::from_u128(801),
                token_hash: hash("d"),
            },
            ctx: at(secs),
        })
    };
    // After 5 failures the wait is 1 s from the last one.
    Given::with(())
        .given(history.clone())
        .when(verify(10))
        .then_expect_error(UserError::TooManyAttempts {
            retry_after_secs: 1,
        });
    let events = Given::with(())
        .given(history)
        .when(verify(11))
        .inspect_result()
        .unwrap();
    assert!(matches!(
        events.as_slice(),
        [UserEvent::CodeRejected { failures: 6, .. }]
    ));
}

#[test]
fn a_step_up_challenge_marks_the_session_instead_of_opening_one() {
    let settings = on(Enforcement::EveryLogin);
    let issued = Given::with(())
        .given(vec![registered(&[]), session_started(600, 1)])
        .when(UserCommand::StartStepUp {
            session_id: SessionId(Uuid::from_u128(600)),
            challenge: NewChallenge {
                id: ChallengeId(Uuid::from_u128(501)),
                token_hash: hash("step"),
            },
            settings: settings.clone(),
            ctx: at(5),
        })
        .inspect_result()
        .unwrap();
    assert!(matches!(
        &issued[..],
        [UserEvent::ChallengeIssued {
            purpose: ChallengePurpose::StepUp { .. },
            method: Method::Email,
            ..
        }]
    ));
    let mut history = vec![registered(&[]), session_started(600, 1)];
    history.extend(issued);
    let events = Given::with(())
        .given(history)
        .when(UserCommand::VerifyCode(VerifyCode {
            replacement: None,
            challenge: ChallengeRef {
                id: ChallengeId(Uuid::from_u128(501)),
                token_hash: hash("step"),
            },
            proof: Proof::Delivered { matches: true },
            settings,
            session: NewSession {
                id: SessionId(Uuid::from_u128(602)),
                token_hash: hash("unused"),
                expires_at: None,
            },
            device: NewDevice {
                id: Uuid::from_u128(802),
                token_hash: hash("unused"),
            },
            ctx: at(6),
        }))
        .inspect_result()
        .unwrap();
    let names: Vec<_> = events.iter().map(|e| e.name()).collect();
    assert_eq!(names, ["CodeVerified", "StepUpCompleted"]);
}

#[test]
fn sensitive_self_service_needs_a_recent_step_up() {
    let settings = on(Enforcement::EveryLogin);
    let new_email = || Email::parse("new@acme.test").unwrap();
    let command = |secs, email: Option<Option<Email>>, phone: Option<Option<Phone>>| {
        UserCommand::ChangeContact {
            email,
            phone,
            step_up: SessionId(Uuid::from_u128(600)),
            challenge: NewChallenge {
                id: ChallengeId(Uuid::from_u128(700)),
                token_hash: hash("verify"),
            },
            settings: settings.clone(),
            ctx: at(secs),
        }
    };
    Given::with(())
        .given(vec![registered(&[]), session_started(600, 1)])
        .when(command(10, Some(Some(new_email())), None))
        .then_expect_error(UserError::StepUpRequired);
    let stepped = vec![registered(&[]), session_started(600, 1), stepped_up(600, 5)];
    // Fresh step-up: a new address is not used yet; a code goes to it.
    let started = Given::with(())
        .given(stepped.clone())
        .when(command(10, Some(Some(new_email())), None))
        .inspect_result()
        .unwrap();
    assert_eq!(
        started[0],
        UserEvent::ContactVerificationStarted {
            challenge_id: ChallengeId(Uuid::from_u128(700)),
            contact: NewContact::Email(new_email()),
            ctx: at(10),
        }
    );
    assert!(matches!(
        &started[1],
        UserEvent::ChallengeIssued {
            purpose: ChallengePurpose::VerifyContact,
            method: Method::Email,
            methods,
            ..
        } if methods == &vec![Method::Email]
    ));
    // Both at once is refused; clearing one applies at once.
    Given::with(())
        .given(stepped.clone())
        .when(command(
            10,
            Some(Some(new_email())),
            Some(Some(Phone::parse("+4915100000001").unwrap())),
        ))
        .then_expect_error(UserError::OneContactAtATime);
    Given::with(())
        .given(stepped.clone())
        .when(command(10, Some(None), None))
        .then_expect_events(vec![
            UserEvent::UserUpdated {
                roles: None,
                email: Some(None),
                phone: None,
                service_account: None,
                ctx: at(10),
            },
            UserEvent::SessionsRevoked {
                session_ids: vec![SessionId(Uuid::from_u128(600))],
                devices_forgotten: true,
                ctx: at(10),
            },
        ]);
    // The code coming back makes it the user's, and every session ends; a
    // recovery code does not prove the new address.
    let mut history = stepped.clone();
    history.extend(started);
    let verify = |proof| {
        UserCommand::VerifyCode(VerifyCode {
            replacement: None,
            challenge: ChallengeRef {
                id: ChallengeId(Uuid::from_u128(700)),
                token_hash: hash("verify"),
            },
            proof,
            settings: settings.clone(),
            session: NewSession {
                id: SessionId(Uuid::from_u128(701)),
                token_hash: hash("unused"),
                expires_at: None,
            },
            device: NewDevice {
                id: Uuid::from_u128(702),
                token_hash: hash("unused"),
            },
            ctx: at(20),
        })
    };
    Given::with(())
        .given(history.clone())
        .when(verify(Proof::Backup {
            hash: hash("a backup code"),
        }))
        .then_expect_error(UserError::ProofDoesNotFitChallenge);
    let names: Vec<_> = Given::with(())
        .given(history)
        .when(verify(Proof::Delivered { matches: true }))
        .inspect_result()
        .unwrap()
        .iter()
        .map(|e| e.name())
        .collect();
    assert_eq!(
        names,
        [
            "CodeVerified",
            "ContactVerified",
            "UserUpdated",
            "SessionsRevoked"
        ]
    );
    // Ten minutes later the step-up has lapsed.
    Given::with(())
        .given(stepped)
        .when(command(5 + 600, Some(Some(new_email())), None))
        .then_expect_error(UserError::StepUpRequired);
}

#[test]
fn admin_updates_end_sessions_only_when_a_factor_changes() {
    Given::with(())
        .given(vec![registered(&[]), session_started(600, 1)])
        .when(UserCommand::Update {
            roles: Some(vec![
                Role::parse("staff").unwrap(),
                Role::parse("finance").unwrap(),
            ]),
            email: None,
            phone: None,
            service_account: Some(true),
            ctx: admin(10),
        })
        .then_expect_events(vec![UserEvent::UserUpdated {
            roles: Some(vec![
                Role::parse("finance").unwrap(),
                Role::parse("staff").unwrap(),
            ]),
            email: None,
            phone: None,
            service_account: Some(true),
            ctx: admin(10),
        }]);
    let phone = Phone::parse("+4915112345678").unwrap();
    Given::with(())
        .given(vec![registered(&[]), session_started(600, 1)])
        .when(UserCommand::Update {
            roles: None,
            email: None,
            phone: Some(Some(phone.clone())),
            service_account: None,
            ctx: admin(10),
        })
        .then_expect_events(vec![
            UserEvent::UserUpdated {
                roles: None,
                email: None,
                phone: Some(Some(phone)),
                service_account: None,
                ctx: admin(10),
            },
            UserEvent::SessionsRevoked {
                session_ids: vec![SessionId(Uuid::from_u128(600))],
                devices_forgotten: true,
                ctx: admin(10),
            },
        ]);
}

#[test]
fn switching_on_needs_the_tenant_toggle() {
    Given::with(())
        .given(vec![registered(&[])])
        .when(UserCommand::SwitchTwoFactor {
            on: true,
            tenant_enabled: false,
            ctx: admin(10),
        })
        .then_expect_error(UserError::TwoFactorUnavailable);
    Given::with(())
        .given(vec![registered(&[])])
        .when(UserCommand::SwitchTwoFactor {
            on: true,
            tenant_enabled: true,
            ctx: admin(10),
        })
        .then_expect_events(vec![UserEvent::TwoFactorSwitched {
            on: true,
            ctx: admin(10),
        }]);
}

#[test]
fn opting_in_is_free_and_opting_out_needs_a_step_up() {
    let cmd = |on, secs| UserCommand::SetVoluntaryTwoFactor {
        on,
        tenant_enabled: true,
        step_up: SessionId(Uuid::from_u128(600)),
        ctx: at(secs),
    };
    Given::with(())
        .given(vec![registered(&[]), session_started(600, 1)])
        .when(cmd(true, 10))
        .then_expect_events(vec![UserEvent::VoluntaryTwoFactorChanged {
            on: true,
            ctx: at(10),
        }]);
    let opted_in = vec![
        registered(&[]),
        session_started(600, 1),
        UserEvent::VoluntaryTwoFactorChanged {
            on: true,
            ctx: at(2),
        },
    ];
    Given::with(())
        .given(opted_in.clone())
        .when(cmd(false, 10))
        .then_expect_error(UserError::StepUpRequired);
    let mut stepped = opted_in;
    stepped.push(stepped_up(600, 5));
    Given::with(())
        .given(stepped)
        .when(cmd(false, 10))
        .then_expect_events(vec![UserEvent::VoluntaryTwoFactorChanged {
            on: false,
            ctx: at(10),
        }]);
    Given::with(())
        .given(vec![registered(&[])])
        .when(UserCommand::SetVoluntaryTwoFactor {
            on: true,
            tenant_enabled: false,
            step_up: SessionId(Uuid::from_u128(600)),
            ctx: at(10),
        })
        .then_expect_error(UserError::TwoFactorUnavailable);
}

fn enrolled() -> Vec<UserEvent> {
    vec![
        registered(&[]),
        UserEvent::TotpEnrollmentStarted {
            sealed: SealedSecret {
                key_id: "k".into(),
                sealed: "x".into(),
            },
            ctx: at(1),
        },
        UserEvent::EnrollmentCompleted {
            method: Method::Totp,
            totp_step: 100,
            ctx: at(2),
        },
        session_started(600, 3),
        remembered("192.0.2.1"),
    ]
}

#[test]
fn an_admin_reset_needs_a_reason_ends_sessions_and_devices_and_not_on_oneself() {
    Given::with(())
        .given(enrolled())
        .when(UserCommand::ResetEnrollment { ctx: admin(10) })
        .then_expect_events(vec![
            UserEvent::EnrollmentReset { ctx: admin(10) },
            UserEvent::SessionsRevoked {
                session_ids: vec![SessionId(Uuid::from_u128(600))],
                devices_forgotten: true,
                ctx: admin(10),
            },
        ]);
    let mut no_reason = admin(10);
    no_reason.reason = None;
    Given::with(())
        .given(enrolled())
        .when(UserCommand::ResetEnrollment { ctx: no_reason })
        .then_expect_error(UserError::ReasonRequired);
    let herself = Ctx::new(t0(), Actor::Admin(uid())).with_reason("lost phone");
    Given::with(())
        .given(enrolled())
        .when(UserCommand::ResetEnrollment { ctx: herself })
        .then_expect_error(UserError::CannotChangeOwnFactor);
}

#[test]
fn after_a_reset_the_state_is_not_started_with_no_devices() {
    let mut user = User::default();
    for e in enrolled() {
        cqrs_es::Aggregate::apply(&mut user, e);
    }
    assert_eq!(user.devices.len(), 1);
    for e in user
        .clone()
        .handle_for_tests(UserCommand::ResetEnrollment { ctx: admin(10) })
        .unwrap()
    {
        cqrs_es::Aggregate::apply(&mut user, e);
    }
    assert_eq!(user.two_factor, TwoFactorState::NotStarted);
    assert!(user.totp.is_none() && user.sessions.is_empty() && user.devices.is_empty());
    assert!(user.trusted_ips.is_empty());
}

#[test]
fn removing_the_authenticator_needs_enrollment_and_a_step_up() {
    Given::with(())
        .given(vec![
            registered(&[]),
            session_started(600, 1),
            stepped_up(600, 2),
        ])
        .when(UserCommand::RemoveAuthenticator {
            step_up: SessionId(Uuid::from_u128(600)),
            ctx: at(10),
        })
        .then_expect_error(UserError::NotEnrolled);
    Given::with(())
        .given(enrolled())
        .when(UserCommand::RemoveAuthenticator {
            step_up: SessionId(Uuid::from_u128(600)),
            ctx: at(10),
        })
        .then_expect_error(UserError::StepUpRequired);
    let mut history = enrolled();
    history.push(stepped_up(600, 5));
    Given::with(())
        .given(history)
        .when(UserCommand::RemoveAuthenticator {
            step_up: SessionId(Uuid::from_u128(600)),
            ctx: at(10),
        })
        .then_expect_events(vec![
            UserEvent::AuthenticatorRemoved { ctx: at(10) },
            UserEvent::SessionsRevoked {
                session_ids: vec![SessionId(Uuid::from_u128(600))],
                devices_forgotten: true,
                ctx: at(10),
            },
        ]);
}

#[test]
fn revoking_sessions_ends_them_with_the_admins_reason() {
    Given::with(())
        .given(vec![
            registered(&[]),
            session_started(600, 1),
            session_started(601, 2),
        ])
        .when(UserCommand::RevokeSessions {
            forget_devices: false,
            ctx: admin(10),
        })
        .then_expect_events(vec![UserEvent::SessionsRevoked {
            session_ids: vec![
                SessionId(Uuid::from_u128(600)),
                SessionId(Uuid::from_u128(601)),
            ],
            devices_forgotten: false,
            ctx: admin(10),
        }]);
    // Nothing to revoke: nothing recorded.
    Given::with(())
        .given(vec![registered(&[])])
        .when(UserCommand::RevokeSessions {
            forget_devices: false,
            ctx: admin(10),
        })
        .then_expect_events(vec![]);
}

#[test]
fn a_lockout_forgets_remembered_devices() {
    let mut user = User::default();
    for e in enrolled() {
        cqrs_es::Aggregate::apply(&mut user, e);
    }
    cqrs_es::Aggregate::apply(
        &mut user,
        UserEvent::UserLockedOut {
            failures: 3,
            ended_sessions: vec![],
            ctx: at(20),
        },
    );
    assert!(user.devices.is_empty() && user.trusted_ips.is_empty() && user.sessions.is_empty());
}

#[test]
fn a_reset_of_a_locked_out_user_ends_the_lockout_too() {
    let mut history = enrolled();
    history.push(UserEvent::UserLockedOut {
        failures: 3,
        ended_sessions: vec![SessionId(Uuid::from_u128(600))],
        ctx: at(5),
    });
    Given::with(())
        .given(history)
        .when(UserCommand::ResetEnrollment { ctx: admin(10) })
        .then_expect_events(vec![
            UserEvent::EnrollmentReset { ctx: admin(10) },
            UserEvent::UserUnlocked { ctx: admin(10) },
            UserEvent::SessionsRevoked {
                session_ids: vec![],
                devices_forgotten: true,
                ctx: admin(10),
            },
        ]);
}

#[test]
fn a_users_preferred_method_is_asked_first_when_the_tenant_allows_it() {
    let with_phone = || {
        let UserEvent::UserRegistered {
            user_id,
            tenant_id,
            username,
            email,
            roles,
            service_account,
            password_hash,
            ctx,
            ..
        } = registered(&[])
        else {
            unreachable!()
        };
        UserEvent::UserRegistered {
            user_id,
            tenant_id,
            username,
            email,
            phone: Some(Phone::parse("+4915112345678").unwrap()),
            roles,
            service_account,
            password_hash,
            ctx,
        }
    };
    let prefer_sms = UserEvent::PreferredMethodSet {
        method: Some(Method::Sms),
        ctx: at(1),
    };
    let both = TwoFactorSettings {
        enabled: true,
        enforcement: Enforcement::EveryLogin,
        allowed_methods: vec![Method::Email, Method::Sms],
        default_method: Method::Email,
        sms_provider: Some("p".into()),
        ..TwoFactorSettings::default()
    };
    let mut user = User::default();
    for e in [with_phone(), prefer_sms.clone()] {
        cqrs_es::Aggregate::apply(&mut user, e);
    }
    let events = user
        .clone()
        .handle_for_tests(sign_in(both.clone(), None, at(5)))
        .unwrap();
    assert!(
        matches!(
            &events[0],
            UserEvent::ChallengeIssued {
                method: Method::Sms,
                ..
            }
        ),
        "{events:?}"
    );
    // SMS not allowed: the tenant's default again.
    let email_only = TwoFactorSettings {
        allowed_methods: vec![Method::Email],
        sms_provider: None,
        ..both
    };
    let events = user
        .handle_for_tests(sign_in(email_only, None, at(5)))
        .unwrap();
    assert!(
        matches!(
            &events[0],
            UserEvent::ChallengeIssued {
                method: Method::Email,
                ..
            }
        ),
        "{events:?}"
    );
    // A method the user has not set up cannot be preferred.
    Given::with(())
        .given(vec![registered(&[])])
        .when(UserCommand::SetPreferredMethod {
            method: Some(Method::Sms),
            ctx: at(2),
        })
        .then_expect_error(UserError::MethodNotAvailable);
    Given::with(())
        .given(vec![with_phone()])
        .when(UserCommand::SetPreferredMethod {
            method: Some(Method::Sms),
            ctx: at(2),
        })
        .then_expect_events(vec![UserEvent::PreferredMethodSet {
            method: Some(Method::Sms),
            ctx: at(2),
        }]);
}

#[test]
fn login_as_needs_the_tenant_setting_a_reason_and_a_non_admin_and_marks_the_session() {
    let allowed = TwoFactorSettings {
        allow_login_as: true,
        ..on(Enforcement::EveryLogin)
    };
    let cmd = |settings: &TwoFactorSettings, ctx: Ctx| UserCommand::StartLoginAs {
        session: NewSession {
            id: SessionId(Uuid::from_u128(700)),
            token_hash: hash("as"),
            expires_at: None,
        },
        settings: settings.clone(),
        ctx,
    };
    Given::with(())
        .given(vec![registered(&[])])
        .when(cmd(&on(Enforcement::EveryLogin), admin(5)))
        .then_expect_error(UserError::LoginAsNotAllowed);
    Given::with(())
        .given(vec![registered(&["admin"])])
        .when(cmd(&allowed, admin(5)))
        .then_expect_error(UserError::LoginAsNotAllowed);
    let mut no_reason = admin(5);
    no_reason.reason = None;
    Given::with(())
        .given(vec![registered(&[])])
        .when(cmd(&allowed, no_reason))
        .then_expect_error(UserError::ReasonRequired);
    let mut user = User::default();
    cqrs_es::Aggregate::apply(&mut user, registered(&[]));
    let events = user
        .clone()
        .handle_for_tests(cmd(&allowed, admin(5)))
        .unwrap();
    for e in events {
        cqrs_es::Aggregate::apply(&mut user, e);
    }
    let session = &user.sessions[&SessionId(Uuid::from_u128(700))];
    assert_eq!(session.impersonated_by, Some(admin_id()));
    assert_eq!(
        session.expires_at,
        t0() + Duration::seconds(5) + Duration::hours(1)
    );
}

#[test]
fn an_admin_erases_a_user_with_a_reason_and_nothing_is_decided_for_them_after() {
    Given::with(())
        .given(vec![registered(&[]), session_started(600, 1)])
        .when(UserCommand::Erase { ctx: admin(10) })
        .then_expect_events(vec![UserEvent::UserErased { ctx: admin(10) }]);
    // Without a reason, or by the user themselves: refused.
    Given::with(())
        .given(vec![registered(&[])])
        .when(UserCommand::Erase {
            ctx: Ctx::new(t0(), Actor::Admin(admin_id())),
        })
        .then_expect_error(UserError::ReasonRequired);
    Given::with(())
        .given(vec![registered(&[])])
        .when(UserCommand::Erase { ctx: at(10) })
        .then_expect_error(UserError::NotFound);
    // Once erased: no command is decided, not even a second erasure.
    let erased = vec![
        registered(&[]),
        session_started(600, 1),
        UserEvent::UserErased { ctx: admin(10) },
    ];
    Given::with(())
        .given(erased.clone())
        .when(UserCommand::Erase { ctx: admin(20) })
        .then_expect_error(UserError::NotFound);
    Given::with(())
        .given(erased.clone())
        .when(UserCommand::RevokeSessions {
            forget_devices: true,
            ctx: admin(20),
        })
        .then_expect_error(UserError::NotFound);
    // Nothing of the account is kept but its ids.
    let mut user = User::default();
    for event in erased {
        cqrs_es::Aggregate::apply(&mut user, event);
    }
    assert!(user.erased && !user.exists());
    assert_eq!(user.id, Some(uid()));
    assert!(user.username.is_none() && user.email.is_none() && user.password_hash.is_none());
    assert!(user.sessions.is_empty());
}
