//! Fixtures a plugin ships inside its own component: requests with the
//! decisions the plugin's author expects. The host runs them whenever it
//! loads the plugin (start-up, `switchyard check`, a hot swap), so a build
//! that decides differently from what its author wrote down never serves.
//!
//! A plugin embeds them with the SDK's `export_fixtures!`, which puts a
//! JSON document in the custom section [`SECTION`] of its core module:
//!
//! ```json
//! {
//!   "config": {"long_prompt_chars": 100},
//!   "cases": [
//!     {
//!       "name": "a short question goes to the small pool",
//!       "request": {
//!         "endpoint": "chat-completions",
//!         "model": "auto",
//!         "messages": [{"role": "user", "content": "hi"}],
//!         "headers": {"x-tier": "premium"}
//!       },
//!       "expect": {"pool": "small"}
//!     }
//!   ]
//! }
//! ```
//!
//! `config`, when given, is the `init` configuration the cases assume;
//! they then run on an instance of their own, whatever the deployment's
//! `[policy.config]` is. Without it they run with the deployment's.
//!
//! A request has `endpoint` (`chat-completions`, `completions` or
//! `embeddings`; default chat), `model` (default `auto`), `messages`,
//! `prompt` (a list of texts), `max_tokens`, `stream` and `headers` (a
//! map); `prompt_chars` is counted from the texts. `expect` names any of
//! `pool`, `max_tokens_cap` (a number or null), `escalate_to` (a pool or
//! null), `attributes` (a map that must be among the route's), or
//! `reject` (the status of a rejection); only what it names is compared.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use wasmparser::{Parser, Payload};

use crate::{Endpoint, RouteOutcome, RouteRequest};

/// Name of the custom section that holds a plugin's fixtures.
pub const SECTION: &str = "switchyard-fixtures";

/// Most cases run per load, so that loading stays quick.
pub const MAX_CASES: usize = 256;

/// A plugin's fixtures, as its author wrote them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixtures {
    /// The `init` configuration the cases assume, if not the deployment's.
    #[serde(default)]
    pub config: Option<Value>,
    pub cases: Vec<Case>,
}

/// One request and the decision expected for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub request: CaseRequest,
    pub expect: Expect,
}

/// A request as the plugin sees it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub messages: Vec<CaseMessage>,
    #[serde(default)]
    pub prompt: Vec<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseMessage {
    pub role: String,
    pub content: String,
}

/// What a case expects; `None` fields are not compared. The doubled
/// options tell "not compared" (`None`) from "expected absent"
/// (`Some(None)`, written as `null`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub max_tokens_cap: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    pub escalate_to: Option<Option<String>>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub reject: Option<u16>,
}

/// Reads a field that is present, `null` included, as `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// The fixtures embedded in a component's bytes: `Ok(None)` when it
/// carries none, an error naming the problem when they do not parse.
/// Several sections (from several crates of one plugin) are joined.
pub fn embedded(bytes: &[u8]) -> Result<Option<Fixtures>, String> {
    let mut found: Option<Fixtures> = None;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| format!("reading the component: {e}"))?;
        let Payload::CustomSection(section) = payload else {
            continue;
        };
        if section.name() != SECTION {
            continue;
        }
        let part: Fixtures = serde_json::from_slice(section.data())
            .map_err(|e| format!("custom section {SECTION} is not valid fixtures JSON: {e}"))?;
        match &mut found {
            None => found = Some(part),
            Some(all) => {
                if all.config.is_none() {
                    all.config = part.config;
                }
                all.cases.extend(part.cases);
            }
        }
    }
    if let Some(fixtures) = &found {
        if fixtures.cases.len() > MAX_CASES {
            return Err(format!(
                "{} fixture cases; at most {MAX_CASES} are run at load",
                fixtures.cases.len()
            ));
        }
    }
    Ok(found)
}

impl CaseRequest {
    /// The request the plugin is handed.
    pub fn to_route_request(&self) -> Result<RouteRequest, String> {
        let endpoint = match self.endpoint.as_deref() {
            None => Endpoint::ChatCompletions,
            Some(label) => Endpoint::from_wit_name(label)
                .ok_or_else(|| format!("unknown endpoint {label:?}"))?,
        };
        let mut request = RouteRequest::new(endpoint, self.model.as_deref().unwrap_or("auto"));
        for message in &self.messages {
            request = request.with_message(&message.role, &message.content);
        }
        for text in &self.prompt {
            request = request.with_prompt(text);
        }
        for (name, value) in &self.headers {
            request = request.with_header(name, value);
        }
        request.max_tokens = self.max_tokens;
        request.stream = self.stream;
        Ok(request)
    }
}

