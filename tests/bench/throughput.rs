//! Throughput and latency of Switchyard against the same fake upstream
//! reached directly.
//!
//! `cargo bench -p switchyard --bench throughput` starts a `MockUpstream`
//! and the release `switchyard` binary on loopback, then drives each
//! scenario with one in-process load generator: `BENCH_CONCURRENCY`
//! connections (default 32), each sending requests back to back for
//! `BENCH_SECONDS` (default 5) after a one-second warm-up. Scenarios:
//!
//! - chat completions straight to the mock;
//! - the same through Switchyard without a policy, with `cost_router`
//!   as the SDK builds it by default (a 0.4.0 core module; model `auto`),
//!   and with it built as a 0.3.0 component: these alternate in
//!   `BENCH_ROUNDS` (default 5) rounds, each a slice of every scenario
//!   (the slices add up to `BENCH_SECONDS`), so that a change in the
//!   machine's load falls on all alike. `BENCH_POLICY_PLUGIN` (a path,
//!   relative to the workspace root) measures that plugin instead, with
//!   `BENCH_POLICY_CONFIG` (a TOML inline table, default `{}`) as its
//!   `[policy.config]`; it must send model `auto` to pool `small` or
//!   `large`, and one that sends it small-first also pays for a review;
//! - the same with a hand-written 0.4.0 module that reads what
//!   cost_router reads and, for model `auto` and the header matched
//!   exactly, answers as it does, with nothing else (`FLOOR_MODULE`):
//!   what the host's side of such a policy costs at least;
//! - one-input embeddings straight to the mock, and through a pool that
//!   coalesces them (`max_batch = 8`, `max_wait_ms = 5`), counting the
//!   requests the upstream received.
//!
//! For each policy scenario it reads Switchyard's histogram of the route
//! decisions made inside the measured requests (buckets of 1 to 5 us
//! around the 20 us target) and prints the buckets of their p50 and p99
//! and the share slower than 20 us. For the throughput with and without a
//! policy it also prints the median and range of the rounds' ratios (a
//! round measures each scenario once, back to back) and the proxy's CPU
//! time per request in each (from `/proc`), which the rest of the machine
//! moves less than requests per second. Then it times calls into warm plugin
//! instances in this process: `route` on `cost_router.wasm`, and `route`
//! and `review` on `confidence_cascade.wasm`, printing their p50 and p99
//! (target: p99 under 20 us), next to the throughput ratio with and
//! without a policy (target: within 5%). `cost_router` is timed built
//! against each interface version, 0.4.0, 0.3.0 and 0.2.0, to show what
//! each change saves.
//!
//! It prints a table and through/direct ratios and asserts nothing about
//! timing. The load generator, the mock and the proxy share the machine's
//! cores, so on a small machine the ratios overstate the proxy's cost, and
//! a policy decision is timed with whatever preempted it. To keep them
//! apart, `BENCH_PROXY_CPUS` and `BENCH_LOAD_CPUS` (`taskset` CPU lists,
//! for example `1` and `0`) give the proxies and this process their own
//! CPUs; the proxy then sizes its runtime to its share.
//! Run without `--bench` (as `cargo test --benches` does) it only
//! smoke-tests each scenario for a fraction of a second.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a benchmark binary reports on stdout and fails by panicking"
)]

#[path = "../support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;

use support::{
    metrics_text, plugin_path, pool_toml, server_toml, workspace_root, MockUpstream, Switchyard,
};
use switchyard_policy::{
    Endpoint, LogprobSummary, Policy, PolicySettings, ReviewAnswer, RouteRequest,
};

/// Calls timed per plugin and hook in a full run (a smoke run makes 200).
const POLICY_CALLS: usize = 20_000;

/// Default of `BENCH_ROUNDS`.
const DEFAULT_ROUNDS: f64 = 5.0;

