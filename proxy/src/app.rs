//! The API request path: read and check the body, route it, send it to the
//! pool (through its coalescer where it can be batched), and answer, with
//! one log line and the request metrics for every request.
//!
//! Listeners and connections are `server`'s business; this module sees one
//! request at a time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use switchyard_policy::Endpoint;

use crate::api::ApiRequest;
use crate::body::{full, Body};
use crate::cascade;
use crate::coalesce::{
    self, BatchReply, BatchSettings, Coalescer, Permit, StreamReply, Ticket, DEADLINE_HEADER,
};
use crate::config::{CascadeConfig, Config, PoolConfig, PoolKind};
use crate::costs::{usage_of, Ledger, MeteredBody};
use crate::error::{ApiError, ErrorKind};
use crate::local::LocalPool;
use crate::metrics;
use crate::routing::Router;
use crate::scaling::{Busy, Scaler, SERVED_BY_HEADER};
use crate::telemetry::cut_for_log;
use crate::transparent::{Capture, CaptureTable};
use crate::upstream::{copy_response_headers, hop, Pool};

/// Names the pool that served a response.
pub const POOL_HEADER: &str = "x-switchyard-pool";
/// Items in the upstream request that carried a coalesced request.
pub const BATCH_SIZE_HEADER: &str = "x-switchyard-batch-size";
/// What the request cost in dollars, every answer it took included
/// (`[costs] header`).
pub const COST_HEADER: &str = "x-switchyard-cost-usd";
/// What the baseline pool would have charged for the served answer.
pub const BASELINE_COST_HEADER: &str = "x-switchyard-baseline-cost-usd";

/// Why a request that came back to the process that sent it upstream
/// is refused.
const LOOP_MESSAGE: &str = "request loop: this request was sent upstream by this \
     Switchyard and came back to it; most likely its own upstream traffic is \
     being redirected back to it; run Switchyard as the uid given to \
     `switchyard iptables --uid` (or a pool's endpoint is Switchyard's own \
     address)";

/// Everything the request path needs, shared by all connections.
#[derive(Debug)]
pub struct App {
    router: Router,
    upstreams: HashMap<String, Arc<Pool>>,
    locals: HashMap<String, Arc<LocalPool>>,
    coalescers: HashMap<String, Coalescer>,
    /// Pools with a `[pool.scaler]`: their lifecycle and fallback.
    scaled: HashMap<String, Scaled>,
    cascade: CascadeConfig,
    ledger: Arc<Ledger>,
    /// `[costs] header`: answer with the cost headers.
    cost_header: bool,
    max_body_bytes: u64,
    body_read_timeout: Duration,
    /// Which pool a redirected connection's original destination is.
    captures: CaptureTable,
}

/// What the log line and metrics say about one request.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// The pool that answered (the escalation pool after an escalation).
    pub(crate) pool: Option<String>,
    pub(crate) batch_size: Option<usize>,
    pub(crate) error: Option<String>,
    /// Cascaded requests: whether the escalation pool answered.
    pub(crate) escalated: Option<bool>,
    /// Cascaded requests: the review's verdict and reason, as
    /// `accept` or `escalate:<reason>`.
    pub(crate) review: Option<String>,
    /// The queue priority the route set (`switchyard.priority`), for the
    /// log line and for coalescing pools' queues.
    pub(crate) priority: Option<u8>,
    /// The route's `switchyard.label.*` hints, as `name=value,...`.
    pub(crate) labels: Option<String>,
    /// What the request's answers cost so far, when `[costs] header` is
    /// on; `None` once an answer streams past before its cost is known.
    pub(crate) cost: Option<Cost>,
}

/// Dollars spent on one request, for the cost headers.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Cost {
    /// Every answer the request took, a cascade's small one included.
    pub(crate) usd: f64,
    /// What the baseline pool would have charged for the served answer.
    pub(crate) baseline_usd: f64,
}

