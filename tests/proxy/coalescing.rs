//! Coalescing: concurrent completions and embeddings with the same
//! parameters reach the upstream as one batched request, and every caller
//! gets back exactly its own part, renumbered and with its own usage.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::support::{
    http1_client,
    mock_upstream::{
        embedding_of, FAULT_REJECT, FAULT_SHORT, FAULT_STALL_BODY, REJECT_CODE, REJECT_MESSAGE,
    },
    post, server_toml,
    switchyard::{log_message, log_text},
    words, MockUpstream, RecordedRequest, Reply, Switchyard,
};

/// Completion tokens the mock charges per choice.
const TOKENS_PER_CHOICE: u64 = crate::support::mock_upstream::COMPLETION_TOKENS_PER_CHOICE;

/// Long enough that requests sent together on a busy two-core machine
/// still land in one batch window; a lone request waits at most this.
const MAX_WAIT_MS: u64 = 300;

/// Request timeout of the stall test's pool: short, so the test is quick.
const STALL_TIMEOUT_MS: u64 = 1000;

/// One mock behind pool `small` with `[pool.batch]` in the fixed-window
/// mode, so that requests sent together are merged whatever the
/// upstream's state (the adaptive mode's own tests are in `adaptive`).
async fn batching_rig(max_batch: usize) -> (MockUpstream, Switchyard) {
    batching_rig_with_timeout(max_batch, 10_000).await
}

/// `batching_rig` with the pool's `request_timeout_ms`.
async fn batching_rig_with_timeout(
    max_batch: usize,
    request_timeout_ms: u64,
) -> (MockUpstream, Switchyard) {
    let mock = MockUpstream::start().await;
    let config = format!(
        "{}\n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\nmodel = \"smollm2\"\n\
         request_timeout_ms = {request_timeout_ms}\n[pool.batch]\nmode = \"fixed\"\n\
         max_batch = {max_batch}\nmax_wait_ms = {MAX_WAIT_MS}\n",
        server_toml(),
        mock.url()
    );
    let sw = Switchyard::start(&config).await;
    (mock, sw)
}

/// Sends every body to `path` at once and returns the replies in order.
async fn send_together(sw: &Switchyard, path: &str, bodies: &[Value]) -> Vec<Reply> {
    let client = http1_client();
    let handles: Vec<_> = bodies
        .iter()
        .map(|body| {
            let (client, api, body) = (client.clone(), sw.api_url(), body.clone());
            let path = path.to_string();
            tokio::spawn(async move { post(&client, &api, &path, &body).await })
        })
        .collect();
    let mut replies = Vec::new();
    for handle in handles {
        replies.push(handle.await.expect("request task"));
    }
    replies
}

/// The prompts of a completions body as a list (a string is one prompt).
fn prompts_of(body: &Value) -> Vec<String> {
    match &body["prompt"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|p| p.as_str().expect("string prompts").to_string())
            .collect(),
        other => panic!("unexpected prompt {other}"),
    }
}

/// The upstream request that carried `item`; fails unless exactly one did.
fn upstream_carrying<'a>(upstream: &'a [RecordedRequest], item: &str) -> &'a RecordedRequest {
    let carriers: Vec<_> = upstream
        .iter()
        .filter(|r| r.items().iter().any(|i| i == item))
        .collect();
    assert_eq!(
        carriers.len(),
        1,
        "upstream requests carrying {item:?}: {carriers:#?}"
    );
    carriers[0]
}

