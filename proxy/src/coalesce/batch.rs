//! One batch on its way: the merged upstream request, the retry of a
//! refused batch one caller at a time, and the split of the answer back
//! into each caller's exact share (indices renumbered, `n` choices per
//! item, identical items fanned out, usage apportioned).
//!
//! A batch task holds its endpoint's in-flight slot (a `Permit`) until
//! every caller has its answer; it never touches the queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use switchyard_policy::Endpoint;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::stream::{self, Merged, Sink};
use super::Permit;
use crate::api::{ApiRequest, ItemForm};
use crate::body::BodyStalled;
use crate::error::{ApiError, ErrorKind};
use crate::metrics;
use crate::upstream::Pool;

/// Client headers that go upstream with a coalesced request. They are part
/// of the compatibility key, so callers with different credentials never
/// share an upstream request.
// Limitation: every other client header is dropped from coalesced requests,
// because one upstream request cannot carry several callers' values.
const BATCH_HEADERS: [&str; 3] = ["authorization", "openai-organization", "openai-project"];

/// One caller's share of an upstream answer.
#[derive(Debug)]
pub struct BatchReply {
    pub status: StatusCode,
    pub body: Bytes,
    /// Items in the upstream request that carried this caller.
    pub batch_items: usize,
}

/// Joins the answers to a request's chunks into one answer: entries
/// renumbered by chunk offset, usage summed, the first chunk's id. The
/// first failed chunk, if any, is the answer.
pub(super) fn stitch(
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

/// One caller's items and everything its upstream request repeats.
#[derive(Debug)]
pub struct Part {
    /// Requests share a batch only when their keys are equal.
    pub key: String,
    pub endpoint: Endpoint,
    /// The body field that holds the items: `prompt` or `input`.
    field: &'static str,
    /// Upstream path and query.
    path: String,
    /// The body without its items.
    pub template: Map<String, Value>,
    headers: HeaderMap,
    pub items: Vec<Value>,
    pub n: u64,
    /// Identical items of the batch go upstream once.
    collapse: bool,
    /// Where the events of a streaming caller go; `None` for callers
    /// that get their answer whole.
    pub sink: Option<Sink>,
}

impl Part {
    pub fn new(request: ApiRequest, headers: &HeaderMap) -> Result<Self, ApiError> {
        let Some(field) = request.items_field() else {
            return Err(ApiError::new(
                ErrorKind::Internal,
                "chat requests cannot be coalesced",
            ));
        };
        let path = request.upstream_path();
        let mut template = Arc::unwrap_or_clone(request.body);
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
            collapse: false,
            sink: None,
        })
    }

    pub fn with_collapse(self, collapse: bool) -> Self {
        Self { collapse, ..self }
    }

    /// Makes this a streaming caller's part, its events sent to `sink`.
    pub fn with_sink(self, sink: Sink) -> Self {
        Self {
            sink: Some(sink),
            ..self
        }
    }
}

/// A caller in a batch: its part and where its answer goes.
#[derive(Debug)]
pub struct Member {
    pub part: Part,
    pub reply: oneshot::Sender<Result<BatchReply, ApiError>>,
}