/// The scenario through cost_router as the SDK builds it by default, a
/// 0.4.0 core module.
const POLICY_SCENARIO: &str = "chat via switchyard + cost_router";
/// The scenario through the plugin `BENCH_POLICY_PLUGIN` names, with the
/// configuration `BENCH_POLICY_CONFIG` gives (a TOML inline table).
const OWN_PLUGIN_SCENARIO: &str = "chat via switchyard + BENCH_POLICY_PLUGIN";
/// The same plugin built as a 0.3.0 component (`wasm32-wasip2`).
const COMPONENT_SCENARIO: &str = "chat via switchyard + cost_router 0.3.0";

/// The floor: a 0.4.0 core module written by hand (`FLOOR_MODULE`) that
/// reads what cost_router reads and, for the bench's requests, answers as
/// it does.
const FLOOR_SCENARIO: &str = "chat via switchyard + hand-written module";

/// What cost_router does for model `auto` and the header matched exactly,
/// with nothing but the ABI (see the file). The host pays the same as for cost_router: the call, two
/// reads (the model and the header) and the decision's decoding; what
/// this costs is what any plugin with cost_router's rule costs at least.
const FLOOR_MODULE: &str = include_str!("floor_module.wat");

/// Writes `FLOOR_MODULE` as a `.wasm` file for a proxy to load; the run
/// removes it at its end.
fn floor_module_path() -> PathBuf {
    let bytes = wat::parse_str(FLOOR_MODULE).expect("the floor module parses");
    let path = floor_module_path_of_this_run();
    std::fs::write(&path, bytes).expect("write the floor module");
    path
}

fn floor_module_path_of_this_run() -> PathBuf {
    let name = format!("switchyard-bench-floor-{}.wasm", std::process::id());
    std::env::temp_dir().join(name)
}

/// Where `make plugins` leaves the plugin `name` built as a 0.3.0
/// component.
fn component_path(name: &str) -> PathBuf {
    workspace_root().join(format!("target/wasm32-wasip2/release/{name}.wasm"))
}

/// The target for a policy decision inside a request, in microseconds: the
/// share of decisions slower than this must stay under 1% (p99).
const DECISION_TARGET_US: f64 = 20.0;

/// Measurement settings, from the environment.
#[derive(Debug, Clone, Copy)]
struct Settings {
    /// Concurrent connections, each with one request in flight.
    concurrency: usize,
    /// Measured time per scenario.
    measure: Duration,
    /// Unmeasured time per scenario before measuring.
    warm_up: Duration,
    /// Slices the with- and without-policy scenarios are measured in,
    /// alternating, so that a change in the machine's load between them
    /// falls on both alike.
    rounds: u32,
}

impl Settings {
    fn from_env() -> Self {
        let full_run = std::env::args().any(|a| a == "--bench");
        if !full_run {
            return Self {
                concurrency: 2,
                measure: Duration::from_millis(300),
                warm_up: Duration::ZERO,
                rounds: 2,
            };
        }
        let concurrency = env_number("BENCH_CONCURRENCY").unwrap_or(32.0);
        let seconds = env_number("BENCH_SECONDS").unwrap_or(5.0);
        let rounds = env_number("BENCH_ROUNDS").unwrap_or(DEFAULT_ROUNDS);
        Self {
            concurrency: (concurrency as usize).max(1),
            measure: Duration::from_secs_f64(seconds.max(0.1)),
            warm_up: Duration::from_secs(1),
            rounds: (rounds as u32).max(1),
        }
    }
}

fn env_number(name: &str) -> Option<f64> {
    let value = std::env::var(name).ok()?;
    match value.parse() {
        Ok(number) => Some(number),
        Err(_) => panic!("{name}={value:?} is not a number"),
    }
}

/// One scenario: where to send which body.
#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    addr: SocketAddr,
    path: &'static str,
    body: Bytes,
    /// The Switchyard process serving it, whose CPU time is counted.
    proxy_pid: Option<u32>,
}

