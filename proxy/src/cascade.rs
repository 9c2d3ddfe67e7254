//! The small-first cascade: for a request the policy routed with an
//! escalation pool, ask the small pool for the answer with
//! log-probabilities, have the same policy version `review` it, and serve
//! either that answer (without the log-probabilities the client did not
//! ask for) or the escalation pool's.
//!
//! Owns the reading of small answers (whole JSON or server-sent events),
//! their summary and the review; sending requests to pools is `app`'s
//! business. The client never sees two answers: a streamed small answer
//! is held until reviewed (`buffer`), or reviewed after its first tokens
//! and then either passed on or dropped before a byte of it was sent
//! (`probe`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use switchyard_policy::{Endpoint, LogprobSummary, ReviewAnswer, Verdict};

use crate::api::ApiRequest;
use crate::app::{set_header, App, Outcome, POOL_HEADER};
use crate::body::{full, Body, ChannelBody};
use crate::config::{CascadeConfig, StreamMode};
use crate::costs::{usage_of, Usage};
use crate::error::ApiError;
use crate::metrics;
use crate::routing::Route;
use crate::telemetry::cut_for_log;

/// Says whether a cascaded request was answered by its escalation pool.
pub const ESCALATED_HEADER: &str = "x-switchyard-escalated";
/// On a small answer served because the escalation pool it names failed.
pub const ESCALATION_FAILED_HEADER: &str = "x-switchyard-escalation-failed";

/// Largest small answer held for review, in bytes; a larger one escalates.
const MAX_ANSWER_BYTES: usize = 16 << 20;
/// Events buffered between a probed small stream and its client.
const STREAM_DEPTH: usize = 64;

/// Escalation reason when the small pool failed, not the review.
const SMALL_FAILED: &str = "small-failed";

/// Whether `route` asks for the cascade and `api` can take it.
// Limitation: only one choice (`n` = 1) is reviewed; requests with n > 1
// are served by the small pool alone, without review.
pub(crate) fn applies(route: &Route, api: &ApiRequest) -> bool {
    route.escalate_to.is_some()
        && route.policy.is_some()
        && api.endpoint != Endpoint::Embeddings
        && api.n == 1
}

/// Serves a small-first request: small pool, review, and maybe the
/// escalation pool.
pub(crate) async fn serve(
    app: &App,
    settings: &CascadeConfig,
    headers: &HeaderMap,
    api: ApiRequest,
    route: Route,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ApiError> {
    let (Some(policy), Some(summary), Some(large)) =
        (route.policy, route.summary, route.escalate_to)
    else {
        return app.dispatch(&route.pool, headers, api, outcome, true).await;
    };
    let reviewer = Reviewer {
        policy,
        summary,
        small: route.pool,
        large,
        settings: settings.clone(),
        started: Instant::now(),
    };

    let wanted = wants_logprobs(&api);
    let mut small_api = api.clone();
    ask_logprobs(&mut small_api);
    let small = app
        .dispatch(&reviewer.small, headers, small_api, outcome, false)
        .await;
    let small = match small {
        Ok(response) if response.status().is_success() => response,
        Ok(response) => {
            let why = format!("status {}", response.status().as_u16());
            return reviewer.small_failed(app, headers, api, outcome, why).await;
        }
        Err(e) => {
            return reviewer
                .small_failed(app, headers, api, outcome, e.message)
                .await
        }
    };

    if !api.stream {
        return whole(app, &reviewer, headers, api, small, wanted, outcome).await;
    }
    match settings.stream_mode {
        StreamMode::Buffer => buffered(app, &reviewer, headers, api, small, wanted, outcome).await,
        StreamMode::Probe => probed(app, &reviewer, headers, api, small, wanted, outcome).await,
    }
}

/// A non-streamed small answer: read it, review it, serve it or escalate.
async fn whole(
    app: &App,
    reviewer: &Reviewer,
    headers: &HeaderMap,
    api: ApiRequest,
    small: Response<Body>,
    wanted: bool,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = small.into_parts();
    let bytes = match read_limited(body).await {
        Ok(bytes) => bytes,
        Err(e) => return reviewer.small_failed(app, headers, api, outcome, e).await,
    };
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        let why = "answer is not JSON".to_string();
        return reviewer.small_failed(app, headers, api, outcome, why).await;
    };

    let mut evidence = Evidence::default();
    if let Some(choice) = first_choice(&value) {
        evidence.absorb(choice);
    }
    evidence.usage = usage_of(&value);
    let mut kept = false;
    if let Some(pool) = reviewer.decide(app, &evidence, false, outcome) {
        match reviewer
            .escalate_or_keep(app, headers, api, &pool, outcome)
            .await
        {
            Some(response) => return Ok(response),
            None => kept = true,
        }
    }

    let baseline = app.ledger().serve(&reviewer.small, evidence.usage());
    if let Some(cost) = &mut outcome.cost {
        cost.baseline_usd += baseline;
    }
    if !wanted {
        strip_logprobs(&mut value);
    }
    let mut response = Response::new(full(Bytes::from(value.to_string())));
    *response.status_mut() = parts.status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    set_header(&mut response, POOL_HEADER, &reviewer.small);
    set_header(&mut response, ESCALATED_HEADER, "false");
    if kept {
        set_header(&mut response, ESCALATION_FAILED_HEADER, &reviewer.large);
    }
    Ok(response)
}

