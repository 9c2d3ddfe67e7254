//! Coalescing: compatible `/v1/completions` and `/v1/embeddings` requests
//! for one pool that arrive close together go upstream as one request, and
//! each caller gets back exactly its own part of the answer.
//!
//! One task per pool owns the open batches. Requests are compatible when
//! everything but their prompt (or input) is identical, including the
//! credentials they carry; a batch is sent when it holds `max_batch` items
//! or its first request has waited `max_wait_ms`, whichever comes first.
//! Sending and splitting the answer run in their own task, so a slow
//! upstream never delays the next batch. This module does not route and
//! does not stream.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use switchyard_policy::Endpoint;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::api::{ApiRequest, ItemForm};
use crate::body::BodyStalled;
use crate::error::{ApiError, ErrorKind};
use crate::metrics;
use crate::upstream::Pool;

/// Requests that may wait in a pool's coalescer before submitters are
/// slowed down.
const QUEUE_CAPACITY: usize = 4096;

/// Client headers that go upstream with a coalesced request. They are part
/// of the compatibility key, so callers with different credentials never
/// share an upstream request.
// Limitation: every other client header is dropped from coalesced requests,
// because one upstream request cannot carry several callers' values.
const BATCH_HEADERS: [&str; 3] = ["authorization", "openai-organization", "openai-project"];

/// Coalescing limits of one pool.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most items in one upstream request.
    pub max_batch: usize,
    /// Longest time the first request of a batch waits.
    pub max_wait: Duration,
}

/// One caller's share of an upstream answer.
#[derive(Debug)]
pub struct BatchReply {
    pub status: StatusCode,
    pub body: Bytes,
    /// Items in the upstream request that carried this caller.
    pub batch_items: usize,
}

/// The front of a pool's coalescing task.
#[derive(Debug, Clone)]
pub struct Coalescer {
    jobs: mpsc::Sender<Job>,
    limits: BatchLimits,
}

impl Coalescer {
    /// Starts the coalescing task of `pool`. It ends when every clone of
    /// the returned handle is dropped and the open batches are sent.
    pub fn start(pool: Arc<Pool>, limits: BatchLimits) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(run(pool, limits, queue));
        Self { jobs, limits }
    }

    /// Adds a parsed, routed request (its `model` already the pool's) to a
    /// batch and waits for its share of the answer.
    ///
    /// A request with more items than `max_batch` is cut into chunks of at
    /// most `max_batch` that travel in separate upstream requests; their
    /// answers are stitched back in order.
    pub async fn submit(
        &self,
        request: ApiRequest,
        headers: &HeaderMap,
    ) -> Result<BatchReply, ApiError> {
        let max_batch = self.limits.max_batch;
        if request.items.len() <= max_batch {
            return self.submit_one(request, headers).await;
        }

        // Every chunk is queued before any answer is awaited, so the chunks
        // travel upstream side by side.
        let endpoint = request.endpoint;
        let mut answers = Vec::new();
        for items in request.items.chunks(max_batch) {
            let chunk = ApiRequest {
                items: items.to_vec(),
                ..request.clone()
            };
            answers.push(self.enqueue(chunk, headers).await?);
        }
        let mut replies = Vec::with_capacity(answers.len());
        for answer in answers {
            replies.push(receive(answer).await);
        }
        stitch(endpoint, replies)
    }

    async fn submit_one(
        &self,
        request: ApiRequest,
        headers: &HeaderMap,
    ) -> Result<BatchReply, ApiError> {
        let answer = self.enqueue(request, headers).await?;
        receive(answer).await
    }

    /// Hands a job to the coalescing task; the answer comes on the
    /// returned channel.
    async fn enqueue(
        &self,
        request: ApiRequest,
        headers: &HeaderMap,
    ) -> Result<oneshot::Receiver<Result<BatchReply, ApiError>>, ApiError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::new(request, headers, reply)?;
        if self.jobs.send(job).await.is_err() {
            return Err(ApiError::new(
                ErrorKind::ShuttingDown,
                "switchyard is shutting down",
            ));
        }
        Ok(answer)
    }
}

