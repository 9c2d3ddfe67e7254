//! A policy plugin that misbehaves on request, used by the policy host's
//! tests and the integration tests to prove fault handling.
//!
//! Owns nothing but the faults below; never deploy it. The request's
//! `model` picks the behaviour:
//!
//! | model        | behaviour                                             |
//! |--------------|-------------------------------------------------------|
//! | `trap`       | panics (the host sees a trap)                          |
//! | `spin`       | loops forever (the host's deadline must stop it)       |
//! | `grow`       | allocates 1 MiB blocks until allocation fails          |
//! | `reject`     | rejects with status 403, "rejected by policy"         |
//! | `cap`        | routes to pool `small` with max-tokens-cap 5          |
//! | `print`      | writes to stdout and stderr, then routes to `print`   |
//! | `clock`      | routes to a pool named after the host clock, in ms    |
//! | `count`      | adds to 100 distinct counters, routes to `count`      |
//! | `cascade`    | routes small-first: pool `small`, escalation `large`  |
//! | `describe`   | routes to a pool named after every request fact read  |
//! | anything else| routes to the pool of that name                       |
//!
//! `review` reads the model too: `trap` panics and `spin` loops, as in
//! `route`; so does an answer whose text contains `trap`, which lets a
//! routed request's review fail. Otherwise an answer whose text is
//! `escalate` escalates to the
//! route's escalation pool, `escalate:<pool>` to `<pool>` (reason
//! `asked`), and any other answer is accepted.
//!
//! Configuration: `{"fail": "message"}` makes `init` fail with that
//! message; `{"panic": true}` makes `init` panic; `{"misroute": true}`
//! sends every request to pool `misrouted`, like a broken build, which
//! the plugin's own fixtures (`fixtures.json`) catch. Other keys are
//! ignored.
//!
//! Build: `cargo build -p test-faults --release --target
//! wasm32-unknown-unknown`, giving
//! `target/wasm32-unknown-unknown/release/test_faults.wasm`, a 0.4.0 core
//! module (`--target wasm32-wasip2` builds a 0.3.0 component).

use std::hint::black_box;

use serde_json::Value;
use switchyard_sdk::{
    counter_add, export_policy, log, now_unix_ms, Answer, Decision, Policy, Request, Route, Verdict,
};

/// Status and message of the `reject` model.
pub const REJECT_STATUS: u16 = 403;
pub const REJECT_MESSAGE: &str = "rejected by policy";

/// Pool and cap of the `cap` model.
pub const CAP_POOL: &str = "small";
pub const CAP_TOKENS: u32 = 5;

/// Distinct counter names the `count` model uses: more than the host's
/// bound of 64, to exercise it.
pub const COUNT_NAMES: u32 = 100;

/// Size of each allocation of the `grow` model, in bytes.
const GROW_STEP_BYTES: usize = 1 << 20;

/// Pool of every request when configured with `misroute`.
pub const MISROUTED_POOL: &str = "misrouted";

/// The fault plugin.
#[derive(Debug)]
pub struct TestFaults {
    /// Route everything to [`MISROUTED_POOL`].
    misroute: bool,
}

impl Policy for TestFaults {
    #[expect(clippy::panic, reason = "panicking on request is the point")]
    fn init(config: &Value) -> Result<Self, String> {
        if let Some(message) = config.get("fail").and_then(Value::as_str) {
            return Err(message.to_owned());
        }
        if config.get("panic").and_then(Value::as_bool) == Some(true) {
            panic!("test-faults was asked to panic in init");
        }
        let misroute = config.get("misroute").and_then(Value::as_bool) == Some(true);
        Ok(TestFaults { misroute })
    }