/// A streamed small answer in `buffer` mode: hold every event until the
/// review, then replay them or escalate.
async fn buffered(
    app: &App,
    reviewer: &Reviewer,
    headers: &HeaderMap,
    api: ApiRequest,
    small: Response<Body>,
    wanted: bool,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = small.into_parts();
    let bytes = match read_limited(body).await {
        Ok(bytes) => bytes,
        Err(e) => return reviewer.small_failed(app, headers, api, outcome, e).await,
    };
    let mut splitter = SseSplitter::default();
    let mut events = splitter.push(&bytes);
    events.extend(splitter.finish());

    let mut evidence = Evidence::default();
    for event in &events {
        evidence.absorb_event(event);
    }
    let mut kept = false;
    if let Some(pool) = reviewer.decide(app, &evidence, false, outcome) {
        match reviewer
            .escalate_or_keep(app, headers, api, &pool, outcome)
            .await
        {
            Some(response) => return Ok(response),
            None => kept = true,
        }
    }

    app.ledger().serve(&reviewer.small, evidence.usage());
    let mut replay = Vec::new();
    for event in &events {
        replay.extend_from_slice(&rewrite_event(event, !wanted));
    }
    Ok(stream_response(
        parts.headers,
        full(Bytes::from(replay)),
        reviewer,
        kept,
    ))
}

/// A streamed small answer in `probe` mode: review after the first
/// `probe_tokens` tokens, then pass the rest on or escalate.
async fn probed(
    app: &App,
    reviewer: &Reviewer,
    headers: &HeaderMap,
    api: ApiRequest,
    small: Response<Body>,
    wanted: bool,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ApiError> {
    let (parts, mut body) = small.into_parts();
    let probe_tokens = reviewer.settings.probe_tokens;
    let mut splitter = SseSplitter::default();
    let mut held: Vec<String> = Vec::new();
    let mut evidence = Evidence::default();

    // Read until enough tokens arrived or the answer ended.
    while evidence.tokens() < probe_tokens && !evidence.done {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                for event in splitter.push(&data) {
                    evidence.absorb_event(&event);
                    held.push(event);
                }
            }
            Some(Err(e)) => {
                let why = format!("stream broke off: {e}");
                return reviewer.small_failed(app, headers, api, outcome, why).await;
            }
            None => {
                held.extend(splitter.finish());
                evidence.done = true;
            }
        }
    }
    let partial = !evidence.done;
    let mut kept = false;
    if let Some(pool) = reviewer.decide(app, &evidence, partial, outcome) {
        // The small stream stays open until the escalation pool answers:
        // it is the answer if that pool fails.
        match reviewer
            .escalate_or_keep(app, headers, api, &pool, outcome)
            .await
        {
            Some(response) => {
                // Dropping the small body cancels the rest of its answer.
                drop(body);
                return Ok(response);
            }
            None => kept = true,
        }
    }

    // Accepted: what was held goes first, then the rest as it arrives.
    let strip = !wanted;
    let (tx, client_body) = ChannelBody::channel(STREAM_DEPTH);
    let pool = reviewer.small.clone();
    let ledger = app.ledger();
    tokio::spawn(async move {
        // Whatever happens to the stream, what the client got is counted.
        let mut evidence = Served {
            evidence,
            ledger,
            pool: pool.clone(),
        };
        for event in &held {
            if tx.send(rewrite_event(event, strip)).await.is_err() {
                return;
            }
        }
        if evidence.evidence.done {
            return;
        }
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Err(e) => {
                    tracing::warn!(pool = %pool, error = %e, "small pool's stream broke off after the probe");
                    return;
                }
            };
            for event in splitter.push(&data) {
                evidence.evidence.absorb_event(&event);
                if tx.send(rewrite_event(&event, strip)).await.is_err() {
                    return;
                }
            }
        }
        if let Some(event) = splitter.finish() {
            evidence.evidence.absorb_event(&event);
            let _ = tx.send(rewrite_event(&event, strip)).await;
        }
    });
    Ok(stream_response(parts.headers, client_body, reviewer, kept))
}