/// Checks that `reply` holds exactly the completion choices for `body`:
/// index renumbered from 0 (prompt * n + sample), own texts, own usage.
fn assert_own_completion(reply: &Reply, body: &Value) {
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    assert_eq!(
        reply.json["object"], "text_completion",
        "body: {}",
        reply.text
    );

    let prompts = prompts_of(body);
    let n = body["n"].as_u64().unwrap_or(1);
    let choices = reply.json["choices"].as_array().expect("choices");
    assert_eq!(
        choices.len() as u64,
        prompts.len() as u64 * n,
        "choice count for {body}; reply {}",
        reply.text
    );
    for (k, choice) in choices.iter().enumerate() {
        let (p, j) = (k as u64 / n, k as u64 % n);
        let want = format!("echo:{}#{j}", prompts[p as usize]);
        assert_eq!(
            choice["index"], k,
            "choice order for {body}; reply {}",
            reply.text
        );
        assert_eq!(
            choice["text"], want,
            "choice {k} for {body}; reply {}",
            reply.text
        );
    }

    let usage = &reply.json["usage"];
    let (prompt, completion) = (&usage["prompt_tokens"], &usage["completion_tokens"]);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            prompt.as_u64().expect("prompt_tokens")
                + completion.as_u64().expect("completion_tokens")
        ),
        "usage for {body}: {usage}"
    );

    // Alone in its upstream request, a caller's usage is the upstream's
    // count exactly. Shared, it is an estimate whose sum is checked by
    // `usage_shares_add_up_to_the_upstream_total`.
    if batch_size(reply) == prompts.len() {
        let prompt_tokens: u64 = prompts.iter().map(|p| words(p)).sum();
        let completion_tokens = choices.len() as u64 * TOKENS_PER_CHOICE;
        assert_eq!(*prompt, prompt_tokens, "usage for {body}: {usage}");
        assert_eq!(*completion, completion_tokens, "usage for {body}: {usage}");
    }
}

