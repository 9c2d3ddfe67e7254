//! Hot swap of the policy plugin: `GET/PUT /admin/policy` and
//! `POST /admin/policy/rollback` with a bearer token, a rejected plugin
//! leaving the old one serving, the plugin file changing on disk, and a
//! request in flight finishing on the version it started with.

use std::time::Duration;

use crate::support::{
    chat_body, http1_client, plugin, plugin_path, pools_config, post, post_chat, send,
    switchyard::log_text, workspace_root, MockUpstream, Reply, Switchyard,
};

const TOKEN: &str = "test-admin-token";
const TOKEN_ENV: &str = "SWITCHYARD_TEST_ADMIN_TOKEN";

/// Pools small and large on one mock, `[policy]` on `plugin_file`.
async fn start(mock: &MockUpstream, plugin_file: &str, watch_ms: u64) -> Switchyard {
    start_with(mock, plugin_file, watch_ms, "").await
}

/// Like `start`, with `extra` lines in the `[policy]` table.
async fn start_with(
    mock: &MockUpstream,
    plugin_file: &str,
    watch_ms: u64,
    extra: &str,
) -> Switchyard {
    let mut config = pools_config(&[
        ("small", &mock.url(), "smollm2"),
        ("large", &mock.url(), "big"),
    ]);
    config.push_str(&format!(
        "\n[policy]\nplugin = \"{plugin_file}\"\ntimeout_ms = 1000\n\
         watch_interval_ms = {watch_ms}\nadmin_token_env = \"{TOKEN_ENV}\"\n{extra}"
    ));
    Switchyard::start_with_env(&config, &[(TOKEN_ENV, TOKEN)]).await
}

async fn admin(sw: &Switchyard, method: reqwest::Method, path: &str, body: Vec<u8>) -> Reply {
    let request = http1_client()
        .request(method, format!("{}{path}", sw.admin_url()))
        .bearer_auth(TOKEN)
        .body(body);
    send(request).await
}

