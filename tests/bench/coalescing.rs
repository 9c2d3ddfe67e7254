//! Coalescing under open-loop load: no coalescing, the fixed window and
//! the adaptive window, against an upstream that serves one batch at a
//! time at 20 ms + 1 ms per item.
//!
//! `cargo bench -p switchyard --bench coalescing` starts a costed
//! `MockUpstream` and the release `switchyard` binary with three pools on
//! it: `plain` (no `[pool.batch]`), `fixed` and `adaptive` (both
//! `max_batch = 32`, `max_wait_ms = 20`, `max_inflight = 1`, as the
//! upstream serves one batch at a time). Each row offers Poisson arrivals
//! of one-input embeddings requests at 10%, 50%, 100% and 300% of the
//! no-batching capacity (1 / 21 ms ≈ 47.6 requests/s) for `BENCH_SECONDS`
//! (default 10), every request carrying a deadline of `BENCH_DEADLINE_MS`
//! (default 105, five single-request costs). Latency runs from a
//! request's scheduled arrival, so a slow answer cannot delay the next
//! arrival (no coordinated omission). Requests still unanswered 5 s after
//! the last arrival are dropped and counted as unfinished.
//!
//! Two more rows overload the adaptive window past what it can batch:
//! pool `adapt-b4` is `adaptive` with `max_batch = 4` (at most 4 items per
//! 24 ms, about 167 requests/s, 3.5 times the no-batching capacity),
//! offered 300% and 600%. There admission control must turn the excess
//! away fast while what it admits still meets its deadline.
//!
//! Per row it prints: requests/s answered 200, requests/s that met the
//! deadline, p50/p99 latency of those answered, mean items per upstream
//! request, rejections (429/503/504) and their p99 latency, and the share
//! of accepted requests that met the deadline. A summary follows: the
//! requests/s that met their deadline at 100% load, plain against
//! adaptive, and for every adaptive row that rejected, the rejections'
//! p99 and the accepted requests' deadline share against their targets
//! (under 5 ms; at least 99%). It asserts nothing about timing. Without
//! `--bench` (as `cargo test --benches` runs it) it only smoke-tests a
//! few short rows.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a benchmark binary reports on stdout and fails by panicking"
)]

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use support::{mock_upstream::Cost, pool_toml, server_toml, MockUpstream, Switchyard};

/// The upstream's cost: 20 ms per batch plus 1 ms per item.
const COST: Cost = Cost {
    fixed_ms: 20,
    per_item_ms: 1,
    serial: true,
};

/// Requests per second the upstream serves one at a time.
const PLAIN_CAPACITY: f64 = 1000.0 / 21.0;

/// How long unanswered requests may finish after the last arrival.
const DRAIN: Duration = Duration::from_secs(5);

/// Items per upstream request of the overloaded adaptive pool.
const SMALL_BATCH: usize = 4;

/// Targets of the overload rows.
const REJECT_P99_TARGET_MS: f64 = 5.0;
const MET_SHARE_TARGET: f64 = 99.0;

#[derive(Debug, Clone, Copy)]
struct Settings {
    measure: Duration,
    deadline_ms: u64,
    loads: &'static [f64],
    /// Loads offered to `adapt-b4`, past its batching capacity.
    overloads: &'static [f64],
}

