//! Coalescing and admission for `http` pools with a `[pool.batch]` table.
//!
//! Compatible `/v1/completions` and `/v1/embeddings` requests that arrive
//! close together go upstream as one request, and each caller gets back
//! exactly its own part of the answer. Every request to such a pool,
//! chat and streams included, passes one queue per pool that bounds what
//! waits (`max_queue`) and what is in flight per endpoint
//! (`max_inflight`), orders by priority with a starvation bound, shares
//! batches and slots fairly between tenants, honours deadlines
//! (`x-switchyard-deadline-ms`) and turns away early, with `Retry-After`,
//! what it cannot serve in time.
//!
//! - `schedule`: the per-pool task that owns the queue and decides when a
//!   batch goes (adaptive: by the fitted cost; or a fixed window);
//! - `model`: the fitted cost `a + b × items` and the arrival rate;
//! - `batch`: one upstream request for a batch, and splitting its answer;
//! - `stream`: one upstream stream for a batch of streaming completions,
//!   and splitting its events among the callers as they come.
//!
//! This module does not route, and it leaves `local` pools alone.

mod batch;
mod model;
mod schedule;
mod stream;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use switchyard_policy::Endpoint;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use batch::BatchReply;
use batch::Part;
use schedule::{Event, Job, Scheduler, Work};
pub use stream::StreamReply;
use stream::{CallerStream, Sink};

use crate::api::ApiRequest;
use crate::body::Body;
use crate::config::{BatchConfig, BatchMode, DEFAULT_PRIORITY};
use crate::error::{ApiError, ErrorKind};
use crate::upstream::Pool;

/// Entry points for the fuzz targets in `fuzz/`; see
/// [`crate::fuzzing`].
#[doc(hidden)]
pub mod fuzzing {
    use serde_json::Value;
    use switchyard_policy::Endpoint;

    /// See `batch::check_split`.
    pub fn check_split(endpoint: Endpoint, items: Vec<Vec<Value>>, n: u64, body: &[u8]) {
        super::batch::check_split(endpoint, items, n, body);
    }

    /// See `stream::check_sse_reader`.
    pub fn check_sse_reader(data: &[u8], cuts: &[usize]) {
        super::stream::check_sse_reader(data, cuts);
    }
}

/// Request header: milliseconds, from arrival, within which the request
/// must be answered; a request that cannot make it is refused at once.
pub const DEADLINE_HEADER: &str = "x-switchyard-deadline-ms";
/// Request header: priority 0 (lowest) to 9 (highest). Default 5. A
/// priority set by the routing policy takes its place.
pub const PRIORITY_HEADER: &str = "x-switchyard-priority";

/// The highest priority a request may have.
const MAX_PRIORITY: u8 = 9;

/// Jobs the scheduler's inbox holds before submitters are turned away;
/// the queue proper is bounded by `max_queue`.
const INBOX_CAPACITY: usize = 4096;

/// Characters per estimated token.
const CHARS_PER_TOKEN: u64 = 4;

/// A pool's coalescing settings, defaults filled in.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    pub mode: BatchMode,
    /// Most items in one upstream request.
    pub max_batch: usize,
    /// Most estimated tokens in one upstream request.
    pub max_batch_tokens: Option<u64>,
    /// Longest a request waits for others to join.
    pub max_wait: Duration,
    /// Most requests waiting.
    pub max_queue: usize,
    /// Most upstream requests in flight per endpoint.
    pub max_inflight: usize,
    /// Longest a request is passed over by higher priorities.
    pub starvation: Duration,
    /// Header naming a request's tenant; the bearer token without it.
    pub tenant_header: Option<HeaderName>,
    pub tenant_weights: HashMap<String, u32>,
    /// Endpoints whose upstream is declared to take arrays.
    pub array_endpoints: Vec<Endpoint>,
    pub probe_arrays: bool,
    pub collapse_embeddings: bool,
    pub collapse_completions: bool,
}

