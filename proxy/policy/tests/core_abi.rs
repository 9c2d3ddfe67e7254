//! The 0.4.0 core-module interface from the host's side, with plugins
//! written by hand in the WebAssembly text format: what the host accepts,
//! what it refuses at load, and how it treats a plugin that misuses the
//! interface at call time. The SDK's side is covered by the real plugins
//! (`tests/plugins.rs`).

#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly"
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use switchyard_policy::{
    Endpoint, LoadError, Message, Policy, PolicySettings, RequestContent, RouteOutcome,
    RouteRequest,
};

/// A module with the four exports: `route` is `route_body` (which must
/// leave an i64 on the stack); the others answer trivially. `extra` adds
/// module fields (data segments, imports go first in `imports`).
fn module(imports: &str, extra: &str, route_body: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
            {imports}
            (memory (export "memory") 1)
            {extra}
            (func (export "switchyard-0.4:alloc") (param i32) (result i32)
                i32.const 4096)
            (func (export "switchyard-0.4:init") (param i32 i32) (result i64)
                i64.const 0)
            (func (export "switchyard-0.4:route")
                (param i32 i32 i64 i64 i32) (result i64)
                (local $n i32)
                {route_body})
            (func (export "switchyard-0.4:review")
                (param i32 i32 i64 i64 i32) (result i64)
                ;; The verdict `accept` is the single byte 0 at 0.
                i64.const 1)
        )"#
    );
    wat::parse_str(text).unwrap_or_else(|e| panic!("bad test module: {e}"))
}

const READ: &str = r#"(import "switchyard-0.4" "read"
    (func $read (param i32 i32 i32 i32 i32) (result i32)))"#;

/// `ptr << 32 | len` as a WAT constant.
fn packed(ptr: u32, len: u32) -> String {
    format!("i64.const {}", (u64::from(ptr) << 32) | u64::from(len))
}

fn load(bytes: &[u8]) -> Result<Policy, LoadError> {
    Policy::load_bytes(&PolicySettings::new("hand-written.wasm"), bytes)
}

fn chat() -> Arc<RouteRequest> {
    Arc::new(
        RouteRequest::new(Endpoint::ChatCompletions, "gpt-small").with_header("x-tier", "premium"),
    )
}

#[test]
fn a_route_built_from_the_model_it_read_is_decoded() {
    // Reads the model into the decision's pool name at 205 and writes the
    // rest of a plain route around it: tag 0 at 200, the name's length at
    // 201, then no cap, no escalation, no attributes.
    let body = r#"
        (local.set $n (call $read (i32.const 1) (i32.const 0) (i32.const 0)
            (i32.const 205) (i32.const 64)))
        (i32.store8 (i32.const 200) (i32.const 0))
        (i32.store (i32.const 201) (local.get $n))
        (i32.store16 (i32.add (i32.const 205) (local.get $n)) (i32.const 0))
        (i32.store (i32.add (i32.const 207) (local.get $n)) (i32.const 0))
        (i64.or (i64.const 858993459200)
            (i64.extend_i32_u (i32.add (local.get $n) (i32.const 11))))"#;
    // 858993459200 is 200 << 32.
    let policy = load(&module(READ, "", body)).unwrap();
    assert_eq!(policy.interface(), "switchyard:policy@0.4.0");
    let Ok(RouteOutcome::Route(route)) = policy.route(&chat()) else {
        panic!("the module's route must decode");
    };
    assert_eq!(route.pool, "gpt-small");
    assert_eq!((route.max_tokens_cap, route.escalate_to), (None, None));
}

/// A module whose route answers pool "p" with the cap set to what
/// `read(what, key at 300, out_ptr, out_cap)` returned. `out_ptr` is the
/// cap flag's byte, so a read that writes when it should not leaves a
/// decision that does not decode.
fn cap_from_read(what: i32, key: &str, out_cap: i32) -> Vec<u8> {
    let extra = format!(
        r#"(data (i32.const 100) "\00\01\00\00\00p\01")
           (data (i32.const 300) "{key}")"#
    );
    let body = format!(
        r#"(local.set $n (call $read (i32.const {what}) (i32.const 300)
               (i32.const {len}) (i32.const 106) (i32.const {out_cap})))
           (i32.store (i32.const 107) (local.get $n))
           (i32.store8 (i32.const 111) (i32.const 0))
           (i32.store (i32.const 112) (i32.const 0))
           {packed}"#,
        len = key.len(),
        packed = packed(100, 16),
    );
    module(READ, &extra, &body)
}