impl Settings {
    fn from_env() -> Self {
        let deadline_ms = env_number("BENCH_DEADLINE_MS").unwrap_or(105.0) as u64;
        if !std::env::args().any(|a| a == "--bench") {
            return Self {
                measure: Duration::from_millis(500),
                deadline_ms,
                loads: &[0.1, 1.0],
                overloads: &[6.0],
            };
        }
        let seconds = env_number("BENCH_SECONDS").unwrap_or(10.0);
        Self {
            measure: Duration::from_secs_f64(seconds.max(0.5)),
            deadline_ms,
            loads: &[0.1, 0.5, 1.0, 3.0],
            overloads: &[3.0, 6.0],
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

/// What one request saw.
#[derive(Debug, Clone, Copy)]
enum Seen {
    Answered(Duration),
    Rejected(Duration),
    Failed,
}

/// One row of the table.
#[derive(Debug)]
struct Row {
    mode: &'static str,
    load: f64,
    offered: usize,
    answered: Vec<Duration>,
    rejected: Vec<Duration>,
    failed: usize,
    unfinished: usize,
    upstream_requests: usize,
    measure: Duration,
    deadline: Duration,
}

fn percentile_ms(sorted: &[Duration], pct: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (sorted.len() * pct / 100).min(sorted.len() - 1);
    sorted[rank].as_secs_f64() * 1000.0
}

impl Row {
    /// Answered requests that met their deadline.
    fn met(&self) -> usize {
        self.answered
            .iter()
            .filter(|l| **l <= self.deadline)
            .count()
    }

    /// Percent of the accepted (not rejected) requests that met their
    /// deadline.
    fn met_share(&self) -> f64 {
        let accepted = self.answered.len() + self.failed + self.unfinished;
        100.0 * self.met() as f64 / accepted.max(1) as f64
    }

    fn print(&self) {
        let seconds = self.measure.as_secs_f64();
        let met = self.met();
        let met_share = self.met_share();
        let batch = self.answered.len() as f64 / self.upstream_requests.max(1) as f64;
        println!(
            "{:<9} {:>5.0}% {:>7.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>6.2} {:>7} {:>8.2} {:>6.1}% {:>6} {:>6}",
            self.mode,
            self.load * 100.0,
            self.offered as f64 / seconds,
            self.answered.len() as f64 / seconds,
            met as f64 / seconds,
            percentile_ms(&self.answered, 50),
            percentile_ms(&self.answered, 99),
            batch,
            self.rejected.len(),
            percentile_ms(&self.rejected, 99),
            met_share,
            self.failed,
            self.unfinished,
        );
    }
}

fn print_header() {
    println!(
        "{:<9} {:>6} {:>7} {:>8} {:>8} {:>8} {:>9} {:>6} {:>7} {:>8} {:>7} {:>6} {:>6}",
        "mode",
        "load",
        "offer/s",
        "ok/s",
        "met/s",
        "p50 ms",
        "p99 ms",
        "batch",
        "reject",
        "rej p99",
        "met",
        "failed",
        "unfin"
    );
}

/// Deadline-meeting throughput at 100% load, plain against adaptive, and
/// how each adaptive row that turned requests away did against the
/// admission-control targets.
fn print_summary(rows: &[Row]) {
    let met_per_s = |mode: &str| {
        rows.iter()
            .find(|row| row.mode == mode && row.load == 1.0)
            .map(|row| row.met() as f64 / row.measure.as_secs_f64())
    };
    println!();
    if let (Some(plain), Some(adaptive)) = (met_per_s("plain"), met_per_s("adaptive")) {
        println!(
            "at 100% load, requests/s that met the deadline: plain {plain:.1}, \
             adaptive {adaptive:.1} ({:.2}x)",
            adaptive / plain.max(f64::MIN_POSITIVE)
        );
    }
    let overloaded = rows
        .iter()
        .filter(|row| row.mode.starts_with("adapt") && !row.rejected.is_empty());
    for row in overloaded {
        let p99 = percentile_ms(&row.rejected, 99);
        let share = row.met_share();
        let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
        println!(
            "{} at {:.0}%: {} rejected, p99 {p99:.2} ms (target < {REJECT_P99_TARGET_MS} ms, \
             {}); accepted met the deadline {share:.1}% (target >= {MET_SHARE_TARGET}%, {})",
            row.mode,
            row.load * 100.0,
            row.rejected.len(),
            verdict(p99 < REJECT_P99_TARGET_MS),
            verdict(share >= MET_SHARE_TARGET),
        );
    }
}

/// A small deterministic generator for inter-arrival times (xorshift).
struct Rng(u64);

impl Rng {
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// Offers Poisson arrivals at `rate` per second to `model` for
/// `settings.measure`.
async fn run_row(
    mode: &'static str,
    load: f64,
    api: &str,
    mock: &MockUpstream,
    settings: Settings,
) -> Row {
    let client = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap();
    let rate = load * PLAIN_CAPACITY;
    let url = format!("{api}/v1/embeddings");
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (load * 1000.0) as u64);
    let before = mock.request_count();

    // Arrivals are scheduled up front from the row's start.
    let start = Instant::now();
    let mut at = Duration::ZERO;
    let mut tasks = Vec::new();
    let mut k = 0u64;
    loop {
        at += Duration::from_secs_f64(-rng.unit().ln() / rate);
        if at >= settings.measure {
            break;
        }
        let scheduled = start + at;
        tokio::time::sleep_until(scheduled).await;
        let body = json!({"model": mode, "input": format!("request {k} of {mode}")});
        let request = client
            .post(&url)
            .header("x-switchyard-deadline-ms", settings.deadline_ms)
            .json(&body);
        k += 1;
        tasks.push(tokio::spawn(async move {
            let Ok(response) = request.send().await else {
                return Seen::Failed;
            };
            let status = response.status().as_u16();
            let ok = response.bytes().await.is_ok();
            let elapsed = scheduled.elapsed();
            match status {
                200 if ok => Seen::Answered(elapsed),
                429 | 503 | 504 => Seen::Rejected(elapsed),
                _ => Seen::Failed,
            }
        }));
    }

    // Whatever is not answered soon after the last arrival is dropped,
    // which also frees the upstream for the next row.
    let offered = tasks.len();
    let drain_until = Instant::now() + DRAIN;
    let mut row = Row {
        mode,
        load,
        offered,
        answered: Vec::new(),
        rejected: Vec::new(),
        failed: 0,
        unfinished: 0,
        upstream_requests: 0,
        measure: settings.measure,
        deadline: Duration::from_millis(settings.deadline_ms),
    };
    for mut task in tasks {
        match tokio::time::timeout_at(drain_until, &mut task).await {
            Ok(Ok(Seen::Answered(latency))) => row.answered.push(latency),
            Ok(Ok(Seen::Rejected(latency))) => row.rejected.push(latency),
            Ok(Ok(Seen::Failed) | Err(_)) => row.failed += 1,
            Err(_) => {
                task.abort();
                row.unfinished += 1;
            }
        }
    }
    row.upstream_requests = mock.request_count() - before;
    row.answered.sort_unstable();
    row.rejected.sort_unstable();
    drop(client);
    // Let dropped requests leave the upstream before the next row.
    tokio::time::sleep(Duration::from_secs(1)).await;
    row
}

async fn run(settings: Settings) -> bool {
    let mock = MockUpstream::start_costed(COST, false).await;
    let mut config = server_toml();
    config.push_str(&pool_toml("plain", &mock.url(), "m"));
    let batched = [
        ("fixed", "fixed", 32),
        ("adaptive", "adaptive", 32),
        ("adapt-b4", "adaptive", SMALL_BATCH),
    ];
    for (pool, mode, max_batch) in batched {
        config.push_str(&pool_toml(pool, &mock.url(), "m"));
        config.push_str(&format!(
            "[pool.batch]\nmode = \"{mode}\"\nmax_batch = {max_batch}\n\
             max_wait_ms = 20\nmax_inflight = 1\n"
        ));
    }
    let sw = Switchyard::start_forgetting_logs(&config).await;
    let api = sw.api_url();

    println!(
        "switchyard coalescing: upstream 20 ms + 1 ms/item, one batch at a time; \
         {:?} per row, deadline {} ms, plain capacity {PLAIN_CAPACITY:.1} req/s",
        settings.measure, settings.deadline_ms
    );
    print_header();
    let mut rows = Vec::new();
    let plan = ["plain", "fixed", "adaptive"]
        .iter()
        .flat_map(|mode| settings.loads.iter().map(move |load| (*mode, *load)))
        .chain(settings.overloads.iter().map(|load| ("adapt-b4", *load)));
    for (mode, load) in plan {
        let row = run_row(mode, load, &api, &mock, settings).await;
        row.print();
        rows.push(row);
    }
    print_summary(&rows);
    let healthy = rows.iter().all(|row| !row.answered.is_empty());
    if !healthy {
        println!("\na row had no answered request:\n{}", sw.output());
    }
    healthy
}

fn main() -> std::process::ExitCode {
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if runtime.block_on(run(settings)) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
