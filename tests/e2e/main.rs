//! End-to-end tests: the verifier runs in-process on its own port, against a
//! fresh PostgreSQL database per test, driven over HTTP like a portal would.
//! One test binary, so linking stays fast.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod browser;
mod helpers;

mod admin_http;
mod audit_checkpoints;
mod audit_reads;
mod audit_signed;
mod budgets;
mod console;
mod delivery;
mod erasure;
mod guarantees;
mod keep_alive;
mod metrics;
mod nats;
mod nats_cluster;
mod notices;
mod openapi;
mod pages;
mod policy_http;
mod reliability;
mod reports;
mod retention;
mod sign_in;
mod store;
mod totp;
