//! Example Switchyard policy: premium tenants go straight to the large
//! pool; everyone else goes small-first and is escalated when the small
//! answer is unsure.
//!
//! Owns only its rules and configuration. For `model: "auto"`:
//!
//! - a request whose `tier_header` value is in `premium_tiers`, or whose
//!   `tenant_header` value is in `premium_tenants`, goes to `large_pool`
//!   with priority high and label `tier=premium`;
//! - any other goes small-first (`small_pool`, escalating to `large_pool`)
//!   with label `tier=standard`, and `review` escalates when the mean
//!   token log-probability is below `min_mean_logprob` or the answer was
//!   cut by `max_tokens`.
//!
//! Other models go to the pool of that name.
//!
//! Configuration (`[policy.config]`), all keys optional:
//!
//! | key                | type            | default          |
//! |--------------------|-----------------|------------------|
//! | `small_pool`       | string          | `"small"`        |
//! | `large_pool`       | string          | `"large"`        |
//! | `tier_header`      | string          | `"x-tier"`       |
//! | `premium_tiers`    | list of strings | `["premium"]`    |
//! | `tenant_header`    | string          | `"x-tenant"`     |
//! | `premium_tenants`  | list of strings | `[]`             |
//! | `min_mean_logprob` | number (≤ 0)    | `-1.0`           |
//!
//! Header values are compared without regard to case. Unknown keys are
//! rejected.

use serde_json::{Map, Value};
use switchyard_sdk::{export_policy, Answer, Decision, Policy, Priority, Request, Route, Verdict};

const KNOWN_KEYS: [&str; 7] = [
    "small_pool",
    "large_pool",
    "tier_header",
    "premium_tiers",
    "tenant_header",
    "premium_tenants",
    "min_mean_logprob",
];

/// The parsed configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Tiered {
    pub small_pool: String,
    pub large_pool: String,
    pub tier_header: String,
    /// Lowercase.
    pub premium_tiers: Vec<String>,
    pub tenant_header: String,
    /// Lowercase.
    pub premium_tenants: Vec<String>,
    pub min_mean_logprob: f32,
}

impl Policy for Tiered {
    fn init(config: &Value) -> Result<Self, String> {
        parse_config(config)
    }

    fn route(&self, req: &Request) -> Decision {
        if req.model() != "auto" {
            return Decision::route(req.model());
        }
        if self.is_premium(req) {
            return Route::new(self.large_pool.as_str())
                .with_priority(Priority::High)
                .with_label("tier", "premium")
                .into();
        }
        Route::cascade(self.small_pool.as_str(), self.large_pool.as_str())
            .with_label("tier", "standard")
            .into()
    }

    fn review(&self, _req: &Request, answer: &Answer) -> Verdict {
        if !answer.partial && answer.finish_reason == "length" {
            return Verdict::escalate("truncated");
        }
        if !answer.token_logprobs.is_empty() && answer.summary.mean < self.min_mean_logprob {
            return Verdict::escalate("low-confidence");
        }
        Verdict::Accept
    }
}

impl Tiered {
    fn is_premium(&self, req: &Request) -> bool {
        let listed = |header: &str, list: &[String]| {
            req.header(header)
                .map(|v| v.trim().to_lowercase())
                .is_some_and(|v| list.contains(&v))
        };
        listed(&self.tier_header, &self.premium_tiers)
            || listed(&self.tenant_header, &self.premium_tenants)
    }
}

export_policy!(Tiered);

// Switchyard runs these cases whenever it loads this plugin and refuses a
// build that decides any of them differently.
switchyard_sdk::export_fixtures!(include_bytes!("../fixtures.json"));

