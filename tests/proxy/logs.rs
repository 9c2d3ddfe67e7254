//! Logs: with `--log-format json` the proxy writes one INFO line per
//! request with the fields operators search on, and a start-up summary.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{
    chat_body, http1_client, pools_config, post, server_toml, small_pool_config,
    switchyard::{log_field, log_text},
    MockUpstream, Switchyard,
};

/// Whether `line` is the access-log line of a request to `path`.
fn is_access_line(line: &Value, path: &str) -> bool {
    log_text(line, "path").as_deref() == Some(path)
        && log_field(line, "latency_ms").is_some()
        && log_field(line, "status").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_logs_one_info_line_with_its_fields() {
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&small_pool_config(&mock)).await;
    let client = http1_client();

    let path = "/v1/chat/completions";
    for k in 0..3 {
        let body = chat_body("small", &format!("m{k}"));
        post(&client, &sw.api_url(), path, &body)
            .await
            .assert_status(200);
    }

    // Wait for the third line, then give a duplicate time to show up.
    let is_ours = |l: &Value| is_access_line(l, path);
    sw.wait_for_logs("the access lines", 3, is_ours).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines: Vec<Value> = sw.logs().into_iter().filter(is_ours).collect();
    assert_eq!(lines.len(), 3, "one access line per request: {lines:#?}");

    for line in &lines {
        assert_eq!(log_text(line, "level").as_deref(), Some("INFO"), "{line}");
        assert_eq!(log_text(line, "method").as_deref(), Some("POST"), "{line}");
        assert_eq!(log_text(line, "pool").as_deref(), Some("small"), "{line}");
        assert_eq!(log_text(line, "status").as_deref(), Some("200"), "{line}");
        let latency = log_text(line, "latency_ms").unwrap_or_default();
        assert!(
            latency.parse::<f64>().is_ok(),
            "latency_ms not a number: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_request_logs_its_batch_size() {
    let mock = MockUpstream::start().await;
    let config = format!(
        "{}\n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\nmodel = \"smollm2\"\n\
         [pool.batch]\nmax_batch = 8\nmax_wait_ms = 20\n",
        server_toml(),
        mock.url()
    );
    let sw = Switchyard::start(&config).await;

    let body = json!({"model": "small", "prompt": ["one", "two"]});
    post(&http1_client(), &sw.api_url(), "/v1/completions", &body)
        .await
        .assert_status(200);

    let line = sw
        .wait_for_log("the completions access line", |l| {
            is_access_line(l, "/v1/completions")
        })
        .await;
    assert_eq!(
        log_text(&line, "batch_size").as_deref(),
        Some("2"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_logs_the_pools() {
    let mock = MockUpstream::start().await;
    let config = pools_config(&[
        ("small", &mock.url(), "smollm2"),
        ("large", &mock.url(), "big"),
    ]);
    let sw = Switchyard::start(&config).await;

    let line = sw
        .wait_for_log("a start-up line with `pools`", |l| {
            log_field(l, "pools").is_some()
        })
        .await;
    let pools = log_text(&line, "pools").unwrap_or_default();
    assert!(
        pools.contains("small") && pools.contains("large"),
        "start-up line should list both pools: {line}"
    );
}
