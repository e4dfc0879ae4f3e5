//! Who did something, when, and from where: carried by every command and event,
//! because the events are the product's audit record.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::UserId;

/// The party behind a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum Actor {
    /// The user acting on their own account (signing in, enrolling).
    User(UserId),
    /// An admin of the tenant acting on someone else's account or the tenant.
    Admin(UserId),
    /// An operator at the command line (`twofold tenant create`, ...).
    Operator,
    /// twofold itself (expiry, delivery outcomes).
    System,
}

/// Time, actor and request context of one command; copied into its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ctx {
    pub at: DateTime<Utc>,
    pub actor: Actor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// Why an admin did this; required for admin actions on users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The admin really acting, in a session an admin opened as this user
    /// ("Login As"): every event of that session says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impersonated_by: Option<UserId>,
}

impl Ctx {
    pub fn new(at: DateTime<Utc>, actor: Actor) -> Self {
        Self {
            at,
            actor,
            ip: None,
            user_agent: None,
            reason: None,
            impersonated_by: None,
        }
    }

    pub fn with_request(mut self, ip: Option<String>, user_agent: Option<String>) -> Self {
        self.ip = ip;
        self.user_agent = user_agent;
        self
    }

    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}