    #[expect(clippy::panic, reason = "panicking on request is the point")]
    #[expect(
        clippy::print_stdout,
        reason = "proves that stdout writes are harmless"
    )]
    fn route(&self, req: &Request) -> Decision {
        if self.misroute {
            return Decision::route(MISROUTED_POOL);
        }
        match req.model() {
            "trap" => panic!("test-faults was asked to trap"),
            "spin" => spin(),
            "grow" => grow(),
            "reject" => Decision::reject(REJECT_STATUS, REJECT_MESSAGE),
            "cap" => Route::new(CAP_POOL).with_max_tokens_cap(CAP_TOKENS).into(),
            "print" => {
                println!("test-faults writes to stdout");
                eprintln!("test-faults writes to stderr");
                Decision::route("print")
            }
            "clock" => Decision::route(now_unix_ms().to_string()),
            "count" => {
                for i in 0..COUNT_NAMES {
                    counter_add(&format!("c{i}"), 1);
                }
                log::info!("added to {COUNT_NAMES} counters");
                Decision::route("count")
            }
            "cascade" => Route::cascade("small", "large").into(),
            "describe" => Decision::route(describe(req)),
            model => Decision::route(model),
        }
    }

    #[expect(clippy::panic, reason = "panicking on request is the point")]
    fn review(&self, req: &Request, answer: &Answer) -> Verdict {
        match req.model() {
            "trap" => panic!("test-faults was asked to trap in review"),
            "spin" => spin(),
            _ => {}
        }
        if answer.text.contains("trap") {
            panic!("test-faults was asked to trap in review by the answer");
        }
        match answer.text.strip_prefix("escalate") {
            Some("") => Verdict::escalate(ASKED),
            Some(rest) => match rest.strip_prefix(':') {
                Some(pool) => Verdict::escalate_to(pool, ASKED),
                None => Verdict::Accept,
            },
            None => Verdict::Accept,
        }
    }
}

/// Every fact of `req`, read through each accessor, on one line: the
/// host's tests compare it with what they sent.
fn describe(req: &Request) -> String {
    // Before `messages` and `headers`, whose copies would answer these
    // in the plugin: the host's own answers are under test.
    let count = req.message_count();
    let tier = req.header("X-Tier");
    let messages: Vec<String> = req
        .messages()
        .iter()
        .map(|m| format!("{}:{}", m.role, m.content))
        .collect();
    let headers: Vec<String> = req
        .headers()
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    format!(
        "{:?} model={} count={} messages={messages:?} prompt={:?} chars={} \
         max={:?} stream={} tier={:?} headers={headers:?} attribute={:?}",
        req.endpoint(),
        req.model(),
        count,
        req.prompt(),
        req.prompt_chars(),
        req.max_tokens(),
        req.stream(),
        tier,
        req.attribute("switchyard.anything"),
    )
}

/// Reason of every escalation `review` answers.
pub const ASKED: &str = "asked";

export_policy!(TestFaults);

switchyard_sdk::export_fixtures!(include_bytes!("../fixtures.json"));

/// Burns CPU until the host interrupts the call.
fn spin() -> ! {
    let mut n = 0u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Allocates and touches memory until an allocation fails, which aborts.
fn grow() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(black_box(vec![1u8; GROW_STEP_BYTES]));
        black_box(&hoard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_sdk::Endpoint;

    fn route(model: &str) -> Decision {
        TestFaults { misroute: false }.route(&Request::new(Endpoint::ChatCompletions, model))
    }

    #[test]
    fn plain_models_route_to_their_pool() {
        assert_eq!(route("small").pool(), Some("small"));
        assert_eq!(route("print").pool(), Some("print"));
    }

    #[test]
    fn reject_and_cap_answer_as_documented() {
        assert_eq!(route("reject"), Decision::reject(403, REJECT_MESSAGE));
        assert_eq!(
            route("cap"),
            Route::new("small").with_max_tokens_cap(5).into()
        );
    }

    #[test]
    fn review_escalates_only_when_the_answer_asks() {
        let req = Request::new(Endpoint::ChatCompletions, "cascade");
        let review = |text: &str| {
            (TestFaults { misroute: false }).review(&req, &Answer::new("small", text, vec![]))
        };
        assert_eq!(review("fine"), Verdict::Accept);
        assert_eq!(review("escalate"), Verdict::escalate(ASKED));
        assert_eq!(review("escalate:huge"), Verdict::escalate_to("huge", ASKED));
    }

    #[test]
    fn fail_config_makes_init_fail_with_its_message() {
        let err = TestFaults::init(&json!({ "fail": "bad key x" })).err();
        assert_eq!(err.as_deref(), Some("bad key x"));
    }
}
