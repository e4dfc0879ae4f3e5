//! Security notices: an email to the user when something changed on their
//! account that they should know of (recovery codes made or used, an
//! authenticator added or removed, a new address, a password changed or
//! reset, a lockout or unlock, a sign-in from a new device). Each is a
//! delivery stream of its own (`notice:{user}:{sequence}`), so a redelivered
//! event sends it once. The text comes from a catalog per language.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;
use twofold_domain::delivery::notice_stream_id;
use twofold_domain::user::{NewContact, UserEvent};
use twofold_domain::{Actor, Ctx, TenantId, UserId};
use twofold_platform::Envelope;

/// What a notice tells of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    RecoveryCodesRegenerated,
    RecoveryCodeUsed,
    AuthenticatorAdded,
    AuthenticatorRemoved,
    EnrollmentReset,
    ContactChanged,
    PasswordChanged,
    PasswordReset,
    PasswordResetLink,
    Unlocked,
    LockedOut,
    NewDeviceSignIn,
}

impl NoticeKind {
    pub const ALL: [NoticeKind; 12] = [
        Self::RecoveryCodesRegenerated,
        Self::RecoveryCodeUsed,
        Self::AuthenticatorAdded,
        Self::AuthenticatorRemoved,
        Self::EnrollmentReset,
        Self::ContactChanged,
        Self::PasswordChanged,
        Self::PasswordReset,
        Self::PasswordResetLink,
        Self::Unlocked,
        Self::LockedOut,
        Self::NewDeviceSignIn,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RecoveryCodesRegenerated => "recovery_codes_regenerated",
            Self::RecoveryCodeUsed => "recovery_code_used",
            Self::AuthenticatorAdded => "authenticator_added",
            Self::AuthenticatorRemoved => "authenticator_removed",
            Self::EnrollmentReset => "enrollment_reset",
            Self::ContactChanged => "contact_changed",
            Self::PasswordChanged => "password_changed",
            Self::PasswordReset => "password_reset",
            Self::PasswordResetLink => "password_reset_link",
            Self::Unlocked => "unlocked",
            Self::LockedOut => "locked_out",
            Self::NewDeviceSignIn => "new_device_sign_in",
        }
    }
}

/// The events a notice may come from (checked before the payload is read).
const NOTICE_EVENTS: [&str; 13] = [
    "BackupCodesIssued",
    "BackupCodeUsed",
    "EnrollmentCompleted",
    "AuthenticatorRemoved",
    "EnrollmentReset",
    "ContactVerified",
    "UserUpdated",
    "PasswordChanged",
    "PasswordChangeRequired",
    "PasswordResetLinkIssued",
    "UserUnlocked",
    "UserLockedOut",
    "DeviceRemembered",
];

/// A notice an event asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct NoticeRequest {
    pub user_id: UserId,
    pub tenant_hint: Option<TenantId>,
    /// The event's place in the user's stream.
    pub sequence: i64,
    pub kind: NoticeKind,
    pub ctx: Ctx,
    /// Recovery codes left, for a used one.
    pub remaining: Option<usize>,
    /// The new address or number, for a change.
    pub contact: Option<String>,
    /// The email address the user had before a change: told too.
    pub previous_email: Option<String>,
    /// An event that does not call for a notice when it follows this one in
    /// the same stream (codes issued with a new authenticator, a one-time
    /// password set at registration).
    pub unless_after: Option<&'static str>,
    /// A password reset link's id and end (the link itself is derived).
    pub reset: Option<(uuid::Uuid, chrono::DateTime<chrono::Utc>)>,
    /// The reset link, once derived (filled in by the dispatcher).
    pub link: Option<String>,
}