impl BatchSettings {
    pub fn from_config(config: &BatchConfig) -> Self {
        let array_endpoints = config
            .array_endpoints
            .iter()
            .filter_map(|name| match name.as_str() {
                "completions" => Some(Endpoint::Completions),
                "embeddings" => Some(Endpoint::Embeddings),
                _ => None,
            })
            .collect();
        Self {
            mode: config.mode,
            max_batch: config.max_batch,
            max_batch_tokens: config.max_batch_tokens,
            max_wait: Duration::from_millis(config.max_wait_ms),
            max_queue: config.max_queue,
            max_inflight: config.max_inflight,
            starvation: Duration::from_millis(config.starvation_ms),
            tenant_header: config
                .tenant_header
                .as_deref()
                .and_then(|name| HeaderName::from_bytes(name.as_bytes()).ok()),
            tenant_weights: config
                .tenant_weights
                .iter()
                .map(|(tenant, weight)| (tenant.clone(), *weight))
                .collect(),
            array_endpoints,
            probe_arrays: config.probe_arrays,
            collapse_embeddings: config.collapse_embeddings,
            collapse_completions: config.collapse_completions,
        }
    }

    /// A tenant's weight in fair sharing; 1 when not configured.
    pub fn weight(&self, tenant: &str) -> u32 {
        self.tenant_weights.get(tenant).copied().unwrap_or(1).max(1)
    }
}

/// Whether the upstream takes item arrays, per endpoint: as declared,
/// then as the start-up probe found.
#[derive(Debug)]
pub struct Arrays {
    completions: AtomicBool,
    embeddings: AtomicBool,
}

impl Arrays {
    fn new(declared: &[Endpoint]) -> Self {
        Self {
            completions: AtomicBool::new(declared.contains(&Endpoint::Completions)),
            embeddings: AtomicBool::new(declared.contains(&Endpoint::Embeddings)),
        }
    }

    pub fn accepts(&self, endpoint: Endpoint) -> bool {
        match endpoint {
            Endpoint::Completions => self.completions.load(Ordering::Relaxed),
            Endpoint::Embeddings => self.embeddings.load(Ordering::Relaxed),
            Endpoint::ChatCompletions => false,
        }
    }

    fn refuse(&self, endpoint: Endpoint) {
        match endpoint {
            Endpoint::Completions => self.completions.store(false, Ordering::Relaxed),
            Endpoint::Embeddings => self.embeddings.store(false, Ordering::Relaxed),
            Endpoint::ChatCompletions => {}
        }
    }
}

/// What a request asks of the queue: its priority, deadline and tenant.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// 0 (lowest) to 9 (highest).
    pub priority: u8,
    /// When the request must have been answered.
    pub deadline: Option<Instant>,
    /// The deadline as the client gave it, in milliseconds, for messages.
    pub deadline_ms: u64,
    /// Who sent it, for fair sharing; never logged.
    pub tenant: String,
}

impl Ticket {
    /// Reads the queue headers of a request that arrived just now.
    pub fn from_headers(headers: &HeaderMap, settings: &BatchSettings) -> Result<Self, ApiError> {
        let number = |name: &'static str, max: u64| -> Result<Option<u64>, ApiError> {
            let Some(value) = headers.get(name) else {
                return Ok(None);
            };
            let parsed = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match parsed {
                Some(n) if n <= max => Ok(Some(n)),
                _ => Err(ApiError::invalid(format!(
                    "header {name} must be an integer between 0 and {max}"
                ))),
            }
        };
        let max = u64::from(MAX_PRIORITY);
        let priority = number(PRIORITY_HEADER, max)?.map_or(DEFAULT_PRIORITY, |p| p as u8);
        let deadline_ms = number(DEADLINE_HEADER, 24 * 3600 * 1000)?;
        let deadline = deadline_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
        Ok(Self {
            priority,
            deadline,
            deadline_ms: deadline_ms.unwrap_or(0),
            tenant: tenant_of(headers, settings),
        })
    }
}

impl Ticket {
    /// The priority the route set, where it set one, in place of the
    /// header's; values above 9 count as 9.
    pub fn with_route_priority(self, priority: Option<u8>) -> Self {
        match priority {
            Some(priority) => Self {
                priority: priority.min(MAX_PRIORITY),
                ..self
            },
            None => self,
        }
    }
}

/// The tenant a request belongs to: the configured header's value, else a
/// digest of the bearer token (so the secret is not kept), else "".
fn tenant_of(headers: &HeaderMap, settings: &BatchSettings) -> String {
    if let Some(name) = &settings.tenant_header {
        let value = headers.get(name).and_then(|v| v.to_str().ok());
        return value.unwrap_or_default().to_string();
    }
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match bearer {
        Some(token) => {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            token.hash(&mut hasher);
            format!("bearer:{:016x}", hasher.finish())
        }
        None => String::new(),
    }
}

