//! Transparent capture: `[server.transparent]`, `pool.capture` and
//! `switchyard iptables`.
//!
//! The capture test builds a network namespace of its own (`ip netns
//! add`), so that its iptables rules and addresses touch nothing outside
//! it, and runs the scenario in a helper process inside it: this test
//! binary again, filtered to `in_netns_helper`. The helper starts a mock
//! model server on 10.77.0.5:8000 and Switchyard as uid 1337, applies the
//! rules with `switchyard iptables --apply`, and connects to the model
//! server as root, as an app would. The namespace (and anything still in
//! it) is removed when the test ends, passed or failed.
//!
//! It needs root, `ip` and `iptables`; without them it prints why and
//! returns, unless `SWITCHYARD_REQUIRE_NETNS=1` (as `make test` sets when
//! run as root) makes that a failure.

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::switchyard::{log_message, log_text, BINARY};
use crate::support::{
    chat_body, http1_client, post, server_toml, wait_for_metric, MockUpstream, Switchyard,
};

/// Set for the helper process; without it the helper does nothing.
const HELPER_ENV: &str = "SWITCHYARD_NETNS_HELPER";
/// The helper's test name, for `--exact`.
const HELPER_TEST: &str = "transparent::in_netns_helper";
/// The namespace's model server, captured for pool `vllm`.
const MODEL_SERVER: &str = "10.77.0.5:8000";
/// Another address on the captured port, in no pool's `capture` list.
const UNLISTED: &str = "10.77.0.6:8000";
/// The user Switchyard runs as inside the namespace.
const SWITCHYARD_UID: u32 = 1337;
/// Longest the helper may run.
const HELPER_TIMEOUT: Duration = Duration::from_secs(90);

/// A connection made straight to the transparent port was not redirected:
/// its requests get 421 in the OpenAI shape, and it is counted.
#[tokio::test]
async fn a_direct_connection_to_the_transparent_port_gets_421() {
    let mock = MockUpstream::start().await;
    let config = format!(
        "{}[server.transparent]\nlisten = \"127.0.0.1:0\"\n\n[[pool]]\n\
         name = \"vllm\"\nendpoints = [\"{}\"]\ncapture = [\"10.77.0.5:8000\"]\n",
        server_toml(),
        mock.url()
    );
    let sw = Switchyard::start(&config).await;
    let transparent = sw.transparent_addr().expect("a transparent_addr");

    let body = chat_body("anything", "hello");
    let base = format!("http://{transparent}");
    let reply = post(&http1_client(), &base, "/v1/chat/completions", &body).await;
    let message = reply.assert_openai_error(421);
    assert_eq!(
        reply.json["error"]["code"], "not_redirected",
        "{}",
        reply.text
    );
    assert!(message.contains("server.listen"), "{message}");
    assert_eq!(mock.request_count(), 0);
    wait_for_metric(
        &sw,
        "switchyard_capture_failures_total",
        &["reason=\"not_redirected\""],
    )
    .await;
}

/// `switchyard check` names the key of a capture entry it cannot use.
#[test]
fn a_capture_host_name_fails_check_naming_the_key() {
    let config = format!(
        "{}[server.transparent]\n\n[[pool]]\nname = \"vllm\"\n\
         endpoints = [\"http://10.0.0.5:8000\"]\ncapture = [\"vllm.svc:8000\"]\n",
        server_toml()
    );
    let (code, stderr) = crate::support::switchyard_check(&config);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("pool[0].capture[0]"), "{stderr}");
    assert!(stderr.contains("resolve host names"), "{stderr}");
}

