//! A tenant's two-factor settings and the combinations that make sense.

use chrono::Duration;
use serde::{Deserialize, Serialize};

use crate::values::{Method, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    EveryLogin,
    UnrecognizedDevices,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enrollment {
    Optional,
    Required,
}

/// The code timeouts an admin can choose from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CodeTimeout {
    #[serde(rename = "2m")]
    M2,
    #[serde(rename = "5m")]
    M5,
    #[serde(rename = "15m")]
    M15,
    #[serde(rename = "30m")]
    M30,
    #[serde(rename = "60m")]
    M60,
    #[serde(rename = "4h")]
    H4,
    #[serde(rename = "12h")]
    H12,
}

impl CodeTimeout {
    pub fn duration(&self) -> Duration {
        match self {
            CodeTimeout::M2 => Duration::minutes(2),
            CodeTimeout::M5 => Duration::minutes(5),
            CodeTimeout::M15 => Duration::minutes(15),
            CodeTimeout::M30 => Duration::minutes(30),
            CodeTimeout::M60 => Duration::minutes(60),
            CodeTimeout::H4 => Duration::hours(4),
            CodeTimeout::H12 => Duration::hours(12),
        }
    }
}

/// Consecutive wrong codes before the user is locked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxInvalidAttempts {
    #[serde(rename = "3")]
    Three,
    #[serde(rename = "5")]
    Five,
    #[serde(rename = "10")]
    Ten,
    /// "No limit" still locks after [`MaxInvalidAttempts::UNLIMITED_CAP`] failures in a row.
    Unlimited,
}

impl MaxInvalidAttempts {
    pub const UNLIMITED_CAP: u32 = 100;

    pub fn limit(&self) -> u32 {
        match self {
            MaxInvalidAttempts::Three => 3,
            MaxInvalidAttempts::Five => 5,
            MaxInvalidAttempts::Ten => 10,
            MaxInvalidAttempts::Unlimited => Self::UNLIMITED_CAP,
        }
    }
}

/// How often the code of one challenge may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResendLimit {
    #[serde(rename = "3")]
    Three,
    #[serde(rename = "5")]
    Five,
    Unlimited,
}

impl ResendLimit {
    pub fn limit(&self) -> Option<u32> {
        match self {
            ResendLimit::Three => Some(3),
            ResendLimit::Five => Some(5),
            ResendLimit::Unlimited => None,
        }
    }
}

/// Who is asked for a second factor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Scope {
    AllUsers,
    SelectedRoles {
        roles: Vec<Role>,
    },
    /// Only users an admin has switched on one by one.
    PerUser,
    /// Users who opt in themselves.
    Voluntary,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwoFactorSettings {
    pub enabled: bool,
    pub enforcement: Enforcement,
    pub allowed_methods: Vec<Method>,
    pub default_method: Method,
    pub allow_fallback: bool,
    pub enrollment: Enrollment,
    pub code_timeout: CodeTimeout,
    pub max_invalid_attempts: MaxInvalidAttempts,
    pub resend_limit: ResendLimit,
    pub sms_provider: Option<String>,
    pub scope: Scope,
    pub replace_backup_codes_on_use: bool,
    /// Session lifetime in seconds.
    pub session_duration_secs: i64,
    /// Whether admins may open a session as a user ("Login As"), to test
    /// what they see. Off unless turned on.
    #[serde(default)]
    pub allow_login_as: bool,
    /// Wrong passwords in a row an account may get before each next try
    /// waits twice as long as the last (the password-guessing budget).
    #[serde(default = "default_password_attempts")]
    pub password_attempts_before_delay: u32,
    /// How long a remembered device skips the second factor
    /// (unrecognized-devices mode), in days.
    #[serde(default = "default_device_days")]
    pub remembered_device_days: u32,
    /// Whether the address of an earlier 2FA sign-in counts as recognized
    /// (unrecognized-devices mode). Off unless turned on: everyone behind the
    /// same NAT, VPN or untrusted proxy would share it.
    #[serde(default)]
    pub trust_known_ips: bool,
    /// Wrong passwords one client address may send in an hour, across all
    /// the tenant's accounts (a password spray); past it, sign-ins from that
    /// address are refused until the hour ends.
    #[serde(default = "default_passwords_per_address")]
    pub password_failures_per_address_per_hour: u32,
    /// Codes (email or SMS) that may be sent in an hour for one account, and
    /// to one email address or phone number.
    #[serde(default = "default_codes_per_account")]
    pub codes_per_account_per_hour: u32,
    /// Codes that may be sent in an hour for sign-ins from one client address.
    #[serde(default = "default_codes_per_address")]
    pub codes_per_address_per_hour: u32,
    /// Minutes without any use after which a session ends; none: sessions
    /// last their full duration.
    #[serde(default)]
    pub idle_timeout_mins: Option<u32>,
    /// Days an audit entry stays readable in the read models (the audit
    /// history, user timelines, exports); none: for ever. The events
    /// themselves are never removed.
    #[serde(default)]
    pub audit_retention_days: Option<u32>,
}

fn default_passwords_per_address() -> u32 {
    100
}

fn default_codes_per_account() -> u32 {
    10
}

fn default_codes_per_address() -> u32 {
    50
}

fn default_device_days() -> u32 {
    30
}

fn default_password_attempts() -> u32 {
    5
}

