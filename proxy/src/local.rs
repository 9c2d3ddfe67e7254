//! Pools of kind `local`: requests answered by the in-process executor
//! instead of an upstream server.
//!
//! This module turns an OpenAI chat or completions request into executor
//! generations (one per prompt and choice) and their events back into the
//! OpenAI response, whole or as server-sent events. The executor owns the
//! model and the batching; nothing here touches a tensor.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use serde_json::{json, Map, Value};
use switchyard_executor::chat::ChatMessage;
use switchyard_executor::engine::{
    Engine, EngineConfig, Event, Finish, GenerateRequest, Generation, SubmitError, TokenInfo,
    MAX_TOP_LOGPROBS,
};
use switchyard_executor::sampler::SamplingParams;
use switchyard_executor::tokenizer::Tokenizer;
use switchyard_policy::Endpoint;

use crate::api::{ApiRequest, ItemForm};
use crate::app::BATCH_SIZE_HEADER;
use crate::body::{full, Body, ChannelBody};
use crate::error::{ApiError, ErrorKind};

/// Completions without `max_tokens` generate this many, as OpenAI's do.
const DEFAULT_COMPLETION_TOKENS: usize = 16;
/// Most stop texts a request may give.
const MAX_STOP_TEXTS: usize = 8;
/// Chunks buffered between the generations and a streaming client.
const STREAM_DEPTH: usize = 64;

/// Request fields the executor does not implement. A request that sets one
/// to anything but its neutral value is refused rather than answered as if
/// the field had been honoured.
const UNSUPPORTED: [(&str, Neutral); 10] = [
    ("frequency_penalty", Neutral::Zero),
    ("presence_penalty", Neutral::Zero),
    ("logit_bias", Neutral::Empty),
    ("tools", Neutral::Empty),
    ("functions", Neutral::Empty),
    ("response_format", Neutral::TextFormat),
    ("echo", Neutral::False),
    ("suffix", Neutral::Empty),
    ("tool_choice", Neutral::NoTool),
    ("best_of", Neutral::One),
];

#[derive(Clone, Copy, Debug)]
enum Neutral {
    Zero,
    Empty,
    False,
    TextFormat,
    /// `"none"`, or `"auto"`, which without tools means none.
    NoTool,
    One,
}

impl Neutral {
    fn holds(self, value: &Value) -> bool {
        match (self, value) {
            (_, Value::Null) => true,
            (Neutral::Zero, v) => v.as_f64() == Some(0.0),
            (Neutral::Empty, Value::Array(a)) => a.is_empty(),
            (Neutral::Empty, Value::Object(o)) => o.is_empty(),
            (Neutral::Empty, Value::String(s)) => s.is_empty(),
            (Neutral::False, Value::Bool(b)) => !b,
            (Neutral::TextFormat, v) => v.get("type").and_then(Value::as_str) == Some("text"),
            (Neutral::NoTool, Value::String(s)) => s == "none" || s == "auto",
            (Neutral::One, v) => v.as_f64() == Some(1.0),
            _ => false,
        }
    }
}

/// A `local` pool: its name, the model name it answers with, and its engine.
#[derive(Debug)]
pub struct LocalPool {
    pub name: String,
    /// The `model` field of its responses.
    pub model: String,
    engine: Arc<Engine>,
    /// Tokens of a chat answer whose request sets no `max_tokens`.
    chat_max_tokens: usize,
}

/// The settings one request asks for, validated.
#[derive(Debug)]
struct Settings {
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    logprobs: Option<usize>,
    include_usage: bool,
}

impl LocalPool {
    /// Loads the model and starts the pool's executor.
    pub fn start(
        config: EngineConfig,
        model: String,
        chat_max_tokens: usize,
    ) -> Result<Self, String> {
        let name = config.name.clone();
        let engine = Engine::start(config).map_err(|e| format!("pool {name:?}: {e}"))?;
        Ok(LocalPool {
            name,
            model,
            engine: Arc::new(engine),
            chat_max_tokens,
        })
    }