/// What one measured run saw.
#[derive(Debug)]
struct Outcome {
    name: &'static str,
    ok: usize,
    errors: usize,
    elapsed: Duration,
    /// Successful request latencies, sorted.
    latencies: Vec<Duration>,
    upstream_requests: usize,
    /// Requests per second of each measured slice, in order.
    slice_rates: Vec<f64>,
    /// CPU time the proxy used while measured, when it has one.
    proxy_cpu: Option<Duration>,
}

impl Outcome {
    /// Adds another slice of the same scenario.
    fn add(&mut self, other: Outcome) {
        self.slice_rates.extend(other.slice_rates);
        self.proxy_cpu = match (self.proxy_cpu, other.proxy_cpu) {
            (Some(mine), Some(theirs)) => Some(mine + theirs),
            _ => None,
        };
        self.ok += other.ok;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.latencies.sort_unstable();
        self.upstream_requests += other.upstream_requests;
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// The proxy's CPU time per successful request, in microseconds.
    fn proxy_cpu_us(&self) -> Option<f64> {
        let cpu = self.proxy_cpu?;
        Some(cpu.as_secs_f64() * 1e6 / self.ok.max(1) as f64)
    }

    fn percentile_ms(&self, pct: usize) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = (self.latencies.len() * pct / 100).min(self.latencies.len() - 1);
        self.latencies[rank].as_secs_f64() * 1000.0
    }
}

/// Per-connection tallies.
#[derive(Debug, Default)]
struct Tally {
    errors: usize,
    latencies: Vec<Duration>,
}

/// Sends requests back to back on one connection until `until`.
async fn connection_loop(scenario: Scenario, until: Instant) -> Tally {
    let mut tally = Tally::default();
    let Ok(stream) = TcpStream::connect(scenario.addr).await else {
        tally.errors += 1;
        return tally;
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        tally.errors += 1;
        return tally;
    };
    tokio::spawn(conn);

    while Instant::now() < until {
        let request = Request::post(scenario.path)
            .header(HOST, scenario.addr.to_string())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(scenario.body.clone()))
            .expect("valid request");
        let started = Instant::now();
        let Ok(response) = sender.send_request(request).await else {
            // The connection is gone; this worker is done.
            tally.errors += 1;
            return tally;
        };
        let status = response.status();
        let body = response.into_body().collect().await;
        if status.is_success() && body.is_ok() {
            tally.latencies.push(started.elapsed());
        } else {
            tally.errors += 1;
        }
    }
    tally
}

/// Runs `scenario` on every connection for `duration`.
async fn load(scenario: &Scenario, concurrency: usize, duration: Duration) -> (Tally, Duration) {
    let started = Instant::now();
    let until = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(connection_loop(scenario.clone(), until)))
        .collect();
    let mut total = Tally::default();
    for worker in workers {
        let tally = worker.await.expect("load worker");
        total.errors += tally.errors;
        total.latencies.extend(tally.latencies);
    }
    (total, started.elapsed())
}

/// Warms up, then measures `scenario`, counting what `upstream` received.
async fn measure(scenario: Scenario, settings: Settings, upstream: &MockUpstream) -> Outcome {
    if !settings.warm_up.is_zero() {
        load(&scenario, settings.concurrency, settings.warm_up).await;
    }
    measure_slice(&scenario, settings.concurrency, settings.measure, upstream).await
}

/// Measures `scenario` once for `duration`, warm-up done.
async fn measure_slice(
    scenario: &Scenario,
    concurrency: usize,
    duration: Duration,
    upstream: &MockUpstream,
) -> Outcome {
    let before = upstream.request_count();
    let cpu_before = scenario.proxy_pid.and_then(process_cpu);
    let (mut tally, elapsed) = load(scenario, concurrency, duration).await;
    let cpu_after = scenario.proxy_pid.and_then(process_cpu);
    let proxy_cpu = cpu_before
        .zip(cpu_after)
        .map(|(before, after)| after.saturating_sub(before));
    tally.latencies.sort_unstable();
    let ok = tally.latencies.len();
    Outcome {
        name: scenario.name,
        slice_rates: vec![ok as f64 / elapsed.as_secs_f64()],
        proxy_cpu,
        ok,
        errors: tally.errors,
        elapsed,
        latencies: tally.latencies,
        upstream_requests: upstream.request_count() - before,
    }
}

