//! `MockUpstream`: a fake OpenAI-compatible model server on loopback.
//!
//! It speaks HTTP/1.1 and h2c (hyper-util's auto builder), or the same
//! over TLS with `start_tls` (h2 when ALPN agrees on it), answers
//! deterministically so tests can check exactly how the proxy splits a
//! merged batch, injects faults on request, records every request and
//! counts accepted connections.
//!
//! # Answers
//!
//! - `POST /v1/completions`: `prompt` is a string, an array of strings, an
//!   array of token ids (one prompt) or an array of token-id arrays. A
//!   token-id prompt reads as its ids joined by spaces (`[1, 2]` → `"1 2"`).
//!   For prompt `p` (0-based) and sample `j` of `n` (default 1) the choice
//!   has `index = p * n + j` and `text = "echo:<prompt p>#<j>"`.
//! - `POST /v1/chat/completions`: each of the `n` choices answers
//!   `"echo:<content of the last user message>"` (text parts of an array
//!   content are concatenated).
//! - `POST /v1/embeddings`: `input` has the same forms as `prompt`; input
//!   `i` gets `[chars(input) as f32, first byte as f32 (0 when empty), 1.0]`
//!   at `index = i`, base64 of little-endian f32s when
//!   `encoding_format = "base64"`.
//! - `GET /v1/models`: one model, `mock-model`.
//!
//! Choices and embeddings are emitted in *reverse* index order, so a proxy
//! that forgets to sort by `index` is caught.
//!
//! # Token counting
//!
//! `prompt_tokens` is the number of whitespace-separated words of every
//! prompt, input or chat message content together. `completion_tokens` is
//! 2 per choice. `total_tokens` is their sum (embeddings have no
//! completion tokens).
//!
//! # Streaming
//!
//! With `"stream": true`, completions and chat answer SSE (`data: {..}\n\n`)
//! with one chunk per word of each choice's text (the first chunk of a chat
//! choice carries only the role, the last only the finish reason), a usage
//! chunk when `stream_options.include_usage` is true, then `data: [DONE]`.
//! The choices of a completions stream take turns, one chunk each, as a
//! server that decodes them side by side sends them.
//! Header `x-mock-chunk-delay-ms: N` sleeps N ms between two events.
//! `cut_streams()` counts streams whose client went away before the end.
//!
//! # Cost
//!
//! `MockUpstream::start_costed` makes every completions, chat and
//! embeddings request take `fixed_ms + per_item_ms × items` (chat counts
//! one item) before it answers, like a model server whose batch cost is
//! linear; with `serial`, one request is served at a time and the others
//! wait their turn, as on a single accelerator. `max_concurrent()` is the
//! most requests it held at once, `abandoned()` how many the client
//! dropped before the answer.
//!
//! # Log-probabilities
//!
//! A chat request with `logprobs: true`, or a completions request with
//! `logprobs: k`, gets OpenAI-shaped log-probabilities: one token per
//! word piece of the answer (the pieces streaming sends), chat as
//! `logprobs.content[].logprob`, completions as `logprobs.tokens` and
//! `logprobs.token_logprobs`. Header `x-mock-logprobs: -0.1,-3` sets the
//! values, used in turn and repeated (default `-0.1` for every token), so
//! a test controls how confident the answer looks. Header
//! `x-mock-finish-reason: length` replaces the finish reason `stop`.
//!
//! # Faults
//!
//! - `x-mock-delay-ms: N`: sleep N ms before answering.
//! - `x-mock-status: S`: answer status S with an OpenAI error body.
//! - `x-mock-stall-body: 1`: send the status, the headers and the start of
//!   the body (the first SSE event when streaming, the first
//!   `STALL_PREFIX_BYTES` bytes of the JSON otherwise), then nothing more
//!   until the connection is closed.
//! - `closed_port_url()`: a URL where nothing listens.
//! - `MockUpstream::fail_with(Some(S))`: every request that follows, health
//!   checks (`GET /v1/models`) included, answers status S with an OpenAI
//!   error body, until `fail_with(None)`: a server that went bad and
//!   recovered.
//!
//! `tests/support/raw_upstream.rs` has upstreams that fail below HTTP
//! (resets, stalls, garbage).
//!
//! A coalesced upstream request carries no client headers, so faults for
//! completions and embeddings can also be asked for in the prompt or input
//! text. Any item that contains
//!
//! - `fault:reject` makes the whole request answer 400 with an OpenAI
//!   error body whose code is `context_length_exceeded` (`REJECT_CODE`);
//! - `fault:stall-body` stalls the body as `x-mock-stall-body: 1` does;
//! - `fault:short` leaves one choice (or embedding) out of the answer, as a
//!   server that miscounts a batch would.
//!
//! - `fault:server-error` makes the whole request answer 500.
//! - `fault:break-stream` makes a completions stream send half its
//!   events, then break the connection.
//! - `fault:slow-stream` spaces a completions stream's events
//!   `SLOW_STREAM_DELAY_MS` apart.
//!
//! `fault:reject` wins over `fault:stall-body`, which wins over
//! `fault:short`. With `model = "single-item-only"` (`SINGLE_ITEM_MODEL`)
//! a request with more than one item answers 500.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The `created` timestamp of every answer, fixed for determinism.
const CREATED: u64 = 1_700_000_000;

