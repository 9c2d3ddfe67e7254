//! The routing policy host: loads a WebAssembly policy component with
//! wasmtime, sandboxes it, and answers `route` calls for the request path.
//!
//! Owns the plugin's engine, compiled component and warm instances. It must
//! not touch pools, HTTP or metrics of the request path beyond the policy's
//! own counters: callers hand it plain data and get plain data back.

use std::path::PathBuf;

pub use crate::endpoint::Endpoint;

mod endpoint;

/// Settings for the policy host, from the `[policy]` table.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    /// Path of the compiled plugin (`.wasm` component).
    pub plugin: PathBuf,
    /// Plugin configuration, handed to its `init` as JSON.
    pub config: serde_json::Value,
    /// Wall-clock budget of one call into the plugin, in milliseconds.
    pub timeout_ms: u64,
    /// Largest linear memory one plugin instance may grow to, in bytes.
    pub max_memory_bytes: u64,
}

/// One chat message as the policy sees it.
#[derive(Debug, Clone)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What the policy is told about a request.
#[derive(Debug, Clone)]
pub struct RouteRequest {
    pub endpoint: Endpoint,
    /// The `model` field as the client sent it.
    pub model: String,
    /// Chat messages (chat completions only).
    pub messages: Vec<Message>,
    /// Prompt items (completions) or inputs (embeddings) given as text.
    pub prompt: Vec<String>,
    /// Characters in all messages, prompts or inputs together.
    pub prompt_chars: u64,
    pub max_tokens: Option<u32>,
    pub stream: bool,
    /// Request headers, names lowercase.
    pub headers: Vec<(String, String)>,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteOutcome {
    Route(RouteDecision),
    Reject { status: u16, message: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision {
    /// Name of the pool that serves the request.
    pub pool: String,
    /// Upper bound on `max_tokens`; the smaller of this and the client's
    /// value is sent upstream.
    pub max_tokens_cap: Option<u32>,
}
