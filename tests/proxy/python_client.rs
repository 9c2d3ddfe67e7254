//! The official `openai` Python client against Switchyard: chat, streaming
//! chat, completions and embeddings (`tests/python/openai_e2e.py`).
//!
//! Needs the project venv (`make setup` creates `.venv`). Without it the
//! test is skipped with a note on stderr, unless
//! `SWITCHYARD_REQUIRE_PYTHON=1` makes that a failure (as CI does).

use std::process::Stdio;
use std::time::Duration;

use crate::support::{server_toml, workspace_root, MockUpstream, Switchyard};

const SKIP_NOTE: &str = "skipping python_client: .venv/bin/python is missing; run `make setup` \
     (set SWITCHYARD_REQUIRE_PYTHON=1 to fail instead)";

/// How long the Python run may take, interpreter start-up included.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_works_end_to_end() {
    let root = workspace_root();
    let python = root.join(".venv/bin/python");
    if !python.is_file() {
        let required = std::env::var("SWITCHYARD_REQUIRE_PYTHON").is_ok_and(|v| v == "1");
        assert!(!required, "{} ({} not found)", SKIP_NOTE, python.display());
        eprintln!("{SKIP_NOTE}");
        return;
    }

    // Completions and embeddings go through the coalescer (batches of one
    // here), so the SDK's base64 embeddings are checked on that path too.
    let mock = MockUpstream::start().await;
    let config = format!(
        "{}\n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\nmodel = \"smollm2\"\n\
         [pool.batch]\nmax_batch = 8\nmax_wait_ms = 10\n",
        server_toml(),
        mock.url()
    );
    let sw = Switchyard::start(&config).await;

    // The SDK honours proxy variables; keep its traffic on loopback.
    let child = tokio::process::Command::new(&python)
        .arg(root.join("tests/python/openai_e2e.py"))
        .arg(format!("{}/v1", sw.api_url()))
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("all_proxy")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("OPENAI_LOG", "")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PYTHON_TIMEOUT, child)
        .await
        .unwrap_or_else(|_| panic!("openai_e2e.py ran past {PYTHON_TIMEOUT:?}"))
        .expect("run openai_e2e.py");

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "openai_e2e.py failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n{}",
        output.status,
        sw.output()
    );
    assert!(mock.request_count() >= 4, "every call reached the upstream");
}
