//! Reloading the configuration file while serving: SIGHUP, the file
//! changing on disk and `POST /admin/reload`. A changed pool endpoint
//! takes the next request, a bad file is refused while the old one keeps
//! serving, unchanged pools keep running, the cost totals carry over, and
//! under load no request is lost while the configuration changes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{
    chat_body, http1_client, local_pool_config, model_file, pool_toml, pools_config, post,
    post_chat, send, switchyard::log_text, wait_for_metric, MockUpstream, Reply, Switchyard,
};

const TOKEN: &str = "test-reload-token";
const TOKEN_ENV: &str = "SWITCHYARD_TEST_RELOAD_TOKEN";

/// Pool `small` on `url`, the file watcher off (tests that want it say
/// so), the admin token from `TOKEN_ENV`.
fn small_on(url: &str) -> String {
    format!(
        "{}\n[admin]\ntoken_env = \"{TOKEN_ENV}\"\n\n[reload]\nwatch_interval_ms = 0\n",
        pools_config(&[("small", url, "smollm2")])
    )
}

async fn start(config: &str) -> Switchyard {
    Switchyard::start_with_env(config, &[(TOKEN_ENV, TOKEN)]).await
}

async fn chat(sw: &Switchyard, content: &str) -> Reply {
    let body = chat_body("small", content);
    post_chat(sw, &body).await
}

/// Waits until `count` reloads have been logged as done.
async fn wait_reloaded(sw: &Switchyard, count: usize) -> Value {
    let mut lines = sw
        .wait_for_logs("configuration reloaded", count, |l| {
            log_text(l, "message").as_deref() == Some("configuration reloaded; new requests use it")
        })
        .await;
    lines.swap_remove(count - 1)
}

