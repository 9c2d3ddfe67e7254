//! Black-box tests of the `switchyard` binary.
//!
//! Each test starts its own fake upstream (`support::MockUpstream`) and its
//! own proxy process (`support::Switchyard`) on loopback ports the OS
//! picks, then asserts on what clients and upstreams see: routing,
//! coalescing, streaming, errors, metrics, logs and `switchyard check`.
//! Tests that need a policy plugin fail with "run `make plugins`" when it
//! is not built.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test reports failure by panicking"
)]

#[path = "support/mod.rs"]
mod support;

#[path = "proxy/adaptive.rs"]
mod adaptive;
#[path = "proxy/bench_floor.rs"]
mod bench_floor;
#[path = "proxy/cascade.rs"]
mod cascade;
#[path = "proxy/coalescing.rs"]
mod coalescing;
#[path = "proxy/config_check.rs"]
mod config_check;
#[path = "proxy/config_reload.rs"]
mod config_reload;
#[path = "proxy/costs.rs"]
mod costs;
#[path = "proxy/errors.rs"]
mod errors;
#[path = "proxy/faults.rs"]
mod faults;
#[path = "proxy/hot_swap.rs"]
mod hot_swap;
#[path = "proxy/limits.rs"]
mod limits;
#[path = "proxy/local.rs"]
mod local;
#[path = "proxy/logs.rs"]
mod logs;
#[path = "proxy/loops.rs"]
mod loops;
#[path = "proxy/merged_streams.rs"]
mod merged_streams;
#[path = "proxy/metrics.rs"]
mod metrics;
#[path = "proxy/plugin_cli.rs"]
mod plugin_cli;
#[path = "proxy/python_client.rs"]
mod python_client;
#[path = "proxy/resilience.rs"]
mod resilience;
#[path = "proxy/routing.rs"]
mod routing;
#[path = "proxy/scaling.rs"]
mod scaling;
#[path = "proxy/shutdown.rs"]
mod shutdown;
#[path = "proxy/streaming.rs"]
mod streaming;
#[path = "proxy/tls.rs"]
mod tls;
#[path = "proxy/transparent.rs"]
mod transparent;
