//! Routing: which pool serves a request. The policy plugin decides when one
//! is configured; otherwise, and whenever the plugin fails, the request's
//! `model` names the pool.
//!
//! A failing plugin never fails a request by itself: the failure is logged,
//! counted, and the request takes the default route.
//!
//! On a captured connection (`server.transparent`) the default route is
//! the pool the connection was opened to, whatever the `model`: without a
//! policy every request goes there, and a policy may still send one
//! elsewhere.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use http::HeaderMap;
use switchyard_policy::{Policy, RouteOutcome, RouteRequest};

use crate::api::ApiRequest;
use crate::config::OnError;
use crate::error::{ApiError, ErrorKind};
use crate::metrics;
use crate::telemetry::cut_for_log;

/// The active policy and the one a rollback returns to.
#[derive(Debug, Clone, Default)]
struct Policies {
    active: Option<Arc<Policy>>,
    previous: Option<Arc<Policy>>,
}

/// Where a request goes.
#[derive(Debug, Clone, Default)]
pub struct Route {
    /// Name of the pool, one of those the router was built with.
    pub pool: String,
    /// Upper bound the policy set on `max_tokens`.
    pub max_tokens_cap: Option<u32>,
    /// Queue priority the policy set (attribute `switchyard.priority`),
    /// 0 (lowest) to 9 (highest); `None` leaves it to the request's
    /// `x-switchyard-priority` header.
    pub priority: Option<u8>,
    /// Small-first: a configured pool to escalate to; `pool` answers first
    /// and the policy reviews its answer.
    pub escalate_to: Option<String>,
    /// The policy's hints (`switchyard.*` attribute keys).
    pub attributes: Vec<(String, String)>,
    /// The policy version that routed this request and must review it.
    pub policy: Option<Arc<Policy>>,
    /// What that policy was told about the request, for its review.
    pub summary: Option<Arc<RouteRequest>>,
}

impl Route {
    fn to(pool: &str) -> Self {
        Route {
            pool: pool.to_string(),
            ..Route::default()
        }
    }
}

/// The pool names and the optional policy. Routing needs only names: what
/// serves a pool (upstream servers or the in-process executor) is the
/// caller's business.
#[derive(Debug)]
pub struct Router {
    pools: HashSet<String>,
    /// Pool names in configuration order, for listings and messages.
    names: Vec<String>,
    /// The policy new requests are routed by, swapped whole by a reload,
    /// and the one it replaced, for a rollback; one lock, so that a
    /// request reads both at once.
    policies: RwLock<Policies>,
    /// What a failed plugin call leads to.
    on_error: OnError,
    /// Share of failed calls past which a swapped-in version is rolled
    /// back, once it has made `rollback_min_calls` calls; 0 never.
    rollback_error_rate: f64,
    rollback_min_calls: u64,
    /// Calls and failed calls of the active version since it took over.
    calls: AtomicU64,
    errors: AtomicU64,
    /// Where a request goes when the policy fails and its `model` names no
    /// pool.
    fallback_pool: Option<String>,
    /// Decides which plugin calls may run on the calling worker thread.
    inline: InlineGate,
}

impl Router {
    pub fn new(names: Vec<String>, policy: Option<Policy>, fallback_pool: Option<String>) -> Self {
        let pools = names.iter().cloned().collect();
        Self {
            pools,
            names,
            policies: RwLock::new(Policies {
                active: policy.map(Arc::new),
                previous: None,
            }),
            on_error: OnError::DefaultRoute,
            rollback_error_rate: 0.0,
            rollback_min_calls: 0,
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            fallback_pool,
            inline: InlineGate::new(),
        }
    }

    /// Runs a call (`route` or `review`) into `policy`, which may take up
    /// to its timeout, and records how long it took. See [`InlineGate`]
    /// for where it runs.
    pub(crate) fn call_plugin<T>(&self, policy: &Policy, call: impl FnOnce() -> T) -> T {
        let (result, took) = self.inline.call(policy.timeout(), call);
        metrics::record_policy_call(policy.name(), took);
        result
    }

    /// Sets what a failed plugin call leads to, and when a swapped-in
    /// version that keeps failing is rolled back.
    pub fn with_failure_handling(mut self, on_error: OnError, rate: f64, min_calls: u64) -> Self {
        self.on_error = on_error;
        self.rollback_error_rate = rate;
        self.rollback_min_calls = min_calls;
        self
    }