/// A probed answer on its way to the client; dropping it counts it as
/// served with the usage seen.
struct Served {
    evidence: Evidence,
    ledger: Arc<crate::costs::Ledger>,
    pool: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.ledger.serve(&self.pool, self.evidence.usage());
    }
}

/// Sends the request, as the route shaped it and without the small pool's
/// log-probabilities, to the escalation `pool`.
async fn escalate(
    app: &App,
    headers: &HeaderMap,
    api: ApiRequest,
    pool: &str,
    outcome: &mut Outcome,
) -> Result<Response<Body>, ApiError> {
    outcome.pool = Some(pool.to_string());
    let mut response = app.dispatch(pool, headers, api, outcome, true).await?;
    set_header(&mut response, ESCALATED_HEADER, "true");
    Ok(response)
}

/// The small pool's stream for the client; `kept` when it is served
/// because the escalation failed.
fn stream_response(
    upstream: HeaderMap,
    body: Body,
    reviewer: &Reviewer,
    kept: bool,
) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let content_type = upstream
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("text/event-stream"));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    set_header(&mut response, POOL_HEADER, &reviewer.small);
    set_header(&mut response, ESCALATED_HEADER, "false");
    if kept {
        set_header(&mut response, ESCALATION_FAILED_HEADER, &reviewer.large);
    }
    response
}

/// One cascaded request's review: the pinned policy, what it was told at
/// routing, the pools and the settings.
struct Reviewer {
    policy: Arc<switchyard_policy::Policy>,
    summary: Arc<switchyard_policy::RouteRequest>,
    small: String,
    large: String,
    settings: CascadeConfig,
    started: Instant,
}

impl Reviewer {
    /// Reviews `evidence`; returns the pool to escalate to, or `None` to
    /// serve the small answer. Logs and counts the verdict; in shadow mode
    /// the verdict is only recorded.
    fn decide(
        &self,
        app: &App,
        evidence: &Evidence,
        partial: bool,
        outcome: &mut Outcome,
    ) -> Option<String> {
        let answer = evidence.answer(
            &self.small,
            self.settings.low_logprob,
            self.elapsed(),
            partial,
        );
        let verdict = app
            .router()
            .call_plugin(&self.policy, || self.policy.review(&self.summary, &answer));

        // A failed review serves the small answer, but is no accept: the
        // log and the metric say it failed.
        let (verdict, pool, reason) = match verdict {
            Ok(Verdict::Accept) => ("accept", None, None),
            Ok(Verdict::Escalate { pool, reason }) => {
                ("escalate", Some(self.target(app, pool)), Some(reason))
            }
            // The small answer is in hand: serving it is the cheapest way
            // to not fail the request.
            Err(e) => {
                tracing::warn!(
                    plugin = self.policy.name(),
                    version = self.policy.version(),
                    kind = e.kind(),
                    error = %e,
                    "policy review failed; serving the small answer"
                );
                metrics::record_policy_error(self.policy.name(), e.kind());
                ("failed", None, None)
            }
        };
        let shadow = self.settings.shadow;
        let reason_label = reason.as_deref().unwrap_or("");
        metrics::record_review(&self.small, verdict, reason_label, shadow);
        tracing::info!(
            plugin = self.policy.name(),
            version = self.policy.version(),
            pool = %self.small,
            verdict,
            reason = cut_for_log(reason_label),
            shadow,
            partial,
            tokens = answer.completion_tokens,
            mean_logprob = f64::from(answer.summary.mean),
            min_logprob = f64::from(answer.summary.min),
            latency_ms = answer.latency_ms,
            "cascade review"
        );
        outcome.review = Some(format!(
            "{verdict}{}",
            reason
                .map(|r| format!(":{}", cut_for_log(&r)))
                .unwrap_or_default()
        ));
        let pool = if shadow { None } else { pool };
        outcome.escalated = Some(pool.is_some());
        app.ledger().cascade(pool.is_some());
        pool
    }

