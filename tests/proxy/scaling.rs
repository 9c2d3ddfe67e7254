//! Scale to zero: a pool whose model server (`tests/support/scaled_server.py`,
//! run by the `process` scaler) starts on the first request, holds a
//! burst while it starts and starts it once, sends requests that cannot
//! wait to the fallback pool, stops after the idle timeout but not under
//! traffic or a long stream, and starts again after the server dies.
//!
//! Needs `python3` on PATH; without it each test is skipped with a note.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    chat_body, http1_client, metric_lines, metrics_text, post, post_chat, send, server_toml,
    workspace_root, MockUpstream, Reply, Switchyard,
};

const SKIP_NOTE: &str = "skipping scale-to-zero test: python3 is not on PATH";

/// A scaled pool's server as a test sees it: the port it listens on and
/// the file each start appends its pid to.
struct ScaledServer {
    port: u16,
    starts_file: PathBuf,
}

impl ScaledServer {
    /// A free loopback port and a fresh starts file, or `None` (with a
    /// note) when python3 is missing.
    fn new(tag: &str) -> Option<Self> {
        let python = std::process::Command::new("python3")
            .arg("--version")
            .output();
        if !python.is_ok_and(|out| out.status.success()) {
            eprintln!("{SKIP_NOTE}");
            return None;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let starts_file = std::env::temp_dir().join(format!(
            "switchyard-scaled-{tag}-{}-{port}.starts",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&starts_file);
        Some(Self { port, starts_file })
    }

    /// The `[[pool]]` table of pool `big` on this server, with a
    /// `[pool.scaler]` of `ready_delay_s` and the extra `scaler` keys.
    fn pool_toml(&self, ready_delay_s: f64, pool_extra: &str, scaler_extra: &str) -> String {
        self.pool_toml_args(ready_delay_s, &[], pool_extra, scaler_extra)
    }

    /// Switchyard serving pool `big` alone, as [`ScaledServer::pool_toml`]
    /// describes it.
    async fn alone(&self, ready_delay_s: f64, pool_extra: &str, scaler_extra: &str) -> Switchyard {
        let pool = self.pool_toml(ready_delay_s, pool_extra, scaler_extra);
        Switchyard::start(&format!("{}{pool}", server_toml())).await
    }

    /// [`ScaledServer::pool_toml`] with `server_args` added to the
    /// server's command line.
    fn pool_toml_args(
        &self,
        ready_delay_s: f64,
        server_args: &[&str],
        pool_extra: &str,
        scaler_extra: &str,
    ) -> String {
        let script = workspace_root().join("tests/support/scaled_server.py");
        let args: String = server_args.iter().map(|a| format!(", \"{a}\"")).collect();
        format!(
            "\n[[pool]]\nname = \"big\"\nendpoints = [\"http://127.0.0.1:{port}\"]\n\
             request_timeout_ms = 20000\n{pool_extra}\n\
             [pool.scaler]\n\
             command = [\"python3\", \"{script}\", \"--port\", \"{port}\", \
             \"--ready-delay-s\", \"{ready_delay_s}\", \"--starts-file\", \"{starts}\", \
             \"--stream-s\", \"6\"{args}]\n\
             ready_timeout_s = 20\nprobe_interval_ms = 100\nstop_grace_s = 3\n{scaler_extra}\n",
            port = self.port,
            script = script.display(),
            starts = self.starts_file.display(),
        )
    }

    /// The lines the server wrote to its starts file.
    fn lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.starts_file).unwrap_or_default();
        text.lines().map(str::to_string).collect()
    }

    /// The pid of the server's first start, waiting up to `within` for
    /// it (python takes a while to start on a loaded machine).
    async fn first_pid(&self, within: Duration) -> u32 {
        let end = Instant::now() + within;
        loop {
            if let Some(pid) = self.starts().first() {
                return *pid;
            }
            assert!(
                Instant::now() < end,
                "the server did not start within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The pids of the server's starts so far, in order.
    fn starts(&self) -> Vec<u32> {
        std::fs::read_to_string(&self.starts_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }
}

impl Drop for ScaledServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.starts_file);
    }
}

/// Whether process `pid` still exists (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    !status.is_empty() && !status.contains("State:\tZ")
}

