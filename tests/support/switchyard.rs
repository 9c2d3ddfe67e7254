//! `Switchyard`: boots the real `switchyard` binary for a black-box test.
//!
//! The config is written to a unique file under the system temp folder and
//! the binary runs as `switchyard run --config FILE --log-format json`.
//! Tests put `listen = "127.0.0.1:0"` and `admin = "127.0.0.1:0"` in the
//! config; the harness learns the bound addresses from the `listening`
//! start-up line on stdout, keeps every later stdout line for log
//! assertions, and waits for `GET /readyz` on the admin port to answer 200.
//! The process is killed when the value is dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::mpsc;

/// The binary under test, built by Cargo for this test target.
pub const BINARY: &str = env!("CARGO_BIN_EXE_switchyard");

/// How long start-up may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `wait_for_log` polls before failing.
const LOG_TIMEOUT: Duration = Duration::from_secs(5);

type Lines = Arc<Mutex<Vec<String>>>;

/// A running `switchyard run` process.
#[derive(Debug)]
pub struct Switchyard {
    child: Child,
    api_addr: SocketAddr,
    admin_addr: SocketAddr,
    transparent_addr: Option<SocketAddr>,
    stdout: Lines,
    stderr: Lines,
    config_path: PathBuf,
}

impl Switchyard {
    /// Writes `config_toml` to a temp file, starts the binary on it and
    /// waits until it is listening and ready. Fails the test, showing the
    /// process output, when that does not happen within 20 s.
    pub async fn start(config_toml: &str) -> Self {
        Self::start_inner(config_toml, true, &[]).await
    }

    /// Like `start`, with extra environment variables for the process.
    pub async fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Self {
        Self::start_inner(config_toml, true, env).await
    }

    /// Like `start`, with the process running as `uid` (and gid `uid`):
    /// the transparent-capture test's rules leave that user's traffic
    /// alone. Needs root.
    pub async fn start_as_user(config_toml: &str, uid: u32) -> Self {
        Self::start_full(config_toml, true, &[], Some(uid), None).await
    }

    /// Like `start`, but forgets stdout lines once start-up is over, so a
    /// long benchmark does not hold every access-log line in memory.
    /// `logs()` then only has the start-up lines.
    pub async fn start_forgetting_logs(config_toml: &str) -> Self {
        Self::start_inner(config_toml, false, &[]).await
    }

    /// Like `start_forgetting_logs`, with the process allowed only the
    /// CPUs `cpus` (a `taskset` list such as `1` or `2-3`), so that a
    /// benchmark's load generator does not share them.
    pub async fn start_on_cpus(config_toml: &str, cpus: &str) -> Self {
        Self::start_full(config_toml, false, &[], None, Some(cpus)).await
    }

    async fn start_inner(config_toml: &str, keep_logs: bool, env: &[(&str, &str)]) -> Self {
        Self::start_full(config_toml, keep_logs, env, None, None).await
    }

