//! Routing: `model` names the pool, the upstream sees the pool's model,
//! every endpoint works over HTTP/1.1 and h2c, upstream connections are
//! reused, and policy plugins choose, cap, reject or fall back.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    chat_body, h2_client, http1_client, metric_lines, metrics_text, plugin, pool_toml,
    pools_config, post, post_chat, send, server_toml, switchyard::log_text, wait_for_metric,
    MockUpstream, Reply, Switchyard,
};

/// A `[policy]` table for plugin `name` with its JSON-ish `config` inline
/// table. `timeout_ms` is generous: these tests run a debug build on a
/// busy machine, and only the `spin` test relies on the limit.
fn policy_toml(name: &str, config: &str, timeout_ms: u64) -> String {
    format!(
        "\n[policy]\nplugin = \"{}\"\nconfig = {config}\ntimeout_ms = {timeout_ms}\n\
         max_memory_bytes = 67108864\n",
        plugin(name)
    )
}

/// Two mocks behind pools `small` (model `smollm2`) and `large` (`big`).
async fn two_pools(extra: &str) -> (MockUpstream, MockUpstream, Switchyard) {
    let small = MockUpstream::start().await;
    let large = MockUpstream::start().await;
    let mut config = pools_config(&[
        ("small", &small.url(), "smollm2"),
        ("large", &large.url(), "big"),
    ]);
    config.push_str(extra);
    let sw = Switchyard::start(&config).await;
    (small, large, sw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_names_the_pool_and_upstream_sees_the_pool_model() {
    let (small, large, sw) = two_pools("").await;
    let client = http1_client();

    let reply = post(
        &client,
        &sw.api_url(),
        "/v1/chat/completions",
        &chat_body("small", "hi there"),
    )
    .await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    assert_eq!(
        reply.json["choices"][0]["message"]["content"],
        "echo:hi there"
    );
    let seen = small.requests_to("/v1/chat/completions");
    assert_eq!(seen.len(), 1, "small pool upstream requests");
    assert_eq!(
        seen[0].body["model"], "smollm2",
        "model rewritten to the pool's"
    );
    assert_eq!(seen[0].body["messages"][0]["content"], "hi there");

    let reply = post(
        &client,
        &sw.api_url(),
        "/v1/chat/completions",
        &chat_body("large", "big one"),
    )
    .await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "large");
    let seen = large.requests_to("/v1/chat/completions");
    assert_eq!(seen.len(), 1, "large pool upstream requests");
    assert_eq!(seen[0].body["model"], "big");
    assert_eq!(
        small.request_count(),
        1,
        "small pool got only its own request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_endpoint_lists_every_pool() {
    let (_small, _large, sw) = two_pools("").await;

    let reply = send(http1_client().get(format!("{}/v1/models", sw.api_url()))).await;
    reply.assert_status(200);
    assert_eq!(reply.json["object"], "list", "body: {}", reply.text);
    let data = reply.json["data"].as_array().expect("data array");
    let mut ids: Vec<&str> = data.iter().filter_map(|m| m["id"].as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["large", "small"], "body: {}", reply.text);
    for model in data {
        assert_eq!(model["object"], "model", "body: {}", reply.text);
        assert_eq!(model["owned_by"], "switchyard", "body: {}", reply.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_embeddings_pass_through_over_http1() {
    let (small, _large, sw) = two_pools("").await;
    let client = http1_client();

    // The mock answers choices in reverse; the client must see index order.
    let body = json!({"model": "small", "prompt": ["one", "two words"], "max_tokens": 4});
    let reply = post(&client, &sw.api_url(), "/v1/completions", &body).await;
    reply.assert_status(200);
    assert_eq!(reply.version, reqwest::Version::HTTP_11);
    assert_eq!(reply.pool(), "small");
    let texts: Vec<(u64, &str)> = reply.json["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| (c["index"].as_u64().unwrap(), c["text"].as_str().unwrap()))
        .collect();
    let want = [(0, "echo:one#0"), (1, "echo:two words#0")];
    let mut sorted = texts.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want, "body: {}", reply.text);
    assert_eq!(reply.json["usage"]["prompt_tokens"], 3);
    assert_eq!(
        small.requests_to("/v1/completions")[0].body["max_tokens"],
        4
    );

    // Token-id prompts reach the upstream untouched.
    let body = json!({"model": "small", "prompt": [[11, 12], [13]]});
    let reply = post(&client, &sw.api_url(), "/v1/completions", &body).await;
    reply.assert_status(200);
    let seen = small.requests_to("/v1/completions");
    assert_eq!(seen.last().unwrap().body["prompt"], json!([[11, 12], [13]]));

    let body = json!({"model": "small", "input": ["ab", "c"]});
    let reply = post(&client, &sw.api_url(), "/v1/embeddings", &body).await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    let mut data: Vec<(u64, Value)> = reply.json["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| (d["index"].as_u64().unwrap(), d["embedding"].clone()))
        .collect();
    data.sort_by_key(|(index, _)| *index);
    assert_eq!(
        data,
        [(0, json!([2.0, 97.0, 1.0])), (1, json!([1.0, 99.0, 1.0]))],
        "body: {}",
        reply.text
    );
    assert_eq!(reply.json["usage"]["prompt_tokens"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_serves_h2c_prior_knowledge() {
    let (_small, _large, sw) = two_pools("").await;
    let client = h2_client();
    let api = sw.api_url();

    let reply = post(
        &client,
        &api,
        "/v1/chat/completions",
        &chat_body("small", "over h2"),
    )
    .await;
    reply.assert_status(200);
    assert_eq!(reply.version, reqwest::Version::HTTP_2);
    assert_eq!(reply.pool(), "small");
    assert_eq!(
        reply.json["choices"][0]["message"]["content"],
        "echo:over h2"
    );

    let body = json!({"model": "large", "prompt": "h2 prompt"});
    let reply = post(&client, &api, "/v1/completions", &body).await;
    reply.assert_status(200);
    assert_eq!(reply.version, reqwest::Version::HTTP_2);
    assert_eq!(reply.pool(), "large");
    assert_eq!(reply.json["choices"][0]["text"], "echo:h2 prompt#0");

    let body = json!({"model": "small", "input": "h2"});
    let reply = post(&client, &api, "/v1/embeddings", &body).await;
    reply.assert_status(200);
    assert_eq!(reply.version, reqwest::Version::HTTP_2);
    assert_eq!(reply.json["data"][0]["embedding"], json!([2.0, 104.0, 1.0]));

    let reply = send(client.get(format!("{api}/v1/models"))).await;
    reply.assert_status(200);
    assert_eq!(reply.version, reqwest::Version::HTTP_2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let (small, _large, sw) = two_pools("").await;
    let client = http1_client();

    for k in 0..20 {
        let body = chat_body("small", &format!("request {k}"));
        let reply = post(&client, &sw.api_url(), "/v1/chat/completions", &body).await;
        reply.assert_status(200);
    }
    assert_eq!(small.request_count(), 20);
    assert!(
        small.connections() <= 2,
        "20 sequential requests opened {} upstream connections; expected reuse",
        small.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_router_routes_by_model_prompt_length_and_tier() {
    let policy = policy_toml("cost_router", "{ long_prompt_chars = 2000 }", 1000);
    let (small, large, sw) = two_pools(&policy).await;
    let client = http1_client();
    let api = sw.api_url();

    // Explicit pool names are honoured.
    let reply = post(
        &client,
        &api,
        "/v1/chat/completions",
        &chat_body("small", "x"),
    )
    .await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    let reply = post(
        &client,
        &api,
        "/v1/chat/completions",
        &chat_body("large", "x"),
    )
    .await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "large");

    // "auto": short prompts are cheap, long ones and premium callers not.
    let reply = post(
        &client,
        &api,
        "/v1/chat/completions",
        &chat_body("auto", "short"),
    )
    .await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small", "short auto prompt");
    assert_eq!(small.requests().last().unwrap().body["model"], "smollm2");

    let long = "word ".repeat(500);
    let reply = post(
        &client,
        &api,
        "/v1/chat/completions",
        &chat_body("auto", &long),
    )
    .await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "large", "2500-char auto prompt");
    assert_eq!(large.requests().last().unwrap().body["model"], "big");

    let body = json!({"model": "auto", "prompt": long});
    let reply = post(&client, &api, "/v1/completions", &body).await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "large", "2500-char auto completion prompt");

    let request = client
        .post(format!("{api}/v1/chat/completions"))
        .header("x-tier", "premium")
        .json(&chat_body("auto", "short but premium"));
    let reply = send(request).await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "large", "x-tier: premium");
}

/// Plugin budget of the fault rig, in ms: short, so that the spin test is
/// quick.
const FAULT_RIG_TIMEOUT_MS: u64 = 200;
/// Plugin budget of the memory test, in ms: long, so that filling 64 MiB
/// on a loaded machine ends in the memory limit, never the deadline.
const GROW_TIMEOUT_MS: u64 = 10_000;

/// Pools `small`, `trap`, `spin` and `grow` on one mock, with the
/// `test_faults` plugin as policy under `timeout_ms`.
async fn fault_rig(timeout_ms: u64) -> (MockUpstream, Switchyard) {
    let mock = MockUpstream::start().await;
    let mut config = server_toml();
    for (name, model) in [
        ("small", "smollm2"),
        ("trap", "t"),
        ("spin", "s"),
        ("grow", "g"),
    ] {
        config.push_str(&pool_toml(name, &mock.url(), model));
    }
    config.push_str(&policy_toml("test_faults", "{}", timeout_ms));
    let sw = Switchyard::start(&config).await;
    (mock, sw)
}

/// Sends model `model` (which makes the plugin fail), expects the default
/// route to the pool of that name, and the failure counted as `kind` and
/// logged at warn.
async fn assert_policy_failure_falls_back(model: &str, kind: &str) {
    let timeout_ms = if model == "grow" {
        GROW_TIMEOUT_MS
    } else {
        FAULT_RIG_TIMEOUT_MS
    };
    let (mock, sw) = fault_rig(timeout_ms).await;

    let body = chat_body(model, "still served");
    let reply = post_chat(&sw, &body).await;
    reply.assert_status(200);
    assert_eq!(
        reply.pool(),
        model,
        "fallback to the pool named by the model"
    );
    assert_eq!(
        reply.json["choices"][0]["message"]["content"],
        "echo:still served"
    );
    assert_eq!(mock.request_count(), 1);

    let metrics = metrics_text(&sw).await;
    let counted = metric_lines(&metrics, "switchyard_policy_errors_total")
        .into_iter()
        .any(|line| line.contains(&format!("kind=\"{kind}\"")) && !line.ends_with(" 0"));
    assert!(
        counted,
        "no switchyard_policy_errors_total{{kind=\"{kind}\"}} > 0 in:\n{metrics}"
    );

    sw.wait_for_log("a warn line about the policy failure", |line| {
        log_text(line, "level").as_deref() == Some("WARN")
            && line.to_string().to_lowercase().contains("policy")
    })
    .await;

    // The proxy keeps serving after a plugin failure.
    let reply = post(
        &http1_client(),
        &sw.api_url(),
        "/v1/chat/completions",
        &chat_body("small", "ok"),
    )
    .await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trapping_policy_falls_back_to_default_route() {
    assert_policy_failure_falls_back("trap", "trap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinning_policy_times_out_and_falls_back() {
    assert_policy_failure_falls_back("spin", "timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hungry_policy_is_stopped_and_falls_back() {
    assert_policy_failure_falls_back("grow", "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_rejection_is_a_403_openai_error() {
    let (mock, sw) = fault_rig(FAULT_RIG_TIMEOUT_MS).await;

    let body = chat_body("reject", "let me in");
    let reply = post_chat(&sw, &body).await;
    let message = reply.assert_openai_error(403);
    assert!(
        message.contains("rejected by policy"),
        "message {message:?} should say the policy rejected the request"
    );
    assert_eq!(
        mock.request_count(),
        0,
        "a rejected request never goes upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_caps_max_tokens() {
    let (mock, sw) = fault_rig(FAULT_RIG_TIMEOUT_MS).await;
    let client = http1_client();

    for (asked, sent) in [(100, 5), (3, 3)] {
        let mut body = chat_body("cap", "capped");
        body["max_tokens"] = json!(asked);
        let reply = post(&client, &sw.api_url(), "/v1/chat/completions", &body).await;
        reply.assert_status(200);
        assert_eq!(reply.pool(), "small");
        let upstream = mock.requests().last().cloned().expect("upstream request");
        assert_eq!(
            upstream.body["max_tokens"], sent,
            "client asked for {asked}"
        );
        assert_eq!(upstream.body["model"], "smollm2");
    }
}

/// Plugin budget of the slow-plugin test, in ms: long, so that requests
/// stuck behind a spinning call would visibly finish after it.
const SLOW_PLUGIN_TIMEOUT_MS: u64 = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_policy_does_not_stall_unrelated_requests() {
    let mock = MockUpstream::start().await;
    let mut config = server_toml();
    for (name, model) in [("small", "smollm2"), ("spin", "s")] {
        config.push_str(&pool_toml(name, &mock.url(), model));
    }
    config.push_str(&policy_toml("test_faults", "{}", SLOW_PLUGIN_TIMEOUT_MS));
    let sw = Switchyard::start(&config).await;
    let client = http1_client();
    let api = sw.api_url();

    // Each task returns its reply and when it was read in full.
    let timed = |request: reqwest::RequestBuilder| {
        tokio::spawn(async move {
            let reply = send(request).await;
            (reply, Instant::now())
        })
    };
    let started = Instant::now();
    let spins: Vec<_> = (0..4)
        .map(|k| {
            let body = chat_body("spin", &format!("spin {k}"));
            timed(
                client
                    .post(format!("{api}/v1/chat/completions"))
                    .json(&body),
            )
        })
        .collect();

    // Once the plugin spins, unrelated requests must not queue behind it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let models = timed(client.get(format!("{api}/v1/models")));
    let body = chat_body("small", "not stuck");
    let small = timed(
        client
            .post(format!("{api}/v1/chat/completions"))
            .json(&body),
    );

    let (models, models_done) = models.await.expect("models task");
    let (small, small_done) = small.await.expect("small task");
    models.assert_status(200);
    small.assert_status(200);
    assert_eq!(small.pool(), "small");
    let others_done = models_done.max(small_done);

    let spins: Vec<(Reply, Instant)> = join_in_order(spins).await;
    for (reply, done) in &spins {
        // The spinning call hit its budget, then the default route served.
        reply.assert_status(200);
        assert_eq!(reply.pool(), "spin");
        assert!(
            *done > others_done,
            "a spin request finished {:?} before the unrelated ones: \
             they waited behind the plugin",
            others_done - *done
        );
        let budget = Duration::from_millis(SLOW_PLUGIN_TIMEOUT_MS);
        assert!(
            done.duration_since(started) >= budget / 2,
            "a spin request finished in {:?}: the plugin did not spin",
            done.duration_since(started)
        );
    }
}

/// Awaits every task in order.
async fn join_in_order<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut done = Vec::new();
    for task in tasks {
        done.push(task.await.expect("request task"));
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_pool_serves_a_request_whose_policy_failed() {
    let mut policy = policy_toml("test_faults", "{}", 1000);
    policy.push_str("fallback_pool = \"small\"\n");
    let (small, large, sw) = two_pools(&policy).await;

    // `trap` makes the plugin trap, and no pool is named `trap`.
    let body = chat_body("trap", "caught");
    let reply = post_chat(&sw, &body).await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small", "served by policy.fallback_pool");
    assert_eq!(
        reply.json["choices"][0]["message"]["content"],
        "echo:caught"
    );
    assert_eq!(small.request_count(), 1);
    assert_eq!(large.request_count(), 0);

    let trap = ["kind=\"trap\""];
    let line = wait_for_metric(&sw, "switchyard_policy_errors_total", &trap).await;
    assert!(!line.ends_with(" 0"), "trap not counted: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fallback_pool_a_failed_policy_leaves_an_unknown_model_404() {
    let policy = policy_toml("test_faults", "{}", 1000);
    let (small, large, sw) = two_pools(&policy).await;

    let body = chat_body("trap", "nowhere to go");
    let reply = post_chat(&sw, &body).await;
    reply.assert_openai_error(404);
    assert_eq!(
        reply.json["error"]["code"], "model_not_found",
        "{}",
        reply.text
    );
    assert_eq!(small.request_count() + large.request_count(), 0);
}

/// A pool name the plugin made up is logged cut to 4 KiB, however long it
/// is: one decision cannot write megabytes into the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_unknown_pool_is_logged_cut() {
    let policy = policy_toml("test_faults", "{}", 1000);
    let (_small, _large, sw) = two_pools(&policy).await;

    // `describe` routes to a pool named after the whole request.
    let long = "x".repeat(64 * 1024);
    let body = chat_body("describe", &long);
    let reply = post_chat(&sw, &body).await;
    reply.assert_openai_error(404);

    let line = sw
        .wait_for_log("the unknown pool warning", |line| {
            line.to_string().contains("pool that does not exist")
        })
        .await;
    let pool = log_text(&line, "pool").unwrap_or_default();
    assert!(
        pool.starts_with("ChatCompletions model=describe"),
        "{pool:.80}"
    );
    assert_eq!(pool.len(), 4096, "the logged pool name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_string_goes_upstream_and_hop_headers_do_not() {
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&crate::support::small_pool_config(&mock)).await;

    let url = format!(
        "{}/v1/chat/completions?api-version=2024-06-01",
        sw.api_url()
    );
    let reply = send(
        http1_client()
            .post(url)
            .header("connection", "keep-alive, x-hop-secret")
            .header("x-hop-secret", "s3")
            .header("x-kept", "yes")
            .json(&chat_body("small", "hello")),
    )
    .await;

    reply.assert_status(200);
    let upstream = mock.requests_to("/v1/chat/completions");
    assert_eq!(upstream.len(), 1);
    assert_eq!(upstream[0].query.as_deref(), Some("api-version=2024-06-01"));
    assert_eq!(
        upstream[0].header("x-hop-secret"),
        None,
        "named in Connection"
    );
    assert_eq!(upstream[0].header("x-kept"), Some("yes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_hints_add_an_instruction_cap_tokens_and_label_the_log_line() {
    let config = format!(
        "\n[policy]\nplugin = \"{}\"\ntimeout_ms = 1000\nconfig = {{ max_tokens_cap = 32 }}\n",
        plugin("concise")
    );
    let (small, _large, sw) = two_pools(&config).await;
    let body = json!({
        "model": "auto", "max_tokens": 500,
        "messages": [{"role": "user", "content": "Please summarize this report"}],
    });
    let reply = post_chat(&sw, &body).await;
    reply.assert_status(200);

    let seen = &small.requests_to("/v1/chat/completions")[0].body;
    assert_eq!(seen["max_tokens"], 32);
    assert_eq!(seen["messages"][0]["role"], "system");
    let instruction = seen["messages"][0]["content"].as_str().unwrap_or_default();
    assert!(instruction.contains("concisely"), "{seen}");
    assert_eq!(
        seen["messages"][1]["content"],
        "Please summarize this report"
    );
    sw.wait_for_log("labelled request line", |l| {
        log_text(l, "labels").as_deref() == Some("shape=summary")
    })
    .await;
}