    /// The pool an escalation goes to: the verdict's, if it names a
    /// configured pool, else the route's.
    fn target(&self, app: &App, pool: String) -> String {
        if pool.is_empty() || pool == self.large {
            return self.large.clone();
        }
        if app.has_pool(&pool) {
            return pool;
        }
        tracing::warn!(
            plugin = self.policy.name(),
            pool = %cut_for_log(&pool),
            "review escalated to a pool that does not exist; using the \
             route's escalation pool"
        );
        metrics::record_policy_error(self.policy.name(), "unknown_pool");
        self.large.clone()
    }

    /// The small pool failed: the escalation pool answers, unreviewed.
    async fn small_failed(
        &self,
        app: &App,
        headers: &HeaderMap,
        api: ApiRequest,
        outcome: &mut Outcome,
        why: String,
    ) -> Result<Response<Body>, ApiError> {
        tracing::warn!(
            pool = %self.small,
            escalate_to = %self.large,
            error = %why,
            "small pool failed; escalating without review"
        );
        metrics::record_review(&self.small, "escalate", SMALL_FAILED, false);
        outcome.review = Some(format!("escalate:{SMALL_FAILED}"));
        outcome.escalated = Some(true);
        app.ledger().cascade(true);
        escalate(app, headers, api, &self.large, outcome).await
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Escalates to `pool`; when that pool fails (an error, or a 5xx),
    /// returns `None` so that the small answer in hand is served instead
    /// of the failure, and notes that on the request's outcome.
    async fn escalate_or_keep(
        &self,
        app: &App,
        headers: &HeaderMap,
        api: ApiRequest,
        pool: &str,
        outcome: &mut Outcome,
    ) -> Option<Response<Body>> {
        let error = match escalate(app, headers, api, pool, outcome).await {
            Ok(response) if !response.status().is_server_error() => return Some(response),
            Ok(response) => format!("status {}", response.status().as_u16()),
            Err(e) => e.message,
        };
        tracing::warn!(
            pool = %self.small,
            escalate_to = %pool,
            error = %error,
            "escalation pool failed; serving the small answer"
        );
        outcome.pool = Some(self.small.clone());
        outcome.escalated = Some(false);
        None
    }
}

/// The review answer for a whole OpenAI answer (`choices[0]`), as the
/// cascade builds it, for `switchyard plugin test`.
pub(crate) fn review_answer_of(value: &Value, pool: &str, low_logprob: f32) -> ReviewAnswer {
    let mut evidence = Evidence::default();
    if let Some(choice) = first_choice(value) {
        evidence.absorb(choice);
    }
    evidence.usage = usage_of(value);
    evidence.answer(pool, low_logprob, Duration::ZERO, false)
}

/// Whether the client asked for log-probabilities itself.
fn wants_logprobs(api: &ApiRequest) -> bool {
    match (api.endpoint, api.body.get("logprobs")) {
        (Endpoint::ChatCompletions, Some(Value::Bool(wanted))) => *wanted,
        (Endpoint::Completions, Some(value)) => !value.is_null(),
        _ => false,
    }
}

/// Asks for the sampled tokens' log-probabilities, leaving any larger
/// request of the client's alone.
pub(crate) fn ask_logprobs(api: &mut ApiRequest) {
    if wants_logprobs(api) {
        return;
    }
    let value = match api.endpoint {
        Endpoint::ChatCompletions => Value::Bool(true),
        _ => Value::from(0),
    };
    Arc::make_mut(&mut api.body).insert("logprobs".to_string(), value);
}

/// Sets every choice's `logprobs` to null.
fn strip_logprobs(value: &mut Value) {
    if let Some(choices) = value.get_mut("choices").and_then(Value::as_array_mut) {
        for choice in choices {
            if let Some(choice) = choice.as_object_mut() {
                if choice.contains_key("logprobs") {
                    choice.insert("logprobs".to_string(), Value::Null);
                }
            }
        }
    }
}

/// The choice with index 0 (the first one when none has an index).
fn first_choice(value: &Value) -> Option<&Value> {
    let choices = value.get("choices")?.as_array()?;
    choices
        .iter()
        .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
}

/// Reads an answer whole, refusing more than `MAX_ANSWER_BYTES`.
// A loop rather than `http_body_util::Limited`: its error conversion from
// our boxed error type defeats the compiler's proof that the request
// future is `Send`.
pub(crate) async fn read_limited(mut body: Body) -> Result<Bytes, String> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("could not read the answer: {e}"))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_ANSWER_BYTES {
                return Err(format!("answer is larger than {MAX_ANSWER_BYTES} bytes"));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(bytes))
}

