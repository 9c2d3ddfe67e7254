//! `switchyard:policy@0.2.0`: plugins built before the request became a
//! resource. Every call copies the whole request into the plugin.

use std::sync::Arc;

use wasmtime::Store;

use crate::state::HostState;
// The world's `use types.{.., verdict}` puts a `Verdict` in this module.
use crate::Verdict as HostVerdict;
use crate::{ReviewAnswer, RouteOutcome, RouteRequest};

wasmtime::component::bindgen!({
    path: "wit-0.2",
    world: "policy",
    // Requests borrow from the content read out for the call, so prompts
    // are not copied again on their way into the plugin's memory. `attribute` is
    // both borrowed (in requests) and owned (in decisions), so it becomes
    // `AttributeParam<'a>` and `Attribute`.
    ownership: Borrowing { duplicate_if_necessary: true },
});

use self::switchyard::policy::{host, types as wit};

super::shared_bindings!();

pub(super) fn route(
    policy: &Policy,
    store: &mut Store<HostState>,
    req: &Arc<RouteRequest>,
) -> wasmtime::Result<RouteOutcome> {
    with_wit_request(req, |request| policy.call_route(store, request)).map(outcome)
}

pub(super) fn review(
    policy: &Policy,
    store: &mut Store<HostState>,
    req: &Arc<RouteRequest>,
    answer: &ReviewAnswer,
) -> wasmtime::Result<HostVerdict> {
    let answer = answer_wit(answer);
    with_wit_request(req, |request| policy.call_review(store, request, answer)).map(verdict)
}

/// Calls `call` with `req` as a 0.2.0 request, which carries the whole
/// content: messages, prompts and headers are read out for every call.
fn with_wit_request<T>(req: &RouteRequest, call: impl FnOnce(wit::Request<'_>) -> T) -> T {
    let (messages, prompt, headers) = (req.messages(), req.prompt(), req.headers());
    // WIT lists of records lower from slices of WIT records.
    let messages: Vec<wit::Message<'_>> = messages
        .iter()
        .map(|m| wit::Message {
            role: &m.role,
            content: &m.content,
            attributes: &[],
        })
        .collect();
    let prompt: Vec<&str> = prompt.iter().map(String::as_str).collect();
    let headers: Vec<wit::AttributeParam<'_>> = headers
        .iter()
        .map(|(key, value)| wit::AttributeParam { key, value })
        .collect();
    call(wit::Request {
        endpoint: endpoint(req.endpoint),
        model: &req.model,
        messages: &messages,
        prompt: &prompt,
        prompt_chars: req.prompt_chars,
        max_tokens: req.max_tokens,
        stream: req.stream,
        headers: &headers,
        attributes: &[],
    })
}

impl wit::Host for HostState {}

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
