//! The HTTP routes of the verifier.

pub mod admin;
pub mod auth;
pub mod me;
pub mod reports;
