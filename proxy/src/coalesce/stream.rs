//! Merged streaming completions: several callers' `stream: true`
//! completions sent as one upstream stream over their combined prompts,
//! and its server-sent events split back so that each caller reads only
//! its own choices, renumbered from 0, with its own usage and its own
//! `data: [DONE]`.
//!
//! The relay reads the upstream as fast as it answers and never waits on
//! a caller: one slow or departed reader cannot hold up the others. A
//! caller's side (`CallerStream`) joins the pieces of every chunk its
//! prompts were cut into and writes them as SSE.
//!
//! This module neither queues nor retries; `batch` decides what is sent.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use switchyard_policy::Endpoint;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::batch::{self, BatchReply, Member};
use super::Permit;
use crate::body::{Body, BoxError};
use crate::error::{ApiError, ErrorKind};
use crate::metrics;
use crate::upstream::Pool;

/// What the relay tells one chunk of a streaming caller.
#[derive(Debug)]
pub enum Piece {
    /// An event for the caller, its choices numbered within the chunk.
    Event(Map<String, Value>),
    /// The usage event, with the caller's share of the tokens.
    Usage(Map<String, Value>),
    /// Every choice of the chunk has finished.
    Done,
    /// The upstream stream broke off: the caller's stream is cut.
    Broken(String),
}

/// Where the relay sends one chunk's pieces: the caller's stream and the
/// chunk's place in the caller's prompts.
#[derive(Debug, Clone)]
pub struct Sink {
    tx: mpsc::UnboundedSender<(usize, Piece)>,
    chunk: usize,
}

impl Sink {
    pub fn new(tx: mpsc::UnboundedSender<(usize, Piece)>, chunk: usize) -> Self {
        Self { tx, chunk }
    }

    /// Sends a piece; false when the caller has gone.
    fn send(&self, piece: Piece) -> bool {
        self.tx.send((self.chunk, piece)).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// One caller in a merged stream, once the stream has started.
#[derive(Debug)]
struct Listener {
    sink: Sink,
    /// Choices not yet finished.
    open: u64,
    /// Its pieces are all sent (or it left).
    done: bool,
    /// It went away before its stream ended.
    left: bool,
    /// Prompt size, for the usage split.
    prompt_weight: u64,
    /// Completion size seen so far, for the usage split: tokens where
    /// `logprobs` lists them, else characters, plus one per choice.
    completion_weight: u64,
}

/// Splits the upstream's events among the listeners.
#[derive(Debug)]
struct Demux {
    listeners: Vec<Listener>,
    /// For each upstream choice index, the callers (and their own index)
    /// it answers: more than one where identical prompts collapsed.
    targets: HashMap<u64, Vec<(usize, u64)>>,
    /// Callers wait for the usage event before their `[DONE]`.
    expect_usage: bool,
}

/// What to do after an event.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// The upstream sent `[DONE]`.
    End,
}

impl Demux {
    /// `counts[k]` items of caller k, in order; `map[p]` the sent item
    /// that answers caller item p; `n` choices per item.
    fn new(
        listeners: Vec<Listener>,
        counts: &[usize],
        map: &[usize],
        n: u64,
        expect_usage: bool,
    ) -> Self {
        let mut targets: HashMap<u64, Vec<(usize, u64)>> = HashMap::new();
        let mut p = 0;
        for (k, count) in counts.iter().enumerate() {
            for local in 0..*count as u64 {
                let sent = map.get(p).copied().unwrap_or(p) as u64;
                for j in 0..n {
                    let target = (k, local * n + j);
                    targets.entry(sent * n + j).or_default().push(target);
                }
                p += 1;
            }
        }
        Self {
            listeners,
            targets,
            expect_usage,
        }
    }