/// The `x-switchyard-batch-size` header as a number.
fn batch_size(reply: &Reply) -> usize {
    reply
        .header("x-switchyard-batch-size")
        .unwrap_or_else(|| panic!("no x-switchyard-batch-size header: {reply:?}"))
        .parse()
        .expect("numeric batch size")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_completions_merge_into_one_upstream_request_per_parameter_set() {
    let (mock, sw) = batching_rig(8).await;
    let bodies = [
        json!({"model": "small", "prompt": "alpha one", "max_tokens": 8}),
        json!({"model": "small", "prompt": ["bravo", "bravo two three"], "max_tokens": 8}),
        json!({"model": "small", "prompt": ["charlie"], "max_tokens": 8}),
        json!({"model": "small", "prompt": "delta", "max_tokens": 8}),
        json!({"model": "small", "prompt": "echo me", "max_tokens": 8, "n": 2}),
        json!({"model": "small", "prompt": ["fox a", "fox b"], "max_tokens": 8, "n": 2}),
    ];

    let replies = send_together(&sw, "/v1/completions", &bodies).await;

    // Two parameter sets (n absent, n = 2), so two upstream requests.
    let upstream = mock.requests_to("/v1/completions");
    let sizes: Vec<usize> = upstream.iter().map(|r| r.items().len()).collect();
    assert_eq!(
        upstream.len(),
        2,
        "upstream batches (items each: {sizes:?})"
    );
    for request in &upstream {
        assert_eq!(request.body["model"], "smollm2");
        assert_eq!(request.body["max_tokens"], 8);
        assert!(
            request.items().len() <= 8,
            "batch over max_batch: {:?}",
            request.body
        );
    }

    let mut ids = HashSet::new();
    for (reply, body) in replies.iter().zip(&bodies) {
        assert_own_completion(reply, body);

        // Each caller's prompts rode in the same upstream request, whose
        // size the batch-size header reports.
        let carrier = upstream_carrying(&upstream, &prompts_of(body)[0]);
        assert_eq!(
            carrier.body["n"].as_u64().unwrap_or(1),
            body["n"].as_u64().unwrap_or(1)
        );
        assert_eq!(
            batch_size(reply),
            carrier.items().len(),
            "reply {}",
            reply.text
        );

        let id = reply.json["id"].as_str().expect("id").to_string();
        assert!(ids.insert(id.clone()), "id {id} handed to two callers");
    }
    assert_eq!(batch_size(&replies[0]), 5);
    assert_eq!(batch_size(&replies[4]), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_different_parameters_are_not_merged() {
    let (mock, sw) = batching_rig(8).await;
    let bodies = [
        json!({"model": "small", "prompt": "cold", "temperature": 0.0}),
        json!({"model": "small", "prompt": "warm", "temperature": 0.5}),
        json!({"model": "small", "prompt": "hot", "temperature": 1.0}),
    ];

    let replies = send_together(&sw, "/v1/completions", &bodies).await;

    let upstream = mock.requests_to("/v1/completions");
    assert_eq!(upstream.len(), 3, "one upstream request per temperature");
    for (reply, body) in replies.iter().zip(&bodies) {
        assert_own_completion(reply, body);
        assert_eq!(batch_size(reply), 1);
        let carrier = upstream_carrying(&upstream, &prompts_of(body)[0]);
        assert_eq!(carrier.body["temperature"], body["temperature"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_never_exceed_max_batch() {
    let (mock, sw) = batching_rig(4).await;
    let bodies: Vec<Value> = (0..5)
        .map(|k| json!({"model": "small", "prompt": [format!("p{k} a"), format!("p{k} b")]}))
        .collect();

    let replies = send_together(&sw, "/v1/completions", &bodies).await;

    let upstream = mock.requests_to("/v1/completions");
    let sizes: Vec<usize> = upstream.iter().map(|r| r.items().len()).collect();
    assert!(
        sizes.iter().all(|&s| s <= 4),
        "batch sizes {sizes:?} over max_batch 4"
    );
    assert_eq!(
        sizes.iter().sum::<usize>(),
        10,
        "every prompt sent once: {sizes:?}"
    );
    assert!(
        upstream.len() >= 3,
        "10 items need 3+ batches of 4: {sizes:?}"
    );
    for (reply, body) in replies.iter().zip(&bodies) {
        assert_own_completion(reply, body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_max_batch_is_split() {
    let (mock, sw) = batching_rig(4).await;
    let prompts: Vec<String> = (0..10).map(|k| format!("item {k}")).collect();
    let body = json!({"model": "small", "prompt": prompts, "n": 2});

    let reply = post(&http1_client(), &sw.api_url(), "/v1/completions", &body).await;

    assert_own_completion(&reply, &body);
    let upstream = mock.requests_to("/v1/completions");
    let sizes: Vec<usize> = upstream.iter().map(|r| r.items().len()).collect();
    assert!(
        sizes.iter().all(|&s| s <= 4),
        "batch sizes {sizes:?} over max_batch 4"
    );
    assert_eq!(
        sizes.iter().sum::<usize>(),
        10,
        "every prompt sent once: {sizes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_is_answered_as_a_batch_of_one() {
    let (mock, sw) = batching_rig(8).await;
    let body = json!({"model": "small", "prompt": "all alone"});

    let reply = post(&http1_client(), &sw.api_url(), "/v1/completions", &body).await;

    assert_own_completion(&reply, &body);
    assert_eq!(batch_size(&reply), 1);
    let upstream = mock.requests_to("/v1/completions");
    assert_eq!(upstream.len(), 1);
    assert_eq!(upstream[0].items(), ["all alone"]);
}

/// Checks that `reply` holds exactly the embeddings of `inputs`, indexed
/// from 0, with usage for those inputs alone.
fn assert_own_embeddings(reply: &Reply, inputs: &[&str]) {
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    assert_eq!(reply.json["object"], "list", "body: {}", reply.text);
    let data = reply.json["data"].as_array().expect("data");
    assert_eq!(data.len(), inputs.len(), "reply {}", reply.text);
    for (k, item) in data.iter().enumerate() {
        assert_eq!(item["index"], k, "order; reply {}", reply.text);
        assert_eq!(item["object"], "embedding");
        assert_eq!(
            item["embedding"],
            json!(embedding_of(inputs[k])),
            "input {:?}",
            inputs[k]
        );
    }
    let usage = &reply.json["usage"];
    assert_eq!(
        usage["total_tokens"], usage["prompt_tokens"],
        "reply {}",
        reply.text
    );
    if batch_size(reply) == inputs.len() {
        let tokens: u64 = inputs.iter().map(|i| words(i)).sum();
        assert_eq!(usage["prompt_tokens"], tokens, "reply {}", reply.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_embeddings_merge_and_split_back() {
    let (mock, sw) = batching_rig(8).await;
    let inputs: [&[&str]; 3] = [&["alpha"], &["bravo", "charlie x y"], &["delta four"]];
    let bodies = [
        json!({"model": "small", "input": "alpha"}),
        json!({"model": "small", "input": ["bravo", "charlie x y"]}),
        json!({"model": "small", "input": ["delta four"]}),
    ];

    let replies = send_together(&sw, "/v1/embeddings", &bodies).await;

    let upstream = mock.requests_to("/v1/embeddings");
    assert_eq!(upstream.len(), 1, "one merged upstream request");
    assert_eq!(upstream[0].items().len(), 4);
    assert_eq!(upstream[0].body["model"], "smollm2");
    for (reply, inputs) in replies.iter().zip(inputs) {
        assert_own_embeddings(reply, inputs);
        assert_eq!(batch_size(reply), 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_requests_are_never_coalesced() {
    let (mock, sw) = batching_rig(8).await;

    let chats: Vec<Value> = (0..3)
        .map(|k| json!({"model": "small", "messages": [{"role": "user", "content": format!("chat {k}")}]}))
        .collect();
    let replies = send_together(&sw, "/v1/chat/completions", &chats).await;
    for (k, reply) in replies.iter().enumerate() {
        reply.assert_status(200);
        let content = &reply.json["choices"][0]["message"]["content"];
        assert_eq!(content, &json!(format!("echo:chat {k}")));
    }
    assert_eq!(mock.requests_to("/v1/chat/completions").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_shares_add_up_to_the_upstream_total() {
    let (mock, sw) = batching_rig(8).await;

    // Word counts (the mock's tokens) and lengths deliberately disagree, so
    // the shares are estimates; what must hold is that nothing is counted
    // twice or lost, and that each caller's total is its own sum.
    let completions = [
        json!({"model": "small", "prompt": "a"}),
        json!({"model": "small", "prompt": "abcdefghijklmnopqrstuvwxyz abcdefghijklmnopqrstuvwxyz"}),
        json!({"model": "small", "prompt": ["x y z", "w"], "n": 2}),
    ];
    let embeddings = [
        json!({"model": "small", "input": ["b", "abcdefghijklmnopqrstuvwxyz0123456789"]}),
        json!({"model": "small", "input": "abcdefghijklmnopqrstuvwxyz abcdefghij klmnop"}),
    ];
    let (completion_replies, embedding_replies) = tokio::join!(
        send_together(&sw, "/v1/completions", &completions[..2]),
        send_together(&sw, "/v1/embeddings", &embeddings),
    );
    let upstream = mock.requests_to("/v1/completions");
    assert_eq!(upstream.len(), 1, "completions merged");
    assert_eq!(
        mock.requests_to("/v1/embeddings").len(),
        1,
        "embeddings merged"
    );

    let all_prompts: u64 = upstream[0].items().iter().map(|p| words(p)).sum();
    let sum = |replies: &[Reply], field: &str| -> u64 {
        replies
            .iter()
            .map(|r| r.json["usage"][field].as_u64().expect(field))
            .sum()
    };
    assert_eq!(sum(&completion_replies, "prompt_tokens"), all_prompts);
    assert_eq!(
        sum(&completion_replies, "completion_tokens"),
        2 * TOKENS_PER_CHOICE
    );
    for (reply, body) in completion_replies.iter().zip(&completions) {
        assert_own_completion(reply, body);
    }

    let all_inputs: u64 = [
        "b",
        "abcdefghijklmnopqrstuvwxyz0123456789",
        "abcdefghijklmnopqrstuvwxyz abcdefghij klmnop",
    ]
    .iter()
    .map(|i| words(i))
    .sum();
    assert_eq!(sum(&embedding_replies, "prompt_tokens"), all_inputs);
    assert_eq!(sum(&embedding_replies, "total_tokens"), all_inputs);

    // A caller alone in its batch gets the upstream's count exactly.
    let reply = post(
        &http1_client(),
        &sw.api_url(),
        "/v1/completions",
        &completions[2],
    )
    .await;
    assert_eq!(batch_size(&reply), 2);
    assert_own_completion(&reply, &completions[2]);
    assert_eq!(reply.json["usage"]["prompt_tokens"], 4);
}

/// The info line the proxy writes when it splits a refused batch.
const RETRY_ONE_BY_ONE: &str = "merged request refused; retrying its callers one by one";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_fails_only_the_caller_at_fault() {
    let (mock, sw) = batching_rig(8).await;
    let bodies = [
        json!({"model": "small", "prompt": "innocent one"}),
        json!({"model": "small", "prompt": FAULT_REJECT}),
        json!({"model": "small", "prompt": "innocent two"}),
    ];

    let replies = send_together(&sw, "/v1/completions", &bodies).await;

    // The caller at fault gets the upstream's own error, as it was sent.
    let message = replies[1].assert_openai_error(400);
    assert_eq!(
        replies[1].json["error"]["code"], REJECT_CODE,
        "{}",
        replies[1].text
    );
    assert_eq!(message, REJECT_MESSAGE, "upstream error body kept");

    // The others get exactly their own choices, from a request of their own.
    assert_own_completion(&replies[0], &bodies[0]);
    assert_own_completion(&replies[2], &bodies[2]);
    assert_eq!(batch_size(&replies[0]), 1);
    assert_eq!(batch_size(&replies[2]), 1);

    // First the merged request, then each caller alone.
    let upstream = mock.requests_to("/v1/completions");
    let items: Vec<Vec<String>> = upstream.iter().map(RecordedRequest::items).collect();
    assert_eq!(items[0].len(), 3, "the three were merged first: {items:?}");
    for body in &bodies {
        let prompt = &prompts_of(body)[0];
        let alone = items.iter().filter(|i| **i == [prompt.as_str()]).count();
        assert_eq!(alone, 1, "{prompt:?} retried alone once: {items:?}");
    }

    let line = sw
        .wait_for_log("the retry-one-by-one line", |l| {
            log_message(l) == Some(RETRY_ONE_BY_ONE)
        })
        .await;
    assert_eq!(log_text(&line, "level").as_deref(), Some("INFO"), "{line}");
    assert_eq!(log_text(&line, "pool").as_deref(), Some("small"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_upstream_stalls_mid_body_is_a_504_naming_the_pool() {
    let (mock, sw) = batching_rig_with_timeout(8, STALL_TIMEOUT_MS).await;
    let client = http1_client();

    let body = json!({"model": "small", "prompt": FAULT_STALL_BODY});
    let reply = post(&client, &sw.api_url(), "/v1/completions", &body).await;
    let message = reply.assert_openai_error(504);
    assert_eq!(
        reply.json["error"]["code"], "upstream_timeout",
        "{}",
        reply.text
    );
    assert!(
        message.contains("small"),
        "message {message:?} should name the pool"
    );
    assert_eq!(mock.requests_to("/v1/completions").len(), 1);

    // The proxy keeps serving the same pool.
    let body = json!({"model": "small", "prompt": "after the stall"});
    let reply = post(&client, &sw.api_url(), "/v1/completions", &body).await;
    assert_own_completion(&reply, &body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answer_missing_a_choice_is_a_502_naming_the_pool() {
    let (_mock, sw) = batching_rig(8).await;
    let client = http1_client();

    // The mock answers one choice for these two prompts.
    let body = json!({"model": "small", "prompt": [FAULT_SHORT, "its neighbour"]});
    let reply = post(&client, &sw.api_url(), "/v1/completions", &body).await;
    let message = reply.assert_openai_error(502);
    assert_eq!(
        reply.json["error"]["code"], "upstream_invalid_response",
        "{}",
        reply.text
    );
    assert!(
        message.contains("small"),
        "message {message:?} should name the pool"
    );

    let body = json!({"model": "small", "prompt": "after the short answer"});
    let reply = post(&client, &sw.api_url(), "/v1/completions", &body).await;
    assert_own_completion(&reply, &body);
}