async fn admin_reload(sw: &Switchyard, token: Option<&str>) -> Reply {
    let mut request = http1_client().post(format!("{}/admin/reload", sw.admin_url()));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    send(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_sends_new_requests_to_a_changed_endpoint() {
    let (old, new) = (MockUpstream::start().await, MockUpstream::start().await);
    let sw = start(&small_on(&old.url())).await;
    chat(&sw, "before").await.assert_status(200);
    assert_eq!(old.request_count(), 1);

    sw.rewrite_config(&small_on(&new.url()));
    sw.hangup();
    let line = wait_reloaded(&sw, 1).await;
    assert_eq!(log_text(&line, "source").as_deref(), Some("signal"));
    assert_eq!(log_text(&line, "started").as_deref(), Some("small"));
    assert_eq!(log_text(&line, "stopped").as_deref(), Some("small"));

    let reply = chat(&sw, "after").await;
    reply.assert_status(200);
    assert_eq!(reply.json["choices"][0]["message"]["content"], "echo:after");
    assert_eq!(new.request_count(), 1, "the new endpoint gets the request");
    assert_eq!(old.request_count(), 1, "the old endpoint gets no more");
    wait_for_metric(
        &sw,
        "switchyard_config_reloads_total",
        &["result=\"ok\"", " 1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_on_sighup_is_refused_and_the_old_one_keeps_serving() {
    let (old, new) = (MockUpstream::start().await, MockUpstream::start().await);
    let sw = start(&small_on(&old.url())).await;

    // A good endpoint, but a key the schema does not know.
    let bad = small_on(&new.url()).replace(
        "connect_timeout_ms = 1000\n",
        "connect_timeout_ms = 1000\nconnect_timeout = 5\n",
    );
    let line_of_bad_key = 1 + bad
        .lines()
        .position(|l| l == "connect_timeout = 5")
        .unwrap();
    sw.rewrite_config(&bad);
    sw.hangup();
    let line = sw
        .wait_for_log("the rejected reload", |l| {
            log_text(l, "message").as_deref()
                == Some("configuration reload rejected; the previous configuration keeps serving")
        })
        .await;
    let error = log_text(&line, "error").unwrap_or_default();
    assert!(
        error.contains(&format!("line {line_of_bad_key}"))
            && error.contains("pool[0]")
            && error.contains("connect_timeout"),
        "the reason names the line and key: {error}"
    );
    assert_eq!(log_text(&line, "source").as_deref(), Some("signal"));
    wait_for_metric(
        &sw,
        "switchyard_config_reloads_total",
        &["result=\"error\"", " 1"],
    )
    .await;

    let reply = chat(&sw, "still old").await;
    reply.assert_status(200);
    assert_eq!(old.request_count(), 1, "the old pool still serves");
    assert_eq!(new.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_reloaded_without_a_signal() {
    let (old, new) = (MockUpstream::start().await, MockUpstream::start().await);
    let watched =
        |url: &str| small_on(url).replace("watch_interval_ms = 0", "watch_interval_ms = 50");
    let sw = start(&watched(&old.url())).await;
    chat(&sw, "before").await.assert_status(200);

    sw.rewrite_config(&watched(&new.url()));
    let line = wait_reloaded(&sw, 1).await;
    assert_eq!(log_text(&line, "source").as_deref(), Some("file"));
    chat(&sw, "after").await.assert_status(200);
    assert_eq!((old.request_count(), new.request_count()), (1, 1));

    // Touching the file without changing it reloads nothing.
    let text = std::fs::read_to_string(sw.config_path()).unwrap();
    sw.rewrite_config(&text);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reloads = sw
        .logs()
        .iter()
        .filter(|l| log_text(l, "source").as_deref() == Some("file"))
        .count();
    assert_eq!(reloads, 1, "{}", sw.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_needs_the_token_and_answers_what_changed() {
    let mock = MockUpstream::start().await;
    let priced = |config: String| {
        config.replace(
            "name = \"small\"\n",
            "name = \"small\"\nprice = { input_per_mtok = 1.0 }\n",
        )
    };
    let sw = start(&priced(small_on(&mock.url()))).await;
    chat(&sw, "counted before").await.assert_status(200);

    // Without the token, or with a wrong one: refused, in the OpenAI shape.
    let reply = admin_reload(&sw, None).await;
    reply.assert_openai_error(401);
    assert_eq!(reply.json["error"]["code"], "invalid_token");
    admin_reload(&sw, Some("wrong"))
        .await
        .assert_openai_error(401);
    let reply = send(http1_client().get(format!("{}/admin/reload", sw.admin_url()))).await;
    reply.assert_status(405);

    // A second pool, and a listen address that cannot change live.
    let mut config = priced(small_on(&mock.url()))
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    config.push_str(&pool_toml("large", &mock.url(), "big"));
    sw.rewrite_config(&config);
    let reply = admin_reload(&sw, Some(TOKEN)).await;
    reply.assert_status(200);
    assert_eq!(reply.json["reloaded"], true, "{}", reply.text);
    assert_eq!(reply.json["pools"], json!(["small", "large"]));
    assert_eq!(reply.json["reused"], json!(["small"]));
    assert_eq!(reply.json["started"], json!(["large"]));
    assert_eq!(reply.json["needs_restart"], json!(["server.listen"]));
    sw.wait_for_log("the restart warning", |l| {
        log_text(l, "keys").as_deref() == Some("server.listen")
    })
    .await;

    // Still on the old port; the new pool serves; the ledger kept its
    // totals.
    chat(&sw, "counted after").await.assert_status(200);
    let body = chat_body("large", "to the new pool");
    let reply = post_chat(&sw, &body).await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "large");
    // An answer is charged as its body ends, which may be just after the
    // client has read it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let costs = send(http1_client().get(format!("{}/admin/costs", sw.admin_url()))).await;
        if costs.json["pools"]["small"]["answers"] == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ledger lost its totals: {}",
            costs.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A bad file: 422 with the reason, and the old configuration stays.
    sw.rewrite_config("[[pool]]\nname = \"small\"\nendpoints = []\n");
    let reply = admin_reload(&sw, Some(TOKEN)).await;
    let message = reply.assert_openai_error(422);
    assert_eq!(reply.json["error"]["code"], "config_rejected");
    assert!(message.contains("pool[0].endpoints"), "{message}");
    chat(&sw, "still serving").await.assert_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_is_off_without_a_token() {
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&small_on(&mock.url())).await;
    let reply = admin_reload(&sw, Some(TOKEN)).await;
    let message = reply.assert_openai_error(403);
    assert!(message.contains(TOKEN_ENV), "{message}");
}

/// Clients sending requests without pause, some of them held upstream,
/// while the configuration is reloaded again and again: every request is
/// answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_no_request() {
    const CLIENTS: usize = 8;
    const RELOADS: usize = 6;
    let (a, b) = (MockUpstream::start().await, MockUpstream::start().await);

    // Two versions: `small` alternates between upstreams, coalescing on
    // one and not on the other; `large` stays and is taken over running.
    let version = |small: &str, batch: bool| {
        let mut config = small_on(small);
        if batch {
            config = config.replace(
                "request_timeout_ms = 10000\n",
                "request_timeout_ms = 10000\n[pool.batch]\nmax_batch = 4\nmax_wait_ms = 20\n",
            );
        }
        config.push_str(&pool_toml("large", &a.url(), "big"));
        config
    };
    let configs = [version(&b.url(), false), version(&a.url(), true)];
    let sw = start(&configs[1]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (api, stop) = (sw.api_url(), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            let client = http1_client();
            let (mut sent, mut ok, mut failures) = (0usize, 0usize, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let (path, body) = match sent % 3 {
                    0 => ("/v1/completions", json!({"model": "small", "prompt": "p"})),
                    1 => ("/v1/chat/completions", chat_body("large", "l")),
                    _ => ("/v1/chat/completions", chat_body("small", "s")),
                };
                // Every fourth request of every other client is held
                // upstream, so reloads happen with requests in flight.
                let mut request = client.post(format!("{api}{path}")).json(&body);
                if c % 2 == 0 && sent % 4 == 0 {
                    request = request.header("x-mock-delay-ms", "400");
                }
                sent += 1;
                match request.send().await {
                    Ok(response) if response.status() == 200 => match response.bytes().await {
                        Ok(_) => ok += 1,
                        Err(e) => failures.push(format!("body: {e}")),
                    },
                    Ok(response) => failures.push(format!("status {}", response.status())),
                    Err(e) => failures.push(format!("send: {e}")),
                }
            }
            (sent, ok, failures)
        }));
    }

    // Reload while they run, by signal and by the admin call in turn,
    // each time with requests held upstream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for r in 0..RELOADS {
        sw.rewrite_config(&configs[r % 2]);
        if r % 2 == 0 {
            sw.hangup();
        } else {
            admin_reload(&sw, Some(TOKEN)).await.assert_status(200);
        }
        wait_reloaded(&sw, r + 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::SeqCst);

    let (mut sent, mut ok, mut failures) = (0, 0, Vec::new());
    for client in clients {
        let (s, o, f) = client.await.unwrap();
        sent += s;
        ok += o;
        failures.extend(f);
    }
    let lost = sent - ok;
    eprintln!(
        "reload under load: {sent} requests, {CLIENTS} concurrent, {RELOADS} reloads, {lost} lost \
         (upstream a {}, b {}, most at once on a {})",
        a.request_count(),
        b.request_count(),
        a.max_concurrent()
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(lost, 0);
    assert!(sent >= 100, "too little load to say much: {sent} requests");
    assert!(b.request_count() > 0, "reloads took effect");
    let rejected = sw.logs().iter().any(|l| {
        log_text(l, "message").as_deref()
            == Some("configuration reload rejected; the previous configuration keeps serving")
    });
    assert!(!rejected, "{}", sw.output());
}

/// A local pool whose settings did not change keeps its loaded model; one
/// that changed starts anew and still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_local_pool_is_taken_over_and_a_changed_one_restarts() {
    let Some(model) = model_file() else { return };
    let mock = MockUpstream::start().await;
    let base = format!(
        "{}\n[reload]\nwatch_interval_ms = 0\n",
        local_pool_config(&model, "")
    );
    let sw = start(&base).await;

    let mut config = base.clone();
    config.push_str(&pool_toml("remote", &mock.url(), "m"));
    sw.rewrite_config(&config);
    sw.hangup();
    let line = wait_reloaded(&sw, 1).await;
    assert_eq!(log_text(&line, "reused").as_deref(), Some("small"));

    sw.rewrite_config(&config.replace("threads = 1\n", "threads = 1\nmax_batch = 2\n"));
    sw.hangup();
    let line = wait_reloaded(&sw, 2).await;
    assert_eq!(log_text(&line, "started").as_deref(), Some("small"));
    assert_eq!(log_text(&line, "reused").as_deref(), Some("remote"));

    let body = json!({"model": "small", "prompt": "Hello", "max_tokens": 2});
    let reply = post(&http1_client(), &sw.api_url(), "/v1/completions", &body).await;
    reply.assert_status(200);
}
