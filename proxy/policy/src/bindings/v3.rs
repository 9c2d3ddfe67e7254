//! `switchyard:policy@0.3.0`: each call hands over the request's numbers
//! and model name; the messages, prompts and headers stay in the host as a
//! resource the plugin calls back for, and only what it reads is copied
//! into its memory.

use std::sync::Arc;

use wasmtime::component::Resource;
use wasmtime::Store;

use crate::state::HostState;
// The world's `use types.{.., verdict}` puts a `Verdict` in this module.
use crate::Verdict as HostVerdict;
use crate::{ReviewAnswer, RouteOutcome, RouteRequest};

wasmtime::component::bindgen!({
    path: "../../sdk/wit",
    world: "policy",
    // The answer borrows from the caller's `ReviewAnswer`, so its text is
    // copied once (into the plugin's memory), not twice.
    ownership: Borrowing { duplicate_if_necessary: true },
    with: {
        "switchyard:policy/types.request": RequestView,
    },
    // A request method traps on a handle that is not in the table, which
    // only a host bug could cause.
    imports: {
        "switchyard:policy/types": trappable,
    },
});

use self::switchyard::policy::{host, types as wit};

super::shared_bindings!();

/// What a `request` handle stands for in the store's resource table: the
/// request being routed or reviewed, shared with the caller, who removes
/// it from the table when the call returns.
pub struct RequestView(Arc<RouteRequest>);

pub(super) fn route(
    policy: &Policy,
    store: &mut Store<HostState>,
    req: &Arc<RouteRequest>,
) -> wasmtime::Result<RouteOutcome> {
    let handle = lend(store, req)?;
    let result = policy.call_route(&mut *store, facts(req), borrow(&handle));
    take_back(store, handle)?;
    result.map(outcome)
}

pub(super) fn review(
    policy: &Policy,
    store: &mut Store<HostState>,
    req: &Arc<RouteRequest>,
    answer: &ReviewAnswer,
) -> wasmtime::Result<HostVerdict> {
    let handle = lend(store, req)?;
    let answer = answer_wit(answer);
    let result = policy.call_review(&mut *store, facts(req), borrow(&handle), answer);
    take_back(store, handle)?;
    result.map(verdict)
}

/// The facts every call hands over.
fn facts(req: &RouteRequest) -> wit::RequestFacts<'_> {
    wit::RequestFacts {
        endpoint: endpoint(req.endpoint),
        model: &req.model,
        message_count: req.message_count,
        prompt_chars: req.prompt_chars,
        max_tokens: req.max_tokens,
        stream: req.stream,
    }
}

/// Puts `req` in the store's table for one call.
fn lend(
    store: &mut Store<HostState>,
    req: &Arc<RouteRequest>,
) -> wasmtime::Result<Resource<RequestView>> {
    let view = RequestView(Arc::clone(req));
    Ok(store.data_mut().table().push(view)?)
}

/// A borrowed handle to `handle`'s request, as `borrow<request>` wants.
fn borrow(handle: &Resource<RequestView>) -> Resource<RequestView> {
    Resource::new_borrow(handle.rep())
}

/// Removes the request lent by [`lend`]. After a trap the instance is
/// discarded anyway, but the table entry would otherwise outlive the call.
fn take_back(store: &mut Store<HostState>, handle: Resource<RequestView>) -> wasmtime::Result<()> {
    store.data_mut().table().delete(handle)?;
    Ok(())
}

impl HostState {
    fn request(&self, handle: &Resource<RequestView>) -> wasmtime::Result<&RouteRequest> {
        Ok(&self.table_ref().get(handle)?.0)
    }
}

impl wit::Host for HostState {}

impl wit::HostRequest for HostState {
    fn messages(&mut self, req: Resource<RequestView>) -> wasmtime::Result<Vec<wit::Message>> {
        let messages = self.request(&req)?.messages().into_iter();
        Ok(messages
            .map(|m| wit::Message {
                role: m.role,
                content: m.content,
                attributes: Vec::new(),
            })
            .collect())
    }

    fn prompt(&mut self, req: Resource<RequestView>) -> wasmtime::Result<Vec<String>> {
        Ok(self.request(&req)?.prompt())
    }

    fn header(
        &mut self,
        req: Resource<RequestView>,
        name: String,
    ) -> wasmtime::Result<Option<String>> {
        Ok(self.request(&req)?.header(&name))
    }

    fn headers(
        &mut self,
        req: Resource<RequestView>,
    ) -> wasmtime::Result<Vec<wit::AttributeResult>> {
        let headers = self.request(&req)?.headers().into_iter();
        Ok(headers
            .map(|(key, value)| wit::AttributeResult { key, value })
            .collect())
    }

    fn attribute(
        &mut self,
        req: Resource<RequestView>,
        _key: String,
    ) -> wasmtime::Result<Option<String>> {
        // No host attributes are defined in 0.3.0; the handle is still
        // checked, as every method does.
        self.request(&req)?;
        Ok(None)
    }

    fn drop(&mut self, req: Resource<RequestView>) -> wasmtime::Result<()> {
        // Plugins only ever borrow a request, so this runs only if a later
        // interface hands one over.
        self.table().delete(req)?;
        Ok(())
    }
}