    /// Pool names in configuration order.
    pub fn pool_names(&self) -> &[String] {
        &self.names
    }

    fn policies(&self) -> RwLockReadGuard<'_, Policies> {
        self.policies.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn policies_mut(&self) -> RwLockWriteGuard<'_, Policies> {
        self.policies
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The policy new requests are routed by.
    pub fn policy(&self) -> Option<Arc<Policy>> {
        self.policies().active.clone()
    }

    /// The policy a rollback would return to.
    pub fn previous_policy(&self) -> Option<Arc<Policy>> {
        self.policies().previous.clone()
    }

    /// Routes new requests by `policy`; requests already routed finish on
    /// the version they hold. The replaced one is kept for a rollback.
    pub fn swap_policy(&self, policy: Arc<Policy>) {
        let mut policies = self.policies_mut();
        let old = policies.active.replace(policy);
        self.calls.store(0, Ordering::SeqCst);
        self.errors.store(0, Ordering::SeqCst);
        if old.is_some() {
            policies.previous = old;
        }
    }

    /// Takes over `other`'s active and previous policy, for a reloaded
    /// configuration that loads the same plugin: a version swapped in
    /// since start keeps routing, and a rollback still has somewhere to go.
    pub fn adopt_policies(&self, other: &Router) {
        let theirs = other.policies().clone();
        *self.policies_mut() = theirs;
    }

    /// Swaps back to the previous policy; `None` when there is none.
    pub fn rollback_policy(&self) -> Option<Arc<Policy>> {
        let previous = self.policies_mut().previous.take()?;
        self.swap_policy(Arc::clone(&previous));
        Some(previous)
    }

