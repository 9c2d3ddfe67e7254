//! Upstream resilience: upstreams that refuse, reset, stall or answer
//! garbage; retries of requests that never reached an upstream, within
//! the retry budget; outlier ejection; the circuit breaker; active health
//! checks; and streams cut mid-way, which are never retried.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::mock_upstream::FAULT_BREAK_STREAM;
use crate::support::raw_upstream::{Fault, RawUpstream};
use crate::support::switchyard::{log_message, log_text};
use crate::support::tls::{server_config, TempDir, TestCa};
use crate::support::{
    chat_body, closed_port_url, http1_client, metrics_text, post, server_toml, wait_for_metric,
    MockUpstream, Reply, Switchyard,
};

/// The pool every test here routes to.
const POOL: &str = "p";

/// A bound on answers that must come fast: far above the timeouts under
/// test, far below the pools' 10 s request timeout.
const FAST: Duration = Duration::from_secs(3);

/// A config with pool `p` on `endpoints`, plus `extra` TOML lines after
/// the pool's keys (its own sub-tables included).
fn pool_config(endpoints: &[String], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|url| format!("\"{url}\"")).collect();
    format!(
        "{}\n[[pool]]\nname = \"{POOL}\"\nendpoints = [{}]\nmodel = \"m\"\n\
         connect_timeout_ms = 1000\nrequest_timeout_ms = 10000\n{extra}",
        server_toml(),
        list.join(", ")
    )
}

async fn chat(sw: &Switchyard, content: &str) -> Reply {
    post(
        &http1_client(),
        &sw.api_url(),
        "/v1/chat/completions",
        &chat_body(POOL, content),
    )
    .await
}

