//! Metric names, their descriptions and histogram buckets, and the
//! Prometheus recorder behind the admin port's `/metrics`.
//!
//! Label values are bounded: pool names from the configuration, endpoint
//! labels, status codes and error kinds; never request data.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_histogram, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use switchyard_policy::Endpoint;

pub const REQUESTS: &str = "switchyard_requests_total";
pub const REQUEST_DURATION: &str = "switchyard_request_duration_seconds";
pub const UPSTREAM_DURATION: &str = "switchyard_upstream_duration_seconds";
pub const BATCH_SIZE: &str = "switchyard_batch_size";
pub const POLICY_DURATION: &str = "switchyard_policy_decision_duration_seconds";
pub const POLICY_ERRORS: &str = "switchyard_policy_errors_total";

/// Request and upstream latency buckets, in seconds: from a cached 1 ms
/// answer to a five-minute generation.
const LATENCY_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Policy call buckets, in seconds: a warm call takes microseconds.
const POLICY_BUCKETS: [f64; 12] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 5e-3, 0.01, 0.05,
];

/// Items per upstream request.
const BATCH_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Installs the process-wide Prometheus recorder and describes every
/// metric. Call once, inside a tokio runtime: it starts the upkeep task.
pub fn install() -> Result<PrometheusHandle, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(POLICY_DURATION.to_string()), &POLICY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.to_string()), &BATCH_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(REQUEST_DURATION.to_string()),
                &LATENCY_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(UPSTREAM_DURATION.to_string()),
                &LATENCY_BUCKETS,
            )
        })
        .map_err(|e| format!("cannot configure metrics: {e}"))?;
    let handle = builder
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;

    describe();

    // Histograms are drained into their buckets by upkeep; without the
    // exporter's own HTTP listener, that is ours to schedule.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn describe() {
    describe_counter!(REQUESTS, "API requests answered, by pool and status");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "time from request to response headers"
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        Unit::Seconds,
        "time from sending upstream to the upstream's response headers"
    );
    describe_histogram!(BATCH_SIZE, "items per coalesced upstream request");
    describe_histogram!(
        POLICY_DURATION,
        Unit::Seconds,
        "time of one routing decision by the policy plugin"
    );
    describe_counter!(
        POLICY_ERRORS,
        "policy calls that failed and took the default route, by kind"
    );
}

/// Records an answered request. `pool` is "none" when it was not routed.
pub fn record_request(pool: &str, endpoint: &str, status: u16, elapsed: Duration) {
    let labels = [
        ("pool", pool.to_string()),
        ("endpoint", endpoint.to_string()),
        ("status", status.to_string()),
    ];
    counter!(REQUESTS, &labels).increment(1);
    let labels = [
        ("pool", pool.to_string()),
        ("endpoint", endpoint.to_string()),
    ];
    histogram!(REQUEST_DURATION, &labels).record(elapsed.as_secs_f64());
}

pub fn record_upstream(pool: &str, endpoint: Endpoint, elapsed: Duration) {
    let labels = [
        ("pool", pool.to_string()),
        ("endpoint", endpoint.label().to_string()),
    ];
    histogram!(UPSTREAM_DURATION, &labels).record(elapsed.as_secs_f64());
}

pub fn record_batch(pool: &str, endpoint: Endpoint, items: usize) {
    let labels = [
        ("pool", pool.to_string()),
        ("endpoint", endpoint.label().to_string()),
    ];
    histogram!(BATCH_SIZE, &labels).record(items as f64);
}

pub fn record_policy_call(plugin: &str, elapsed: Duration) {
    let labels = [("plugin", plugin.to_string())];
    histogram!(POLICY_DURATION, &labels).record(elapsed.as_secs_f64());
}

pub fn record_policy_error(plugin: &str, kind: &'static str) {
    let labels = [("plugin", plugin.to_string()), ("kind", kind.to_string())];
    counter!(POLICY_ERRORS, &labels).increment(1);
}