/// Warms each of `scenarios` up, runs `measuring_starts` (to read a
/// counter where measuring begins), then measures them in
/// `settings.rounds` alternating slices that add up to `settings.measure`
/// each.
async fn measure_interleaved(
    scenarios: &[Scenario],
    settings: Settings,
    upstream: &MockUpstream,
    measuring_starts: impl std::future::Future<Output = ()>,
) -> Vec<Outcome> {
    if !settings.warm_up.is_zero() {
        for scenario in scenarios {
            load(scenario, settings.concurrency, settings.warm_up).await;
        }
    }
    measuring_starts.await;
    let slice = settings.measure / settings.rounds;
    let mut outcomes: Vec<Outcome> = Vec::new();
    for _ in 0..settings.rounds {
        for (i, scenario) in scenarios.iter().enumerate() {
            let part = measure_slice(scenario, settings.concurrency, slice, upstream).await;
            match outcomes.get_mut(i) {
                Some(total) => total.add(part),
                None => outcomes.push(part),
            }
        }
    }
    outcomes
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .parse()
        .expect("loopback address")
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "{:<42} {:>10} {:>9} {:>9} {:>7} {:>10}",
        "scenario", "req/s", "p50 ms", "p99 ms", "errors", "upstream"
    );
    for o in outcomes {
        println!(
            "{:<42} {:>10.0} {:>9.2} {:>9.2} {:>7} {:>10}",
            o.name,
            o.rate(),
            o.percentile_ms(50),
            o.percentile_ms(99),
            o.errors,
            o.upstream_requests
        );
    }
}

fn print_ratio(label: &str, through: &Outcome, direct: &Outcome) {
    println!(
        "{label:<34} throughput x{:.2}, p50 x{:.2}, p99 x{:.2}",
        through.rate() / direct.rate(),
        through.percentile_ms(50) / direct.percentile_ms(50),
        through.percentile_ms(99) / direct.percentile_ms(99)
    );
}

/// The CPU time all threads of process `pid` have run, from the
/// scheduler's nanosecond counts (`/proc/PID/task/*/schedstat`); `None`
/// where they cannot be read.
fn process_cpu(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total_ns: u64 = 0;
    for task in tasks.flatten() {
        // A thread may end between listing and reading; it is skipped.
        let Ok(stats) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let on_cpu_ns = stats.split_whitespace().next()?.parse::<u64>().ok()?;
        total_ns += on_cpu_ns;
    }
    Some(Duration::from_nanos(total_ns))
}

/// The proxy's CPU time per request in `through` and in `base`, and
/// their ratio. It counts the proxy's own work rather than the rate the
/// whole set-up reaches, so the load generator's share of the machine
/// does not move it; caches shared with other work still do.
fn print_cpu_ratio(label: &str, through: &Outcome, base: &Outcome) {
    let (Some(through_us), Some(base_us)) = (through.proxy_cpu_us(), base.proxy_cpu_us()) else {
        println!("{label:<34} proxy CPU per request not measured (no /proc)");
        return;
    };
    println!(
        "{label:<34} proxy CPU per request {through_us:.1} us against {base_us:.1} us, x{:.3}",
        through_us / base_us
    );
}

