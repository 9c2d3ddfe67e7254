//! Shutdown: SIGTERM stops Switchyard taking new work, but every request it
//! already accepted (plain, streaming, or waiting in an open batch) is
//! answered in full before the process exits 0.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    chat_body, http1_client, post, send, server_toml, sse_data, MockUpstream, Switchyard,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_accepted_requests_then_exits_cleanly() {
    let mock = MockUpstream::start().await;
    let config = format!(
        "{}\n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\nmodel = \"smollm2\"\n\
         [pool.batch]\nmax_batch = 8\nmax_wait_ms = 500\n",
        server_toml(),
        mock.url()
    );
    let mut sw = Switchyard::start(&config).await;
    let client = http1_client();
    let chat_url = format!("{}/v1/chat/completions", sw.api_url());

    // A slow answer, a slow stream, and a completion held in an open batch.
    let slow = tokio::spawn(send(
        client
            .post(&chat_url)
            .header("x-mock-delay-ms", "800")
            .json(&chat_body("small", "slow one")),
    ));
    let stream_body = json!({
        "model": "small",
        "stream": true,
        "messages": [{"role": "user", "content": "one two three four"}],
    });
    let stream = tokio::spawn(send(
        client
            .post(&chat_url)
            .header("x-mock-chunk-delay-ms", "150")
            .json(&stream_body),
    ));
    let batched = {
        let (client, api) = (client.clone(), sw.api_url());
        let body = json!({"model": "small", "prompt": "held in a batch"});
        tokio::spawn(async move { post(&client, &api, "/v1/completions", &body).await })
    };

    // Terminate once both chat requests are with the upstream; the batch
    // is still open then (it waits 500 ms).
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.requests_to("/v1/chat/completions").len() < 2 {
        assert!(Instant::now() < deadline, "requests never reached upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sw.terminate();

    let slow = slow.await.expect("slow request task");
    slow.assert_status(200);
    assert_eq!(
        slow.json["choices"][0]["message"]["content"], "echo:slow one",
        "{}",
        slow.text
    );

    let stream = stream.await.expect("stream task");
    stream.assert_status(200);
    let events = sse_data(&stream.text);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        stream.text
    );
    let content: String = events
        .iter()
        .filter(|data| data.as_str() != "[DONE]")
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(
        content.split_whitespace().collect::<Vec<_>>().join(" "),
        "echo:one two three four"
    );

    let batched = batched.await.expect("batched request task");
    batched.assert_status(200);
    assert_eq!(batched.json["choices"][0]["text"], "echo:held in a batch#0");

    let code = sw.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "exit after drain; output:\n{}", sw.output());
}
