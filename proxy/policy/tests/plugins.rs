//! Loads the real plugins (`cost_router.wasm`, `test_faults.wasm`) into the
//! policy host and checks routing, fault handling and sandbox limits.
//!
//! The plugins are not built here: run `make plugins` first. A missing
//! plugin fails the test with that instruction rather than skipping it.

#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly"
)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use switchyard_policy::{
    CallError, Endpoint, LoadError, LogprobSummary, Policy, PolicySettings, ReviewAnswer,
    RouteDecision, RouteOutcome, RouteRequest, Verdict,
};

const BUILD_PLUGINS: &str = "run `make plugins` (or `cargo build -p \
    cost-router -p test-faults -p confidence-cascade --release --target \
    wasm32-unknown-unknown`, and the same with `--target wasm32-wasip2`) \
    first";

/// Deadline of the shared fault policy, in ms: short enough that `spin`
/// tests are quick, long enough that ordinary calls on a loaded two-core
/// machine never hit it.
const FAULTS_TIMEOUT_MS: u64 = 200;
/// Memory cap of the shared fault policy: small so `grow` tests are quick.
const FAULTS_MAX_MEMORY_BYTES: u64 = 16 << 20;

/// Path of a plugin as the SDK builds it by default, a 0.4.0 core
/// module; fails the test if it is missing.
fn plugin(file: &str) -> PathBuf {
    built("wasm32-unknown-unknown", file)
}

/// Path of a plugin built as a 0.3.0 component.
fn component_plugin(file: &str) -> PathBuf {
    built("wasm32-wasip2", file)
}

fn built(target: &str, file: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target")
        .join(target)
        .join("release")
        .join(file);
    assert!(
        path.is_file(),
        "{} is missing: {BUILD_PLUGINS}",
        path.display()
    );
    path
}

fn load(settings: &PolicySettings) -> Policy {
    Policy::load(settings).unwrap_or_else(|e| panic!("load failed: {e}"))
}

fn load_err(settings: &PolicySettings) -> LoadError {
    match Policy::load(settings) {
        Ok(policy) => panic!("{policy:?} loaded but should not have"),
        Err(err) => err,
    }
}

/// cost-router with a 100-character threshold, shared by tests.
fn router() -> &'static Policy {
    static ROUTER: OnceLock<Policy> = OnceLock::new();
    ROUTER.get_or_init(|| {
        load(
            &PolicySettings::new(plugin("cost_router.wasm"))
                .with_config(json!({ "long_prompt_chars": 100 })),
        )
    })
}

/// test-faults with a short deadline and small memory, shared by tests.
fn faults() -> &'static Policy {
    static FAULTS: OnceLock<Policy> = OnceLock::new();
    FAULTS.get_or_init(|| {
        load(
            &PolicySettings::new(plugin("test_faults.wasm"))
                .with_timeout_ms(FAULTS_TIMEOUT_MS)
                .with_max_memory_bytes(FAULTS_MAX_MEMORY_BYTES),
        )
    })
}

fn chat(model: &str) -> RouteRequest {
    RouteRequest::new(Endpoint::ChatCompletions, model)
}

fn pool(outcome: Result<RouteOutcome, CallError>) -> String {
    match outcome {
        Ok(RouteOutcome::Route(RouteDecision { pool, .. })) => pool,
        other => panic!("expected a route, got {other:?}"),
    }
}

/// The next ordinary call succeeds, i.e. a failed instance was not reused
/// or was replaced.
fn assert_recovers(policy: &Policy) {
    for _ in 0..3 {
        assert_eq!(pool(policy.route(&Arc::new(chat("small")))), "small");
    }
}

#[test]
fn cost_router_sends_short_auto_requests_to_small_pool() {
    let mut req = chat("auto");
    req.prompt_chars = 100;
    assert_eq!(pool(router().route(&Arc::new(req))), "small");
}