    async fn start_full(
        config_toml: &str,
        keep_logs: bool,
        env: &[(&str, &str)],
        uid: Option<u32>,
        cpus: Option<&str>,
    ) -> Self {
        let config_path = write_temp_config(config_toml);
        let mut command = match cpus {
            // Set before start, so the runtime sizes itself to these CPUs.
            Some(cpus) => {
                let mut taskset = Command::new("taskset");
                taskset.args(["-c", cpus, BINARY]);
                taskset
            }
            None => Command::new(BINARY),
        };
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(uid);
        }
        let mut child = command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(["--log-format", "json"])
            // The proxy's own default filter decides what is logged.
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BINARY}: {e}"));

        // Readers run on threads so a chatty process never blocks on a full
        // pipe; stdout lines are also streamed to us until start-up is seen.
        let stdout: Lines = Arc::default();
        let stderr: Lines = Arc::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let out_pipe = child.stdout.take().expect("piped stdout");
        let err_pipe = child.stderr.take().expect("piped stderr");
        spawn_reader(out_pipe, stdout.clone(), Some(tx), keep_logs);
        spawn_reader(err_pipe, stderr.clone(), None, true);

        let mut sw = Self {
            child,
            api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            transparent_addr: None,
            stdout,
            stderr,
            config_path,
        };

        // Wait for the `listening` line, which names both bound addresses.
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let line = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => {
                    // Let stderr drain before showing it.
                    std::thread::sleep(Duration::from_millis(200));
                    let status = sw.child.try_wait().ok().flatten();
                    panic!(
                        "switchyard exited before listening (status {status:?})\n{}",
                        sw.output()
                    );
                }
                Err(_) => panic!(
                    "switchyard printed no `listening` line within {START_TIMEOUT:?}\n{}",
                    sw.output()
                ),
            };
            if let Some((api, admin)) = listening_addrs(&line) {
                sw.api_addr = api;
                sw.admin_addr = admin;
                sw.transparent_addr = transparent_addr(&line);
                break;
            }
        }

        sw.wait_ready(deadline).await;
        sw
    }

    async fn wait_ready(&self, deadline: tokio::time::Instant) {
        let client = super::http1_client();
        let url = format!("{}/readyz", self.admin_url());
        loop {
            let last = match client.get(&url).send().await {
                Ok(r) if r.status() == 200 => return,
                Ok(r) => format!("status {}", r.status()),
                Err(e) => e.to_string(),
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "{url} not ready within {START_TIMEOUT:?} (last: {last})\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, for reading what the process used (`/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The API base URL, `http://127.0.0.1:PORT`.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// The API base URL over TLS, `https://127.0.0.1:PORT`, for a config
    /// with `[server.tls]`.
    pub fn api_https_url(&self) -> String {
        format!("https://{}", self.api_addr)
    }

    /// The API listener's address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The transparent listener's address, from the `listening` line;
    /// `None` without `[server.transparent]`.
    pub fn transparent_addr(&self) -> Option<SocketAddr> {
        self.transparent_addr
    }

    /// The admin base URL, `http://127.0.0.1:PORT`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Every stdout line that parses as JSON, in order.
    pub fn logs(&self) -> Vec<Value> {
        lock(&self.stdout)
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Everything the process printed, for failure messages.
    pub fn output(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            lock(&self.stdout).join("\n"),
            lock(&self.stderr).join("\n")
        )
    }

    /// Waits up to 5 s for a log line matching `pred`; fails the test,
    /// naming `what`, when none appears.
    pub async fn wait_for_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut lines = self.wait_for_logs(what, 1, pred).await;
        lines.swap_remove(0)
    }

    /// Waits up to 5 s until at least `count` log lines match `pred` and
    /// returns all that match; fails the test, naming `what`, otherwise.
    pub async fn wait_for_logs(
        &self,
        what: &str,
        count: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + LOG_TIMEOUT;
        loop {
            let lines: Vec<Value> = self.logs().into_iter().filter(|l| pred(l)).collect();
            if lines.len() >= count {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {count} log lines for {what} within {LOG_TIMEOUT:?}\n{}",
                lines.len(),
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Switchyard {
    /// Sends SIGTERM, as an orchestrator stopping the container would.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends SIGHUP, which reloads the configuration file.
    pub fn hangup(&self) {
        self.signal("HUP");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// The configuration file the process runs on.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Replaces the configuration file with `config_toml`, written beside
    /// it and renamed over it, so that a watcher never reads half a file.
    pub fn rewrite_config(&self, config_toml: &str) {
        let staged = self.config_path.with_extension("toml.new");
        std::fs::write(&staged, config_toml)
            .unwrap_or_else(|e| panic!("write {}: {e}", staged.display()));
        std::fs::rename(&staged, &self.config_path)
            .unwrap_or_else(|e| panic!("rename over {}: {e}", self.config_path.display()));
    }

    /// Waits up to `timeout` for the process to exit; its exit code, or
    /// `None` when it is still running (or died by a signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Switchyard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config_path);
    }
}

/// Runs `switchyard check --config FILE` on `config_toml` and returns the
/// exit code (-1 when killed by a signal) and stderr.
pub fn switchyard_check(config_toml: &str) -> (i32, String) {
    let path = write_temp_config(config_toml);
    let output = Command::new(BINARY)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {BINARY} check: {e}"));
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

/// Runs `switchyard run --config FILE` on `config_toml` for a
/// configuration that must not start: its exit code (-1 when killed by a
/// signal) and its output, stdout and stderr together. Killed after 60 s.
pub fn switchyard_run_refused(config_toml: &str) -> (i32, String) {
    let path = write_temp_config(config_toml);
    let mut child = Command::new(BINARY)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {BINARY} run: {e}"));
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {BINARY}: {e}"));
    let _ = std::fs::remove_file(&path);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

/// A field of a JSON log line: the event's `fields` first, then the top
/// level, then the current `span` and the `spans` list.
pub fn log_field<'a>(line: &'a Value, key: &str) -> Option<&'a Value> {
    let in_spans = || {
        line["spans"]
            .as_array()
            .and_then(|spans| spans.iter().rev().find_map(|s| s.get(key)))
    };
    line["fields"]
        .get(key)
        .or_else(|| line.get(key))
        .or_else(|| line["span"].get(key))
        .or_else(in_spans)
}

/// A log field as text: strings unquoted, numbers and booleans as written.
pub fn log_text(line: &Value, key: &str) -> Option<String> {
    log_field(line, key).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// The log line's message (`fields.message`).
pub fn log_message(line: &Value) -> Option<&str> {
    line["fields"]["message"]
        .as_str()
        .or_else(|| line["message"].as_str())
}

fn listening_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let json: Value = serde_json::from_str(line).ok()?;
    if log_message(&json) != Some("listening") {
        return None;
    }
    let api = log_text(&json, "api_addr")?.parse().ok()?;
    let admin = log_text(&json, "admin_addr")?.parse().ok()?;
    Some((api, admin))
}

/// The `transparent_addr` of a `listening` line; `None` when it is
/// `off`.
fn transparent_addr(line: &str) -> Option<SocketAddr> {
    let json: Value = serde_json::from_str(line).ok()?;
    log_text(&json, "transparent_addr")?.parse().ok()
}

/// Reads `pipe` line by line into `lines` and, while someone listens, into
/// `tx`. Without `keep`, lines are stored only while `tx` has a listener.
fn spawn_reader(
    pipe: impl Read + Send + 'static,
    lines: Lines,
    mut tx: Option<mpsc::UnboundedSender<String>>,
    keep: bool,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            // Nobody listens once start-up is over; stop sending then.
            if tx.as_ref().is_some_and(|tx| tx.send(line.clone()).is_err()) {
                tx = None;
            }
            if keep || tx.is_some() {
                lock(&lines).push(line);
            }
        }
    });
}

fn lock(lines: &Lines) -> std::sync::MutexGuard<'_, Vec<String>> {
    lines
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes a config to a file name no other test or run uses.
fn write_temp_config(config_toml: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let name = format!(
        "switchyard-test-{}-{}-{nanos}.toml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let path = std::env::temp_dir().join(name);
    std::fs::write(&path, config_toml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
