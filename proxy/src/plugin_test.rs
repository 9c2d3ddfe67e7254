//! `switchyard plugin test`: loads a plugin, hands it one request (and
//! optionally a small answer to review) and describes its decision, for
//! plugin authors. Nothing is sent anywhere.

use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{json, Value};
use switchyard_policy::{Endpoint, Policy, PolicySettings, RouteOutcome, Verdict};

use crate::api::ApiRequest;
use crate::config::DEFAULT_LOW_LOGPROB;

/// What `switchyard plugin test` is given.
#[derive(Debug)]
pub struct PluginTest {
    /// The `.wasm` component.
    pub plugin: std::path::PathBuf,
    /// The plugin's configuration, as `[policy.config]` would give it.
    pub config: Value,
    /// An OpenAI request body; its shape (`messages`, `prompt` or
    /// `input`) names the endpoint.
    pub request: Value,
    /// Request headers, `name: value`.
    pub headers: Vec<String>,
    /// An OpenAI answer to review as the small pool's, if any.
    pub answer: Option<Value>,
}

/// Runs the test; returns the decision as JSON, or why it could not run.
pub fn run(test: &PluginTest) -> Result<Value, String> {
    let settings = PolicySettings::new(&test.plugin).with_config(test.config.clone());
    let policy = Policy::load(&settings).map_err(|e| e.to_string())?;

    let has = |field| test.request.get(field).is_some();
    let endpoint = if has("messages") {
        Endpoint::ChatCompletions
    } else if has("input") {
        Endpoint::Embeddings
    } else if has("prompt") {
        Endpoint::Completions
    } else {
        return Err("--request needs `messages` (chat completions), `prompt` \
            (completions) or `input` (embeddings)"
            .to_string());
    };
    let bytes = test.request.to_string();
    let api = ApiRequest::parse(endpoint, bytes.as_bytes()).map_err(|e| e.message)?;
    let mut headers = HeaderMap::new();
    for header in &test.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("header {header:?} must be `name: value`"))?;
        let name = HeaderName::try_from(name.trim()).map_err(|e| format!("{header:?}: {e}"))?;
        let value = HeaderValue::try_from(value.trim()).map_err(|e| format!("{header:?}: {e}"))?;
        headers.append(name, value);
    }
    let summary = std::sync::Arc::new(api.route_request(&std::sync::Arc::new(headers)));

    let started = Instant::now();
    let outcome = policy.route(&summary).map_err(|e| e.to_string())?;
    let route_us = started.elapsed().as_micros();
    let decision = match &outcome {
        RouteOutcome::Route(d) => json!({"route": {
            "pool": d.pool, "max_tokens_cap": d.max_tokens_cap,
            "escalate_to": d.escalate_to,
            "attributes": d.attributes.iter()
                .map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        }}),
        RouteOutcome::Reject { status, message } => {
            json!({"reject": {"status": status, "message": message}})
        }
    };
    let mut report = json!({
        "plugin": policy.name(), "version": policy.version(),
        "interface": policy.interface(),
        "endpoint": endpoint.wit_name(), "decision": decision, "route_us": route_us,
    });

    if let (Some(answer), RouteOutcome::Route(d)) = (&test.answer, &outcome) {
        let answer = crate::cascade::review_answer_of(answer, &d.pool, DEFAULT_LOW_LOGPROB);
        let verdict = policy
            .review(&summary, &answer)
            .map_err(|e| e.to_string())?;
        let verdict = match verdict {
            Verdict::Accept => json!({"verdict": "accept"}),
            Verdict::Escalate { pool, reason } => {
                // An empty pool means the route's escalation pool.
                let pool = Some(pool)
                    .filter(|pool| !pool.is_empty())
                    .or_else(|| d.escalate_to.clone());
                json!({"verdict": "escalate", "pool": pool, "reason": reason})
            }
        };
        report["summary"] = json!({
            "mean": answer.summary.mean, "min": answer.summary.min,
            "share_below": answer.summary.share_below,
            "tokens": answer.completion_tokens,
            "finish_reason": answer.finish_reason,
        });
        report["review"] = verdict;
    }
    Ok(report)
}
