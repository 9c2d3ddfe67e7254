//! Example Switchyard policy: answer `auto` requests with a small pool
//! first and escalate to a large pool when the small answer looks unsure.
//!
//! Owns only its routing and review rules and their configuration. The
//! rules:
//!
//! - `route`: `model: "auto"` goes small-first (`small_pool`, escalating
//!   to `large_pool`); any other model goes to the pool of that name.
//! - `review` escalates when the answer's mean token log-probability is
//!   below `min_mean_logprob` (reason `low-confidence`), when more than
//!   `max_low_share` of its tokens are below the host's low threshold
//!   (`low-tokens`), when it was cut by `max_tokens` (finish reason
//!   `length`, reason `truncated`), or when it starts like a refusal
//!   (`refusal`). Otherwise it accepts. A streamed prefix (probe mode) is
//!   judged on what it has: it cannot be truncated yet.
//!
//! Configuration (`[policy.config]`), all keys optional:
//!
//! | key                  | type            | default                    |
//! |----------------------|-----------------|----------------------------|
//! | `small_pool`         | string          | `"small"`                  |
//! | `large_pool`         | string          | `"large"`                  |
//! | `min_mean_logprob`   | number (≤ 0)    | `-1.0`                     |
//! | `max_low_share`      | number (0 to 1) | `1.0` (off)                |
//! | `escalate_truncated` | boolean         | `true`                     |
//! | `refusal_phrases`    | list of strings | [`DEFAULT_REFUSALS`]       |
//!
//! Refusal phrases match the start of the answer (after leading spaces),
//! without regard to case. Unknown keys are rejected.
//!
//! Build: `cargo build -p confidence-cascade --release --target
//! wasm32-unknown-unknown`, giving
//! `target/wasm32-unknown-unknown/release/confidence_cascade.wasm`, a 0.4.0 core
//! module (`--target wasm32-wasip2` builds a 0.3.0 component).

use serde_json::{Map, Value};
use switchyard_sdk::{
    counter_add, export_policy, log, Answer, Decision, Policy, Request, Route, Verdict,
};

/// Default of `min_mean_logprob`: a mean token probability of about 0.37.
pub const DEFAULT_MIN_MEAN_LOGPROB: f64 = -1.0;
/// Default of `refusal_phrases`.
pub const DEFAULT_REFUSALS: [&str; 5] = [
    "i can't",
    "i cannot",
    "i'm sorry",
    "i am unable",
    "as an ai",
];

/// Escalation reasons, also the plugin's counter names.
pub const LOW_CONFIDENCE: &str = "low-confidence";
pub const LOW_TOKENS: &str = "low-tokens";
pub const TRUNCATED: &str = "truncated";
pub const REFUSAL: &str = "refusal";

/// The model name that asks for the cascade.
const AUTO_MODEL: &str = "auto";

const KNOWN_KEYS: [&str; 6] = [
    "small_pool",
    "large_pool",
    "min_mean_logprob",
    "max_low_share",
    "escalate_truncated",
    "refusal_phrases",
];

/// The cascade's parsed configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfidenceCascade {
    pub small_pool: String,
    pub large_pool: String,
    /// Escalate when the mean token log-probability is below this.
    pub min_mean_logprob: f32,
    /// Escalate when more than this share of tokens is below the host's
    /// low threshold.
    pub max_low_share: f32,
    /// Escalate answers cut by `max_tokens`.
    pub escalate_truncated: bool,
    /// Lowercase phrases that mark a refusal at the start of an answer.
    pub refusal_phrases: Vec<String>,
}

impl Policy for ConfidenceCascade {
    fn init(config: &Value) -> Result<Self, String> {
        let cascade = parse_config(config)?;
        log::info!(
            "confidence-cascade: auto goes to {:?} first, escalating to {:?} \
             below a mean logprob of {}",
            cascade.small_pool,
            cascade.large_pool,
            cascade.min_mean_logprob,
        );
        Ok(cascade)
    }

