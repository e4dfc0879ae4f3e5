//! Opaque bearer tokens: a kind prefix, then base64url of (user id, item id,
//! 256 random bits). The ids route the token to the user's stream; only the
//! hash of the whole token is stored.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use twofold_domain::secrets::SecretHash;
use twofold_domain::UserId;
use uuid::Uuid;

use crate::crypto::token_hash;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A session, after a completed sign-in.
    Session,
    /// A half-finished sign-in waiting for its second factor.
    Challenge,
    /// A remembered device, after a sign-in completed with a second factor.
    Device,
}

impl TokenKind {
    fn prefix(&self) -> &'static str {
        match self {
            TokenKind::Session => "tfs_",
            TokenKind::Challenge => "tfc_",
            TokenKind::Device => "tfd_",
        }
    }
}

/// What a presented token names, and the hash to compare with the stored one.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenClaim {
    pub user_id: UserId,
    pub item: Uuid,
    pub hash: SecretHash,
}

/// A new token for `item` of `user_id`: the token itself (shown once) and its hash.
pub fn issue(kind: TokenKind, user_id: UserId, item: Uuid) -> (SecretString, SecretHash) {
    let mut raw = Vec::with_capacity(64);
    raw.extend_from_slice(user_id.as_uuid().as_bytes());
    raw.extend_from_slice(item.as_bytes());
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    raw.extend_from_slice(&secret);
    let token = format!("{}{}", kind.prefix(), URL_SAFE_NO_PAD.encode(&raw));
    (SecretString::from(token), token_hash(&raw))
}

/// Reads a presented token of `kind`; `None` when it is not one.
pub fn parse(kind: TokenKind, token: &SecretString) -> Option<TokenClaim> {
    let body = token.expose_secret().strip_prefix(kind.prefix())?;
    let raw = URL_SAFE_NO_PAD.decode(body).ok()?;
    if raw.len() != 64 {
        return None;
    }
    let user = Uuid::from_slice(&raw[..16]).ok()?;
    let item = Uuid::from_slice(&raw[16..32]).ok()?;
    Some(TokenClaim {
        user_id: UserId(user),
        item,
        hash: token_hash(&raw),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_parses_back_to_its_ids_and_hash() {
        let user = UserId(Uuid::new_v4());
        let item = Uuid::new_v4();
        let (token, hash) = issue(TokenKind::Session, user, item);
        let claim = parse(TokenKind::Session, &token).unwrap();
        assert_eq!(claim.user_id, user);
        assert_eq!(claim.item, item);
        assert!(claim.hash.matches(&hash));
        assert!(parse(TokenKind::Challenge, &token).is_none());
        assert!(parse(
            TokenKind::Session,
            &SecretString::from("tfs_xyz".to_string())
        )
        .is_none());
    }

    #[test]
    fn tokens_differ_and_the_hash_is_not_the_token() {
        let user = UserId(Uuid::new_v4());
        let (a, ha) = issue(TokenKind::Session, user, Uuid::nil());
        let (b, _) = issue(TokenKind::Session, user, Uuid::nil());
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert!(!a.expose_secret().contains(&ha.0));
    }
}