/// What a small answer showed so far: text, token log-probabilities,
/// finish reason.
#[derive(Debug, Default)]
struct Evidence {
    text: String,
    logprobs: Vec<f32>,
    finish_reason: Option<String>,
    /// The answer's `usage`, when it had one.
    usage: Option<Usage>,
    /// A stream's `[DONE]` (or its end) was seen.
    done: bool,
}

impl Evidence {
    /// Takes in one choice of a whole answer or of a stream chunk (chat
    /// `message`/`delta` with `logprobs.content`, completions `text` with
    /// `logprobs.token_logprobs`).
    fn absorb(&mut self, choice: &Value) {
        let text = choice
            .pointer("/message/content")
            .or_else(|| choice.pointer("/delta/content"))
            .or_else(|| choice.get("text"))
            .and_then(Value::as_str);
        if let Some(text) = text {
            self.text.push_str(text);
        }
        if let Some(logprobs) = choice.get("logprobs") {
            if let Some(content) = logprobs.get("content").and_then(Value::as_array) {
                let values = content.iter().filter_map(|t| t.get("logprob")?.as_f64());
                self.logprobs.extend(values.map(|l| l as f32));
            } else if let Some(tokens) = logprobs.get("token_logprobs").and_then(Value::as_array) {
                let values = tokens.iter().filter_map(Value::as_f64);
                self.logprobs.extend(values.map(|l| l as f32));
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_string());
        }
    }

    /// Takes in one server-sent event.
    fn absorb_event(&mut self, event: &str) {
        let Some(data) = event_data(event) else {
            return;
        };
        if data.trim() == "[DONE]" {
            self.done = true;
            return;
        }
        if let Ok(chunk) = serde_json::from_str::<Value>(&data) {
            if let Some(choice) = first_choice(&chunk) {
                self.absorb(choice);
            }
            if let Some(usage) = usage_of(&chunk) {
                self.usage = Some(usage);
            }
        }
    }

    fn tokens(&self) -> usize {
        self.logprobs.len()
    }

    /// The answer's usage, or its logprob count as completion tokens.
    fn usage(&self) -> Usage {
        self.usage.unwrap_or(Usage {
            prompt: 0,
            completion: self.logprobs.len() as u64,
        })
    }

    fn answer(&self, pool: &str, low: f32, elapsed: Duration, partial: bool) -> ReviewAnswer {
        let counted = self.usage().completion;
        ReviewAnswer {
            pool: pool.to_string(),
            text: self.text.clone(),
            finish_reason: if partial {
                String::new()
            } else {
                self.finish_reason.clone().unwrap_or_default()
            },
            completion_tokens: u32::try_from(counted).unwrap_or(u32::MAX),
            token_logprobs: self.logprobs.clone(),
            summary: LogprobSummary::of(&self.logprobs, low),
            latency_ms: u32::try_from(elapsed.as_millis()).unwrap_or(u32::MAX),
            partial,
        }
    }
}

/// Splits a byte stream into server-sent events (text between blank
/// lines), whatever the frame boundaries.
#[derive(Debug, Default)]
struct SseSplitter {
    buf: Vec<u8>,
}

impl SseSplitter {
    /// Adds `chunk`; returns the events it completed, without their
    /// terminating blank line.
    fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some((end, skip)) = event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end + skip).take(end).collect();
            events.push(String::from_utf8_lossy(&event).into_owned());
        }
        events
    }

    /// What is left when the stream ends without a final blank line.
    fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        let rest = String::from_utf8_lossy(&rest).trim().to_string();
        (!rest.is_empty()).then_some(rest)
    }
}