/// The throughput ratio of `through` to `base` in each round (slices
/// measured back to back): their median and range. A change in the
/// machine's load during the run moves the totals' ratio; it moves few
/// rounds, so the median shows what the scenarios themselves cost.
fn print_round_ratios(label: &str, through: &Outcome, base: &Outcome) {
    let mut ratios: Vec<f64> = through
        .slice_rates
        .iter()
        .zip(&base.slice_rates)
        .map(|(through, base)| through / base)
        .collect();
    if ratios.is_empty() {
        return;
    }
    ratios.sort_by(f64::total_cmp);
    let middle = ratios.len() / 2;
    let median = if ratios.len().is_multiple_of(2) {
        (ratios[middle - 1] + ratios[middle]) / 2.0
    } else {
        ratios[middle]
    };
    println!(
        "{label:<34} throughput x{median:.2} median of {} rounds, x{:.2} to x{:.2}",
        ratios.len(),
        ratios[0],
        ratios[ratios.len() - 1]
    );
}

/// Allows this process only the CPUs `cpus` (a `taskset` list).
fn pin_this_process(cpus: &str) {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("BENCH_LOAD_CPUS needs taskset: {e}"));
    assert!(status.success(), "taskset -c {cpus} failed: {status}");
}

/// Starts Switchyard on `config`, on `cpus` if given.
async fn start_proxy(config: &str, cpus: Option<&str>) -> Switchyard {
    match cpus {
        Some(cpus) => Switchyard::start_on_cpus(config, cpus).await,
        None => Switchyard::start_forgetting_logs(config).await,
    }
}

