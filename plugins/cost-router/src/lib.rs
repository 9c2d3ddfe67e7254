//! Example Switchyard policy: send cheap requests to a small pool and long
//! or premium ones to a large pool.
//!
//! Owns only its routing rule and configuration parsing. The rule:
//!
//! - `model: "auto"` goes to the large pool when the prompt has more than
//!   `long_prompt_chars` characters or the request carries the header
//!   `x-tier: premium` (name and value compared without regard to case);
//!   otherwise to the small pool.
//! - Any other model name goes to the pool of that name.
//!
//! Configuration (`[policy.config]`), all keys optional:
//!
//! | key                 | type    | default   |
//! |---------------------|---------|-----------|
//! | `long_prompt_chars` | integer | `2000`    |
//! | `small_pool`        | string  | `"small"` |
//! | `large_pool`        | string  | `"large"` |
//!
//! Unknown keys are rejected so that a typo does not silently fall back to
//! a default.
//!
//! Build: `cargo build -p cost-router --release --target
//! wasm32-unknown-unknown`, giving
//! `target/wasm32-unknown-unknown/release/cost_router.wasm`, a 0.4.0 core
//! module (`--target wasm32-wasip2` builds a 0.3.0 component).

use serde_json::Value;
use switchyard_sdk::{export_policy, log, Decision, Policy, Request};

/// Prompt length, in characters, above which `auto` goes to the large
/// pool. Default of `long_prompt_chars`.
pub const DEFAULT_LONG_PROMPT_CHARS: u64 = 2000;
/// Default of `small_pool`.
pub const DEFAULT_SMALL_POOL: &str = "small";
/// Default of `large_pool`.
pub const DEFAULT_LARGE_POOL: &str = "large";

/// The model name that asks the router to choose.
const AUTO_MODEL: &str = "auto";
/// Header that marks premium requests, and its premium value.
const TIER_HEADER: &str = "x-tier";
const PREMIUM_TIER: &str = "premium";

const KNOWN_KEYS: [&str; 3] = ["long_prompt_chars", "small_pool", "large_pool"];

/// The cost router's parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostRouter {
    /// Prompts longer than this many characters count as long.
    pub long_prompt_chars: u64,
    /// Pool for short, standard-tier `auto` requests.
    pub small_pool: String,
    /// Pool for long or premium `auto` requests.
    pub large_pool: String,
}

impl Policy for CostRouter {
    fn init(config: &Value) -> Result<Self, String> {
        let router = parse_config(config)?;
        log::info!(
            "cost-router: auto requests over {} chars or x-tier premium go \
             to pool {:?}, others to {:?}",
            router.long_prompt_chars,
            router.large_pool,
            router.small_pool,
        );
        Ok(router)
    }

    fn route(&self, req: &Request) -> Decision {
        if req.model() != AUTO_MODEL {
            return Decision::route(req.model());
        }
        // The length first: it is one scalar from the host, and a long
        // prompt needs no header lookup.
        let long = req.prompt_chars() > self.long_prompt_chars;
        let premium = || {
            req.header(TIER_HEADER)
                .is_some_and(|v| v.trim().eq_ignore_ascii_case(PREMIUM_TIER))
        };
        if long || premium() {
            Decision::route(self.large_pool.as_str())
        } else {
            Decision::route(self.small_pool.as_str())
        }
    }
}

export_policy!(CostRouter);

fn parse_config(config: &Value) -> Result<CostRouter, String> {
    // An absent `[policy.config]` arrives as null or an empty object.
    let empty = serde_json::Map::new();
    let map = match config {
        Value::Null => &empty,
        Value::Object(map) => map,
        other => return Err(format!("cost-router config must be a table, got {other}")),
    };
    if let Some(key) = map.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "cost-router config has unknown key `{key}`; known keys are \
             long_prompt_chars, small_pool, large_pool"
        ));
    }

    let long_prompt_chars = match map.get("long_prompt_chars") {
        None => DEFAULT_LONG_PROMPT_CHARS,
        Some(v) => v.as_u64().ok_or_else(|| {
            format!(
                "cost-router config key long_prompt_chars must be a \
                 non-negative integer, got {v}"
            )
        })?,
    };
    Ok(CostRouter {
        long_prompt_chars,
        small_pool: pool_name(map, "small_pool", DEFAULT_SMALL_POOL)?,
        large_pool: pool_name(map, "large_pool", DEFAULT_LARGE_POOL)?,
    })
}

fn pool_name(
    map: &serde_json::Map<String, Value>,
    key: &str,
    default: &str,
) -> Result<String, String> {
    match map.get(key) {
        None => Ok(default.to_owned()),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(v) => Err(format!(
            "cost-router config key {key} must be a non-empty pool name, \
             got {v}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_sdk::Endpoint;

    fn router() -> CostRouter {
        CostRouter::init(&json!({})).unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn auto() -> Request<'static> {
        Request::new(Endpoint::ChatCompletions, "auto")
    }

    #[test]
    fn empty_config_uses_defaults() {
        let r = router();
        assert_eq!(r.long_prompt_chars, 2000);
        assert_eq!(
            (r.small_pool.as_str(), r.large_pool.as_str()),
            ("small", "large")
        );
        assert_eq!(CostRouter::init(&Value::Null), Ok(r));
    }

    #[test]
    fn short_auto_request_goes_to_small_pool() {
        let d = router().route(&auto().with_prompt_chars(2000));
        assert_eq!(d.pool(), Some("small"));
    }

    #[test]
    fn long_auto_request_goes_to_large_pool() {
        let d = router().route(&auto().with_prompt_chars(2001));
        assert_eq!(d.pool(), Some("large"));
    }

    #[test]
    fn premium_header_goes_to_large_pool_in_any_case() {
        let r = router();
        for (name, value) in [("x-tier", "premium"), ("X-Tier", "PREMIUM")] {
            let d = r.route(&auto().with_header(name, value));
            assert_eq!(d.pool(), Some("large"), "{name}: {value}");
        }
        let d = r.route(&auto().with_header("x-tier", "standard"));
        assert_eq!(d.pool(), Some("small"));
    }

    #[test]
    fn named_model_goes_to_pool_of_that_name() {
        let req = Request::new(Endpoint::Completions, "llama-70b")
            .with_prompt_chars(10_000)
            .with_header("x-tier", "premium");
        assert_eq!(router().route(&req).pool(), Some("llama-70b"));
    }

    #[test]
    fn configured_pools_and_threshold_are_used() {
        let r = CostRouter::init(&json!({
            "long_prompt_chars": 10,
            "small_pool": "cheap",
            "large_pool": "smart",
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(r.route(&auto().with_prompt_chars(10)).pool(), Some("cheap"));
        assert_eq!(r.route(&auto().with_prompt_chars(11)).pool(), Some("smart"));
    }

    #[test]
    fn non_integer_threshold_is_rejected_with_key_name() {
        let err = CostRouter::init(&json!({ "long_prompt_chars": "x" }))
            .err()
            .unwrap_or_default();
        assert!(err.contains("long_prompt_chars"), "{err}");
        assert!(err.contains("non-negative integer"), "{err}");
    }

    #[test]
    fn unknown_key_and_empty_pool_are_rejected() {
        let err = CostRouter::init(&json!({ "long_prompt": 5 }))
            .err()
            .unwrap_or_default();
        assert!(err.contains("unknown key `long_prompt`"), "{err}");
        let err = CostRouter::init(&json!({ "small_pool": "" }))
            .err()
            .unwrap_or_default();
        assert!(err.contains("small_pool"), "{err}");
    }
}
