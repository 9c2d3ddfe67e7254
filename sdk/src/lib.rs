//! Write Switchyard routing policies in Rust.
//!
//! Owns the plugin side of Switchyard's policy interface, in both of its
//! forms: the `switchyard:policy@0.3.0` WIT component interface
//! (`sdk/wit/policy.wit`) and the `switchyard:policy` 0.4.0 core-module ABI
//! (specified in the hidden `core_abi` module). It provides the [`Request`]
//! a policy reads on demand, plain Rust types for decisions and answers,
//! the [`Policy`] trait, logging and metrics helpers, and the
//! [`export_policy!`] macro that wires a type to the exports of whichever
//! form the target builds. It must not know anything about the host beyond
//! those interfaces.
//!
//! # Writing a plugin
//!
//! A plugin is a `cdylib` crate that depends on `switchyard-sdk` and
//! `serde_json`. The SDK is not published on crates.io, so a plugin kept
//! outside Switchyard's repository names it by path (or git):
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! switchyard-sdk = { path = "../switchyard/sdk" }
//! serde_json = "1"
//! ```
//!
//! It implements [`Policy`] and exports it:
//!
//! ```
//! use switchyard_sdk::{export_policy, log, Decision, Policy, Request};
//!
//! struct ByTier {
//!     premium_pool: String,
//! }
//!
//! impl Policy for ByTier {
//!     fn init(config: &serde_json::Value) -> Result<Self, String> {
//!         let premium_pool = match config.get("premium_pool") {
//!             None => "large".to_owned(),
//!             Some(v) => v
//!                 .as_str()
//!                 .ok_or("premium_pool must be a string")?
//!                 .to_owned(),
//!         };
//!         Ok(ByTier { premium_pool })
//!     }
//!
//!     fn route(&self, req: &Request) -> Decision {
//!         if req.header("x-tier").as_deref() == Some("premium") {
//!             log::debug!("premium request for {}", req.model());
//!             return Decision::route(&self.premium_pool);
//!         }
//!         Decision::route("small")
//!     }
//! }
//!
//! export_policy!(ByTier);
//! ```
//!
//! Build it with `cargo build --target wasm32-unknown-unknown --release`
//! and point Switchyard's `[policy] plugin` at the `.wasm` file in
//! `target/wasm32-unknown-unknown/release/` (named after the crate, with
//! `-` written `_`: `my-policy` gives `my_policy.wasm`): a core WebAssembly module
//! speaking `switchyard:policy` 0.4.0, the fast path (run
//! `rustup target add wasm32-unknown-unknown` once). The same source built
//! with `cargo build --target wasm32-wasip2 --release` is still a
//! `switchyard:policy@0.3.0` component, in `target/wasm32-wasip2/release/`,
//! which Switchyard loads too. The routing rule is ordinary Rust, so
//! unit tests call `Policy::init` and `Policy::route` natively, with
//! requests built by [`Request::new`] and its `with_*` methods; there the
//! host functions fall back to stderr and the system clock.
//!
//! A plugin may also ship its own test cases, requests with the decisions
//! its author expects, with [`export_fixtures!`]: Switchyard runs them
//! every time it loads the plugin and refuses a build that decides any of
//! them differently.
//!
//! The host calls `init` once per instance, and may run several instances
//! side by side and replace one at any time, so state kept in the policy
//! value is per instance: use it for parsed configuration and caches, not
//! for totals (use [`counter_add`] for those).
//!
//! A panic in `init` or `route` is logged through the host at error level
//! and then aborts the call: the call fails and the host discards that
//! instance. `route` and `review` run under a deadline (`timeout_ms`,
//! 50 ms by default), `init` under the larger of that and one second, all
//! under a memory cap (64 MiB by default); they must not block, and a
//! plugin that sleeps or waits on I/O traps.
//!
//! # Why a core module with an ABI of its own, and a WIT component too
//!
//! A plugin can take three shapes: a component with a WIT interface
//! (0.2.0 and 0.3.0, still built for `wasm32-wasip2`), a core module that
//! takes and returns JSON through linear memory, or a core module with a
//! small binary interface of its own (0.4.0, the default). We weighed
//! them on speed inside a proxied request, type safety, evolvability and
//! what a plugin author sees, and chose the third, keeping the first:
//!
//! - **Speed, measured where it counts.** Warm, in a loop, wasmtime 48 on
//!   one core: a `route` call into cost_router took 0.57 us as a 0.4.0
//!   core module, 1.5 us as a 0.3.0 component and 6.3 us as a 0.2.0
//!   component (`make bench`); the same call as JSON into a core module
//!   measured about 4.4 us, parsing and printing JSON twice. Inside a
//!   proxied request the gap widens, because there the host's call
//!   machinery and the plugin's code run with cold caches. With
//!   Switchyard alone on one CPU, the decision took 2 to 3 us at the
//!   median as a core module and 5 to 7.5 us as a component, and the
//!   policy cost 6 to 10% of Switchyard's requests per second against 15
//!   to 18%. A component call pays for lowering and lifting its values,
//!   a call into the plugin's allocator for every string handed in, a
//!   post-return call and a lent resource; a core call is one typed
//!   function call with five numbers.
//! - **Pay for what you read.** A call hands over only the request's
//!   numbers; the model, messages, prompts and headers stay in the host,
//!   and each of [`Request`]'s methods for them is one call that copies
//!   only its answer into the plugin, at most once per call. (0.2.0
//!   copied the whole request in on every call; 0.3.0 still copied the
//!   model.)
//! - **Type safety.** No one writes the ABI by hand: this SDK owns the
//!   plugin's side and the host its own, both decode strictly (a short
//!   buffer, a bad tag, invalid UTF-8 or a trailing byte fails the call
//!   rather than being misread), and the host checks every export's name
//!   and signature when it loads a plugin, so a mismatch fails at load,
//!   not on the first request. What a WIT file would generate is written
//!   and tested here once (`core_abi` documents the interface).
//! - **Evolvability.** The version is in every export's name
//!   (`switchyard-0.4:route`) and in the import module, so a later
//!   version can live beside this one and the host links each plugin
//!   against the version it was built for; components built against
//!   0.3.0 and 0.2.0 keep loading. New facts about a request become new
//!   `read` codes, which an older host answers as absent; the route,
//!   rejection and verdict each carry an `attributes` key/value list,
//!   through which new hints flow without a new version: the route's
//!   system instruction, trimmed history, priority and labels travel that
//!   way ([`Route::with_system_instruction`] and its siblings). A new hook
//!   (0.2.0's `review`) needs a new version.
//! - **Author experience.** The same for both builds: plain Rust types and
//!   one trait, with no `unsafe`, no serialisation code and no knowledge
//!   of the ABI; the build target picks the shape. What the core module
//!   gives up is language neutrality: a plugin in another language needs
//!   this ABI written for it, while any language with a WIT binding
//!   generator can implement the 0.3.0 world (`sdk/wit/policy.wit`),
//!   which Switchyard keeps loading.

