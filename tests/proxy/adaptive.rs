//! The pool queue in front of coalescing: the adaptive window, admission
//! (queue and in-flight limits, 429 with `Retry-After`), deadlines,
//! cancellation, failure isolation, priorities, fairness, collapsing and
//! upstreams that take no arrays. Each test's upstream costs a fixed time
//! per request plus a time per item, and records what it received.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    chat_body, http1_client, metric_lines, metrics_text,
    mock_upstream::{embedding_of, Cost, FAULT_SERVER_ERROR, SINGLE_ITEM_MODEL},
    plugin, pool_toml, post, send, server_toml,
    switchyard::log_message,
    MockUpstream, Reply, Switchyard,
};

/// How long the polling helpers wait for a state before failing.
const POLL_LIMIT: Duration = Duration::from_secs(10);

/// A mock costing `fixed_ms` per request (one at a time when `serial`)
/// behind pool `small`, whose `[pool.batch]` table holds `batch`.
async fn rig(fixed_ms: u64, serial: bool, batch: &str) -> (MockUpstream, Switchyard) {
    rig_with_model(fixed_ms, serial, batch, "smollm2").await
}

async fn rig_with_model(
    fixed_ms: u64,
    serial: bool,
    batch: &str,
    model: &str,
) -> (MockUpstream, Switchyard) {
    let cost = Cost {
        fixed_ms,
        per_item_ms: 0,
        serial,
    };
    let mock = MockUpstream::start_costed(cost, true).await;
    let config = format!(
        "{}\n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\nmodel = \"{model}\"\n\
         request_timeout_ms = 10000\n[pool.batch]\n{batch}\n",
        server_toml(),
        mock.url()
    );
    (mock, Switchyard::start(&config).await)
}

fn embedding(input: &str) -> Value {
    json!({"model": "small", "input": input})
}

async fn embed(sw: &Switchyard, input: &str) -> Reply {
    post(
        &http1_client(),
        &sw.api_url(),
        "/v1/embeddings",
        &embedding(input),
    )
    .await
}

/// Sends an embeddings request with extra headers on its own task.
fn spawn_embed(
    sw: &Switchyard,
    input: &str,
    headers: &[(&str, &str)],
) -> tokio::task::JoinHandle<Reply> {
    let mut request = http1_client()
        .post(format!("{}/v1/embeddings", sw.api_url()))
        .json(&embedding(input));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    tokio::spawn(send(request))
}

