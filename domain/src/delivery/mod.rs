//! One send request: the code of one challenge generation, delivered by
//! email or SMS. Its stream makes delivery idempotent: a redelivered job
//! finds the request already delivered and sends nothing.
//!
//! ```text
//!   (new) --claim--> Claimed{attempts} --delivered--> Delivered
//!                        |   ^   \--fell back (SMS failed)--> (then delivered by email)
//!                        |   '-- claim again after a crash or a retry
//!                        '--failed (attempts exhausted)--> Failed
//! ```

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::context::Ctx;
use crate::ids::{ChallengeId, TenantId, UserId};
use crate::values::Method;
use crate::TenantScoped;

/// The stream id of a send request.
pub fn stream_id(challenge: ChallengeId, generation: u32) -> String {
    format!("{challenge}:{generation}")
}

/// The stream id of a security notice: the event of the user's stream it
/// tells of.
pub fn notice_stream_id(user: UserId, sequence: i64) -> String {
    format!("notice:{user}:{sequence}")
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryCommand {
    Claim {
        challenge_id: ChallengeId,
        generation: u32,
        user_id: UserId,
        tenant_id: TenantId,
        method: Method,
        ctx: Ctx,
    },
    RecordDelivered {
        method: Method,
        provider: String,
        latency_ms: u64,
        ctx: Ctx,
    },
    RecordFallback {
        reason: String,
        ctx: Ctx,
    },
    RecordFailed {
        reason: String,
        ctx: Ctx,
    },
    /// A security notice by email about an event of the user's (`notice`
    /// names which kind), to be sent.
    ClaimNotice {
        notice: String,
        user_id: UserId,
        tenant_id: TenantId,
        ctx: Ctx,
    },
    RecordNoticeSent {
        /// How many addresses it went to (the old one too, after a change).
        recipients: u32,
        ctx: Ctx,
    },
    RecordNoticeFailed {
        reason: String,
        ctx: Ctx,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeliveryEvent {
    DeliveryClaimed {
        challenge_id: ChallengeId,
        generation: u32,
        user_id: UserId,
        tenant_id: TenantId,
        method: Method,
        attempt: u32,
        ctx: Ctx,
    },
    CodeDelivered {
        method: Method,
        provider: String,
        latency_ms: u64,
        attempt: u32,
        ctx: Ctx,
    },
    /// The SMS provider failed; the code goes by email instead.
    DeliveryFellBack {
        from: Method,
        to: Method,
        reason: String,
        ctx: Ctx,
    },
    DeliveryFailed {
        reason: String,
        attempts: u32,
        ctx: Ctx,
    },
    NoticeClaimed {
        notice: String,
        user_id: UserId,
        tenant_id: TenantId,
        attempt: u32,
        ctx: Ctx,
    },
    NoticeSent {
        recipients: u32,
        attempt: u32,
        ctx: Ctx,
    },
    NoticeFailed {
        reason: String,
        attempts: u32,
        ctx: Ctx,
    },
}

impl DomainEvent for DeliveryEvent {
    fn event_type(&self) -> String {
        match self {
            DeliveryEvent::DeliveryClaimed { .. } => "DeliveryClaimed",
            DeliveryEvent::CodeDelivered { .. } => "CodeDelivered",
            DeliveryEvent::DeliveryFellBack { .. } => "DeliveryFellBack",
            DeliveryEvent::DeliveryFailed { .. } => "DeliveryFailed",
            DeliveryEvent::NoticeClaimed { .. } => "NoticeClaimed",
            DeliveryEvent::NoticeSent { .. } => "NoticeSent",
            DeliveryEvent::NoticeFailed { .. } => "NoticeFailed",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("this code was already delivered")]
    AlreadyDelivered,
    #[error("this delivery already failed for good")]
    AlreadyFailed,
    #[error("nothing was claimed")]
    NotClaimed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DeliveryStatus {
    #[default]
    New,
    Claimed,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub tenant_id: Option<TenantId>,
    pub method: Option<Method>,
    pub status: DeliveryStatus,
    pub attempts: u32,
}

impl TenantScoped for Delivery {
    fn tenant(&self) -> Option<TenantId> {
        self.tenant_id
    }
}

impl Delivery {
    fn decide(&self, command: DeliveryCommand) -> Result<Vec<DeliveryEvent>, DeliveryError> {
        match (self.status, command) {
            (DeliveryStatus::Delivered, _) => Err(DeliveryError::AlreadyDelivered),
            (DeliveryStatus::Failed, _) => Err(DeliveryError::AlreadyFailed),
            (
                _,
                DeliveryCommand::Claim {
                    challenge_id,
                    generation,
                    user_id,
                    tenant_id,
                    method,
                    ctx,
                },
            ) => Ok(vec![DeliveryEvent::DeliveryClaimed {
                challenge_id,
                generation,
                user_id,
                tenant_id,
                method,
                attempt: self.attempts + 1,
                ctx,
            }]),
            (
                _,
                DeliveryCommand::ClaimNotice {
                    notice,
                    user_id,
                    tenant_id,
                    ctx,
                },
            ) => Ok(vec![DeliveryEvent::NoticeClaimed {
                notice,
                user_id,
                tenant_id,
                attempt: self.attempts + 1,
                ctx,
            }]),
            (DeliveryStatus::New, _) => Err(DeliveryError::NotClaimed),
            (DeliveryStatus::Claimed, DeliveryCommand::RecordNoticeSent { recipients, ctx }) => {
                Ok(vec![DeliveryEvent::NoticeSent {
                    recipients,
                    attempt: self.attempts,
                    ctx,
                }])
            }
            (DeliveryStatus::Claimed, DeliveryCommand::RecordNoticeFailed { reason, ctx }) => {
                Ok(vec![DeliveryEvent::NoticeFailed {
                    reason,
                    attempts: self.attempts,
                    ctx,
                }])
            }
            (
                DeliveryStatus::Claimed,
                DeliveryCommand::RecordDelivered {
                    method,
                    provider,
                    latency_ms,
                    ctx,
                },
            ) => Ok(vec![DeliveryEvent::CodeDelivered {
                method,
                provider,
                latency_ms,
                attempt: self.attempts,
                ctx,
            }]),
            (DeliveryStatus::Claimed, DeliveryCommand::RecordFallback { reason, ctx }) => {
                Ok(vec![DeliveryEvent::DeliveryFellBack {
                    from: self.method.unwrap_or(Method::Sms),
                    to: Method::Email,
                    reason,
                    ctx,
                }])
            }
            (DeliveryStatus::Claimed, DeliveryCommand::RecordFailed { reason, ctx }) => {
                Ok(vec![DeliveryEvent::DeliveryFailed {
                    reason,
                    attempts: self.attempts,
                    ctx,
                }])
            }
        }
    }
}

impl Aggregate for Delivery {
    const TYPE: &'static str = "delivery";
    type Command = DeliveryCommand;
    type Event = DeliveryEvent;
    type Error = DeliveryError;
    type Services = ();

    async fn handle(
        &mut self,
        command: DeliveryCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), DeliveryError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: DeliveryEvent) {
        match event {
            DeliveryEvent::DeliveryClaimed {
                tenant_id,
                method,
                attempt,
                ..
            } => {
                self.tenant_id = Some(tenant_id);
                self.method = Some(method);
                self.status = DeliveryStatus::Claimed;
                self.attempts = attempt;
            }
            DeliveryEvent::CodeDelivered { .. } => self.status = DeliveryStatus::Delivered,
            DeliveryEvent::DeliveryFellBack { to, .. } => self.method = Some(to),
            DeliveryEvent::DeliveryFailed { .. } => self.status = DeliveryStatus::Failed,
            DeliveryEvent::NoticeClaimed {
                tenant_id, attempt, ..
            } => {
                self.tenant_id = Some(tenant_id);
                self.method = Some(Method::Email);
                self.status = DeliveryStatus::Claimed;
                self.attempts = attempt;
            }
            DeliveryEvent::NoticeSent { .. } => self.status = DeliveryStatus::Delivered,
            DeliveryEvent::NoticeFailed { .. } => self.status = DeliveryStatus::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Actor;
    use chrono::{TimeZone, Utc};
    use cqrs_es::test::TestFramework;
    use uuid::Uuid;

    type Given = TestFramework<Delivery>;

    fn ctx() -> Ctx {
        Ctx::new(
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            Actor::System,
        )
    }
    fn claim() -> DeliveryCommand {
        DeliveryCommand::Claim {
            challenge_id: ChallengeId(Uuid::from_u128(1)),
            generation: 0,
            user_id: UserId(Uuid::from_u128(2)),
            tenant_id: TenantId(Uuid::from_u128(3)),
            method: Method::Sms,
            ctx: ctx(),
        }
    }
    fn claimed(attempt: u32) -> DeliveryEvent {
        DeliveryEvent::DeliveryClaimed {
            challenge_id: ChallengeId(Uuid::from_u128(1)),
            generation: 0,
            user_id: UserId(Uuid::from_u128(2)),
            tenant_id: TenantId(Uuid::from_u128(3)),
            method: Method::Sms,
            attempt,
            ctx: ctx(),
        }
    }
    fn delivered() -> DeliveryEvent {
        DeliveryEvent::CodeDelivered {
            method: Method::Sms,
            provider: "twilio".into(),
            latency_ms: 12,
            attempt: 1,
            ctx: ctx(),
        }
    }

    #[test]
    fn a_claim_counts_attempts() {
        Given::with(())
            .given_no_previous_events()
            .when(claim())
            .then_expect_events(vec![claimed(1)]);
        Given::with(())
            .given(vec![claimed(1)])
            .when(claim())
            .then_expect_events(vec![claimed(2)]);
    }

    #[test]
    fn a_delivered_request_is_never_sent_again() {
        Given::with(())
            .given(vec![claimed(1), delivered()])
            .when(claim())
            .then_expect_error(DeliveryError::AlreadyDelivered);
    }

    #[test]
    fn delivery_fallback_and_failure_are_recorded() {
        Given::with(())
            .given(vec![claimed(1)])
            .when(DeliveryCommand::RecordDelivered {
                method: Method::Sms,
                provider: "twilio".into(),
                latency_ms: 12,
                ctx: ctx(),
            })
            .then_expect_events(vec![delivered()]);
        Given::with(())
            .given(vec![claimed(1)])
            .when(DeliveryCommand::RecordFallback {
                reason: "provider answered 500".into(),
                ctx: ctx(),
            })
            .then_expect_events(vec![DeliveryEvent::DeliveryFellBack {
                from: Method::Sms,
                to: Method::Email,
                reason: "provider answered 500".into(),
                ctx: ctx(),
            }]);
        Given::with(())
            .given(vec![claimed(1), claimed(2)])
            .when(DeliveryCommand::RecordFailed {
                reason: "smtp refused".into(),
                ctx: ctx(),
            })
            .then_expect_events(vec![DeliveryEvent::DeliveryFailed {
                reason: "smtp refused".into(),
                attempts: 2,
                ctx: ctx(),
            }]);
        Given::with(())
            .given_no_previous_events()
            .when(DeliveryCommand::RecordFailed {
                reason: "x".into(),
                ctx: ctx(),
            })
            .then_expect_error(DeliveryError::NotClaimed);
    }
}