    /// Answers a chat or completions request.
    pub async fn handle(&self, api: ApiRequest) -> Result<Response<Body>, ApiError> {
        let settings = self.settings(&api)?;
        // Tokenizing a body of several megabytes takes a while; keep it off
        // the worker that other connections share.
        let prompts = crate::routing::call_blocking(|| self.prompts(&api))?;

        // A request whose prompts and choices outnumber what the pool can
        // ever hold would be refused however long its client waited.
        let wanted = prompts.len() * api.n as usize;
        if wanted > self.engine.capacity() {
            let field = if api.n > 1 { "n" } else { "prompt" };
            return Err(ApiError {
                param: Some(field),
                ..ApiError::invalid(format!(
                    "this request needs {wanted} generations (prompts x n); \
                     pool {:?} holds at most {} at once (max_batch + max_queue)",
                    self.name,
                    self.engine.capacity()
                ))
            });
        }

        // One generation per prompt and choice, all submitted before any is
        // awaited so that they share the running batch. A refusal drops the
        // ones already submitted, which cancels them.
        let mut generations = Vec::with_capacity(prompts.len() * api.n as usize);
        for prompt in &prompts {
            let max_tokens = match (settings.max_tokens, api.endpoint) {
                (Some(n), _) => n,
                (None, Endpoint::Completions) => DEFAULT_COMPLETION_TOKENS,
                (None, _) => self.chat_max_tokens,
            };
            for j in 0..api.n {
                let mut sampling = settings.sampling;
                // Choices of one seeded request differ from each other but
                // repeat from run to run.
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(j));
                let request = GenerateRequest {
                    prompt: prompt.clone(),
                    max_tokens,
                    sampling,
                    stop: settings.stop.clone(),
                    logprobs: settings.logprobs,
                };
                let generation = self
                    .engine
                    .submit(request)
                    .map_err(|e| self.refusal(api.endpoint, e))?;
                generations.push(generation);
            }
        }

        let reply = Reply {
            endpoint: api.endpoint,
            id: response_id(api.endpoint),
            created: unix_now(),
            model: self.model.clone(),
            logprobs: settings.logprobs.is_some(),
            engine: self.engine.clone(),
            n: api.n as usize,
        };
        if api.stream {
            Ok(reply.stream(generations, settings.include_usage))
        } else {
            reply.whole(generations).await
        }
    }

    fn refusal(&self, endpoint: Endpoint, e: SubmitError) -> ApiError {
        let message = format!("pool {:?}: {e}", self.name);
        if matches!(e, SubmitError::QueueFull { .. }) {
            crate::metrics::record_rejected(&self.name, endpoint, "queue_full");
        }
        match e {
            SubmitError::EmptyPrompt => ApiError::invalid(message),
            SubmitError::PromptTooLong { .. } => {
                ApiError::new(ErrorKind::ContextLengthExceeded, message)
            }
            SubmitError::QueueFull { retry_after, .. } => ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(ErrorKind::Overloaded, message)
            },
            SubmitError::Stopped => ApiError::new(ErrorKind::ShuttingDown, message),
        }
    }

    /// Reads and checks the sampling and output fields.
    fn settings(&self, api: &ApiRequest) -> Result<Settings, ApiError> {
        let body = &api.body;
        for (field, neutral) in UNSUPPORTED {
            if let Some(value) = body.get(field) {
                if !neutral.holds(value) {
                    return Err(ApiError {
                        param: Some(field),
                        ..ApiError::invalid(format!(
                            "pool {:?} runs its model in-process and does not \
                             support `{field}`",
                            self.name
                        ))
                    });
                }
            }
        }

        let number = |field: &'static str, lo: f64, hi: f64, default: f64| match body.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if (lo..=hi).contains(&x) => Ok(x),
                _ => Err(ApiError::bad_field(
                    field,
                    &format!("a number from {lo} to {hi}"),
                )),
            },
        };
        if api.max_tokens() == Some(0) {
            let field = if body.get("max_tokens").is_some() {
                "max_tokens"
            } else {
                "max_completion_tokens"
            };
            return Err(ApiError::bad_field(field, "at least 1"));
        }
        let temperature = number("temperature", 0.0, 2.0, 1.0)? as f32;
        let top_p = number("top_p", 0.0, 1.0, 1.0)? as f32;
        let seed = match body.get("seed") {
            None | Some(Value::Null) => None,
            Some(v) => match (v.as_u64(), v.as_i64()) {
                (Some(u), _) => Some(u),
                (None, Some(i)) => Some(i as u64),
                _ => return Err(ApiError::bad_field("seed", "an integer")),
            },
        };

        let stop = match body.get("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                let texts: Option<Vec<String>> = items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect();
                match texts {
                    Some(texts) if texts.len() <= MAX_STOP_TEXTS => texts,
                    _ => {
                        let expected =
                            format!("a string or an array of at most {MAX_STOP_TEXTS} strings");
                        return Err(ApiError::bad_field("stop", &expected));
                    }
                }
            }
            Some(_) => {
                return Err(ApiError::bad_field(
                    "stop",
                    "a string or an array of strings",
                ))
            }
        };

        let logprobs = match api.endpoint {
            Endpoint::ChatCompletions => chat_logprobs(body)?,
            _ => completion_logprobs(body)?,
        };
        let include_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);

        Ok(Settings {
            max_tokens: api
                .max_tokens()
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            sampling: SamplingParams {
                temperature,
                top_p,
                seed,
            },
            stop,
            logprobs,
            include_usage,
        })
    }

    /// The prompts as token ids: the rendered chat, or each completions
    /// prompt (text, or token ids as given).
    fn prompts(&self, api: &ApiRequest) -> Result<Vec<Vec<u32>>, ApiError> {
        let tokenizer = self.engine.tokenizer();
        match api.endpoint {
            Endpoint::ChatCompletions => {
                let messages = chat_messages(api.body.get("messages"))?;
                let ids = self.engine.chat_prompt(&messages).map_err(|e| {
                    ApiError::invalid(format!(
                        "pool {:?}: the model's chat template refused these \
                         messages: {e}",
                        self.name
                    ))
                })?;
                Ok(vec![ids])
            }
            Endpoint::Completions => api
                .items
                .iter()
                .map(|item| prompt_ids(item, api.item_form, tokenizer))
                .collect(),
            Endpoint::Embeddings => Err(ApiError::invalid(format!(
                "pool {:?} runs a generative model in-process and does not \
                 serve embeddings",
                self.name
            ))),
        }
    }
}