/// An in-flight slot of one endpoint. Dropping it gives the slot back and
/// tells the scheduler what the request taught about the upstream.
#[derive(Debug)]
pub struct Permit {
    events: mpsc::UnboundedSender<Event>,
    endpoint: Endpoint,
    started: Instant,
    /// Items to record with the elapsed time as a cost sample.
    sample_items: Option<usize>,
    /// Whether the upstream was reached, where known.
    healthy: Option<bool>,
}

impl Permit {
    fn new(events: mpsc::UnboundedSender<Event>, endpoint: Endpoint) -> Self {
        Self {
            events,
            endpoint,
            started: Instant::now(),
            sample_items: None,
            healthy: None,
        }
    }

    /// Records what the request said about the upstream: reached or not.
    pub fn set_healthy(&mut self, healthy: bool) {
        self.healthy = Some(healthy);
        if !healthy {
            self.sample_items = None;
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let sample = self
            .sample_items
            .map(|items| (items, self.started.elapsed()));
        // The scheduler is gone only when Switchyard is stopping.
        let _ = self.events.send(Event::Done {
            endpoint: self.endpoint,
            sample,
            healthy: self.healthy,
        });
    }
}

/// A response body that holds `permit` until it ends or is dropped, so
/// that a streamed answer keeps its slot while it streams.
pub fn hold(body: Body, permit: Permit) -> Body {
    crate::body::with_guard(body, permit)
}

/// Tells the scheduler, when a caller's future is dropped before its
/// answer, that it left, so its queued jobs go at once.
#[derive(Debug)]
struct LeftNotice {
    events: mpsc::UnboundedSender<Event>,
    armed: bool,
}

impl Drop for LeftNotice {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.events.send(Event::Left);
        }
    }
}

/// The front of a pool's queue.
#[derive(Debug, Clone)]
pub struct Coalescer {
    jobs: mpsc::Sender<Job>,
    events: mpsc::UnboundedSender<Event>,
    settings: Arc<BatchSettings>,
    arrays: Arc<Arrays>,
    pool: String,
}

impl Coalescer {
    /// Starts the scheduler task of `pool` (and the array probe where
    /// asked). It ends when every clone of the handle is dropped and the
    /// queue is empty.
    pub fn start(pool: Arc<Pool>, settings: BatchSettings) -> Self {
        let settings = Arc::new(settings);
        let arrays = Arc::new(Arrays::new(&settings.array_endpoints));
        let (jobs, inbox) = mpsc::channel(INBOX_CAPACITY);
        let (events, event_rx) = mpsc::unbounded_channel();
        let scheduler = Scheduler::new(
            Arc::clone(&pool),
            Arc::clone(&settings),
            Arc::clone(&arrays),
            events.clone(),
        );
        tokio::spawn(scheduler.run(inbox, event_rx));
        if settings.probe_arrays {
            tokio::spawn(probe(Arc::clone(&pool), Arc::clone(&arrays)));
        }
        Self {
            jobs,
            events,
            settings,
            arrays,
            pool: pool.name.clone(),
        }
    }

    pub fn settings(&self) -> &BatchSettings {
        &self.settings
    }

    /// Queues a parsed, routed request (its `model` already the pool's)
    /// for a batch and waits for its share of the answer.
    ///
    /// A request with more items than one upstream request may carry
    /// (`max_batch`, `max_batch_tokens`, or 1 where the upstream takes no
    /// arrays) is cut into chunks that travel in separate upstream
    /// requests; their answers are stitched back in order.
    pub async fn submit(
        &self,
        request: ApiRequest,
        headers: &HeaderMap,
        ticket: Ticket,
    ) -> Result<BatchReply, ApiError> {
        let mut left = LeftNotice {
            events: self.events.clone(),
            armed: true,
        };
        let endpoint = request.endpoint;
        let chunks = self.chunks(&request);

        // Every chunk is queued before any answer is awaited, so the
        // chunks travel upstream side by side.
        let mut answers = Vec::with_capacity(chunks.len());
        for items in chunks {
            let chunk = ApiRequest {
                items,
                ..request.clone()
            };
            let (reply, answer) = oneshot::channel();
            let part = Part::new(chunk, headers)?;
            let job = self.job(part, &ticket, reply);
            self.enqueue(job)?;
            answers.push(answer);
        }
        let mut replies = Vec::with_capacity(answers.len());
        for answer in answers {
            let reply = answer.await.unwrap_or_else(|_| Err(lost()));
            // The first failure is the answer; the other chunks' callers
            // are this one, who is not waiting for them any more.
            if let Err(e) = reply {
                return Err(e);
            }
            replies.push(reply);
        }
        left.armed = false;
        batch::stitch(endpoint, replies)
    }