fn route_of(bytes: &[u8], req: &Arc<RouteRequest>) -> (String, Option<u32>) {
    match load(bytes).unwrap().route(req) {
        Ok(RouteOutcome::Route(route)) => (route.pool, route.max_tokens_cap),
        other => panic!("expected a route, got {other:?}"),
    }
}

#[test]
fn read_reports_the_length_without_writing_when_the_buffer_is_short() {
    // One header: count, then "x-tier" and "premium" with their lengths.
    let headers_len = 4 + (4 + 6) + (4 + 7);
    let (pool, cap) = route_of(&cap_from_read(5, "", 0), &chat());
    assert_eq!((pool.as_str(), cap), ("p", Some(headers_len)));

    // A header's value fits in one byte only when it is one byte long.
    let (pool, cap) = route_of(&cap_from_read(4, "X-Tier", 1), &chat());
    assert_eq!((pool.as_str(), cap), ("p", Some(7)));
}

#[test]
fn read_answers_minus_one_for_what_is_absent() {
    for (what, key) in [(4, "x-missing"), (6, "any"), (7, ""), (99, "")] {
        let (pool, cap) = route_of(&cap_from_read(what, key, 0), &chat());
        assert_eq!((pool.as_str(), cap), ("p", Some(u32::MAX)), "item {what}");
    }
}

#[test]
fn read_writes_what_fits() {
    // "premium" overwrites the cap flag, so the decision no longer
    // decodes: the write happened.
    let err = load(&cap_from_read(4, "x-tier", 64))
        .unwrap()
        .route(&chat())
        .unwrap_err();
    assert_eq!(err.kind(), "trap", "{err}");
    assert!(err.to_string().contains("malformed decision"), "{err}");
}

#[test]
fn a_malformed_or_misplaced_answer_fails_the_call_and_the_next_one_runs() {
    // Tag 9 is no decision.
    let bad_tag = module("", r#"(data (i32.const 0) "\09")"#, &packed(0, 1));
    let policy = load(&bad_tag).unwrap();
    for _ in 0..2 {
        let err = policy.route(&chat()).unwrap_err();
        assert_eq!(err.kind(), "trap", "{err}");
        assert!(err.to_string().contains("unknown decision tag 9"), "{err}");
    }

    // A buffer past the end of the one-page memory.
    let outside = module("", "", &packed(65_530, 10));
    let err = load(&outside).unwrap().route(&chat()).unwrap_err();
    assert!(
        err.to_string().contains("outside its 65536-byte memory"),
        "{err}"
    );
}

#[test]
fn a_read_into_memory_the_plugin_does_not_have_traps() {
    let body = format!(
        r#"(drop (call $read (i32.const 1) (i32.const 0) (i32.const 0)
               (i32.const 65535) (i32.const 100)))
           {}"#,
        packed(0, 1)
    );
    let err = load(&module(READ, "", &body))
        .unwrap()
        .route(&chat())
        .unwrap_err();
    assert_eq!(err.kind(), "trap", "{err}");
    assert!(err.to_string().contains("outside its"), "{err}");
}

