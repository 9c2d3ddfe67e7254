//! Shutdown: SIGTERM stops Switchyard taking new work, but every request it
//! already accepted (plain, streaming, or waiting in an open batch) is
//! answered in full before the process exits 0; under load, every request
//! in flight is answered and new connections are refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    chat_body, http1_client, pool_toml, post, send, server_toml, small_pool_config, sse_data,
    MockUpstream, Switchyard,
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

/// Clients sending without pause, each request held upstream a while:
/// SIGTERM comes while every client has one in flight. All of them are
/// answered 200, none is lost, and a new connection is refused after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_request_in_flight() {
    const CLIENTS: usize = 8;
    let mock = MockUpstream::start().await;
    let mut sw = Switchyard::start(&small_pool_config(&mock)).await;

    // Clients stop sending once told, after the answer they wait for.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (api, stop) = (sw.api_url(), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            let client = http1_client();
            let (mut sent, mut ok, mut failures) = (0usize, 0usize, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let request = client
                    .post(format!("{api}/v1/chat/completions"))
                    .header("x-mock-delay-ms", (150 + 40 * c).to_string())
                    .json(&chat_body("small", "under load"));
                sent += 1;
                match send_whole(request).await {
                    Ok(()) => ok += 1,
                    Err(e) => failures.push(e),
                }
            }
            (sent, ok, failures)
        }));
    }

    // Load for a while, then terminate when every client has a request
    // with the upstream, so that no connection sits idle between two.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.in_progress() < CLIENTS {
        assert!(Instant::now() < deadline, "clients never all in flight");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.store(true, Ordering::SeqCst);
    sw.terminate();

    let (mut sent, mut ok, mut failures) = (0, 0, Vec::new());
    for client in clients {
        let (s, o, f) = client.await.expect("client task");
        sent += s;
        ok += o;
        failures.extend(f);
    }
    let lost = sent - ok;
    eprintln!(
        "sigterm under load: {sent} requests, {CLIENTS} concurrent, {CLIENTS} in flight \
         at SIGTERM, {lost} lost"
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(lost, 0);

    // The listener is closed: a new connection is refused.
    let refused = tokio::net::TcpStream::connect(sw.api_addr()).await;
    assert!(refused.is_err(), "the API port still accepts connections");
    let code = sw.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "exit after drain; output:\n{}", sw.output());
}

/// Sends `request` and reads its body; an error says what failed.
async fn send_whole(request: reqwest::RequestBuilder) -> Result<(), String> {
    let response = request.send().await.map_err(|e| format!("send: {e}"))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| format!("body: {e}"))?;
    if status != 200 {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sent_a_request_does_not_hold_the_drain() {
    let mock = MockUpstream::start().await;
    // Both far longer than the exit this test waits for.
    let config = format!(
        "{}shutdown_grace_s = 120\nheader_read_timeout_ms = 120000\n{}",
        server_toml(),
        pool_toml("small", &mock.url(), "smollm2")
    );
    let mut sw = Switchyard::start(&config).await;

    // A spare connection, as HTTP clients open and then leave unused.
    let mut spare = tokio::net::TcpStream::connect(sw.api_addr())
        .await
        .expect("connect");
    let served = send(http1_client().get(format!("{}/v1/models", sw.api_url()))).await;
    served.assert_status(200);

    sw.terminate();
    assert_eq!(
        sw.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "an unused connection held the shutdown"
    );
    let mut byte = [0u8; 1];
    let read = tokio::io::AsyncReadExt::read(&mut spare, &mut byte).await;
    assert!(matches!(read, Ok(0) | Err(_)), "the spare stayed open");
}

#[tokio::test]
async fn a_sigterm_just_after_start_is_a_graceful_shutdown() {
    // The signal handlers are in place before the server answers /readyz,
    // so a SIGTERM at once is a clean exit, not a kill (exit 143).
    let mock = MockUpstream::start().await;
    for attempt in 0..4 {
        let mut sw = Switchyard::start(&small_pool_config(&mock)).await;
        sw.terminate();
        let code = sw.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(code, Some(0), "attempt {attempt}: exit code {code:?}");
    }
}