async fn run(settings: Settings, proxy_cpus: Option<String>) -> bool {
    let mock = MockUpstream::start_unrecorded().await;
    let upstream = mock.addr();

    // One proxy without a policy: a plain pool and a coalescing pool.
    let mut config = server_toml();
    config.push_str(&pool_toml("small", &mock.url(), "smollm2"));
    config.push_str(&pool_toml("batched", &mock.url(), "smollm2"));
    config.push_str("[pool.batch]\nmax_batch = 8\nmax_wait_ms = 5\n");
    let plain = start_proxy(&config, proxy_cpus.as_deref()).await;
    let proxy = addr_of(&plain.api_url());

    let chat = |model: &str| -> Bytes {
        let body = json!({
            "model": model, "max_tokens": 16,
            "messages": [{"role": "user", "content": "how fast is this proxy"}],
        });
        Bytes::from(body.to_string())
    };
    let embedding = |model: &str| -> Bytes {
        Bytes::from(json!({"model": model, "input": "one input"}).to_string())
    };
    let scenario = |name, addr, path, body| Scenario {
        name,
        addr,
        path,
        body,
        proxy_pid: None,
    };
    let chat_path = "/v1/chat/completions";
    let emb_path = "/v1/embeddings";

    println!(
        "switchyard throughput: {} connections, {:?} per scenario",
        settings.concurrency, settings.measure
    );
    let mut outcomes = Vec::new();
    let direct_chat = scenario("chat direct", upstream, chat_path, chat("mock"));
    outcomes.push(measure(direct_chat, settings, &mock).await);

    // The policy scenarios need the plugins; say so rather than fail.
    // cost_router runs as the SDK builds it by default (a 0.4.0 core
    // module), as a 0.3.0 component, and beside the hand-written floor;
    // or only the plugin `BENCH_POLICY_PLUGIN` names is measured.
    let cost_router_config = "{ long_prompt_chars = 2000 }".to_string();
    let mut policies = Vec::new();
    match std::env::var_os("BENCH_POLICY_PLUGIN") {
        Some(plugin) => {
            // Cargo runs benches in `proxy/`; a relative path is meant
            // from the workspace root, where `make` and the README run.
            let config = std::env::var("BENCH_POLICY_CONFIG").unwrap_or_else(|_| "{}".into());
            let path = workspace_root().join(plugin);
            policies.push((OWN_PLUGIN_SCENARIO, path, config));
        }
        None => {
            let config = &cost_router_config;
            policies.push((POLICY_SCENARIO, plugin_path("cost_router"), config.clone()));
            let component = component_path("cost_router");
            policies.push((COMPONENT_SCENARIO, component, config.clone()));
            policies.push((FLOOR_SCENARIO, floor_module_path(), "{}".into()));
        }
    }
    let mut with_policy = Vec::new();
    for (name, plugin, plugin_config) in policies {
        if !plugin.is_file() {
            let hint = match name {
                OWN_PLUGIN_SCENARIO => "check BENCH_POLICY_PLUGIN",
                _ => "run `make plugins`",
            };
            println!("skipping {name:?}: {} missing; {hint}", plugin.display());
            continue;
        }
        let mut config = server_toml();
        config.push_str(&pool_toml("small", &mock.url(), "smollm2"));
        config.push_str(&pool_toml("large", &mock.url(), "big"));
        config.push_str(&format!(
            "\n[policy]\nplugin = \"{}\"\nconfig = {plugin_config}\n",
            plugin.display()
        ));
        with_policy.push((name, start_proxy(&config, proxy_cpus.as_deref()).await));
    }

    // With and without a policy alternate, so that all see the same
    // machine; the decisions counted are those of the measured slices.
    let mut chat_scenarios = vec![Scenario {
        proxy_pid: Some(plain.pid()),
        ..scenario("chat via switchyard", proxy, chat_path, chat("small"))
    }];
    for (name, sw) in &with_policy {
        let addr = addr_of(&sw.api_url());
        chat_scenarios.push(Scenario {
            proxy_pid: Some(sw.pid()),
            ..scenario(name, addr, chat_path, chat("auto"))
        });
    }
    let mut decisions_before = Vec::new();
    let measuring_starts = async {
        for (_, sw) in &with_policy {
            decisions_before.push(decision_buckets(&metrics_text(sw).await));
        }
    };
    outcomes.extend(measure_interleaved(&chat_scenarios, settings, &mock, measuring_starts).await);
    for ((name, sw), before) in with_policy.iter().zip(&decisions_before) {
        let after = decision_buckets(&metrics_text(sw).await);
        in_request_policy_latency(name, before, &after);
    }

    let direct_emb = scenario("embeddings direct", upstream, emb_path, embedding("mock"));
    outcomes.push(measure(direct_emb, settings, &mock).await);
    let batched = scenario(
        "embeddings via switchyard, batched",
        proxy,
        emb_path,
        embedding("batched"),
    );
    outcomes.push(measure(batched, settings, &mock).await);

    println!();
    print_table(&outcomes);
    println!();
    let by_name = |name: &str| outcomes.iter().find(|o| o.name == name);
    if let (Some(direct), Some(through)) = (by_name("chat direct"), by_name("chat via switchyard"))
    {
        print_ratio("chat: switchyard / direct", through, direct);
    }
    if let (Some(direct), Some(through)) = (by_name("chat direct"), by_name(POLICY_SCENARIO)) {
        print_ratio("chat: switchyard+policy / direct", through, direct);
    }
    if let (Some(direct), Some(through)) = (
        by_name("embeddings direct"),
        by_name("embeddings via switchyard, batched"),
    ) {
        print_ratio("embeddings: batched / direct", through, direct);
        let per_upstream = through.ok as f64 / through.upstream_requests.max(1) as f64;
        println!(
            "{:<34} {} client requests in {} upstream requests ({per_upstream:.2} each)",
            "embeddings: coalescing", through.ok, through.upstream_requests
        );
    }

    let with_policy_ratios = [
        (POLICY_SCENARIO, "chat: with policy / without"),
        (OWN_PLUGIN_SCENARIO, "chat: with policy / without"),
        (COMPONENT_SCENARIO, "chat: 0.3.0 policy / without"),
        (FLOOR_SCENARIO, "chat: hand-written / without"),
    ];
    if let Some(plain) = by_name("chat via switchyard") {
        for (name, label) in with_policy_ratios {
            if let Some(routed) = by_name(name) {
                print_ratio(label, routed, plain);
                print_round_ratios("  by round", routed, plain);
                print_cpu_ratio("  CPU", routed, plain);
            }
        }
    }
    let calls = if settings.measure >= Duration::from_secs(1) {
        POLICY_CALLS
    } else {
        200
    };
    policy_call_latency(calls);

    // A scenario where nothing succeeded means a broken set-up, not a slow one.
    let _ = std::fs::remove_file(floor_module_path_of_this_run());
    let broken: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.ok == 0)
        .map(|o| o.name)
        .collect();
    if !broken.is_empty() {
        println!("\nno request succeeded in: {broken:?}\n{}", plain.output());
    }
    broken.is_empty()
}