fn active_name(reply: &Reply) -> String {
    reply.json["active"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn auto_status(sw: &Switchyard) -> u16 {
    model_status(sw, "auto").await
}

async fn model_status(sw: &Switchyard, model: &str) -> u16 {
    let body = chat_body(model, "route me");
    post_chat(sw, &body).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_swaps_a_valid_plugin_refuses_a_bad_one_and_rollback_returns() {
    let mock = MockUpstream::start().await;
    let sw = start(&mock, &plugin("test_faults"), 0).await;

    let status = send(http1_client().get(format!("{}/admin/policy", sw.admin_url()))).await;
    assert_eq!(active_name(&status), "test_faults", "{}", status.text);
    let old_version = status.json["active"]["version"].clone();
    // test_faults routes `auto` to a pool called auto, which is none.
    assert_eq!(auto_status(&sw).await, 404);

    // Without the token: refused.
    let anonymous = http1_client()
        .put(format!("{}/admin/policy", sw.admin_url()))
        .body(b"x".to_vec());
    assert_eq!(send(anonymous).await.status, 401);

    let router = std::fs::read(plugin_path("cost_router")).unwrap();
    let reply = admin(&sw, reqwest::Method::PUT, "/admin/policy", router).await;
    reply.assert_status(200);
    assert_ne!(reply.json["version"], old_version, "{}", reply.text);
    assert_eq!(reply.json["previous"]["version"], old_version);
    assert_eq!(
        auto_status(&sw).await,
        200,
        "cost_router sends auto to small"
    );

    let reply = admin(
        &sw,
        reqwest::Method::PUT,
        "/admin/policy",
        b"not wasm".to_vec(),
    )
    .await;
    let message = reply.assert_openai_error(400);
    assert!(
        message.contains("not a loadable WebAssembly plugin"),
        "{message}"
    );
    assert_eq!(reply.json["error"]["code"], "plugin_rejected");
    assert_eq!(auto_status(&sw).await, 200, "the old plugin keeps serving");

    let reply = admin(&sw, reqwest::Method::POST, "/admin/policy/rollback", vec![]).await;
    reply.assert_status(200);
    assert_eq!(reply.json["version"], old_version);
    assert_eq!(auto_status(&sw).await, 404);
    sw.wait_for_log("rollback", |l| {
        log_text(l, "message").as_deref() == Some("policy plugin rolled back")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_plugin_file_is_swapped_in() {
    let mock = MockUpstream::start().await;
    let dir = std::env::temp_dir().join(format!("switchyard-swap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.wasm");
    std::fs::copy(plugin_path("test_faults"), &file).unwrap();
    let sw = start(&mock, &file.display().to_string(), 100).await;
    assert_eq!(auto_status(&sw).await, 404);

    // Written beside and renamed, so the watcher never reads half a file.
    let staged = dir.join("policy.wasm.new");
    std::fs::copy(plugin_path("cost_router"), &staged).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    sw.wait_for_log("swap from the file", |l| {
        log_text(l, "message").as_deref() == Some("policy plugin swapped")
            && log_text(l, "source").as_deref() == Some("file")
    })
    .await;
    assert_eq!(auto_status(&sw).await, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_is_reviewed_by_the_version_that_routed_it() {
    let mock = MockUpstream::start().await;
    let sw = start(&mock, &plugin("test_faults"), 0).await;
    let status = send(http1_client().get(format!("{}/admin/policy", sw.admin_url()))).await;
    let old_version = log_text(&status.json["active"], "version");

    // test_faults sends `cascade` small-first; the small answer takes a
    // second, during which cost_router takes over.
    let api = sw.api_url();
    let slow = tokio::spawn(async move {
        let request = http1_client()
            .post(format!("{api}/v1/chat/completions"))
            .header("x-mock-delay-ms", "1000")
            .json(&chat_body("cascade", "slow one"));
        send(request).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let router = std::fs::read(plugin_path("cost_router")).unwrap();
    admin(&sw, reqwest::Method::PUT, "/admin/policy", router)
        .await
        .assert_status(200);

    let reply = slow.await.unwrap();
    reply.assert_status(200);
    assert_eq!(reply.pool(), "small");
    let review = sw
        .wait_for_log("the in-flight review", |l| {
            log_text(l, "message").as_deref() == Some("cascade review")
        })
        .await;
    // The plugin keeps its configured name; the version tells them apart.
    assert_eq!(log_text(&review, "version"), old_version);
    let status = send(http1_client().get(format!("{}/admin/policy", sw.admin_url()))).await;
    assert_ne!(log_text(&status.json["active"], "version"), old_version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_in_version_that_keeps_failing_is_rolled_back() {
    let mock = MockUpstream::start().await;
    let extra = "rollback_error_rate = 0.5\nrollback_min_calls = 4\n";
    let sw = start_with(&mock, &plugin("cost_router"), 0, extra).await;
    let status = send(http1_client().get(format!("{}/admin/policy", sw.admin_url()))).await;
    let good = log_text(&status.json["active"], "version");

    let faults = std::fs::read(plugin_path("test_faults")).unwrap();
    admin(&sw, reqwest::Method::PUT, "/admin/policy", faults)
        .await
        .assert_status(200);
    // test_faults traps on model `trap`: four failures in four calls.
    for _ in 0..4 {
        model_status(&sw, "trap").await;
    }
    sw.wait_for_log("automatic rollback", |l| {
        log_text(l, "message").as_deref()
            == Some("policy plugin failed too often; rolled back automatically")
    })
    .await;
    let status = send(http1_client().get(format!("{}/admin/policy", sw.admin_url()))).await;
    assert_eq!(log_text(&status.json["active"], "version"), good);
    assert_eq!(auto_status(&sw).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_reject_answers_503_policy_failed() {
    let mock = MockUpstream::start().await;
    let extra = "on_error = \"reject\"\n";
    let sw = start_with(&mock, &plugin("test_faults"), 0, extra).await;
    let body = chat_body("trap", "boom");
    let reply = post_chat(&sw, &body).await;
    reply.assert_openai_error(503);
    assert_eq!(reply.json["error"]["code"], "policy_failed");
    assert_eq!(model_status(&sw, "small").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_the_0_2_0_interface_swaps_in_and_routes() {
    let mock = MockUpstream::start().await;
    let sw = start(&mock, &plugin("test_faults"), 0).await;
    let status = send(http1_client().get(format!("{}/admin/policy", sw.admin_url()))).await;
    assert_eq!(
        status.json["active"]["interface"], "switchyard:policy@0.4.0",
        "{}",
        status.text
    );

    // cost_router as the 0.2.0 SDK built it: it must route as it did then.
    let legacy = workspace_root().join("proxy/policy/tests/fixtures/v0.2/cost_router.wasm");
    let bytes = std::fs::read(legacy).unwrap();
    let reply = admin(&sw, reqwest::Method::PUT, "/admin/policy", bytes).await;
    reply.assert_status(200);
    let status = send(http1_client().get(format!("{}/admin/policy", sw.admin_url()))).await;
    // The version is the upload's SHA-256 prefix (fixtures/v0.2/README.md).
    assert_eq!(
        status.json["active"]["version"], "13d2d86935f6",
        "{}",
        status.text
    );
    assert_eq!(
        status.json["active"]["interface"],
        "switchyard:policy@0.2.0"
    );
    assert_eq!(
        status.json["previous"]["interface"],
        "switchyard:policy@0.4.0"
    );

    let reply = post(
        &http1_client(),
        &sw.api_url(),
        "/v1/chat/completions",
        &chat_body("auto", "hello"),
    )
    .await;
    reply.assert_status(200);
    assert_eq!(reply.header("x-switchyard-pool"), Some("small"));
}