/// A pool that scales to zero: its scaler, and the pool that answers for
/// it when a request cannot wait.
#[derive(Debug, Clone)]
struct Scaled {
    scaler: Arc<Scaler>,
    fallback: Option<String>,
}

/// Where the activator sends a request for a scaled pool.
enum Activation<'a> {
    /// To the pool, which is ready; the guard counts it in flight.
    Ready(Busy),
    /// To the named fallback pool, at once.
    Fallback(&'a str),
}

/// What a reload did to the pools.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PoolChanges {
    /// Pools built anew: added, or changed (their old one drains).
    pub started: Vec<String>,
    /// Pools whose settings did not change, taken over running.
    pub reused: Vec<String>,
    /// Pools of the old configuration that no longer serve new requests:
    /// removed or replaced. They drain as their last requests end.
    pub stopped: Vec<String>,
}

impl App {
    /// Builds pools, coalescers and the router from a validated
    /// configuration. Must run inside a tokio runtime (coalescers are
    /// tasks).
    pub fn new(config: &Config, policy: Option<switchyard_policy::Policy>) -> Result<Self, String> {
        let ledger = Arc::new(Ledger::new(config));
        let (app, _) = Self::build(config, policy, ledger, None)?;
        Ok(app)
    }

    /// Builds the App of a reloaded configuration. A pool whose settings
    /// did not change (its price aside) is taken over from `old` running:
    /// its connections, its coalescer's queue and fitted costs, a local
    /// pool's loaded model. The rest start anew. The cost ledger is
    /// `old`'s, so totals carry over; its prices are the caller's to
    /// change when this App takes over. Blocks while a local pool loads
    /// its model; must run where tokio tasks can be spawned.
    pub fn reload(
        config: &Config,
        policy: Option<switchyard_policy::Policy>,
        old: &App,
        old_config: &Config,
    ) -> Result<(Self, PoolChanges), String> {
        Self::build(config, policy, old.ledger(), Some((old, old_config)))
    }