    /// Queues a streaming completions request (`stream: true`) to share
    /// one upstream stream with compatible ones, and waits until that
    /// stream has started: then the caller's own events follow in the
    /// body. A prompt array cut into chunks (see `submit`) reads as one
    /// stream, its choices numbered across all its prompts.
    pub async fn submit_stream(
        &self,
        request: ApiRequest,
        headers: &HeaderMap,
        ticket: Ticket,
    ) -> Result<StreamReply, ApiError> {
        let mut left = LeftNotice {
            events: self.events.clone(),
            armed: true,
        };
        let chunks = self.chunks(&request);

        // Every chunk's relay sends into one channel, tagged with the
        // chunk, so the caller's body can number choices across chunks.
        let (pieces, events) = mpsc::unbounded_channel();
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut offset = 0;
        let mut heads = Vec::with_capacity(chunks.len());
        for (k, items) in chunks.into_iter().enumerate() {
            offsets.push(offset);
            offset += items.len() as u64 * request.n;
            let chunk = ApiRequest {
                items,
                ..request.clone()
            };
            let (reply, head) = oneshot::channel();
            let part = Part::new(chunk, headers)?.with_sink(Sink::new(pieces.clone(), k));
            let job = self.job(part, &ticket, reply);
            self.enqueue(job)?;
            heads.push(head);
        }
        drop(pieces);

        // The response starts once every chunk's stream has; a chunk the
        // upstream refused is the answer, as in `submit`.
        let mut batch_items = 0;
        for head in heads {
            let reply = head.await.unwrap_or_else(|_| Err(lost()))?;
            if !reply.status.is_success() {
                left.armed = false;
                return Ok(StreamReply::Whole(reply));
            }
            batch_items = batch_items.max(reply.batch_items);
        }
        left.armed = false;
        let body = CallerStream::new(events, offsets).into_body();
        Ok(StreamReply::Events { body, batch_items })
    }

    /// Waits for an in-flight slot of `endpoint` for a request that goes
    /// upstream on its own (chat, streams). The slot is held until the
    /// permit is dropped.
    pub async fn acquire(&self, endpoint: Endpoint, ticket: Ticket) -> Result<Permit, ApiError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut left = LeftNotice {
            events: self.events.clone(),
            armed: true,
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            key: format!("slot:{}", NEXT.fetch_add(1, Ordering::Relaxed)),
            endpoint,
            items: 1,
            collapse_keys: Vec::new(),
            tokens: 0,
            ticket,
            arrived: Instant::now(),
            work: Work::Slot(reply),
        };
        self.enqueue(job)?;
        let permit = answer.await.unwrap_or_else(|_| Err(lost()));
        left.armed = false;
        let mut permit = permit?;
        // Only chat's own lane learns from single requests' times: a
        // stream's time is the reader's, not the upstream's cost.
        if endpoint != Endpoint::ChatCompletions {
            permit.sample_items = None;
        }
        Ok(permit)
    }

    /// The request's items cut into the chunks that go upstream.
    fn chunks(&self, request: &ApiRequest) -> Vec<Vec<Value>> {
        let cap = if self.arrays.accepts(request.endpoint) {
            self.settings.max_batch
        } else {
            1
        };
        let per_item_extra = generation_tokens(request);
        let mut chunks: Vec<Vec<Value>> = Vec::new();
        let mut current: Vec<Value> = Vec::new();
        let mut tokens = 0;
        for item in &request.items {
            let cost = item_tokens(item) + per_item_extra;
            let over = self
                .settings
                .max_batch_tokens
                .is_some_and(|limit| tokens + cost > limit);
            if !current.is_empty() && (current.len() >= cap || over) {
                chunks.push(std::mem::take(&mut current));
                tokens = 0;
            }
            current.push(item.clone());
            tokens += cost;
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        chunks
    }

    fn job(
        &self,
        part: Part,
        ticket: &Ticket,
        reply: oneshot::Sender<Result<BatchReply, ApiError>>,
    ) -> Job {
        let extra = generation_tokens_of(part.endpoint, &part.template, part.n);
        let tokens = part
            .items
            .iter()
            .map(|item| item_tokens(item) + extra)
            .sum();
        let collapse = match part.endpoint {
            Endpoint::Embeddings => self.settings.collapse_embeddings,
            Endpoint::Completions => {
                self.settings.collapse_completions && deterministic(&part.template)
            }
            Endpoint::ChatCompletions => false,
        };
        let collapse_keys = if collapse {
            part.items.iter().map(Value::to_string).collect()
        } else {
            Vec::new()
        };
        Job {
            key: part.key.clone(),
            endpoint: part.endpoint,
            items: part.items.len(),
            collapse_keys,
            tokens,
            ticket: ticket.clone(),
            arrived: Instant::now(),
            work: Work::Batch {
                part: Box::new(part.with_collapse(collapse)),
                reply,
            },
        }
    }

    /// Hands a job to the scheduler without waiting: a full inbox is a
    /// full queue.
    fn enqueue(&self, job: Job) -> Result<(), ApiError> {
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                let mut error = ApiError::new(
                    ErrorKind::Overloaded,
                    format!(
                        "pool {:?} is taking requests faster than it can queue them",
                        self.pool
                    ),
                );
                error.retry_after = Some(self.settings.max_wait);
                Err(error)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ApiError::new(
                ErrorKind::ShuttingDown,
                "switchyard is shutting down",
            )),
        }
    }
}