impl NoticeRequest {
    pub fn from_event(event: &Envelope) -> anyhow::Result<Option<Self>> {
        if event.aggregate_type != "user" || !NOTICE_EVENTS.contains(&event.event_type.as_str()) {
            return Ok(None);
        }
        if !event.version_is_known() {
            bail!(
                "{} of version {}, newer than this dispatcher reads",
                event.event_type,
                event.event_version
            );
        }
        let by_someone_else = |ctx: &Ctx| !matches!(ctx.actor, Actor::User(_));
        let mut remaining = None;
        let mut contact = None;
        let mut previous_email = None;
        let mut unless_after = None;
        let mut reset = None;
        let (kind, ctx) = match event.event()? {
            UserEvent::BackupCodesIssued { ctx, .. } => {
                unless_after = Some("EnrollmentCompleted");
                (NoticeKind::RecoveryCodesRegenerated, ctx)
            }
            UserEvent::BackupCodeUsed {
                remaining: left,
                ctx,
                ..
            } => {
                remaining = Some(left);
                (NoticeKind::RecoveryCodeUsed, ctx)
            }
            UserEvent::EnrollmentCompleted { ctx, .. } => (NoticeKind::AuthenticatorAdded, ctx),
            UserEvent::AuthenticatorRemoved { ctx } => (NoticeKind::AuthenticatorRemoved, ctx),
            UserEvent::EnrollmentReset { ctx } => (NoticeKind::EnrollmentReset, ctx),
            UserEvent::ContactVerified {
                contact: new,
                previous,
                ctx,
                ..
            } => {
                contact = Some(new.as_str().to_string());
                if let NewContact::Email(_) = new {
                    previous_email = previous;
                }
                (NoticeKind::ContactChanged, ctx)
            }
            // A change an admin made (the user's own go through ContactVerified).
            UserEvent::UserUpdated {
                email, phone, ctx, ..
            } if by_someone_else(&ctx) => {
                let new = match (email, phone) {
                    (Some(Some(e)), _) => e.as_str().to_string(),
                    (_, Some(Some(p))) => p.as_str().to_string(),
                    (Some(None), _) | (_, Some(None)) => "none".to_string(),
                    _ => return Ok(None),
                };
                contact = Some(new);
                (NoticeKind::ContactChanged, ctx)
            }
            // An admin's reset tells of itself (`PasswordChangeRequired`).
            UserEvent::PasswordChanged { ctx, .. } if !by_someone_else(&ctx) => {
                (NoticeKind::PasswordChanged, ctx)
            }
            UserEvent::PasswordChangeRequired { ctx } if by_someone_else(&ctx) => {
                unless_after = Some("UserRegistered");
                (NoticeKind::PasswordReset, ctx)
            }
            UserEvent::PasswordResetLinkIssued {
                reset_id,
                expires_at,
                ctx,
            } => {
                reset = Some((reset_id, expires_at));
                (NoticeKind::PasswordResetLink, ctx)
            }
            UserEvent::UserUnlocked { ctx } => (NoticeKind::Unlocked, ctx),
            UserEvent::UserLockedOut { ctx, .. } => (NoticeKind::LockedOut, ctx),
            UserEvent::DeviceRemembered { ctx, .. } => (NoticeKind::NewDeviceSignIn, ctx),
            _ => return Ok(None),
        };
        Ok(Some(Self {
            user_id: event.aggregate_id.parse()?,
            tenant_hint: event.tenant_id.as_deref().and_then(|t| t.parse().ok()),
            sequence: event.sequence,
            kind,
            ctx,
            remaining,
            contact,
            previous_email,
            unless_after,
            reset,
            link: None,
        }))
    }