/// Requests share an upstream request only when this key is equal: the
/// path and query, the form of the items, every other body field and the
/// forwarded credentials. serde_json's maps are ordered by key, so equal
/// bodies serialize equally whatever order the client wrote them in.
pub(super) fn compatibility_key(
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

/// Sends `members` as one upstream request on its own task, holding
/// `permit` until every caller is answered.
pub fn spawn(pool: Arc<Pool>, endpoint: Endpoint, members: Vec<Member>, permit: Permit) {
    tokio::spawn(async move {
        let mut permit = permit;
        send_batch(pool, endpoint, members, Some(&mut permit)).await;
    });
}

/// Boxed as a `Send` future: `send_batch` calls itself when it retries
/// callers one by one, and the recursion needs a named type.
fn send_boxed(
    pool: Arc<Pool>,
    endpoint: Endpoint,
    members: Vec<Member>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(send_batch(pool, endpoint, members, None))
}

/// Sends one upstream request for `members` and answers each caller. The
/// batch's time and what it says of the upstream go on `permit`.
async fn send_batch(
    pool: Arc<Pool>,
    endpoint: Endpoint,
    mut members: Vec<Member>,
    permit: Option<&mut Permit>,
) {
    // Callers that gave up while queued take no part.
    members.retain(|member| !member.reply.is_closed());
    let Some(first) = members.first() else { return };

    // Identical items (where they collapse) go upstream once; `map` says
    // which sent item answers each caller's item, in order.
    let (sent, map) = distinct(&members);
    let counts: Vec<usize> = members.iter().map(|m| m.part.items.len()).collect();
    let batch_items = sent.len();
    let collapsed = map.len() - sent.len();
    if collapsed > 0 {
        metrics::record_collapsed(&pool.name, endpoint, collapsed);
    }
    let mut body = first.part.template.clone();
    body.insert(first.part.field.to_string(), Value::Array(sent));
    let body = Bytes::from(Value::Object(body).to_string());
    metrics::record_batch(&pool.name, endpoint, batch_items);

    // Streaming callers share one upstream stream, split as it comes.
    let (headers, path) = (first.part.headers.clone(), first.part.path.clone());
    if first.part.sink.is_some() {
        let merged = Merged {
            path,
            headers,
            body,
            map,
            batch_items,
        };
        stream::relay(pool, endpoint, members, merged, permit).await;
        return;
    }

    // When every caller has gone, the upstream request is dropped, which
    // closes its connection rather than wait for an answer nobody reads.
    let started = Instant::now();
    let answer = tokio::select! {
        answer = fetch(&pool, endpoint, &path, &headers, body) => answer,
        () = all_gone(&mut members) => {
            tracing::debug!(pool = %pool.name, "every caller left; batch aborted");
            return;
        }
    };
    if let Some(permit) = permit {
        match &answer {
            Ok((status, _)) if status.is_success() => {
                permit.sample_items = Some(batch_items);
                permit.set_healthy(true);
            }
            Ok(_) => permit.set_healthy(true),
            Err(e) if e.kind.is_unreachable() => permit.set_healthy(false),
            Err(_) => {}
        }
        // The sample is the upstream's time, not the retries' below.
        permit.started = started;
    }

    // A refusal of the input itself may be one caller's fault (a prompt
    // too long, say): each caller is retried alone, so only those at fault
    // get the error. Refusals that concern everyone alike (429, 401, 404)
    // are not retried: that would only add load to a pushing-back upstream.
    if let Ok((status, _)) = &answer {
        if refuses_input(*status) && members.len() > 1 {
            retry_alone(pool, endpoint, members, *status).await;
            return;
        }
    }

    let per_item = match endpoint {
        Endpoint::Completions => first_n(&members),
        _ => 1,
    };
    let shares = match answer {
        Ok((status, body)) if status.is_success() => {
            let parts: Vec<&Part> = members.iter().map(|m| &m.part).collect();
            expand(&pool.name, endpoint, &body, &map, per_item)
                .and_then(|body| split(&pool.name, endpoint, &parts, &counts, &body))
                .map(|bodies| bodies.into_iter().map(|body| (status, body)).collect())
        }
        // The upstream's own error reaches every caller as it was sent.
        Ok((status, body)) => Ok(vec![(status, body); members.len()]),
        Err(e) => Err(e),
    };

    match shares {
        Ok(shares) => {
            for (member, (status, body)) in members.into_iter().zip(shares) {
                let reply = BatchReply {
                    status,
                    body,
                    batch_items,
                };
                let _ = member.reply.send(Ok(reply));
            }
        }
        Err(e) => {
            for member in members {
                let _ = member.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Sends each of `members` upstream alone, after the upstream refused
/// their merged request with `status`.
pub(super) async fn retry_alone(
    pool: Arc<Pool>,
    endpoint: Endpoint,
    members: Vec<Member>,
    status: StatusCode,
) {
    tracing::info!(
        pool = %pool.name,
        status = status.as_u16(),
        callers = members.len(),
        "merged request refused; retrying its callers one by one"
    );
    // Limitation: the retries share the batch's one in-flight slot, so a
    // refused batch of k callers briefly has k requests upstream.
    let retries: Vec<_> = members
        .into_iter()
        .map(|member| tokio::spawn(send_boxed(Arc::clone(&pool), endpoint, vec![member])))
        .collect();
    for retry in retries {
        let _ = retry.await;
    }
}

pub(super) fn first_n(members: &[Member]) -> u64 {
    members.first().map_or(1, |m| m.part.n)
}

/// The items to send, each distinct collapsing item once, and for every
/// caller's item in order the index of the sent item that answers it.
fn distinct(members: &[Member]) -> (Vec<Value>, Vec<usize>) {
    let mut sent = Vec::new();
    let mut map = Vec::new();
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    for member in members {
        for item in &member.part.items {
            if member.part.collapse {
                let key = item.to_string();
                if let Some(&index) = seen.get(&key) {
                    map.push(index);
                    continue;
                }
                seen.insert(key, sent.len());
            }
            map.push(sent.len());
            sent.push(item.clone());
        }
    }
    (sent, map)
}

/// Rewrites an answer to the sent (distinct) items as the answer to every
/// caller's item: entry `u * n + j` copied to `p * n + j` for each item
/// `p` that item `u` answers. Without collapsing it is the answer as is.
fn expand(
    pool: &str,
    endpoint: Endpoint,
    body: &Bytes,
    map: &[usize],
    per_item: u64,
) -> Result<Bytes, ApiError> {
    if map.iter().enumerate().all(|(p, u)| p == *u) {
        return Ok(body.clone());
    }
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
    let Some(Value::Array(entries)) = answer.remove(field) else {
        return Err(invalid(&format!("has no `{field}` array")));
    };
    let mut by_index: std::collections::HashMap<u64, Value> = Default::default();
    for entry in entries {
        let Some(index) = entry.get("index").and_then(Value::as_u64) else {
            return Err(invalid("has an entry without an integer `index`"));
        };
        by_index.insert(index, entry);
    }
    let mut expanded = Vec::with_capacity(map.len() * per_item as usize);
    for (p, &u) in map.iter().enumerate() {
        for j in 0..per_item {
            let Some(entry) = by_index.get(&(u as u64 * per_item + j)) else {
                return Err(invalid("is missing an entry"));
            };
            let mut entry = entry.clone();
            entry["index"] = Value::from(p as u64 * per_item + j);
            expanded.push(entry);
        }
    }
    answer.insert(field.to_string(), Value::Array(expanded));
    Ok(Bytes::from(Value::Object(answer).to_string()))
}

/// Whether an upstream status says the request's content was refused:
/// 400 Bad Request, 413 Content Too Large, 422 Unprocessable Content.
pub(super) fn refuses_input(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 413 | 422)
}

/// Resolves once every caller has stopped waiting.
pub(super) async fn all_gone(members: &mut [Member]) {
    for member in members.iter_mut() {
        member.reply.closed().await;
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
    jobs: &[&Part],
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
    fn new(jobs: &[&Part], parts: &[Vec<Value>], endpoint: Endpoint) -> Self {
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

pub(super) fn item_weight(item: &Value) -> u64 {
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
pub(super) fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
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

/// Splits `body` as the upstream answer to one merged request carrying
/// `items` (one list per caller) with `n` choices per item, and checks
/// what every caller relies on: one share each, its own entries numbered
/// from 0, and usage shares that add up to the upstream's totals. Panics
/// when a check fails; for the fuzz targets in `fuzz/`.
#[allow(clippy::expect_used)] // a failed check is a panic, for the fuzzer
pub(super) fn check_split(endpoint: Endpoint, items: Vec<Vec<Value>>, n: u64, body: &[u8]) {
    let per_item = if endpoint == Endpoint::Completions {
        n
    } else {
        1
    };
    let jobs: Vec<Part> = items
        .into_iter()
        .map(|items| Part {
            key: String::new(),
            endpoint,
            field: if endpoint == Endpoint::Completions {
                "prompt"
            } else {
                "input"
            },
            path: String::new(),
            template: Map::new(),
            headers: HeaderMap::new(),
            items,
            n: per_item,
            collapse: false,
            sink: None,
        })
        .collect();
    let counts: Vec<usize> = jobs.iter().map(|job| job.items.len()).collect();
    let refs: Vec<&Part> = jobs.iter().collect();
    let Ok(bodies) = split("fuzz", endpoint, &refs, &counts, body) else {
        return;
    };

    assert_eq!(bodies.len(), jobs.len(), "one share per caller");
    let field = entries_field(endpoint);
    let mut sums = [0u64; 2];
    for (k, share) in bodies.iter().enumerate() {
        let share: Value = serde_json::from_slice(share).expect("a share is JSON");
        let entries = share[field].as_array().expect("a share has its entries");
        assert_eq!(entries.len() as u64, counts[k] as u64 * per_item);
        for (i, entry) in entries.iter().enumerate() {
            assert_eq!(entry["index"].as_u64(), Some(i as u64), "caller {k}");
        }
        for (sum, name) in sums.iter_mut().zip(["prompt_tokens", "completion_tokens"]) {
            *sum += share["usage"][name].as_u64().unwrap_or(0);
        }
    }
    let answer: Value = serde_json::from_slice(body).expect("split read it");
    if answer["usage"].is_object() {
        let upstream = |name: &str| answer["usage"][name].as_u64().unwrap_or(0);
        assert_eq!(sums[0], upstream("prompt_tokens"), "prompt shares add up");
        if endpoint == Endpoint::Completions {
            assert_eq!(
                sums[1],
                upstream("completion_tokens"),
                "completion shares add up"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(items: Vec<Value>, n: u64) -> Part {
        Part {
            key: String::new(),
            endpoint: Endpoint::Completions,
            field: "prompt",
            path: "/v1/completions".to_string(),
            template: Map::new(),
            headers: HeaderMap::new(),
            items,
            n,
            collapse: false,
            sink: None,
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
        let jobs = [job(vec![json!("aaaa")], 1), job(vec![json!("aaaa")], 1)];
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
            &jobs.iter().collect::<Vec<_>>(),
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
        let jobs = [job(vec![json!("a"), json!("bb")], 1)];
        let answer = json!({
            "id": "cmpl-9",
            "choices": [{"index": 0, "text": "x"}, {"index": 1, "text": "y"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                      "total_tokens": 8},
        });
        let bodies = split(
            "small",
            Endpoint::Completions,
            &jobs.iter().collect::<Vec<_>>(),
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
            &[&first, &second],
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
    fn collapsed_items_are_fanned_out_in_order() {
        // Callers sent ["x", "y"] and ["x"]; "x" went upstream once, n = 2.
        let answer = json!({
            "choices": [
                {"index": 3, "text": "y1"}, {"index": 0, "text": "x0"},
                {"index": 2, "text": "y0"}, {"index": 1, "text": "x1"},
            ],
        });
        let body = Bytes::from(answer.to_string());
        let expanded = expand("small", Endpoint::Completions, &body, &[0, 1, 0], 2).unwrap();
        let expanded: Value = serde_json::from_slice(&expanded).unwrap();
        let texts: Vec<(u64, &str)> = expanded["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["index"].as_u64().unwrap(), c["text"].as_str().unwrap()))
            .collect();
        assert_eq!(
            texts,
            vec![
                (0, "x0"),
                (1, "x1"),
                (2, "y0"),
                (3, "y1"),
                (4, "x0"),
                (5, "x1")
            ]
        );
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