/// Completion tokens the mock charges per choice.
pub const COMPLETION_TOKENS_PER_CHOICE: u64 = 2;

/// Prompt or input text that makes the mock refuse the whole request.
pub const FAULT_REJECT: &str = "fault:reject";
/// Prompt or input text that makes the mock stall mid-body.
pub const FAULT_STALL_BODY: &str = "fault:stall-body";
/// Prompt or input text that makes the mock drop one choice.
pub const FAULT_SHORT: &str = "fault:short";
/// Prompt or input text that makes the mock answer 500.
pub const FAULT_SERVER_ERROR: &str = "fault:server-error";
/// Prompt text that makes a completions stream break off halfway.
pub const FAULT_BREAK_STREAM: &str = "fault:break-stream";
/// Prompt text that makes a completions stream slow.
pub const FAULT_SLOW_STREAM: &str = "fault:slow-stream";
/// Milliseconds between the events of a `fault:slow-stream` stream.
pub const SLOW_STREAM_DELAY_MS: u64 = 100;
/// A `model` for which the mock answers 500 to more than one prompt or
/// input, as llama-cpp-python's server does.
pub const SINGLE_ITEM_MODEL: &str = "single-item-only";

/// The error `code` of a `fault:reject` answer.
pub const REJECT_CODE: &str = "context_length_exceeded";
/// The error message of a `fault:reject` answer.
pub const REJECT_MESSAGE: &str = "mock upstream refused a prompt marked fault:reject";

/// Bytes of a JSON answer sent before a stall.
pub const STALL_PREFIX_BYTES: usize = 8;

type MockError = Box<dyn std::error::Error + Send + Sync>;
type MockBody = BoxBody<Bytes, MockError>;

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// The query string, when there was one.
    pub query: Option<String>,
    /// Header names are lowercase.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON, `Null` when empty or not JSON.
    pub body: Value,
    /// The HTTP version the request came in, such as `HTTP/2.0`.
    pub version: String,
}

impl RecordedRequest {
    /// A request header by lowercase name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The prompt items of a completions request, or the inputs of an
    /// embeddings request, read as the mock reads them.
    pub fn items(&self) -> Vec<String> {
        let field = if self.path.ends_with("/embeddings") {
            "input"
        } else {
            "prompt"
        };
        text_items(&self.body[field]).unwrap_or_default()
    }
}

/// What a costed mock charges per request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub fixed_ms: u64,
    pub per_item_ms: u64,
    /// One request at a time.
    pub serial: bool,
}

