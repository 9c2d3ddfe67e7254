//! Streaming: `stream: true` chat and completions pass through as SSE as
//! the upstream produces them, in order, ending with `data: [DONE]`.
//!
//! Incrementality is checked by comparing arrival times of events with one
//! another, with generous margins: the mock waits 200 ms between events,
//! so a proxy that buffers the whole stream delivers every event at once.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    h2_client, http1_client, small_pool_config, sse_event_data, MockUpstream, Switchyard,
};

const CHUNK_DELAY_MS: u64 = 200;

/// One SSE event's data and when the client had it, from the request start.
#[derive(Debug)]
struct Event {
    data: String,
    at: Duration,
}

/// A streamed reply: headers and timed events.
#[derive(Debug)]
struct Streamed {
    status: u16,
    content_type: String,
    pool: String,
    events: Vec<Event>,
}

impl Streamed {
    /// The JSON chunks, without the final `[DONE]`.
    fn chunks(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter(|e| e.data != "[DONE]")
            .map(|e| serde_json::from_str(&e.data).expect("JSON chunk"))
            .collect()
    }

    /// Time between the first and the last event.
    fn spread(&self) -> Duration {
        let first = self.events.first().map_or(Duration::ZERO, |e| e.at);
        let last = self.events.last().map_or(Duration::ZERO, |e| e.at);
        last.saturating_sub(first)
    }
}

/// POSTs `body` with the chunk delay header and reads the SSE body event
/// by event, timing each.
async fn stream(client: &reqwest::Client, url: &str, body: &Value) -> Streamed {
    let start = Instant::now();
    let mut response = client
        .post(url)
        .header("x-mock-chunk-delay-ms", CHUNK_DELAY_MS.to_string())
        .json(body)
        .send()
        .await
        .expect("send streaming request");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let status = response.status().as_u16();
    let content_type = header("content-type");
    let pool = header("x-switchyard-pool");

    let mut buffer = String::new();
    let mut events = Vec::new();
    while let Some(bytes) = response.chunk().await.expect("read stream chunk") {
        buffer.push_str(&String::from_utf8_lossy(&bytes));
        buffer = buffer.replace("\r\n", "\n");
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(data) = sse_event_data(&event) {
                events.push(Event {
                    data,
                    at: start.elapsed(),
                });
            }
        }
    }
    Streamed {
        status,
        content_type,
        pool,
        events,
    }
}

/// Fails unless events arrived over at least half the time the mock spent
/// producing them, i.e. the proxy did not hold the stream back.
fn assert_incremental(streamed: &Streamed) {
    let produced = Duration::from_millis(CHUNK_DELAY_MS * (streamed.events.len() as u64 - 1));
    assert!(
        streamed.spread() >= produced / 2,
        "events arrived within {:?} of each other, but the upstream took {produced:?} \
         to produce them: the stream was buffered. Arrivals: {:?}",
        streamed.spread(),
        streamed.events.iter().map(|e| e.at).collect::<Vec<_>>()
    );
}

async fn assert_chat_streams(client: &reqwest::Client) {
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&small_pool_config(&mock)).await;
    let body = json!({
        "model": "small",
        "messages": [{"role": "user", "content": "one two three four five"}],
        "stream": true,
        "stream_options": {"include_usage": true},
    });

    let url = format!("{}/v1/chat/completions", sw.api_url());
    let streamed = stream(client, &url, &body).await;

    assert_eq!(streamed.status, 200);
    assert!(
        streamed.content_type.starts_with("text/event-stream"),
        "content-type {:?}",
        streamed.content_type
    );
    assert_eq!(streamed.pool, "small");
    assert_eq!(
        streamed.events.last().map(|e| e.data.as_str()),
        Some("[DONE]")
    );

    // role, five words, finish reason, usage; then [DONE].
    let chunks = streamed.chunks();
    assert_eq!(chunks.len(), 8, "chunks: {chunks:#?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "echo:one two three four five");
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[7]["usage"]["prompt_tokens"], 5);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_incremental(&streamed);

    let upstream = mock.requests_to("/v1/chat/completions");
    assert_eq!(upstream.len(), 1);
    assert_eq!(upstream[0].body["stream"], true);
    assert_eq!(upstream[0].body["model"], "smollm2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_passes_through_incrementally_over_http1() {
    assert_chat_streams(&http1_client()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_passes_through_incrementally_over_h2c() {
    assert_chat_streams(&h2_client()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_stream_passes_through_incrementally() {
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&small_pool_config(&mock)).await;
    let body = json!({"model": "small", "prompt": "a b c d e", "stream": true});

    let url = format!("{}/v1/completions", sw.api_url());
    let streamed = stream(&http1_client(), &url, &body).await;

    assert_eq!(streamed.status, 200);
    assert!(
        streamed.content_type.starts_with("text/event-stream"),
        "content-type {:?}",
        streamed.content_type
    );
    assert_eq!(streamed.pool, "small");
    assert_eq!(
        streamed.events.last().map(|e| e.data.as_str()),
        Some("[DONE]")
    );

    let chunks = streamed.chunks();
    assert_eq!(chunks.len(), 5, "one chunk per word: {chunks:#?}");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "echo:a b c d e#0");
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_incremental(&streamed);
}