fn parse_config(config: &Value) -> Result<Tiered, String> {
    let empty = Map::new();
    let map = match config {
        Value::Null => &empty,
        Value::Object(map) => map,
        other => return Err(format!("tiered config must be a table, got {other}")),
    };
    if let Some(key) = map.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "tiered config has unknown key `{key}`; known keys are {}",
            KNOWN_KEYS.join(", ")
        ));
    }
    let min_mean_logprob = match map.get("min_mean_logprob") {
        None => -1.0,
        Some(v) => v.as_f64().filter(|x| *x <= 0.0).ok_or_else(|| {
            format!("tiered config key min_mean_logprob must be a number <= 0, got {v}")
        })?,
    };
    Ok(Tiered {
        small_pool: text(map, "small_pool", "small")?,
        large_pool: text(map, "large_pool", "large")?,
        tier_header: text(map, "tier_header", "x-tier")?,
        premium_tiers: list(map, "premium_tiers", &["premium"])?,
        tenant_header: text(map, "tenant_header", "x-tenant")?,
        premium_tenants: list(map, "premium_tenants", &[])?,
        min_mean_logprob: min_mean_logprob as f32,
    })
}

fn text(map: &Map<String, Value>, key: &str, default: &str) -> Result<String, String> {
    match map.get(key) {
        None => Ok(default.to_owned()),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(v) => Err(format!(
            "tiered config key {key} must be a non-empty string, got {v}"
        )),
    }
}

fn list(map: &Map<String, Value>, key: &str, default: &[&str]) -> Result<Vec<String>, String> {
    match map.get(key) {
        None => Ok(default.iter().map(|s| s.to_string()).collect()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(|s| s.trim().to_lowercase())
                    .ok_or_else(|| format!("tiered config key {key} must list strings, got {i}"))
            })
            .collect(),
        Some(v) => Err(format!(
            "tiered config key {key} must be a list of strings, got {v}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_sdk::{Endpoint, PRIORITY_KEY};

    fn tiered(config: Value) -> Tiered {
        Tiered::init(&config).unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn auto() -> Request<'static> {
        Request::new(Endpoint::ChatCompletions, "auto")
    }

    fn route_of(d: Decision) -> Route {
        match d {
            Decision::Route(r) => r,
            other => unreachable!("expected a route, got {other:?}"),
        }
    }

    #[test]
    fn premium_tier_goes_straight_to_large_with_high_priority() {
        let r = route_of(tiered(json!({})).route(&auto().with_header("X-Tier", "Premium")));
        assert_eq!(r.pool, "large");
        assert_eq!(r.escalate_to, None);
        assert_eq!(r.attribute(PRIORITY_KEY), Some("high"));
        assert_eq!(r.attribute("switchyard.label.tier"), Some("premium"));
    }

    #[test]
    fn listed_tenant_is_premium_too() {
        let t = tiered(json!({ "premium_tenants": ["acme"] }));
        let r = route_of(t.route(&auto().with_header("x-tenant", "ACME")));
        assert_eq!(r.pool, "large");
        let r = route_of(t.route(&auto().with_header("x-tenant", "other")));
        assert_eq!(
            (r.pool.as_str(), r.escalate_to.as_deref()),
            ("small", Some("large"))
        );
    }

    #[test]
    fn standard_requests_go_small_first_and_escalate_when_unsure() {
        let t = tiered(json!({}));
        let r = route_of(t.route(&auto()));
        assert_eq!(r.escalate_to.as_deref(), Some("large"));
        let req = auto();
        let sure = Answer::new("small", "ok", vec![-0.2]);
        assert_eq!(t.review(&req, &sure), Verdict::Accept);
        let unsure = Answer::new("small", "hm", vec![-2.0]);
        assert_eq!(t.review(&req, &unsure), Verdict::escalate("low-confidence"));
        let cut = Answer::new("small", "ok", vec![-0.2]).with_finish_reason("length");
        assert_eq!(t.review(&req, &cut), Verdict::escalate("truncated"));
    }

    #[test]
    fn named_model_goes_to_its_pool_and_bad_config_names_the_key() {
        let req = Request::new(Endpoint::Completions, "large").with_header("x-tier", "premium");
        assert_eq!(tiered(json!({})).route(&req), Decision::route("large"));
        let err = Tiered::init(&json!({ "premium_tiers": "gold" }))
            .err()
            .unwrap_or_default();
        assert!(err.contains("premium_tiers"), "{err}");
    }
}
