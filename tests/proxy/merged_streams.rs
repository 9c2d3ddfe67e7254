//! Merged streams: concurrent `stream: true` completions with the same
//! parameters reach the upstream as one stream over their combined
//! prompts, and each caller reads only its own choices, numbered from 0,
//! with its own usage and its own `data: [DONE]`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    http1_client,
    mock_upstream::{FAULT_BREAK_STREAM, FAULT_REJECT, FAULT_SLOW_STREAM},
    server_toml, sse_event_data, words, MockUpstream, Switchyard,
};

/// Completion tokens the mock charges per choice.
const TOKENS_PER_CHOICE: u64 = crate::support::mock_upstream::COMPLETION_TOKENS_PER_CHOICE;

/// Long enough that streams sent together on a busy two-core machine
/// still land in one batch window.
const MAX_WAIT_MS: u64 = 300;

/// How long a test waits for something that should happen at once.
const POLL_LIMIT: Duration = Duration::from_secs(10);

/// One recording mock behind pool `small`, in the fixed-window mode so
/// that streams sent together are merged whatever the upstream's state.
async fn rig() -> (MockUpstream, Switchyard) {
    let mock = MockUpstream::start().await;
    let config = format!(
        "{}\n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\nmodel = \"smollm2\"\n\
         [pool.batch]\nmode = \"fixed\"\nmax_batch = 16\nmax_wait_ms = {MAX_WAIT_MS}\n",
        server_toml(),
        mock.url()
    );
    let sw = Switchyard::start(&config).await;
    (mock, sw)
}

/// What one caller read.
#[derive(Debug)]
struct Read {
    status: u16,
    content_type: String,
    batch_size: String,
    /// The `data:` of every event, `[DONE]` included.
    events: Vec<String>,
    /// How the body ended, when it did not end cleanly.
    error: Option<String>,
}

impl Read {
    /// The JSON events, without `[DONE]`.
    fn chunks(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).expect("JSON event"))
            .collect()
    }

    fn dones(&self) -> usize {
        self.events.iter().filter(|e| *e == "[DONE]").count()
    }
}

/// POSTs a streaming completions body and reads events until the body
/// ends, or until `keep` events have arrived (then the caller leaves).
async fn read_stream(sw_url: String, body: Value, keep: Option<usize>) -> Read {
    let mut response = http1_client()
        .post(format!("{sw_url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("send streaming request");
    let header = |name: &str| {
        let value = response.headers().get(name);
        value
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (content_type, batch_size) = (header("content-type"), header("x-switchyard-batch-size"));
    let status = response.status().as_u16();

    let mut buffer = String::new();
    let mut events = Vec::new();
    let mut error = None;
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => buffer.push_str(&String::from_utf8_lossy(&bytes)),
            Ok(None) => break,
            Err(e) => {
                error = Some(format!("{e:?}"));
                break;
            }
        }
        buffer = buffer.replace("\r\n", "\n");
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            events.extend(sse_event_data(&event));
        }
        if keep.is_some_and(|keep| events.len() >= keep) {
            break;
        }
    }
    if status != 200 {
        events = vec![buffer];
    }
    Read {
        status,
        content_type,
        batch_size,
        events,
        error,
    }
}

/// Sends every body at once and returns what each caller read.
async fn stream_together(sw: &Switchyard, bodies: &[Value]) -> Vec<Read> {
    let handles: Vec<_> = bodies
        .iter()
        .map(|body| tokio::spawn(read_stream(sw.api_url(), body.clone(), None)))
        .collect();
    let mut reads = Vec::new();
    for handle in handles {
        reads.push(handle.await.expect("stream task"));
    }
    reads
}

fn prompts_of(body: &Value) -> Vec<String> {
    match &body["prompt"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|p| p.as_str().expect("string prompt").to_string())
            .collect(),
        other => panic!("unexpected prompt {other}"),
    }
}

