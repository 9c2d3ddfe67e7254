//! Metric names, their descriptions and histogram buckets, and the
//! Prometheus recorder behind the admin port's `/metrics`.
//!
//! Label values are bounded: pool names from the configuration, endpoint
//! labels, status codes and error kinds; never request data.

use std::cell::RefCell;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Histogram,
    Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use switchyard_policy::Endpoint;

pub const REQUESTS: &str = "switchyard_requests_total";
pub const REQUEST_DURATION: &str = "switchyard_request_duration_seconds";
pub const UPSTREAM_DURATION: &str = "switchyard_upstream_duration_seconds";
pub const BATCH_SIZE: &str = "switchyard_batch_size";
pub const BATCH_TOKENS: &str = "switchyard_batch_tokens";
pub const BATCHES: &str = "switchyard_batches_total";
pub const QUEUE_WAIT: &str = "switchyard_queue_wait_seconds";
pub const QUEUE_DEPTH: &str = "switchyard_queue_depth";
pub const COST_FIXED: &str = "switchyard_batch_cost_fixed_seconds";
pub const COST_PER_ITEM: &str = "switchyard_batch_cost_per_item_seconds";
pub const COLLAPSED: &str = "switchyard_collapsed_items_total";
pub const REJECTED: &str = "switchyard_rejected_requests_total";
pub const POLICY_DURATION: &str = "switchyard_policy_decision_duration_seconds";
pub const POLICY_ERRORS: &str = "switchyard_policy_errors_total";
pub const CASCADE_REVIEWS: &str = "switchyard_cascade_reviews_total";
pub const COST: &str = "switchyard_cost_usd_total";
pub const BASELINE_COST: &str = "switchyard_baseline_cost_usd_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "switchyard_tls_handshake_failures_total";
pub const TLS_RELOADS: &str = "switchyard_tls_certificate_reloads_total";
pub const CONFIG_RELOADS: &str = "switchyard_config_reloads_total";
pub const CONNECTIONS_OPEN: &str = "switchyard_connections_open";
pub const CONNECTIONS_REJECTED: &str = "switchyard_connections_rejected_total";
pub const WRITE_TIMEOUTS: &str = "switchyard_client_write_timeouts_total";
pub const ENDPOINT_HEALTHY: &str = "switchyard_upstream_endpoint_healthy";
pub const EJECTIONS: &str = "switchyard_upstream_ejections_total";
pub const RETRIES: &str = "switchyard_upstream_retries_total";
pub const RETRIES_DENIED: &str = "switchyard_upstream_retries_denied_total";
pub const CIRCUIT_STATE: &str = "switchyard_upstream_circuit_state";
pub const CAPTURED_CONNECTIONS: &str = "switchyard_captured_connections_total";
pub const CAPTURE_FAILURES: &str = "switchyard_capture_failures_total";
pub const POOL_STATE: &str = "switchyard_pool_state";
pub const POOL_COLD_STARTS: &str = "switchyard_pool_cold_starts_total";
pub const POOL_COLD_START_DURATION: &str = "switchyard_pool_cold_start_seconds";
pub const POOL_FALLBACKS: &str = "switchyard_pool_fallbacks_total";
pub const POOL_DESIRED_REPLICAS: &str = "switchyard_pool_desired_replicas";
pub const POOL_FAILED_STARTS: &str = "switchyard_pool_failed_starts_total";
pub const POOL_HELD_REFUSED: &str = "switchyard_pool_held_refused_total";

// Recorded by the executor of `local` pools (switchyard-executor).
pub const EXECUTOR_TOKENS: &str = "switchyard_executor_tokens_generated_total";
pub const EXECUTOR_TOKENS_PER_SECOND: &str = "switchyard_executor_tokens_per_second";
pub const EXECUTOR_BATCH_SIZE: &str = "switchyard_executor_batch_size";
pub const EXECUTOR_RUNNING: &str = "switchyard_executor_running";
pub const EXECUTOR_QUEUE_DEPTH: &str = "switchyard_executor_queue_depth";
pub const EXECUTOR_TTFT: &str = "switchyard_executor_time_to_first_token_seconds";
pub const EXECUTOR_STEP: &str = "switchyard_executor_step_seconds";

/// Request and upstream latency buckets, in seconds: from a cached 1 ms
/// answer to a five-minute generation.
const LATENCY_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Policy call buckets, in seconds: a warm call takes microseconds, and
/// the target for a decision inside a request is under 20 us, so the
/// buckets are finest there.
const POLICY_BUCKETS: [f64; 20] = [
    1e-6, 2e-6, 3e-6, 4e-6, 5e-6, 7.5e-6, 1e-5, 1.25e-5, 1.5e-5, 2e-5, 2.5e-5, 3e-5, 4e-5, 5e-5,
    1e-4, 2.5e-4, 1e-3, 5e-3, 0.01, 0.05,
];

