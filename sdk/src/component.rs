//! Glue between the generated component bindings (`switchyard:policy@0.3.0`,
//! built for `wasm32-wasip2`) and [`Policy`]: converts between WIT and SDK
//! types around the instance state in `instance`. The request is not
//! converted: it is wrapped, and read on demand by [`Request`]'s methods.
//!
//! Compiled natively too (the bindings' imports are then `unreachable!()`),
//! so that the conversions are tested, but not for `wasm32-unknown-unknown`,
//! which builds the core module of `core_abi` instead.
//!
//! Used only by the expansion of [`export_policy!`](crate::export_policy),
//! through the re-exports in `__private`; nothing here is a stable API.

use crate::request::Request;
use crate::types::{Answer, Decision, Endpoint, LogprobSummary, Message, Verdict};
use crate::Policy;

/// Bindings generated from `sdk/wit/policy.wit`.
///
/// The export macro is public so that `export_policy!` can expand it in the
/// plugin crate, which then needs no dependency on `wit-bindgen` itself.
#[allow(missing_debug_implementations, clippy::all, reason = "generated code")]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "policy",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "::switchyard_sdk::__private::bindings",
    });
}

pub(crate) use self::bindings::switchyard::policy::types as wit;

pub use self::bindings::Guest;
pub use self::wit::{
    Answer as WitAnswer, Decision as WitDecision, Request as WitRequest,
    RequestFacts as WitRequestFacts, Verdict as WitVerdict,
};

/// The exported `init`: sets the instance up from the configuration.
pub fn init<P: Policy>(config: String) -> Result<(), String> {
    crate::instance::install_panic_hook();
    crate::instance::init::<P>(&config)
}

/// The exported `route`: wraps the facts and the lent request (reading
/// none of it), asks the policy and converts its answer back.
pub fn route(facts: WitRequestFacts, req: &WitRequest) -> WitDecision {
    let req = Request::lent(facts, req);
    decision_to_wit(crate::instance::route(&req))
}

/// The exported `review`: wraps the lent request, converts the answer,
/// asks the policy and converts its verdict back. Before `init` it
/// accepts, which a correct host never relies on.
pub fn review(facts: WitRequestFacts, req: &WitRequest, answer: WitAnswer) -> WitVerdict {
    let req = Request::lent(facts, req);
    let answer = answer_from_wit(answer);
    match crate::instance::review(&req, &answer) {
        Verdict::Accept => WitVerdict::Accept,
        Verdict::Escalate(e) => WitVerdict::Escalate(wit::Escalation {
            pool: e.pool,
            reason: e.reason,
            attributes: attributes(e.attributes),
        }),
    }
}

fn answer_from_wit(answer: WitAnswer) -> Answer {
    let s = answer.summary;
    Answer {
        pool: answer.pool,
        text: answer.text,
        finish_reason: answer.finish_reason,
        completion_tokens: answer.completion_tokens,
        token_logprobs: answer.token_logprobs,
        summary: LogprobSummary {
            mean: s.mean,
            min: s.min,
            share_below: s.share_below,
            threshold: s.threshold,
        },
        latency_ms: answer.latency_ms,
        partial: answer.partial,
        attributes: pairs(answer.attributes),
    }
}

/// The SDK's name for a WIT endpoint.
pub(crate) fn endpoint_from_wit(endpoint: wit::Endpoint) -> Endpoint {
    match endpoint {
        wit::Endpoint::ChatCompletions => Endpoint::ChatCompletions,
        wit::Endpoint::Completions => Endpoint::Completions,
        wit::Endpoint::Embeddings => Endpoint::Embeddings,
    }
}

/// The SDK's copy of a WIT chat message.
pub(crate) fn message_from_wit(message: wit::Message) -> Message {
    Message {
        role: message.role,
        content: message.content,
        attributes: pairs(message.attributes),
    }
}

fn decision_to_wit(decision: Decision) -> WitDecision {
    match decision {
        Decision::Route(route) => WitDecision::Route(wit::Route {
            pool: route.pool,
            max_tokens_cap: route.max_tokens_cap,
            escalate_to: route.escalate_to,
            attributes: attributes(route.attributes),
        }),
        Decision::Reject(rejection) => WitDecision::Reject(wit::Rejection {
            status: rejection.status,
            message: rejection.message,
            attributes: attributes(rejection.attributes),
        }),
    }
}

/// WIT attributes as (key, value) pairs, in order.
pub(crate) fn pairs(list: Vec<wit::Attribute>) -> Vec<(String, String)> {
    list.into_iter().map(|a| (a.key, a.value)).collect()
}

fn attributes(list: Vec<(String, String)>) -> Vec<wit::Attribute> {
    list.into_iter()
        .map(|(key, value)| wit::Attribute { key, value })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Route;

    // The request itself cannot be converted here: a lent request is a
    // host resource, whose methods only a component instance can call
    // (natively the generated imports are `unreachable!()`). The host's
    // tests cover that path; these cover what its answers become.
    #[test]
    fn message_and_endpoint_survive_conversion_from_wit() {
        let message = message_from_wit(wit::Message {
            role: "user".into(),
            content: "hi".into(),
            attributes: vec![wit::Attribute {
                key: "k".into(),
                value: "v".into(),
            }],
        });
        assert_eq!(message.role, "user");
        assert_eq!(message.content, "hi");
        assert_eq!(message.attributes, [("k".into(), "v".into())]);
        let endpoints = [
            (wit::Endpoint::ChatCompletions, Endpoint::ChatCompletions),
            (wit::Endpoint::Completions, Endpoint::Completions),
            (wit::Endpoint::Embeddings, Endpoint::Embeddings),
        ];
        for (from, to) in endpoints {
            assert_eq!(endpoint_from_wit(from), to);
        }
    }

    #[test]
    fn capped_route_keeps_its_cap_and_attributes_in_wit() {
        let route = Route::new("small")
            .with_max_tokens_cap(5)
            .with_attribute("k", "v");
        let WitDecision::Route(route) = decision_to_wit(route.into()) else {
            unreachable!("a route must stay a route");
        };
        assert_eq!(route.pool, "small");
        assert_eq!(route.max_tokens_cap, Some(5));
        assert_eq!(route.attributes[0].key, "k");
    }

    #[test]
    fn cascade_route_keeps_its_escalation_pool_in_wit() {
        let WitDecision::Route(route) = decision_to_wit(Route::cascade("s", "l").into()) else {
            unreachable!("a route must stay a route");
        };
        assert_eq!(route.escalate_to.as_deref(), Some("l"));
    }

    #[test]
    fn rejection_keeps_status_and_message_in_wit() {
        let WitDecision::Reject(r) = decision_to_wit(Decision::reject(403, "no")) else {
            unreachable!("a rejection must stay a rejection");
        };
        assert_eq!((r.status, r.message.as_str()), (403, "no"));
    }
}
