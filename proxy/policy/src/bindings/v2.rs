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
    // Requests borrow from the caller's `RouteRequest`, so prompts are
    // copied once (into the plugin's memory), not twice. `attribute` is
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
    let request = BorrowedRequest::new(req);
    policy.call_route(store, request.as_wit()).map(outcome)
}

pub(super) fn review(
    policy: &Policy,
    store: &mut Store<HostState>,
    req: &Arc<RouteRequest>,
    answer: &ReviewAnswer,
) -> wasmtime::Result<HostVerdict> {
    let request = BorrowedRequest::new(req);
    let answer = answer_wit(answer);
    policy
        .call_review(store, request.as_wit(), answer)
        .map(verdict)
}

/// A WIT request borrowing from a [`RouteRequest`]. The lists are built
/// here because WIT lists of records lower from slices of WIT records.
struct BorrowedRequest<'a> {
    messages: Vec<wit::Message<'a>>,
    prompt: Vec<&'a str>,
    headers: Vec<wit::AttributeParam<'a>>,
    req: &'a RouteRequest,
}

impl<'a> BorrowedRequest<'a> {
    fn new(req: &'a RouteRequest) -> Self {
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

    fn as_wit(&self) -> wit::Request<'_> {
        wit::Request {
            endpoint: endpoint(self.req.endpoint),
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