    /// Handles one event's data. An error says the upstream sent what
    /// cannot be split; the caller then cuts every stream.
    fn on_data(&mut self, data: &str) -> Result<Flow, String> {
        if data.trim() == "[DONE]" {
            self.finish_all();
            return Ok(Flow::End);
        }
        let Ok(Value::Object(mut event)) = serde_json::from_str::<Value>(data) else {
            return Err("sent an event that is not a JSON object".to_string());
        };
        let choices = match event.remove("choices") {
            Some(Value::Array(choices)) => choices,
            Some(_) => return Err("sent `choices` that is not an array".to_string()),
            None => Vec::new(),
        };

        // The usage event: every choice has ended; share the tokens out.
        if choices.is_empty() {
            if let Some(Value::Object(usage)) = event.remove("usage") {
                self.share_usage(&event, &usage);
                return Ok(Flow::Continue);
            }
            // Anything else (an error event, say) concerns every caller.
            self.broadcast(&event);
            return Ok(Flow::Continue);
        }

        // Usage on a chunk with choices (per-chunk usage stats) cannot be
        // split; callers get `null` there and their share at the end.
        if event.get("usage").is_some_and(Value::is_object) {
            event.insert("usage".to_string(), Value::Null);
        }
        let mut per_caller: Vec<Vec<Value>> = vec![Vec::new(); self.listeners.len()];
        for choice in choices {
            let Some(index) = choice.get("index").and_then(Value::as_u64) else {
                return Err("sent a choice without an integer `index`".to_string());
            };
            let Some(targets) = self.targets.get(&index) else {
                return Err(format!("sent a choice with index {index} out of range"));
            };
            let finished = choice
                .get("finish_reason")
                .is_some_and(|reason| !reason.is_null());
            let weight = choice_weight(&choice) + u64::from(finished);
            for &(k, local) in targets {
                let mut own = choice.clone();
                own["index"] = Value::from(local);
                let listener = &mut self.listeners[k];
                listener.completion_weight += weight;
                if finished {
                    listener.open = listener.open.saturating_sub(1);
                }
                per_caller[k].push(own);
            }
        }

        // Each caller gets one event with its choices, under its own id.
        let several = self.listeners.len() > 1;
        for (k, choices) in per_caller.into_iter().enumerate() {
            let listener = &mut self.listeners[k];
            if choices.is_empty() || listener.done {
                continue;
            }
            let mut own = event.clone();
            if several {
                if let Some(Value::String(id)) = own.get_mut("id") {
                    id.push_str(&format!("-{k}"));
                }
            }
            own.insert("choices".to_string(), Value::Array(choices));
            if !listener.sink.send(Piece::Event(own)) {
                listener.done = true;
                listener.left = true;
                continue;
            }
            if listener.open == 0 && !self.expect_usage {
                listener.done = true;
                listener.sink.send(Piece::Done);
            }
        }
        Ok(Flow::Continue)
    }

    /// Sends each caller its share of `usage` in a copy of `event`, and
    /// its `[DONE]`.
    fn share_usage(&mut self, event: &Map<String, Value>, usage: &Map<String, Value>) {
        let count = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
        let weights = |f: fn(&Listener) -> u64| self.listeners.iter().map(f).collect::<Vec<_>>();
        let prompt = batch::apportion(count("prompt_tokens"), &weights(|l| l.prompt_weight));
        let completion = batch::apportion(
            count("completion_tokens"),
            &weights(|l| l.completion_weight),
        );
        let several = self.listeners.len() > 1;
        for (k, listener) in self.listeners.iter_mut().enumerate() {
            if listener.done {
                continue;
            }
            let mut own = event.clone();
            if several {
                if let Some(Value::String(id)) = own.get_mut("id") {
                    id.push_str(&format!("-{k}"));
                }
            }
            let mut share = Map::new();
            share.insert("prompt_tokens".into(), prompt[k].into());
            share.insert("completion_tokens".into(), completion[k].into());
            share.insert("total_tokens".into(), (prompt[k] + completion[k]).into());
            own.insert("choices".to_string(), Value::Array(Vec::new()));
            own.insert("usage".to_string(), Value::Object(share));
            listener.sink.send(Piece::Usage(own));
            listener.sink.send(Piece::Done);
            listener.done = true;
        }
    }

    fn broadcast(&mut self, event: &Map<String, Value>) {
        for listener in self.listeners.iter_mut().filter(|l| !l.done) {
            if !listener.sink.send(Piece::Event(event.clone())) {
                listener.done = true;
                listener.left = true;
            }
        }
    }