    fn route(&self, req: &Request) -> Decision {
        if req.model() != AUTO_MODEL {
            return Decision::route(req.model());
        }
        Route::cascade(self.small_pool.as_str(), self.large_pool.as_str()).into()
    }

    fn review(&self, _req: &Request, answer: &Answer) -> Verdict {
        let verdict = self.judge(answer);
        counter_add(verdict.reason().unwrap_or("accepted"), 1);
        verdict
    }
}

impl ConfidenceCascade {
    fn judge(&self, answer: &Answer) -> Verdict {
        if self.is_refusal(&answer.text) {
            return Verdict::escalate(REFUSAL);
        }
        if self.escalate_truncated && answer.finish_reason == "length" {
            return Verdict::escalate(TRUNCATED);
        }
        // No tokens, no evidence: an empty answer is judged by its finish
        // reason and text alone.
        if answer.token_logprobs.is_empty() {
            return Verdict::Accept;
        }
        if answer.summary.mean < self.min_mean_logprob {
            return Verdict::escalate(LOW_CONFIDENCE);
        }
        if answer.summary.share_below > self.max_low_share {
            return Verdict::escalate(LOW_TOKENS);
        }
        Verdict::Accept
    }

    fn is_refusal(&self, text: &str) -> bool {
        let start: String = text.trim_start().chars().take(64).collect();
        let start = start.to_lowercase();
        self.refusal_phrases
            .iter()
            .any(|phrase| start.starts_with(phrase.as_str()))
    }
}

export_policy!(ConfidenceCascade);

fn parse_config(config: &Value) -> Result<ConfidenceCascade, String> {
    let empty = Map::new();
    let map = match config {
        Value::Null => &empty,
        Value::Object(map) => map,
        other => {
            return Err(format!(
                "confidence-cascade config must be a table, got {other}"
            ))
        }
    };
    if let Some(key) = map.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "confidence-cascade config has unknown key `{key}`; known keys \
             are {}",
            KNOWN_KEYS.join(", ")
        ));
    }

    let min_mean_logprob = number(map, "min_mean_logprob", DEFAULT_MIN_MEAN_LOGPROB)?;
    if min_mean_logprob > 0.0 {
        return Err(format!(
            "confidence-cascade config key min_mean_logprob must be <= 0 \
             (a log-probability), got {min_mean_logprob}"
        ));
    }
    let max_low_share = number(map, "max_low_share", 1.0)?;
    if !(0.0..=1.0).contains(&max_low_share) {
        return Err(format!(
            "confidence-cascade config key max_low_share must be between 0 \
             and 1, got {max_low_share}"
        ));
    }
    let escalate_truncated = match map.get("escalate_truncated") {
        None => true,
        Some(v) => v.as_bool().ok_or_else(|| {
            format!("confidence-cascade config key escalate_truncated must be a boolean, got {v}")
        })?,
    };
    let refusal_phrases = match map.get("refusal_phrases") {
        None => DEFAULT_REFUSALS.iter().map(|p| p.to_string()).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str().map(str::to_lowercase).ok_or_else(|| {
                    format!(
                        "confidence-cascade config key refusal_phrases must \
                         list strings, got {item}"
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(format!(
                "confidence-cascade config key refusal_phrases must be a \
                 list of strings, got {v}"
            ))
        }
    };

    Ok(ConfidenceCascade {
        small_pool: pool_name(map, "small_pool", "small")?,
        large_pool: pool_name(map, "large_pool", "large")?,
        min_mean_logprob: min_mean_logprob as f32,
        max_low_share: max_low_share as f32,
        escalate_truncated,
        refusal_phrases,
    })
}

fn number(map: &Map<String, Value>, key: &str, default: f64) -> Result<f64, String> {
    match map.get(key) {
        None => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| {
            format!("confidence-cascade config key {key} must be a number, got {v}")
        }),
    }
}

