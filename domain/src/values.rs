//! Values parsed once at the edge: usernames, emails, phones, roles, codes, methods.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValueError {
    pub field: &'static str,
    pub message: &'static str,
}

fn invalid(field: &'static str, message: &'static str) -> ValueError {
    ValueError { field, message }
}

/// A second-factor method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// An authenticator app (TOTP, RFC 6238).
    Totp,
    Email,
    Sms,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Totp, Method::Email, Method::Sms];

    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Totp => "totp",
            Method::Email => "email",
            Method::Sms => "sms",
        }
    }

    /// Whether twofold delivers a code for this method (and so can resend it).
    pub fn is_delivered(&self) -> bool {
        matches!(self, Method::Email | Method::Sms)
    }

    pub fn parse(s: &str) -> Result<Self, ValueError> {
        match s {
            "totp" => Ok(Method::Totp),
            "email" => Ok(Method::Email),
            "sms" => Ok(Method::Sms),
            _ => Err(invalid("method", "must be one of totp, email, sms")),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A login name: 1 to 64 characters of letters, digits and `._@-`, kept lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Username(String);

impl Username {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let s = raw.to_lowercase();
        if s.is_empty() || s.chars().count() > 64 {
            return Err(invalid("username", "must be 1 to 64 characters"));
        }
        if !s
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))
        {
            return Err(invalid(
                "username",
                "may contain only letters, digits and . _ @ -",
            ));
        }
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An email address, checked for shape (one `@`, a dotted domain, no spaces).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let s = raw.trim();
        let bad = || invalid("email", "must be an address like name@example.com");
        if s.len() > 254 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        let (local, domain) = s.split_once('@').ok_or_else(bad)?;
        if local.is_empty()
            || domain.contains('@')
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
        {
            return Err(bad());
        }
        Ok(Self(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A phone number in E.164 form (`+` then 8 to 15 digits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Phone(String);

impl Phone {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let s: String = raw
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '(' | ')'))
            .collect();
        let digits = s.strip_prefix('+').unwrap_or("");
        if !(8..=15).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(invalid(
                "phone",
                "must be in international form, like +4915112345678",
            ));
        }
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A role name: 1 to 64 characters of lowercase letters, digits, `_` and `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Role(String);

impl Role {
    pub const ADMIN: &'static str = "admin";
    /// Reads the console (Overview, directory, timelines, audit) but cannot act.
    pub const AUDITOR: &'static str = "auditor";

    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let s = raw.trim().to_lowercase();
        if s.is_empty()
            || s.len() > 64
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        {
            return Err(invalid(
                "roles",
                "each role is 1 to 64 characters of a-z, 0-9, _ and -",
            ));
        }
        Ok(Self(s))
    }
    pub fn admin() -> Self {
        Self(Self::ADMIN.to_string())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A one-time code as typed by the user: exactly six ASCII digits, nothing else.
/// No trimming: a padded code is malformed input, not a near miss.
#[derive(Clone, PartialEq, Eq)]
pub struct OtpCode(String);

impl OtpCode {
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        if raw.len() == 6 && raw.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Self(raw.to_string()))
        } else {
            Err(invalid("code", "must be exactly 6 digits (0-9)"))
        }
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OtpCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OtpCode(******)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otp_codes_are_exactly_six_ascii_digits() {
        assert!(OtpCode::parse("012345").is_ok());
        for bad in [
            "",
            "12345",
            "1234567",
            " 123456",
            "123456 ",
            "12345a",
            "١٢٣٤٥٦",
            "１２３４５６",
        ] {
            assert!(OtpCode::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn otp_code_debug_hides_the_digits() {
        let code = OtpCode::parse("987654").unwrap();
        assert!(!format!("{code:?}").contains("987654"));
    }

    #[test]
    fn usernames_are_lowercased_and_restricted() {
        assert_eq!(Username::parse("Alice.B").unwrap().as_str(), "alice.b");
        assert!(Username::parse("").is_err());
        assert!(Username::parse("a b").is_err());
        assert!(Username::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn emails_and_phones_are_checked_for_shape() {
        assert!(Email::parse("a@example.com").is_ok());
        for bad in ["a", "a@b", "@b.c", "a@@b.c", "a b@c.d", "a@.c"] {
            assert!(Email::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            Phone::parse("+49 151 1234 5678").unwrap().as_str(),
            "+4915112345678"
        );
        assert!(Phone::parse("015112345678").is_err());
        assert!(Phone::parse("+12").is_err());
    }
}
