//! The dispatcher's decisions, without I/O: which events ask for a code,
//! what to send where for one (or why not), and what a failed send leads to.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use twofold_domain::delivery::{self, Delivery, DeliveryStatus};
use twofold_domain::tenant::Tenant;
use twofold_domain::user::{ChallengePurpose, NewContact, User, UserEvent};
use twofold_domain::values::Method;
use twofold_domain::{ChallengeId, TenantId, UserId};
use twofold_platform::config::SmsProvider;
use twofold_platform::Envelope;

use crate::send::{Purpose, SendError};

/// The events that ask for a code to be sent.
const CODE_EVENTS: [&str; 3] = ["ChallengeIssued", "CodeResent", "ChallengeMethodSwitched"];

/// A code an event asks to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRequest {
    pub user_id: UserId,
    /// The tenant the event was recorded under (checked against the user's).
    pub tenant_hint: Option<TenantId>,
    pub challenge_id: ChallengeId,
    pub generation: u32,
    pub method: Method,
}

impl CodeRequest {
    /// The code `event` asks for; `None` when it asks for none (another
    /// event, or a method with nothing to deliver).
    pub fn from_event(event: &Envelope) -> anyhow::Result<Option<Self>> {
        if !CODE_EVENTS.contains(&event.event_type.as_str()) {
            return Ok(None);
        }
        if !event.version_is_known() {
            anyhow::bail!(
                "{} of version {}, newer than this dispatcher reads",
                event.event_type,
                event.event_version
            );
        }
        let (challenge_id, generation, method) = match event.event()? {
            UserEvent::ChallengeIssued {
                challenge_id,
                method,
                ..
            } => (challenge_id, 0, method),
            UserEvent::CodeResent {
                challenge_id,
                method,
                generation,
                ..
            } => (challenge_id, generation, method),
            UserEvent::ChallengeMethodSwitched {
                challenge_id,
                to,
                generation,
                ..
            } => (challenge_id, generation, to),
            _ => return Ok(None),
        };
        if !method.is_delivered() {
            return Ok(None);
        }
        Ok(Some(Self {
            user_id: event.aggregate_id.parse()?,
            tenant_hint: event.tenant_id.as_deref().and_then(|t| t.parse().ok()),
            challenge_id,
            generation,
            method,
        }))
    }

    /// The delivery's stream: `challenge:generation`.
    pub fn delivery_id(&self) -> String {
        delivery::stream_id(self.challenge_id, self.generation)
    }
}

/// What to do about a code request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The challenge is gone, expired, has a newer code, or its user no tenant.
    Superseded,
    /// Already delivered or given up on (a redelivered job).
    AlreadyDone,
    Send(Send),
}

/// One code to send, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub tenant_id: TenantId,
    pub tenant_name: String,
    pub expires_at: DateTime<Utc>,
    /// What the code is for, which its message says.
    pub purpose: Purpose,
    /// For an SMS code: the provider's name and the phone number, or why it
    /// cannot go by SMS (then it goes by email, the reason recorded).
    pub sms: Option<Result<(String, String), SendError>>,
    /// The email address, for an email code or the fallback.
    pub email: Result<String, SendError>,
}

/// Decides what `request` comes to, given the user, the user's tenant (when
/// the user has one) and the delivery as they are `now`.
pub fn plan(
    request: &CodeRequest,
    user: &User,
    tenant: Option<&Tenant>,
    delivery: &Delivery,
    providers: &BTreeMap<String, SmsProvider>,
    now: DateTime<Utc>,
) -> Plan {
    let Some(challenge) = user.challenges.get(&request.challenge_id) else {
        return Plan::Superseded;
    };
    if challenge.is_expired(now) || challenge.generation != request.generation {
        return Plan::Superseded;
    }
    let (Some(tenant_id), Some(tenant)) = (user.tenant_id, tenant) else {
        return Plan::Superseded;
    };
    if matches!(
        delivery.status,
        DeliveryStatus::Delivered | DeliveryStatus::Failed
    ) {
        return Plan::AlreadyDone;
    }
    // A new address or number being verified gets the code itself, with no
    // fallback: the code must prove that one.
    let verifying = if challenge.purpose == ChallengePurpose::VerifyContact {
        match &user.pending_contact {
            Some((id, contact)) if *id == request.challenge_id => Some(contact),
            _ => return Plan::Superseded,
        }
    } else {
        None
    };
    let (phone, email) = match verifying {
        Some(NewContact::Phone(p)) => (Some(p), None),
        Some(NewContact::Email(e)) => (None, Some(e)),
        None => (user.phone.as_ref(), user.email.as_ref()),
    };
    let sms = (request.method == Method::Sms).then(|| {
        let phone = phone.ok_or(SendError::NoPhone)?;
        let name = tenant
            .settings
            .sms_provider
            .as_ref()
            .ok_or(SendError::NoSmsProvider)?;
        if !providers.contains_key(name) {
            return Err(SendError::UnknownProvider(name.clone()));
        }
        Ok((name.clone(), phone.as_str().to_string()))
    });
    Plan::Send(Send {
        tenant_id,
        tenant_name: tenant.name.clone(),
        expires_at: challenge.expires_at,
        purpose: Purpose::of(&challenge.purpose),
        sms,
        email: email
            .map(|e| e.as_str().to_string())
            .ok_or(SendError::NoEmail),
    })
}

