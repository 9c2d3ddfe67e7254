//! Pools of kind `local`: the small model answered by the in-process
//! executor, through the same API as upstream pools.
//!
//! Every test here needs the model file (`make model`); without it each
//! prints why it is skipped, or fails under `SWITCHYARD_REQUIRE_MODEL=1`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{
    http1_client, local_pool_config, metrics_text, model_file, post, post_chat, send, sse_data,
    switchyard_check, switchyard_run_refused, wait_for_metric, Switchyard,
};

fn greedy_chat(content: &str, max_tokens: u64) -> Value {
    json!({
        "model": "small",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

fn answer(reply: &Value) -> String {
    reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn chat_and_completions_are_answered_in_process() {
    let Some(model) = model_file() else { return };
    let sw = Switchyard::start(&local_pool_config(&model, "")).await;
    let client = http1_client();

    let reply = post(
        &client,
        &sw.api_url(),
        "/v1/chat/completions",
        &greedy_chat("What is 2+2?", 12),
    )
    .await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    let body = &reply.json;
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "small");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(!answer(body).is_empty(), "{body}");
    let usage = &body["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion), "{usage}");
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5, "{usage}");
    let finish = body["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length", "{finish}");
    if finish == "length" {
        assert_eq!(completion, 12);
    }

    // Completions: a prompt array and n choices, one choice per pair, in
    // prompt-major order; no max_tokens means 16, as OpenAI's default.
    let request = json!({
        "model": "small",
        "prompt": ["The capital of France is", "One, two, three,"],
        "n": 2,
        "temperature": 0,
    });
    let reply = post(&client, &sw.api_url(), "/v1/completions", &request).await;
    reply.assert_status(200);
    let choices = reply.json["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
    }
    // Greedy choices of one prompt agree; the two prompts differ.
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(choices[2]["text"], choices[3]["text"]);
    assert_ne!(choices[0]["text"], choices[2]["text"]);
    assert!(reply.json["usage"]["completion_tokens"].as_u64().unwrap() <= 4 * 16);
}

#[tokio::test]
async fn concurrent_requests_share_a_batch_and_answer_as_alone() {
    let Some(model) = model_file() else { return };
    let sw = Switchyard::start(&local_pool_config(&model, "max_batch = 8\n")).await;
    let client = http1_client();
    let url = sw.api_url();
    let questions = [
        "Name a color.",
        "What is the capital of Italy?",
        "Write one word about the sea.",
        "Count to five.",
    ];

    // Alone, one after the other.
    let mut alone = Vec::new();
    for q in questions {
        let reply = post(&client, &url, "/v1/chat/completions", &greedy_chat(q, 24)).await;
        reply.assert_status(200);
        assert_eq!(reply.header("x-switchyard-batch-size"), Some("1"));
        alone.push(answer(&reply.json));
    }

    // Together: the same answers, decoded in one running batch.
    let together = questions.map(|q| {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            post(&client, &url, "/v1/chat/completions", &greedy_chat(q, 24)).await
        })
    });
    let mut peak = 0;
    for (i, task) in together.into_iter().enumerate() {
        let reply = task.await.unwrap();
        reply.assert_status(200);
        assert_eq!(
            answer(&reply.json),
            alone[i],
            "question {i} answered differently in a batch"
        );
        let batch: usize = reply
            .header("x-switchyard-batch-size")
            .unwrap()
            .parse()
            .unwrap();
        peak = peak.max(batch);
    }
    assert_eq!(
        peak,
        questions.len(),
        "the four requests never ran in one batch"
    );

    let metrics = metrics_text(&sw).await;
    assert!(
        metrics.contains("switchyard_executor_tokens_generated_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_executor_batch_size_bucket"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_chat_without_max_tokens_stops_at_the_pools_default() {
    let Some(model) = model_file() else { return };
    let config = local_pool_config(&model, "default_max_tokens = 3\n");
    let sw = Switchyard::start(&config).await;
    let request = json!({
        "model": "small",
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "temperature": 0,
    });

    let reply = post_chat(&sw, &request).await;

    reply.assert_status(200);
    let completion = reply.json["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=3).contains(&completion), "{}", reply.json);
    if completion == 3 {
        assert_eq!(reply.json["choices"][0]["finish_reason"], "length");
    }
}

#[tokio::test]
async fn streaming_sends_the_same_answer_token_by_token() {
    let Some(model) = model_file() else { return };
    let sw = Switchyard::start(&local_pool_config(&model, "")).await;
    let client = http1_client();
    let url = sw.api_url();
    let request = greedy_chat("Tell me about cats.", 20);

    let whole = post(&client, &url, "/v1/chat/completions", &request).await;
    whole.assert_status(200);

    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let reply = post(&client, &url, "/v1/chat/completions", &streaming).await;
    reply.assert_status(200);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let events = sse_data(&reply.text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    let mut content_chunks = 0;
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
            continue;
        }
        let choice = &chunk["choices"][0];
        if let Some(piece) = choice["delta"]["content"].as_str() {
            if !piece.is_empty() {
                content_chunks += 1;
            }
            text.push_str(piece);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(text, answer(&whole.json));
    assert!(
        content_chunks > 3,
        "the answer arrived in {content_chunks} pieces"
    );
    assert_eq!(
        finish.as_deref(),
        whole.json["choices"][0]["finish_reason"].as_str()
    );
    assert_eq!(usage.unwrap(), whole.json["usage"]);
}

#[tokio::test]
async fn logprobs_come_in_the_openai_shapes() {
    let Some(model) = model_file() else { return };
    let sw = Switchyard::start(&local_pool_config(&model, "")).await;
    let client = http1_client();
    let url = sw.api_url();

    let mut request = greedy_chat("Say hello.", 8);
    request["logprobs"] = json!(true);
    request["top_logprobs"] = json!(3);
    let reply = post(&client, &url, "/v1/chat/completions", &request).await;
    reply.assert_status(200);
    let content = reply.json["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    let completion = reply.json["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(content.len() as u64, completion);
    let mut joined = Vec::new();
    for entry in content {
        let logprob = entry["logprob"].as_f64().unwrap();
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], entry["token"]);
        assert!((top[0]["logprob"].as_f64().unwrap() - logprob).abs() < 1e-6);
        assert!(logprob <= 0.0);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        for b in entry["bytes"].as_array().unwrap() {
            joined.push(b.as_u64().unwrap() as u8);
        }
    }
    let text = answer(&reply.json);
    assert!(
        String::from_utf8_lossy(&joined).starts_with(&text),
        "{text:?}"
    );

    let request = json!({
        "model": "small", "prompt": "Once upon a time", "max_tokens": 5,
        "temperature": 0, "logprobs": 2,
    });
    let reply = post(&client, &url, "/v1/completions", &request).await;
    reply.assert_status(200);
    let logprobs = &reply.json["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5);
    assert_eq!(logprobs["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(logprobs["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(logprobs["text_offset"][0], 0);
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, reply.json["choices"][0]["text"].as_str().unwrap());
}

#[tokio::test]
async fn stop_texts_end_the_answer_before_them() {
    let Some(model) = model_file() else { return };
    let sw = Switchyard::start(&local_pool_config(&model, "")).await;
    let client = http1_client();
    let url = sw.api_url();

    let request = json!({
        "model": "small", "prompt": "The days of the week are Monday,",
        "max_tokens": 24, "temperature": 0,
    });
    let full = post(&client, &url, "/v1/completions", &request).await;
    full.assert_status(200);
    let text = full.json["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    // Stop at the second word of the answer, whatever it is.
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 3, "answer too short to cut: {text:?}");
    let stop = words[1];
    let cut = &text[..text.find(stop).unwrap()];

    for stream in [false, true] {
        let mut stopped = request.clone();
        stopped["stop"] = json!([stop]);
        stopped["stream"] = json!(stream);
        let reply = post(&client, &url, "/v1/completions", &stopped).await;
        reply.assert_status(200);
        let (got, finish) = if stream {
            let mut got = String::new();
            let mut finish = Value::Null;
            for event in sse_data(&reply.text).iter().filter(|e| *e != "[DONE]") {
                let chunk: Value = serde_json::from_str(event).unwrap();
                got.push_str(chunk["choices"][0]["text"].as_str().unwrap());
                if !chunk["choices"][0]["finish_reason"].is_null() {
                    finish = chunk["choices"][0]["finish_reason"].clone();
                }
            }
            (got, finish)
        } else {
            let choice = &reply.json["choices"][0];
            (
                choice["text"].as_str().unwrap().to_string(),
                choice["finish_reason"].clone(),
            )
        };
        assert_eq!(got, cut, "stream: {stream}");
        assert_eq!(finish, "stop", "stream: {stream}");
    }
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let Some(model) = model_file() else { return };
    let config = local_pool_config(&model, "max_batch = 1\nmax_queue = 1\n");
    let sw = Switchyard::start(&config).await;
    let client = http1_client();
    let url = sw.api_url();

    // One running, one queued; the rest cannot be held.
    let long = json!({
        "model": "small", "prompt": "List every number:", "max_tokens": 200,
        "temperature": 0,
    });
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (client, url, long) = (client.clone(), url.clone(), long.clone());
            tokio::spawn(async move { post(&client, &url, "/v1/completions", &long).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        let reply = task.await.unwrap();
        if reply.status == 429 {
            let message = reply.assert_openai_error(429);
            assert!(message.contains("waiting"), "{message}");
            let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
            assert!(retry >= 1);
            assert!(reply.header("retry-after-ms").is_some());
        } else {
            reply.assert_status(200);
        }
        statuses.push(reply.status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 429, 429]);
    wait_for_metric(
        &sw,
        "switchyard_rejected_requests_total",
        &["pool=\"small\"", "reason=\"queue_full\""],
    )
    .await;
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_sequence() {
    let Some(model) = model_file() else { return };
    // One sequence at a time, nothing queued: the next request can only be
    // served once the abandoned one has been freed.
    let config = local_pool_config(&model, "max_batch = 1\nmax_queue = 4\n");
    let sw = Switchyard::start(&config).await;
    let client = http1_client();
    let url = sw.api_url();

    let mut endless = json!({
        "model": "small", "prompt": "Write a very long essay:", "max_tokens": 1900,
        "stream": true, "temperature": 0,
    });
    let mut response = client
        .post(format!("{url}/v1/completions"))
        .json(&endless)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap();
    assert!(first.is_some());
    drop(response);

    endless["stream"] = json!(false);
    endless["max_tokens"] = json!(4);
    let reply = tokio::time::timeout(
        Duration::from_secs(60),
        post(&client, &url, "/v1/completions", &endless),
    )
    .await
    .expect("the abandoned sequence still holds the only place");
    reply.assert_status(200);
}

#[tokio::test]
async fn requests_the_executor_cannot_serve_get_clear_errors() {
    let Some(model) = model_file() else { return };
    let sw = Switchyard::start(&local_pool_config(&model, "context = 64\n")).await;
    let client = http1_client();
    let url = sw.api_url();

    let cases = [
        (
            "/v1/embeddings",
            json!({"model": "small", "input": "hi"}),
            "embeddings",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "small", "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            "/v1/completions",
            json!({"model": "small", "prompt": "hi", "temperature": 7}),
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"model": "small", "prompt": "word ".repeat(200)}),
            "context",
        ),
        (
            "/v1/completions",
            json!({"model": "small", "prompt": ""}),
            "empty",
        ),
        (
            "/v1/completions",
            json!({"model": "small", "prompt": [1, 2, 99999999]}),
            "vocabulary",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "small", "messages": [{"role": "user",
                   "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "text",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "small", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 0}),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"model": "small", "prompt": "hi", "max_completion_tokens": 0}),
            "max_completion_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "small", "messages": [{"role": "user", "content": "hi"}],
                   "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            "/v1/completions",
            json!({"model": "small", "prompt": "hi", "best_of": 5}),
            "best_of",
        ),
    ];
    for (path, body, word) in cases {
        let reply = post(&client, &url, path, &body).await;
        let message = reply.assert_openai_error(400);
        assert!(message.contains(word), "{path} {body}: {message}");
    }
    let reply = post(
        &client,
        &url,
        "/v1/completions",
        &json!({
            "model": "small", "prompt": "word ".repeat(200),
        }),
    )
    .await;
    assert_eq!(reply.json["error"]["code"], "context_length_exceeded");

    // None of that disturbed the pool.
    let reply = post(
        &client,
        &url,
        "/v1/completions",
        &json!({
            "model": "small", "prompt": "Hello", "max_tokens": 2,
        }),
    )
    .await;
    reply.assert_status(200);
}

#[tokio::test]
async fn check_opens_the_model_and_names_a_bad_one() {
    let Some(model) = model_file() else { return };
    let (code, out) = switchyard_check(&local_pool_config(&model, ""));
    assert_eq!(code, 0, "{out}");

    let dir = std::env::temp_dir().join(format!("switchyard-badmodel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00 not really a model").unwrap();
    let (code, out) = switchyard_check(&local_pool_config(&bad, ""));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("pool[0].model_path"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);

    let missing = dir.join("missing.gguf");
    let (code, out) = switchyard_check(&local_pool_config(&missing, ""));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("make model"), "{out}");
}

#[tokio::test]
async fn run_without_config_serves_the_embedded_default_or_says_how_to_fetch() {
    // In a folder without models/, the embedded default cannot find its
    // model; the error says how to fetch it rather than panicking.
    let dir = std::env::temp_dir().join(format!("switchyard-nomodel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("run")
        .current_dir(&dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("make model"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

#[tokio::test]
async fn a_gpu_pool_without_a_gpu_says_why_and_auto_serves_on_the_cpu() {
    let Some(model) = model_file() else { return };
    if let Ok(gpu) = switchyard_executor::cuda::Gpu::open(0) {
        eprintln!("skipped: this machine has a usable GPU ({})", gpu.name);
        return;
    }

    // An explicit GPU that is not there: the pool does not start, and the
    // error says which device and what was missing.
    let (code, out) = switchyard_run_refused(&local_pool_config(&model, "device = \"cuda\"\n"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cuda:0") && out.contains("but"), "{out}");
    assert!(out.contains("cannot be loaded"), "{out}");
    assert!(!out.contains("panicked"), "{out}");

    // `auto` serves on the CPU and logs why.
    let sw = Switchyard::start(&local_pool_config(&model, "device = \"auto\"\n")).await;
    let line = sw
        .wait_for_log("device choice", |l| {
            l["fields"]["message"] == "executor runs on the CPU"
        })
        .await;
    let reason = line["fields"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("no usable GPU"), "{line}");
    let client = http1_client();
    let chat = greedy_chat("Hi", 2);
    let reply = post(&client, &sw.api_url(), "/v1/chat/completions", &chat).await;
    reply.assert_status(200);
}

#[tokio::test]
async fn metrics_describe_the_executor() {
    let Some(model) = model_file() else { return };
    let sw = Switchyard::start(&local_pool_config(&model, "")).await;
    let client = http1_client();
    let reply = send(
        client
            .post(format!("{}/v1/completions", sw.api_url()))
            .json(&json!({
                "model": "small", "prompt": "Hi", "max_tokens": 3, "temperature": 0,
            })),
    )
    .await;
    reply.assert_status(200);
    let text = metrics_text(&sw).await;
    for name in [
        "switchyard_executor_tokens_generated_total{pool=\"small\"}",
        "switchyard_executor_time_to_first_token_seconds_bucket",
        "switchyard_executor_tokens_per_second{pool=\"small\"}",
        "switchyard_executor_queue_depth{pool=\"small\"}",
        "switchyard_executor_running{pool=\"small\"}",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_local_generations_finish() {
    let Some(model) = model_file() else { return };
    let mut sw = Switchyard::start(&local_pool_config(&model, "max_batch = 1\n")).await;
    let client = http1_client();
    let url = sw.api_url();

    // One streaming and one queued behind it, both accepted before SIGTERM.
    let body = |stream: bool| {
        json!({
            "model": "small", "prompt": "Tell a story:", "max_tokens": 40,
            "temperature": 0, "stream": stream,
        })
    };
    let mut streaming = client
        .post(format!("{url}/v1/completions"))
        .json(&body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(streaming.status(), 200);
    let queued = {
        let (client, url, body) = (client.clone(), url.clone(), body(false));
        tokio::spawn(async move { post(&client, &url, "/v1/completions", &body).await })
    };
    let first = streaming.chunk().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    sw.terminate();

    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = streaming.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(
        sse_data(&text).last().map(String::as_str),
        Some("[DONE]"),
        "{text}"
    );
    let queued = queued.await.unwrap();
    queued.assert_status(200);
    assert_eq!(
        queued.json["usage"]["completion_tokens"], 40,
        "{}",
        queued.text
    );
    assert_eq!(sw.wait_exit(Duration::from_secs(30)).await, Some(0));
}
