//! Helpers shared by the black-box tests and the benchmark: a fake OpenAI
//! upstream (and a raw one that fails below HTTP), a harness that boots
//! the real `switchyard` binary, test certificates, and small HTTP helpers for asserting on OpenAI-shaped
//! replies.
//!
//! Everything here talks to loopback only; nothing reaches another host.

#![allow(
    dead_code,
    unused_imports,
    reason = "shared by the test and bench targets; each uses a subset"
)]

pub mod mock_upstream;
pub mod raw_upstream;
pub mod switchyard;
pub mod tls;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use mock_upstream::{closed_port_url, MockUpstream, RecordedRequest};
pub use switchyard::{switchyard_check, switchyard_run_refused, Switchyard};

const PLUGIN_MISSING: &str = "policy plugin not built; run `make plugins`";

/// The workspace root (the folder holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    PathBuf::from(root)
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(root))
}

/// Absolute path of a built policy plugin such as `cost_router`.
///
/// Fails the test when the `.wasm` is missing: plugins are built by
/// `make plugins`, not by `cargo test`.
pub fn plugin(name: &str) -> String {
    let path = plugin_path(name);
    assert!(
        path.is_file(),
        "{PLUGIN_MISSING} ({} is missing)",
        path.display()
    );
    path.display().to_string()
}

/// Where `make plugins` leaves the plugin `name`, built or not.
pub fn plugin_path(name: &str) -> PathBuf {
    workspace_root()
        .join("target/wasm32-unknown-unknown/release")
        .join(format!("{name}.wasm"))
}

/// The `[server]` table every test config starts with: both listeners on
/// loopback with an OS-chosen port, so parallel tests never collide.
pub fn server_toml() -> String {
    "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n".to_string()
}

/// A config with one plain `[[pool]]` per `(name, upstream url, model)`.
pub fn pools_config(pools: &[(&str, &str, &str)]) -> String {
    let mut toml = server_toml();
    for (name, url, model) in pools {
        toml.push_str(&pool_toml(name, url, model));
    }
    toml
}

/// One `[[pool]]` table with a single endpoint and generous timeouts.
pub fn pool_toml(name: &str, url: &str, model: &str) -> String {
    format!(
        "\n[[pool]]\nname = \"{name}\"\nendpoints = [\"{url}\"]\n\
         model = \"{model}\"\nconnect_timeout_ms = 1000\n\
         request_timeout_ms = 10000\n"
    )
}

/// A chat request for `model` with one user message.
pub fn chat_body(model: &str, content: &str) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
    })
}

/// A config with the single pool `small` (model `smollm2`) on `mock`.
pub fn small_pool_config(mock: &MockUpstream) -> String {
    pools_config(&[("small", &mock.url(), "smollm2")])
}

/// An HTTP/1.1 client that never goes through a proxy from the environment.
pub fn http1_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("build HTTP/1.1 client")
}

/// A client speaking HTTP/2 over cleartext with prior knowledge (h2c).
pub fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("build h2c client")
}

/// A reply read in full: status, headers and the body as JSON (`Null` when
/// the body is not JSON; `text` always holds it).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub version: reqwest::Version,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Reply {
    /// A response header as text, or `None` when absent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `x-switchyard-pool` header, failing the test when absent.
    pub fn pool(&self) -> &str {
        self.header("x-switchyard-pool")
            .unwrap_or_else(|| panic!("no x-switchyard-pool header: {self:?}"))
    }

    /// Fails the test unless the status is `want`, showing the body.
    pub fn assert_status(&self, want: u16) -> &Self {
        assert_eq!(self.status, want, "unexpected status; body: {}", self.text);
        self
    }

    /// Checks the OpenAI error shape `{"error":{"message","type","code"}}`
    /// and the status, and returns the message.
    pub fn assert_openai_error(&self, want: u16) -> String {
        self.assert_status(want);
        let error = &self.json["error"];
        assert!(error.is_object(), "not an OpenAI error body: {}", self.text);
        assert!(
            error["message"].is_string(),
            "error.message missing: {}",
            self.text
        );
        assert!(
            error["type"].is_string(),
            "error.type missing: {}",
            self.text
        );
        assert!(
            error.get("code").is_some(),
            "error.code missing (null is fine): {}",
            self.text
        );
        error["message"].as_str().unwrap_or_default().to_string()
    }
}