impl Default for TwoFactorSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            enforcement: Enforcement::UnrecognizedDevices,
            allowed_methods: vec![Method::Email],
            default_method: Method::Email,
            allow_fallback: true,
            enrollment: Enrollment::Optional,
            code_timeout: CodeTimeout::H4,
            max_invalid_attempts: MaxInvalidAttempts::Three,
            resend_limit: ResendLimit::Unlimited,
            sms_provider: None,
            scope: Scope::AllUsers,
            replace_backup_codes_on_use: false,
            session_duration_secs: 90 * 24 * 3600,
            allow_login_as: false,
            password_attempts_before_delay: default_password_attempts(),
            remembered_device_days: default_device_days(),
            trust_known_ips: false,
            password_failures_per_address_per_hour: default_passwords_per_address(),
            codes_per_account_per_hour: default_codes_per_account(),
            codes_per_address_per_hour: default_codes_per_address(),
            idle_timeout_mins: None,
            audit_retention_days: None,
        }
    }
}

/// A refused combination, naming the field an admin has to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SettingsError {
    pub field: &'static str,
    pub message: &'static str,
}

impl TwoFactorSettings {
    pub const MIN_SESSION_SECS: i64 = 5 * 60;
    pub const MAX_SESSION_SECS: i64 = 400 * 24 * 3600;

    pub fn session_duration(&self) -> Duration {
        Duration::seconds(self.session_duration_secs)
    }

    pub fn allows(&self, method: Method) -> bool {
        self.allowed_methods.contains(&method)
    }

    /// Checks the combination; returns the settings with methods in canonical order.
    pub fn validated(mut self) -> Result<Self, SettingsError> {
        let err = |field, message| Err(SettingsError { field, message });
        self.allowed_methods.sort();
        self.allowed_methods.dedup();
        if self.allowed_methods.is_empty() {
            return err("allowed_methods", "allow at least one method");
        }
        if !self.allows(self.default_method) {
            return err("default_method", "must be one of the allowed methods");
        }
        if self.allows(Method::Sms)
            && self
                .sms_provider
                .as_deref()
                .is_none_or(|p| p.trim().is_empty())
        {
            return err(
                "sms_provider",
                "an SMS provider is required when SMS is allowed",
            );
        }
        if self.enrollment == Enrollment::Required && !self.allows(Method::Totp) {
            return err(
                "enrollment",
                "required enrollment needs the authenticator app (totp) among the allowed methods",
            );
        }
        if let Scope::SelectedRoles { roles } = &self.scope {
            if roles.is_empty() {
                return err("scope", "select at least one role");
            }
        }
        if !(1..=100).contains(&self.password_attempts_before_delay) {
            return err(
                "password_attempts_before_delay",
                "must be between 1 and 100",
            );
        }
        if !(1..=100_000).contains(&self.password_failures_per_address_per_hour) {
            return err(
                "password_failures_per_address_per_hour",
                "must be between 1 and 100000",
            );
        }
        if !(1..=1_000).contains(&self.codes_per_account_per_hour) {
            return err("codes_per_account_per_hour", "must be between 1 and 1000");
        }
        if !(1..=100_000).contains(&self.codes_per_address_per_hour) {
            return err("codes_per_address_per_hour", "must be between 1 and 100000");
        }
        if self
            .idle_timeout_mins
            .is_some_and(|m| !(5..=7 * 24 * 60).contains(&m))
        {
            return err("idle_timeout_mins", "must be between 5 minutes and 7 days");
        }
        if self
            .audit_retention_days
            .is_some_and(|d| !(1..=36_500).contains(&d))
        {
            return err("audit_retention_days", "must be between 1 and 36500 days");
        }
        if !(1..=400).contains(&self.remembered_device_days) {
            return err("remembered_device_days", "must be between 1 and 400");
        }
        if !(Self::MIN_SESSION_SECS..=Self::MAX_SESSION_SECS).contains(&self.session_duration_secs)
        {
            return err(
                "session_duration_secs",
                "must be between 5 minutes and 400 days",
            );
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let s = TwoFactorSettings::default().validated().unwrap();
        assert!(!s.enabled);
        assert_eq!(s.code_timeout.duration(), Duration::hours(4));
        assert_eq!(s.max_invalid_attempts.limit(), 3);
        assert_eq!(s.resend_limit.limit(), None);
        assert_eq!(s.session_duration(), Duration::days(90));
    }

    #[test]
    fn refused_combinations_name_their_field() {
        let base = TwoFactorSettings::default();
        let cases = [
            (
                TwoFactorSettings {
                    allowed_methods: vec![],
                    ..base.clone()
                },
                "allowed_methods",
            ),
            (
                TwoFactorSettings {
                    default_method: Method::Totp,
                    ..base.clone()
                },
                "default_method",
            ),
            (
                TwoFactorSettings {
                    allowed_methods: vec![Method::Email, Method::Sms],
                    ..base.clone()
                },
                "sms_provider",
            ),
            (
                TwoFactorSettings {
                    enrollment: Enrollment::Required,
                    ..base.clone()
                },
                "enrollment",
            ),
            (
                TwoFactorSettings {
                    session_duration_secs: 10,
                    ..base.clone()
                },
                "session_duration_secs",
            ),
            (
                TwoFactorSettings {
                    audit_retention_days: Some(0),
                    ..base.clone()
                },
                "audit_retention_days",
            ),
        ];
        for (settings, field) in cases {
            assert_eq!(settings.validated().unwrap_err().field, field);
        }
    }

    #[test]
    fn settings_round_trip_through_json_with_the_documented_names() {
        let json = serde_json::to_value(TwoFactorSettings::default()).unwrap();
        assert_eq!(json["code_timeout"], "4h");
        assert_eq!(json["max_invalid_attempts"], "3");
        assert_eq!(json["resend_limit"], "unlimited");
        let back: TwoFactorSettings = serde_json::from_value(json).unwrap();
        assert_eq!(back, TwoFactorSettings::default());
    }
}