    fn build(
        config: &Config,
        policy: Option<switchyard_policy::Policy>,
        ledger: Arc<Ledger>,
        previous: Option<(&App, &Config)>,
    ) -> Result<(Self, PoolChanges), String> {
        let mut names = Vec::new();
        let mut upstreams = HashMap::new();
        let mut locals = HashMap::new();
        let mut coalescers = HashMap::new();
        let mut scaled = HashMap::new();
        let mut changes = PoolChanges::default();
        for pool_config in &config.pool {
            let name = pool_config.name.clone();
            names.push(name.clone());

            // An unchanged pool keeps running: same handles, same tasks.
            let unchanged = previous.filter(|(_, old_config)| {
                let old = old_config.pool.iter().find(|p| p.name == name);
                old.is_some_and(|old| same_pool(old, pool_config))
            });
            if let Some((old, _)) = unchanged {
                if let Some(local) = old.locals.get(&name) {
                    locals.insert(name.clone(), Arc::clone(local));
                }
                if let Some(pool) = old.upstreams.get(&name) {
                    upstreams.insert(name.clone(), Arc::clone(pool));
                }
                if let Some(coalescer) = old.coalescers.get(&name) {
                    coalescers.insert(name.clone(), coalescer.clone());
                }
                // The scaler keeps its server, state and learned starts.
                if let Some(old_scaled) = old.scaled.get(&name) {
                    scaled.insert(name.clone(), old_scaled.clone());
                }
                changes.reused.push(name);
                continue;
            }

            // Limitation: a changed pool's old coalescer keeps sending
            // its queued requests while the new one starts, so for a
            // moment the upstream may see up to twice max_inflight.
            changes.started.push(name.clone());
            if pool_config.kind == PoolKind::Local {
                let model = pool_config.upstream_model().to_string();
                let chat_max_tokens = pool_config
                    .default_max_tokens
                    .unwrap_or(crate::config::DEFAULT_LOCAL_CHAT_MAX_TOKENS);
                let engine = pool_config.engine_config();
                let local = LocalPool::start(engine, model, chat_max_tokens)?;
                locals.insert(name, Arc::new(local));
                continue;
            }
            let pool = Arc::new(Pool::new(pool_config)?);
            pool.start_health_checks();
            // Limitation: a changed scaled pool starts cold while its old
            // scaler stops its server only once the old configuration's
            // last request ends; if both run the same command on the same
            // port, the new server may fail to bind until then.
            if let Some(scaler) = &pool_config.scaler {
                let deadline = pool_config.default_deadline_ms;
                let scaler = Scaler::start(Arc::clone(&pool), scaler.clone(), deadline);
                let fallback = pool_config.fallback.clone();
                scaled.insert(name.clone(), Scaled { scaler, fallback });
            }
            if let Some(batch) = &pool_config.batch {
                let settings = BatchSettings::from_config(batch);
                let coalescer = Coalescer::start(Arc::clone(&pool), settings);
                coalescers.insert(pool.name.clone(), coalescer);
            }
            upstreams.insert(pool.name.clone(), pool);
        }
        if let Some((_, old_config)) = previous {
            changes.stopped = old_config
                .pool
                .iter()
                .map(|p| p.name.clone())
                .filter(|name| !changes.reused.contains(name))
                .collect();
        }

        let fallback_pool = config.policy.as_ref().and_then(|p| p.fallback_pool.clone());
        let mut router = Router::new(names, policy, fallback_pool);
        if let Some(p) = &config.policy {
            router = router.with_failure_handling(
                p.on_error,
                p.rollback_error_rate,
                p.rollback_min_calls,
            );
        }
        let cascade = config
            .policy
            .as_ref()
            .map(|p| p.cascade.clone())
            .unwrap_or_default();
        let app = Self {
            router,
            upstreams,
            locals,
            coalescers,
            scaled,
            cascade,
            ledger,
            cost_header: config.costs.header,
            max_body_bytes: config.server.max_body_bytes,
            body_read_timeout: Duration::from_millis(config.server.body_read_timeout_ms),
            captures: CaptureTable::from_config(config),
        };
        Ok((app, changes))
    }

