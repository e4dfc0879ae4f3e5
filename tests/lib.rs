//! End-to-end test crate: the tests live in `e2e/`, one binary so linking stays fast.