/// `switchyard iptables` prints the rules; without ports or destinations
/// it refuses, saying what to give.
#[test]
fn switchyard_iptables_prints_the_rules_and_refuses_an_empty_capture() {
    let output = Command::new(BINARY)
        .args(["iptables", "--ports", "8000", "--uid", "1337"])
        .output()
        .expect("run switchyard iptables");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let expected = [
        "iptables -t nat -N SWITCHYARD_OUTPUT",
        "iptables -t nat -A SWITCHYARD_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "iptables -t nat -A SWITCHYARD_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "iptables -t nat -A SWITCHYARD_OUTPUT -p tcp --dport 8000 -j REDIRECT --to-ports 15001",
        "iptables -t nat -A OUTPUT -p tcp -j SWITCHYARD_OUTPUT",
    ];
    let commands: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(commands, expected, "{stdout}");

    let output = Command::new(BINARY)
        .arg("iptables")
        .output()
        .expect("run switchyard iptables");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--ports"), "{stderr}");
}

/// `switchyard iptables` refuses a /0 block without ports as it refuses
/// no options, and says the same of every port out of range.
#[test]
fn switchyard_iptables_refuses_everything_and_bad_ports_alike() {
    let refusal = |args: &[&str]| {
        let output = Command::new(BINARY)
            .arg("iptables")
            .args(args)
            .output()
            .expect("run switchyard iptables");
        assert!(!output.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    for everything in ["0.0.0.0/0", "::/0"] {
        let stderr = refusal(&["--destinations", everything]);
        assert!(stderr.contains("every outbound connection"), "{stderr}");
    }
    for port in ["0", "70000"] {
        let stderr = refusal(&["--ports", port]);
        let want = format!("{port} is not a port (1 to 65535)");
        assert!(stderr.contains(&want), "{stderr}");
    }
}

/// An app in its own network namespace talks to its model server's
/// address; iptables sends the connection to Switchyard, which serves it
/// by the pool that captures that address, the `model` as sent.
#[test]
fn captured_connections_are_served_by_the_pool_of_their_original_destination() {
    let netns = match Netns::create() {
        Ok(netns) => netns,
        Err(reason) => return skip(&reason),
    };

    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &netns.name])
        .arg(exe)
        .args([HELPER_TEST, "--exact", "--ignored", "--nocapture"])
        .env(HELPER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the helper with ip netns exec");

    // Pipes are read on threads so a chatty helper never blocks.
    let out = read_on_thread(child.stdout.take());
    let err = read_on_thread(child.stderr.take());
    let deadline = Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the helper") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = format!(
        "--- helper stdout ---\n{}\n--- helper stderr ---\n{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    match status {
        Some(status) => assert!(status.success(), "helper failed ({status})\n{output}"),
        None => panic!("helper still running after {HELPER_TIMEOUT:?}\n{output}"),
    }
    assert!(
        output.contains("netns helper: every check passed"),
        "the helper did not run its checks\n{output}"
    );
}