    /// Answers one API request. Never fails: errors become OpenAI error
    /// responses here.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        self.handle_on(request, None).await
    }

    /// Answers one request of a connection on the transparent listener:
    /// served by the captured pool, or refused as `capture` says.
    pub async fn handle_captured(
        &self,
        request: Request<Incoming>,
        capture: &Capture,
    ) -> Response<Body> {
        self.handle_on(request, Some(capture)).await
    }

    async fn handle_on(
        &self,
        request: Request<Incoming>,
        capture: Option<&Capture>,
    ) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let endpoint = Endpoint::from_path(&path);
        // Logs and counts the request even if the client leaves first and
        // this future is dropped mid-way.
        let mut record = RequestRecord::new(&method, &path, endpoint);
        let captured_pool = capture.and_then(Capture::pool);
        let refused = match capture {
            Some(Capture::Refused(error)) => Some(error.clone()),
            _ => None,
        };
        // Answered at once: forwarding it again would only go round until
        // the connection limit.
        let refused = if hop::is_own_loop(request.headers()) {
            tracing::error!(%method, path, "{LOOP_MESSAGE}");
            Some(ApiError::new(ErrorKind::LoopDetected, LOOP_MESSAGE))
        } else {
            refused
        };

        let result = match (refused, &method, path.as_str(), endpoint) {
            // Every request of a captured connection no pool serves.
            (Some(error), ..) => Err(error),
            (None, &Method::POST, _, Some(endpoint)) => {
                let outcome = &mut record.outcome;
                self.proxy(endpoint, request, captured_pool, outcome).await
            }
            (None, &Method::GET, "/v1/models", _) => Ok(self.models()),
            (None, _, "/v1/models", _) | (None, _, _, Some(_)) => Err(ApiError::new(
                ErrorKind::MethodNotAllowed,
                format!("{method} is not allowed on {path}"),
            )),
            (None, ..) => Err(ApiError::new(
                ErrorKind::NotFound,
                format!("no such endpoint: {method} {path:?}"),
            )),
        };
        let mut response = match result {
            Ok(response) => response,
            Err(e) => {
                record.outcome.error = Some(e.message.clone());
                e.into_response()
            }
        };
        // Errors after routing name the pool too, for whoever debugs them.
        if let Some(pool) = &record.outcome.pool {
            if !response.headers().contains_key(POOL_HEADER) {
                set_header(&mut response, POOL_HEADER, pool);
            }
        }
        if let (Some(cost), true) = (record.outcome.cost, response.status().is_success()) {
            set_header(&mut response, COST_HEADER, &format!("{:.9}", cost.usd));
            if self.ledger.has_baseline() {
                let baseline = format!("{:.9}", cost.baseline_usd);
                set_header(&mut response, BASELINE_COST_HEADER, &baseline);
            }
        }

        record.finish(response.status().as_u16());
        response
    }

    async fn proxy(
        &self,
        endpoint: Endpoint,
        request: Request<Incoming>,
        captured_pool: Option<&str>,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, ApiError> {
        let (parts, body) = request.into_parts();
        // Shared with what the routing policy may read.
        let headers = Arc::new(parts.headers);
        if self.cost_header {
            outcome.cost = Some(Cost::default());
        }
        let reading = read_body(body, &headers, self.max_body_bytes);
        let bytes = match tokio::time::timeout(self.body_read_timeout, reading).await {
            Ok(bytes) => bytes?,
            Err(_) => {
                let message = format!(
                    "request body not received within {} ms \
                     (server.body_read_timeout_ms)",
                    self.body_read_timeout.as_millis()
                );
                return Err(ApiError::new(ErrorKind::BodyTimeout, message));
            }
        };
        let mut api = ApiRequest::parse(endpoint, &bytes)?;
        api.query = parts.uri.query().map(str::to_string);
        api.captured_pool = captured_pool.map(str::to_string);

        let mut route = self.router.route(&api, &headers)?;
        outcome.pool = Some(route.pool.clone());
        outcome.priority = route.priority;
        let cascading = cascade::applies(&route, &api);
        if !cascading {
            // Only a review reads the request summary again. Dropped now,
            // it no longer shares the body, which the changes below and
            // the upstream's model name then make in place, uncopied.
            route.summary = None;
        }
        if let Some(cap) = route.max_tokens_cap {
            api.cap_max_tokens(cap);
        }
        apply_hints(&mut api, &route.attributes, outcome);
        if cascading {
            let settings = &self.cascade;
            return cascade::serve(self, settings, &headers, api, route, outcome).await;
        }
        self.dispatch(&route.pool, &headers, api, outcome, true)
            .await
    }

    /// Which pool serves a connection redirected to the transparent
    /// listener, by the address it was opened to.
    pub fn captures(&self) -> &CaptureTable {
        &self.captures
    }

    /// The cost ledger, for the admin port.
    pub fn ledger(&self) -> Arc<Ledger> {
        Arc::clone(&self.ledger)
    }

    /// The router, whose policy the admin port may swap.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Whether `pool` names a configured pool.
    pub(crate) fn has_pool(&self, pool: &str) -> bool {
        self.router.has_pool(pool)
    }

    /// Sends `api` to `pool` and charges a successful answer to the
    /// ledger as it passes; `served` says the client gets this answer (a
    /// cascade's small answer is charged, but served only if accepted).
    pub(crate) async fn dispatch(
        &self,
        pool: &str,
        headers: &HeaderMap,
        api: ApiRequest,
        outcome: &mut Outcome,
        served: bool,
    ) -> Result<Response<Body>, ApiError> {
        let Some(scaled) = self.scaled.get(pool) else {
            return self.dispatch_to(pool, headers, api, outcome, served).await;
        };

        // A scaled pool takes the request once ready; one that cannot
        // wait goes to the fallback.
        match activate(scaled, pool, headers).await? {
            Activation::Ready(busy) => {
                let response = self.dispatch_to(pool, headers, api, outcome, served);
                let (parts, body) = response.await?.into_parts();
                Ok(Response::from_parts(parts, busy.hold(body)))
            }
            Activation::Fallback(fallback) => {
                outcome.pool = Some(fallback.to_string());
                let response = self.dispatch_to(fallback, headers, api, outcome, served);
                let mut response = response.await?;
                set_header(&mut response, SERVED_BY_HEADER, "fallback");
                Ok(response)
            }
        }
    }

    /// The lifecycle of every pool, for `GET /admin/pools`: a scaled
    /// pool's state, desired replicas and cold starts; `scaler: null` for
    /// a pool that is always up.
    pub fn pools_report(&self) -> Value {
        let pools: Vec<Value> = self
            .router
            .pool_names()
            .iter()
            .map(|name| match self.scaled.get(name) {
                Some(scaled) => {
                    let mut report = scaled.scaler.report();
                    if let Some(object) = report.as_object_mut() {
                        object.insert("name".to_string(), json!(name));
                        object.insert("fallback".to_string(), json!(scaled.fallback));
                    }
                    report
                }
                None => json!({"name": name, "scaler": null}),
            })
            .collect();
        json!({ "pools": pools })
    }

    /// Tells every scaled pool to take no more work: what is held for a
    /// cold pool leaves now (to its fallback, or 503), what runs finishes.
    pub fn retire_scalers(&self) {
        for scaled in self.scaled.values() {
            scaled.scaler.retire();
        }
    }

    /// Retires the scaled pools among `names` (see `retire_scalers`).
    pub fn retire_scalers_of(&self, names: &[String]) {
        for name in names {
            if let Some(scaled) = self.scaled.get(name) {
                scaled.scaler.retire();
            }
        }
    }

    /// Stops every scaled pool's server and waits for them: Switchyard is
    /// shutting down.
    pub async fn stop_scalers(&self) {
        for scaled in self.scaled.values() {
            scaled.scaler.shutdown().await;
        }
    }

    /// `dispatch` past the activator: sends `api` to `pool` as it is.
    async fn dispatch_to(
        &self,
        pool: &str,
        headers: &HeaderMap,
        api: ApiRequest,
        outcome: &mut Outcome,
        served: bool,
    ) -> Result<Response<Body>, ApiError> {
        let stream = api.stream;
        let in_flight = self.ledger.begin(pool);
        let response = self.send_to_pool(pool, headers, api, outcome).await?;
        if !response.status().is_success() {
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let Some(cost) = outcome.cost.as_mut().filter(|_| !stream) else {
            // A streamed answer's cost is known only at its end, after
            // the headers went out.
            outcome.cost = None;
            let body = MeteredBody::new(body, stream, served, in_flight).boxed();
            return Ok(Response::from_parts(parts, body));
        };

        // The cost header needs the answer's usage before the answer's
        // headers go out, so it is read whole here.
        let bytes = cascade::read_limited(body).await.map_err(|e| {
            let message = format!("pool {pool:?}: {e}");
            ApiError::new(ErrorKind::UpstreamInvalid, message)
        })?;
        let usage = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|value| usage_of(&value))
            .unwrap_or_default();
        cost.usd += self.ledger.charge(pool, usage, false);
        if served {
            cost.baseline_usd += self.ledger.serve(pool, usage);
        }
        drop(in_flight);
        Ok(Response::from_parts(parts, full(bytes)))
    }

    /// Sends `api` to `pool`: the in-process executor, the pool's
    /// coalescer, or straight upstream.
    async fn send_to_pool(
        &self,
        pool: &str,
        headers: &HeaderMap,
        mut api: ApiRequest,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, ApiError> {
        let endpoint = api.endpoint;
        if let Some(local) = self.locals.get(pool) {
            let mut response = local.handle(api).await?;
            set_header(&mut response, POOL_HEADER, pool);
            return Ok(response);
        }
        let Some(pool) = self.upstreams.get(pool) else {
            let message = format!("pool {pool:?} was routed to but is not configured");
            return Err(ApiError::new(ErrorKind::Internal, message));
        };
        // The client of a captured connection named the model its server
        // knows; it goes there as written.
        if api.captured_pool.as_deref() != Some(pool.name.as_str()) {
            let model = Value::from(pool.model.clone());
            Arc::make_mut(&mut api.body).insert("model".to_string(), model);
        }

        let Some(coalescer) = self.coalescers.get(&pool.name) else {
            return forward(pool, endpoint, headers, api, None).await;
        };

        // Every request to a coalescing pool queues; completions (streams
        // included) and embeddings merge, chat goes alone.
        let ticket = Ticket::from_headers(headers, coalescer.settings())?
            .with_route_priority(outcome.priority);
        match api.items_field() {
            Some(_) if !api.stream => {
                let reply = coalescer.submit(api, headers, ticket).await?;
                Ok(batch_response(reply, &pool.name, outcome))
            }
            Some(_) if endpoint == Endpoint::Completions => {
                let reply = coalescer.submit_stream(api, headers, ticket);
                let (body, batch_items) = match reply.await? {
                    StreamReply::Whole(reply) => {
                        return Ok(batch_response(reply, &pool.name, outcome))
                    }
                    StreamReply::Events { body, batch_items } => (body, batch_items),
                };
                outcome.batch_size = Some(batch_items);
                let mut response = Response::new(body);
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                set_header(&mut response, POOL_HEADER, &pool.name);
                set_header(&mut response, BATCH_SIZE_HEADER, &batch_items.to_string());
                Ok(response)
            }
            _ => {
                let permit = coalescer.acquire(endpoint, ticket).await?;
                forward(pool, endpoint, headers, api, Some(permit)).await
            }
        }
    }

    /// `GET /v1/models`: the pools, as models a client may ask for.
    fn models(&self) -> Response<Body> {
        let data: Vec<Value> = self
            .router
            .pool_names()
            .iter()
            .map(|name| json!({"id": name, "object": "model", "owned_by": "switchyard"}))
            .collect();
        let body = json!({"object": "list", "data": data});
        json_response(Bytes::from(body.to_string()))
    }
}

/// The activator: lets a request through to a scaled pool once it is
/// ready (holding it meanwhile), or names the fallback that answers at
/// once, or refuses it with 503 and `Retry-After`.
async fn activate<'a>(
    scaled: &'a Scaled,
    pool: &str,
    headers: &HeaderMap,
) -> Result<Activation<'a>, ApiError> {
    let deadline = deadline_of(headers)?;
    let diverted = match scaled.scaler.admit(deadline).await {
        Ok(busy) => return Ok(Activation::Ready(busy)),
        Err(diverted) => diverted,
    };
    let reason = diverted.reason.describe();
    if let (Some(fallback), true) = (&scaled.fallback, diverted.reason.may_fall_back()) {
        scaled.scaler.record_fallback();
        tracing::debug!(pool, fallback = %fallback, reason, "sent to the fallback pool");
        return Ok(Activation::Fallback(fallback));
    }
    let retry_after = diverted.retry_after.max(Duration::from_secs(1));
    let message = format!(
        "pool {pool:?} is {} and cannot take the request now: {reason}; \
         retry in {} s, or set pool.fallback to answer such requests",
        scaled.scaler.state().label(),
        retry_after.as_secs()
    );
    let mut error = ApiError::new(ErrorKind::PoolCold, message);
    error.retry_after = Some(retry_after);
    Err(error)
}

