//! Host-side bindings for `sdk/wit/policy.wit` and the conversions between
//! them and the crate's plain types.
//!
//! Owns the mapping from [`RouteRequest`] to the WIT `request` and from the
//! WIT `decision` to [`RouteOutcome`]; it must not hold any state.

// The world's `use types.{.., verdict}` puts a `Verdict` in this module.
use crate::Verdict as HostVerdict;
use crate::{Endpoint, ReviewAnswer, RouteDecision, RouteOutcome, RouteRequest};

wasmtime::component::bindgen!({
    path: "../../sdk/wit",
    world: "policy",
    // Requests borrow from the caller's `RouteRequest`, so prompts are
    // copied once (into the plugin's memory), not twice. `attribute` is
    // both borrowed (in requests) and owned (in decisions), so it becomes
    // `AttributeParam<'a>` and `Attribute`.
    ownership: Borrowing { duplicate_if_necessary: true },
});

use self::switchyard::policy::types as wit;

// Limitation: only the 0.2.0 world is bound, so plugins built against
// 0.1.0 (no `review`) fail to load with a link error and must be rebuilt;
// serving both needs a second `bindgen!` and a choice by the component's
// exports.

// Limitation: every call copies all messages and prompts into the plugin's
// memory, even for a rule that reads only `prompt_chars`; a very long
// prompt costs a copy of its length per call.

/// A WIT request borrowing from a [`RouteRequest`]. The lists are built
/// here because WIT lists of records lower from slices of WIT records.
pub(crate) struct BorrowedRequest<'a> {
    messages: Vec<wit::Message<'a>>,
    prompt: Vec<&'a str>,
    headers: Vec<wit::AttributeParam<'a>>,
    req: &'a RouteRequest,
}

impl<'a> BorrowedRequest<'a> {
    pub(crate) fn new(req: &'a RouteRequest) -> Self {
        let messages = req
            .messages
            .iter()
            .map(|m| wit::Message {
                role: &m.role,
                content: &m.content,
                attributes: &[],
            })
            .collect();
        let headers = req
            .headers
            .iter()
            .map(|(key, value)| wit::AttributeParam { key, value })
            .collect();
        BorrowedRequest {
            messages,
            prompt: req.prompt.iter().map(String::as_str).collect(),
            headers,
            req,
        }
    }

    pub(crate) fn as_wit(&self) -> wit::Request<'_> {
        let endpoint = match self.req.endpoint {
            Endpoint::ChatCompletions => wit::Endpoint::ChatCompletions,
            Endpoint::Completions => wit::Endpoint::Completions,
            Endpoint::Embeddings => wit::Endpoint::Embeddings,
        };
        wit::Request {
            endpoint,
            model: &self.req.model,
            messages: &self.messages,
            prompt: &self.prompt,
            prompt_chars: self.req.prompt_chars,
            max_tokens: self.req.max_tokens,
            stream: self.req.stream,
            headers: &self.headers,
            attributes: &[],
        }
    }
}

/// A WIT answer borrowing from a [`ReviewAnswer`].
pub(crate) fn answer_wit(answer: &ReviewAnswer) -> wit::Answer<'_> {
    let s = answer.summary;
    wit::Answer {
        pool: &answer.pool,
        text: &answer.text,
        finish_reason: &answer.finish_reason,
        completion_tokens: answer.completion_tokens,
        token_logprobs: &answer.token_logprobs,
        summary: wit::LogprobSummary {
            mean: s.mean,
            min: s.min,
            share_below: s.share_below,
            threshold: s.threshold,
        },
        latency_ms: answer.latency_ms,
        partial: answer.partial,
        attributes: &[],
    }
}

/// Converts the plugin's verdict.
pub(crate) fn verdict(verdict: wit::Verdict) -> HostVerdict {
    match verdict {
        wit::Verdict::Accept => HostVerdict::Accept,
        wit::Verdict::Escalate(e) => HostVerdict::Escalate {
            pool: e.pool,
            reason: e.reason,
        },
    }
}

/// Status a rejection gets when the plugin's is not an HTTP error status.
const FALLBACK_REJECT_STATUS: u16 = 500;

/// Converts the plugin's answer. A rejection status outside 400..=599
/// becomes 500, as the WIT documents. A rejection's attributes are dropped:
/// none are defined.
pub(crate) fn outcome(decision: wit::Decision) -> RouteOutcome {
    match decision {
        wit::Decision::Route(route) => RouteOutcome::Route(RouteDecision {
            pool: route.pool,
            max_tokens_cap: route.max_tokens_cap,
            escalate_to: route.escalate_to,
            attributes: route
                .attributes
                .into_iter()
                .map(|a| (a.key, a.value))
                .collect(),
        }),
        wit::Decision::Reject(rejection) => {
            let status = if (400..=599).contains(&rejection.status) {
                rejection.status
            } else {
                FALLBACK_REJECT_STATUS
            };
            RouteOutcome::Reject {
                status,
                message: rejection.message,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_with_non_error_status_becomes_500() {
        let decision = wit::Decision::Reject(wit::Rejection {
            status: 200,
            message: "ok?".into(),
            attributes: Vec::new(),
        });
        assert_eq!(
            outcome(decision),
            RouteOutcome::Reject {
                status: 500,
                message: "ok?".into()
            }
        );
    }
}
