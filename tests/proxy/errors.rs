//! Errors: every failure a client can cause or meet comes back as an
//! OpenAI error body with the right status, and the proxy keeps serving
//! afterwards.

use serde_json::{json, Value};

use crate::support::{
    assert_still_serves, chat_body, closed_port_url, http1_client, post, post_chat, send,
    server_toml, MockUpstream, Reply, Switchyard,
};

/// Body limit of the error rig, in bytes.
const MAX_BODY_BYTES: usize = 4096;

/// Pool whose only endpoint refuses connections.
const DEAD_POOL: &str = "bravo";

/// Pool whose request timeout is shorter than the delay tests ask for.
const SLOW_POOL: &str = "charlie";

/// Pools `small` (healthy), `bravo` (nothing listening) and `charlie`
/// (500 ms request timeout), with a 4 KiB body limit.
async fn error_rig() -> (MockUpstream, Switchyard) {
    let mock = MockUpstream::start().await;
    let url = mock.url();
    let dead = closed_port_url();
    let config = format!(
        "{server}max_body_bytes = {MAX_BODY_BYTES}\n\
         \n[[pool]]\nname = \"small\"\nendpoints = [\"{url}\"]\nmodel = \"smollm2\"\n\
         \n[[pool]]\nname = \"{DEAD_POOL}\"\nendpoints = [\"{dead}\"]\nmodel = \"m\"\n\
         connect_timeout_ms = 1000\n\
         \n[[pool]]\nname = \"{SLOW_POOL}\"\nendpoints = [\"{url}\"]\nmodel = \"m\"\n\
         request_timeout_ms = 500\n",
        server = server_toml()
    );
    let sw = Switchyard::start(&config).await;
    (mock, sw)
}

/// A chat request for `model` saying "hello".
fn hello(model: &str) -> Value {
    chat_body(model, "hello")
}

/// POSTs raw bytes as JSON.
async fn post_raw(sw: &Switchyard, path: &str, body: impl Into<reqwest::Body>) -> Reply {
    let request = http1_client()
        .post(format!("{}{path}", sw.api_url()))
        .header("content-type", "application/json")
        .body(body);
    send(request).await
}

fn assert_invalid_request(reply: &Reply, status: u16, field: &str) {
    let message = reply.assert_openai_error(status);
    assert_eq!(
        reply.json["error"]["type"], "invalid_request_error",
        "{}",
        reply.text
    );
    assert!(
        message.contains(field),
        "message {message:?} should name the field `{field}`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_a_400_invalid_request() {
    let (mock, sw) = error_rig().await;

    let reply = post_raw(&sw, "/v1/chat/completions", "{\"model\": \"small\", ").await;
    reply.assert_openai_error(400);
    assert_eq!(
        reply.json["error"]["type"], "invalid_request_error",
        "{}",
        reply.text
    );
    assert_eq!(mock.request_count(), 0, "nothing reaches the upstream");

    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_required_fields_are_400_naming_the_field() {
    let (mock, sw) = error_rig().await;
    let client = http1_client();
    let api = sw.api_url();
    let cases = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "small"}),
            "messages",
        ),
        ("/v1/completions", json!({"model": "small"}), "prompt"),
        ("/v1/embeddings", json!({"model": "small"}), "input"),
        ("/v1/embeddings", json!({"input": "x"}), "model"),
    ];

    for (path, body, field) in cases {
        let reply = post(&client, &api, path, &body).await;
        assert_invalid_request(&reply, 400, field);
    }
    assert_eq!(mock.request_count(), 0, "nothing reaches the upstream");

    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413() {
    let (mock, sw) = error_rig().await;

    let body = json!({"model": "small", "prompt": "x".repeat(2 * MAX_BODY_BYTES)});
    let reply = post_raw(&sw, "/v1/completions", body.to_string()).await;
    reply.assert_openai_error(413);
    assert_eq!(mock.request_count(), 0, "nothing reaches the upstream");

    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_404_model_not_found() {
    let (mock, sw) = error_rig().await;

    let reply = post(
        &http1_client(),
        &sw.api_url(),
        "/v1/chat/completions",
        &hello("nope"),
    )
    .await;
    let message = reply.assert_openai_error(404);
    assert_eq!(
        reply.json["error"]["code"], "model_not_found",
        "{}",
        reply.text
    );
    assert!(
        message.contains("nope"),
        "message {message:?} should name the model"
    );
    assert_eq!(mock.request_count(), 0);

    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_is_502_naming_the_pool() {
    let (_mock, sw) = error_rig().await;

    let reply = post_chat(&sw, &hello(DEAD_POOL)).await;
    let message = reply.assert_openai_error(502);
    assert!(
        message.contains(DEAD_POOL),
        "message {message:?} should name the pool"
    );

    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504_naming_the_pool() {
    let (mock, sw) = error_rig().await;

    let request = http1_client()
        .post(format!("{}/v1/chat/completions", sw.api_url()))
        .header("x-mock-delay-ms", "3000")
        .json(&hello(SLOW_POOL));
    let reply = send(request).await;
    let message = reply.assert_openai_error(504);
    assert!(
        message.contains(SLOW_POOL),
        "message {message:?} should name the pool"
    );
    assert_eq!(mock.request_count(), 1, "the upstream did get the request");

    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_status_and_body_pass_through() {
    let (_mock, sw) = error_rig().await;

    let request = http1_client()
        .post(format!("{}/v1/chat/completions", sw.api_url()))
        .header("x-mock-status", "503")
        .json(&hello("small"));
    let reply = send(request).await;
    let message = reply.assert_openai_error(503);
    assert_eq!(
        message, "mock upstream forced status 503",
        "upstream body kept"
    );
    assert_eq!(reply.pool(), "small");

    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_path_is_404_and_wrong_method_is_405() {
    let (mock, sw) = error_rig().await;
    let client = http1_client();
    let api = sw.api_url();

    let reply = send(client.get(format!("{api}/v1/nothing"))).await;
    reply.assert_openai_error(404);
    let reply = post(&client, &api, "/v2/chat/completions", &hello("small")).await;
    reply.assert_openai_error(404);

    for path in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] {
        let reply = send(client.get(format!("{api}{path}"))).await;
        reply.assert_openai_error(405);
    }
    assert_eq!(mock.request_count(), 0);

    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_endpoint_is_skipped_for_the_pools_next_one() {
    let mock = MockUpstream::start().await;
    let dead = closed_port_url();
    let config = format!(
        "{}\n[[pool]]\nname = \"small\"\nendpoints = [\"{dead}\", \"{}\"]\n\
         model = \"smollm2\"\nconnect_timeout_ms = 1000\n",
        server_toml(),
        mock.url()
    );
    let sw = Switchyard::start(&config).await;

    // The rotation starts on each endpoint in turn; every request must
    // still reach the live one.
    for k in 0..4 {
        let reply = post(
            &http1_client(),
            &sw.api_url(),
            "/v1/chat/completions",
            &chat_body("small", &format!("try {k}")),
        )
        .await;
        reply.assert_status(200);
        assert_eq!(
            reply.json["choices"][0]["message"]["content"],
            format!("echo:try {k}")
        );
    }
    assert_eq!(mock.requests_to("/v1/chat/completions").len(), 4);
}