/// Waits up to `within` for process `pid` to be gone; fails saying
/// `what` outlived it.
async fn wait_gone(pid: u32, within: Duration, what: &str) {
    let end = Instant::now() + within;
    while alive(pid) {
        assert!(Instant::now() < end, "server {pid} outlived {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pool `big`'s entry in `GET /admin/pools`.
async fn pool_report(sw: &Switchyard) -> Value {
    let reply = send(http1_client().get(format!("{}/admin/pools", sw.admin_url()))).await;
    reply.assert_status(200);
    let pools = reply.json["pools"].as_array().cloned().unwrap_or_default();
    pools
        .into_iter()
        .find(|p| p["name"] == "big")
        .unwrap_or_else(|| panic!("no pool big in /admin/pools: {}", reply.text))
}

/// Polls `/admin/pools` until pool `big` is in `state`, for up to
/// `within`; fails showing the last report.
async fn wait_for_state(sw: &Switchyard, state: &str, within: Duration) -> Value {
    let end = Instant::now() + within;
    loop {
        let report = pool_report(sw).await;
        if report["state"] == state {
            return report;
        }
        assert!(
            Instant::now() < end,
            "pool big not {state} within {within:?}: {report}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops Switchyard with SIGTERM, so that it stops its children, and
/// checks that it exits cleanly.
async fn stop(mut sw: Switchyard) {
    sw.terminate();
    let exit = sw.wait_exit(Duration::from_secs(15)).await;
    if exit != Some(0) {
        for line in sw.logs().iter().rev().take(30).rev() {
            eprintln!("{line}");
        }
    }
    assert_eq!(
        exit,
        Some(0),
        "exit after SIGTERM; its last log lines above"
    );
}

/// The 99th percentile of `samples`, in milliseconds.
fn p99_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    let rank = (samples.len() * 99).div_ceil(100).saturating_sub(1);
    samples[rank].as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_against_a_cold_pool_starts_one_server_and_all_succeed() {
    let Some(server) = ScaledServer::new("burst") else {
        return;
    };
    let sw = server.alone(1.0, "", "").await;
    assert_eq!(pool_report(&sw).await["state"], "cold");
    assert!(server.starts().is_empty(), "started before any request");

    // A burst of 100 at a cold pool: one start, every request answered.
    let client = http1_client();
    let url = sw.api_url();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let body = chat_body("big", &format!("burst {i}"));
            let started = Instant::now();
            let reply = post(&client, &url, "/v1/chat/completions", &body).await;
            (reply, started.elapsed())
        }));
    }
    let mut held = Vec::new();
    for task in tasks {
        let (reply, took) = task.await.unwrap();
        reply.assert_status(200);
        assert_eq!(reply.pool(), "big");
        held.push(took);
    }
    assert_eq!(server.starts().len(), 1, "a burst must start one server");

    let report = pool_report(&sw).await;
    assert_eq!(report["state"], "ready");
    assert_eq!(report["desired_replicas"], 1);
    assert_eq!(report["cold_starts"], 1);
    assert!(
        report["last_cold_start_s"].as_f64().unwrap() > 0.5,
        "{report}"
    );
    let metrics = metrics_text(&sw).await;
    let starts = metric_lines(&metrics, "switchyard_pool_cold_starts_total");
    assert!(starts.iter().any(|l| l.ends_with(" 1")), "{starts:?}");
    let state = metric_lines(&metrics, "switchyard_pool_state");
    assert!(
        state
            .iter()
            .any(|l| l.contains("state=\"ready\"") && l.ends_with(" 1")),
        "{state:?}"
    );
    eprintln!(
        "cold pool, held until ready (burst of 100, 1 s start): p99 time to first byte {:.0} ms",
        p99_ms(&mut held)
    );
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_cannot_wait_is_served_by_the_fallback() {
    let Some(server) = ScaledServer::new("fallback") else {
        return;
    };
    let mock = MockUpstream::start().await;
    let config = format!(
        "{}{}\n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\n",
        server_toml(),
        server.pool_toml(3.0, "fallback = \"small\"", "cold_start_estimate_s = 4"),
        mock.url()
    );
    let sw = Switchyard::start(&config).await;
    let client = http1_client();
    let url = format!("{}/v1/chat/completions", sw.api_url());

    // Short deadlines first: they go to the fallback at once, and the
    // first of them starts the pool. Then long deadlines wait for it.
    let send_one = |deadline_ms: u64| {
        let request = client
            .post(&url)
            .header("x-switchyard-deadline-ms", deadline_ms.to_string())
            .json(&chat_body("big", "hello"));
        async move {
            let started = Instant::now();
            let reply = send(request).await;
            (reply, started.elapsed())
        }
    };
    let short: Vec<_> = (0..20).map(|_| tokio::spawn(send_one(1000))).collect();
    let long: Vec<_> = (0..20).map(|_| tokio::spawn(send_one(30_000))).collect();

    let mut fallback_ttfb = Vec::new();
    for task in short {
        let (reply, took) = task.await.unwrap();
        reply.assert_status(200);
        assert_eq!(reply.header("x-switchyard-served-by"), Some("fallback"));
        assert_eq!(reply.pool(), "small");
        fallback_ttfb.push(took);
    }
    let mut held_ttfb = Vec::new();
    for task in long {
        let (reply, took) = task.await.unwrap();
        reply.assert_status(200);
        assert_eq!(reply.header("x-switchyard-served-by"), None);
        assert_eq!(reply.pool(), "big");
        held_ttfb.push(took);
    }
    let fallback_p99 = p99_ms(&mut fallback_ttfb);
    let held_p99 = p99_ms(&mut held_ttfb);
    eprintln!(
        "cold pool (3 s start), p99 time to first byte: {fallback_p99:.0} ms with the fallback \
         (1 s deadline), {held_p99:.0} ms held until ready (30 s deadline)"
    );
    assert!(fallback_p99 < 3000.0, "fallback took {fallback_p99:.0} ms");
    assert!(
        fallback_p99 < held_p99,
        "the fallback answered after the held requests"
    );
    assert_eq!(server.starts().len(), 1);
    assert_eq!(mock.request_count(), 20);
    let metrics = metrics_text(&sw).await;
    let fallbacks = metric_lines(&metrics, "switchyard_pool_fallbacks_total");
    assert!(
        fallbacks.iter().any(|l| l.ends_with(" 20")),
        "{fallbacks:?}"
    );
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_fallback_a_request_that_cannot_wait_gets_503() {
    let Some(server) = ScaledServer::new("nofallback") else {
        return;
    };
    let sw = server.alone(0.5, "", "cold_start_estimate_s = 5").await;
    let request = http1_client()
        .post(format!("{}/v1/chat/completions", sw.api_url()))
        .header("x-switchyard-deadline-ms", "100")
        .json(&chat_body("big", "hello"));
    let reply = send(request).await;
    let message = reply.assert_openai_error(503);
    assert!(message.contains("pool.fallback"), "{message}");
    assert_eq!(reply.json["error"]["code"], "pool_cold");
    assert!(reply.header("retry-after").is_some(), "{:?}", reply.headers);

    // It still started the pool, so the next request finds it up.
    wait_for_state(&sw, "ready", Duration::from_secs(15)).await;
    let body = chat_body("big", "again");
    post_chat(&sw, &body).await.assert_status(200);
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_timeout_stops_the_server_but_traffic_keeps_it_up() {
    let Some(server) = ScaledServer::new("idle") else {
        return;
    };
    let scaler = "idle_timeout_s = 2\nmin_up_s = 0";
    let sw = server.alone(0.3, "", scaler).await;
    let client = http1_client();
    let url = sw.api_url();
    let body = chat_body("big", "hello");

    // A request every 0.5 s for 4 s, twice the idle timeout: one start,
    // the pool never leaves ready.
    for _ in 0..8 {
        post(&client, &url, "/v1/chat/completions", &body)
            .await
            .assert_status(200);
        assert_eq!(pool_report(&sw).await["state"], "ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let starts = server.starts();
    assert_eq!(starts.len(), 1, "traffic must keep the server up");
    assert!(alive(starts[0]));

    // Then quiet: back to cold, the process gone.
    let report = wait_for_state(&sw, "cold", Duration::from_secs(15)).await;
    assert_eq!(report["desired_replicas"], 0);
    wait_gone(starts[0], Duration::from_secs(5), "its idle stop").await;
    let logs = sw.logs();
    let drained = logs.iter().any(|line| {
        line["fields"]["to"] == "draining"
            && line["fields"]["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("idle for"))
    });
    assert!(drained, "no idle transition logged");
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_stream_outlives_a_shorter_idle_timeout() {
    let Some(server) = ScaledServer::new("stream") else {
        return;
    };
    let scaler = "idle_timeout_s = 2\nmin_up_s = 0";
    let sw = server.alone(0.3, "", scaler).await;

    // The server streams for 6 s; the idle timeout is 2 s.
    let mut body = chat_body("big", "tell me a long story");
    body["stream"] = json!(true);
    let reply = post_chat(&sw, &body).await;
    reply.assert_status(200);
    assert!(
        reply.text.trim_end().ends_with("data: [DONE]"),
        "the stream was cut: {}",
        reply.text
    );
    assert!(reply.text.matches("data: ").count() > 10, "{}", reply.text);

    // Idle time counts from the stream's end: still up right after it.
    assert_eq!(pool_report(&sw).await["state"], "ready");
    assert_eq!(server.starts().len(), 1);
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_that_dies_is_started_again_by_the_next_request() {
    let Some(server) = ScaledServer::new("dies") else {
        return;
    };
    let sw = server.alone(0.3, "", "").await;
    let client = http1_client();
    let url = sw.api_url();
    let body = chat_body("big", "hello");
    post(&client, &url, "/v1/chat/completions", &body)
        .await
        .assert_status(200);
    let first = server.first_pid(Duration::from_secs(10)).await;

    // The server crashes: the pool goes cold, with the exit logged.
    let status = std::process::Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for_state(&sw, "cold", Duration::from_secs(10)).await;
    sw.wait_for_log("server exit", |line| {
        line["fields"]["message"] == "the pool's server exited"
    })
    .await;

    // The next request starts it again.
    post(&client, &url, "/v1/chat/completions", &body)
        .await
        .assert_status(200);
    let starts = server.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_ne!(starts[0], starts[1]);
    assert_eq!(pool_report(&sw).await["cold_starts"], 2);

    // Shutdown stops the child.
    stop(sw).await;
    wait_gone(starts[1], Duration::from_secs(5), "switchyard").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_keeps_an_unchanged_scaled_pool_and_stops_a_removed_one() {
    let Some(server) = ScaledServer::new("reload") else {
        return;
    };
    let mock = MockUpstream::start().await;
    let big = server.pool_toml(0.3, "", "");
    let small = format!(
        "\n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\n",
        mock.url()
    );
    let sw = Switchyard::start(&format!("{}{big}", server_toml())).await;
    let body = chat_body("big", "hello");
    post_chat(&sw, &body).await.assert_status(200);
    let pid = server.first_pid(Duration::from_secs(10)).await;

    // Another pool added: the scaled pool is taken over running.
    sw.rewrite_config(&format!("{}{big}{small}", server_toml()));
    sw.hangup();
    let reloaded = |l: &Value| {
        l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("configuration reloaded"))
    };
    sw.wait_for_logs("first reload", 1, reloaded).await;
    assert_eq!(pool_report(&sw).await["state"], "ready");
    post_chat(&sw, &body).await.assert_status(200);
    assert_eq!(server.starts(), vec![pid], "the server was restarted");

    // The scaled pool removed: its server is stopped.
    sw.rewrite_config(&format!("{}{small}", server_toml()));
    sw.hangup();
    sw.wait_for_logs("second reload", 2, reloaded).await;
    wait_gone(pid, Duration::from_secs(10), "its pool").await;
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_max_held_a_cold_pool_answers_503_with_retry_after() {
    let Some(server) = ScaledServer::new("maxheld") else {
        return;
    };
    let sw = server.alone(3.0, "", "max_held = 3").await;
    let client = http1_client();
    let url = sw.api_url();
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            let body = chat_body("big", &format!("held {i}"));
            tokio::spawn(async move { post(&client, &url, "/v1/chat/completions", &body).await })
        })
        .collect();

    // Three are held and served; the rest, arriving while it starts, are
    // turned away (those that arrive once it is up are served).
    let (mut served, mut refused) = (0, 0);
    for task in tasks {
        let reply = task.await.unwrap();
        if reply.status == 200 {
            served += 1;
            continue;
        }
        let message = reply.assert_openai_error(503);
        assert!(message.contains("max_held"), "{message}");
        assert_eq!(reply.json["error"]["code"], "pool_cold");
        assert!(reply.header("retry-after").is_some(), "{:?}", reply.headers);
        refused += 1;
    }
    assert!(served >= 3, "{served} served");
    assert!(refused >= 1, "none refused past max_held");
    assert_eq!(server.starts().len(), 1);
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_start_sends_held_requests_to_the_fallback() {
    let Some(server) = ScaledServer::new("fails") else {
        return;
    };
    let mock = MockUpstream::start().await;
    let config = format!(
        "{}\n[[pool]]\nname = \"big\"\nendpoints = [\"http://127.0.0.1:{}\"]\n\
         fallback = \"small\"\n[pool.scaler]\n\
         command = [\"python3\", \"-c\", \"import sys; sys.exit(3)\"]\n\
         probe_interval_ms = 100\n\
         \n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\n",
        server_toml(),
        server.port,
        mock.url()
    );
    let sw = Switchyard::start(&config).await;

    // No deadline: held, then sent on when the server exits at start.
    let body = chat_body("big", "hello");
    let reply = post_chat(&sw, &body).await;
    reply.assert_status(200);
    assert_eq!(reply.header("x-switchyard-served-by"), Some("fallback"));
    assert_eq!(reply.pool(), "small");
    sw.wait_for_log("the exit status", |line| {
        line["fields"]["message"] == "the pool's server exited"
            && line["fields"]["status"]
                .as_str()
                .is_some_and(|s| s.contains('3'))
    })
    .await;
    let report = pool_report(&sw).await;
    assert_eq!(report["state"], "cold");
    assert_eq!(report["failed_starts"], 1);
    stop(sw).await;
}

/// One call a [`WebhookReceiver`] got.
#[derive(Debug, Clone)]
struct WebhookCall {
    method: String,
    path: String,
    authorization: Option<String>,
    content_type: Option<String>,
    tenant: Option<String>,
    body: Value,
}

/// A scaler webhook (or Kubernetes API server) on loopback that records
/// each call and answers 503 to the first `failures` of them, 200 after;
/// a call to a `/scale` path gets the Scale object an API server would
/// answer.
struct WebhookReceiver {
    addr: std::net::SocketAddr,
    calls: std::sync::Arc<std::sync::Mutex<Vec<WebhookCall>>>,
}

impl WebhookReceiver {
    async fn start(failures: usize) -> Self {
        use http_body_util::BodyExt;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = std::sync::Arc::clone(&calls);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let recorded = std::sync::Arc::clone(&recorded);
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let recorded = std::sync::Arc::clone(&recorded);
                        async move {
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_string)
                            };
                            let mut call = WebhookCall {
                                method: req.method().to_string(),
                                path: req.uri().path().to_string(),
                                authorization: header("authorization"),
                                content_type: header("content-type"),
                                tenant: header("x-tenant"),
                                body: Value::Null,
                            };
                            let bytes = req.into_body().collect().await?.to_bytes();
                            call.body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                            let answer = if call.path.ends_with("/scale") {
                                json!({
                                    "apiVersion": "autoscaling/v1",
                                    "kind": "Scale",
                                    "metadata": { "name": "vllm", "namespace": "models" },
                                    "spec": call.body["spec"],
                                    "status": { "replicas": 0 },
                                })
                            } else {
                                json!({})
                            };
                            let status = {
                                let mut calls = recorded.lock().unwrap();
                                calls.push(call);
                                if calls.len() <= failures {
                                    503
                                } else {
                                    200
                                }
                            };
                            let answer = bytes::Bytes::from(answer.to_string());
                            let body = http_body_util::Full::new(answer);
                            let mut response = hyper::Response::new(body);
                            *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, hyper::Error>(response)
                        }
                    },
                );
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Self { addr, calls }
    }

    fn calls(&self) -> Vec<WebhookCall> {
        self.calls.lock().unwrap().clone()
    }

    /// Waits until `n` calls came, for up to `within`.
    async fn wait_calls(&self, n: usize, within: Duration) -> Vec<WebhookCall> {
        let end = Instant::now() + within;
        loop {
            let calls = self.calls();
            if calls.len() >= n {
                return calls;
            }
            assert!(
                Instant::now() < end,
                "{n} webhook calls not made within {within:?}: {calls:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_scaler_asks_for_one_replica_on_demand_and_zero_when_idle() {
    // The first call fails: it is retried, and the retry is logged.
    let hook = WebhookReceiver::start(1).await;
    let upstream = MockUpstream::start().await;
    let config = format!(
        "{}\n[[pool]]\nname = \"big\"\nendpoints = [\"{}\"]\n\
         [pool.scaler]\nkind = \"webhook\"\nurl = \"http://{}/hooks/scale\"\n\
         token_env = \"SWITCHYARD_TEST_SCALER_TOKEN\"\n\
         headers = {{ x-tenant = \"team-a\" }}\n\
         idle_timeout_s = 1\nmin_up_s = 0\nready_timeout_s = 20\nprobe_interval_ms = 100\n",
        server_toml(),
        upstream.url(),
        hook.addr,
    );
    let env = [("SWITCHYARD_TEST_SCALER_TOKEN", "s3cret")];
    let sw = Switchyard::start_with_env(&config, &env).await;
    assert_eq!(pool_report(&sw).await["state"], "cold");
    assert_eq!(pool_report(&sw).await["scaler"], "webhook");
    assert!(hook.calls().is_empty(), "called before any request");

    // A cold request: replicas 1 (failed once, then retried), then ready.
    post_chat(&sw, &chat_body("big", "hi"))
        .await
        .assert_status(200);
    let calls = hook.calls();
    assert_eq!(calls.len(), 2, "one failed call and its retry: {calls:?}");
    for call in &calls {
        assert_eq!(call.method, "POST");
        assert_eq!(call.path, "/hooks/scale");
        assert_eq!(call.authorization.as_deref(), Some("Bearer s3cret"));
        assert_eq!(call.tenant.as_deref(), Some("team-a"));
        assert_eq!(call.body["pool"], "big");
        assert_eq!(call.body["replicas"], 1);
        assert!(call.body["reason"].is_string(), "{:?}", call.body);
    }
    let retried = sw.logs().iter().any(|line| {
        line["fields"]["message"] == "scale call failed; retrying"
            && line["fields"]["replicas"] == 1
    });
    assert!(retried, "the failed call was not logged");

    // Quiet past the idle timeout: replicas 0, and the pool is cold.
    let calls = hook.wait_calls(3, Duration::from_secs(15)).await;
    assert_eq!(calls[2].body["replicas"], 0);
    assert_eq!(calls[2].body["pool"], "big");
    let report = wait_for_state(&sw, "cold", Duration::from_secs(15)).await;
    assert_eq!(report["desired_replicas"], 0);
    assert_eq!(report["cold_starts"], 1);
    assert_eq!(hook.calls().len(), 3, "one call per change");
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_none_pool_goes_cold_and_wants_zero_replicas() {
    // The server stays up throughout: with kind = "none" something else
    // (KEDA reading desired replicas) would scale it.
    let upstream = MockUpstream::start().await;
    let config = format!(
        "{}\n[[pool]]\nname = \"big\"\nendpoints = [\"{}\"]\n\
         [pool.scaler]\nkind = \"none\"\n\
         idle_timeout_s = 1\nmin_up_s = 0\nready_timeout_s = 20\nprobe_interval_ms = 100\n",
        server_toml(),
        upstream.url(),
    );
    let sw = Switchyard::start(&config).await;
    let body = chat_body("big", "hi");
    post_chat(&sw, &body).await.assert_status(200);
    assert_eq!(pool_report(&sw).await["desired_replicas"], 1);

    // Idle: cold, wanting 0; the next request finds it again.
    let report = wait_for_state(&sw, "cold", Duration::from_secs(15)).await;
    assert_eq!(report["desired_replicas"], 0);
    post_chat(&sw, &body).await.assert_status(200);
    assert_eq!(pool_report(&sw).await["cold_starts"], 2);
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_scaler_patches_the_deployments_scale_subresource() {
    // A stand-in API server on loopback; the first call fails, as a
    // restarting API server would.
    let api = WebhookReceiver::start(1).await;
    let upstream = MockUpstream::start().await;
    let config = format!(
        "{}\n[[pool]]\nname = \"big\"\nendpoints = [\"{}\"]\n\
         [pool.scaler]\nkind = \"kubernetes\"\napi_url = \"http://{}\"\n\
         namespace = \"models\"\ndeployment = \"vllm\"\n\
         token_env = \"SWITCHYARD_TEST_KUBE_TOKEN\"\n\
         idle_timeout_s = 1\nmin_up_s = 0\nready_timeout_s = 20\nprobe_interval_ms = 100\n",
        server_toml(),
        upstream.url(),
        api.addr,
    );
    let env = [("SWITCHYARD_TEST_KUBE_TOKEN", "kube-t0ken")];
    let sw = Switchyard::start_with_env(&config, &env).await;
    assert_eq!(pool_report(&sw).await["scaler"], "kubernetes");

    // A cold request: replicas 1 on the scale subresource.
    post_chat(&sw, &chat_body("big", "hi"))
        .await
        .assert_status(200);
    let calls = api.calls();
    assert_eq!(calls.len(), 2, "one failed call and its retry: {calls:?}");
    for call in &calls {
        assert_eq!(call.method, "PATCH");
        assert_eq!(
            call.path,
            "/apis/apps/v1/namespaces/models/deployments/vllm/scale"
        );
        assert_eq!(call.authorization.as_deref(), Some("Bearer kube-t0ken"));
        assert_eq!(
            call.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(call.body, json!({ "spec": { "replicas": 1 } }));
    }

    // Idle: replicas 0.
    let calls = api.wait_calls(3, Duration::from_secs(15)).await;
    assert_eq!(calls[2].method, "PATCH");
    assert_eq!(calls[2].body, json!({ "spec": { "replicas": 0 } }));
    wait_for_state(&sw, "cold", Duration::from_secs(15)).await;
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_scaler_reads_a_kubeconfig_and_its_context() {
    scales_through_a_kubeconfig(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_scaler_reads_the_kubeconfig_the_environment_names() {
    scales_through_a_kubeconfig(true).await;
}

/// A kubernetes pool scales up and down on the loopback API server that
/// a kubeconfig context names, the file given by `pool.scaler.kubeconfig`
/// or, `from_env`, by `KUBECONFIG`.
async fn scales_through_a_kubeconfig(from_env: bool) {
    let api = WebhookReceiver::start(0).await;
    let upstream = MockUpstream::start().await;

    // Two contexts; the configured one names the loopback server, its
    // namespace and user.
    let kubeconfig = std::env::temp_dir().join(format!(
        "switchyard-kubeconfig-{}-{}-{from_env}",
        std::process::id(),
        api.addr.port()
    ));
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: other\n\
         clusters:\n\
         - name: local\n  cluster:\n    server: http://{addr}\n\
         - name: elsewhere\n  cluster:\n    server: http://127.0.0.1:9\n\
         users:\n\
         - name: switchyard\n  user:\n    token: kube-c0nfig-token\n\
         - name: nobody\n  user:\n    token: wrong\n\
         contexts:\n\
         - name: test\n  context:\n    cluster: local\n    user: switchyard\n    \
         namespace: models\n\
         - name: other\n  context:\n    cluster: elsewhere\n    user: nobody\n",
        addr = api.addr
    );
    std::fs::write(&kubeconfig, text).unwrap();
    let path = kubeconfig.display().to_string();
    let file_key = match from_env {
        true => String::new(),
        false => format!("kubeconfig = \"{path}\"\n"),
    };
    let config = format!(
        "{}\n[[pool]]\nname = \"big\"\nendpoints = [\"{}\"]\n\
         [pool.scaler]\nkind = \"kubernetes\"\ndeployment = \"vllm\"\n\
         {file_key}context = \"test\"\n\
         idle_timeout_s = 1\nmin_up_s = 0\nready_timeout_s = 20\nprobe_interval_ms = 100\n",
        server_toml(),
        upstream.url(),
    );
    let env = [("KUBECONFIG", path.as_str())];
    let env = if from_env { &env[..] } else { &[] };
    let sw = Switchyard::start_with_env(&config, env).await;
    let body = chat_body("big", "hi");
    post_chat(&sw, &body).await.assert_status(200);

    // Up, then down after idling, both on the context's server.
    let calls = api.wait_calls(2, Duration::from_secs(15)).await;
    let _ = std::fs::remove_file(&kubeconfig);
    for (call, replicas) in calls.iter().zip([1, 0]) {
        assert_eq!(call.method, "PATCH");
        assert_eq!(
            call.path,
            "/apis/apps/v1/namespaces/models/deployments/vllm/scale"
        );
        assert_eq!(
            call.authorization.as_deref(),
            Some("Bearer kube-c0nfig-token")
        );
        assert_eq!(
            call.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(call.body, json!({ "spec": { "replicas": replicas } }));
    }
    wait_for_state(&sw, "cold", Duration::from_secs(15)).await;
    stop(sw).await;
}

/// Sends a chat for pool `big` in the background; the reply and how long
/// it took.
fn spawn_chat(sw: &Switchyard) -> tokio::task::JoinHandle<(Reply, Duration)> {
    let request = http1_client()
        .post(format!("{}/v1/chat/completions", sw.api_url()))
        .json(&chat_body("big", "held"));
    tokio::spawn(async move {
        let started = Instant::now();
        (send(request).await, started.elapsed())
    })
}

/// A `big` pool whose server never becomes ready, with pool `small` on
/// `mock` as its fallback; the two tables apart.
fn never_ready(server: &ScaledServer, mock: &MockUpstream) -> (String, String) {
    let big = server.pool_toml(1000.0, "fallback = \"small\"", "");
    let small = format!(
        "\n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\n",
        mock.url()
    );
    (big, small)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_requests_go_to_the_fallback_when_shutdown_begins() {
    let Some(server) = ScaledServer::new("shutdown-held") else {
        return;
    };
    let mock = MockUpstream::start().await;
    let (big, small) = never_ready(&server, &mock);
    let mut sw = Switchyard::start(&format!("{}{big}{small}", server_toml())).await;

    // Held: no deadline, and the server needs 1000 s.
    let held = spawn_chat(&sw);
    wait_for_state(&sw, "starting", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Shutdown answers it from the fallback rather than holding the
    // drain until the start gives up (ready_timeout_s = 20).
    sw.terminate();
    let (reply, took) = held.await.unwrap();
    reply.assert_status(200);
    assert_eq!(reply.header("x-switchyard-served-by"), Some("fallback"));
    assert!(took < Duration::from_secs(15), "answered after {took:?}");
    assert_eq!(sw.wait_exit(Duration::from_secs(15)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_removes_a_starting_pool_releases_its_held_requests() {
    let Some(server) = ScaledServer::new("reload-held") else {
        return;
    };
    let mock = MockUpstream::start().await;
    let (big, small) = never_ready(&server, &mock);
    let sw = Switchyard::start(&format!("{}{big}{small}", server_toml())).await;

    let held = spawn_chat(&sw);
    wait_for_state(&sw, "starting", Duration::from_secs(10)).await;
    let pid = server.first_pid(Duration::from_secs(10)).await;

    sw.rewrite_config(&format!("{}{small}", server_toml()));
    sw.hangup();
    let (reply, took) = held.await.unwrap();
    reply.assert_status(200);
    assert_eq!(reply.header("x-switchyard-served-by"), Some("fallback"));
    assert!(took < Duration::from_secs(15), "answered after {took:?}");

    // With its last request gone, the removed pool's server stops too.
    wait_gone(pid, Duration::from_secs(10), "its pool").await;
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_a_wrapped_server_stops_what_the_wrapper_started() {
    let Some(server) = ScaledServer::new("wrapped") else {
        return;
    };
    // The server two shells deep, as launcher scripts start theirs:
    // SIGTERM to the outer shell alone would leave the inner one and the
    // server running (the test server exits with its parent, so one
    // shell would not show it).
    let plain = server.pool_toml(0.3, "", "idle_timeout_s = 1\nmin_up_s = 0");
    let wrapped = plain.replacen(
        "command = [\"python3\", ",
        "command = [\"sh\", \"-c\", \"(python3 \\\"$@\\\" & wait) & wait\", \"sh\", ",
        1,
    );
    assert_ne!(plain, wrapped, "the command line changed shape");
    let sw = Switchyard::start(&format!("{}{wrapped}", server_toml())).await;

    let body = chat_body("big", "hello");
    post_chat(&sw, &body).await.assert_status(200);
    let pid = server.first_pid(Duration::from_secs(10)).await;

    wait_for_state(&sw, "cold", Duration::from_secs(15)).await;
    wait_gone(pid, Duration::from_secs(10), "its stop").await;
    stop(sw).await;
}

/// What the test server says about the request it answered: its
/// arrival number and the requests in progress when it arrived.
fn served(reply: &Reply) -> (u64, u64) {
    let content = reply.json["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {}", reply.text));
    let words: Vec<&str> = content.split_whitespace().collect();
    let field = |name: &str| -> u64 {
        let at = words.iter().position(|w| *w == name);
        let value = at.and_then(|i| words.get(i + 1));
        value
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {content:?}"))
    };
    (field("seq"), field("concurrent"))
}

/// Switchyard with pool `big` on `server`, started with `server_args`
/// and the extra `scaler` keys.
async fn start_big(
    server: &ScaledServer,
    ready_delay_s: f64,
    server_args: &[&str],
    scaler: &str,
) -> Switchyard {
    let big = server.pool_toml_args(ready_delay_s, server_args, "", scaler);
    Switchyard::start(&format!("{}{big}", server_toml())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_requests_are_released_by_deadline_within_the_in_flight_limit() {
    let Some(server) = ScaledServer::new("paced") else {
        return;
    };
    // Each answer takes 0.2 s; the pool lets 2 through at once.
    let scaler = "max_in_flight = 2\ncold_start_estimate_s = 1";
    let sw = start_big(&server, 1.0, &["--chat-delay-s", "0.2"], scaler).await;
    let client = http1_client();
    let url = format!("{}/v1/chat/completions", sw.api_url());

    // 16 requests at the cold pool, their deadlines (10 to 25 s) in a
    // shuffled order of arrival.
    let deadlines: Vec<u64> = (0..16).map(|i| 10_000 + (i * 7 % 16) * 1000).collect();
    let mut tasks = Vec::new();
    for deadline_ms in &deadlines {
        let request = client
            .post(&url)
            .header("x-switchyard-deadline-ms", deadline_ms.to_string())
            .json(&chat_body("big", "paced"));
        tasks.push(tokio::spawn(send(request)));
    }
    let mut answers = Vec::new();
    for (task, deadline_ms) in tasks.into_iter().zip(&deadlines) {
        let reply = task.await.unwrap();
        reply.assert_status(200);
        assert_eq!(reply.pool(), "big");
        let (seq, concurrent) = served(&reply);
        answers.push((seq, concurrent, *deadline_ms));
    }
    assert_eq!(server.starts().len(), 1);

    // Never more than the limit at the server, and the limit used.
    let most = answers.iter().map(|a| a.1).max().unwrap();
    assert_eq!(most, 2, "requests in progress at the server: {answers:?}");

    // Served in deadline order: two let through together may swap.
    answers.sort_by_key(|a| a.0);
    let mut by_deadline = deadlines.clone();
    by_deadline.sort();
    for (served_rank, answer) in answers.iter().enumerate() {
        let deadline_rank = by_deadline.iter().position(|d| *d == answer.2).unwrap();
        assert!(
            served_rank.abs_diff(deadline_rank) <= 1,
            "deadline {} ms served as number {served_rank}: {answers:?}",
            answer.2
        );
    }
    stop(sw).await;
}

/// The test server run by the test itself, as a model server that
/// something else runs; killed when dropped.
struct OwnServer(std::process::Child);

impl OwnServer {
    fn start(server: &ScaledServer, args: &[&str]) -> Self {
        let script = workspace_root().join("tests/support/scaled_server.py");
        let child = std::process::Command::new("python3")
            .arg(script)
            .args(["--port", &server.port.to_string()])
            .arg("--starts-file")
            .arg(&server.starts_file)
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Self(child)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_steps_replicas_up_to_max_and_down_one_at_a_time() {
    let Some(server) = ScaledServer::new("replicas") else {
        return;
    };
    // Each answer takes 1.5 s; the replicas are a number the webhook
    // gets, the one server stands in for all of them.
    let _running = OwnServer::start(&server, &["--chat-delay-s", "1.5"]);
    let hook = WebhookReceiver::start(0).await;
    let config = format!(
        "{}\n[[pool]]\nname = \"big\"\nendpoints = [\"http://127.0.0.1:{}\"]\n\
         [pool.scaler]\nkind = \"webhook\"\nurl = \"http://{}/scale\"\n\
         max_replicas = 3\nmax_in_flight = 2\nscale_down_after_s = 1\n\
         idle_timeout_s = 5\nmin_up_s = 0\nready_timeout_s = 20\nprobe_interval_ms = 100\n",
        server_toml(),
        server.port,
        hook.addr,
    );
    let sw = Switchyard::start(&config).await;

    // 12 requests: 2 per replica fit, the rest queue.
    let tasks: Vec<_> = (0..12).map(|_| spawn_chat(&sw)).collect();
    let mut most = 0;
    for task in tasks {
        let (reply, _) = task.await.unwrap();
        reply.assert_status(200);
        most = most.max(served(&reply).1);
    }
    assert_eq!(pool_report(&sw).await["desired_replicas"], 3);
    assert_eq!(most, 6, "2 in flight per replica, 3 replicas");

    // Quiet: one replica fewer per second, then none after idling.
    let calls = hook.wait_calls(6, Duration::from_secs(20)).await;
    let replicas: Vec<u64> = calls
        .iter()
        .map(|c| c.body["replicas"].as_u64().unwrap())
        .collect();
    let changes: Vec<String> = sw
        .logs()
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("pool "))
        })
        .map(|l| l["fields"].to_string())
        .collect();
    assert_eq!(replicas, [1, 2, 3, 2, 1, 0], "{calls:?}\n{changes:#?}");
    let stepped = sw.logs().iter().any(|line| {
        line["fields"]["message"] == "pool replicas changed" && line["fields"]["to"] == 3
    });
    assert!(stepped, "no replica change logged");
    wait_for_state(&sw, "cold", Duration::from_secs(10)).await;
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_that_goes_cold_under_load_keeps_its_replicas() {
    let hook = WebhookReceiver::start(0).await;
    let upstream = MockUpstream::start().await;
    let config = format!(
        "{}\n[[pool]]\nname = \"big\"\nendpoints = [\"{}\"]\n\
         [pool.scaler]\nkind = \"webhook\"\nurl = \"http://{}/scale\"\n\
         max_replicas = 3\nmax_in_flight = 1\nscale_down_after_s = 60\n\
         idle_timeout_s = 60\nmin_up_s = 0\nready_timeout_s = 20\nprobe_interval_ms = 100\n",
        server_toml(),
        upstream.url(),
        hook.addr,
    );
    let sw = Switchyard::start(&config).await;

    // Slow requests step the pool up to 3 replicas.
    let client = http1_client();
    let url = format!("{}/v1/chat/completions", sw.api_url());
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let request = client
                .post(&url)
                .header("x-mock-delay-ms", "6000")
                .json(&chat_body("big", "slow"));
            tokio::spawn(send(request))
        })
        .collect();
    hook.wait_calls(3, Duration::from_secs(15)).await;

    // Its probe fails with requests in flight: cold, then started again
    // with the replicas it had, not with one.
    upstream.fail_with(Some(503));
    let calls = hook.wait_calls(4, Duration::from_secs(15)).await;
    upstream.fail_with(None);
    let replicas: Vec<u64> = calls
        .iter()
        .map(|c| c.body["replicas"].as_u64().unwrap())
        .collect();
    assert_eq!(replicas[..4], [1, 2, 3, 3], "{calls:?}");
    for task in tasks {
        let _ = task.await.unwrap();
    }
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completion_probe_holds_requests_until_the_server_generates() {
    let Some(server) = ScaledServer::new("generate") else {
        return;
    };
    // The GET passes after 0.3 s; generating works only after 2 s.
    let args = ["--generate-ready-delay-s", "2"];
    let sw = start_big(&server, 0.3, &args, "probe = \"completion\"").await;
    let (reply, _) = spawn_chat(&sw).await.unwrap();
    reply.assert_status(200);

    let report = pool_report(&sw).await;
    let took = report["last_cold_start_s"].as_f64().unwrap();
    assert!(took >= 2.0, "ready before the server generated: {report}");
    let lines = server.lines();
    assert!(
        lines.iter().any(|l| l == "completion max_tokens=1"),
        "no one-token completion probe: {lines:?}"
    );
    stop(sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_and_failed_starts_are_counted_with_a_short_retry_after() {
    let Some(server) = ScaledServer::new("refused") else {
        return;
    };
    // Never ready, one request held at most, a start fails after 3 s.
    let big = server
        .pool_toml(1000.0, "", "max_held = 1")
        .replace("ready_timeout_s = 20", "ready_timeout_s = 3");
    let sw = Switchyard::start(&format!("{}{big}", server_toml())).await;
    let held = spawn_chat(&sw);
    wait_for_state(&sw, "starting", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The second is refused; no start was measured and there is no
    // estimate, so it is told to come back after the next probes, not
    // after ready_timeout_s.
    let (refused, _) = spawn_chat(&sw).await.unwrap();
    let message = refused.assert_openai_error(503);
    assert!(message.contains("max_held"), "{message}");
    assert_eq!(refused.json["error"]["code"], "pool_cold");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after <= 2, "Retry-After {retry_after}");

    // The held one gives up with the failed start.
    let (reply, _) = held.await.unwrap();
    reply.assert_openai_error(503);
    let report = wait_for_state(&sw, "cold", Duration::from_secs(10)).await;
    assert_eq!(report["failed_starts"], 1, "{report}");
    let metrics = metrics_text(&sw).await;
    let refusals = metric_lines(&metrics, "switchyard_pool_held_refused_total");
    assert!(refusals.iter().any(|l| l.ends_with(" 1")), "{refusals:?}");
    let failed = metric_lines(&metrics, "switchyard_pool_failed_starts_total");
    assert!(failed.iter().any(|l| l.ends_with(" 1")), "{failed:?}");
    stop(sw).await;
}