async fn receive(
    answer: oneshot::Receiver<Result<BatchReply, ApiError>>,
) -> Result<BatchReply, ApiError> {
    answer.await.unwrap_or_else(|_| {
        Err(ApiError::new(
            ErrorKind::Internal,
            "the batch carrying this request was lost",
        ))
    })
}

/// Joins the answers to a request's chunks into one answer: entries
/// renumbered by chunk offset, usage summed, the first chunk's id. The
/// first failed chunk, if any, is the answer.
fn stitch(
    endpoint: Endpoint,
    answers: Vec<Result<BatchReply, ApiError>>,
) -> Result<BatchReply, ApiError> {
    let mut replies = Vec::with_capacity(answers.len());
    for answer in answers {
        let reply = answer?;
        if !reply.status.is_success() {
            return Ok(reply);
        }
        replies.push(reply);
    }

    let field = entries_field(endpoint);
    let invalid = || {
        ApiError::new(
            ErrorKind::UpstreamInvalid,
            "upstream answer to a split request could not be joined",
        )
    };
    let mut joined: Option<Map<String, Value>> = None;
    let mut entries = Vec::new();
    let mut usage: Map<String, Value> = Map::new();
    let mut batch_items = 0;
    for reply in &replies {
        let Ok(Value::Object(mut part)) = serde_json::from_slice(&reply.body) else {
            return Err(invalid());
        };
        let Some(Value::Array(part_entries)) = part.remove(field) else {
            return Err(invalid());
        };
        let offset = entries.len() as u64;
        for mut entry in part_entries {
            let index = entry.get("index").and_then(Value::as_u64);
            entry["index"] = Value::from(offset + index.unwrap_or(0));
            entries.push(entry);
        }
        if let Some(Value::Object(part_usage)) = part.remove("usage") {
            for (name, count) in part_usage {
                if let Some(count) = count.as_u64() {
                    let sum = usage.get(&name).and_then(Value::as_u64);
                    usage.insert(name, Value::from(sum.unwrap_or(0) + count));
                }
            }
        }
        batch_items = batch_items.max(reply.batch_items);
        joined.get_or_insert(part);
    }

    let mut joined = joined.ok_or_else(invalid)?;
    joined.insert(field.to_string(), Value::Array(entries));
    if !usage.is_empty() {
        joined.insert("usage".to_string(), Value::Object(usage));
    }
    Ok(BatchReply {
        status: replies.first().map_or(StatusCode::OK, |r| r.status),
        body: Bytes::from(Value::Object(joined).to_string()),
        batch_items,
    })
}

/// One caller's request waiting in the coalescer.
#[derive(Debug)]
struct Job {
    key: String,
    endpoint: Endpoint,
    /// The body field that holds the items: `prompt` or `input`.
    field: &'static str,
    /// Upstream path and query.
    path: String,
    /// The body without its items.
    template: Map<String, Value>,
    headers: HeaderMap,
    items: Vec<Value>,
    n: u64,
    reply: oneshot::Sender<Result<BatchReply, ApiError>>,
}

impl Job {
    fn new(
        request: ApiRequest,
        headers: &HeaderMap,
        reply: oneshot::Sender<Result<BatchReply, ApiError>>,
    ) -> Result<Self, ApiError> {
        let Some(field) = request.items_field() else {
            return Err(ApiError::new(
                ErrorKind::Internal,
                "chat requests cannot be coalesced",
            ));
        };
        let path = request.upstream_path();
        let mut template = request.body;
        template.remove(field);

        let mut batch_headers = HeaderMap::new();
        for name in BATCH_HEADERS {
            for value in headers.get_all(name) {
                batch_headers.append(name, value.clone());
            }
        }
        let key = compatibility_key(&path, request.item_form, &template, &batch_headers);

        Ok(Self {
            key,
            endpoint: request.endpoint,
            field,
            path,
            template,
            headers: batch_headers,
            items: request.items,
            n: request.n,
            reply,
        })
    }
}

