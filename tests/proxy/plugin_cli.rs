//! `switchyard plugin test`: a plugin's decision and review, printed as
//! JSON without a server.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};

use crate::support::{plugin, switchyard::BINARY};

/// Writes `value` to a unique temp file and returns its path.
fn temp_json(name: &str, value: &Value) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "switchyard-plugin-test-{}-{name}.json",
        std::process::id()
    ));
    std::fs::write(&path, value.to_string()).unwrap();
    path
}

/// Runs `switchyard plugin test` on the built plugin `name` with
/// `request`, the small `answer` if any and `extra` arguments.
fn plugin_test(
    name: &str,
    extra: &[&str],
    request: &Value,
    answer: Option<&Value>,
) -> std::process::Output {
    // Tests run at once: each run gets files of its own.
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let label = format!("{name}-{}", RUNS.fetch_add(1, Ordering::Relaxed));
    let request = temp_json(&format!("{label}-request"), request);
    let answer = answer.map(|a| temp_json(&format!("{label}-answer"), a));
    let mut command = Command::new(BINARY);
    command
        .args(["plugin", "test", &plugin(name)])
        .args(extra)
        .arg("--request")
        .arg(&request)
        .env_remove("RUST_LOG");
    if let Some(answer) = &answer {
        command.arg("--answer").arg(answer);
    }
    let output = command.output().unwrap();
    let _ = std::fs::remove_file(&request);
    if let Some(answer) = &answer {
        let _ = std::fs::remove_file(answer);
    }
    output
}

/// The report `output` printed, failing the test if the command failed.
fn report_of(output: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// A small pool's answer saying `text`, with token log-probabilities.
fn answer(text: &str, logprobs: &[f64]) -> Value {
    let content: Vec<Value> = logprobs.iter().map(|l| json!({"logprob": l})).collect();
    json!({"choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": text},
        "logprobs": {"content": content}}]})
}

#[test]
fn plugin_test_prints_the_route_and_the_review() {
    let config = ["--config", r#"{"min_mean_logprob": -1.0}"#];
    let small_answer = answer("Hmm", &[-3.0, -2.0]);
    let output = plugin_test(
        "confidence_cascade",
        &config,
        &chat("auto"),
        Some(&small_answer),
    );
    let report = report_of(&output);
    // Named as the plugin's interface and its fixtures name it.
    assert_eq!(report["endpoint"], "chat-completions");
    assert_eq!(report["interface"], "switchyard:policy@0.4.0");
    assert_eq!(report["decision"]["route"]["pool"], "small");
    assert_eq!(report["decision"]["route"]["escalate_to"], "large");
    assert_eq!(report["review"]["verdict"], "escalate");
    assert_eq!(report["review"]["reason"], "low-confidence");
    assert_eq!(report["summary"]["mean"], -2.5);
}

#[test]
fn plugin_test_names_a_bad_config_key() {
    let config = ["--config", r#"{"threshold": 1}"#];
    let request = json!({"model": "auto", "prompt": "x"});
    let output = plugin_test("confidence_cascade", &config, &request, None);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("threshold"), "{stderr}");
}

#[test]
fn plugin_test_names_the_escalation_pool_a_review_leaves_to_the_route() {
    // test-faults escalates, naming no pool, when the answer says so.
    let output = plugin_test(
        "test_faults",
        &[],
        &chat("cascade"),
        Some(&answer("escalate", &[])),
    );
    let report = report_of(&output);
    assert_eq!(report["review"]["verdict"], "escalate");
    assert_eq!(report["review"]["pool"], "large");
}

#[test]
fn plugin_test_shows_the_plugins_panic_message_and_logs_on_stderr() {
    let output = plugin_test("test_faults", &[], &chat("trap"), None);
    assert!(!output.status.success());
    assert!(output.stdout.is_empty(), "stdout carries only the report");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("test-faults was asked to trap"), "{stderr}");
}

#[test]
fn plugin_test_says_which_fields_name_the_endpoint() {
    let output = plugin_test("test_faults", &[], &json!({"model": "auto"}), None);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`messages`"), "{stderr}");
    assert!(stderr.contains("`input`"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrate_reports_escalation_rate_and_hard_catches_per_threshold() {
    use crate::support::{pools_config, MockUpstream};

    let mock = MockUpstream::start().await;
    let config = pools_config(&[
        ("small", &mock.url(), "smollm2"),
        ("large", &mock.url(), "big"),
    ])
    .replace(
        "name = \"small\"\n",
        "name = \"small\"\nprice = { input_per_mtok = 1.0, output_per_mtok = 1.0 }\n",
    )
    .replace(
        "name = \"large\"\n",
        "name = \"large\"\nprice = { input_per_mtok = 10.0, output_per_mtok = 10.0 }\n",
    );
    let config_path =
        std::env::temp_dir().join(format!("switchyard-calibrate-{}.toml", std::process::id()));
    std::fs::write(&config_path, config).unwrap();
    // Two easy requests the small model is sure of, two hard ones it is not.
    let line = |label: &str, logprobs: &str| {
        json!({
            "request": {"model": "small", "messages": [{"role": "user", "content": "q"}]},
            "label": label, "headers": {"x-mock-logprobs": logprobs},
        })
        .to_string()
    };
    let lines = [
        line("easy", "-0.1"),
        line("easy", "-0.2"),
        line("hard", "-2"),
        line("hard", "-3"),
    ];
    let requests =
        std::env::temp_dir().join(format!("switchyard-calibrate-{}.jsonl", std::process::id()));
    std::fs::write(&requests, lines.join("\n")).unwrap();

    let output = tokio::process::Command::new(BINARY)
        .arg("calibrate")
        .arg("--config")
        .arg(&config_path)
        .arg("--requests")
        .arg(&requests)
        .args(["--thresholds", "-1,-5"])
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&config_path);
    let _ = std::fs::remove_file(&requests);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let row = |t: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(t))
            .unwrap_or_default()
            .to_string()
    };
    let at_minus_one = row("-1.00");
    assert!(at_minus_one.contains("50.0%"), "{stdout}");
    assert!(at_minus_one.contains("100.0%"), "{stdout}");
    let at_minus_five = row("-5.00");
    assert!(at_minus_five.contains(" 0.0%"), "{stdout}");
    assert!(stdout.contains("4 requests (2 labelled hard)"), "{stdout}");
}