/// Where the first event in `buf` ends and how long its terminator is.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = find(buf, b"\n\n").map(|i| (i, 2));
    let crlf = find(buf, b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `data:` lines of an event, joined with newlines.
fn event_data(event: &str) -> Option<String> {
    let lines: Vec<&str> = event
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// An event as sent to the client: unchanged, or with its choices'
/// `logprobs` nulled when `strip` is set.
fn rewrite_event(event: &str, strip: bool) -> Bytes {
    if strip {
        if let Some(data) = event_data(event) {
            if let Ok(mut chunk) = serde_json::from_str::<Value>(&data) {
                strip_logprobs(&mut chunk);
                return Bytes::from(format!("data: {chunk}\n\n"));
            }
        }
    }
    Bytes::from(format!("{event}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sse_splitter_joins_events_across_frames() {
        let mut s = SseSplitter::default();
        assert!(s.push(b"data: {\"a\"").is_empty());
        let events = s.push(b":1}\n\ndata: [DONE]\r\n\r\ndata: x");
        assert_eq!(events, vec!["data: {\"a\":1}", "data: [DONE]"]);
        assert_eq!(s.finish().as_deref(), Some("data: x"));
    }

    #[test]
    fn evidence_reads_chat_and_completion_logprobs() {
        let mut chat = Evidence::default();
        chat.absorb(&json!({
            "message": {"content": "Hi there"},
            "logprobs": {"content": [{"logprob": -0.5}, {"logprob": -1.5}]},
            "finish_reason": "stop",
        }));
        assert_eq!(chat.text, "Hi there");
        assert_eq!(chat.logprobs, vec![-0.5, -1.5]);
        let answer = chat.answer("small", -1.0, Duration::ZERO, false);
        assert_eq!(answer.finish_reason, "stop");
        assert_eq!(answer.summary.mean, -1.0);
        assert_eq!(answer.summary.share_below, 0.5);

        let mut completion = Evidence::default();
        for event in [
            r#"data: {"choices":[{"index":0,"text":"a","logprobs":{"token_logprobs":[-0.25]}}]}"#,
            r#"data: {"choices":[{"index":0,"text":" b","logprobs":{"token_logprobs":[null, -0.75]},"finish_reason":"length"}]}"#,
            "data: [DONE]",
        ] {
            completion.absorb_event(event);
        }
        assert_eq!(completion.text, "a b");
        assert_eq!(completion.logprobs, vec![-0.25, -0.75]);
        assert!(completion.done);
        let partial = completion.answer("small", -1.0, Duration::ZERO, true);
        assert_eq!(partial.finish_reason, "", "a partial answer has no finish");
    }

    #[test]
    fn stripping_nulls_logprobs_of_every_choice() {
        let event =
            r#"data: {"choices":[{"index":0,"delta":{"content":"x"},"logprobs":{"content":[]}}]}"#;
        let out = rewrite_event(event, true);
        let chunk: Value = serde_json::from_slice(&out[6..]).unwrap_or_default();
        assert_eq!(chunk["choices"][0]["logprobs"], Value::Null);
        assert_eq!(chunk["choices"][0]["delta"]["content"], "x");
        assert_eq!(rewrite_event("data: [DONE]", true), "data: [DONE]\n\n");
    }

    #[test]
    fn logprobs_are_asked_for_in_each_endpoints_form() {
        let chat = ApiRequest::parse(
            Endpoint::ChatCompletions,
            br#"{"model":"auto","messages":[{"role":"user","content":"x"}]}"#,
        );
        let mut chat = chat.unwrap_or_else(|e| unreachable!("{e}"));
        assert!(!wants_logprobs(&chat));
        ask_logprobs(&mut chat);
        assert_eq!(chat.body["logprobs"], true);

        let text = br#"{"model":"auto","prompt":"x","logprobs":3}"#;
        let mut completion =
            ApiRequest::parse(Endpoint::Completions, text).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(wants_logprobs(&completion));
        ask_logprobs(&mut completion);
        assert_eq!(completion.body["logprobs"], 3, "the client's k is kept");
    }
}
