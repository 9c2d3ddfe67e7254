//! Admin listener: health, readiness and the Prometheus metrics users
//! build dashboards on.

use serde_json::json;

use crate::support::{
    chat_body, http1_client, plugin, pools_config, post, post_chat, send, server_toml,
    small_pool_config, wait_for_metric, MockUpstream, Switchyard,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_answer_200() {
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&small_pool_config(&mock)).await;
    let client = http1_client();

    for path in ["/healthz", "/readyz"] {
        let reply = send(client.get(format!("{}{path}", sw.admin_url()))).await;
        reply.assert_status(200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_by_pool_endpoint_and_status() {
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&small_pool_config(&mock)).await;
    let client = http1_client();

    let body = chat_body("small", "hi");
    post(&client, &sw.api_url(), "/v1/chat/completions", &body)
        .await
        .assert_status(200);
    let request = client
        .post(format!("{}/v1/chat/completions", sw.api_url()))
        .header("x-mock-status", "503")
        .json(&body);
    send(request).await.assert_status(503);

    let ok = ["pool=\"small\"", "status=\"200\"", "endpoint=\""];
    let line = wait_for_metric(&sw, "switchyard_requests_total", &ok).await;
    assert!(
        line.ends_with(" 1"),
        "one successful request counted: {line}"
    );
    let failed = ["pool=\"small\"", "status=\"503\"", "endpoint=\""];
    wait_for_metric(&sw, "switchyard_requests_total", &failed).await;

    let small = ["pool=\"small\""];
    wait_for_metric(&sw, "switchyard_request_duration_seconds_bucket", &small).await;
    wait_for_metric(&sw, "switchyard_upstream_duration_seconds_bucket", &small).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_requests_record_batch_size() {
    let mock = MockUpstream::start().await;
    let config = format!(
        "{}\n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\nmodel = \"smollm2\"\n\
         [pool.batch]\nmax_batch = 8\nmax_wait_ms = 20\n",
        server_toml(),
        mock.url()
    );
    let sw = Switchyard::start(&config).await;

    let body = json!({"model": "small", "input": ["a", "b"]});
    post(&http1_client(), &sw.api_url(), "/v1/embeddings", &body)
        .await
        .assert_status(200);

    wait_for_metric(&sw, "switchyard_batch_size_bucket", &["pool=\"small\""]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_decisions_are_timed() {
    let mock = MockUpstream::start().await;
    let mut config = pools_config(&[
        ("small", &mock.url(), "smollm2"),
        ("large", &mock.url(), "big"),
    ]);
    config.push_str(&format!(
        "\n[policy]\nplugin = \"{}\"\nconfig = {{ long_prompt_chars = 2000 }}\n\
         timeout_ms = 1000\n",
        plugin("cost_router")
    ));
    let sw = Switchyard::start(&config).await;

    let body = chat_body("auto", "hi");
    post_chat(&sw, &body).await.assert_status(200);

    wait_for_metric(
        &sw,
        "switchyard_policy_decision_duration_seconds_bucket",
        &[],
    )
    .await;
}