/// The request's `x-switchyard-deadline-ms`, if it sent one.
fn deadline_of(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(value) = headers.get(DEADLINE_HEADER) else {
        return Ok(None);
    };
    let ms = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    match ms {
        Some(ms) => Ok(Some(Duration::from_millis(ms))),
        None => Err(ApiError::invalid(format!(
            "{DEADLINE_HEADER} must be a whole number of milliseconds"
        ))),
    }
}

/// Whether a reloaded pool can keep running as it is: every setting but
/// its price (which is the ledger's) is the same.
fn same_pool(old: &PoolConfig, new: &PoolConfig) -> bool {
    let unpriced = |p: &PoolConfig| PoolConfig {
        price: None,
        ..p.clone()
    };
    unpriced(old) == unpriced(new)
}

/// The response to a coalesced request: the caller's share of a batch.
fn batch_response(reply: BatchReply, pool: &str, outcome: &mut Outcome) -> Response<Body> {
    outcome.batch_size = Some(reply.batch_items);
    let mut response = json_response(reply.body);
    *response.status_mut() = reply.status;
    set_header(&mut response, POOL_HEADER, pool);
    set_header(
        &mut response,
        BATCH_SIZE_HEADER,
        &reply.batch_items.to_string(),
    );
    response
}

/// Attribute keys of a route that the host reads (`sdk/wit/policy.wit`).
const SYSTEM_INSTRUCTION_KEY: &str = "switchyard.system-instruction";
const KEEP_TURNS_KEY: &str = "switchyard.keep-turns";
const LABEL_PREFIX: &str = "switchyard.label.";
/// Most labels kept per request, and longest label text, in bytes.
const MAX_LABELS: usize = 8;
const MAX_LABEL_BYTES: usize = 64;