/// The cumulative buckets of Switchyard's policy decision histogram, as
/// (upper bound in seconds, decisions at or under it), in bound order.
fn decision_buckets(metrics: &str) -> Vec<(f64, f64)> {
    let name = "switchyard_policy_decision_duration_seconds_bucket";
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = line.rsplit(' ').next()?.parse().ok()?;
            Some((bound, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Prints the p50 and p99 of the policy decisions made inside the
/// measured requests (the histogram `after` less `before`), each as the
/// bucket it falls in, and the share slower than the target.
fn in_request_policy_latency(scenario: &str, before: &[(f64, f64)], after: &[(f64, f64)]) {
    let earlier = |bound: f64| {
        before
            .iter()
            .find(|(b, _)| *b == bound)
            .map_or(0.0, |(_, count)| *count)
    };
    let buckets: Vec<(f64, f64)> = after
        .iter()
        .map(|&(bound, count)| (bound, count - earlier(bound)))
        .collect();
    let Some(&(_, total)) = buckets.last().filter(|(_, total)| *total > 0.0) else {
        println!("\n{scenario}: no policy decisions in /metrics");
        return;
    };
    // The bucket holding quantile `q`, as (lower, upper] in microseconds.
    let at = |q: f64| {
        let mut lower = 0.0;
        for &(bound, count) in &buckets {
            if count >= q * total {
                return format!("{lower:.1}..{:.1} us", bound * 1e6);
            }
            lower = bound * 1e6;
        }
        "unknown".to_string()
    };
    let target = DECISION_TARGET_US / 1e6;
    let over = match buckets
        .iter()
        .find(|(bound, _)| (*bound - target).abs() < 1e-12)
    {
        Some((_, within)) => format!("{:.2}%", (total - within) / total * 100.0),
        None => "unknown (no bucket bound at the target)".to_string(),
    };
    println!(
        "\n{scenario}: route decisions inside measured requests ({total} of \
         them): p50 in {}, p99 in {}; over {DECISION_TARGET_US} us: {over}",
        at(0.5),
        at(0.99)
    );
}

/// Times `calls` calls of each hook into a warm instance and prints the
/// p50 and p99 in microseconds. The request is a typical chat turn: four
/// messages (about 1,500 characters) and eight headers. `cost_router` is
/// timed as each interface version builds it, alternating: a 0.4.0 core
/// module, a 0.3.0 component (the request read on demand) and a 0.2.0
/// component (the request copied whole into the plugin), so the ratios
/// show what each interface change saves.
fn policy_call_latency(calls: usize) {
    let request = Arc::new(typical_chat_request());
    let logprobs = vec![-0.1_f32; 16];
    let answer = ReviewAnswer {
        pool: "small".into(),
        text: "It is fast enough for a sidecar.".into(),
        finish_reason: "stop".into(),
        completion_tokens: 16,
        summary: LogprobSummary::of(&logprobs, -2.3),
        token_logprobs: logprobs,
        latency_ms: 40,
        partial: false,
    };
    let load = |path: PathBuf| -> Option<Policy> {
        if !path.is_file() {
            println!("skipping {}: not built; run `make plugins`", path.display());
            return None;
        }
        Some(Policy::load(&PolicySettings::new(&path)).expect("load plugin"))
    };

    println!("\npolicy calls into a warm instance, {calls} each:");
    let builds = [
        ("cost_router route (0.4.0)", plugin_path("cost_router")),
        ("cost_router route (0.3.0)", component_path("cost_router")),
        (
            "cost_router route (0.2.0)",
            workspace_root().join("proxy/policy/tests/fixtures/v0.2/cost_router.wasm"),
        ),
    ];
    let loaded: Vec<(&str, Policy)> = builds
        .into_iter()
        .filter_map(|(name, path)| Some((name, load(path)?)))
        .collect();
    let mut timings = vec![Vec::new(); loaded.len()];
    for _ in 0..BENCH_CALL_ROUNDS {
        for ((_, policy), times) in loaded.iter().zip(&mut timings) {
            times.extend(time_calls(calls / BENCH_CALL_ROUNDS, || {
                policy.route(&request).expect("route call");
            }));
        }
    }
    let p50 = |s: &[Duration]| s[s.len() / 2].as_secs_f64();
    for ((name, _), times) in loaded.iter().zip(&mut timings) {
        times.sort_unstable();
        print_latency(name, times);
    }
    if let Some((newest, others)) = timings.split_first() {
        for ((name, _), times) in loaded.iter().skip(1).zip(others) {
            println!("  0.4.0 / {name} at p50: x{:.2}", p50(newest) / p50(times));
        }
    }
    if let Some(cascade) = load(plugin_path("confidence_cascade")) {
        let route = time_calls(calls, || {
            cascade.route(&request).expect("route call");
        });
        print_latency("confidence_cascade route", &route);
        let reviewed = time_calls(calls, || {
            cascade.review(&request, &answer).expect("review call");
        });
        print_latency("confidence_cascade review", &reviewed);
    }
}

/// Slices the interface versions' calls alternate in.
const BENCH_CALL_ROUNDS: usize = 10;

/// A chat turn as a client sends it: a system prompt, two earlier turns
/// and a question, with the headers an HTTP client and a tracing layer
/// add (credentials are removed before a plugin sees them).
fn typical_chat_request() -> RouteRequest {
    let mut request = RouteRequest::new(Endpoint::ChatCompletions, "auto");
    let turns = [
        (
            "system",
            "You are a support assistant for a hosting company. ".repeat(6),
        ),
        (
            "user",
            "My deploy fails with exit code 137 after the build step. ".repeat(5),
        ),
        (
            "assistant",
            "Exit code 137 means the process was killed, usually for memory. ".repeat(5),
        ),
        (
            "user",
            "How much memory does the build step get by default?".to_string(),
        ),
    ];
    for (role, content) in turns {
        request = request.with_message(role, &content);
    }
    let headers = [
        ("host", "switchyard.internal:8080"),
        ("content-type", "application/json"),
        ("content-length", "1873"),
        ("user-agent", "OpenAI/Python 1.54.0"),
        ("accept", "application/json"),
        ("x-request-id", "3f2b8c1e-2d4a-4c7e-9a51-6b0f7d2e8a90"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-tenant", "acme"),
    ];
    for (name, value) in headers {
        request = request.with_header(name, value);
    }
    request
}

fn time_calls(calls: usize, mut call: impl FnMut()) -> Vec<Duration> {
    // Warm the instance and caches first.
    for _ in 0..calls.min(100) {
        call();
    }
    let mut samples: Vec<Duration> = (0..calls)
        .map(|_| {
            let started = Instant::now();
            call();
            started.elapsed()
        })
        .collect();
    samples.sort_unstable();
    samples
}

fn print_latency(label: &str, sorted: &[Duration]) {
    let at = |pct: usize| {
        let i = (sorted.len() * pct / 100).min(sorted.len().saturating_sub(1));
        sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "{label:<34} p50 {:>7.2} us   p99 {:>7.2} us",
        at(50),
        at(99)
    );
}

fn main() -> std::process::ExitCode {
    let settings = Settings::from_env();
    let proxy_cpus = std::env::var("BENCH_PROXY_CPUS").ok();
    if let Ok(cpus) = std::env::var("BENCH_LOAD_CPUS") {
        // Before the runtime starts: its threads inherit the main thread's
        // CPUs.
        pin_this_process(&cpus);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if runtime.block_on(run(settings, proxy_cpus)) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