/// Requests share an upstream request only when this key is equal: the
/// path and query, the form of the items, every other body field and the
/// forwarded credentials. serde_json's maps are ordered by key, so equal
/// bodies serialize equally whatever order the client wrote them in.
fn compatibility_key(
    path: &str,
    form: ItemForm,
    template: &Map<String, Value>,
    headers: &HeaderMap,
) -> String {
    let mut key = format!("{path}|{form:?}|");
    key.push_str(&serde_json::to_string(template).unwrap_or_default());
    for (name, value) in headers {
        key.push('|');
        key.push_str(name.as_str());
        key.push('=');
        key.push_str(&String::from_utf8_lossy(value.as_bytes()));
    }
    key
}

/// A batch being filled.
#[derive(Debug)]
struct OpenBatch {
    deadline: Instant,
    items: usize,
    jobs: Vec<Job>,
}

async fn run(pool: Arc<Pool>, limits: BatchLimits, mut queue: mpsc::Receiver<Job>) {
    let mut open: HashMap<String, OpenBatch> = HashMap::new();
    loop {
        let next_deadline = open.values().map(|batch| batch.deadline).min();
        let sleep = async {
            match next_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };

        tokio::select! {
            job = queue.recv() => {
                let Some(job) = job else { break };
                add(&pool, limits, &mut open, job);
            }
            () = sleep => {
                let now = Instant::now();
                let due: Vec<String> = open
                    .iter()
                    .filter(|(_, batch)| batch.deadline <= now)
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in due {
                    if let Some(batch) = open.remove(&key) {
                        dispatch(&pool, batch.jobs);
                    }
                }
            }
        }
    }

    // Every submitter is gone; send what is still open rather than drop it.
    for (_, batch) in open.drain() {
        dispatch(&pool, batch.jobs);
    }
}

fn add(pool: &Arc<Pool>, limits: BatchLimits, open: &mut HashMap<String, OpenBatch>, job: Job) {
    let items = job.items.len();

    // A job that fills a batch by itself (callers' arrays arrive cut to
    // max_batch) needs no company.
    if items >= limits.max_batch {
        dispatch(pool, vec![job]);
        return;
    }

    // A batch that cannot take this job leaves now, and the job opens the
    // next one, so no batch exceeds max_batch.
    if let Some(batch) = open.get(&job.key) {
        if batch.items + items > limits.max_batch {
            if let Some(full) = open.remove(&job.key) {
                dispatch(pool, full.jobs);
            }
        }
    }

    let key = job.key.clone();
    let batch = open.entry(key.clone()).or_insert_with(|| OpenBatch {
        deadline: Instant::now() + limits.max_wait,
        items: 0,
        jobs: Vec::new(),
    });
    batch.items += items;
    batch.jobs.push(job);
    if batch.items >= limits.max_batch {
        if let Some(full) = open.remove(&key) {
            dispatch(pool, full.jobs);
        }
    }
}

fn dispatch(pool: &Arc<Pool>, jobs: Vec<Job>) {
    // Boxed as a `Send` future: `send_batch` dispatches again when it
    // retries callers one by one, and the recursion needs a named type.
    let task: Pin<Box<dyn Future<Output = ()> + Send>> =
        Box::pin(send_batch(Arc::clone(pool), jobs));
    tokio::spawn(task);
}