/// The capture scenario, run by the test above inside its namespace;
/// does nothing anywhere else.
#[tokio::test]
#[ignore = "runs inside the namespace of the capture test above"]
async fn in_netns_helper() {
    if std::env::var_os(HELPER_ENV).is_none() {
        eprintln!("in_netns_helper runs only inside the capture test's network namespace");
        return;
    }
    let model_server: SocketAddr = MODEL_SERVER.parse().unwrap();
    let mock = MockUpstream::start_at(model_server).await;
    let config = format!(
        "{}[server.transparent]\nlisten = \"127.0.0.1:15001\"\n\n[[pool]]\n\
         name = \"vllm\"\nendpoints = [\"http://{MODEL_SERVER}\"]\n\
         model = \"pool-model\"\ncapture = [\"{MODEL_SERVER}\"]\n",
        server_toml()
    );
    let sw = Switchyard::start_as_user(&config, SWITCHYARD_UID).await;

    // The rules as the init container would apply them: the namespace's
    // 10.77.0.0/24 on port 8000, Switchyard's own user left alone.
    let uid = SWITCHYARD_UID.to_string();
    let applied = Command::new(BINARY)
        .args(["iptables", "--apply", "--ports", "8000"])
        .args(["--destinations", "10.77.0.0/24", "--uid", &uid])
        .output()
        .expect("run switchyard iptables --apply");
    assert!(
        applied.status.success(),
        "switchyard iptables --apply failed:\n{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // The app, as root, talks to its model server with the server's own
    // model name, which is no pool's name.
    let client = http1_client();
    let body = chat_body("served-model", "captured");
    let base = format!("http://{MODEL_SERVER}");
    let reply = post(&client, &base, "/v1/chat/completions", &body).await;
    reply.assert_status(200);
    assert_eq!(reply.pool(), "vllm", "answered through Switchyard");
    let requests = mock.requests();
    assert_eq!(requests.len(), 1, "the model server saw the request once");
    assert_eq!(requests[0].body["model"], "served-model", "model as sent");
    wait_for_metric(
        &sw,
        "switchyard_captured_connections_total",
        &["pool=\"vllm\""],
    )
    .await;

    // A captured address that no pool lists gets 502 naming it.
    let unlisted = format!("http://{UNLISTED}");
    let reply = post(&client, &unlisted, "/v1/chat/completions", &body).await;
    let message = reply.assert_openai_error(502);
    assert_eq!(reply.json["error"]["code"], "unknown_destination");
    assert!(message.contains(UNLISTED), "{message}");

    // A TLS client's handshake is not decrypted: the connection closes
    // and the log says why.
    let mut tls = tokio::net::TcpStream::connect(model_server).await.unwrap();
    tls.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0, 0, 1, 0])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?} {rest:?}");
    sw.wait_for_log("the TLS refusal", |line| {
        log_message(line).is_some_and(|m| m.contains("TLS handshake"))
            && log_text(line, "original_dst").as_deref() == Some(MODEL_SERVER)
    })
    .await;
    assert_eq!(mock.request_count(), 1, "nothing else reached the server");
    eprintln!("netns helper: every check passed");
}

/// A network namespace of this test's, with the addresses the scenario
/// uses on its loopback; deleted on drop, after killing whatever this
/// test left running in it.
struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace, or says why this machine cannot.
    fn create() -> Result<Self, String> {
        if !is_root() {
            return Err("not running as root".to_string());
        }
        for tool in ["ip", "iptables"] {
            let found = Command::new(tool)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                return Err(format!(
                    "`{tool}` is not installed (`make setup` installs iptables)"
                ));
            }
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!("sy-test-{}-{nanos}", std::process::id());
        run(&["ip", "netns", "add", &name])
            .map_err(|e| format!("cannot create a network namespace: {e}"))?;
        let netns = Self { name };

        // From here on, failures are real: the namespace exists.
        let setup: [&[&str]; 3] = [
            &["ip", "link", "set", "lo", "up"],
            &["ip", "addr", "add", "10.77.0.5/32", "dev", "lo"],
            &["ip", "addr", "add", "10.77.0.6/32", "dev", "lo"],
        ];
        for command in setup {
            netns.exec(command).unwrap_or_else(|e| panic!("{e}"));
        }
        netns
            .exec(&["iptables", "-t", "nat", "-L", "OUTPUT", "-n"])
            .map_err(|e| format!("the nat table is not usable in a namespace: {e}"))?;
        Ok(netns)
    }

    fn exec(&self, command: &[&str]) -> Result<(), String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(command);
        run(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // A helper killed on timeout may leave its Switchyard behind.
        let pids = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        if let Err(e) = run(&["ip", "netns", "del", &self.name]) {
            eprintln!("could not delete network namespace {}: {e}", self.name);
        }
    }
}

/// Prints why the capture test did not run, or fails when it must run.
fn skip(reason: &str) {
    let required = std::env::var("SWITCHYARD_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "transparent-capture test cannot run and SWITCHYARD_REQUIRE_NETNS=1: {reason}"
    );
    eprintln!("skipped: transparent-capture test needs a network namespace: {reason}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a command to completion; an error names it and shows stderr.
fn run(command: &[&str]) -> Result<(), String> {
    let output: Output = Command::new(command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", command.join(" ")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{}` failed ({}): {}",
        command.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

fn read_on_thread(
    pipe: Option<impl std::io::Read + Send + 'static>,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}