#[derive(Debug, Default)]
struct State {
    record: bool,
    cost: Option<Cost>,
    turn: tokio::sync::Mutex<()>,
    concurrent: AtomicUsize,
    max_concurrent: AtomicUsize,
    abandoned: AtomicUsize,
    requests: Mutex<Vec<RecordedRequest>>,
    request_count: AtomicUsize,
    connections: AtomicUsize,
    cut_streams: AtomicUsize,
    next_id: AtomicU64,
    /// `fail_with`: the status every request gets; 0 for none.
    forced_status: std::sync::atomic::AtomicU16,
}

/// Where mocks listen unless told: loopback, a port the OS picks.
const LOOPBACK_ANY_PORT: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    0,
));

/// A fake OpenAI server on `127.0.0.1`, stopped when dropped.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    /// Whether connections are TLS (`start_tls`).
    tls: bool,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl MockUpstream {
    /// Starts a mock that records every request.
    pub async fn start() -> Self {
        Self::start_inner(true).await
    }

    /// Starts a mock that only counts requests, for long benchmark runs.
    pub async fn start_unrecorded() -> Self {
        Self::start_inner(false).await
    }

    /// Starts a mock whose requests cost `cost` (see "Cost" above).
    pub async fn start_costed(cost: Cost, record: bool) -> Self {
        Self::start_with(record, Some(cost)).await
    }

    /// Starts a recording mock that serves TLS with `config` (its
    /// certificate and ALPN protocols); `url()` is then `https://`.
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Self {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        Self::start_full(LOOPBACK_ANY_PORT, true, None, Some(acceptor)).await
    }

    /// Starts a recording mock on `addr`, for a test that owns the
    /// address (one inside a network namespace it created).
    pub async fn start_at(addr: SocketAddr) -> Self {
        Self::start_full(addr, true, None, None).await
    }

    async fn start_inner(record: bool) -> Self {
        Self::start_with(record, None).await
    }

    async fn start_with(record: bool, cost: Option<Cost>) -> Self {
        Self::start_full(LOOPBACK_ANY_PORT, record, cost, None).await
    }

    async fn start_full(
        bind: SocketAddr,
        record: bool,
        cost: Option<Cost>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let listener = TcpListener::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("bind mock upstream on {bind}: {e}"));
        let addr = listener.local_addr().expect("mock local addr");
        let state = Arc::new(State {
            record,
            cost,
            ..State::default()
        });
        let is_tls = tls.is_some();
        let accept = tokio::spawn(accept_loop(listener, state.clone(), tls));
        Self {
            addr,
            tls: is_tls,
            state,
            accept,
        }
    }

    /// Base URL, `http://127.0.0.1:PORT` (`https://` for a TLS mock; no
    /// trailing slash).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// The requests received on `path` (e.g. `/v1/completions`).
    pub fn requests_to(&self, path: &str) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Requests received so far, recorded or not.
    pub fn request_count(&self) -> usize {
        self.state.request_count.load(Ordering::SeqCst)
    }

    /// Requests in progress now: arrived and not yet answered.
    pub fn in_progress(&self) -> usize {
        self.state.concurrent.load(Ordering::SeqCst)
    }

    /// The most requests in progress at once so far.
    pub fn max_concurrent(&self) -> usize {
        self.state.max_concurrent.load(Ordering::SeqCst)
    }

    /// Requests whose client went away before they were answered.
    pub fn abandoned(&self) -> usize {
        self.state.abandoned.load(Ordering::SeqCst)
    }

    /// Streams whose client went away before their end.
    pub fn cut_streams(&self) -> usize {
        self.state.cut_streams.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Makes every request from now on answer `status` (an OpenAI error
    /// body), or, with `None`, answer normally again.
    pub fn fail_with(&self, status: Option<u16>) {
        let code = status.unwrap_or(0);
        self.state.forced_status.store(code, Ordering::SeqCst);
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        // Open connections end with the test's runtime; no new ones start.
        self.accept.abort();
    }
}

/// A URL on loopback where nothing listens: binds an ephemeral port and
/// releases it at once, so connecting is refused.
pub fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to close");
    let addr = listener.local_addr().expect("closed port addr");
    drop(listener);
    format!("http://{addr}")
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        state.connections.fetch_add(1, Ordering::SeqCst);

        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            // A peer closing mid-request is normal in fault tests, and a
            // client that distrusts the certificate ends the handshake.
            let _ = match tls {
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
            };
        });
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    // Counted until answered; a drop before then is an abandonment.
    let mut watch = InProgress::enter(state.clone());
    let response = handle_inner(state, req).await;
    watch.answered = true;
    response
}