/// Items per upstream request.
const BATCH_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Estimated tokens per upstream request.
const TOKEN_BUCKETS: [f64; 12] = [
    16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0, 131072.0,
    262144.0,
];

/// Installs the process-wide Prometheus recorder and describes every
/// metric. Call once, inside a tokio runtime: it starts the upkeep task.
pub fn install() -> Result<PrometheusHandle, String> {
    let buckets: [(&str, &[f64]); 10] = [
        (POLICY_DURATION, &POLICY_BUCKETS),
        (BATCH_SIZE, &BATCH_BUCKETS),
        (BATCH_TOKENS, &TOKEN_BUCKETS),
        (QUEUE_WAIT, &LATENCY_BUCKETS),
        (REQUEST_DURATION, &LATENCY_BUCKETS),
        (UPSTREAM_DURATION, &LATENCY_BUCKETS),
        (EXECUTOR_BATCH_SIZE, &BATCH_BUCKETS),
        (EXECUTOR_TTFT, &LATENCY_BUCKETS),
        (EXECUTOR_STEP, &LATENCY_BUCKETS),
        (POOL_COLD_START_DURATION, &LATENCY_BUCKETS),
    ];
    let mut builder = PrometheusBuilder::new();
    for (name, values) in buckets {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), values)
            .map_err(|e| format!("cannot configure metrics: {e}"))?;
    }
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
    describe_gauge!(
        POOL_STATE,
        "1 for a scaled pool's current lifecycle state (cold, starting, \
         ready, draining), 0 for the others"
    );
    describe_counter!(POOL_COLD_STARTS, "starts of a scaled pool's server");
    describe_histogram!(
        POOL_COLD_START_DURATION,
        Unit::Seconds,
        "time from starting a scaled pool's server to its first passed probe"
    );
    describe_counter!(
        POOL_FALLBACKS,
        "requests for a scaled pool that its fallback pool answered"
    );
    describe_gauge!(
        POOL_DESIRED_REPLICAS,
        "servers a scaled pool wants running (0 when cold, up to max_replicas)"
    );
    describe_counter!(
        POOL_FAILED_STARTS,
        "starts of a scaled pool's server that failed or timed out"
    );
    describe_counter!(
        POOL_HELD_REFUSED,
        "requests for a scaled pool refused because max_held requests waited"
    );
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
        BATCH_TOKENS,
        "estimated tokens per coalesced upstream request"
    );
    describe_counter!(
        BATCHES,
        "coalesced upstream requests, by why they were sent (full, window, deadline, idle)"
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "time a request waited in a pool's queue before going upstream"
    );
    describe_gauge!(QUEUE_DEPTH, "requests waiting in a pool's queue");
    describe_gauge!(
        COST_FIXED,
        Unit::Seconds,
        "fitted fixed cost of one upstream request (a in a + b x items)"
    );
    describe_gauge!(
        COST_PER_ITEM,
        Unit::Seconds,
        "fitted cost of each item of an upstream request (b in a + b x items)"
    );
    describe_counter!(
        COLLAPSED,
        "items not sent upstream because an identical one in the batch was"
    );
    describe_counter!(
        REJECTED,
        "requests a pool's queue turned away, by reason (queue_full, deadline, unavailable)"
    );
    describe_histogram!(
        POLICY_DURATION,
        Unit::Seconds,
        "time of one routing decision by the policy plugin"
    );
    describe_counter!(
        POLICY_ERRORS,
        "policy calls that failed, by kind (handled as policy.on_error says)"
    );
    describe_counter!(
        CASCADE_REVIEWS,
        "small-first answers reviewed, by small pool, verdict, reason and shadow"
    );
    describe_gauge!(
        COST,
        "dollars the answers of a pool cost at its price, since start (only grows)"
    );
    describe_gauge!(
        BASELINE_COST,
        "dollars the answers a pool served would have cost on [costs] baseline, since start"
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        "client connections open on the API and transparent listeners"
    );
    describe_counter!(
        CONNECTIONS_REJECTED,
        "API connections closed on accept, by the limit that was full \
         (max_connections, max_connections_per_ip)"
    );
    describe_counter!(
        CAPTURED_CONNECTIONS,
        "connections redirected to the transparent listener, by the pool \
         their original destination belongs to"
    );
    describe_counter!(
        CAPTURE_FAILURES,
        "connections on the transparent listener that no pool serves, by \
         reason (unknown_destination, not_redirected, tls)"
    );
    describe_counter!(
        WRITE_TIMEOUTS,
        "client connections closed because the client stopped reading its \
         response for server.write_timeout_ms"
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes on the API listener that failed, by reason \
         (timeout, closed, refused)"
    );
    describe_counter!(
        TLS_RELOADS,
        "changes of the API listener's certificate files, by result (ok, \
         error: the previous certificate is kept)"
    );
    describe_gauge!(
        ENDPOINT_HEALTHY,
        "1 while an upstream endpoint may be chosen, 0 while it is ejected \
         or failing its health checks"
    );
    describe_counter!(
        EJECTIONS,
        "upstream endpoints ejected after failures in a row"
    );
    describe_counter!(
        RETRIES,
        "requests that never reached an upstream and went to another \
         endpoint, by reason (connect, refused_stream)"
    );
    describe_counter!(
        RETRIES_DENIED,
        "retries not made, by reason (budget: the pool's retry budget was spent)"
    );
    describe_gauge!(
        CIRCUIT_STATE,
        "a pool's circuit breaker: 0 closed, 1 half-open, 2 open"
    );
    describe_counter!(
        CONFIG_RELOADS,
        "reloads of the configuration file (SIGHUP, file change, POST \
         /admin/reload), by result (ok, error: the previous configuration \
         keeps serving)"
    );
    describe_counter!(
        EXECUTOR_TOKENS,
        "tokens generated by a local pool's executor"
    );
    describe_gauge!(
        EXECUTOR_TOKENS_PER_SECOND,
        "tokens a local pool's executor generated per second, over about the last second"
    );
    describe_histogram!(
        EXECUTOR_BATCH_SIZE,
        "sequences decoded in one executor step"
    );
    describe_gauge!(
        EXECUTOR_RUNNING,
        "sequences in a local pool's running batch"
    );
    describe_gauge!(
        EXECUTOR_QUEUE_DEPTH,
        "requests waiting for a local pool's running batch"
    );
    describe_histogram!(
        EXECUTOR_TTFT,
        Unit::Seconds,
        "time from a local pool accepting a request to its first token"
    );
    describe_histogram!(EXECUTOR_STEP, Unit::Seconds, "time of one executor step");
}