fn pool_name(map: &Map<String, Value>, key: &str, default: &str) -> Result<String, String> {
    match map.get(key) {
        None => Ok(default.to_owned()),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(v) => Err(format!(
            "confidence-cascade config key {key} must be a non-empty pool \
             name, got {v}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_sdk::Endpoint;

    fn cascade(config: Value) -> ConfidenceCascade {
        ConfidenceCascade::init(&config).unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn review(c: &ConfidenceCascade, answer: Answer) -> Verdict {
        c.review(&Request::new(Endpoint::ChatCompletions, "auto"), &answer)
    }

    #[test]
    fn auto_goes_small_first_and_named_models_go_straight() {
        let c = cascade(json!({}));
        let auto = c.route(&Request::new(Endpoint::ChatCompletions, "auto"));
        assert_eq!(auto, Route::cascade("small", "large").into());
        let named = c.route(&Request::new(Endpoint::Completions, "large"));
        assert_eq!(named, Decision::route("large"));
    }

    #[test]
    fn confident_answer_is_accepted() {
        let c = cascade(json!({}));
        let answer = Answer::new("small", "Paris.", vec![-0.1, -0.2, -0.05]);
        assert_eq!(review(&c, answer), Verdict::Accept);
    }

    #[test]
    fn low_mean_logprob_escalates() {
        let c = cascade(json!({ "min_mean_logprob": -0.5 }));
        let answer = Answer::new("small", "Maybe Lyon?", vec![-0.2, -1.5]);
        assert_eq!(review(&c, answer), Verdict::escalate(LOW_CONFIDENCE));
    }

    #[test]
    fn truncated_answer_escalates_unless_switched_off() {
        let answer = Answer::new("small", "The answer is", vec![-0.1]).with_finish_reason("length");
        let c = cascade(json!({}));
        assert_eq!(review(&c, answer.clone()), Verdict::escalate(TRUNCATED));
        let c = cascade(json!({ "escalate_truncated": false }));
        assert_eq!(review(&c, answer), Verdict::Accept);
    }

    #[test]
    fn refusal_escalates_in_any_case_and_after_spaces() {
        let c = cascade(json!({}));
        let answer = Answer::new("small", "  I'M SORRY, I can't", vec![-0.01]);
        assert_eq!(review(&c, answer), Verdict::escalate(REFUSAL));
        let c = cascade(json!({ "refusal_phrases": ["nope"] }));
        let answer = Answer::new("small", "Nope.", vec![-0.01]);
        assert_eq!(review(&c, answer), Verdict::escalate(REFUSAL));
    }

    #[test]
    fn share_of_low_tokens_escalates_when_configured() {
        let c = cascade(json!({ "max_low_share": 0.25, "min_mean_logprob": -10.0 }));
        // Two of four tokens below ln(0.1).
        let answer = Answer::new("small", "a b c d", vec![-0.1, -3.0, -0.1, -3.0]);
        assert_eq!(review(&c, answer), Verdict::escalate(LOW_TOKENS));
    }

    #[test]
    fn partial_answer_is_judged_on_its_prefix() {
        let c = cascade(json!({}));
        let sure = Answer::new("small", "Paris", vec![-0.1]).with_partial(true);
        assert_eq!(review(&c, sure.with_finish_reason("")), Verdict::Accept);
        let unsure = Answer::new("small", "Hmm", vec![-4.0]).with_partial(true);
        assert_eq!(review(&c, unsure), Verdict::escalate(LOW_CONFIDENCE));
    }

    #[test]
    fn bad_config_names_the_key() {
        for (config, key) in [
            (json!({ "min_mean_logprob": 0.5 }), "min_mean_logprob"),
            (json!({ "max_low_share": 2 }), "max_low_share"),
            (json!({ "refusal_phrases": [1] }), "refusal_phrases"),
            (json!({ "small_pool": "" }), "small_pool"),
            (json!({ "threshold": -1 }), "threshold"),
        ] {
            let err = ConfidenceCascade::init(&config).err().unwrap_or_default();
            assert!(err.contains(key), "{config}: {err}");
        }
    }
}