async fn handle_inner(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let method = req.method().clone();
    let version = format!("{:?}", req.version());
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let headers = req.headers().clone();
    let raw = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);

    // Record before any fault, so tests see requests that timed out too.
    state.request_count.fetch_add(1, Ordering::SeqCst);
    if state.record {
        let recorded = RecordedRequest {
            method: method.to_string(),
            path: path.clone(),
            query,
            headers: header_pairs(&headers),
            body: body.clone(),
            version,
        };
        if let Ok(mut requests) = state.requests.lock() {
            requests.push(recorded);
        }
    }

    if let Some(cost) = state.cost {
        let items = match path.as_str() {
            "/v1/completions" => text_items(&body["prompt"]).map_or(1, |i| i.len()),
            "/v1/embeddings" => text_items(&body["input"]).map_or(1, |i| i.len()),
            _ => 1,
        };
        let _turn = if cost.serial {
            Some(state.turn.lock().await)
        } else {
            None
        };
        let ms = cost.fixed_ms + cost.per_item_ms * items as u64;
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(ms) = header_u64(&headers, "x-mock-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let forced = state.forced_status.load(Ordering::SeqCst);
    let forced = (forced != 0).then_some(u64::from(forced));
    if let Some(code) = forced.or_else(|| header_u64(&headers, "x-mock-status")) {
        let status = u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = format!("mock upstream forced status {}", status.as_u16());
        return Ok(error(status, "server_error", &message));
    }

    // Faults named in the prompt or input text, for coalesced requests.
    let field = if path.ends_with("/embeddings") {
        "input"
    } else {
        "prompt"
    };
    let items = text_items(&body[field]).unwrap_or_default();
    let has = |fault: &str| items.iter().any(|item| item.contains(fault));
    if has(FAULT_SERVER_ERROR) || (body["model"] == SINGLE_ITEM_MODEL && items.len() > 1) {
        let message = "mock upstream failed";
        return Ok(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            message,
        ));
    }
    if has(FAULT_REJECT) {
        let body = json!({"error": {
            "message": REJECT_MESSAGE, "type": "invalid_request_error",
            "param": field, "code": REJECT_CODE,
        }});
        return Ok(json_response(StatusCode::BAD_REQUEST, &body));
    }
    let stall = has(FAULT_STALL_BODY) || header_u64(&headers, "x-mock-stall-body") == Some(1);
    let short = has(FAULT_SHORT);

    let mut delay = header_u64(&headers, "x-mock-chunk-delay-ms")
        .map(Duration::from_millis)
        .unwrap_or_default();
    if has(FAULT_SLOW_STREAM) {
        delay = Duration::from_millis(SLOW_STREAM_DELAY_MS);
    }
    let stream = Stream {
        delay,
        broken: has(FAULT_BREAK_STREAM),
        state: state.clone(),
    };
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    let shape = Shape::from_headers(&headers);
    let reply = match (&method, path.as_str()) {
        (&Method::POST, "/v1/completions") => completions(&body, id, stream, short, &shape),
        (&Method::POST, "/v1/chat/completions") => chat(&body, id, stream, &shape),
        (&Method::POST, "/v1/embeddings") => embeddings(&body, short),
        (&Method::GET, "/v1/models") => json_response(StatusCode::OK, &models()),
        _ => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "no such route",
        ),
    };
    if stall && reply.status().is_success() {
        return Ok(stall_body(reply));
    }
    Ok(reply)
}

/// A request between arrival and answer.
struct InProgress {
    state: Arc<State>,
    answered: bool,
}