/// Sends a request and reads the whole reply.
pub async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.expect("request failed to send");
    let status = response.status().as_u16();
    let version = response.version();
    let headers = response.headers().clone();
    let text = response.text().await.expect("read reply body");
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        version,
        headers,
        text,
        json,
    }
}

/// POSTs `body` as JSON to `base` + `path` over `client`.
pub async fn post(client: &reqwest::Client, base: &str, path: &str, body: &Value) -> Reply {
    send(client.post(format!("{base}{path}")).json(body)).await
}

/// Posts `body` to `sw`'s `/v1/chat/completions` on a fresh connection.
pub async fn post_chat(sw: &Switchyard, body: &Value) -> Reply {
    post(&http1_client(), &sw.api_url(), "/v1/chat/completions", body).await
}

/// Fetches the Prometheus text from the admin listener.
pub async fn metrics_text(sw: &Switchyard) -> String {
    let reply = send(http1_client().get(format!("{}/metrics", sw.admin_url()))).await;
    reply.assert_status(200);
    reply.text
}

/// Polls `/metrics` for up to 5 s until `name` has a sample line that
/// contains every one of `parts`; fails showing the last exposition.
pub async fn wait_for_metric(sw: &Switchyard, name: &str, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics_text(sw).await;
        let found = metric_lines(&text, name)
            .into_iter()
            .find(|line| parts.iter().all(|part| line.contains(part)));
        if let Some(line) = found {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no `{name}` sample containing {parts:?} in /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lines of a Prometheus exposition for metric `name` (samples only).
pub fn metric_lines<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

/// Whitespace-separated words, the mock's token count.
pub fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The `data:` payloads of a complete SSE body, in order (`[DONE]`
/// included). Events are separated by a blank line.
pub fn sse_data(text: &str) -> Vec<String> {
    text.replace("\r\n", "\n")
        .split("\n\n")
        .filter_map(sse_event_data)
        .collect()
}

/// The joined `data:` lines of one SSE event, or `None` when it has none.
pub fn sse_event_data(event: &str) -> Option<String> {
    let data: Vec<&str> = event
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    (!data.is_empty()).then(|| data.join("\n"))
}

/// A normal request to pool `small` still succeeds: whatever fault came
/// before broke nothing.
pub async fn assert_still_serves(sw: &Switchyard) {
    let body = chat_body("small", "still here");
    let reply = post_chat(sw, &body).await;
    reply.assert_status(200);
    assert_eq!(
        reply.json["choices"][0]["message"]["content"],
        "echo:still here"
    );
}

/// The small model's GGUF file, for tests of `local` pools: from
/// `SWITCHYARD_MODEL`, else `models/` under the workspace (`make model`
/// puts it there).
///
/// `None`, after printing why, when the file is absent, so that a checkout
/// without the model still runs every other test; with
/// `SWITCHYARD_REQUIRE_MODEL=1` (as `make test` sets) absence fails instead.
pub fn model_file() -> Option<PathBuf> {
    let path = std::env::var_os("SWITCHYARD_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if path.is_file() {
        return Some(path);
    }
    let required = std::env::var("SWITCHYARD_REQUIRE_MODEL").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "model file {} is missing and SWITCHYARD_REQUIRE_MODEL=1; run `make model`",
        path.display()
    );
    eprintln!(
        "skipped: model file {} is missing; run `make model` to test local pools",
        path.display()
    );
    None
}

/// A config with one `local` pool named `small` on `model` and the given
/// extra pool keys (`"max_batch = 2\n"`).
pub fn local_pool_config(model: &std::path::Path, extra: &str) -> String {
    format!(
        "{}\n[[pool]]\nname = \"small\"\nkind = \"local\"\nmodel_path = \"{}\"\n\
         threads = 1\n{extra}",
        server_toml(),
        model.display()
    )
}