/// The value of the one sample of `name` whose line holds every `part`;
/// `None` when there is none.
async fn metric_value(sw: &Switchyard, name: &str, parts: &[&str]) -> Option<f64> {
    let text = metrics_text(sw).await;
    crate::support::metric_lines(&text, name)
        .into_iter()
        .find(|line| parts.iter().all(|part| line.contains(part)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Polls until the endpoint-health gauge of `url` reads `want`.
async fn wait_for_health(sw: &Switchyard, url: &str, want: f64) {
    let endpoint = format!("endpoint=\"{url}\"");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = metric_value(sw, "switchyard_upstream_endpoint_healthy", &[&endpoint]).await;
        if value == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} health gauge is {value:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn error_code(reply: &Reply) -> &str {
    reply.json["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_endpoint_is_retried_on_the_healthy_one() {
    let mock = MockUpstream::start().await;
    let config = pool_config(&[closed_port_url(), mock.url()], "");
    let sw = Switchyard::start(&config).await;

    // Turns alternate, so half the requests try the closed port first.
    for i in 0..4 {
        chat(&sw, &format!("hello {i}")).await.assert_status(200);
    }

    assert_eq!(mock.requests_to("/v1/chat/completions").len(), 4);
    let retried = ["pool=\"p\"", "reason=\"connect\""];
    wait_for_metric(&sw, "switchyard_upstream_retries_total", &retried).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_h2_stream_is_retried_on_the_next_endpoint() {
    let ca = TestCa::new("resilience-ca");
    let dir = TempDir::new();
    let ca_path = dir.write("upstream-ca.pem", &ca.cert_pem);
    let alpn = ["h2", "http/1.1"];
    let refusing = RawUpstream::start_refusing_h2(server_config(&ca.server_cert(), &alpn)).await;
    let mock = MockUpstream::start_tls(server_config(&ca.server_cert(), &alpn)).await;
    let tls = format!("[pool.tls]\nca_path = {ca_path:?}\n");
    let sw = Switchyard::start(&pool_config(&[refusing.url(), mock.url()], &tls)).await;

    // The first turn is the refusing server, which processed nothing.
    chat(&sw, "refused first").await.assert_status(200);
    assert_eq!(refusing.connections(), 1);
    assert_eq!(mock.requests_to("/v1/chat/completions").len(), 1);
    let retried = ["pool=\"p\"", "reason=\"refused_stream\""];
    wait_for_metric(&sw, "switchyard_upstream_retries_total", &retried).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_resets_gets_502_and_is_not_retried() {
    let reset = RawUpstream::start(Fault::Reset).await;
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&pool_config(&[reset.url(), mock.url()], "")).await;

    // The first turn goes to the resetting endpoint, which had the
    // request: sending it again could generate twice.
    let reply = chat(&sw, "reset me").await;
    let message = reply.assert_openai_error(502);
    assert_eq!(error_code(&reply), "upstream_unavailable", "{message}");
    assert!(message.contains(&reset.url()), "{message}");
    assert_eq!(reset.connections(), 1);
    assert_eq!(
        mock.request_count(),
        0,
        "a request that was sent is not retried"
    );

    // The next turn is the healthy endpoint.
    chat(&sw, "fine").await.assert_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_gets_504_after_the_try_timeout() {
    let stall = RawUpstream::start(Fault::Stall).await;
    let sw = Switchyard::start(&pool_config(&[stall.url()], "try_timeout_ms = 300\n")).await;

    let started = Instant::now();
    let reply = chat(&sw, "anyone there?").await;
    let message = reply.assert_openai_error(504);
    assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
    assert_eq!(error_code(&reply), "upstream_timeout");
    assert!(message.contains("pool.try_timeout_ms"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_timeout_bounds_every_try() {
    let stall = RawUpstream::start(Fault::Stall).await;
    let extra = "try_timeout_ms = 8000\ntotal_timeout_ms = 300\n";
    let sw = Switchyard::start(&pool_config(&[stall.url()], extra)).await;

    let started = Instant::now();
    let reply = chat(&sw, "anyone there?").await;
    let message = reply.assert_openai_error(504);
    assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
    assert!(message.contains("pool.total_timeout_ms"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_garbage_gets_502() {
    let garbage = RawUpstream::start(Fault::Garbage).await;
    let sw = Switchyard::start(&pool_config(&[garbage.url()], "")).await;

    let reply = chat(&sw, "say something").await;
    let message = reply.assert_openai_error(502);
    assert_eq!(error_code(&reply), "upstream_invalid_response", "{message}");
    assert!(message.contains("not HTTP"), "{message}");
    assert!(message.contains(&garbage.url()), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_answer_that_is_not_json_gets_502() {
    let invalid = RawUpstream::start(Fault::InvalidJson).await;
    let extra = "[pool.batch]\nmode = \"fixed\"\nmax_wait_ms = 5\n";
    let sw = Switchyard::start(&pool_config(&[invalid.url()], extra)).await;

    let body = json!({"model": POOL, "prompt": "hello"});
    let reply = post(&http1_client(), &sw.api_url(), "/v1/completions", &body).await;
    let message = reply.assert_openai_error(502);
    assert_eq!(error_code(&reply), "upstream_invalid_response", "{message}");
    assert!(message.contains("not a JSON object"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_is_ejected_after_failures_in_a_row() {
    let bad = MockUpstream::start().await;
    bad.fail_with(Some(500));
    let good = MockUpstream::start().await;
    let extra = "[pool.outlier]\nconsecutive_failures = 2\nejection_ms = 60000\n";
    let sw = Switchyard::start(&pool_config(&[bad.url(), good.url()], extra)).await;

    // The upstream's 500s pass through (they are answers, not retried);
    // after the second, the bad endpoint gets no more turns.
    let mut statuses = Vec::new();
    for i in 0..8 {
        statuses.push(chat(&sw, &format!("try {i}")).await.status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(bad.requests_to("/v1/chat/completions").len(), 2);
    assert_eq!(good.requests_to("/v1/chat/completions").len(), 6);

    let bad_endpoint = format!("endpoint=\"{}\"", bad.url());
    let ejected = ["pool=\"p\"", bad_endpoint.as_str()];
    wait_for_metric(&sw, "switchyard_upstream_ejections_total", &ejected).await;
    wait_for_health(&sw, &bad.url(), 0.0).await;
    let line = sw
        .wait_for_log("the ejection line", |l| {
            log_message(l) == Some("upstream endpoint ejected")
        })
        .await;
    assert_eq!(log_text(&line, "upstream"), Some(bad.url()), "{line}");
    assert_eq!(log_text(&line, "level").as_deref(), Some("WARN"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_answers_503_fast_and_closes_after_recovery() {
    let mock = MockUpstream::start().await;
    let extra = "[pool.outlier]\nconsecutive_failures = 0\n\
                 [pool.circuit]\nmin_requests = 3\nfailure_percent = 50\n\
                 open_ms = 1000\nhalf_open_requests = 1\n";
    let sw = Switchyard::start(&pool_config(&[mock.url()], extra)).await;

    mock.fail_with(Some(503));
    for i in 0..3 {
        chat(&sw, &format!("fail {i}")).await.assert_status(503);
    }
    mock.fail_with(None);

    // Open: refused at once, without a try upstream.
    let started = Instant::now();
    let reply = chat(&sw, "too soon").await;
    let message = reply.assert_openai_error(503);
    assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
    assert_eq!(error_code(&reply), "upstream_unavailable", "{message}");
    assert!(message.contains("circuit breaker open"), "{message}");
    assert_eq!(
        reply.header("retry-after"),
        Some("1"),
        "{:?}",
        reply.headers
    );
    assert_eq!(mock.request_count(), 3, "an open circuit sends nothing");
    let state = ["pool=\"p\""];
    let open = wait_for_metric(&sw, "switchyard_upstream_circuit_state", &state).await;
    assert!(open.ends_with(" 2"), "{open}");

    // After open_ms, one probe goes; its success closes the circuit.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    chat(&sw, "probe").await.assert_status(200);
    chat(&sw, "closed again").await.assert_status(200);
    let closed = metric_value(&sw, "switchyard_upstream_circuit_state", &state).await;
    assert_eq!(closed, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_mark_an_endpoint_down_and_up_again() {
    let flaky = MockUpstream::start().await;
    let steady = MockUpstream::start().await;
    let extra = "[pool.health]\ninterval_ms = 100\ntimeout_ms = 500\n\
                 unhealthy_threshold = 2\nhealthy_threshold = 1\n";
    let sw = Switchyard::start(&pool_config(&[flaky.url(), steady.url()], extra)).await;

    flaky.fail_with(Some(503));
    wait_for_health(&sw, &flaky.url(), 0.0).await;
    assert!(
        !flaky.requests_to("/v1/models").is_empty(),
        "checks hit GET /v1/models"
    );
    for i in 0..4 {
        chat(&sw, &format!("while down {i}"))
            .await
            .assert_status(200);
    }
    assert_eq!(
        flaky.requests_to("/v1/chat/completions").len(),
        0,
        "an endpoint marked down gets no requests"
    );

    flaky.fail_with(None);
    wait_for_health(&sw, &flaky.url(), 1.0).await;
    for i in 0..4 {
        chat(&sw, &format!("back up {i}")).await.assert_status(200);
    }
    assert_eq!(flaky.requests_to("/v1/chat/completions").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_retry_budget_stops_retries() {
    let mock = MockUpstream::start().await;
    let extra = "[pool.retry]\nbudget_percent = 0\nmin_retries_per_s = 0\n";
    let sw = Switchyard::start(&pool_config(&[closed_port_url(), mock.url()], extra)).await;

    // The first turn is the closed port; with no budget it is not retried.
    let reply = chat(&sw, "no budget").await;
    reply.assert_openai_error(502);
    assert_eq!(error_code(&reply), "upstream_unavailable");
    assert_eq!(mock.request_count(), 0);
    let denied = ["pool=\"p\"", "reason=\"budget\""];
    wait_for_metric(&sw, "switchyard_upstream_retries_denied_total", &denied).await;
    let retries = metric_value(&sw, "switchyard_upstream_retries_total", &["pool=\"p\""]).await;
    assert_eq!(retries, None, "no retry was counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_way_is_not_retried() {
    let first = MockUpstream::start().await;
    let second = MockUpstream::start().await;
    let sw = Switchyard::start(&pool_config(&[first.url(), second.url()], "")).await;

    let body = json!({
        "model": POOL,
        "prompt": format!("one two three four five six {FAULT_BREAK_STREAM}"),
        "stream": true,
    });
    let mut response = http1_client()
        .post(format!("{}/v1/completions", sw.api_url()))
        .json(&body)
        .send()
        .await
        .expect("send the stream");
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }

    assert!(text.contains("data: "), "some events arrived: {text:?}");
    assert!(
        !text.contains("[DONE]"),
        "the stream must not look whole: {text:?}"
    );
    let sent =
        first.requests_to("/v1/completions").len() + second.requests_to("/v1/completions").len();
    assert_eq!(sent, 1, "a stream is never sent twice");
    let retries = metric_value(&sw, "switchyard_upstream_retries_total", &[]).await;
    assert_eq!(retries, None);
}