/// Applies a route's hints: the extra system instruction and trimmed
/// history change the request; labels go to the log line. The priority is
/// the router's to read (`Route::priority`).
fn apply_hints(api: &mut ApiRequest, attributes: &[(String, String)], outcome: &mut Outcome) {
    let mut labels = Vec::new();
    for (key, value) in attributes {
        match key.as_str() {
            SYSTEM_INSTRUCTION_KEY => api.add_system_instruction(value),
            KEEP_TURNS_KEY => match value.trim().parse::<usize>() {
                Ok(turns) => api.keep_last_turns(turns),
                Err(_) => tracing::debug!(value = %value, "ignoring a bad keep-turns hint"),
            },
            _ => {
                if let Some(name) = key.strip_prefix(LABEL_PREFIX) {
                    if labels.len() < MAX_LABELS {
                        labels.push(format!("{}={}", truncated(name), truncated(value)));
                    }
                }
            }
        }
    }
    if !labels.is_empty() {
        outcome.labels = Some(labels.join(","));
    }
}

fn truncated(text: &str) -> String {
    let mut end = text.len().min(MAX_LABEL_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Sends one request upstream and passes its answer back as it arrives,
/// server-sent events included: the body is never buffered here. A queue
/// `permit` is held until the answer's body ends.
// Limitation: since the body is passed through unparsed, a 200 whose JSON
// is broken reaches the client as sent; only coalesced answers, which are
// split, get 502 `upstream_invalid_response` for it.
async fn forward(
    pool: &Pool,
    endpoint: Endpoint,
    headers: &HeaderMap,
    api: ApiRequest,
    mut permit: Option<Permit>,
) -> Result<Response<Body>, ApiError> {
    let path = api.upstream_path();
    // Serialised in place: a cascade's review may still share the body.
    let body = serde_json::to_vec(api.body.as_ref()).map_err(|e| {
        let message = format!("request body could not be encoded: {e}");
        ApiError::new(ErrorKind::Internal, message)
    })?;
    let body = Bytes::from(body);
    let sent = pool.post(&path, headers, body).await;
    if let Some(permit) = &mut permit {
        let unreachable = sent.as_ref().is_err_and(|e| e.kind.is_unreachable());
        permit.set_healthy(!unreachable);
    }
    let upstream = sent?;
    metrics::record_upstream(&pool.name, endpoint, upstream.elapsed);

    let (parts, body) = upstream.response.into_parts();
    let body = pool.watch_body(body).boxed();
    let body = match permit {
        Some(permit) => coalesce::hold(body, permit),
        None => body,
    };
    let mut response = Response::new(body);
    *response.status_mut() = parts.status;
    copy_response_headers(&parts.headers, response.headers_mut());
    set_header(&mut response, POOL_HEADER, &pool.name);
    Ok(response)
}

/// Reads the whole request body, refusing more than `limit` bytes.
async fn read_body(body: Incoming, headers: &HeaderMap, limit: u64) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::BodyTooLarge,
            format!(
                "request body is larger than {limit} bytes \
                 (server.max_body_bytes)"
            ),
        )
    };

    // A declared length over the limit is refused before reading a byte.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }

    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::invalid(format!(
            "could not read the request body: {e}"
        ))),
    }
}

