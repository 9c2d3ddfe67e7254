//! The small-first cascade with the `confidence_cascade` plugin: the small
//! pool is asked for log-probabilities, the plugin reviews its answer, and
//! the client gets the small answer (log-probabilities removed unless it
//! asked) or the large pool's, whole or streamed (`buffer` and `probe`),
//! with `x-switchyard-pool` and `x-switchyard-escalated` saying which.
//! The mock upstreams' confidence is set per request with the
//! `x-mock-logprobs` and `x-mock-finish-reason` headers.

use serde_json::{json, Value};

use crate::support::{
    chat_body, closed_port_url, http1_client, local_pool_config, metrics_text, model_file, plugin,
    pool_toml, pools_config, send, sse_data, switchyard::log_text, wait_for_metric, MockUpstream,
    Reply, Switchyard,
};

/// `[policy]` with confidence_cascade (escalating below a mean logprob of
/// -1) and the given `[policy.cascade]` lines.
fn cascade_policy(cascade: &str) -> String {
    format!(
        "\n[policy]\nplugin = \"{}\"\ntimeout_ms = 1000\n\
         config = {{ min_mean_logprob = -1.0 }}\n[policy.cascade]\n{cascade}",
        plugin("confidence_cascade")
    )
}

/// Pools `small` (model `smollm2`) and `large` (model `big`) on two mocks,
/// with the cascade policy.
async fn cascade_pools(cascade: &str) -> (MockUpstream, MockUpstream, Switchyard) {
    let small = MockUpstream::start().await;
    let large = MockUpstream::start().await;
    let mut config = pools_config(&[
        ("small", &small.url(), "smollm2"),
        ("large", &large.url(), "big"),
    ]);
    config.push_str(&cascade_policy(cascade));
    let sw = Switchyard::start(&config).await;
    (small, large, sw)
}

/// POSTs `body` to `path` with the mock's confidence headers.
async fn ask(sw: &Switchyard, path: &str, body: &Value, logprobs: &str, finish: &str) -> Reply {
    let request = http1_client()
        .post(format!("{}{path}", sw.api_url()))
        .header("x-mock-logprobs", logprobs)
        .header("x-mock-finish-reason", finish)
        .json(body);
    send(request).await
}

fn escalated(reply: &Reply) -> &str {
    reply.header("x-switchyard-escalated").unwrap_or("absent")
}

/// The concatenated chat deltas (or completion texts) of an SSE body.
fn streamed_text(reply: &Reply) -> String {
    let mut text = String::new();
    for data in sse_data(&reply.text) {
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        let choice = &chunk["choices"][0];
        let piece = choice["delta"]["content"]
            .as_str()
            .or_else(|| choice["text"].as_str());
        text.push_str(piece.unwrap_or_default());
    }
    text
}