/// What a failed send comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFailure {
    /// Recorded as failed: permanent, or the last attempt.
    Fail,
    /// Tried again after this long.
    Retry(Duration),
}

/// A permanent failure, or the `max_attempts`th, is final; otherwise the job
/// is tried again after `retry_delay`, doubled for each attempt before (at
/// most 5 minutes).
pub fn after_failure(
    error: &SendError,
    attempt: u32,
    max_attempts: u32,
    retry_delay: Duration,
) -> AfterFailure {
    if error.is_permanent() || attempt >= max_attempts {
        return AfterFailure::Fail;
    }
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(10));
    AfterFailure::Retry((retry_delay * factor).min(Duration::from_secs(300)))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::value::RawValue;
    use twofold_domain::secrets::SecretHash;
    use twofold_domain::user::Challenge;
    use twofold_domain::values::{Email, Phone};
    use twofold_domain::{Actor, Ctx};
    use uuid::Uuid;

    use super::*;

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, minute, 0).unwrap()
    }

    fn challenge_id() -> ChallengeId {
        ChallengeId::from_uuid(Uuid::from_u128(7))
    }

    fn tenant_id() -> TenantId {
        TenantId::from_uuid(Uuid::from_u128(1))
    }

    fn request(method: Method, generation: u32) -> CodeRequest {
        CodeRequest {
            user_id: UserId::from_uuid(Uuid::from_u128(2)),
            tenant_hint: Some(tenant_id()),
            challenge_id: challenge_id(),
            generation,
            method,
        }
    }

    /// A user of the tenant with an open challenge (generation 1, until 12:10).
    fn user() -> User {
        let challenge = Challenge {
            id: challenge_id(),
            method: Method::Email,
            methods: vec![Method::Email, Method::Sms],
            token_hash: SecretHash("h".into()),
            issued_at: at(0),
            expires_at: at(10),
            resends: 1,
            resend_limit: None,
            generation: 1,
            purpose: Default::default(),
        };
        User {
            tenant_id: Some(tenant_id()),
            email: Some(Email::parse("ann@acme.test").unwrap()),
            phone: Some(Phone::parse("+4915112345678").unwrap()),
            challenges: [(challenge_id(), challenge)].into(),
            ..User::default()
        }
    }

    fn tenant(sms_provider: Option<&str>) -> Tenant {
        let mut tenant = Tenant {
            id: Some(tenant_id()),
            name: "Acme".into(),
            ..Tenant::default()
        };
        tenant.settings.sms_provider = sms_provider.map(str::to_string);
        tenant
    }

    fn providers() -> BTreeMap<String, SmsProvider> {
        [(
            "sms1".to_string(),
            SmsProvider::Webhook {
                url: "http://127.0.0.1:9/".into(),
                bearer_token: None,
            },
        )]
        .into()
    }

    fn plan_for(request: &CodeRequest, user: &User, tenant: &Tenant, now: u32) -> Plan {
        plan(
            request,
            user,
            Some(tenant),
            &Delivery::default(),
            &providers(),
            at(now),
        )
    }

    #[test]
    fn an_email_code_goes_to_the_users_address() {
        let Plan::Send(send) = plan_for(&request(Method::Email, 1), &user(), &tenant(None), 1)
        else {
            panic!("expected a send");
        };
        assert_eq!(send.email, Ok("ann@acme.test".to_string()));
        assert_eq!(send.sms, None);
        assert_eq!(send.tenant_name, "Acme");
        assert_eq!(send.expires_at, at(10));
    }

    #[test]
    fn an_sms_code_goes_through_the_tenants_provider_with_email_behind_it() {
        let Plan::Send(send) =
            plan_for(&request(Method::Sms, 1), &user(), &tenant(Some("sms1")), 1)
        else {
            panic!("expected a send");
        };
        assert_eq!(
            send.sms,
            Some(Ok(("sms1".to_string(), "+4915112345678".to_string())))
        );
        assert_eq!(send.email, Ok("ann@acme.test".to_string()));
    }

    #[test]
    fn what_keeps_an_sms_from_going_says_why() {
        let sms = |user: &User, tenant: &Tenant| match plan_for(
            &request(Method::Sms, 1),
            user,
            tenant,
            1,
        ) {
            Plan::Send(send) => send.sms,
            other => panic!("expected a send, got {other:?}"),
        };
        let no_phone = User {
            phone: None,
            ..user()
        };
        assert_eq!(
            sms(&no_phone, &tenant(Some("sms1"))),
            Some(Err(SendError::NoPhone))
        );
        assert_eq!(
            sms(&user(), &tenant(None)),
            Some(Err(SendError::NoSmsProvider))
        );
        assert_eq!(
            sms(&user(), &tenant(Some("gone"))),
            Some(Err(SendError::UnknownProvider("gone".into())))
        );
        let no_email = User {
            email: None,
            ..user()
        };
        match plan_for(&request(Method::Email, 1), &no_email, &tenant(None), 1) {
            Plan::Send(send) => assert_eq!(send.email, Err(SendError::NoEmail)),
            other => panic!("expected a send, got {other:?}"),
        }
    }

    #[test]
    fn an_expired_replaced_or_unknown_challenge_is_superseded() {
        let t = tenant(None);
        // Expired.
        assert_eq!(
            plan_for(&request(Method::Email, 1), &user(), &t, 11),
            Plan::Superseded
        );
        // An older generation's code.
        assert_eq!(
            plan_for(&request(Method::Email, 0), &user(), &t, 1),
            Plan::Superseded
        );
        // Gone.
        let gone = User {
            challenges: BTreeMap::new(),
            ..user()
        };
        assert_eq!(
            plan_for(&request(Method::Email, 1), &gone, &t, 1),
            Plan::Superseded
        );
        // A user of no tenant.
        let p = plan(
            &request(Method::Email, 1),
            &user(),
            None,
            &Delivery::default(),
            &providers(),
            at(1),
        );
        assert_eq!(p, Plan::Superseded);
    }

    #[test]
    fn a_delivery_already_done_is_not_sent_again() {
        for status in [DeliveryStatus::Delivered, DeliveryStatus::Failed] {
            let delivery = Delivery {
                status,
                ..Delivery::default()
            };
            let p = plan(
                &request(Method::Email, 1),
                &user(),
                Some(&tenant(None)),
                &delivery,
                &providers(),
                at(1),
            );
            assert_eq!(p, Plan::AlreadyDone);
        }
    }

    #[test]
    fn failures_are_retried_with_doubling_waits_until_the_last_attempt() {
        let smtp = SendError::Smtp("connection refused".into());
        let base = Duration::from_secs(5);
        assert_eq!(after_failure(&smtp, 1, 4, base), AfterFailure::Retry(base));
        assert_eq!(
            after_failure(&smtp, 3, 4, base),
            AfterFailure::Retry(Duration::from_secs(20))
        );
        assert_eq!(after_failure(&smtp, 4, 4, base), AfterFailure::Fail);
        assert_eq!(
            after_failure(&smtp, 20, 30, base),
            AfterFailure::Retry(Duration::from_secs(300))
        );
        // A permanent failure is not tried again.
        assert_eq!(
            after_failure(&SendError::RecipientLimit, 1, 4, base),
            AfterFailure::Fail
        );
        assert_eq!(
            after_failure(&SendError::NoEmail, 1, 4, base),
            AfterFailure::Fail
        );
    }

    fn envelope(event: &UserEvent) -> Envelope {
        Envelope {
            global_position: 1,
            aggregate_type: "user".into(),
            aggregate_id: Uuid::from_u128(2).to_string(),
            sequence: 3,
            event_type: event.name().into(),
            event_version: "1.0".into(),
            tenant_id: Some(tenant_id().to_string()),
            recorded_at: at(0),
            payload: RawValue::from_string(serde_json::to_string(event).unwrap()).unwrap(),
            opened: None,
        }
    }

    #[test]
    fn code_events_become_requests_and_others_are_skipped() {
        let ctx = Ctx::new(at(0), Actor::System);
        let switched = UserEvent::ChallengeMethodSwitched {
            challenge_id: challenge_id(),
            from: Method::Email,
            to: Method::Sms,
            generation: 2,
            ctx: ctx.clone(),
        };
        assert_eq!(
            CodeRequest::from_event(&envelope(&switched)).unwrap(),
            Some(request(Method::Sms, 2))
        );
        let resent = |method| UserEvent::CodeResent {
            challenge_id: challenge_id(),
            method,
            generation: 1,
            resends: 1,
            ctx: ctx.clone(),
        };
        assert_eq!(
            CodeRequest::from_event(&envelope(&resent(Method::Email))).unwrap(),
            Some(request(Method::Email, 1))
        );
        // An app code is not delivered.
        assert_eq!(
            CodeRequest::from_event(&envelope(&resent(Method::Totp))).unwrap(),
            None
        );
        let other = UserEvent::EnrollmentCodeRejected { ctx };
        assert_eq!(CodeRequest::from_event(&envelope(&other)).unwrap(), None);
    }
}