    /// Chooses the pool for `request`.
    pub fn route(&self, request: &ApiRequest, headers: &Arc<HeaderMap>) -> Result<Route, ApiError> {
        // The request keeps this `Arc` to its end, so its review runs on
        // the same plugin version as its route, whatever a reload does.
        let (policy, counted) = {
            let policies = self.policies();
            let counted = self.rollback_error_rate > 0.0 && policies.previous.is_some();
            (policies.active.clone(), counted)
        };
        let Some(policy) = policy else {
            return self.default_route(request);
        };
        let summary = Arc::new(request.route_request(headers));
        let outcome = self.call_plugin(&policy, || policy.route(&summary));
        if counted {
            self.count_call(&policy, outcome.is_err());
        }

        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => return self.call_failed(&policy, &e, request, summary),
        };
        self.apply(policy, outcome, request, summary)
    }

    /// A failed call, handled as `policy.on_error` says.
    fn call_failed(
        &self,
        policy: &Policy,
        e: &switchyard_policy::CallError,
        request: &ApiRequest,
        summary: Arc<RouteRequest>,
    ) -> Result<Route, ApiError> {
        tracing::warn!(
            plugin = policy.name(),
            version = policy.version(),
            kind = e.kind(),
            error = %e,
            on_error = self.on_error.as_str(),
            "policy call failed"
        );
        metrics::record_policy_error(policy.name(), e.kind());
        match self.on_error {
            OnError::DefaultRoute => self.failure_route(request),
            OnError::Reject => {
                let message = format!("the routing policy failed: {e}");
                Err(ApiError::new(ErrorKind::PolicyFailed, message))
            }
            OnError::Previous => {
                let Some(previous) = self.previous_policy() else {
                    return self.failure_route(request);
                };
                match self.call_plugin(&previous, || previous.route(&summary)) {
                    Ok(outcome) => self.apply(previous, outcome, request, summary),
                    Err(_) => self.failure_route(request),
                }
            }
        }
    }

    /// Counts a call of `policy` and rolls a swapped-in version back when
    /// its share of failures passes `policy.rollback_error_rate`. Calls
    /// made while there is no previous version need no counting: nothing
    /// can be rolled back, and the swap that brings one resets the counts.
    fn count_call(&self, policy: &Arc<Policy>, failed: bool) {
        let active = self.policy().is_some_and(|p| Arc::ptr_eq(&p, policy));
        if !active {
            return;
        }
        let calls = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let errors = if failed {
            self.errors.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.errors.load(Ordering::SeqCst)
        };
        let rate = errors as f64 / calls as f64;
        let over = self.rollback_error_rate > 0.0
            && calls >= self.rollback_min_calls
            && rate > self.rollback_error_rate;
        if !over || self.previous_policy().is_none() {
            return;
        }
        if let Some(restored) = self.rollback_policy() {
            tracing::warn!(
                plugin = policy.name(),
                version = policy.version(),
                restored = restored.version(),
                calls,
                errors,
                "policy plugin failed too often; rolled back automatically"
            );
        }
    }

    /// Turns a plugin's answer into a route.
    fn apply(
        &self,
        policy: Arc<Policy>,
        outcome: RouteOutcome,
        request: &ApiRequest,
        summary: Arc<RouteRequest>,
    ) -> Result<Route, ApiError> {
        match outcome {
            RouteOutcome::Route(decision) => match self.pools.get(&decision.pool) {
                Some(pool) => {
                    let escalate_to = self.escalation_pool(&policy, decision.escalate_to);
                    Ok(Route {
                        pool: pool.clone(),
                        max_tokens_cap: decision.max_tokens_cap,
                        escalate_to,
                        priority: priority_hint(&decision.attributes),
                        attributes: decision.attributes,
                        policy: Some(policy),
                        summary: Some(summary),
                    })
                }
                // Passing the client's model through as the pool is a
                // plugin's normal answer; no such pool is the client's
                // mistake, not the plugin's.
                None if decision.pool == request.model => self.default_route(request),
                None => {
                    tracing::warn!(
                        plugin = policy.name(),
                        pool = %cut_for_log(&decision.pool),
                        "policy chose a pool that does not exist; \
                         taking the default route"
                    );
                    metrics::record_policy_error(policy.name(), "unknown_pool");
                    self.failure_route(request)
                }
            },
            RouteOutcome::Reject { status, message } => {
                // The client gets at most what a log line would carry: a
                // plugin's bug must not become a megabyte error body.
                let message = cut_for_log(&message).to_owned();
                Err(ApiError::new(ErrorKind::PolicyRejected(status), message))
            }
        }
    }

    /// Whether `pool` names a configured pool.
    pub fn has_pool(&self, pool: &str) -> bool {
        self.pools.contains(pool)
    }

    /// The escalation pool of a decision, if it names a configured pool; a
    /// bad name is the plugin's mistake, so the request is served without
    /// a cascade rather than failed.
    fn escalation_pool(&self, policy: &Policy, pool: Option<String>) -> Option<String> {
        let pool = pool?;
        if self.pools.contains(&pool) {
            return Some(pool);
        }
        tracing::warn!(
            plugin = policy.name(),
            pool = %cut_for_log(&pool),
            "policy chose an escalation pool that does not exist; \
             serving without the cascade"
        );
        metrics::record_policy_error(policy.name(), "unknown_pool");
        None
    }

    /// Where a request goes when the policy failed: its default route
    /// when it has one, else `policy.fallback_pool` when one is set.
    fn failure_route(&self, request: &ApiRequest) -> Result<Route, ApiError> {
        let fallback = self
            .fallback_pool
            .as_ref()
            .and_then(|name| self.pools.get(name));
        let captured = request.captured_pool.is_some();
        match (self.pools.get(&request.model), fallback) {
            (None, Some(pool)) if !captured => Ok(Route::to(pool)),
            _ => self.default_route(request),
        }
    }

    /// The pool whose server a captured connection was opened to, else
    /// the pool named by the request's `model`.
    fn default_route(&self, request: &ApiRequest) -> Result<Route, ApiError> {
        if let Some(pool) = &request.captured_pool {
            if let Some(pool) = self.pools.get(pool) {
                return Ok(Route::to(pool));
            }
        }
        let model = &request.model;
        match self.pools.get(model) {
            Some(pool) => Ok(Route::to(pool)),
            None => {
                let message = format!(
                    "no pool serves model {model:?}; pools: {}",
                    self.names.join(", ")
                );
                Err(ApiError {
                    param: Some("model"),
                    ..ApiError::new(ErrorKind::ModelNotFound, message)
                })
            }
        }
    }
}