fn chat_logprobs(body: &Map<String, Value>) -> Result<Option<usize>, ApiError> {
    let wanted = match body.get("logprobs") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_field("logprobs", "a boolean")),
    };
    let top = match body.get("top_logprobs") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_u64() {
            Some(k) if k as usize <= MAX_TOP_LOGPROBS => k as usize,
            _ => {
                let expected = format!("an integer from 0 to {MAX_TOP_LOGPROBS}");
                return Err(ApiError::bad_field("top_logprobs", &expected));
            }
        },
    };
    if top > 0 && !wanted {
        return Err(ApiError {
            param: Some("top_logprobs"),
            ..ApiError::invalid("`top_logprobs` needs `logprobs: true`")
        });
    }
    Ok(wanted.then_some(top))
}

fn completion_logprobs(body: &Map<String, Value>) -> Result<Option<usize>, ApiError> {
    match body.get("logprobs") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(k) if k as usize <= MAX_TOP_LOGPROBS => Ok(Some(k as usize)),
            _ => {
                let expected = format!("an integer from 0 to {MAX_TOP_LOGPROBS}");
                Err(ApiError::bad_field("logprobs", &expected))
            }
        },
    }
}

/// The messages of a chat request: a role and text content each (a string,
/// or an array of text parts).
fn chat_messages(messages: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(messages)) = messages else {
        return Err(ApiError::bad_field("messages", "an array of messages"));
    };
    let mut out = Vec::with_capacity(messages.len());
    for message in messages {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let content = match message.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad_field(
                                "messages",
                                "messages whose content parts are all text \
                                 (this model reads no images or audio)",
                            ))
                        }
                    }
                }
                text
            }
            Some(_) => {
                return Err(ApiError::bad_field(
                    "messages",
                    "messages whose content is a string or an array of parts",
                ))
            }
        };
        out.push(ChatMessage {
            role: role.to_string(),
            content,
        });
    }
    Ok(out)
}

fn prompt_ids(item: &Value, form: ItemForm, tokenizer: &Tokenizer) -> Result<Vec<u32>, ApiError> {
    match (form, item) {
        (ItemForm::Text, Value::String(text)) => Ok(tokenizer.encode(text, true)),
        (ItemForm::Tokens, Value::Array(ids)) => {
            let vocab = tokenizer.vocab_size() as u64;
            ids.iter()
                .map(|id| match id.as_u64() {
                    Some(id) if id < vocab => Ok(id as u32),
                    _ => Err(ApiError::bad_field(
                        "prompt",
                        &format!("token ids below the vocabulary size ({vocab})"),
                    )),
                })
                .collect()
        }
        _ => Err(ApiError::bad_field(
            "prompt",
            "a string, or an array of token ids",
        )),
    }
}

