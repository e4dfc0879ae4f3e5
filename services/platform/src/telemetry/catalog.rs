//! Every metric twofold exports: its HELP text and unit (described once,
//! when the recorder is installed), and the counters each worker starts at
//! zero so that a rate or an alert has a series before the first event.

use metrics::Unit;
use twofold_domain::values::Method;

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Name, kind, unit and HELP text of every `twofold_*` metric.
const METRICS: &[(&str, Kind, Unit, &str)] = &[
    // The verifier (the application layer).
    (
        "twofold_sign_ins_total",
        Kind::Counter,
        Unit::Count,
        "Sign-in requests by outcome: signed_in, challenged, invalid_credentials, locked, throttled, no_method.",
    ),
    (
        "twofold_challenges_issued_total",
        Kind::Counter,
        Unit::Count,
        "Second-factor challenges issued, by method.",
    ),
    (
        "twofold_verifications_total",
        Kind::Counter,
        Unit::Count,
        "Code verifications by method (or backup_code, any) and outcome: verified, rejected, expired, locked.",
    ),
    (
        "twofold_lockouts_total",
        Kind::Counter,
        Unit::Count,
        "Accounts locked out after too many wrong codes.",
    ),
    (
        "twofold_password_checks_total",
        Kind::Counter,
        Unit::Count,
        "Password hashes checked (argon2id).",
    ),
    (
        "twofold_enrollments_total",
        Kind::Counter,
        Unit::Count,
        "Second-factor methods activated, by method.",
    ),
    (
        "twofold_users_created_total",
        Kind::Counter,
        Unit::Count,
        "Users created.",
    ),
    (
        "twofold_code_limit_reached_total",
        Kind::Counter,
        Unit::Count,
        "Requests for an email or SMS code refused because an hourly budget was spent, by budget.",
    ),
    (
        "twofold_audit_pruned_entries_total",
        Kind::Counter,
        Unit::Count,
        "Audit entries removed from the read models by the tenants' retention setting (the events stay).",
    ),
    (
        "twofold_audit_exports_refused_total",
        Kind::Counter,
        Unit::Count,
        "Audit exports refused because as many were streaming as audit_exports_at_once allows.",
    ),
    (
        "twofold_audit_exports_stalled_total",
        Kind::Counter,
        Unit::Count,
        "Audit exports cut short because their client took nothing for audit_export_idle_secs.",
    ),
    (
        "twofold_http_request_duration_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Time to answer an HTTP request, by route, method and status.",
    ),
    // The event store (every worker that appends).
    (
        "twofold_store_conflicts_total",
        Kind::Counter,
        Unit::Count,
        "Appends refused because the stream had moved on (decided again), by aggregate type.",
    ),
    (
        "twofold_store_batch_appends",
        Kind::Histogram,
        Unit::Count,
        "Appends the store's committer wrote in one statement.",
    ),
    // The relay.
    (
        "twofold_relay_published_total",
        Kind::Counter,
        Unit::Count,
        "Events published to JetStream and acknowledged.",
    ),
    (
        "twofold_dead_letters_total",
        Kind::Counter,
        Unit::Count,
        "Messages a consumer could not handle and parked in dead_letters, by consumer.",
    ),
    (
        "twofold_sms_circuit_open",
        Kind::Gauge,
        Unit::Count,
        "1 while an SMS provider's circuit is open or half-open (its codes go by email untried), by provider.",
    ),
    (
        "twofold_projection_unapplied_events",
        Kind::Gauge,
        Unit::Count,
        "Events in the event store a read-model builder has not applied yet, by builder.",
    ),
    (
        "twofold_relay_outbox_backlog",
        Kind::Gauge,
        Unit::Count,
        "Outbox rows not yet published.",
    ),
    (
        "twofold_relay_publish_batch_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Time to publish one batch of outbox rows, until every ack came back.",
    ),
    // The dispatcher.
    (
        "twofold_dispatcher_sent_total",
        Kind::Counter,
        Unit::Count,
        "Codes sent, by method and provider.",
    ),
    (
        "twofold_dispatcher_failed_total",
        Kind::Counter,
        Unit::Count,
        "Sends that failed (retried, fallen back or recorded as failed), by method and provider.",
    ),
    (
        "twofold_notices_sent_total",
        Kind::Counter,
        Unit::Count,
        "Security notices emailed to users, by notice.",
    ),
    (
        "twofold_notices_failed_total",
        Kind::Counter,
        Unit::Count,
        "Security notices that could not be sent on an attempt, by notice.",
    ),
    (
        "twofold_dispatcher_send_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Time a provider took to accept a code, by method.",
    ),
    (
        "twofold_dispatcher_in_flight",
        Kind::Gauge,
        Unit::Count,
        "Delivery jobs this instance is working on.",
    ),
    // The projector.
    (
        "twofold_projection_events_applied_total",
        Kind::Counter,
        Unit::Count,
        "Events applied to a read model, by builder.",
    ),
    (
        "twofold_projection_lag_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Time from an event's commit to its application to a read model, by builder.",
    ),
    (
        "twofold_projection_pending_events",
        Kind::Gauge,
        Unit::Count,
        "Events in the stream the projector's consumer has not yet been delivered (one count: the builders share it), by builder.",
    ),
    // Every process.
    (
        "twofold_build_info",
        Kind::Gauge,
        Unit::Count,
        "Always 1; the labels name the version (and the commit, when built with TWOFOLD_COMMIT set).",
    ),
    (
        "twofold_db_pool_connections",
        Kind::Gauge,
        Unit::Count,
        "Connections the worker's PostgreSQL pool holds (idle and in use), by worker.",
    ),
    (
        "twofold_db_pool_idle_connections",
        Kind::Gauge,
        Unit::Count,
        "Idle connections in the worker's PostgreSQL pool, by worker.",
    ),
    (
        "twofold_db_pool_max_connections",
        Kind::Gauge,
        Unit::Count,
        "Most connections the worker's PostgreSQL pool may open, by worker.",
    ),
    (
        "twofold_nats_connected",
        Kind::Gauge,
        Unit::Count,
        "1 while the worker's NATS connection is up, 0 while it is disconnected or connecting, by worker.",
    ),
];