/// `SLOW_CALLS_IN_A_ROW` plugin calls in a row that each took longer than
/// this send the next `OFF_THREAD_AFTER_SLOW` calls off the workers. Well
/// above a warm call (microseconds) and above most time slices a busy
/// machine takes away from a thread.
const SLOW_PLUGIN_CALL: Duration = Duration::from_millis(5);
const OFF_THREAD_AFTER_SLOW: u64 = 100;
/// Slow is wall-clock time, so a worker descheduled in the middle of a
/// quick call looks slow too; on a machine with more busy threads than
/// cores that happens to about one call in a thousand, and each false
/// alarm would cost 100 hand-offs (tens to hundreds of microseconds
/// each). A plugin that is slow is slow every time; two in a row tell it
/// from such chance delays.
const SLOW_CALLS_IN_A_ROW: u64 = 2;
/// Plugins allowed more than this per call (`policy.timeout_ms`) always
/// run off the workers: a worker held that long would stall the requests
/// queued on it. The default budget, 50 ms, is within it.
const INLINE_MAX_BUDGET: Duration = Duration::from_millis(50);

/// Where plugin calls run. Handing the worker thread's other tasks to
/// another thread (`block_in_place`) costs several times a warm call
/// (microseconds), so a call within `INLINE_MAX_BUDGET` runs on the
/// worker thread that made it, each worker with its own warm instance
/// (see `Policy::route`), never waiting for another call. After
/// `SLOW_CALLS_IN_A_ROW` calls that each took longer than
/// `SLOW_PLUGIN_CALL`, the next `OFF_THREAD_AFTER_SLOW` calls move the
/// worker's tasks away first.
// Limitation: until the slow calls that start the cool-down have ended,
// every worker may be in a slow call, so a plugin that turns slow can
// hold each worker for up to two calls' budget (at most
// `INLINE_MAX_BUDGET` each) before the cool-down begins, and again once
// per `OFF_THREAD_AFTER_SLOW` calls.
#[derive(Debug)]
struct InlineGate {
    /// Calls still to send off the workers after slow ones.
    off_thread: AtomicU64,
    /// Calls in a row, of any worker, that took over `SLOW_PLUGIN_CALL`.
    slow_in_a_row: AtomicU64,
}

impl InlineGate {
    fn new() -> Self {
        InlineGate {
            off_thread: AtomicU64::new(0),
            slow_in_a_row: AtomicU64::new(0),
        }
    }

    /// Runs `call`, which may take up to `budget`; returns its result and
    /// how long it took, handing-off included.
    fn call<T>(&self, budget: Duration, call: impl FnOnce() -> T) -> (T, Duration) {
        let started = Instant::now();
        if !self.inline(budget) {
            let result = call_blocking(call);
            return (result, started.elapsed());
        }
        let result = call();
        let took = started.elapsed();
        self.count_slow(took > SLOW_PLUGIN_CALL);
        (result, took)
    }

    /// Counts an inline call that was `slow` or not, and starts the
    /// cool-down after `SLOW_CALLS_IN_A_ROW` slow ones.
    fn count_slow(&self, slow: bool) {
        if !slow {
            // A plain load first, as in `inline`: a quick call after a
            // quick call writes nothing.
            if self.slow_in_a_row.load(Ordering::Relaxed) != 0 {
                self.slow_in_a_row.store(0, Ordering::Relaxed);
            }
            return;
        }
        let in_a_row = self.slow_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if in_a_row >= SLOW_CALLS_IN_A_ROW {
            self.slow_in_a_row.store(0, Ordering::Relaxed);
            self.off_thread
                .store(OFF_THREAD_AFTER_SLOW, Ordering::Relaxed);
        }
    }

    /// Whether a call with `budget` may run on the calling worker thread.
    fn inline(&self, budget: Duration) -> bool {
        if budget > INLINE_MAX_BUDGET {
            return false;
        }
        // A plain load first: the cool-down is rare, and a write on every
        // call would bounce this cache line between the workers.
        if self.off_thread.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let cooling = self
            .off_thread
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        !cooling
    }
}

/// Runs a synchronous call that may block for a while. On a
/// multi-threaded runtime the worker's other tasks move to another
/// thread first, so a long call delays only its own request.
pub(crate) fn call_blocking<T>(call: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi_thread = Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(call)
    } else {
        call()
    }
}