/// Publishes whether an upstream endpoint may be chosen.
pub fn record_endpoint_healthy(pool: &str, endpoint: &str, healthy: bool) {
    let labels = [
        ("pool", pool.to_string()),
        ("endpoint", endpoint.to_string()),
    ];
    gauge!(ENDPOINT_HEALTHY, &labels).set(if healthy { 1.0 } else { 0.0 });
}

pub fn record_ejection(pool: &str, endpoint: &str) {
    let labels = [
        ("pool", pool.to_string()),
        ("endpoint", endpoint.to_string()),
    ];
    counter!(EJECTIONS, &labels).increment(1);
}

pub fn record_retry(pool: &str, reason: &'static str) {
    let labels = [("pool", pool.to_string()), ("reason", reason.to_string())];
    counter!(RETRIES, &labels).increment(1);
}

pub fn record_retry_denied(pool: &str, reason: &'static str) {
    let labels = [("pool", pool.to_string()), ("reason", reason.to_string())];
    counter!(RETRIES_DENIED, &labels).increment(1);
}

/// Publishes whether a scaled pool is in `state` now.
pub fn record_pool_state(pool: &str, state: &'static str, current: bool) {
    let labels = [("pool", pool.to_string()), ("state", state.to_string())];
    gauge!(POOL_STATE, &labels).set(if current { 1.0 } else { 0.0 });
}

pub fn record_pool_desired_replicas(pool: &str, replicas: u32) {
    gauge!(POOL_DESIRED_REPLICAS, &[("pool", pool.to_string())]).set(f64::from(replicas));
}

pub fn record_pool_cold_start(pool: &str) {
    counter!(POOL_COLD_STARTS, &[("pool", pool.to_string())]).increment(1);
}

pub fn record_pool_cold_start_duration(pool: &str, took: Duration) {
    histogram!(POOL_COLD_START_DURATION, &[("pool", pool.to_string())]).record(took.as_secs_f64());
}

pub fn record_pool_failed_start(pool: &str) {
    counter!(POOL_FAILED_STARTS, &[("pool", pool.to_string())]).increment(1);
}

pub fn record_pool_held_refused(pool: &str) {
    counter!(POOL_HELD_REFUSED, &[("pool", pool.to_string())]).increment(1);
}

