//! One open second-factor challenge of a sign-in.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{ChallengeId, SessionId};
use crate::secrets::SecretHash;
use crate::values::Method;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Challenge {
    pub id: ChallengeId,
    /// The method whose code is expected now.
    pub method: Method,
    /// Methods the user may switch to (only `method` when fallback is off).
    pub methods: Vec<Method>,
    /// Keyed hash of the token that binds the challenge to the client that
    /// passed the password step.
    pub token_hash: SecretHash,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub resends: u32,
    pub resend_limit: Option<u32>,
    /// Which code of this challenge is current: an email or SMS code is derived
    /// from (challenge id, generation), and a resend or switch moves it on.
    pub generation: u32,
    #[serde(default)]
    pub purpose: ChallengePurpose,
}

/// What answering a challenge leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ChallengePurpose {
    /// The second factor of a sign-in: a new session.
    #[default]
    SignIn,
    /// Required enrollment at sign-in: the authenticator's first code.
    Enrollment,
    /// A current factor before a sensitive change, for this session.
    StepUp { session_id: SessionId },
    /// A code sent to a new email address or phone number the user gave:
    /// answering it proves they receive there, and only then is it used.
    VerifyContact,
}

impl Challenge {
    pub fn is_expired(&self, at: DateTime<Utc>) -> bool {
        at >= self.expires_at
    }

    pub fn resends_remaining(&self) -> Option<u32> {
        self.resend_limit
            .map(|limit| limit.saturating_sub(self.resends))
    }
}