fn json_response(body: Bytes) -> Response<Body> {
    let mut response = Response::new(full(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub(crate) fn set_header(response: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

/// Status logged and counted for a request whose client went away before
/// it was answered (nginx's convention; no response carries it).
const CLIENT_CLOSED: u16 = 499;

/// The log line and metrics of one request, written exactly once: by
/// `finish`, or on drop when the client left first.
#[derive(Debug)]
struct RequestRecord {
    started: Instant,
    method: Method,
    path: String,
    endpoint: &'static str,
    outcome: Outcome,
    finished: bool,
}

impl RequestRecord {
    fn new(method: &Method, path: &str, endpoint: Option<Endpoint>) -> Self {
        Self {
            started: Instant::now(),
            method: method.clone(),
            path: path.to_string(),
            endpoint: endpoint.map_or("other", Endpoint::label),
            outcome: Outcome::default(),
            finished: false,
        }
    }

    fn finish(&mut self, status: u16) {
        self.finished = true;
        let elapsed = self.started.elapsed();
        let pool = self.outcome.pool.as_deref().unwrap_or("none");
        metrics::record_request(pool, self.endpoint, status, elapsed);
        log_request(&self.method, &self.path, &self.outcome, status, elapsed);
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let elapsed = self.started.elapsed();
        let pool = self.outcome.pool.as_deref().unwrap_or("none");
        metrics::record_request(pool, self.endpoint, CLIENT_CLOSED, elapsed);
        tracing::info!(
            method = %self.method,
            path = self.path.as_str(),
            pool,
            status = CLIENT_CLOSED,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "client went away"
        );
    }
}

fn log_request(method: &Method, path: &str, outcome: &Outcome, status: u16, elapsed: Duration) {
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    let pool = outcome.pool.as_deref().unwrap_or("none");
    let batch_size = outcome.batch_size;
    let escalated = outcome.escalated;
    let review = outcome.review.as_deref();
    let priority = outcome.priority;
    let labels = outcome.labels.as_deref();
    // The error may be a plugin's rejection message, of any length.
    match outcome.error.as_deref().map(cut_for_log) {
        Some(error) if status >= 500 => tracing::warn!(
            %method, path, pool, status, latency_ms, error = %error,
            "request failed"
        ),
        Some(error) => tracing::info!(
            %method, path, pool, status, latency_ms, error = %error,
            "request rejected"
        ),
        // An upstream's own server error, passed through.
        None if status >= 500 => tracing::warn!(
            %method, path, pool, status, latency_ms, batch_size,
            "upstream failed"
        ),
        None => tracing::info!(
            %method, path, pool, status, latency_ms, batch_size, escalated,
            review, priority, labels, "request"
        ),
    }
}
