//! The routing policy host: loads a WebAssembly policy plugin with
//! wasmtime, sandboxes it, and answers `route` calls for the request path.
//!
//! Owns the plugin's engine, compiled module or component and warm
//! instances. It must
//! not touch pools, HTTP or metrics of the request path beyond the policy's
//! own counters: callers hand it plain data and get plain data back.
//!
//! Plugins are written with the `switchyard-sdk` crate, which builds a
//! core module against `switchyard:policy@0.4.0` (`bindings/v4.rs` has
//! the interface) for `wasm32-unknown-unknown`, and a component against
//! `sdk/wit/policy.wit` (`switchyard:policy@0.3.0`) for `wasm32-wasip2`.
//! Components built against 0.2.0 still load (`proxy/policy/wit-0.2`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use switchyard_policy::{Endpoint, Policy, PolicySettings, RouteRequest};
//!
//! let settings = PolicySettings::new("target/wasm32-unknown-unknown/release/cost_router.wasm");
//! let policy = Policy::load(&settings)?;
//! let req = Arc::new(RouteRequest::new(Endpoint::ChatCompletions, "auto"));
//! let outcome = policy.route(&req)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Sandbox: each instance runs in its own store. A core module can import
//! only the four functions of 0.4.0; a component gets an empty WASI
//! context (no files, environment, arguments or sockets; stdout and
//! stderr are discarded). Both get a memory cap (`max_memory_bytes`) and a per-call deadline
//! (`timeout_ms`) enforced by epoch interruption. An instance that traps
//! or times out is dropped, never reused.

use std::path::PathBuf;

pub use crate::endpoint::Endpoint;
pub use crate::error::{CallError, LoadError};
pub use crate::policy::Policy;
pub use crate::request::{Message, OwnedContent, RequestContent, RouteRequest};

/// The interface version the SDK builds for `wasm32-unknown-unknown`: a
/// core module (for `wasm32-wasip2` it builds a 0.3.0 component).
pub const INTERFACE_VERSION: &str = "switchyard:policy@0.4.0";

/// Every interface version a plugin may be built against, newest first.
pub const SUPPORTED_INTERFACES: [&str; 3] = [
    INTERFACE_VERSION,
    "switchyard:policy@0.3.0",
    "switchyard:policy@0.2.0",
];

mod bindings;
mod endpoint;
mod error;
pub mod fixtures;
mod linker;
mod policy;
mod request;
mod state;
mod ticker;

/// Default of [`PolicySettings::timeout_ms`]: 50 ms.
pub const DEFAULT_TIMEOUT_MS: u64 = 50;

/// Default of [`PolicySettings::max_memory_bytes`]: 64 MiB.
pub const DEFAULT_MAX_MEMORY_BYTES: u64 = 64 * 1024 * 1024;

/// Settings for the policy host, from the `[policy]` table.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    /// Path of the compiled plugin (`.wasm` component).
    pub plugin: PathBuf,
    /// Plugin configuration, handed to its `init` as JSON. An absent
    /// `[policy.config]` table should be an empty object.
    pub config: serde_json::Value,
    /// Wall-clock budget of one `route` call into the plugin, in
    /// milliseconds, resolved to a tenth of it (at least 1 ms, at most
    /// 10 ms). `init` of each new instance gets
    /// this or 1000 ms, whichever is longer. Must be at least 1. Default is
    /// 50 ms ([`DEFAULT_TIMEOUT_MS`]).
    pub timeout_ms: u64,
    /// Largest linear memory one plugin instance may grow to, in bytes.
    /// Must be at least 1; a Rust plugin needs about 2 MiB. Default is
    /// 64 MiB ([`DEFAULT_MAX_MEMORY_BYTES`]).
    pub max_memory_bytes: u64,
}

impl PolicySettings {
    /// Settings for `plugin` with an empty config and default limits.
    pub fn new(plugin: impl Into<PathBuf>) -> Self {
        PolicySettings {
            plugin: plugin.into(),
            config: serde_json::Value::Object(serde_json::Map::new()),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            max_memory_bytes: DEFAULT_MAX_MEMORY_BYTES,
        }
    }

    /// Replaces the plugin configuration.
    pub fn with_config(mut self, config: serde_json::Value) -> Self {
        self.config = config;
        self
    }

    /// Replaces the per-call budget, in milliseconds.
    pub fn with_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = timeout_ms;
        self
    }

    /// Replaces the per-instance memory cap, in bytes.
    pub fn with_max_memory_bytes(mut self, max_memory_bytes: u64) -> Self {
        self.max_memory_bytes = max_memory_bytes;
        self
    }
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteOutcome {
    /// Send the request to a pool.
    Route(RouteDecision),
    /// Answer the client with an error. `status` is always 400..=599 (the
    /// host turns anything else into 500).
    Reject { status: u16, message: String },
}

/// Where the policy sends a request.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision {
    /// Name of the pool that serves the request.
    pub pool: String,
    /// Upper bound on `max_tokens`; the smaller of this and the client's
    /// value is sent upstream.
    pub max_tokens_cap: Option<u32>,
    /// Small-first: `pool` answers first, [`Policy::review`] judges the
    /// answer, and an escalation without a pool of its own goes here.
    pub escalate_to: Option<String>,
    /// The plugin's hints, in order (`switchyard.system-instruction`, ...).
    pub attributes: Vec<(String, String)>,
}

impl RouteDecision {
    /// The value of the first attribute called `key`.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Summary of an answer's per-token log-probabilities (natural log).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LogprobSummary {
    /// Mean; 0 with no tokens.
    pub mean: f32,
    /// Lowest; 0 with no tokens.
    pub min: f32,
    /// Share (0 to 1) of tokens below `threshold`.
    pub share_below: f32,
    /// The threshold of `share_below`.
    pub threshold: f32,
}

impl LogprobSummary {
    /// Summarises `logprobs`, counting those below `threshold`.
    pub fn of(logprobs: &[f32], threshold: f32) -> Self {
        if logprobs.is_empty() {
            return LogprobSummary {
                threshold,
                ..LogprobSummary::default()
            };
        }
        let count = logprobs.len() as f32;
        let sum: f32 = logprobs.iter().sum();
        let min = logprobs.iter().copied().fold(f32::INFINITY, f32::min);
        let below = logprobs.iter().filter(|&&l| l < threshold).count() as f32;
        LogprobSummary {
            mean: sum / count,
            min,
            share_below: below / count,
            threshold,
        }
    }
}

/// The small pool's answer, as [`Policy::review`] hands it to the plugin.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReviewAnswer {
    /// The pool that answered.
    pub pool: String,
    /// The first choice's text.
    pub text: String,
    /// `stop`, `length`, ..., or empty when partial or unknown.
    pub finish_reason: String,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Log-probability of each generated token.
    pub token_logprobs: Vec<f32>,
    /// Summary of `token_logprobs`.
    pub summary: LogprobSummary,
    /// Time the small pool took, in milliseconds.
    pub latency_ms: u32,
    /// Only the first tokens of a streamed answer.
    pub partial: bool,
}

/// The plugin's judgement of a small answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Give the client the small answer.
    Accept,
    /// Ask another pool: `pool` (empty for the route's `escalate_to`),
    /// for `reason`.
    Escalate { pool: String, reason: String },
}
