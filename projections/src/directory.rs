//! The user directory: one row per user with what an admin looks for (2FA
//! status, factors, backup codes left, lock state, last sign-in), folded from
//! the user's events. The same fold answers `as_of` questions from the events.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use twofold_domain::user::{SecondFactorUse, TwoFactorState, UserEvent, ERASED};

/// What the directory knows of one user. Never a secret: no hashes, no seeds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserRow {
    pub user_id: String,
    pub tenant_id: String,
    pub username: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub roles: BTreeSet<String>,
    pub service_account: bool,
    pub two_factor: TwoFactorState,
    /// Methods the user has proved they hold: an authenticator confirmed, or
    /// an email or SMS code answered. Any of them makes the user enrolled.
    #[serde(default)]
    pub verified_methods: BTreeSet<String>,
    pub switched_on: bool,
    pub opted_in: bool,
    pub backup_codes_left: u32,
    pub locked: bool,
    pub created_at: Option<DateTime<Utc>>,
    pub enrolled_at: Option<DateTime<Utc>>,
    pub last_sign_in: Option<LastSignIn>,
    /// Erased by an admin: nothing personal is left in the row.
    #[serde(default)]
    pub erased: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastSignIn {
    pub at: DateTime<Utc>,
    /// Whether a second factor was asked for, and which method answered, or
    /// why it was skipped.
    pub second_factor: SecondFactorUse,
    pub ip: Option<String>,
}

impl UserRow {
    /// Where the user stands with 2FA, whatever the method: enrolled once
    /// any method is proved, else pending while an authenticator is being
    /// set up, else not started.
    pub fn status(&self) -> TwoFactorState {
        if self.two_factor == TwoFactorState::Enrolled || !self.verified_methods.is_empty() {
            TwoFactorState::Enrolled
        } else {
            self.two_factor
        }
    }

    /// The methods a user has set up for codes.
    pub fn methods(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if self.two_factor == TwoFactorState::Enrolled {
            m.push("totp");
        }
        if self.email.is_some() {
            m.push("email");
        }
        if self.phone.is_some() {
            m.push("sms");
        }
        m
    }