/// The priority a policy set in its route's attributes: `low`, `normal`
/// and `high` (the SDK's names) are 2, 5 and 8; a number is clamped to
/// 0..=9; anything else is ignored.
fn priority_hint(attributes: &[(String, String)]) -> Option<u8> {
    let (_, value) = attributes
        .iter()
        .find(|(key, _)| key == "switchyard.priority")?;
    match value.trim() {
        "low" => Some(2),
        "normal" => Some(5),
        "high" => Some(8),
        number => number.parse::<u8>().ok().map(|p| p.min(9)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_policy::Endpoint;

    fn attrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn chat(model: &str, captured_pool: Option<&str>) -> ApiRequest {
        let body =
            format!(r#"{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}"#);
        let mut request = ApiRequest::parse(Endpoint::ChatCompletions, body.as_bytes()).unwrap();
        request.captured_pool = captured_pool.map(str::to_string);
        request
    }

    #[test]
    fn a_captured_pool_is_the_default_route_whatever_the_model() {
        let names = vec!["vllm".to_string(), "small".to_string()];
        let router = Router::new(names, None, Some("small".to_string()));
        let headers = Arc::new(HeaderMap::new());

        let captured = chat("meta-llama/Llama-3.1-8B-Instruct", Some("vllm"));
        assert_eq!(router.route(&captured, &headers).unwrap().pool, "vllm");
        let named = chat("small", Some("vllm"));
        assert_eq!(router.route(&named, &headers).unwrap().pool, "vllm");
        // A failed policy call keeps a captured request on its pool rather
        // than the fallback.
        assert_eq!(router.failure_route(&captured).unwrap().pool, "vllm");

        let explicit = chat("meta-llama/Llama-3.1-8B-Instruct", None);
        let err = router.route(&explicit, &headers).unwrap_err();
        assert_eq!(err.kind, ErrorKind::ModelNotFound);
        assert_eq!(router.failure_route(&explicit).unwrap().pool, "small");
    }

    #[test]
    fn plugin_calls_run_on_their_worker_thread_even_while_another_does() {
        let gate = InlineGate::new();
        let budget = Duration::from_millis(1);
        let (nested, _) = gate.call(budget, || gate.call(budget, || gate.inline(budget)));
        assert!(nested.0, "a call during another call leaves its worker");
    }

    #[test]
    fn a_plugin_with_a_long_budget_never_runs_on_a_worker_thread() {
        let gate = InlineGate::new();
        assert!(!gate.inline(INLINE_MAX_BUDGET * 2));
        assert!(gate.inline(INLINE_MAX_BUDGET));
    }

    #[test]
    fn after_slow_plugin_calls_in_a_row_calls_leave_the_worker_thread() {
        let gate = InlineGate::new();
        let budget = INLINE_MAX_BUDGET;
        for _ in 0..SLOW_CALLS_IN_A_ROW {
            assert!(gate.inline(budget), "before the slow calls end");
            gate.call(budget, || std::thread::sleep(SLOW_PLUGIN_CALL * 2));
        }
        for _ in 0..OFF_THREAD_AFTER_SLOW {
            assert!(!gate.inline(budget), "inside the cool-down");
        }
        assert!(gate.inline(budget), "after the cool-down");
    }

    #[test]
    fn one_slow_call_between_quick_ones_keeps_calls_on_the_worker_thread() {
        let gate = InlineGate::new();
        for _ in 0..SLOW_CALLS_IN_A_ROW * 3 {
            gate.count_slow(true);
            gate.count_slow(false);
        }
        assert!(
            gate.inline(INLINE_MAX_BUDGET),
            "a descheduled worker is not a slow plugin"
        );
    }

    #[test]
    fn a_policys_priority_attribute_becomes_the_routes_priority() {
        assert_eq!(
            priority_hint(&attrs(&[("switchyard.priority", "7")])),
            Some(7)
        );
        assert_eq!(
            priority_hint(&attrs(&[("switchyard.priority", " 42 ")])),
            Some(9)
        );
        assert_eq!(
            priority_hint(&attrs(&[("switchyard.priority", "high")])),
            Some(8)
        );
        assert_eq!(
            priority_hint(&attrs(&[("switchyard.priority", "low")])),
            Some(2)
        );
        assert_eq!(
            priority_hint(&attrs(&[("switchyard.priority", "urgent")])),
            None
        );
        assert_eq!(
            priority_hint(&attrs(&[("switchyard.label.team", "a")])),
            None
        );
    }
}