#[test]
fn modules_that_do_not_fit_are_refused_at_load_with_the_reason() {
    assert!(load(&module("", "", &packed(0, 1))).is_ok());

    let no_route = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "switchyard-0.4:alloc") (param i32) (result i32)
                i32.const 0))"#,
    )
    .unwrap();
    let err = load(&no_route).unwrap_err();
    assert!(matches!(err, LoadError::Link { .. }), "{err:?}");
    assert!(err.to_string().contains("switchyard-0.4:init"), "{err}");

    let wrong_type = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "switchyard-0.4:alloc") (param i64) (result i32)
                i32.const 0))"#,
    )
    .unwrap();
    let err = load(&wrong_type).unwrap_err();
    assert!(
        err.to_string()
            .contains("switchyard-0.4:alloc` has the type"),
        "{err}"
    );

    let foreign_import = module(
        r#"(import "wasi_snapshot_preview1" "fd_write"
            (func (param i32 i32 i32 i32) (result i32)))"#,
        "",
        &packed(0, 1),
    );
    let err = load(&foreign_import).unwrap_err();
    assert!(matches!(err, LoadError::Link { .. }), "{err:?}");
    assert!(err.to_string().contains("fd_write"), "{err}");
}

#[test]
fn an_init_error_message_refuses_the_load() {
    let text = r#"(module (memory (export "memory") 1)
        (data (i32.const 0) "bad key `x`")
        (func (export "switchyard-0.4:alloc") (param i32) (result i32)
            i32.const 4096)
        (func (export "switchyard-0.4:init") (param i32 i32) (result i64)
            i64.const 11)
        (func (export "switchyard-0.4:route")
            (param i32 i32 i64 i64 i32) (result i64) i64.const 0)
        (func (export "switchyard-0.4:review")
            (param i32 i32 i64 i64 i32) (result i64) i64.const 0))"#;
    let err = load(&wat::parse_str(text).unwrap()).unwrap_err();
    let LoadError::Init { message, .. } = &err else {
        panic!("expected the plugin's refusal, got {err:?}");
    };
    assert_eq!(message, "bad key `x`");
}

/// Request content that counts how often its messages are asked for.
#[derive(Debug, Default)]
struct CountedMessages(AtomicUsize);

impl RequestContent for CountedMessages {
    fn messages(&self) -> Vec<Message> {
        self.0.fetch_add(1, Ordering::Relaxed);
        vec![Message {
            role: "user".into(),
            content: "a long chat".into(),
        }]
    }
    fn prompt(&self) -> Vec<String> {
        Vec::new()
    }
    fn header(&self, _name: &str) -> Option<String> {
        None
    }
    fn headers(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

#[test]
fn an_item_too_big_for_the_buffer_is_encoded_once_for_the_retry() {
    // Asks for the messages with no room, then with room at 1000, and
    // answers with their length as the cap: the second read must hand
    // over what the first one measured, without asking the request again.
    let extra = r#"(data (i32.const 100) "\00\01\00\00\00p\01")"#;
    let body = format!(
        r#"(drop (call $read (i32.const 2) (i32.const 0) (i32.const 0)
               (i32.const 1000) (i32.const 0)))
           (local.set $n (call $read (i32.const 2) (i32.const 0) (i32.const 0)
               (i32.const 1000) (i32.const 4096)))
           (i32.store (i32.const 107) (local.get $n))
           (i32.store8 (i32.const 111) (i32.const 0))
           (i32.store (i32.const 112) (i32.const 0))
           {}"#,
        packed(100, 16)
    );
    let content = Arc::new(CountedMessages::default());
    let req = Arc::new(
        RouteRequest::new(Endpoint::ChatCompletions, "auto").with_content(content.clone()),
    );
    // count, then "user" and "a long chat" with their lengths, then no
    // attributes.
    let encoded_len = 4 + (4 + 4) + (4 + 11) + 4;
    assert_eq!(
        route_of(&module(READ, extra, &body), &req),
        ("p".into(), Some(encoded_len))
    );
    assert_eq!(
        content.0.load(Ordering::Relaxed),
        1,
        "messages encoded twice"
    );
}

#[test]
fn a_start_function_that_never_returns_is_stopped_at_the_init_deadline() {
    let looping = module(
        "",
        r#"(func $forever (loop $again (br $again))) (start $forever)"#,
        &packed(0, 1),
    );
    let err = load(&looping).unwrap_err();
    let LoadError::InitFailed { source, .. } = &err else {
        panic!("expected the load to fail in init, got {err:?}");
    };
    assert_eq!(source.kind(), "timeout", "{err}");
}
