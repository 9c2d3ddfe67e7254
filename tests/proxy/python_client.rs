//! The official `openai` Python client against Switchyard: chat, streaming
//! chat, completions and embeddings through an upstream pool
//! (`tests/python/openai_e2e.py`), and the same through a `local` pool
//! (`tests/python/openai_local.py`).
//!
//! Needs the project venv (`make setup` creates `.venv`). Without it the
//! test is skipped with a note on stderr, unless
//! `SWITCHYARD_REQUIRE_PYTHON=1` makes that a failure (as CI does).

use std::process::Stdio;
use std::time::Duration;

use crate::support::{
    local_pool_config, model_file, server_toml, workspace_root, MockUpstream, Switchyard,
};

const SKIP_NOTE: &str = "skipping python_client: .venv/bin/python is missing; run `make setup` \
     (set SWITCHYARD_REQUIRE_PYTHON=1 to fail instead)";

/// How long the Python run may take, interpreter start-up included.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(120);

/// The project venv's interpreter, or `None` after printing why the test
/// is skipped.
fn python() -> Option<std::path::PathBuf> {
    let python = workspace_root().join(".venv/bin/python");
    if !python.is_file() {
        let required = std::env::var("SWITCHYARD_REQUIRE_PYTHON").is_ok_and(|v| v == "1");
        assert!(!required, "{} ({} not found)", SKIP_NOTE, python.display());
        eprintln!("{SKIP_NOTE}");
        return None;
    }
    Some(python)
}

/// Runs `tests/python/{script}` against `sw` and fails the test, showing
/// both sides' output, unless it succeeds.
async fn run_script(python: &std::path::Path, script: &str, sw: &Switchyard) {
    // The SDK honours proxy variables; keep its traffic on loopback.
    let child = tokio::process::Command::new(python)
        .arg(workspace_root().join("tests/python").join(script))
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
        .unwrap_or_else(|_| panic!("{script} ran past {PYTHON_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("run {script}: {e}"));

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n{}",
        output.status,
        sw.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_works_end_to_end() {
    let Some(python) = python() else { return };

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

    run_script(&python, "openai_e2e.py", &sw).await;
    assert!(mock.request_count() >= 4, "every call reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_talks_to_a_local_pool() {
    let Some(python) = python() else { return };
    let Some(model) = model_file() else { return };
    let sw = Switchyard::start(&local_pool_config(&model, "")).await;
    run_script(&python, "openai_local.py", &sw).await;
}
