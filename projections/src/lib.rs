//! Read models of twofold, built from the events: the user directory, the
//! Overview (live, at any past moment, and day by day), and the audit history
//! with tamper-evident exports. Builders apply each event once, storing their
//! position with the update; `rebuild` replays the event store into fresh
//! read models.

pub mod as_of;
pub mod audit;
pub mod checkpoints;
pub mod consumer;
pub mod days;
pub mod directory;
pub mod overview;
pub mod overview_counts;
pub mod queries;
pub mod rebuild;
pub mod record;
pub mod retention;
pub mod store;
