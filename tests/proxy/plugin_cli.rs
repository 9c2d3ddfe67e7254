//! `switchyard plugin test`: a plugin's decision and review, printed as
//! JSON without a server.

use std::process::Command;

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

#[test]
fn plugin_test_prints_the_route_and_the_review() {
    let request = temp_json(
        "request",
        &json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}),
    );
    let answer = temp_json(
        "answer",
        &json!({"choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "Hmm"},
            "logprobs": {"content": [{"logprob": -3.0}, {"logprob": -2.0}]}}]}),
    );
    let output = Command::new(BINARY)
        .args(["plugin", "test", &plugin("confidence_cascade")])
        .args(["--config", r#"{"min_mean_logprob": -1.0}"#])
        .arg("--request")
        .arg(&request)
        .arg("--answer")
        .arg(&answer)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&request);
    let _ = std::fs::remove_file(&answer);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["decision"]["route"]["pool"], "small");
    assert_eq!(report["decision"]["route"]["escalate_to"], "large");
    assert_eq!(report["review"]["verdict"], "escalate");
    assert_eq!(report["review"]["reason"], "low-confidence");
    assert_eq!(report["summary"]["mean"], -2.5);
}

#[test]
fn plugin_test_names_a_bad_config_key() {
    let request = temp_json("bad-request", &json!({"model": "auto", "prompt": "x"}));
    let output = Command::new(BINARY)
        .args(["plugin", "test", &plugin("confidence_cascade")])
        .args(["--config", r#"{"threshold": 1}"#])
        .arg("--request")
        .arg(&request)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&request);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("threshold"), "{stderr}");
}
