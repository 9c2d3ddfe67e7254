//! Switchyard: a sidecar that sits between applications and model servers
//! speaking the OpenAI HTTP API, routes each request to a pool through a
//! WebAssembly policy, and coalesces compatible requests into batches.
//!
//! The module tree is the architecture:
//!
//! - [`config`]: the TOML file, its defaults and validation;
//! - [`server`]: listeners, connections, admin port, shutdown;
//! - [`transparent`]: redirected connections, their original destination
//!   and the pool it belongs to;
//! - [`iptables`]: `switchyard iptables`, the rules that redirect them;
//! - [`app`]: the request path from body to answer;
//! - [`api`]: the OpenAI request shapes Switchyard interprets;
//! - [`routing`]: which pool serves a request (policy or model name);
//! - [`cascade`]: small-first answers, their review by the policy, and
//!   escalation;
//! - [`costs`]: the cost ledger (prices, totals, `/admin/costs`);
//! - [`coalesce`]: merging requests into upstream batches and splitting
//!   the answers;
//! - [`upstream`]: pools of model servers and pooled connections to them,
//!   with retries, outlier ejection, health checks and a circuit breaker;
//! - [`scaling`]: scale to zero: a pool's server lifecycle, the
//!   activator that holds requests while it starts, the idle timeout;
//! - [`local`]: pools served by the in-process executor
//!   (`switchyard-executor`);
//! - [`calibrate`]: `switchyard calibrate`, thresholds against a request set;
//! - [`plugin_test`]: `switchyard plugin test`, for plugin authors;
//! - [`reload`]: swapping the policy plugin while traffic flows;
//! - [`reconfigure`]: reloading the whole configuration (SIGHUP, file
//!   change, `POST /admin/reload`) and the admin token;
//! - [`metrics`]: metric names and the Prometheus recorder;
//! - [`error`]: the errors clients see, and their statuses;
//! - [`telemetry`]: log output;
//! - [`tls`]: certificates for the API listener and upstream TLS.

pub mod api;
pub mod app;
pub mod body;
pub mod calibrate;
pub mod cascade;
pub mod coalesce;
pub mod config;
pub mod connections;
pub mod costs;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod iptables;
pub mod local;
pub mod metrics;
pub mod plugin_test;
pub mod reconfigure;
pub mod reload;
pub mod routing;
pub mod scaling;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod transparent;
pub mod upstream;
