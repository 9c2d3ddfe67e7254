//! Example Switchyard policy: requests that ask for a summary get a
//! `max_tokens` cap and an instruction to be brief.
//!
//! Owns only its rule and configuration. A request is summarization-like
//! when its last user message (chat) or any prompt item (completions)
//! contains one of `keywords`, compared without regard to case. Such a
//! request keeps its pool but gets `max_tokens_cap` and, for chat, a
//! leading system message `instruction`. `model: "auto"` goes to
//! `default_pool`; any other model to the pool of that name.
//!
//! Configuration (`[policy.config]`), all keys optional:
//!
//! | key              | type            | default                   |
//! |------------------|-----------------|---------------------------|
//! | `default_pool`   | string          | `"small"`                 |
//! | `max_tokens_cap` | integer ≥ 1     | `256`                     |
//! | `instruction`    | string          | [`DEFAULT_INSTRUCTION`]   |
//! | `keywords`       | list of strings | [`DEFAULT_KEYWORDS`]      |
//!
//! Unknown keys are rejected.

use serde_json::{Map, Value};
use switchyard_sdk::{export_policy, Decision, Endpoint, Policy, Request, Route};

/// Default of `max_tokens_cap`.
pub const DEFAULT_CAP: u32 = 256;
/// Default of `instruction`.
pub const DEFAULT_INSTRUCTION: &str = "Answer concisely, in a few sentences at most.";
/// Default of `keywords`.
pub const DEFAULT_KEYWORDS: [&str; 7] = [
    "summarize",
    "summarise",
    "summary",
    "tl;dr",
    "tldr",
    "in short",
    "briefly",
];

const KNOWN_KEYS: [&str; 4] = ["default_pool", "max_tokens_cap", "instruction", "keywords"];

/// The parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concise {
    pub default_pool: String,
    pub max_tokens_cap: u32,
    pub instruction: String,
    /// Lowercase.
    pub keywords: Vec<String>,
}

impl Policy for Concise {
    fn init(config: &Value) -> Result<Self, String> {
        parse_config(config)
    }

    fn route(&self, req: &Request) -> Decision {
        let pool = if req.model() == "auto" {
            self.default_pool.as_str()
        } else {
            req.model()
        };
        if !self.is_summary(req) {
            return Decision::route(pool);
        }
        let mut route = Route::new(pool)
            .with_max_tokens_cap(self.max_tokens_cap)
            .with_label("shape", "summary");
        if req.endpoint() == Endpoint::ChatCompletions {
            route = route.with_system_instruction(self.instruction.as_str());
        }
        route.into()
    }
}

impl Concise {
    fn is_summary(&self, req: &Request) -> bool {
        let texts: Vec<&str> = match req.endpoint() {
            Endpoint::ChatCompletions => req
                .messages()
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| vec![m.content.as_str()])
                .unwrap_or_default(),
            _ => req.prompt().iter().map(String::as_str).collect(),
        };
        texts.iter().any(|text| {
            let text = text.to_lowercase();
            self.keywords.iter().any(|k| text.contains(k.as_str()))
        })
    }
}

export_policy!(Concise);

fn parse_config(config: &Value) -> Result<Concise, String> {
    let empty = Map::new();
    let map = match config {
        Value::Null => &empty,
        Value::Object(map) => map,
        other => return Err(format!("concise config must be a table, got {other}")),
    };
    if let Some(key) = map.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "concise config has unknown key `{key}`; known keys are {}",
            KNOWN_KEYS.join(", ")
        ));
    }
    let default_pool = match map.get("default_pool") {
        None => "small".to_owned(),
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(v) => {
            return Err(format!(
                "concise config key default_pool must be a non-empty pool name, got {v}"
            ))
        }
    };
    let max_tokens_cap = match map.get("max_tokens_cap") {
        None => DEFAULT_CAP,
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                format!("concise config key max_tokens_cap must be an integer >= 1, got {v}")
            })?,
    };
    let instruction = match map.get("instruction") {
        None => DEFAULT_INSTRUCTION.to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return Err(format!(
                "concise config key instruction must be a string, got {v}"
            ))
        }
    };
    let keywords = match map.get("keywords") {
        None => DEFAULT_KEYWORDS.iter().map(|k| k.to_string()).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_lowercase).ok_or_else(|| {
                    format!("concise config key keywords must list strings, got {i}")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(format!(
                "concise config key keywords must be a list of strings, got {v}"
            ))
        }
    };
    Ok(Concise {
        default_pool,
        max_tokens_cap,
        instruction,
        keywords,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_sdk::{Message, KEEP_TURNS_KEY, SYSTEM_INSTRUCTION_KEY};

    fn concise(config: Value) -> Concise {
        Concise::init(&config).unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn chat(text: &str) -> Request<'static> {
        Request::new(Endpoint::ChatCompletions, "auto").with_message(Message::new("user", text))
    }

    fn route_of(d: Decision) -> Route {
        match d {
            Decision::Route(r) => r,
            other => unreachable!("expected a route, got {other:?}"),
        }
    }

    #[test]
    fn summary_request_is_capped_and_told_to_be_brief() {
        let r = route_of(concise(json!({})).route(&chat("Please SUMMARIZE this article")));
        assert_eq!(r.pool, "small");
        assert_eq!(r.max_tokens_cap, Some(256));
        assert_eq!(
            r.attribute(SYSTEM_INSTRUCTION_KEY),
            Some(DEFAULT_INSTRUCTION)
        );
        assert_eq!(r.attribute(KEEP_TURNS_KEY), None);
    }

    #[test]
    fn other_requests_pass_unchanged() {
        let d = concise(json!({})).route(&chat("write a long poem"));
        assert_eq!(d, Decision::route("small"));
        let named = Request::new(Endpoint::ChatCompletions, "large")
            .with_message(Message::new("user", "tl;dr please"));
        assert_eq!(route_of(concise(json!({})).route(&named)).pool, "large");
    }

    #[test]
    fn completions_are_capped_without_a_system_message() {
        let req = Request::new(Endpoint::Completions, "auto").with_prompt("In short, the plot:");
        let r = route_of(concise(json!({ "max_tokens_cap": 32 })).route(&req));
        assert_eq!(r.max_tokens_cap, Some(32));
        assert_eq!(r.attribute(SYSTEM_INSTRUCTION_KEY), None);
    }

    #[test]
    fn only_the_last_user_message_counts() {
        let req = chat("summarize this").with_message(Message::new("user", "now a story"));
        assert_eq!(concise(json!({})).route(&req), Decision::route("small"));
    }

    #[test]
    fn bad_config_names_the_key() {
        for (config, key) in [
            (json!({ "max_tokens_cap": 0 }), "max_tokens_cap"),
            (json!({ "keywords": "x" }), "keywords"),
            (json!({ "cap": 1 }), "cap"),
        ] {
            let err = Concise::init(&config).err().unwrap_or_default();
            assert!(err.contains(key), "{config}: {err}");
        }
    }
}