pub fn record_pool_fallback(pool: &str) {
    counter!(POOL_FALLBACKS, &[("pool", pool.to_string())]).increment(1);
}

/// Publishes a circuit breaker's state: 0 closed, 1 half-open, 2 open.
pub fn record_circuit_state(pool: &str, state: u8) {
    gauge!(CIRCUIT_STATE, &[("pool", pool.to_string())]).set(f64::from(state));
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

fn pool_labels(pool: &str, endpoint: Endpoint) -> [(&'static str, String); 2] {
    [
        ("pool", pool.to_string()),
        ("endpoint", endpoint.label().to_string()),
    ]
}

/// Records one coalesced upstream request: its estimated tokens and why
/// it was sent.
pub fn record_dispatch(pool: &str, endpoint: Endpoint, tokens: u64, reason: &'static str) {
    histogram!(BATCH_TOKENS, &pool_labels(pool, endpoint)).record(tokens as f64);
    let [pool, endpoint] = pool_labels(pool, endpoint);
    counter!(BATCHES, &[pool, endpoint, ("reason", reason.to_string())]).increment(1);
}

pub fn record_queue_wait(pool: &str, endpoint: Endpoint, waited: Duration) {
    histogram!(QUEUE_WAIT, &pool_labels(pool, endpoint)).record(waited.as_secs_f64());
}

pub fn record_queue_depth(pool: &str, requests: usize) {
    gauge!(QUEUE_DEPTH, &[("pool", pool.to_string())]).set(requests as f64);
}

/// Publishes a lane's fitted cost, `a + b × items` seconds.
pub fn record_cost_model(pool: &str, endpoint: Endpoint, a: f64, b: f64) {
    gauge!(COST_FIXED, &pool_labels(pool, endpoint)).set(a);
    gauge!(COST_PER_ITEM, &pool_labels(pool, endpoint)).set(b);
}

pub fn record_collapsed(pool: &str, endpoint: Endpoint, items: usize) {
    counter!(COLLAPSED, &pool_labels(pool, endpoint)).increment(items as u64);
}

pub fn record_rejected(pool: &str, endpoint: Endpoint, reason: &'static str) {
    let [pool, endpoint] = pool_labels(pool, endpoint);
    counter!(REJECTED, &[pool, endpoint, ("reason", reason.to_string())]).increment(1);
}

/// Records one policy call of `plugin` that took `elapsed`.
pub fn record_policy_call(plugin: &str, elapsed: Duration) {
    // Every request with a policy records here, so each thread looks a
    // plugin's histogram up once rather than per call (which builds its
    // labels and searches the registry). The recorder is installed before
    // any request is served, so no cached handle predates it.
    thread_local! {
        static DECISIONS: RefCell<Vec<(String, Histogram)>> = const { RefCell::new(Vec::new()) };
    }
    let seconds = elapsed.as_secs_f64();
    DECISIONS.with_borrow_mut(|cached| {
        if let Some((_, decisions)) = cached.iter().find(|(name, _)| name == plugin) {
            decisions.record(seconds);
            return;
        }
        let decisions = histogram!(POLICY_DURATION, "plugin" => plugin.to_string());
        decisions.record(seconds);
        cached.push((plugin.to_string(), decisions));
    });
}

pub fn record_policy_error(plugin: &str, kind: &'static str) {
    let labels = [("plugin", plugin.to_string()), ("kind", kind.to_string())];
    counter!(POLICY_ERRORS, &labels).increment(1);
}

/// Records a cascade review. `reason` is the plugin's (empty on accept).
// Limitation: the reason comes from the plugin; a plugin that puts request
// data in it makes the label set unbounded. It is cut to 32 bytes.
pub fn record_review(pool: &str, verdict: &'static str, reason: &str, shadow: bool) {
    let mut reason = reason.to_string();
    if reason.len() > 32 {
        let mut end = 32;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let labels = [
        ("pool", pool.to_string()),
        ("verdict", verdict.to_string()),
        ("reason", reason),
        ("shadow", shadow.to_string()),
    ];
    counter!(CASCADE_REVIEWS, &labels).increment(1);
}

/// Sets a pool's running cost total, in dollars.
// Metric counters of the `metrics` crate count integers; dollars are
// fractional, so the running total is a gauge that only grows.
pub fn record_cost(pool: &str, total_usd: f64) {
    gauge!(COST, "pool" => pool.to_string()).set(total_usd);
}

/// Adds `usd` to the baseline cost of answers `pool` served.
pub fn record_baseline_cost(pool: &str, usd: f64) {
    gauge!(BASELINE_COST, "pool" => pool.to_string()).increment(usd);
}
