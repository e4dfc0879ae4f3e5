//! The tenant aggregate.

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};

use super::{TenantCommand, TenantError, TenantEvent, TwoFactorSettings};
use crate::context::Actor;
use crate::ids::TenantId;

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: Option<TenantId>,
    pub name: String,
    pub settings: TwoFactorSettings,
}

impl Tenant {
    pub fn exists(&self) -> bool {
        self.id.is_some()
    }
}

impl Aggregate for Tenant {
    const TYPE: &'static str = "tenant";
    type Command = TenantCommand;
    type Event = TenantEvent;
    type Error = TenantError;
    type Services = ();

    async fn handle(
        &mut self,
        command: TenantCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), TenantError> {
        match command {
            TenantCommand::Create {
                tenant_id,
                name,
                ctx,
            } => {
                if self.exists() {
                    return Err(TenantError::AlreadyExists);
                }
                let name = name.trim().to_string();
                if name.is_empty() || name.chars().count() > 100 || name.contains(':') {
                    return Err(TenantError::InvalidName);
                }
                let event = TenantEvent::TenantCreated {
                    tenant_id,
                    name,
                    settings: TwoFactorSettings::default(),
                    ctx,
                };
                sink.write(event, self).await;
            }
            TenantCommand::ChangeTwoFactorSettings { settings, ctx } => {
                if !self.exists() {
                    return Err(TenantError::NotFound);
                }
                if !matches!(ctx.actor, Actor::Admin(_) | Actor::Operator) {
                    return Err(TenantError::NotAnAdmin);
                }
                let settings = settings.validated()?;
                sink.write(
                    TenantEvent::TwoFactorSettingsChanged { settings, ctx },
                    self,
                )
                .await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: TenantEvent) {
        match event {
            TenantEvent::TenantCreated {
                tenant_id,
                name,
                settings,
                ..
            } => {
                self.id = Some(tenant_id);
                self.name = name;
                self.settings = settings;
            }
            TenantEvent::TwoFactorSettingsChanged { settings, .. } => self.settings = settings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Ctx;
    use crate::ids::UserId;
    use crate::values::Method;
    use chrono::{TimeZone, Utc};
    use cqrs_es::test::TestFramework;
    use uuid::Uuid;

    type Given = TestFramework<Tenant>;

    fn tid() -> TenantId {
        TenantId(Uuid::from_u128(1))
    }
    fn op() -> Ctx {
        Ctx::new(
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            Actor::Operator,
        )
    }
    fn admin() -> Ctx {
        Ctx::new(
            Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).unwrap(),
            Actor::Admin(UserId(Uuid::from_u128(9))),
        )
        .with_reason("rollout")
    }
    fn created() -> TenantEvent {
        TenantEvent::TenantCreated {
            tenant_id: tid(),
            name: "Acme".into(),
            settings: TwoFactorSettings::default(),
            ctx: op(),
        }
    }

    #[test]
    fn create_records_the_name_and_default_settings() {
        Given::with(())
            .given_no_previous_events()
            .when(TenantCommand::Create {
                tenant_id: tid(),
                name: "  Acme ".into(),
                ctx: op(),
            })
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn create_twice_is_refused() {
        Given::with(())
            .given(vec![created()])
            .when(TenantCommand::Create {
                tenant_id: tid(),
                name: "Acme".into(),
                ctx: op(),
            })
            .then_expect_error(TenantError::AlreadyExists);
    }

    #[test]
    fn create_refuses_an_empty_name_or_one_that_breaks_otpauth_labels() {
        for name in ["", "   ", "a:b"] {
            Given::with(())
                .given_no_previous_events()
                .when(TenantCommand::Create {
                    tenant_id: tid(),
                    name: name.into(),
                    ctx: op(),
                })
                .then_expect_error(TenantError::InvalidName);
        }
    }

    #[test]
    fn an_admin_changes_settings_with_methods_in_canonical_order() {
        let wanted = TwoFactorSettings {
            enabled: true,
            allowed_methods: vec![Method::Email, Method::Totp, Method::Email],
            default_method: Method::Totp,
            ..TwoFactorSettings::default()
        };
        let stored = TwoFactorSettings {
            allowed_methods: vec![Method::Totp, Method::Email],
            ..wanted.clone()
        };
        Given::with(())
            .given(vec![created()])
            .when(TenantCommand::ChangeTwoFactorSettings {
                settings: wanted,
                ctx: admin(),
            })
            .then_expect_events(vec![TenantEvent::TwoFactorSettingsChanged {
                settings: stored,
                ctx: admin(),
            }]);
    }

    #[test]
    fn an_invalid_combination_is_refused_naming_the_field() {
        let result = Given::with(())
            .given(vec![created()])
            .when(TenantCommand::ChangeTwoFactorSettings {
                settings: TwoFactorSettings {
                    allowed_methods: vec![],
                    ..TwoFactorSettings::default()
                },
                ctx: admin(),
            })
            .inspect_result();
        match result {
            Err(TenantError::InvalidSettings(e)) => assert_eq!(e.field, "allowed_methods"),
            other => panic!("expected a settings error, got {other:?}"),
        }
    }

    #[test]
    fn a_user_cannot_change_settings() {
        let user = Ctx::new(op().at, Actor::User(UserId(Uuid::from_u128(5))));
        Given::with(())
            .given(vec![created()])
            .when(TenantCommand::ChangeTwoFactorSettings {
                settings: TwoFactorSettings::default(),
                ctx: user,
            })
            .then_expect_error(TenantError::NotAnAdmin);
    }

    #[test]
    fn settings_of_a_missing_tenant_are_refused() {
        Given::with(())
            .given_no_previous_events()
            .when(TenantCommand::ChangeTwoFactorSettings {
                settings: TwoFactorSettings::default(),
                ctx: admin(),
            })
            .then_expect_error(TenantError::NotFound);
    }
}