    /// The notice's delivery stream.
    pub fn delivery_id(&self) -> String {
        notice_stream_id(self.user_id, self.sequence)
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Template {
    subject: String,
    body: String,
}

#[derive(Debug, Deserialize)]
struct CatalogFile {
    footer: String,
    #[serde(flatten)]
    notices: BTreeMap<String, Template>,
}

/// The notices' text in one language.
#[derive(Debug)]
pub struct Catalog {
    footer: String,
    notices: BTreeMap<String, Template>,
}

const ENGLISH: &str = include_str!("../templates/notices.en.toml");

impl Catalog {
    /// `locale`'s catalog: English is built in; another comes from
    /// `notices.<locale>.toml` in `dir`, and must have every notice.
    pub fn load(locale: &str, dir: Option<&str>) -> anyhow::Result<Self> {
        let text = match (locale, dir) {
            ("en", None) => ENGLISH.to_string(),
            (_, Some(dir)) => {
                let path = Path::new(dir).join(format!("notices.{locale}.toml"));
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the notice templates {}", path.display()))?
            }
            (other, None) => {
                bail!(
                    "notice_locale {other:?} needs notice_templates_dir with notices.{other}.toml"
                )
            }
        };
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: CatalogFile = toml::from_str(text).context("the notice templates")?;
        for kind in NoticeKind::ALL {
            if !file.notices.contains_key(kind.as_str()) {
                bail!("the notice templates have no [{}]", kind.as_str());
            }
        }
        Ok(Self {
            footer: file.footer,
            notices: file.notices,
        })
    }

    /// The subject and the plain-text body of `request`'s notice.
    pub fn render(&self, request: &NoticeRequest, tenant: &str) -> (String, String) {
        let template = &self.notices[request.kind.as_str()];
        let ctx = &request.ctx;
        let from = match (&ctx.ip, &ctx.user_agent) {
            (Some(ip), Some(ua)) => format!("{ip} ({ua})"),
            (Some(ip), None) => ip.clone(),
            (None, Some(ua)) => ua.clone(),
            (None, None) => "an unknown address".to_string(),
        };
        let by = match ctx.actor {
            Actor::User(_) => "you",
            Actor::Admin(_) => "an administrator",
            Actor::Operator => "an operator",
            Actor::System => "twofold",
        };
        let fill = |text: &str| {
            text.replace("{tenant}", tenant)
                .replace("{when}", &ctx.at.format("%Y-%m-%d %H:%M UTC").to_string())
                .replace("{from}", &from)
                .replace("{by}", by)
                .replace(
                    "{remaining}",
                    &request.remaining.map(|r| r.to_string()).unwrap_or_default(),
                )
                .replace("{contact}", request.contact.as_deref().unwrap_or(""))
                .replace("{link}", request.link.as_deref().unwrap_or(""))
                .replace(
                    "{expires}",
                    &request
                        .reset
                        .map(|(_, until)| until.format("%Y-%m-%d %H:%M UTC").to_string())
                        .unwrap_or_default(),
                )
        };
        (
            fill(&template.subject),
            format!("{}\n{}\n", fill(&template.body), fill(&self.footer)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_english_catalog_has_every_notice_and_fills_its_placeholders() {
        let catalog = Catalog::load("en", None).unwrap();
        let request = NoticeRequest {
            user_id: UserId(uuid::Uuid::nil()),
            tenant_hint: None,
            sequence: 4,
            kind: NoticeKind::RecoveryCodeUsed,
            ctx: Ctx::new(chrono::DateTime::UNIX_EPOCH, Actor::System)
                .with_request(Some("198.51.100.7".into()), Some("Firefox".into())),
            remaining: Some(6),
            contact: None,
            previous_email: None,
            unless_after: None,
            reset: None,
            link: None,
        };
        let (subject, body) = catalog.render(&request, "Acme");
        assert_eq!(subject, "Acme: a recovery code was used");
        assert!(body.contains("198.51.100.7 (Firefox)"), "{body}");
        assert!(body.contains("6 unused codes left"), "{body}");
        assert!(!body.contains('{'), "{body}");
    }

    #[test]
    fn a_translation_missing_a_notice_is_refused() {
        let err = Catalog::parse("footer = \"x\"\n[unlocked]\nsubject = \"a\"\nbody = \"b\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("have no ["), "{err}");
    }
}
