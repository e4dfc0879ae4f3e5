//! Infrastructure shared by the twofold workers: configuration, the PostgreSQL
//! event store, secret handling (passwords, TOTP seeds, codes, tokens), the
//! clock, and Prometheus metrics. The domain stays pure; this is where I/O lives.

pub mod clock;
pub mod config;
pub mod crypto;
pub mod db;
pub mod jetstream;
pub mod password;
pub mod qr;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod totp;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::Config;