impl InProgress {
    fn enter(state: Arc<State>) -> Self {
        let now = state.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_concurrent.fetch_max(now, Ordering::SeqCst);
        Self {
            state,
            answered: false,
        }
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.state.concurrent.fetch_sub(1, Ordering::SeqCst);
        if !self.answered {
            self.state.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// How a streamed answer is sent.
struct Stream {
    /// Between two events.
    delay: Duration,
    /// Break the connection halfway.
    broken: bool,
    state: Arc<State>,
}

/// Default log-probability of every token when none is asked for.
pub const DEFAULT_LOGPROB: f64 = -0.1;

/// How answers look, from the `x-mock-logprobs` and
/// `x-mock-finish-reason` headers.
struct Shape {
    logprobs: Vec<f64>,
    finish: String,
}

impl Shape {
    fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let logprobs: Vec<f64> = text("x-mock-logprobs")
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_default();
        Self {
            logprobs: if logprobs.is_empty() {
                vec![DEFAULT_LOGPROB]
            } else {
                logprobs
            },
            finish: text("x-mock-finish-reason").unwrap_or("stop").to_string(),
        }
    }

    /// Log-probability of token `k` of an answer.
    fn logprob(&self, k: usize) -> f64 {
        self.logprobs[k % self.logprobs.len()]
    }

    /// Chat `logprobs` for `pieces`, the first being token `first`.
    fn chat_logprobs(&self, pieces: &[String], first: usize) -> Value {
        let content: Vec<Value> = pieces
            .iter()
            .enumerate()
            .map(|(k, piece)| {
                json!({
                    "token": piece, "logprob": self.logprob(first + k),
                    "bytes": piece.as_bytes(), "top_logprobs": [],
                })
            })
            .collect();
        json!({"content": content})
    }

    /// Completions `logprobs` for `pieces`, the first being token `first`.
    fn completion_logprobs(&self, pieces: &[String], first: usize) -> Value {
        let values: Vec<f64> = (0..pieces.len()).map(|k| self.logprob(first + k)).collect();
        let tops: Vec<Value> = pieces.iter().map(|_| json!({})).collect();
        json!({
            "tokens": pieces, "token_logprobs": values,
            "top_logprobs": tops, "text_offset": [],
        })
    }
}

fn completions(
    body: &Value,
    id: u64,
    stream: Stream,
    short: bool,
    shape: &Shape,
) -> Response<MockBody> {
    let with_logprobs = body["logprobs"].is_u64();
    let Some(prompts) = text_items(&body["prompt"]) else {
        return bad_request("`prompt` must be a string or an array");
    };
    let n = body["n"].as_u64().unwrap_or(1);
    let model = body["model"].clone();
    let id = format!("cmpl-{id}");

    // Choice texts in index order: index = p * n + j.
    let mut texts = Vec::new();
    for prompt in &prompts {
        for j in 0..n {
            texts.push(format!("echo:{prompt}#{j}"));
        }
    }
    let prompt_tokens: u64 = prompts.iter().map(|p| word_count(p)).sum();
    let usage = usage(prompt_tokens, texts.len() as u64);

    if body["stream"].as_bool() == Some(true) {
        // Round k sends piece k of every choice that has one.
        let pieces: Vec<Vec<String>> = texts.iter().map(|t| word_pieces(t)).collect();
        let rounds = pieces.iter().map(Vec::len).max().unwrap_or(0);
        let mut events = Vec::new();
        for k in 0..rounds {
            for (index, choice) in pieces.iter().enumerate() {
                let Some(piece) = choice.get(k) else { continue };
                let finish = if k + 1 == choice.len() {
                    json!(shape.finish)
                } else {
                    Value::Null
                };
                let logprobs = if with_logprobs {
                    shape.completion_logprobs(std::slice::from_ref(piece), k)
                } else {
                    Value::Null
                };
                events.push(json!({
                    "id": id, "object": "text_completion", "created": CREATED,
                    "model": model,
                    "choices": [{
                        "index": index, "text": piece,
                        "finish_reason": finish, "logprobs": logprobs,
                    }],
                }));
            }
        }
        if include_usage(body) {
            events.push(json!({
                "id": id, "object": "text_completion", "created": CREATED,
                "model": model, "choices": [], "usage": usage,
            }));
        }
        return sse(events, stream);
    }

    // Reverse order on purpose: the proxy must sort by index.
    let mut choices: Vec<Value> = texts
        .iter()
        .enumerate()
        .rev()
        .map(|(index, text)| {
            let logprobs = if with_logprobs {
                shape.completion_logprobs(&word_pieces(text), 0)
            } else {
                Value::Null
            };
            json!({
                "index": index, "text": text,
                "finish_reason": shape.finish, "logprobs": logprobs,
            })
        })
        .collect();
    if short {
        choices.pop();
    }
    json_response(
        StatusCode::OK,
        &json!({
            "id": id, "object": "text_completion", "created": CREATED,
            "model": model, "choices": choices, "usage": usage,
        }),
    )
}

fn chat(body: &Value, id: u64, stream: Stream, shape: &Shape) -> Response<MockBody> {
    let with_logprobs = body["logprobs"] == true;
    let Some(messages) = body["messages"].as_array() else {
        return bad_request("`messages` must be an array");
    };
    let n = body["n"].as_u64().unwrap_or(1);
    let model = body["model"].clone();
    let id = format!("chatcmpl-{id}");

    let contents: Vec<String> = messages
        .iter()
        .map(|m| content_text(&m["content"]))
        .collect();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| content_text(&m["content"]))
        .unwrap_or_default();
    let answer = format!("echo:{last_user}");
    let prompt_tokens: u64 = contents.iter().map(|c| word_count(c)).sum();
    let usage = usage(prompt_tokens, n);

    if body["stream"].as_bool() == Some(true) {
        let chunk = |index: u64, delta: Value, finish: Value, logprobs: Value| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": CREATED,
                "model": model,
                "choices": [{
                    "index": index, "delta": delta,
                    "finish_reason": finish, "logprobs": logprobs,
                }],
            })
        };
        let mut events = Vec::new();
        for index in 0..n {
            let role = json!({"role": "assistant", "content": ""});
            events.push(chunk(index, role, Value::Null, Value::Null));
            for (k, piece) in word_pieces(&answer).into_iter().enumerate() {
                let logprobs = if with_logprobs {
                    shape.chat_logprobs(std::slice::from_ref(&piece), k)
                } else {
                    Value::Null
                };
                events.push(chunk(
                    index,
                    json!({"content": piece}),
                    Value::Null,
                    logprobs,
                ));
            }
            events.push(chunk(index, json!({}), json!(shape.finish), Value::Null));
        }
        if include_usage(body) {
            events.push(json!({
                "id": id, "object": "chat.completion.chunk", "created": CREATED,
                "model": model, "choices": [], "usage": usage,
            }));
        }
        return sse(events, stream);
    }

    let choices: Vec<Value> = (0..n)
        .rev()
        .map(|index| {
            let logprobs = if with_logprobs {
                shape.chat_logprobs(&word_pieces(&answer), 0)
            } else {
                Value::Null
            };
            json!({
                "index": index,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": shape.finish, "logprobs": logprobs,
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "id": id, "object": "chat.completion", "created": CREATED,
            "model": model, "choices": choices, "usage": usage,
        }),
    )
}

