//! `switchyard check`: a valid config passes; every mistake fails with a
//! message that names the full key path (and the line, for parse errors).

use crate::support::{
    closed_port_url, model_file, plugin, server_toml, switchyard::BINARY, switchyard_check,
    workspace_root,
};

/// A config with one pool `small` and a `[pool.batch]` table whose body is
/// `batch`.
fn config_with_batch(batch: &str) -> String {
    format!(
        "{}\n[[pool]]\nname = \"small\"\nendpoints = [\"{}\"]\nmodel = \"smollm2\"\n\
         connect_timeout_ms = 1000\nrequest_timeout_ms = 2000\n\
         [pool.batch]\n{batch}",
        server_toml(),
        closed_port_url()
    )
}

/// Fails unless `check` rejected the config and stderr has every needle.
fn assert_rejected(config: &str, needles: &[&str]) {
    let (code, stderr) = switchyard_check(config);
    assert_ne!(code, 0, "check accepted an invalid config:\n{config}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr should mention {needle:?}:\n{stderr}\n--- config ---\n{config}"
        );
    }
}

#[test]
fn check_accepts_a_valid_config() {
    let config = config_with_batch("max_batch = 8\nmax_wait_ms = 50\n");
    let (code, stderr) = switchyard_check(&config);
    assert_eq!(code, 0, "stderr:\n{stderr}");
}

#[test]
fn check_accepts_a_config_with_a_policy_plugin() {
    let mut config = config_with_batch("max_batch = 8\nmax_wait_ms = 50\n");
    config.push_str(&format!(
        "\n[policy]\nplugin = \"{}\"\nconfig = {{ long_prompt_chars = 2000 }}\n\
         timeout_ms = 50\nmax_memory_bytes = 67108864\n",
        plugin("cost_router")
    ));
    let (code, stderr) = switchyard_check(&config);
    assert_eq!(code, 0, "stderr:\n{stderr}");
}

#[test]
fn check_rejects_a_plugin_that_fails_its_own_fixtures() {
    let mut config = config_with_batch("max_batch = 8\n");
    config.push_str(&format!(
        "\n[policy]\nplugin = \"{}\"\nconfig = {{ misroute = true }}\n",
        plugin("test_faults")
    ));

    assert_rejected(
        &config,
        &[
            "fails its own fixtures",
            "a plain model goes to the pool of that name",
        ],
    );
}

#[test]
fn check_rejects_an_unknown_key_naming_its_path_and_line() {
    let config = config_with_batch("max_batch = 8\nmax_wait = 5\n");
    let line = config
        .lines()
        .position(|l| l.starts_with("max_wait ="))
        .expect("key in config")
        + 1;

    assert_rejected(&config, &["pool[0].batch", "max_wait"]);
    let (_, stderr) = switchyard_check(&config);
    assert!(
        stderr.contains(&format!("line {line}")) || stderr.contains(&format!(":{line}:")),
        "stderr should give line {line}:\n{stderr}"
    );
}

#[test]
fn check_rejects_a_zero_max_wait() {
    let config = config_with_batch("max_batch = 8\nmax_wait_ms = 0\n");
    assert_rejected(&config, &["pool[0].batch.max_wait_ms"]);
}

#[test]
fn check_rejects_duplicate_pool_names() {
    let url = closed_port_url();
    let pool = format!("\n[[pool]]\nname = \"twin\"\nendpoints = [\"{url}\"]\nmodel = \"m\"\n");
    let config = format!("{}{pool}{pool}", server_toml());
    assert_rejected(&config, &["twin"]);
}

#[test]
fn check_rejects_a_missing_policy_plugin() {
    let missing = std::env::temp_dir().join("switchyard-no-such-plugin/absent.wasm");
    let config = format!(
        "{}\n[policy]\nplugin = \"{}\"\n",
        config_with_batch("max_batch = 8\nmax_wait_ms = 50\n"),
        missing.display()
    );
    assert_rejected(&config, &["policy.plugin"]);
}

#[test]
fn check_rejects_an_unknown_fallback_pool() {
    let config = format!(
        "{}\n[policy]\nplugin = \"{}\"\nfallback_pool = \"nope\"\n",
        config_with_batch("max_batch = 8\nmax_wait_ms = 50\n"),
        plugin("test_faults")
    );
    assert_rejected(&config, &["policy.fallback_pool", "nope"]);
}

#[test]
fn check_rejects_credentials_in_an_endpoint_without_echoing_them() {
    let password = "hunter2-s3cret";
    let config = format!(
        "{}\n[[pool]]\nname = \"small\"\n\
         endpoints = [\"http://user:{password}@127.0.0.1:1\"]\n",
        server_toml()
    );
    assert_rejected(&config, &["pool[0].endpoints[0]"]);
    let (_, stderr) = switchyard_check(&config);
    assert!(
        !stderr.contains(password),
        "stderr shows the endpoint's password:\n{stderr}"
    );
}

#[test]
fn every_example_config_passes_check() {
    // The examples name the model and plugins relative to the checkout.
    if model_file().is_none() {
        return;
    }
    let root = workspace_root();
    let mut checked = 0;
    // One folder down too: examples/kubernetes/switchyard.toml is what
    // its ConfigMap is made from.
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let inner = std::fs::read_dir(&path).unwrap();
            paths.extend(inner.map(|entry| entry.unwrap().path()));
        } else {
            paths.push(path);
        }
    }
    for path in paths {
        if path.extension().is_none_or(|ext| ext != "toml") {
            continue;
        }
        let output = std::process::Command::new(BINARY)
            .arg("check")
            .arg("--config")
            .arg(&path)
            .current_dir(&root)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{}:\n{stderr}", path.display());
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} example configs found");
}