    /// The upstream ended cleanly: whoever is still listening is done.
    fn finish_all(&mut self) {
        for listener in self.listeners.iter_mut().filter(|l| !l.done) {
            listener.done = true;
            listener.sink.send(Piece::Done);
        }
    }

    /// The upstream broke off: every stream still open is cut.
    fn break_all(&mut self, why: &str) {
        for listener in self.listeners.iter_mut().filter(|l| !l.done) {
            listener.done = true;
            listener.sink.send(Piece::Broken(why.to_string()));
        }
    }

    /// Nobody waits for more and someone left early: the rest of the
    /// upstream stream would be read for no one. When every caller
    /// finished, the stream is read to its end instead, so that its
    /// connection can serve again.
    fn abandoned(&self) -> bool {
        let over = |l: &Listener| l.done || l.sink.is_closed();
        let left = |l: &Listener| l.left || (!l.done && l.sink.is_closed());
        self.listeners.iter().all(over) && self.listeners.iter().any(left)
    }

    /// The sinks of callers still waiting for pieces.
    fn waiting(&self) -> Vec<Sink> {
        let open = self.listeners.iter().filter(|l| !l.done);
        open.map(|l| l.sink.clone()).collect()
    }
}

/// A choice's completion size: tokens where its `logprobs` lists them,
/// else characters of its text.
fn choice_weight(choice: &Value) -> u64 {
    let tokens = choice
        .get("logprobs")
        .and_then(|logprobs| logprobs.get("tokens"))
        .and_then(Value::as_array);
    if let Some(tokens) = tokens {
        return tokens.len() as u64;
    }
    let text = choice.get("text").and_then(Value::as_str);
    text.map_or(0, |t| t.chars().count() as u64)
}

/// Cuts an SSE byte stream into the data of each event.
#[derive(Debug, Default)]
struct SseReader {
    buffer: Vec<u8>,
}

impl SseReader {
    /// Adds `bytes` and returns the data of every event now complete.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, gap)) = event_end(&self.buffer) {
            let event: Vec<u8> = self.buffer.drain(..end + gap).collect();
            let text = String::from_utf8_lossy(&event[..end]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|data| data.strip_prefix(' ').unwrap_or(data))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

/// Where the first event in `buffer` ends, and the length of the blank
/// line that ends it.
fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|at| (at, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| (at, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Reads `data` as an SSE stream twice, whole and cut at `cuts`, and
/// checks that both give the same events: where the network splits a
/// stream must not change what callers receive. Panics when they differ;
/// for the fuzz targets in `fuzz/`.
pub(super) fn check_sse_reader(data: &[u8], cuts: &[usize]) {
    let whole = SseReader::default().push(data);
    let mut reader = SseReader::default();
    let mut pieces = Vec::new();
    let mut start = 0;
    for &cut in cuts {
        let end = cut.clamp(start, data.len());
        pieces.extend(reader.push(&data[start..end]));
        start = end;
    }
    pieces.extend(reader.push(&data[start..]));
    assert_eq!(whole, pieces, "cuts at {cuts:?}");
}

/// What `relay` needs to know of the batch it sends.
#[derive(Debug)]
pub(super) struct Merged {
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// Caller item p is answered by sent item `map[p]`.
    pub map: Vec<usize>,
    pub batch_items: usize,
}

/// Sends a merged streaming request and relays its events to `members`.
/// `permit` learns the stream's time and what it says of the upstream.
pub(super) async fn relay(
    pool: Arc<Pool>,
    endpoint: Endpoint,
    mut members: Vec<Member>,
    merged: Merged,
    permit: Option<&mut Permit>,
) {
    let started = Instant::now();
    let sent = tokio::select! {
        sent = pool.post(&merged.path, &merged.headers, merged.body) => sent,
        () = batch::all_gone(&mut members) => {
            tracing::debug!(pool = %pool.name, "every caller left; stream aborted");
            return;
        }
    };
    let upstream = match sent {
        Ok(upstream) => upstream,
        Err(e) => {
            if let Some(permit) = permit {
                permit.set_healthy(!e.kind.is_unreachable());
            }
            for member in members {
                let _ = member.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    metrics::record_upstream(&pool.name, endpoint, upstream.elapsed);
    let status = upstream.response.status();
    let mut permit = permit;
    if let Some(permit) = permit.as_deref_mut() {
        permit.set_healthy(true);
    }

    // A refusal is an ordinary answer: read it whole, then either retry
    // the callers one by one or hand it to each of them as it came.
    if !status.is_success() {
        let body = pool.watch_body(upstream.response.into_body()).collect();
        let answer = match body.await {
            Ok(body) => Ok((status, body.to_bytes())),
            Err(e) => Err(ApiError::new(
                ErrorKind::UpstreamUnavailable,
                format!("pool {:?}: upstream broke off its answer: {e}", pool.name),
            )),
        };
        if batch::refuses_input(status) && members.len() > 1 {
            batch::retry_alone(pool, endpoint, members, status).await;
            return;
        }
        for member in members {
            let reply = answer.clone().map(|(status, body)| BatchReply {
                status,
                body,
                batch_items: merged.batch_items,
            });
            let _ = member.reply.send(reply);
        }
        return;
    }

    // The stream has started: every caller is answered 200 now and reads
    // its pieces from its sink.
    let n = batch::first_n(&members);
    let expect_usage = members.first().is_some_and(|m| {
        let options = m.part.template.get("stream_options");
        options.and_then(|o| o.get("include_usage")) == Some(&Value::Bool(true))
    });
    let counts: Vec<usize> = members.iter().map(|m| m.part.items.len()).collect();
    let mut listeners = Vec::with_capacity(members.len());
    for member in members {
        let prompt_weight = member.part.items.iter().map(batch::item_weight).sum();
        let open = member.part.items.len() as u64 * n;
        let Some(sink) = member.part.sink.clone() else {
            continue;
        };
        let head = BatchReply {
            status,
            body: Bytes::new(),
            batch_items: merged.batch_items,
        };
        let gone = member.reply.send(Ok(head)).is_err();
        listeners.push(Listener {
            sink,
            open,
            done: gone,
            left: gone,
            prompt_weight,
            completion_weight: 0,
        });
    }
    let mut demux = Demux::new(listeners, &counts, &merged.map, n, expect_usage);

    let mut body = std::pin::pin!(pool.watch_body(upstream.response.into_body()));
    let mut reader = SseReader::default();
    let mut clean = false;
    let outcome = loop {
        // Dropping the upstream body closes its connection: that is how a
        // stream whose callers have all gone is aborted.
        let waiting = demux.waiting();
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = all_closed(&waiting), if !waiting.is_empty() => {
                tracing::debug!(pool = %pool.name, "every caller left; stream aborted");
                break Err(None);
            }
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Some(Err(e)) => break Err(Some(format!("upstream broke off the stream: {e}"))),
            None => break Ok(()),
        };
        let mut end = false;
        for event in reader.push(&data) {
            match demux.on_data(&event) {
                Ok(Flow::Continue) => {}
                Ok(Flow::End) => {
                    end = true;
                    clean = true;
                }
                Err(what) => {
                    let message = format!("pool {:?}: upstream {what}", pool.name);
                    tracing::warn!(pool = %pool.name, error = %message, "merged stream cut");
                    demux.break_all(&message);
                    break;
                }
            }
        }
        if end {
            break Ok(());
        }
        if demux.abandoned() {
            tracing::debug!(pool = %pool.name, "every caller left; stream aborted");
            break Err(None);
        }
    };

    match outcome {
        Ok(()) => {
            // A stream that ended without finishing a caller's choices
            // was cut short, whatever the transport said.
            demux.break_all("the upstream stream ended before every choice finished");
            // Only a whole stream is a sample of the upstream's cost.
            if let Some(permit) = permit.filter(|_| clean) {
                permit.sample_items = Some(merged.batch_items);
                permit.started = started;
            }
        }
        Err(Some(why)) => {
            tracing::warn!(pool = %pool.name, error = %why, "merged stream cut");
            demux.break_all(&why);
        }
        Err(None) => {}
    }
}

/// Resolves once every sink's caller has gone.
async fn all_closed(sinks: &[Sink]) {
    for sink in sinks {
        sink.tx.closed().await;
    }
}

/// Why a caller's merged stream was cut.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StreamCut(String);

/// A streaming caller's answer: the pieces of each of its chunks, joined
/// into one SSE stream whose choices are numbered across its prompts, one
/// usage event (the chunks' shares summed) and one `data: [DONE]`.
#[derive(Debug)]
pub struct CallerStream {
    rx: mpsc::UnboundedReceiver<(usize, Piece)>,
    /// The caller's first choice index in each chunk.
    offsets: Vec<u64>,
    done: Vec<bool>,
    /// The id of the first event, given to every event.
    id: Option<Value>,
    usage: Option<Map<String, Value>>,
    /// The cut, held back one poll so that the events before it are
    /// written out first.
    cut: Option<StreamCut>,
    finished: bool,
}

impl CallerStream {
    pub fn new(rx: mpsc::UnboundedReceiver<(usize, Piece)>, offsets: Vec<u64>) -> Self {
        let done = vec![false; offsets.len()];
        Self {
            rx,
            offsets,
            done,
            id: None,
            usage: None,
            cut: None,
            finished: false,
        }
    }

    pub fn into_body(self) -> Body {
        self.boxed()
    }

    /// The bytes of one event, its choices moved to the caller's own
    /// numbering and its id made the caller's one id.
    fn event(&mut self, chunk: usize, mut event: Map<String, Value>) -> Bytes {
        let offset = self.offsets.get(chunk).copied().unwrap_or(0);
        if offset > 0 {
            if let Some(Value::Array(choices)) = event.get_mut("choices") {
                for choice in choices {
                    let index = choice.get("index").and_then(Value::as_u64);
                    choice["index"] = Value::from(offset + index.unwrap_or(0));
                }
            }
        }
        self.same_id(&mut event);
        sse(&event)
    }

    fn same_id(&mut self, event: &mut Map<String, Value>) {
        if let Some(id) = event.get("id") {
            match &self.id {
                Some(first) => {
                    event.insert("id".to_string(), first.clone());
                }
                None => self.id = Some(id.clone()),
            }
        }
    }

    /// Adds a chunk's usage event to the one the caller will get.
    fn add_usage(&mut self, mut event: Map<String, Value>) {
        let Some(joined) = &mut self.usage else {
            self.same_id(&mut event);
            self.usage = Some(event);
            return;
        };
        let (Some(Value::Object(sum)), Some(Value::Object(part))) =
            (joined.get_mut("usage"), event.get("usage"))
        else {
            return;
        };
        for (name, count) in part {
            if let (Some(count), Some(total)) = (count.as_u64(), sum.get(name)) {
                let total = total.as_u64().unwrap_or(0) + count;
                sum.insert(name.clone(), Value::from(total));
            }
        }
    }

    /// The usage event (where any came) and `[DONE]`.
    fn tail(&mut self) -> Bytes {
        let mut tail = Vec::new();
        if let Some(usage) = self.usage.take() {
            tail.extend_from_slice(&sse(&usage));
        }
        tail.extend_from_slice(b"data: [DONE]\n\n");
        Bytes::from(tail)
    }
}

fn sse(event: &Map<String, Value>) -> Bytes {
    let json = serde_json::to_string(event).unwrap_or_default();
    Bytes::from(format!("data: {json}\n\n"))
}

impl HttpBody for CallerStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(cut) = self.cut.take() {
                self.finished = true;
                return Poll::Ready(Some(Err(Box::new(cut))));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            let Some((chunk, piece)) = std::task::ready!(self.rx.poll_recv(cx)) else {
                // Every relay is gone without finishing this stream.
                self.finished = true;
                let cut = StreamCut("the merged stream carrying this request was lost".into());
                return Poll::Ready(Some(Err(Box::new(cut))));
            };
            match piece {
                Piece::Event(event) => {
                    let bytes = self.event(chunk, event);
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Piece::Usage(event) => self.add_usage(event),
                Piece::Done => {
                    if let Some(done) = self.done.get_mut(chunk) {
                        *done = true;
                    }
                    if self.done.iter().all(|d| *d) {
                        self.finished = true;
                        let tail = self.tail();
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                }
                Piece::Broken(why) => {
                    // hyper drops what it has not yet written when a body
                    // fails; pausing once lets it flush the events first.
                    self.cut = Some(StreamCut(why));
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.cut.is_none()
    }
}

/// A streaming caller's answer as `Coalescer::submit_stream` gives it.
#[derive(Debug)]
pub enum StreamReply {
    /// The upstream refused the request: its answer, whole.
    Whole(BatchReply),
    /// The stream, and the items in the largest upstream request that
    /// carried the caller.
    Events { body: Body, batch_items: usize },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn listeners(
        counts: &[usize],
        n: u64,
    ) -> (Vec<Listener>, Vec<mpsc::UnboundedReceiver<(usize, Piece)>>) {
        let mut listeners = Vec::new();
        let mut receivers = Vec::new();
        for count in counts {
            let (tx, rx) = mpsc::unbounded_channel();
            listeners.push(Listener {
                sink: Sink::new(tx, 0),
                open: *count as u64 * n,
                done: false,
                left: false,
                prompt_weight: 1,
                completion_weight: 0,
            });
            receivers.push(rx);
        }
        (listeners, receivers)
    }

    fn chunk(index: u64, text: &str, finish: Option<&str>) -> String {
        json!({
            "id": "cmpl-1", "object": "text_completion", "created": 1,
            "choices": [{"index": index, "text": text,
                         "finish_reason": finish, "logprobs": null}],
        })
        .to_string()
    }

    /// Drains a receiver into (index, text, finished) triples and whether
    /// it ended with `Done`.
    fn drain(rx: &mut mpsc::UnboundedReceiver<(usize, Piece)>) -> (Vec<(u64, String)>, bool) {
        let mut seen = Vec::new();
        let mut done = false;
        while let Ok((_, piece)) = rx.try_recv() {
            match piece {
                Piece::Event(event) => {
                    for choice in event["choices"].as_array().unwrap() {
                        let index = choice["index"].as_u64().unwrap();
                        seen.push((index, choice["text"].as_str().unwrap().to_string()));
                    }
                }
                Piece::Done => done = true,
                Piece::Usage(_) | Piece::Broken(_) => {}
            }
        }
        (seen, done)
    }

    #[test]
    fn interleaved_choices_reach_their_own_caller_renumbered() {
        // Callers of 1 and 2 prompts, n = 2: upstream indices 0..6.
        let (ls, mut rxs) = listeners(&[1, 2], 2);
        let mut demux = Demux::new(ls, &[1, 2], &[0, 1, 2], 2, false);
        for index in (0..6).rev() {
            let data = chunk(index, &format!("t{index}"), None);
            assert_eq!(demux.on_data(&data), Ok(Flow::Continue));
        }
        for index in 0..2 {
            demux.on_data(&chunk(index, "", Some("stop"))).unwrap();
        }
        let (first, done) = drain(&mut rxs[0]);
        assert!(done, "the first caller's choices all finished");
        let texts: Vec<_> = first.iter().filter(|(_, t)| !t.is_empty()).collect();
        assert_eq!(texts, [&(1, "t1".to_string()), &(0, "t0".to_string())]);

        let (second, done) = drain(&mut rxs[1]);
        assert!(!done, "the second caller's choices are still open");
        let indices: Vec<u64> = second.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [3, 2, 1, 0]);
        assert_eq!(second[0].1, "t5");

        assert_eq!(demux.on_data("[DONE]"), Ok(Flow::End));
        assert!(drain(&mut rxs[1]).1);
    }

    #[test]
    fn a_collapsed_prompt_answers_every_caller_that_sent_it() {
        // Both callers sent the same prompt; it went upstream once.
        let (ls, mut rxs) = listeners(&[1, 1], 1);
        let mut demux = Demux::new(ls, &[1, 1], &[0, 0], 1, false);
        demux.on_data(&chunk(0, "same", Some("stop"))).unwrap();
        for rx in &mut rxs {
            assert_eq!(drain(rx), (vec![(0, "same".to_string())], true));
        }
    }

    #[test]
    fn usage_is_shared_out_and_done_waits_for_it() {
        let (ls, mut rxs) = listeners(&[1, 1], 1);
        let mut demux = Demux::new(ls, &[1, 1], &[0, 1], 1, true);
        demux.on_data(&chunk(0, "aaa", Some("stop"))).unwrap();
        demux.on_data(&chunk(1, "a", Some("stop"))).unwrap();
        for rx in &mut rxs {
            assert!(!drain(rx).1, "no [DONE] before the usage");
        }
        let usage = json!({"id": "cmpl-1", "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}});
        demux.on_data(&usage.to_string()).unwrap();
        let mut total = 0;
        for (k, rx) in rxs.iter_mut().enumerate() {
            let (_, piece) = rx.try_recv().unwrap();
            let Piece::Usage(event) = piece else {
                panic!("usage first, got {piece:?}")
            };
            assert_eq!(event["id"], format!("cmpl-1-{k}"));
            assert_eq!(event["usage"]["prompt_tokens"], 5);
            total += event["usage"]["completion_tokens"].as_u64().unwrap();
            assert!(matches!(rx.try_recv().unwrap().1, Piece::Done));
        }
        assert_eq!(total, 6);
    }

    #[test]
    fn an_index_out_of_range_is_an_error() {
        let (ls, _rxs) = listeners(&[1], 1);
        let mut demux = Demux::new(ls, &[1], &[0], 1, false);
        assert!(demux.on_data(&chunk(3, "x", None)).is_err());
    }

    #[test]
    fn events_split_across_frames_and_crlf_are_read_whole() {
        let mut reader = SseReader::default();
        assert!(reader.push(b"data: {\"a\"").is_empty());
        assert_eq!(reader.push(b": 1}\n\ndata: [DO"), vec!["{\"a\": 1}"]);
        assert_eq!(reader.push(b"NE]\r\n\r\n: note\n\n"), vec!["[DONE]"]);
    }

    #[tokio::test]
    async fn a_caller_reads_its_chunks_joined_with_one_usage_and_one_done() {
        let (tx, rx) = mpsc::unbounded_channel();
        // Two chunks of one prompt each, n = 1.
        let body = CallerStream::new(rx, vec![0, 1]);
        let event = |id: &str, index: u64| {
            let value = json!({"id": id, "choices": [{"index": index, "text": "x"}]});
            value.as_object().unwrap().clone()
        };
        let usage = |tokens: u64| {
            let value = json!({"id": "b", "choices": [],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
            value.as_object().unwrap().clone()
        };
        tx.send((1, Piece::Event(event("b", 0)))).unwrap();
        tx.send((0, Piece::Event(event("a", 0)))).unwrap();
        tx.send((1, Piece::Usage(usage(2)))).unwrap();
        tx.send((1, Piece::Done)).unwrap();
        tx.send((0, Piece::Usage(usage(3)))).unwrap();
        tx.send((0, Piece::Done)).unwrap();
        let text = body.collect().await.unwrap().to_bytes();
        let events: Vec<&str> = std::str::from_utf8(&text)
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .collect();
        assert_eq!(events.len(), 4, "{events:?}");
        let first: Value = serde_json::from_str(&events[0][6..]).unwrap();
        assert_eq!(first["choices"][0]["index"], 1);
        let second: Value = serde_json::from_str(&events[1][6..]).unwrap();
        assert_eq!(second["id"], "b", "one id throughout");
        let usage: Value = serde_json::from_str(&events[2][6..]).unwrap();
        assert_eq!(usage["usage"]["prompt_tokens"], 5);
        assert_eq!(events[3], "data: [DONE]");
    }

    #[tokio::test]
    async fn a_broken_chunk_cuts_the_caller_without_done() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut body = CallerStream::new(rx, vec![0]);
        let event = json!({"choices": [{"index": 0, "text": "x"}]});
        tx.send((0, Piece::Event(event.as_object().unwrap().clone())))
            .unwrap();
        tx.send((0, Piece::Broken("gone".into()))).unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.frame().await.unwrap().is_err());
        assert!(body.frame().await.is_none());
    }
}