/// Polls until `done` holds; fails naming `what` after `POLL_LIMIT`.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < POLL_LIMIT,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `/metrics` until `name{...}` with `labels` reads `value`.
async fn wait_for_sample(sw: &Switchyard, name: &str, labels: &[&str], value: f64) {
    let started = Instant::now();
    loop {
        let text = metrics_text(sw).await;
        let found = metric_lines(&text, name).into_iter().any(|line| {
            labels.iter().all(|l| line.contains(l))
                && line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v == value)
        });
        if found {
            return;
        }
        assert!(
            started.elapsed() < POLL_LIMIT,
            "no {name} {labels:?} = {value} in /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the pool `small`'s queue holds `requests`.
async fn wait_for_queue(sw: &Switchyard, requests: usize) {
    wait_for_pool_queue(sw, "small", requests).await;
}

async fn wait_for_pool_queue(sw: &Switchyard, pool: &str, requests: usize) {
    let label = format!("pool=\"{pool}\"");
    let labels = [label.as_str()];
    wait_for_sample(sw, "switchyard_queue_depth", &labels, requests as f64).await;
}

fn assert_embedding(reply: &Reply, input: &str) {
    reply.assert_status(200);
    assert_eq!(
        reply.json["data"][0]["embedding"],
        json!(embedding_of(input))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_to_an_idle_upstream_is_sent_at_once() {
    // A window this long would show in every lone request's latency.
    let (mock, sw) = rig(0, false, "max_wait_ms = 5000").await;

    let reply = embed(&sw, "alone").await;

    assert_embedding(&reply, "alone");
    assert_eq!(mock.request_count(), 1);
    let labels = ["pool=\"small\"", "reason=\"idle\""];
    wait_for_sample(&sw, "switchyard_batches_total", &labels, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fixed_mode_waits_out_its_window() {
    let (_mock, sw) = rig(0, false, "mode = \"fixed\"\nmax_wait_ms = 100").await;

    let reply = embed(&sw, "alone").await;

    assert_embedding(&reply, "alone");
    let labels = ["pool=\"small\"", "reason=\"window\""];
    wait_for_sample(&sw, "switchyard_batches_total", &labels, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_upstream_gets_everything_that_queued_meanwhile_in_one_batch() {
    let (mock, sw) = rig(300, true, "max_inflight = 1\nmax_batch = 8").await;

    // The first request occupies the one slot; five more queue behind it.
    let first = spawn_embed(&sw, "first", &[]);
    wait_until("the first upstream request", || mock.request_count() == 1).await;
    let rest: Vec<_> = (0..5)
        .map(|k| spawn_embed(&sw, &format!("next {k}"), &[]))
        .collect();

    assert_embedding(&first.await.unwrap(), "first");
    for (k, handle) in rest.into_iter().enumerate() {
        let reply = handle.await.unwrap();
        assert_embedding(&reply, &format!("next {k}"));
        assert_eq!(reply.header("x-switchyard-batch-size"), Some("5"));
    }
    let sizes: Vec<usize> = mock.requests().iter().map(|r| r.items().len()).collect();
    assert_eq!(sizes, vec![1, 5]);
    assert_eq!(mock.max_concurrent(), 1, "max_inflight = 1 was exceeded");

    // The fitted cost and the queue wait are exported.
    let text = metrics_text(&sw).await;
    for name in [
        "switchyard_batch_cost_fixed_seconds",
        "switchyard_batch_cost_per_item_seconds",
        "switchyard_queue_wait_seconds_count",
        "switchyard_batch_tokens_count",
    ] {
        assert!(!metric_lines(&text, name).is_empty(), "no {name}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let batch = "max_inflight = 1\nmax_queue = 1\nmax_batch = 1";
    let (mock, sw) = rig(500, true, batch).await;
    let first = spawn_embed(&sw, "in flight", &[]);
    wait_until("the first upstream request", || mock.request_count() == 1).await;
    let second = spawn_embed(&sw, "queued", &[]);
    wait_for_queue(&sw, 1).await;

    let reply = embed(&sw, "turned away").await;

    reply.assert_openai_error(429);
    assert_eq!(reply.json["error"]["code"], "overloaded", "{}", reply.text);
    assert!(reply.header("retry-after").is_some(), "{:?}", reply.headers);
    let wait_ms: u64 = reply.header("retry-after-ms").unwrap().parse().unwrap();
    assert!(wait_ms > 0, "retry-after-ms {wait_ms}");
    let message = reply.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_queue"), "{message}");

    // The two admitted requests are served; the third never went upstream.
    assert_embedding(&first.await.unwrap(), "in flight");
    assert_embedding(&second.await.unwrap(), "queued");
    let all: Vec<String> = mock.requests().iter().flat_map(|r| r.items()).collect();
    assert!(!all.contains(&"turned away".to_string()), "{all:?}");
    let labels = ["reason=\"queue_full\""];
    wait_for_sample(&sw, "switchyard_rejected_requests_total", &labels, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_the_upstream_cannot_meet_is_refused_at_once() {
    let (mock, sw) = rig(300, true, "max_inflight = 1").await;
    // One request teaches the model the upstream's cost.
    assert_embedding(&embed(&sw, "warm-up").await, "warm-up");

    let short = [("x-switchyard-deadline-ms", "50")];
    let reply = spawn_embed(&sw, "too short", &short).await.unwrap();
    reply.assert_openai_error(504);
    assert_eq!(
        reply.json["error"]["code"], "deadline_exceeded",
        "{}",
        reply.text
    );

    let long = [("x-switchyard-deadline-ms", "5000")];
    let reply = spawn_embed(&sw, "long enough", &long).await.unwrap();
    assert_embedding(&reply, "long enough");
    let all: Vec<String> = mock.requests().iter().flat_map(|r| r.items()).collect();
    assert_eq!(all, ["warm-up", "long enough"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_behind_queued_work_is_refused_with_the_wait() {
    let (mock, sw) = rig(400, true, "max_inflight = 1\nmax_batch = 1").await;
    assert_embedding(&embed(&sw, "warm-up").await, "warm-up");
    let busy = spawn_embed(&sw, "in flight", &[]);
    wait_until("the second upstream request", || mock.request_count() == 2).await;

    // 400 ms of work is ahead and this one needs 400 ms more.
    let deadline = [("x-switchyard-deadline-ms", "600")];
    let reply = spawn_embed(&sw, "late", &deadline).await.unwrap();

    reply.assert_openai_error(429);
    let wait_ms: u64 = reply.header("retry-after-ms").unwrap().parse().unwrap();
    assert!(wait_ms > 0 && wait_ms <= 400, "retry-after-ms {wait_ms}");
    assert_embedding(&busy.await.unwrap(), "in flight");
    let labels = ["reason=\"deadline\""];
    wait_for_sample(&sw, "switchyard_rejected_requests_total", &labels, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_leaves_the_queue_is_never_sent_upstream() {
    let (mock, sw) = rig(600, true, "max_inflight = 1").await;
    let first = spawn_embed(&sw, "in flight", &[]);
    wait_until("the first upstream request", || mock.request_count() == 1).await;

    // This caller gives up while the first request holds the slot.
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let url = format!("{}/v1/embeddings", sw.api_url());
    let gone = impatient.post(&url).json(&embedding("gone")).send().await;
    assert!(gone.is_err(), "the impatient caller got an answer");
    wait_for_queue(&sw, 0).await;

    assert_embedding(&first.await.unwrap(), "in flight");
    assert_embedding(&embed(&sw, "after").await, "after");
    let all: Vec<String> = mock.requests().iter().flat_map(|r| r.items()).collect();
    assert_eq!(all, ["in flight", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_request_whose_callers_all_left_is_aborted() {
    let (mock, sw) = rig(3000, false, "").await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let url = format!("{}/v1/embeddings", sw.api_url());

    let gone = impatient.post(&url).json(&embedding("gone")).send().await;

    assert!(gone.is_err(), "the impatient caller got an answer");
    wait_until("the upstream request to be dropped", || {
        mock.abandoned() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_reaches_every_caller_of_the_batch() {
    let (mock, sw) = rig(0, false, "mode = \"fixed\"\nmax_wait_ms = 300").await;
    let inputs = ["innocent", FAULT_SERVER_ERROR, "bystander"];
    let handles: Vec<_> = inputs.iter().map(|i| spawn_embed(&sw, i, &[])).collect();

    for handle in handles {
        let reply = handle.await.unwrap();
        assert_eq!(reply.status, 500, "{}", reply.text);
    }
    assert_eq!(mock.request_count(), 1, "a 5xx is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_requests_go_first_and_fifo_within_a_priority() {
    let (mock, sw) = rig(300, true, "max_inflight = 1\nmax_batch = 1").await;
    let first = spawn_embed(&sw, "first", &[]);
    wait_until("the first upstream request", || mock.request_count() == 1).await;
    let low_a = spawn_embed(&sw, "low a", &[("x-switchyard-priority", "1")]);
    wait_for_queue(&sw, 1).await;
    let low_b = spawn_embed(&sw, "low b", &[("x-switchyard-priority", "1")]);
    wait_for_queue(&sw, 2).await;
    let high = spawn_embed(&sw, "high", &[("x-switchyard-priority", "9")]);
    wait_for_queue(&sw, 3).await;

    for (handle, input) in [
        (first, "first"),
        (low_a, "low a"),
        (low_b, "low b"),
        (high, "high"),
    ] {
        assert_embedding(&handle.await.unwrap(), input);
    }
    let order: Vec<String> = mock.requests().iter().flat_map(|r| r.items()).collect();
    assert_eq!(order, ["first", "high", "low a", "low b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_flooding_the_queue_does_not_fill_every_batch() {
    let batch = "max_inflight = 1\nmax_batch = 2\ntenant_header = \"x-tenant\"";
    let (mock, sw) = rig(300, true, batch).await;
    let first = spawn_embed(&sw, "first", &[]);
    wait_until("the first upstream request", || mock.request_count() == 1).await;
    let mut handles = Vec::new();
    for k in 0..4 {
        handles.push(spawn_embed(
            &sw,
            &format!("noisy {k}"),
            &[("x-tenant", "noisy")],
        ));
        wait_for_queue(&sw, k + 1).await;
    }
    handles.push(spawn_embed(&sw, "quiet", &[("x-tenant", "quiet")]));
    wait_for_queue(&sw, 5).await;

    assert_embedding(&first.await.unwrap(), "first");
    for handle in handles {
        handle.await.unwrap().assert_status(200);
    }
    let batches: Vec<Vec<String>> = mock.requests().iter().map(|r| r.items()).collect();
    assert_eq!(batches[1], ["noisy 0", "quiet"], "batches {batches:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_requests_take_the_same_queue_and_limits() {
    let (mock, sw) = rig(400, true, "max_inflight = 1\nmax_queue = 1").await;
    let client = http1_client();
    let chat = |text: &str| {
        let (client, url, body) = (client.clone(), sw.api_url(), chat_body("small", text));
        tokio::spawn(async move { post(&client, &url, "/v1/chat/completions", &body).await })
    };
    let first = chat("one");
    wait_until("the first chat upstream", || mock.request_count() == 1).await;
    let second = chat("two");
    wait_for_queue(&sw, 1).await;

    let third = chat("three").await.unwrap();

    third.assert_openai_error(429);
    assert!(third.header("retry-after-ms").is_some());
    first.await.unwrap().assert_status(200);
    second.await.unwrap().assert_status(200);
    assert_eq!(mock.max_concurrent(), 1, "chat went past max_inflight");
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_flooding_chat_does_not_take_every_slot() {
    let batch = "max_inflight = 1\ntenant_header = \"x-tenant\"";
    let (mock, sw) = rig(200, true, batch).await;
    let chat = |text: &str, tenant: &str| {
        let request = http1_client()
            .post(format!("{}/v1/chat/completions", sw.api_url()))
            .header("x-tenant", tenant)
            .json(&chat_body("small", text));
        tokio::spawn(send(request))
    };
    let mut handles = vec![chat("noisy 0", "noisy")];
    wait_until("the first chat upstream", || mock.request_count() == 1).await;
    for k in 1..4 {
        handles.push(chat(&format!("noisy {k}"), "noisy"));
        wait_for_queue(&sw, k).await;
    }
    handles.push(chat("quiet", "quiet"));
    wait_for_queue(&sw, 4).await;

    for handle in handles {
        handle.await.unwrap().assert_status(200);
    }
    let order: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| {
            r.body["messages"][0]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    // Turns alternate once both wait: the quiet tenant's one request does
    // not queue behind all of the noisy tenant's.
    assert_eq!(order, ["noisy 0", "noisy 1", "quiet", "noisy 2", "noisy 3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_embeddings_inputs_go_upstream_once() {
    let (mock, sw) = rig(0, false, "mode = \"fixed\"\nmax_wait_ms = 300").await;
    let inputs = ["same", "same", "other", "same"];
    let handles: Vec<_> = inputs.iter().map(|i| spawn_embed(&sw, i, &[])).collect();

    for (handle, input) in handles.into_iter().zip(inputs) {
        assert_embedding(&handle.await.unwrap(), input);
    }
    let upstream = mock.requests();
    assert_eq!(upstream.len(), 1);
    let mut sent = upstream[0].items();
    sent.sort();
    assert_eq!(sent, ["other", "same"]);
    wait_for_sample(&sw, "switchyard_collapsed_items_total", &["small"], 2.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stays_within_max_batch_tokens() {
    // Eight characters are two estimated tokens: two inputs per batch.
    let batch = "mode = \"fixed\"\nmax_wait_ms = 300\nmax_batch_tokens = 4";
    let (mock, sw) = rig(0, false, batch).await;
    let body = json!({"model": "small", "input": ["aaaaaaaa", "bbbbbbbb", "cccccccc"]});

    let reply = post(&http1_client(), &sw.api_url(), "/v1/embeddings", &body).await;

    reply.assert_status(200);
    assert_eq!(
        reply.json["data"][2]["embedding"],
        json!(embedding_of("cccccccc"))
    );
    let sizes: Vec<usize> = mock.requests().iter().map(|r| r.items().len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 3);
    assert!(sizes.iter().all(|&s| s <= 2), "sizes {sizes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_declared_without_arrays_gets_one_item_per_request() {
    let batch = "array_endpoints = [\"embeddings\"]";
    let (mock, sw) = rig_with_model(0, false, batch, SINGLE_ITEM_MODEL).await;
    let body = json!({"model": "small", "prompt": ["one", "two", "three"]});

    let reply = post(&http1_client(), &sw.api_url(), "/v1/completions", &body).await;

    reply.assert_status(200);
    let texts: Vec<&str> = reply.json["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["echo:one#0", "echo:two#0", "echo:three#0"]);
    let sizes: Vec<usize> = mock.requests().iter().map(|r| r.items().len()).collect();
    assert_eq!(sizes, [1, 1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_probe_finds_an_upstream_that_refuses_arrays() {
    let batch = "probe_arrays = true";
    let (mock, sw) = rig_with_model(0, false, batch, SINGLE_ITEM_MODEL).await;
    sw.wait_for_logs("the probe's verdicts", 2, |line| {
        log_message(line) == Some("upstream takes no arrays here; sending one item per request")
    })
    .await;
    let probes = mock.request_count();
    let body = json!({"model": "small", "input": ["one", "two"]});

    let reply = post(&http1_client(), &sw.api_url(), "/v1/embeddings", &body).await;

    reply.assert_status(200);
    assert_eq!(
        reply.json["data"][1]["embedding"],
        json!(embedding_of("two"))
    );
    let sizes: Vec<usize> = mock.requests()[probes..]
        .iter()
        .map(|r| r.items().len())
        .collect();
    assert_eq!(sizes, [1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policys_high_priority_overtakes_queued_requests() {
    let cost = Cost {
        fixed_ms: 300,
        per_item_ms: 0,
        serial: true,
    };
    let mock = MockUpstream::start_costed(cost, true).await;
    // tiered sends x-tier: premium to `large` with priority high; a
    // request naming `large` itself keeps its header's priority.
    let config = format!(
        "{}{}{}[pool.batch]\nmax_inflight = 1\nmax_batch = 1\n\
         \n[policy]\nplugin = \"{}\"\ntimeout_ms = 1000\n",
        server_toml(),
        pool_toml("small", &mock.url(), "smollm2"),
        pool_toml("large", &mock.url(), "smollm2"),
        plugin("tiered")
    );
    let sw = Switchyard::start(&config).await;
    let send_embed = |model: &str, input: &str, headers: &[(&str, &str)]| {
        let mut request = http1_client()
            .post(format!("{}/v1/embeddings", sw.api_url()))
            .json(&json!({"model": model, "input": input}));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        tokio::spawn(send(request))
    };

    let first = send_embed("large", "first", &[]);
    wait_until("the first upstream request", || mock.request_count() == 1).await;
    let normal = send_embed("large", "normal", &[("x-switchyard-priority", "5")]);
    wait_for_pool_queue(&sw, "large", 1).await;
    let premium = send_embed("auto", "premium", &[("x-tier", "premium")]);
    wait_for_pool_queue(&sw, "large", 2).await;

    for (handle, input) in [(first, "first"), (normal, "normal"), (premium, "premium")] {
        let reply = handle.await.unwrap();
        assert_embedding(&reply, input);
        assert_eq!(reply.pool(), "large");
    }
    let order: Vec<String> = mock.requests().iter().flat_map(|r| r.items()).collect();
    assert_eq!(order, ["first", "premium", "normal"]);
}