fn lost() -> ApiError {
    ApiError::new(
        ErrorKind::Internal,
        "the batch carrying this request was lost",
    )
}

/// Estimated tokens of one prompt or input item: token ids counted, text
/// at about 4 characters a token.
fn item_tokens(item: &Value) -> u64 {
    match item {
        Value::String(text) => (text.chars().count() as u64)
            .div_ceil(CHARS_PER_TOKEN)
            .max(1),
        Value::Array(ids) => ids.len() as u64,
        _ => 1,
    }
}

/// Tokens each item may generate: `max_tokens` × `n` for completions.
fn generation_tokens(request: &ApiRequest) -> u64 {
    generation_tokens_of(request.endpoint, &request.body, request.n)
}

fn generation_tokens_of(endpoint: Endpoint, body: &serde_json::Map<String, Value>, n: u64) -> u64 {
    if endpoint != Endpoint::Completions {
        return 0;
    }
    let max_tokens = body.get("max_tokens").and_then(Value::as_u64).unwrap_or(0);
    max_tokens * n
}

/// Whether a completions request answers the same every time: greedy
/// (`temperature` 0) or seeded.
fn deterministic(template: &serde_json::Map<String, Value>) -> bool {
    let greedy = template
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0);
    let seeded = template.get("seed").is_some_and(|s| !s.is_null());
    greedy || seeded
}

/// Asks the upstream whether it takes two-item arrays on each endpoint
/// declared to, and sends one item per request where it does not.
async fn probe(pool: Arc<Pool>, arrays: Arc<Arrays>) {
    for endpoint in [Endpoint::Completions, Endpoint::Embeddings] {
        if !arrays.accepts(endpoint) {
            continue;
        }
        let (field, entries) = match endpoint {
            Endpoint::Completions => ("prompt", "choices"),
            _ => ("input", "data"),
        };
        let mut body = json!({"model": pool.model, field: ["probe one", "probe two"]});
        if endpoint == Endpoint::Completions {
            body["max_tokens"] = json!(1);
        }
        let body = Bytes::from(body.to_string());
        let answer = match pool.post(endpoint.path(), &HeaderMap::new(), body).await {
            Ok(upstream) => {
                let status = upstream.response.status();
                let collected = upstream.response.into_body().collect().await;
                let json: Option<Value> = collected
                    .ok()
                    .and_then(|c| serde_json::from_slice(&c.to_bytes()).ok());
                let count = json
                    .as_ref()
                    .and_then(|j| j[entries].as_array())
                    .map(Vec::len);
                Some((status, count))
            }
            Err(e) => {
                tracing::warn!(pool = %pool.name, error = %e, "array probe failed; keeping the declared setting");
                None
            }
        };
        if let Some((status, count)) = answer {
            if !status.is_success() || count != Some(2) {
                arrays.refuse(endpoint);
                tracing::info!(
                    pool = %pool.name,
                    endpoint = endpoint.label(),
                    status = status.as_u16(),
                    "upstream takes no arrays here; sending one item per request"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