fn embeddings(body: &Value, short: bool) -> Response<MockBody> {
    let Some(inputs) = text_items(&body["input"]) else {
        return bad_request("`input` must be a string or an array");
    };
    let base64 = body["encoding_format"] == "base64";

    let mut data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .rev()
        .map(|(index, input)| {
            let vector = embedding_of(input);
            let embedding = if base64 {
                json!(base64_f32(&vector))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    if short {
        data.pop();
    }
    let prompt_tokens: u64 = inputs.iter().map(|i| word_count(i)).sum();
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list", "data": data, "model": body["model"],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }),
    )
}

fn models() -> Value {
    json!({
        "object": "list",
        "data": [{
            "id": "mock-model", "object": "model",
            "created": CREATED, "owned_by": "mock",
        }],
    })
}

/// The vector the mock returns for one embeddings input.
pub fn embedding_of(input: &str) -> Vec<f32> {
    let first = input.bytes().next().map_or(0.0, f32::from);
    // Test inputs are far shorter than 2^24 characters: exact as f32.
    let chars = input.chars().count() as f32;
    vec![chars, first, 1.0]
}

/// The items of a `prompt` or `input` field as text, or `None` when the
/// field has another shape. Token-id arrays read as ids joined by spaces.
pub fn text_items(field: &Value) -> Option<Vec<String>> {
    match field {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            Some(vec![token_text(items)])
        }
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Some(s.clone()),
                Value::Array(ids) if ids.iter().all(Value::is_u64) => Some(token_text(ids)),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn token_text(ids: &[Value]) -> String {
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    ids.join(" ")
}

fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

fn word_count(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Splits `text` at spaces into pieces that concatenate back to `text`:
/// `"a b c"` → `["a", " b", " c"]`.
fn word_pieces(text: &str) -> Vec<String> {
    text.split(' ')
        .enumerate()
        .map(|(k, word)| {
            if k == 0 {
                word.to_string()
            } else {
                format!(" {word}")
            }
        })
        .collect()
}

fn usage(prompt_tokens: u64, choices: u64) -> Value {
    let completion_tokens = choices * COMPLETION_TOKENS_PER_CHOICE;
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn include_usage(body: &Value) -> bool {
    body["stream_options"]["include_usage"].as_bool() == Some(true)
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_string(), value)
        })
        .collect()
}

fn json_response(status: StatusCode, body: &Value) -> Response<MockBody> {
    let full = Full::new(Bytes::from(body.to_string()));
    let mut response = Response::new(full.map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<MockBody> {
    let body = json!({"error": {"message": message, "type": kind, "code": null}});
    json_response(status, &body)
}

fn bad_request(message: &str) -> Response<MockBody> {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

/// An SSE reply that writes `events` then `[DONE]`, sleeping
/// `stream.delay` between two events; a broken one ends in an error
/// halfway instead.
fn sse(events: Vec<Value>, stream: Stream) -> Response<MockBody> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut frames: Vec<Bytes> = events
            .iter()
            .map(|event| Bytes::from(format!("data: {event}\n\n")))
            .collect();
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        let sent = if stream.broken {
            frames.len() / 2
        } else {
            frames.len()
        };

        for (k, frame) in frames.into_iter().take(sent).enumerate() {
            if k > 0 && !stream.delay.is_zero() {
                tokio::time::sleep(stream.delay).await;
            }
            // The client went away: stop producing.
            if tx.send(Ok(frame)).await.is_err() {
                stream.state.cut_streams.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        if stream.broken {
            // hyper drops what it has not written when a body fails: give
            // the events before the break time to leave.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let broken = std::io::Error::other("mock upstream broke the stream");
            let _ = tx.send(Err(broken.into())).await;
        }
    });

    let mut response = Response::new(ChannelBody { rx }.boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// Keeps `reply`'s status and headers but sends only the start of its
/// body (the first frame of a stream, the first `STALL_PREFIX_BYTES` of
/// a JSON answer), then nothing until the connection is closed.
fn stall_body(reply: Response<MockBody>) -> Response<MockBody> {
    let (parts, mut body) = reply.into_parts();
    let json = parts
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let first = match body.frame().await {
            Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
            _ => Bytes::new(),
        };
        let first = if json {
            first.slice(..first.len().min(STALL_PREFIX_BYTES))
        } else {
            first
        };
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        // Hold the body open, sending nothing, until hyper drops it.
        tx.closed().await;
    });
    Response::from_parts(parts, ChannelBody { rx }.boxed())
}

/// A response body fed by a channel, one data frame per message; an
/// error message ends it in that error.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, MockError>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = MockError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MockError>>> {
        self.rx
            .poll_recv(cx)
            .map(|message| message.map(|m| m.map(Frame::data)))
    }
}

/// Standard base64 (with padding) of little-endian f32s, as OpenAI's
/// `encoding_format = "base64"` answers.
fn base64_f32(vector: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * k)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