impl Expect {
    /// `Err` describing the first difference between `outcome` and what
    /// is expected.
    pub fn check(&self, outcome: &RouteOutcome) -> Result<(), String> {
        let decision = match (outcome, self.reject) {
            (RouteOutcome::Reject { status, .. }, Some(want)) if *status == want => return Ok(()),
            (RouteOutcome::Reject { status, message }, _) => {
                return Err(format!("rejected with {status} ({message:?})"));
            }
            (RouteOutcome::Route(d), Some(want)) => {
                return Err(format!("routed to {:?}, not rejected with {want}", d.pool));
            }
            (RouteOutcome::Route(d), None) => d,
        };
        if let Some(pool) = &self.pool {
            if &decision.pool != pool {
                return Err(format!("routed to {:?}, expected {pool:?}", decision.pool));
            }
        }
        if let Some(cap) = self.max_tokens_cap {
            if decision.max_tokens_cap != cap {
                return Err(format!(
                    "max_tokens_cap {:?}, expected {cap:?}",
                    decision.max_tokens_cap
                ));
            }
        }
        if let Some(escalate_to) = &self.escalate_to {
            if &decision.escalate_to != escalate_to {
                return Err(format!(
                    "escalate_to {:?}, expected {escalate_to:?}",
                    decision.escalate_to
                ));
            }
        }
        for (key, value) in &self.attributes {
            let got = decision
                .attributes
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v);
            if got != Some(value) {
                return Err(format!("attribute {key} is {got:?}, expected {value:?}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RouteDecision;

    fn route(pool: &str) -> RouteOutcome {
        RouteOutcome::Route(RouteDecision {
            pool: pool.into(),
            max_tokens_cap: Some(5),
            escalate_to: None,
            attributes: vec![("switchyard.priority".into(), "high".into())],
        })
    }

    fn expect(json: &str) -> Expect {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn only_what_is_named_is_compared() {
        assert!(expect(r#"{"pool": "small"}"#)
            .check(&route("small"))
            .is_ok());
        assert!(expect(r#"{}"#).check(&route("any")).is_ok());
        let e = expect(r#"{"pool": "large"}"#).check(&route("small"));
        assert_eq!(e.unwrap_err(), r#"routed to "small", expected "large""#);
    }

    #[test]
    fn null_expects_absence() {
        assert!(expect(r#"{"escalate_to": null}"#)
            .check(&route("small"))
            .is_ok());
        assert!(expect(r#"{"max_tokens_cap": null}"#)
            .check(&route("small"))
            .is_err());
        assert!(expect(r#"{"max_tokens_cap": 5}"#)
            .check(&route("small"))
            .is_ok());
    }

    #[test]
    fn attributes_and_rejections_are_compared() {
        let high = expect(r#"{"attributes": {"switchyard.priority": "high"}}"#);
        assert!(high.check(&route("small")).is_ok());
        let low = expect(r#"{"attributes": {"switchyard.priority": "low"}}"#);
        assert!(low.check(&route("small")).is_err());

        let rejected = RouteOutcome::Reject {
            status: 403,
            message: "no".into(),
        };
        assert!(expect(r#"{"reject": 403}"#).check(&rejected).is_ok());
        assert!(expect(r#"{"reject": 429}"#).check(&rejected).is_err());
        assert!(expect(r#"{"pool": "small"}"#).check(&rejected).is_err());
        assert!(expect(r#"{"reject": 403}"#).check(&route("small")).is_err());
    }

    #[test]
    fn requests_count_their_characters_and_lowercase_headers() {
        let case: CaseRequest = serde_json::from_str(
            r#"{"endpoint": "completions", "prompt": ["héllo", "ab"],
                "headers": {"X-Tier": "premium"}}"#,
        )
        .unwrap();
        let request = case.to_route_request().unwrap();
        assert_eq!(request.endpoint, Endpoint::Completions);
        assert_eq!(request.model, "auto");
        assert_eq!(request.prompt_chars, 7);
        assert_eq!(
            request.headers(),
            [("x-tier".to_string(), "premium".to_string())]
        );

        let bad: CaseRequest = serde_json::from_str(r#"{"endpoint": "images"}"#).unwrap();
        assert!(bad.to_route_request().is_err());
    }

    #[test]
    fn a_module_without_the_section_has_no_fixtures() {
        // The smallest valid core module: magic and version.
        let empty = b"\0asm\x01\0\0\0";
        assert!(embedded(empty).unwrap().is_none());
    }
}