    /// Folds one of the user's events in.
    pub fn apply(&mut self, event: &UserEvent) {
        match event {
            UserEvent::UserRegistered {
                user_id,
                tenant_id,
                username,
                email,
                phone,
                roles,
                service_account,
                ctx,
                ..
            } => {
                self.user_id = user_id.to_string();
                self.tenant_id = tenant_id.to_string();
                self.username = username.as_str().to_string();
                self.email = email.as_ref().map(|e| e.as_str().to_string());
                self.phone = phone.as_ref().map(|p| p.as_str().to_string());
                self.roles = roles.iter().map(|r| r.as_str().to_string()).collect();
                self.service_account = *service_account;
                self.created_at = Some(ctx.at);
            }
            UserEvent::TotpEnrollmentStarted { .. } => {
                self.two_factor = TwoFactorState::Pending;
            }
            UserEvent::EnrollmentCompleted { ctx, .. } => {
                self.two_factor = TwoFactorState::Enrolled;
                self.enrolled_at = Some(ctx.at);
                self.verified_methods.insert("totp".to_string());
            }
            UserEvent::CodeVerified { method, ctx, .. } => {
                if self.verified_methods.insert(method.as_str().to_string())
                    && self.enrolled_at.is_none()
                {
                    self.enrolled_at = Some(ctx.at);
                }
            }
            UserEvent::BackupCodesIssued { hashes, .. } => {
                self.backup_codes_left = u32::try_from(hashes.len()).unwrap_or(u32::MAX);
            }
            UserEvent::BackupCodeUsed { remaining, .. } => {
                self.backup_codes_left = u32::try_from(*remaining).unwrap_or(0);
            }
            UserEvent::BackupCodeReplaced { .. } => {
                self.backup_codes_left = self.backup_codes_left.saturating_add(1);
            }
            UserEvent::UserLockedOut { .. } => self.locked = true,
            UserEvent::UserUnlocked { .. } => self.locked = false,
            UserEvent::SessionStarted {
                second_factor, ctx, ..
            } => {
                self.last_sign_in = Some(LastSignIn {
                    at: ctx.at,
                    second_factor: *second_factor,
                    ip: ctx.ip.clone(),
                });
            }
            UserEvent::UserUpdated {
                roles,
                email,
                phone,
                service_account,
                ..
            } => {
                if let Some(roles) = roles {
                    self.roles = roles.iter().map(|r| r.as_str().to_string()).collect();
                }
                // A new address or number is not yet proved.
                if let Some(email) = email {
                    self.email = email.as_ref().map(|e| e.as_str().to_string());
                    self.verified_methods.remove("email");
                }
                if let Some(phone) = phone {
                    self.phone = phone.as_ref().map(|p| p.as_str().to_string());
                    self.verified_methods.remove("sms");
                }
                if let Some(flag) = service_account {
                    self.service_account = *flag;
                }
            }
            UserEvent::TwoFactorSwitched { on, .. } => self.switched_on = *on,
            UserEvent::VoluntaryTwoFactorChanged { on, .. } => self.opted_in = *on,
            UserEvent::EnrollmentReset { .. } => {
                self.two_factor = TwoFactorState::NotStarted;
                self.verified_methods.clear();
                self.enrolled_at = None;
                self.backup_codes_left = 0;
            }
            UserEvent::AuthenticatorRemoved { .. } => {
                self.two_factor = TwoFactorState::NotStarted;
                self.verified_methods.remove("totp");
                if self.verified_methods.is_empty() {
                    self.enrolled_at = None;
                }
                self.backup_codes_left = 0;
            }
            UserEvent::PasswordRejected { .. }
            | UserEvent::SignInRefusedLocked { .. }
            | UserEvent::SecondFactorSkipped { .. }
            | UserEvent::ChallengeIssued { .. }
            | UserEvent::CodeResent { .. }
            | UserEvent::ChallengeMethodSwitched { .. }
            | UserEvent::CodeRejected { .. }
            | UserEvent::ChallengeExpired { .. }
            | UserEvent::SessionEnded { .. }
            | UserEvent::SessionUsed { .. }
            | UserEvent::ContactVerificationStarted { .. }
            | UserEvent::ContactVerified { .. }
            | UserEvent::PasswordResetLinkIssued { .. }
            | UserEvent::EnrollmentCodeRejected { .. }
            | UserEvent::DeviceRemembered { .. }
            | UserEvent::StepUpCompleted { .. }
            | UserEvent::DeviceForgotten { .. }
            | UserEvent::BackupCodesSealed { .. }
            | UserEvent::PreferredMethodSet { .. }
            | UserEvent::SignInRefusedNoMethod { .. }
            | UserEvent::SignInThrottled { .. }
            | UserEvent::PasswordChanged { .. }
            | UserEvent::PasswordChangeRequired { .. }
            | UserEvent::EnrollmentSkipped { .. }
            | UserEvent::SessionsRevoked { .. }
            | UserEvent::AuditRead { .. } => {}
            UserEvent::UserErased { .. } => {
                // What replaying the sealed events gives once the key is
                // gone, so a rebuild and the live row agree.
                self.username = ERASED.to_string();
                self.email = None;
                self.phone = None;
                self.locked = false;
                if let Some(last) = &mut self.last_sign_in {
                    last.ip = None;
                }
                self.erased = true;
            }
        }
    }
}

/// Filters of the directory listing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryQuery {
    /// `on`: enrolled an authenticator; `off`: not.
    pub two_factor: Option<String>,
    /// `enrolled`, `pending` or `not_started`.
    pub status: Option<String>,
    pub role: Option<String>,
    pub locked: Option<bool>,
    /// `totp`, `email` or `sms`: users who have that method set up.
    pub method: Option<String>,
    /// Part of the username.
    pub q: Option<String>,
    /// `none` (enrolled, no recovery code left) or `low` (enrolled, 2 or fewer).
    pub backup_codes: Option<String>,
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}