/// Sends one upstream request for `jobs` and answers each caller.
async fn send_batch(pool: Arc<Pool>, mut jobs: Vec<Job>) {
    // Callers that gave up while their batch was open take no part.
    jobs.retain(|job| !job.reply.is_closed());
    let Some(first) = jobs.first() else { return };

    let endpoint = first.endpoint;
    let counts: Vec<usize> = jobs.iter().map(|job| job.items.len()).collect();
    let batch_items: usize = counts.iter().sum();
    let mut body = first.template.clone();
    let items = jobs.iter().flat_map(|job| job.items.iter().cloned());
    body.insert(first.field.to_string(), Value::Array(items.collect()));
    let body = Bytes::from(Value::Object(body).to_string());
    metrics::record_batch(&pool.name, endpoint, batch_items);

    // When every caller has gone, the upstream request is dropped, which
    // closes its connection rather than wait for an answer nobody reads.
    let (headers, path) = (first.headers.clone(), first.path.clone());
    let answer = tokio::select! {
        answer = fetch(&pool, endpoint, &path, &headers, body) => answer,
        () = all_gone(&mut jobs) => {
            tracing::debug!(pool = %pool.name, "every caller left; batch aborted");
            return;
        }
    };

    // A refusal of the input itself may be one caller's fault (a prompt
    // too long, say): each caller is retried alone, so only those at fault
    // get the error. Refusals that concern everyone alike (429, 401, 404)
    // are not retried: that would only add load to a pushing-back upstream.
    if let Ok((status, _)) = &answer {
        if refuses_input(*status) && jobs.len() > 1 {
            tracing::info!(
                pool = %pool.name,
                status = status.as_u16(),
                callers = jobs.len(),
                "merged request refused; retrying its callers one by one"
            );
            for job in jobs {
                dispatch(&pool, vec![job]);
            }
            return;
        }
    }

    let shares = match answer {
        Ok((status, body)) if status.is_success() => {
            split(&pool.name, endpoint, &jobs, &counts, &body)
                .map(|bodies| bodies.into_iter().map(|body| (status, body)).collect())
        }
        // The upstream's own error reaches every caller as it was sent.
        Ok((status, body)) => Ok(vec![(status, body); jobs.len()]),
        Err(e) => Err(e),
    };

    match shares {
        Ok(shares) => {
            for (job, (status, body)) in jobs.into_iter().zip(shares) {
                let reply = BatchReply {
                    status,
                    body,
                    batch_items,
                };
                let _ = job.reply.send(Ok(reply));
            }
        }
        Err(e) => {
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Whether an upstream status says the request's content was refused:
/// 400 Bad Request, 413 Content Too Large, 422 Unprocessable Content.
fn refuses_input(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 413 | 422)
}

/// Resolves once every job's caller has stopped waiting.
async fn all_gone(jobs: &mut [Job]) {
    for job in jobs.iter_mut() {
        job.reply.closed().await;
    }
}

/// Posts the merged body and reads the whole answer.
async fn fetch(
    pool: &Pool,
    endpoint: Endpoint,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Bytes), ApiError> {
    let upstream = pool.post(path, headers, body).await?;
    let status = upstream.response.status();
    let body = pool.watch_body(upstream.response.into_body());
    let collected = body.collect().await.map_err(|e| {
        // A stall names the pool itself; a break gets the pool added.
        if e.is::<BodyStalled>() {
            return ApiError::new(ErrorKind::UpstreamTimeout, e.to_string());
        }
        let message = format!(
            "pool {:?}: upstream {} broke off its answer: {e}",
            pool.name, upstream.endpoint
        );
        ApiError::new(ErrorKind::UpstreamUnavailable, message)
    })?;
    metrics::record_upstream(&pool.name, endpoint, upstream.elapsed);
    Ok((status, collected.to_bytes()))
}

/// The answer's field that lists one entry per item (and choice).
fn entries_field(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Completions => "choices",
        _ => "data",
    }
}

/// Splits a successful upstream answer into one body per job.
fn split(
    pool: &str,
    endpoint: Endpoint,
    jobs: &[Job],
    counts: &[usize],
    body: &[u8],
) -> Result<Vec<Bytes>, ApiError> {
    let invalid = |what: &str| {
        ApiError::new(
            ErrorKind::UpstreamInvalid,
            format!("pool {pool:?}: upstream answer to a batched request {what}"),
        )
    };
    let Ok(Value::Object(mut answer)) = serde_json::from_slice::<Value>(body) else {
        return Err(invalid("is not a JSON object"));
    };
    let field = entries_field(endpoint);
    let per_item = match endpoint {
        Endpoint::Completions => jobs.first().map_or(1, |job| job.n),
        _ => 1,
    };
    let Some(Value::Array(entries)) = answer.remove(field) else {
        return Err(invalid(&format!("has no `{field}` array")));
    };
    let parts = split_entries(&entries, counts, per_item).map_err(|message| invalid(&message))?;

    let weights = WeightSet::new(jobs, &parts, endpoint);
    let usages = match answer.remove("usage") {
        Some(Value::Object(usage)) => Some(split_usage(&usage, &weights)),
        _ => None,
    };

    // `answer` now holds only what every share repeats (id, model, ...).
    let mut bodies = Vec::with_capacity(jobs.len());
    for (k, entries) in parts.into_iter().enumerate() {
        let mut share = answer.clone();
        share.insert(field.to_string(), Value::Array(entries));
        if let Some(usages) = &usages {
            share.insert("usage".to_string(), usages[k].clone());
        }

        // Each caller gets its own id, so that logs and clients that key on
        // it never see two answers under one id.
        if jobs.len() > 1 {
            if let Some(Value::String(id)) = share.get_mut("id") {
                id.push_str(&format!("-{k}"));
            }
        }
        bodies.push(Bytes::from(Value::Object(share).to_string()));
    }
    Ok(bodies)
}

/// Assigns each entry (a choice or an embedding) to the job whose item it
/// answers, renumbering `index` from 0 per job, in index order.
///
/// Entry `index` i answers item `i / per_item` of the merged request; job k
/// owns items `offset_k .. offset_k + counts[k]`.
fn split_entries(
    entries: &[Value],
    counts: &[usize],
    per_item: u64,
) -> Result<Vec<Vec<Value>>, String> {
    let mut offsets = Vec::with_capacity(counts.len());
    let mut total = 0u64;
    for count in counts {
        offsets.push(total);
        total += *count as u64;
    }
    let expected = total * per_item;
    if entries.len() as u64 != expected {
        return Err(format!(
            "has {} entries for {expected} expected",
            entries.len()
        ));
    }

    let mut parts: Vec<Vec<(u64, Value)>> = vec![Vec::new(); counts.len()];
    for entry in entries {
        let Some(index) = entry.get("index").and_then(Value::as_u64) else {
            return Err("has an entry without an integer `index`".to_string());
        };
        if index >= expected {
            return Err(format!("has an entry with index {index} out of range"));
        }
        let item = index / per_item;
        let job = offsets.partition_point(|&offset| offset <= item) - 1;
        let local = index - offsets[job] * per_item;
        let mut entry = entry.clone();
        entry["index"] = Value::from(local);
        parts[job].push((local, entry));
    }

    let mut result = Vec::with_capacity(parts.len());
    for (k, mut part) in parts.into_iter().enumerate() {
        part.sort_by_key(|(index, _)| *index);
        let unique = part.windows(2).all(|pair| pair[0].0 != pair[1].0);
        if !unique || part.len() as u64 != counts[k] as u64 * per_item {
            return Err("repeats an index".to_string());
        }
        result.push(part.into_iter().map(|(_, entry)| entry).collect());
    }
    Ok(result)
}

/// How upstream token counts are shared out among a batch's callers.
///
/// The upstream reports usage for the whole batch only, so each caller's
/// share is estimated from the size of its own part: token ids counted
/// exactly where the prompt was given as ids, completion tokens exactly
/// where the answer carries `logprobs`, otherwise characters.
// Limitation: with text prompts the split is proportional to characters,
// not tokens, so a caller's count can differ from what it would have been
// alone by a few tokens; the shares always add up to the upstream's total.
// OpenAI-API servers report usage per request, never per prompt.
#[derive(Debug)]
struct WeightSet {
    prompt: Vec<u64>,
    completion: Vec<u64>,
}

impl WeightSet {
    fn new(jobs: &[Job], parts: &[Vec<Value>], endpoint: Endpoint) -> Self {
        let prompt = jobs
            .iter()
            .map(|job| job.items.iter().map(item_weight).sum())
            .collect();
        let completion = parts
            .iter()
            .map(|entries| match endpoint {
                Endpoint::Completions => entries.iter().map(choice_weight).sum(),
                _ => 0,
            })
            .collect();
        Self { prompt, completion }
    }
}

/// A choice's completion tokens where the answer lists them (the client
/// asked for `logprobs`), else its characters.
fn choice_weight(choice: &Value) -> u64 {
    let tokens = choice
        .get("logprobs")
        .and_then(|logprobs| logprobs.get("tokens"))
        .and_then(Value::as_array);
    if let Some(tokens) = tokens {
        return tokens.len() as u64;
    }
    let text = choice.get("text").and_then(Value::as_str);
    text.map_or(0, |t| t.chars().count() as u64) + 1
}

fn item_weight(item: &Value) -> u64 {
    match item {
        Value::String(text) => text.chars().count() as u64,
        Value::Array(ids) => ids.len() as u64,
        _ => 1,
    }
}

fn split_usage(usage: &Map<String, Value>, weights: &WeightSet) -> Vec<Value> {
    let count = |name: &str| usage.get(name).and_then(Value::as_u64);
    let prompt = apportion(count("prompt_tokens").unwrap_or(0), &weights.prompt);
    let completion = count("completion_tokens").map(|total| apportion(total, &weights.completion));

    (0..weights.prompt.len())
        .map(|k| {
            let mut share = Map::new();
            share.insert("prompt_tokens".into(), prompt[k].into());
            let mut total = prompt[k];
            if let Some(completion) = &completion {
                share.insert("completion_tokens".into(), completion[k].into());
                total += completion[k];
            }
            share.insert("total_tokens".into(), total.into());
            Value::Object(share)
        })
        .collect()
}

/// Splits `total` into parts proportional to `weights` that add up to
/// `total` exactly (largest remainder). Zero weights share equally.
fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    if weights.is_empty() {
        return Vec::new();
    }
    let sum: u64 = weights.iter().sum();
    let (weights, sum): (Vec<u64>, u64) = if sum == 0 {
        (vec![1; weights.len()], weights.len() as u64)
    } else {
        (weights.to_vec(), sum)
    };

    let total_wide = u128::from(total);
    let sum_wide = u128::from(sum);
    let mut shares = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    for (k, weight) in weights.iter().enumerate() {
        let exact = total_wide * u128::from(*weight);
        shares.push((exact / sum_wide) as u64);
        remainders.push((exact % sum_wide, k));
    }

    let given: u64 = shares.iter().sum();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, k) in remainders.into_iter().take((total - given) as usize) {
        shares[k] += 1;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(items: Vec<Value>, n: u64) -> Job {
        let (reply, _answer) = oneshot::channel();
        Job {
            key: String::new(),
            endpoint: Endpoint::Completions,
            field: "prompt",
            path: "/v1/completions".to_string(),
            template: Map::new(),
            headers: HeaderMap::new(),
            items,
            n,
            reply,
        }
    }

    #[test]
    fn apportion_adds_up_and_follows_weights() {
        assert_eq!(apportion(10, &[1, 1]), vec![5, 5]);
        assert_eq!(apportion(10, &[1, 2, 2]), vec![2, 4, 4]);
        assert_eq!(apportion(7, &[1, 1, 1]).iter().sum::<u64>(), 7);
        assert_eq!(apportion(5, &[0, 0]), vec![3, 2]);
        assert_eq!(apportion(0, &[3, 4]), vec![0, 0]);
        assert_eq!(apportion(9, &[9]), vec![9]);
    }

    #[test]
    fn entries_are_renumbered_per_caller_with_n_choices() {
        // Two callers: one prompt, then two prompts; n = 2; the upstream
        // answers out of order.
        let entries: Vec<Value> = (0..6u64)
            .rev()
            .map(|i| json!({"index": i, "text": format!("c{i}")}))
            .collect();
        let parts = split_entries(&entries, &[1, 2], 2).unwrap();
        let texts = |part: &Vec<Value>| -> Vec<(u64, String)> {
            part.iter()
                .map(|e| {
                    let index = e["index"].as_u64().unwrap();
                    (index, e["text"].as_str().unwrap().to_string())
                })
                .collect()
        };
        assert_eq!(texts(&parts[0]), vec![(0, "c0".into()), (1, "c1".into())]);
        assert_eq!(
            texts(&parts[1]),
            vec![
                (0, "c2".into()),
                (1, "c3".into()),
                (2, "c4".into()),
                (3, "c5".into())
            ]
        );
    }

    #[test]
    fn wrong_entry_count_or_repeated_index_is_rejected() {
        let entries = vec![json!({"index": 0}), json!({"index": 0})];
        assert!(split_entries(&entries, &[1, 1], 1).is_err());
        assert!(split_entries(&entries[..1], &[1, 1], 1).is_err());
        let entries = vec![json!({"index": 0}), json!({"index": 7})];
        assert!(split_entries(&entries, &[1, 1], 1).is_err());
    }

    #[test]
    fn merged_batch_splits_usage_per_caller() {
        let jobs = vec![job(vec![json!("aaaa")], 1), job(vec![json!("aaaa")], 1)];
        let answer = json!({
            "id": "cmpl-1",
            "object": "text_completion",
            "choices": [
                {"index": 1, "text": "xy"},
                {"index": 0, "text": "xy"},
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": 4,
                      "total_tokens": 12},
        });
        let bodies = split(
            "small",
            Endpoint::Completions,
            &jobs,
            &[1, 1],
            answer.to_string().as_bytes(),
        )
        .unwrap();
        let first: Value = serde_json::from_slice(&bodies[0]).unwrap();
        let second: Value = serde_json::from_slice(&bodies[1]).unwrap();
        assert_eq!(first["id"], "cmpl-1-0");
        assert_eq!(second["id"], "cmpl-1-1");
        assert_eq!(first["choices"].as_array().unwrap().len(), 1);
        assert_eq!(second["choices"][0]["index"], 0);
        for body in [&first, &second] {
            assert_eq!(body["usage"]["prompt_tokens"], 4);
            assert_eq!(body["usage"]["completion_tokens"], 2);
            assert_eq!(body["usage"]["total_tokens"], 6);
        }
    }

    #[test]
    fn single_caller_keeps_the_upstream_id_and_usage() {
        let jobs = vec![job(vec![json!("a"), json!("bb")], 1)];
        let answer = json!({
            "id": "cmpl-9",
            "choices": [{"index": 0, "text": "x"}, {"index": 1, "text": "y"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                      "total_tokens": 8},
        });
        let bodies = split(
            "small",
            Endpoint::Completions,
            &jobs,
            &[2],
            answer.to_string().as_bytes(),
        )
        .unwrap();
        let body: Value = serde_json::from_slice(&bodies[0]).unwrap();
        assert_eq!(body["id"], "cmpl-9");
        assert_eq!(body["usage"]["prompt_tokens"], 5);
        assert_eq!(body["usage"]["completion_tokens"], 3);
    }

    #[test]
    fn embeddings_are_split_by_input_offset() {
        let mut first = job(vec![json!("a")], 1);
        first.endpoint = Endpoint::Embeddings;
        let mut second = job(vec![json!("b"), json!("c")], 1);
        second.endpoint = Endpoint::Embeddings;
        let answer = json!({
            "object": "list",
            "data": [
                {"index": 2, "embedding": [2.0]},
                {"index": 0, "embedding": [0.0]},
                {"index": 1, "embedding": [1.0]},
            ],
            "usage": {"prompt_tokens": 3, "total_tokens": 3},
        });
        let bodies = split(
            "small",
            Endpoint::Embeddings,
            &[first, second],
            &[1, 2],
            answer.to_string().as_bytes(),
        )
        .unwrap();
        let second: Value = serde_json::from_slice(&bodies[1]).unwrap();
        assert_eq!(second["data"][0]["embedding"][0], 1.0);
        assert_eq!(second["data"][1]["index"], 1);
        assert_eq!(second["usage"]["prompt_tokens"], 2);
        assert_eq!(second["usage"]["total_tokens"], 2);
    }

    #[test]
    fn key_differs_when_any_other_field_differs() {
        let mut a = Map::new();
        a.insert("model".into(), json!("m"));
        a.insert("temperature".into(), json!(0.5));
        let mut b = a.clone();
        b.insert("temperature".into(), json!(0.7));
        let headers = HeaderMap::new();
        let key =
            |t: &Map<String, Value>, form| compatibility_key("/v1/completions", form, t, &headers);
        assert_ne!(key(&a, ItemForm::Text), key(&b, ItemForm::Text));
        assert_ne!(key(&a, ItemForm::Text), key(&a, ItemForm::Tokens));
        assert_eq!(key(&a, ItemForm::Text), key(&a.clone(), ItemForm::Text));
    }
}