pub mod log;

#[cfg(not(core_abi))]
mod component;
mod host;
mod instance;
mod request;
mod types;

pub use crate::host::{counter_add, now_unix_ms};
pub use crate::request::Request;
pub use crate::types::{
    Answer, Decision, Endpoint, Escalation, LogprobSummary, Message, Priority, Rejection, Route,
    Verdict, KEEP_TURNS_KEY, LABEL_PREFIX, PRIORITY_KEY, SYSTEM_INSTRUCTION_KEY,
};

/// A routing policy: parses its configuration once, then decides where each
/// request goes.
///
/// Export an implementation with [`export_policy!`]. One value lives per
/// plugin instance, created by [`Policy::init`].
pub trait Policy: 'static {
    /// Builds the policy from its configuration, the `[policy.config]`
    /// table as JSON (an empty object when the table is absent).
    ///
    /// An error refuses to load the plugin, and the message is shown to the
    /// operator: name the key and what is expected of it, for example
    /// `"long_prompt_chars must be a non-negative integer, got \"x\""`.
    fn init(config: &serde_json::Value) -> Result<Self, String>
    where
        Self: Sized;

    /// Decides where one request goes. Runs under the host's deadline and
    /// must not block.
    ///
    /// `req` is lent for this call only. Implementations may write the
    /// parameter as `req: &Request`, leaving the lifetime out.
    fn route(&self, req: &Request<'_>) -> Decision;

    /// Judges the small pool's answer to a request that [`Policy::route`]
    /// sent small-first ([`Route::cascade`]): accept it, or escalate to a
    /// larger pool. Runs under the same deadline as `route`. The default
    /// accepts every answer.
    ///
    /// In `probe` streaming mode `answer.partial` is true and the answer
    /// holds only the first tokens; its `finish_reason` is empty.
    fn review(&self, req: &Request<'_>, answer: &Answer) -> Verdict {
        let _ = (req, answer);
        Verdict::Accept
    }
}

