//! The throughput bench's floor (`tests/bench/floor_module.wat`) must
//! choose the pool cost_router chooses for model `auto` with `x-tier`
//! absent or spelled exactly, or the bench would compare unlike work.

use std::sync::Arc;

use serde_json::json;
use switchyard_policy::{Endpoint, Policy, PolicySettings, RouteOutcome, RouteRequest};

use crate::support::plugin_path;

const FLOOR_MODULE: &str = include_str!("../bench/floor_module.wat");

fn pool(policy: &Policy, req: &RouteRequest) -> String {
    match policy.route(&Arc::new(req.clone())) {
        Ok(RouteOutcome::Route(route)) => route.pool,
        other => panic!("expected a route, got {other:?}"),
    }
}

#[test]
fn the_bench_floor_module_decides_as_cost_router_does() {
    let module = wat::parse_str(FLOOR_MODULE).expect("the floor module parses");
    let floor = Policy::load_bytes(&PolicySettings::new("floor_module.wasm"), &module).unwrap();
    let settings = PolicySettings::new(plugin_path("cost_router"))
        .with_config(json!({ "long_prompt_chars": 2000 }));
    let router = Policy::load(&settings).expect("cost_router.wasm; run `make plugins`");

    let auto = || RouteRequest::new(Endpoint::ChatCompletions, "auto");
    let with_chars = |chars| {
        let mut req = auto();
        req.prompt_chars = chars;
        req
    };
    // In order: a longer header value read before `premium` must not
    // change what the module compares.
    let cases = [
        ("plain", auto()),
        ("premium", auto().with_header("x-tier", "premium")),
        ("longer tier", auto().with_header("x-tier", "premium-plus")),
        ("premium after it", auto().with_header("x-tier", "premium")),
        ("other tier", auto().with_header("x-tier", "standard")),
        ("2000 chars", with_chars(2000)),
        ("2001 chars", with_chars(2001)),
    ];
    let mut pools = Vec::new();
    for (case, req) in &cases {
        let expected = pool(&router, req);
        assert_eq!(pool(&floor, req), expected, "{case}");
        pools.push(expected);
    }
    // Both answers occur, so the comparison means something.
    assert!(pools.contains(&"small".to_string()) && pools.contains(&"large".to_string()));
}