#[test]
fn cost_router_sends_long_or_premium_auto_requests_to_large_pool() {
    let mut long = chat("auto");
    long.prompt_chars = 101;
    assert_eq!(pool(router().route(&Arc::new(long))), "large");

    // The proxy hands header names lowercase; the value's case is free.
    let premium = chat("auto").with_header("x-tier", "PREMIUM");
    assert_eq!(pool(router().route(&Arc::new(premium))), "large");

    let standard = chat("auto").with_header("x-tier", "standard");
    assert_eq!(pool(router().route(&Arc::new(standard))), "small");
}

#[test]
fn cost_router_sends_named_models_to_their_own_pool() {
    let req = RouteRequest::new(Endpoint::Embeddings, "bge-small").with_prompt(&"x".repeat(500));
    assert_eq!(pool(router().route(&Arc::new(req))), "bge-small");
}

#[test]
fn cost_router_reports_name_and_version() {
    assert_eq!(router().name(), "cost_router");
    let version = router().version();
    assert_eq!(version.len(), 12, "{version}");
    assert!(version.chars().all(|c| c.is_ascii_hexdigit()), "{version}");
}

#[test]
fn cost_router_bad_config_fails_load_naming_key_and_path() {
    let settings = PolicySettings::new(plugin("cost_router.wasm"))
        .with_config(json!({ "long_prompt_chars": "x" }));
    let err = load_err(&settings);
    assert!(matches!(err, LoadError::Init { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("cost_router.wasm"), "{msg}");
    assert!(msg.contains("long_prompt_chars"), "{msg}");
}

#[test]
fn trap_is_reported_and_next_call_succeeds() {
    let err = faults().route(&Arc::new(chat("trap"))).unwrap_err();
    assert_eq!(err.kind(), "trap", "{err}");
    assert_eq!(err.plugin(), "test_faults");
    assert!(err.to_string().contains("test_faults"), "{err}");
    assert_recovers(faults());
}

#[test]
fn spin_is_stopped_by_deadline_and_next_call_succeeds() {
    let start = Instant::now();
    let err = faults().route(&Arc::new(chat("spin"))).unwrap_err();
    assert_eq!(err.kind(), "timeout", "{err}");
    // Only a sanity bound: timing on a loaded CI machine varies.
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_recovers(faults());
}

#[test]
fn grow_hits_memory_limit_and_next_call_succeeds() {
    let err = faults().route(&Arc::new(chat("grow"))).unwrap_err();
    assert_eq!(err.kind(), "memory", "{err}");
    assert!(err.to_string().contains("16777216 bytes"), "{err}");
    assert_recovers(faults());
}

#[test]
fn reject_returns_status_and_message() {
    let outcome = faults().route(&Arc::new(chat("reject"))).unwrap();
    assert_eq!(
        outcome,
        RouteOutcome::Reject {
            status: 403,
            message: "rejected by policy".into()
        }
    );
}

#[test]
fn cap_routes_to_small_with_cap_of_five() {
    let outcome = faults().route(&Arc::new(chat("cap"))).unwrap();
    assert_eq!(
        outcome,
        RouteOutcome::Route(RouteDecision {
            pool: "small".into(),
            max_tokens_cap: Some(5),
            escalate_to: None,
            attributes: Vec::new(),
        })
    );
}

#[test]
fn host_clock_is_wall_clock_in_ms() {
    let now = || {
        let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        u64::try_from(d.as_millis()).unwrap()
    };
    let before = now();
    let plugin_ms: u64 = pool(faults().route(&Arc::new(chat("clock"))))
        .parse()
        .unwrap();
    assert!((before..=now()).contains(&plugin_ms), "{plugin_ms}");
}

#[test]
fn counters_beyond_the_bound_do_not_fail_calls() {
    // test-faults adds to 100 names; the host keeps 64 and drops the rest.
    for _ in 0..2 {
        assert_eq!(pool(faults().route(&Arc::new(chat("count")))), "count");
    }
}

#[test]
fn init_error_is_a_load_error_with_the_plugin_message() {
    let settings = PolicySettings::new(plugin("test_faults.wasm"))
        .with_config(json!({ "fail": "key zzz is wrong" }));
    let err = load_err(&settings);
    assert!(matches!(err, LoadError::Init { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("key zzz is wrong"), "{msg}");
    assert!(msg.contains("test_faults.wasm"), "{msg}");
}

#[test]
fn a_build_that_fails_its_own_fixtures_does_not_load() {
    // misroute sends everything to one pool, as a broken build might; the
    // plugin's fixture expects model `small` to reach pool `small`.
    let settings =
        PolicySettings::new(plugin("test_faults.wasm")).with_config(json!({ "misroute": true }));
    let err = load_err(&settings);
    assert!(matches!(err, LoadError::Fixture { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("a plain model goes to the pool of that name"),
        "{msg}"
    );
    assert!(
        msg.contains(r#"routed to "misrouted", expected "small""#),
        "{msg}"
    );
}

#[test]
fn fixtures_with_their_own_config_hold_whatever_the_deployment_config() {
    // tiered's fixtures name premium tenant acme in their own config; the
    // deployment's config names none and another large pool.
    let settings = PolicySettings::new(plugin("tiered.wasm"))
        .with_config(json!({ "large_pool": "huge", "premium_tenants": [] }));
    let policy = load(&settings);

    let req = chat("auto").with_header("x-tier", "premium");
    assert_eq!(pool(policy.route(&Arc::new(req))), "huge");
}

#[test]
fn shipped_fixtures_are_found_in_the_component() {
    let bytes = std::fs::read(plugin("tiered.wasm")).unwrap();
    let fixtures = switchyard_policy::fixtures::embedded(&bytes)
        .unwrap()
        .expect("tiered ships fixtures");
    assert_eq!(fixtures.cases.len(), 4);
    assert!(fixtures.config.is_some());

    let bytes = std::fs::read(plugin("cost_router.wasm")).unwrap();
    assert!(switchyard_policy::fixtures::embedded(&bytes)
        .unwrap()
        .is_none());
}

#[test]
fn init_panic_is_a_load_error_of_kind_trap() {
    let settings =
        PolicySettings::new(plugin("test_faults.wasm")).with_config(json!({ "panic": true }));
    match load_err(&settings) {
        LoadError::InitFailed { source, .. } => {
            assert_eq!(source.kind(), "trap", "{source}");
        }
        other => panic!("expected InitFailed, got {other:?}"),
    }
}

#[test]
fn memory_cap_below_initial_size_fails_load_as_memory() {
    let settings = PolicySettings::new(plugin("test_faults.wasm")).with_max_memory_bytes(64 * 1024);
    match load_err(&settings) {
        LoadError::InitFailed { source, .. } => {
            assert_eq!(source.kind(), "memory", "{source}");
        }
        other => panic!("expected InitFailed, got {other:?}"),
    }
}

#[test]
fn missing_plugin_file_says_to_run_make_plugins() {
    let err = load_err(&PolicySettings::new("/nonexistent/missing.wasm"));
    assert!(matches!(err, LoadError::Missing { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/missing.wasm"), "{msg}");
    assert!(msg.contains("make plugins"), "{msg}");
}

#[test]
fn non_component_file_fails_to_compile() {
    let path =
        std::env::temp_dir().join(format!("switchyard-not-wasm-{}.wasm", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(b"not wasm"))
        .unwrap();
    let err = load_err(&PolicySettings::new(&path));
    let _ = std::fs::remove_file(&path);
    assert!(matches!(err, LoadError::Compile { .. }), "{err:?}");
    assert!(err.to_string().contains("wasm32-unknown-unknown"), "{err}");
}

#[test]
fn concurrent_calls_from_many_threads_all_answer() {
    const THREADS: usize = 8;
    const CALLS: usize = 100;
    let policy = faults();
    thread::scope(|scope| {
        for t in 0..THREADS {
            scope.spawn(move || {
                for i in 0..CALLS {
                    // Interleave traps so that instances are replaced
                    // while other threads are using theirs.
                    if i % 25 == 7 {
                        let err = policy.route(&Arc::new(chat("trap"))).unwrap_err();
                        assert_eq!(err.kind(), "trap");
                        continue;
                    }
                    let model = format!("pool-{t}-{i}");
                    assert_eq!(pool(policy.route(&Arc::new(chat(&model)))), model);
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_stdio_and_faults_are_safe_on_tokio_workers() {
    // wasmtime-wasi's blocking stdio calls panic on a runtime worker
    // thread; the host links non-blocking ones instead. `print` writes to
    // stdout and stderr; `grow` makes std write its allocation failure.
    let policy = faults();
    assert_eq!(pool(policy.route(&Arc::new(chat("print")))), "print");
    assert_eq!(
        policy.route(&Arc::new(chat("grow"))).unwrap_err().kind(),
        "memory"
    );
    let spawned = tokio::spawn(async { pool(faults().route(&Arc::new(chat("print")))) });
    assert_eq!(spawned.await.unwrap(), "print");
}

/// A complete small answer with `text` and token `logprobs`.
fn answer(text: &str, logprobs: &[f32]) -> ReviewAnswer {
    ReviewAnswer {
        pool: "small".into(),
        text: text.into(),
        finish_reason: "stop".into(),
        completion_tokens: logprobs.len() as u32,
        token_logprobs: logprobs.to_vec(),
        summary: LogprobSummary::of(logprobs, -2.3),
        latency_ms: 12,
        partial: false,
    }
}

#[test]
fn cascade_route_carries_its_escalation_pool() {
    let outcome = faults().route(&Arc::new(chat("cascade"))).unwrap();
    let RouteOutcome::Route(decision) = outcome else {
        panic!("expected a route, got {outcome:?}");
    };
    assert_eq!(decision.pool, "small");
    assert_eq!(decision.escalate_to.as_deref(), Some("large"));
}

#[test]
fn review_accepts_or_escalates_as_the_plugin_says() {
    let req = Arc::new(chat("cascade"));
    let accept = faults().review(&req, &answer("fine", &[-0.1])).unwrap();
    assert_eq!(accept, Verdict::Accept);
    let escalate = faults()
        .review(&req, &answer("escalate:huge", &[]))
        .unwrap();
    assert_eq!(
        escalate,
        Verdict::Escalate {
            pool: "huge".into(),
            reason: "asked".into()
        }
    );
}

#[test]
fn review_trap_and_spin_fail_the_call_and_the_next_one_succeeds() {
    let err = faults()
        .review(&Arc::new(chat("trap")), &answer("x", &[]))
        .unwrap_err();
    assert_eq!(err.kind(), "trap", "{err}");
    let err = faults()
        .review(&Arc::new(chat("spin")), &answer("x", &[]))
        .unwrap_err();
    assert_eq!(err.kind(), "timeout", "{err}");
    assert_recovers(faults());
}

#[test]
fn confidence_cascade_escalates_on_a_low_mean_logprob() {
    let policy = load(
        &PolicySettings::new(plugin("confidence_cascade.wasm"))
            .with_config(json!({ "min_mean_logprob": -1.0 })),
    );
    let req = Arc::new(chat("auto"));
    let sure = policy
        .review(&req, &answer("Paris", &[-0.1, -0.3]))
        .unwrap();
    assert_eq!(sure, Verdict::Accept);
    let unsure = policy
        .review(&req, &answer("Lyon?", &[-0.5, -2.0]))
        .unwrap();
    assert_eq!(
        unsure,
        Verdict::Escalate {
            pool: String::new(),
            reason: "low-confidence".into()
        }
    );
}

/// A plugin built against the 0.2.0 interface, kept compiled in
/// `tests/fixtures/v0.2`.
fn legacy_plugin(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v0.2")
        .join(file)
}

/// test_faults, built against an older interface: its review of `req`
/// escalates to the pool its answer names, a `trap` request traps, and
/// the plugin serves again afterwards.
fn assert_escalates_traps_and_recovers(faults: &Policy, req: &Arc<RouteRequest>) {
    let verdict = faults.review(req, &answer("escalate:huge", &[]));
    assert_eq!(
        verdict.unwrap(),
        Verdict::Escalate {
            pool: "huge".into(),
            reason: "asked".into()
        }
    );
    let err = faults.route(&Arc::new(chat("trap"))).unwrap_err();
    assert_eq!(err.kind(), "trap", "{err}");
    assert_recovers(faults);
}

#[test]
fn plugins_built_against_0_2_0_still_route_and_review() {
    // cost_router reads the model, the prompt length and a header: each
    // must reach it through the 0.2.0 record.
    let router = load(
        &PolicySettings::new(legacy_plugin("cost_router.wasm"))
            .with_config(json!({ "long_prompt_chars": 100 })),
    );
    let mut short = chat("auto");
    short.prompt_chars = 100;
    assert_eq!(pool(router.route(&Arc::new(short))), "small");
    let mut long = chat("auto");
    long.prompt_chars = 101;
    assert_eq!(pool(router.route(&Arc::new(long))), "large");
    let premium = chat("auto").with_header("x-tier", "premium");
    assert_eq!(pool(router.route(&Arc::new(premium))), "large");
    assert_eq!(pool(router.route(&Arc::new(chat("named")))), "named");

    // test_faults answers `review` and fails on demand.
    let faults = load(&PolicySettings::new(legacy_plugin("test_faults.wasm")));
    let cascade = Arc::new(chat("cascade"));
    let Ok(RouteOutcome::Route(decision)) = faults.route(&cascade) else {
        panic!("the cascade request must be routed");
    };
    assert_eq!(decision.escalate_to.as_deref(), Some("large"));
    assert_escalates_traps_and_recovers(&faults, &cascade);
}

#[test]
fn plugins_built_as_0_3_0_components_still_route_review_and_read() {
    let router = load(
        &PolicySettings::new(component_plugin("cost_router.wasm"))
            .with_config(json!({ "long_prompt_chars": 100 })),
    );
    assert_eq!(router.interface(), "switchyard:policy@0.3.0");
    let premium = chat("auto").with_header("x-tier", "premium");
    assert_eq!(pool(router.route(&Arc::new(premium))), "large");
    assert_eq!(pool(router.route(&Arc::new(chat("auto")))), "small");

    let faults = load(&PolicySettings::new(component_plugin("test_faults.wasm")));
    let described = chat("describe")
        .with_message("user", "héllo")
        .with_header("x-tier", "premium");
    assert_eq!(
        pool(faults.route(&Arc::new(described))),
        "ChatCompletions model=describe count=1 messages=[\"user:héllo\"] \
         prompt=[] chars=5 max=None stream=false tier=Some(\"premium\") \
         headers=[\"x-tier=premium\"] attribute=None"
    );
    assert_escalates_traps_and_recovers(&faults, &Arc::new(chat("cascade")));
}

#[test]
fn a_plugin_reads_every_fact_of_the_request_through_the_host() {
    let mut chat_req = chat("describe")
        .with_message("system", "Be brief.")
        .with_message("user", "héllo")
        .with_header("x-tier", "premium")
        .with_header("x-tenant", "acme");
    chat_req.max_tokens = Some(7);
    chat_req.stream = true;
    assert_eq!(
        pool(faults().route(&Arc::new(chat_req))),
        "ChatCompletions model=describe count=2 \
         messages=[\"system:Be brief.\", \"user:héllo\"] prompt=[] chars=14 \
         max=Some(7) stream=true tier=Some(\"premium\") \
         headers=[\"x-tier=premium\", \"x-tenant=acme\"] attribute=None"
    );

    let completion = RouteRequest::new(Endpoint::Completions, "describe")
        .with_prompt("Once")
        .with_prompt("upon");
    assert_eq!(
        pool(faults().route(&Arc::new(completion))),
        "Completions model=describe count=0 messages=[] \
         prompt=[\"Once\", \"upon\"] chars=8 max=None stream=false \
         tier=None headers=[] attribute=None"
    );
}