/// Exports a [`Policy`] implementation as the plugin's `init`, `route` and
/// `review`.
///
/// Invoke it once, at the top level of the plugin crate:
///
/// ```text
/// switchyard_sdk::export_policy!(MyPolicy);
/// ```
///
/// For `wasm32-wasip2` this emits the component exports of
/// `switchyard:policy@0.3.0`; for `wasm32-unknown-unknown` the core-module
/// exports of 0.4.0 (`switchyard-0.4:init` and its siblings). On other
/// targets it only checks that the type implements [`Policy`], so plugin
/// crates build and test natively too.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(not(all(target_arch = "wasm32", not(target_os = "wasi"))))]
        const _: () = {
            struct __SwitchyardPolicyExports;

            impl $crate::__private::Guest for __SwitchyardPolicyExports {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init::<$policy>(config)
                }

                fn route(
                    facts: $crate::__private::WitRequestFacts,
                    req: &$crate::__private::WitRequest,
                ) -> $crate::__private::WitDecision {
                    $crate::__private::route(facts, req)
                }

                fn review(
                    facts: $crate::__private::WitRequestFacts,
                    req: &$crate::__private::WitRequest,
                    answer: $crate::__private::WitAnswer,
                ) -> $crate::__private::WitVerdict {
                    $crate::__private::review(facts, req, answer)
                }
            }

            #[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
            $crate::__private::bindings::export!(
                __SwitchyardPolicyExports
                with_types_in $crate::__private::bindings
            );
        };

        #[cfg(all(target_arch = "wasm32", not(target_os = "wasi")))]
        const _: () = {
            #[export_name = "switchyard-0.4:alloc"]
            extern "C" fn __switchyard_alloc(len: i32) -> i32 {
                $crate::core_abi::alloc(len)
            }

            #[export_name = "switchyard-0.4:init"]
            extern "C" fn __switchyard_init(config_ptr: i32, config_len: i32) -> i64 {
                $crate::core_abi::init::<$policy>(config_ptr, config_len)
            }

            #[export_name = "switchyard-0.4:route"]
            extern "C" fn __switchyard_route(
                endpoint: i32,
                message_count: i32,
                prompt_chars: i64,
                max_tokens: i64,
                stream: i32,
            ) -> i64 {
                $crate::core_abi::route($crate::core_abi::Params {
                    endpoint,
                    message_count,
                    prompt_chars,
                    max_tokens,
                    stream,
                })
            }

            #[export_name = "switchyard-0.4:review"]
            extern "C" fn __switchyard_review(
                endpoint: i32,
                message_count: i32,
                prompt_chars: i64,
                max_tokens: i64,
                stream: i32,
            ) -> i64 {
                $crate::core_abi::review($crate::core_abi::Params {
                    endpoint,
                    message_count,
                    prompt_chars,
                    max_tokens,
                    stream,
                })
            }
        };
    };
}

/// Ships fixtures inside the plugin: requests with the decisions its
/// author expects. Switchyard runs them each time it loads the plugin (at
/// start-up, in `switchyard check` and before a hot swap takes over) and
/// refuses a build that decides any case differently, naming the case.
///
/// Give it the JSON document's bytes, usually from a file next to the
/// crate's manifest:
///
/// ```text
/// switchyard_sdk::export_fixtures!(include_bytes!("../fixtures.json"));
/// ```
///
/// The document:
///
/// ```json
/// {
///   "config": {"long_prompt_chars": 100},
///   "cases": [{
///     "name": "a short question goes to the small pool",
///     "request": {"model": "auto",
///                 "messages": [{"role": "user", "content": "hi"}]},
///     "expect": {"pool": "small", "max_tokens_cap": null}
///   }]
/// }
/// ```
///
/// `config` is the `init` configuration the cases assume (without it they
/// run with the deployment's `[policy.config]`). A `request` may give
/// `endpoint` (`chat-completions`, the default, `completions` or
/// `embeddings`), `model` (default `auto`), `messages`, `prompt` (texts),
/// `max_tokens`, `stream` and `headers` (a map). `expect` compares only
/// what it names: `pool`, `max_tokens_cap`, `escalate_to` (`null` for
/// none), `attributes` (a map the route's attributes must include) or
/// `reject` (a rejection's status). At most 256 cases.
///
/// On `wasm32` targets (component or core module alike) the bytes go into
/// the custom section `switchyard-fixtures`; elsewhere the macro does
/// nothing.
#[macro_export]
macro_rules! export_fixtures {
    ($bytes:expr) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            const BYTES: &[u8] = $bytes;
            #[link_section = "switchyard-fixtures"]
            #[used]
            static FIXTURES: [u8; BYTES.len()] =
                $crate::__private::byte_array::<{ BYTES.len() }>(BYTES);
        };
    };
}

/// Implementation details of [`export_policy!`]; not a stable API.
#[doc(hidden)]
pub mod __private;

/// The core-module ABI (`switchyard:policy` 0.4.0) behind
/// [`export_policy!`] for `wasm32-unknown-unknown`; not a stable API.
#[doc(hidden)]
pub mod core_abi;