/// Buckets of `twofold_store_batch_appends` (appends per statement).
pub(super) const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Buckets of every `*_seconds` histogram.
pub(super) const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The names of every `twofold_*` metric (for tests and tools).
pub fn names() -> impl Iterator<Item = &'static str> {
    METRICS.iter().map(|m| m.0)
}

/// HELP text and units of every metric, and the build-info gauge.
pub(super) fn describe() {
    for &(name, kind, unit, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, unit, help),
            Kind::Gauge => metrics::describe_gauge!(name, unit, help),
            Kind::Histogram => metrics::describe_histogram!(name, unit, help),
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    match option_env!("TWOFOLD_COMMIT") {
        Some(commit) => {
            metrics::gauge!("twofold_build_info", "version" => version, "commit" => commit).set(1.0)
        }
        None => metrics::gauge!("twofold_build_info", "version" => version).set(1.0),
    }
}

/// What a `worker` counts, at zero (adding zero leaves a running count as
/// it is, so this may run again, or for several workers of one process).
pub fn register_zeros(worker: &str) {
    match worker {
        "verifier" => {
            for outcome in [
                "signed_in",
                "challenged",
                "invalid_credentials",
                "locked",
                "throttled",
                "no_method",
            ] {
                metrics::counter!("twofold_sign_ins_total", "outcome" => outcome).increment(0);
            }
            for method in Method::ALL {
                metrics::counter!("twofold_challenges_issued_total", "method" => method.as_str())
                    .increment(0);
            }
            metrics::counter!("twofold_enrollments_total", "method" => Method::Totp.as_str())
                .increment(0);
            let proofs = Method::ALL.map(|m| m.as_str());
            for method in proofs.iter().copied().chain(["backup_code"]) {
                for outcome in ["verified", "rejected"] {
                    metrics::counter!("twofold_verifications_total", "method" => method, "outcome" => outcome)
                        .increment(0);
                }
            }
            for outcome in ["expired", "locked"] {
                metrics::counter!("twofold_verifications_total", "method" => "any", "outcome" => outcome)
                    .increment(0);
            }
            metrics::counter!("twofold_lockouts_total").increment(0);
            metrics::counter!("twofold_password_checks_total").increment(0);
            metrics::counter!("twofold_users_created_total").increment(0);
            metrics::counter!("twofold_audit_pruned_entries_total").increment(0);
            metrics::counter!("twofold_audit_exports_refused_total").increment(0);
            metrics::counter!("twofold_audit_exports_stalled_total").increment(0);
            for budget in [
                "codes_per_account",
                "codes_per_recipient",
                "codes_per_address",
            ] {
                metrics::counter!("twofold_code_limit_reached_total", "budget" => budget)
                    .increment(0);
            }
            for aggregate in ["user", "tenant"] {
                metrics::counter!("twofold_store_conflicts_total", "aggregate" => aggregate)
                    .increment(0);
            }
        }
        "relay" => {
            metrics::counter!("twofold_relay_published_total").increment(0);
            metrics::gauge!("twofold_relay_outbox_backlog").increment(0.0);
        }
        "dispatcher" => {
            metrics::counter!("twofold_dispatcher_sent_total", "method" => "email", "provider" => "smtp")
                .increment(0);
            metrics::counter!("twofold_dispatcher_failed_total", "method" => "email", "provider" => "smtp")
                .increment(0);
            metrics::gauge!("twofold_dispatcher_in_flight").increment(0.0);
            metrics::counter!("twofold_dead_letters_total", "consumer" => "dispatcher")
                .increment(0);
            for notice in [
                "recovery_codes_regenerated",
                "recovery_code_used",
                "authenticator_added",
                "authenticator_removed",
                "enrollment_reset",
                "contact_changed",
                "password_changed",
                "password_reset",
                "password_reset_link",
                "unlocked",
                "locked_out",
                "new_device_sign_in",
            ] {
                metrics::counter!("twofold_notices_sent_total", "notice" => notice).increment(0);
                metrics::counter!("twofold_notices_failed_total", "notice" => notice).increment(0);
            }
            for aggregate in ["user", "delivery"] {
                metrics::counter!("twofold_store_conflicts_total", "aggregate" => aggregate)
                    .increment(0);
            }
        }
        "projector" => {
            // The builders' names (`twofold_projections::store::Builder`).
            for builder in ["directory", "audit"] {
                metrics::counter!("twofold_projection_events_applied_total", "builder" => builder)
                    .increment(0);
            }
            metrics::counter!("twofold_dead_letters_total", "consumer" => "projector").increment(0);
        }
        _ => {}
    }
}

/// SMS providers the dispatcher may send through, counted from zero too.
pub fn register_sms_providers<'a>(providers: impl IntoIterator<Item = &'a String>) {
    for provider in providers {
        for name in [
            "twofold_dispatcher_sent_total",
            "twofold_dispatcher_failed_total",
        ] {
            metrics::counter!(name, "method" => "sms", "provider" => provider.clone()).increment(0);
        }
    }
}