/// What every response of one request shares.
struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    engine: Arc<Engine>,
    /// Choices per prompt.
    n: usize,
}

/// One choice, collected.
struct Choice {
    text: String,
    tokens: Vec<TokenInfo>,
    finish: Finish,
}

impl Reply {
    /// Waits for every generation and answers with the whole response.
    async fn whole(self, mut generations: Vec<Generation>) -> Result<Response<Body>, ApiError> {
        let mut choices = Vec::with_capacity(generations.len());
        for generation in &mut generations {
            let (mut text, mut tokens) = (String::new(), Vec::new());
            let finish = loop {
                match generation.next().await {
                    Some(Event::Token {
                        text: piece, info, ..
                    }) => {
                        text.push_str(&piece);
                        tokens.extend(info);
                    }
                    Some(Event::Done { text: rest, finish }) => {
                        text.push_str(&rest);
                        break finish;
                    }
                    Some(Event::Failed(message)) => {
                        return Err(ApiError::new(ErrorKind::Internal, message));
                    }
                    None => {
                        return Err(ApiError::new(
                            ErrorKind::ShuttingDown,
                            "the executor stopped before the answer was complete",
                        ))
                    }
                }
            };
            choices.push(Choice {
                text,
                tokens,
                finish,
            });
        }

        // Prompt tokens count once per prompt, however many choices it has.
        let mut prompt_tokens = 0;
        let mut completion_tokens = 0;
        let mut peak_batch = 0;
        for (i, choice) in choices.iter().enumerate() {
            let finish = choice.finish;
            peak_batch = peak_batch.max(finish.peak_batch);
            if i % self.n.max(1) == 0 {
                prompt_tokens += finish.prompt_tokens;
            }
            completion_tokens += finish.completion_tokens;
        }

        let choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, choice)| self.choice_json(index, choice))
            .collect();
        let body = json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        });
        let mut response = Response::new(full(Bytes::from(body.to_string())));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
            .headers_mut()
            .insert(BATCH_SIZE_HEADER, HeaderValue::from(peak_batch));
        Ok(response)
    }

    fn choice_json(&self, index: usize, choice: &Choice) -> Value {
        let finish = choice.finish.reason.as_str();
        let logprobs = if self.logprobs {
            self.logprobs_json(&choice.tokens, &mut Vec::new())
        } else {
            Value::Null
        };
        match self.endpoint {
            Endpoint::ChatCompletions => json!({
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            _ => json!({
                "index": index,
                "text": choice.text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        }
    }

    /// Answers with server-sent events as tokens are generated. Each
    /// generation feeds the body from its own task; when the client leaves,
    /// the body's channel closes, the tasks end and their generations are
    /// dropped, which frees their sequences.
    fn stream(self, generations: Vec<Generation>, include_usage: bool) -> Response<Body> {
        let (tx, body) = ChannelBody::channel(STREAM_DEPTH);
        let (events_tx, mut events) = tokio::sync::mpsc::channel(STREAM_DEPTH);
        let count = generations.len();
        for (index, mut generation) in generations.into_iter().enumerate() {
            let events_tx = events_tx.clone();
            tokio::spawn(async move {
                while let Some(event) = generation.next().await {
                    if events_tx.send((index, event)).await.is_err() {
                        return;
                    }
                }
            });
        }
        drop(events_tx);

        tokio::spawn(async move {
            // Each choice's answer so far, for completions' text offsets.
            let mut answers = vec![Vec::new(); count];
            let mut prompt_tokens = 0;
            let mut completion_tokens = 0;
            let mut done = 0;
            if self.endpoint == Endpoint::ChatCompletions {
                for index in 0..count {
                    let delta = json!({"role": "assistant", "content": ""});
                    let chunk = self.chunk(index, delta, Value::Null, None);
                    if tx.send(sse(&chunk)).await.is_err() {
                        return;
                    }
                }
            }
            while let Some((index, event)) = events.recv().await {
                let chunk = match event {
                    Event::Token { text, info, .. } => {
                        let logprobs = match (&info, self.logprobs) {
                            (Some(info), true) => {
                                let tokens = std::slice::from_ref(info);
                                self.logprobs_json(tokens, &mut answers[index])
                            }
                            _ => Value::Null,
                        };
                        if text.is_empty() && logprobs.is_null() {
                            continue;
                        }
                        self.chunk(index, self.delta(text), logprobs, None)
                    }
                    Event::Failed(message) => {
                        tracing::error!(error = %message, "ending a stream early");
                        return;
                    }
                    Event::Done { text, finish } => {
                        done += 1;
                        if index % self.n.max(1) == 0 {
                            prompt_tokens += finish.prompt_tokens;
                        }
                        completion_tokens += finish.completion_tokens;
                        self.chunk(index, self.delta(text), Value::Null, Some(finish))
                    }
                };
                if tx.send(sse(&chunk)).await.is_err() {
                    return;
                }
            }

            // A generation that ended without its last event means the
            // executor stopped; the stream ends without [DONE] so that the
            // client sees it was cut short.
            if done < count {
                tracing::warn!("executor stopped mid-stream; ending the response early");
                return;
            }
            if include_usage {
                let chunk = json!({
                    "id": self.id,
                    "object": self.object(true),
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens),
                });
                let _ = tx.send(sse(&chunk)).await;
            }
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        });

        let mut response = Response::new(body);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }

    fn delta(&self, text: String) -> Value {
        match self.endpoint {
            Endpoint::ChatCompletions if text.is_empty() => json!({}),
            Endpoint::ChatCompletions => json!({"content": text}),
            _ => Value::String(text),
        }
    }

    fn chunk(&self, index: usize, delta: Value, logprobs: Value, finish: Option<Finish>) -> Value {
        let finish_reason = finish.map(|f| f.reason.as_str());
        let choice = match self.endpoint {
            Endpoint::ChatCompletions => json!({
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
            _ => json!({
                "index": index,
                "text": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::ChatCompletions, false) => "chat.completion",
            (Endpoint::ChatCompletions, true) => "chat.completion.chunk",
            _ => "text_completion",
        }
    }

    /// A token's text for completions' logprobs: its characters, or, for a
    /// token that holds part of a character, its bytes written as
    /// `bytes:\xe2\x80` (OpenAI's convention), so that distinct tokens never
    /// share a name.
    fn token_text(&self, id: u32) -> String {
        let bytes = self.engine.tokenizer().token_bytes(id);
        match std::str::from_utf8(bytes) {
            Ok(text) => text.to_string(),
            Err(_) => {
                let hex: String = bytes.iter().map(|b| format!("\\x{b:02x}")).collect();
                format!("bytes:{hex}")
            }
        }
    }

    /// Log-probabilities in the endpoint's shape: chat's `content` list,
    /// or completions' parallel arrays. `before` holds the answer's bytes
    /// ahead of these tokens; completions' `text_offset` counts the whole
    /// characters in it.
    fn logprobs_json(&self, tokens: &[TokenInfo], before: &mut Vec<u8>) -> Value {
        let tokenizer = self.engine.tokenizer();
        let entry = |id: u32, logprob: f32| {
            let bytes = tokenizer.token_bytes(id);
            json!({
                "token": String::from_utf8_lossy(bytes),
                "logprob": logprob,
                "bytes": bytes,
            })
        };
        match self.endpoint {
            Endpoint::ChatCompletions => {
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(t.token.id, t.token.logprob);
                        let top: Vec<Value> =
                            t.top.iter().map(|a| entry(a.id, a.logprob)).collect();
                        e["top_logprobs"] = Value::Array(top);
                        e
                    })
                    .collect();
                json!({"content": content})
            }
            _ => {
                let mut text_offset = Vec::with_capacity(tokens.len());
                let mut names = Vec::with_capacity(tokens.len());
                for t in tokens {
                    text_offset.push(whole_chars(before));
                    before.extend_from_slice(tokenizer.token_bytes(t.token.id));
                    names.push(self.token_text(t.token.id));
                }
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let map: Map<String, Value> = t
                            .top
                            .iter()
                            .map(|a| (self.token_text(a.id), json!(a.logprob)))
                            .collect();
                        Value::Object(map)
                    })
                    .collect();
                json!({
                    "tokens": names,
                    "token_logprobs": tokens.iter().map(|t| t.token.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": text_offset,
                })
            }
        }
    }
}

/// Characters in the longest valid UTF-8 start of `bytes`.
fn whole_chars(bytes: &[u8]) -> usize {
    let valid = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    };
    valid.chars().count()
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A response id unique within the process and across restarts.
fn response_id(endpoint: Endpoint) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = match endpoint {
        Endpoint::ChatCompletions => "chatcmpl",
        _ => "cmpl",
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{prefix}-{:x}{:04x}",
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}