/// Every `logprobs` value of every chunk of an SSE body.
fn streamed_logprobs(reply: &Reply) -> Vec<Value> {
    sse_data(&reply.text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"].get(0).map(|choice| choice["logprobs"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confident_chat_answer_is_served_from_small_without_logprobs() {
    let (small, large, sw) = cascade_pools("").await;
    let body = chat_body("auto", "capital of France");
    let reply = ask(&sw, "/v1/chat/completions", &body, "-0.2", "stop").await;

    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    assert_eq!(escalated(&reply), "false");
    let choice = &reply.json["choices"][0];
    assert_eq!(choice["message"]["content"], "echo:capital of France");
    assert_eq!(choice["logprobs"], Value::Null, "client did not ask");
    let seen = small.requests_to("/v1/chat/completions");
    assert_eq!(seen[0].body["logprobs"], true, "small pool asked for them");
    assert_eq!(large.request_count(), 0, "no escalation");

    sw.wait_for_log("cascade review", |l| {
        log_text(l, "verdict").as_deref() == Some("accept")
            && log_text(l, "plugin").as_deref() == Some("confidence_cascade")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsure_chat_answer_escalates_to_large_with_the_clients_request() {
    let (small, large, sw) = cascade_pools("").await;
    let body = chat_body("auto", "prove the conjecture");
    let reply = ask(&sw, "/v1/chat/completions", &body, "-0.5,-3", "stop").await;

    reply.assert_status(200);
    assert_eq!(reply.pool(), "large");
    assert_eq!(escalated(&reply), "true");
    assert_eq!(reply.json["model"], "big");
    assert_eq!(small.request_count(), 1);
    let seen = large.requests_to("/v1/chat/completions");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].body.get("logprobs"),
        None,
        "large got the client's body"
    );

    let line = wait_for_metric(
        &sw,
        "switchyard_cascade_reviews_total",
        &["verdict=\"escalate\"", "reason=\"low-confidence\""],
    )
    .await;
    assert!(line.contains("pool=\"small\""), "{line}");
    sw.wait_for_log("request line with escalation", |l| {
        log_text(l, "review").as_deref() == Some("escalate:low-confidence")
            && log_text(l, "pool").as_deref() == Some("large")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_asked_for_logprobs_keeps_them_on_the_small_answer() {
    let (_small, _large, sw) = cascade_pools("").await;
    let mut body = chat_body("auto", "hello there");
    body["logprobs"] = json!(true);
    let reply = ask(&sw, "/v1/chat/completions", &body, "-0.1", "stop").await;

    assert_eq!(reply.pool(), "small");
    let content = &reply.json["choices"][0]["logprobs"]["content"];
    assert_eq!(content.as_array().map(Vec::len), Some(2), "{}", reply.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_completion_escalates_and_small_is_asked_for_logprobs() {
    let (small, large, sw) = cascade_pools("").await;
    let body = json!({"model": "auto", "prompt": "once upon", "max_tokens": 2});
    let reply = ask(&sw, "/v1/completions", &body, "-0.1", "length").await;

    reply.assert_status(200);
    assert_eq!(reply.pool(), "large");
    assert_eq!(escalated(&reply), "true");
    let seen = small.requests_to("/v1/completions");
    assert_eq!(seen[0].body["logprobs"], 0);
    assert_eq!(large.requests_to("/v1/completions").len(), 1);

    // The same request, complete, stays small.
    let reply = ask(&sw, "/v1/completions", &body, "-0.1", "stop").await;
    assert_eq!(reply.pool(), "small");
    assert_eq!(reply.json["choices"][0]["text"], "echo:once upon#0");
    assert_eq!(reply.json["choices"][0]["logprobs"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_stream_replays_the_small_answer_or_streams_the_large_one() {
    let (_small, large, sw) = cascade_pools("stream_mode = \"buffer\"\n").await;
    let mut body = chat_body("auto", "one two three");
    body["stream"] = json!(true);

    let reply = ask(&sw, "/v1/chat/completions", &body, "-0.1", "stop").await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    assert_eq!(escalated(&reply), "false");
    assert_eq!(streamed_text(&reply), "echo:one two three");
    assert!(streamed_logprobs(&reply).iter().all(Value::is_null));
    assert!(reply.text.trim_end().ends_with("data: [DONE]"));
    assert_eq!(large.request_count(), 0);

    let reply = ask(&sw, "/v1/chat/completions", &body, "-4", "stop").await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "large");
    assert_eq!(escalated(&reply), "true");
    assert_eq!(streamed_text(&reply), "echo:one two three");
    assert_eq!(large.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reviews_the_first_tokens_then_streams_one_answer() {
    let (small, large, sw) = cascade_pools("stream_mode = \"probe\"\nprobe_tokens = 2\n").await;
    let mut body = json!({
        "model": "auto", "prompt": "a b c d e f", "stream": true,
    });

    // Sure at first: the small stream is passed on whole.
    let reply = ask(&sw, "/v1/completions", &body, "-0.1", "stop").await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    assert_eq!(escalated(&reply), "false");
    assert_eq!(streamed_text(&reply), "echo:a b c d e f#0");
    assert!(streamed_logprobs(&reply).iter().all(Value::is_null));
    sw.wait_for_log("partial review", |l| {
        l["fields"]["partial"] == true && log_text(l, "verdict").as_deref() == Some("accept")
    })
    .await;

    // Unsure in the first two tokens: the large pool's stream only.
    let reply = ask(&sw, "/v1/completions", &body, "-3,-3,-0.1", "stop").await;
    assert_eq!(reply.pool(), "large");
    assert_eq!(escalated(&reply), "true");
    assert_eq!(streamed_text(&reply), "echo:a b c d e f#0");
    assert_eq!(large.request_count(), 1);

    // An answer shorter than the probe is reviewed whole.
    body["prompt"] = json!("x");
    let reply = ask(&sw, "/v1/completions", &body, "-0.1", "length").await;
    assert_eq!(reply.pool(), "large", "complete and truncated");
    assert_eq!(small.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_records_the_verdict_but_serves_small() {
    let (_small, large, sw) = cascade_pools("shadow = true\n").await;
    let body = chat_body("auto", "hard question");
    let reply = ask(&sw, "/v1/chat/completions", &body, "-5", "stop").await;

    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    assert_eq!(escalated(&reply), "false");
    assert_eq!(large.request_count(), 0);
    wait_for_metric(
        &sw,
        "switchyard_cascade_reviews_total",
        &["verdict=\"escalate\"", "shadow=\"true\""],
    )
    .await;
    sw.wait_for_log("shadow review", |l| {
        l["fields"]["shadow"] == true && log_text(l, "verdict").as_deref() == Some("escalate")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_pool_that_fails_escalates_without_review() {
    let large = MockUpstream::start().await;
    let mut config = crate::support::server_toml();
    config.push_str(&pool_toml("small", &closed_port_url(), "smollm2"));
    config.push_str(&pool_toml("large", &large.url(), "big"));
    config.push_str(&cascade_policy(""));
    let sw = Switchyard::start(&config).await;

    let body = chat_body("auto", "anyone there");
    let reply = ask(&sw, "/v1/chat/completions", &body, "-0.1", "stop").await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "large");
    assert_eq!(escalated(&reply), "true");
    wait_for_metric(
        &sw,
        "switchyard_cascade_reviews_total",
        &["reason=\"small-failed\""],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_pool_with_an_open_circuit_escalates_as_a_failure_does() {
    let small = MockUpstream::start().await;
    small.fail_with(Some(503));
    let large = MockUpstream::start().await;
    let mut config = crate::support::server_toml();
    config.push_str(&pool_toml("small", &small.url(), "smollm2"));
    config.push_str(
        "[pool.circuit]\nmin_requests = 1\nfailure_percent = 50\n\
         open_ms = 60000\n",
    );
    config.push_str(&pool_toml("large", &large.url(), "big"));
    config.push_str(&cascade_policy(""));
    let sw = Switchyard::start(&config).await;

    // The first 503 opens the small pool's circuit; the second request
    // is refused by it without reaching the small upstream, and both
    // escalate.
    for content in ["first", "second"] {
        let body = chat_body("auto", content);
        let reply = ask(&sw, "/v1/chat/completions", &body, "-0.1", "stop").await;
        reply.assert_status(200);
        assert_eq!(reply.pool(), "large");
        assert_eq!(escalated(&reply), "true");
    }
    assert_eq!(small.request_count(), 1, "an open circuit sends nothing");
    assert_eq!(large.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_escalation_serves_the_small_answer_in_every_mode() {
    for mode in ["buffer", "probe"] {
        let small = MockUpstream::start().await;
        let mut config = crate::support::server_toml();
        config.push_str(&pool_toml("small", &small.url(), "smollm2"));
        config.push_str(&pool_toml("large", &closed_port_url(), "big"));
        config.push_str(&cascade_policy(&format!(
            "stream_mode = \"{mode}\"\nprobe_tokens = 1\n"
        )));
        let sw = Switchyard::start(&config).await;

        // Unsure answers that would escalate, to a large pool that is down.
        let body = chat_body("auto", "is anyone large there");
        let whole = ask(&sw, "/v1/chat/completions", &body, "-5", "stop").await;
        let mut stream_body = body.clone();
        stream_body["stream"] = json!(true);
        let streamed = ask(&sw, "/v1/chat/completions", &stream_body, "-5", "stop").await;

        for reply in [&whole, &streamed] {
            reply.assert_status(200);
            assert_eq!(reply.pool(), "small", "{mode}");
            assert_eq!(escalated(reply), "false", "{mode}");
            assert_eq!(
                reply.header("x-switchyard-escalation-failed"),
                Some("large"),
                "{mode}"
            );
        }
        assert_eq!(
            whole.json["choices"][0]["message"]["content"],
            "echo:is anyone large there"
        );
        assert_eq!(
            streamed_text(&streamed),
            "echo:is anyone large there",
            "{mode}"
        );
        sw.wait_for_log("the failed escalation", |line| {
            log_text(line, "message").as_deref()
                == Some("escalation pool failed; serving the small answer")
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_model_skips_the_cascade() {
    let (small, _large, sw) = cascade_pools("").await;
    let body = chat_body("small", "direct");
    let reply = ask(&sw, "/v1/chat/completions", &body, "-9", "stop").await;
    assert_eq!(reply.pool(), "small");
    assert_eq!(reply.header("x-switchyard-escalated"), None);
    assert_eq!(small.requests()[0].body.get("logprobs"), None);
}

/// The in-process executor as the small pool: its real log-probabilities
/// feed the review. A threshold no answer meets escalates; one every
/// answer meets serves the small model, without the log-probabilities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_small_pool_feeds_real_logprobs_to_the_review() {
    let Some(model) = model_file() else { return };
    let large = MockUpstream::start().await;
    for (threshold, want_pool) in [("-0.000001", "large"), ("-100.0", "small")] {
        let mut config = local_pool_config(&model, "");
        config.push_str(&pool_toml("large", &large.url(), "big"));
        config.push_str(&format!(
            "\n[policy]\nplugin = \"{}\"\ntimeout_ms = 1000\n\
             config = {{ min_mean_logprob = {threshold}, escalate_truncated = false }}\n",
            plugin("confidence_cascade")
        ));
        let sw = Switchyard::start(&config).await;
        let body = json!({
            "model": "auto", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi"}],
        });
        let reply = ask(&sw, "/v1/chat/completions", &body, "-0.1", "stop").await;
        reply.assert_status(200);
        assert_eq!(reply.pool(), want_pool, "threshold {threshold}");
        if want_pool == "small" {
            assert_eq!(reply.json["choices"][0]["logprobs"], Value::Null);
            assert_eq!(escalated(&reply), "false");
        }
        let review = sw
            .wait_for_log("local review", |l| log_message(l) == Some("cascade review"))
            .await;
        let tokens = review["fields"]["tokens"].as_u64().unwrap_or(0);
        assert!((1..=4).contains(&tokens), "{review}");
    }
}

fn log_message(line: &Value) -> Option<&str> {
    crate::support::switchyard::log_message(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_that_fails_serves_the_small_answer_and_is_counted_as_failed() {
    // test-faults routes `cascade` small-first and traps in `review` when
    // the answer contains "trap"; the mock echoes the question.
    let small = MockUpstream::start().await;
    let large = MockUpstream::start().await;
    let mut config = pools_config(&[
        ("small", &small.url(), "smollm2"),
        ("large", &large.url(), "big"),
    ]);
    config.push_str(&format!(
        "\n[policy]\nplugin = \"{}\"\ntimeout_ms = 1000\n",
        plugin("test_faults")
    ));
    let sw = Switchyard::start(&config).await;

    let body = chat_body("cascade", "trap");
    let reply = ask(&sw, "/v1/chat/completions", &body, "-0.2", "stop").await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    assert_eq!(escalated(&reply), "false");
    assert_eq!(reply.json["choices"][0]["message"]["content"], "echo:trap");
    assert_eq!(large.request_count(), 0);

    sw.wait_for_log("cascade review", |l| {
        log_text(l, "verdict").as_deref() == Some("failed")
    })
    .await;
    let metrics = metrics_text(&sw).await;
    let failed = metrics.lines().any(|line| {
        line.starts_with("switchyard_cascade_reviews_total")
            && line.contains("verdict=\"failed\"")
            && line.ends_with(" 1")
    });
    assert!(failed, "{metrics}");
}