/// Fails unless `read` is a whole stream holding exactly the choices for
/// `body`: indices 0.., each choice's own text, one finish per choice,
/// one `[DONE]` at the end.
fn assert_own_stream(read: &Read, body: &Value) {
    assert_eq!(read.status, 200, "{read:?}");
    assert!(
        read.content_type.starts_with("text/event-stream"),
        "{read:?}"
    );
    assert!(read.error.is_none(), "stream cut: {read:?}");
    assert_eq!(read.events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(read.dones(), 1, "one [DONE]: {read:?}");

    let prompts = prompts_of(body);
    let n = body["n"].as_u64().unwrap_or(1);
    let mut texts: BTreeMap<u64, String> = BTreeMap::new();
    let mut finished: BTreeMap<u64, usize> = BTreeMap::new();
    for chunk in read.chunks() {
        assert_eq!(chunk["object"], "text_completion", "{chunk}");
        for choice in chunk["choices"].as_array().expect("choices") {
            let index = choice["index"].as_u64().expect("index");
            assert!(
                !finished.contains_key(&index),
                "choice {index} went on after its finish: {read:?}"
            );
            let text = choice["text"].as_str().unwrap_or_default();
            texts.entry(index).or_default().push_str(text);
            if !choice["finish_reason"].is_null() {
                assert_eq!(choice["finish_reason"], "stop");
                finished.insert(index, 1);
            }
        }
    }
    let want: BTreeMap<u64, String> = (0..prompts.len() as u64 * n)
        .map(|k| (k, format!("echo:{}#{}", prompts[(k / n) as usize], k % n)))
        .collect();
    assert_eq!(texts, want, "choices for {body}");
    assert_eq!(finished.len() as u64, prompts.len() as u64 * n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_streams_give_each_caller_only_its_own_choices() {
    let (mock, sw) = rig().await;
    let bodies = [
        json!({"model": "small", "prompt": "one two", "n": 2, "stream": true}),
        json!({"model": "small", "prompt": ["three", "four five six"], "n": 2,
               "stream": true}),
        json!({"model": "small", "prompt": "seven", "n": 2, "stream": true}),
    ];

    let reads = stream_together(&sw, &bodies).await;

    let upstream = mock.requests_to("/v1/completions");
    assert_eq!(upstream.len(), 1, "one merged upstream stream");
    assert_eq!(upstream[0].body["stream"], true);
    assert_eq!(upstream[0].items().len(), 4);
    for (read, body) in reads.iter().zip(&bodies) {
        assert_own_stream(read, body);
        assert_eq!(read.batch_size, "4");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_streams_give_each_caller_its_own_usage() {
    let (mock, sw) = rig().await;
    let prompts = ["a", "b c d e f g h", "i j"];
    let bodies: Vec<Value> = prompts
        .iter()
        .map(|p| {
            json!({"model": "small", "prompt": p, "stream": true,
                   "stream_options": {"include_usage": true}})
        })
        .collect();

    let reads = stream_together(&sw, &bodies).await;

    assert_eq!(mock.requests_to("/v1/completions").len(), 1);
    let (mut prompt_sum, mut completion_sum) = (0, 0);
    for (read, body) in reads.iter().zip(&bodies) {
        assert_own_stream(read, body);
        // The usage event comes last, after every choice, alone.
        let chunks = read.chunks();
        let usage_at: Vec<usize> = (0..chunks.len())
            .filter(|k| chunks[*k]["usage"].is_object())
            .collect();
        assert_eq!(usage_at, [chunks.len() - 1], "{read:?}");
        let usage = &chunks[chunks.len() - 1]["usage"];
        assert_eq!(chunks[chunks.len() - 1]["choices"], json!([]));
        let (p, c) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
        assert_eq!(usage["total_tokens"], p + c);
        prompt_sum += p;
        completion_sum += c;
    }
    let words: u64 = prompts.iter().map(|p| words(p)).sum();
    assert_eq!(prompt_sum, words, "prompt shares add up");
    assert_eq!(completion_sum, 3 * TOKENS_PER_CHOICE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_leaving_a_merged_stream_leaves_the_others_whole() {
    let (mock, sw) = rig().await;
    let prompt = |words: &str| format!("{FAULT_SLOW_STREAM} {words}");
    let leaver = json!({"model": "small", "prompt": prompt("a b c d e f"), "stream": true});
    let stayer = json!({"model": "small", "prompt": prompt("g h i"), "stream": true});

    let leaving = tokio::spawn(read_stream(sw.api_url(), leaver, Some(1)));
    let staying = tokio::spawn(read_stream(sw.api_url(), stayer.clone(), None));
    let left = leaving.await.unwrap();
    let stayed = staying.await.unwrap();

    assert_eq!(left.status, 200);
    assert_eq!(left.dones(), 0);
    assert_own_stream(&stayed, &stayer);
    assert_eq!(mock.requests_to("/v1/completions").len(), 1);
    assert_eq!(mock.cut_streams(), 0, "the upstream stream ran to its end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_stream_whose_callers_all_leave_is_aborted() {
    let (mock, sw) = rig().await;
    let long: String = (0..40).map(|k| format!(" w{k}")).collect();
    let bodies: Vec<Value> = (0..2)
        .map(|k| {
            json!({"model": "small", "prompt": format!("{FAULT_SLOW_STREAM} {k}{long}"),
                   "stream": true})
        })
        .collect();
    let handles: Vec<_> = bodies
        .iter()
        .map(|body| tokio::spawn(read_stream(sw.api_url(), body.clone(), Some(1))))
        .collect();
    for handle in handles {
        assert_eq!(handle.await.unwrap().dones(), 0);
    }

    let started = Instant::now();
    while mock.cut_streams() == 0 {
        assert!(
            started.elapsed() < POLL_LIMIT,
            "the upstream stream was never aborted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(mock.requests_to("/v1/completions").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_upstream_stream_cuts_every_caller_without_done() {
    let (mock, sw) = rig().await;
    let bodies = [
        json!({"model": "small", "prompt": format!("{FAULT_BREAK_STREAM} a b c d"),
               "stream": true}),
        json!({"model": "small", "prompt": "bystander e f g h", "stream": true}),
    ];

    let reads = stream_together(&sw, &bodies).await;

    assert_eq!(mock.requests_to("/v1/completions").len(), 1);
    for read in &reads {
        assert_eq!(read.status, 200);
        assert_eq!(
            read.dones(),
            0,
            "a cut stream must not end cleanly: {read:?}"
        );
        assert!(
            read.error.is_some(),
            "the body must end in an error: {read:?}"
        );
    }
    assert!(
        reads.iter().any(|r| !r.chunks().is_empty()),
        "events before the break got through: {reads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_merged_stream_fails_only_the_caller_at_fault() {
    let (mock, sw) = rig().await;
    let bodies = [
        json!({"model": "small", "prompt": FAULT_REJECT, "stream": true}),
        json!({"model": "small", "prompt": "innocent", "stream": true}),
    ];

    let reads = stream_together(&sw, &bodies).await;

    assert_eq!(reads[0].status, 400, "{:?}", reads[0]);
    assert_own_stream(&reads[1], &bodies[1]);
    // The merged request, then each caller alone.
    assert_eq!(mock.requests_to("/v1/completions").len(), 3);
}
