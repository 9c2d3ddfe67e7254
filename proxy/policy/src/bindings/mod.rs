//! Host-side bindings for the plugin interface: one module per WIT package
//! version a plugin may be built against, and the choice between them.
//!
//! Owns the mapping from [`RouteRequest`] to each version's `request` and
//! from each version's `decision` and `verdict` back; it must not hold
//! any state beyond one call.
//!
//! - [`v4`]: `switchyard:policy@0.4.0`, what the SDK builds for
//!   `wasm32-unknown-unknown`: a core module called with the request's
//!   numbers, which reads the rest through one import.
//! - [`v3`]: `switchyard:policy@0.3.0` (`sdk/wit/policy.wit`), what the
//!   SDK builds for `wasm32-wasip2`: a component handed the request's
//!   numbers and model name, the rest a resource read on demand.
//! - [`v2`]: `switchyard:policy@0.2.0` (`proxy/policy/wit-0.2`), kept so
//!   that plugins built before 0.3.0 keep loading: the request is a
//!   record copied whole into the plugin on every call.

use std::sync::Arc;

use wasmtime::component::InstancePre;
use wasmtime::{Engine, Module, Store};

use crate::state::HostState;
use crate::{ReviewAnswer, RouteOutcome, RouteRequest, Verdict, SUPPORTED_INTERFACES};

mod v2;
mod v3;
mod v4;

pub(crate) use self::v4::{is_core_module, CallState};

/// The interface versions built as components, newest first.
const COMPONENT_INTERFACES: [&str; 2] = [SUPPORTED_INTERFACES[1], SUPPORTED_INTERFACES[2]];

/// Adds both versions' host interfaces to `linker`, so that a component
/// built against either links.
pub(crate) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<HostState>,
) -> wasmtime::Result<()> {
    v3::add_to_linker(linker)?;
    v2::add_to_linker(linker)
}

/// A linked plugin, typed by the interface whose exports it has.
pub(crate) enum PolicyPre {
    V4(v4::Pre),
    V3(v3::PolicyPre<HostState>),
    V2(v2::PolicyPre<HostState>),
}

impl PolicyPre {
    /// Links a core module against 0.4.0; the error says what does not
    /// fit.
    pub(crate) fn core(engine: &Engine, module: &Module) -> wasmtime::Result<Self> {
        v4::Pre::new(engine, module).map(PolicyPre::V4)
    }

    /// Types the component `pre` against the newest world it exports;
    /// the error names the versions tried and why the newest did not fit.
    pub(crate) fn component(pre: InstancePre<HostState>) -> wasmtime::Result<Self> {
        let newest = match v3::PolicyPre::new(pre.clone()) {
            Ok(pre) => return Ok(PolicyPre::V3(pre)),
            Err(e) => e,
        };
        match v2::PolicyPre::new(pre) {
            Ok(pre) => Ok(PolicyPre::V2(pre)),
            Err(_) => Err(newest.context(format!(
                "the component does not export the policy world of {}",
                COMPONENT_INTERFACES.join(" or ")
            ))),
        }
    }

    /// The interface version the component was built against.
    pub(crate) fn interface(&self) -> &'static str {
        match self {
            PolicyPre::V4(_) => SUPPORTED_INTERFACES[0],
            PolicyPre::V3(_) => SUPPORTED_INTERFACES[1],
            PolicyPre::V2(_) => SUPPORTED_INTERFACES[2],
        }
    }

    /// A new instance in `store`; no plugin code runs yet.
    pub(crate) fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Bindings> {
        match self {
            PolicyPre::V4(pre) => pre.instantiate(store).map(|e| Bindings::V4(Box::new(e))),
            PolicyPre::V3(pre) => pre.instantiate(store).map(Bindings::V3),
            PolicyPre::V2(pre) => pre.instantiate(store).map(Bindings::V2),
        }
    }
}

/// One instance's exports, of the version it was built against.
pub(crate) enum Bindings {
    /// Boxed: five typed functions and a memory outweigh the other
    /// versions' handles.
    V4(Box<v4::Exports>),
    V3(v3::Policy),
    V2(v2::Policy),
}

impl Bindings {
    /// Calls `init`; the inner `Err` is the plugin refusing its config.
    pub(crate) fn init(
        &self,
        store: &mut Store<HostState>,
        config_json: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            Bindings::V4(exports) => exports.init(store, config_json),
            Bindings::V3(policy) => policy.call_init(store, config_json),
            Bindings::V2(policy) => policy.call_init(store, config_json),
        }
    }

    /// Calls `route` with `req`.
    pub(crate) fn route(
        &self,
        store: &mut Store<HostState>,
        req: &Arc<RouteRequest>,
    ) -> wasmtime::Result<RouteOutcome> {
        match self {
            Bindings::V4(exports) => exports.route(store, req),
            Bindings::V3(policy) => v3::route(policy, store, req),
            Bindings::V2(policy) => v2::route(policy, store, req),
        }
    }

    /// Calls `review` with `req` and the small pool's `answer`.
    pub(crate) fn review(
        &self,
        store: &mut Store<HostState>,
        req: &Arc<RouteRequest>,
        answer: &ReviewAnswer,
    ) -> wasmtime::Result<Verdict> {
        match self {
            Bindings::V4(exports) => exports.review(store, req, answer),
            Bindings::V3(policy) => v3::review(policy, store, req, answer),
            Bindings::V2(policy) => v2::review(policy, store, req, answer),
        }
    }
}

/// The status a plugin's rejection is answered with: its own when it is
/// an HTTP error status (400 to 599), else 500.
fn reject_status(status: u16) -> u16 {
    match status {
        400..=599 => status,
        _ => 500,
    }
}

/// What every version shares, written once and expanded in each version's
/// module, where `wit` and `host` name that version's interfaces: the
/// linking, the conversions of `endpoint`, `answer`, `decision` and
/// `verdict`, and the `host` functions.
macro_rules! shared_bindings {
    () => {
        use crate::bindings::reject_status;
        use crate::state::LogLevel;
        use crate::{Endpoint, RouteDecision};

        pub(super) fn add_to_linker(
            linker: &mut wasmtime::component::Linker<HostState>,
        ) -> wasmtime::Result<()> {
            use wasmtime::component::HasSelf;
            Policy::add_to_linker::<_, HasSelf<_>>(linker, |s| s)
        }

        impl host::Host for HostState {
            fn log(&mut self, level: host::Level, message: String) {
                let level = match level {
                    host::Level::Error => LogLevel::Error,
                    host::Level::Warn => LogLevel::Warn,
                    host::Level::Info => LogLevel::Info,
                    host::Level::Debug => LogLevel::Debug,
                    host::Level::Trace => LogLevel::Trace,
                };
                self.plugin_log(level, &message);
            }

            fn now_unix_ms(&mut self) -> u64 {
                crate::state::now_unix_ms()
            }

            fn counter_add(&mut self, name: String, value: u64) {
                self.plugin_counter_add(name, value);
            }
        }

        /// The WIT name of `endpoint`.
        fn endpoint(endpoint: Endpoint) -> wit::Endpoint {
            match endpoint {
                Endpoint::ChatCompletions => wit::Endpoint::ChatCompletions,
                Endpoint::Completions => wit::Endpoint::Completions,
                Endpoint::Embeddings => wit::Endpoint::Embeddings,
            }
        }

        /// A WIT answer borrowing from a [`ReviewAnswer`].
        fn answer_wit(answer: &ReviewAnswer) -> wit::Answer<'_> {
            let s = answer.summary;
            wit::Answer {
                pool: &answer.pool,
                text: &answer.text,
                finish_reason: &answer.finish_reason,
                completion_tokens: answer.completion_tokens,
                token_logprobs: &answer.token_logprobs,
                summary: wit::LogprobSummary {
                    mean: s.mean,
                    min: s.min,
                    share_below: s.share_below,
                    threshold: s.threshold,
                },
                latency_ms: answer.latency_ms,
                partial: answer.partial,
                attributes: &[],
            }
        }

        /// Converts the plugin's verdict.
        fn verdict(verdict: wit::Verdict) -> HostVerdict {
            match verdict {
                wit::Verdict::Accept => HostVerdict::Accept,
                wit::Verdict::Escalate(e) => HostVerdict::Escalate {
                    pool: e.pool,
                    reason: e.reason,
                },
            }
        }

        /// Converts the plugin's answer. A rejection status outside
        /// 400..=599 becomes 500, as the WIT documents. A rejection's
        /// attributes are dropped: none are defined.
        fn outcome(decision: wit::Decision) -> RouteOutcome {
            match decision {
                wit::Decision::Route(route) => RouteOutcome::Route(RouteDecision {
                    pool: route.pool,
                    max_tokens_cap: route.max_tokens_cap,
                    escalate_to: route.escalate_to,
                    attributes: route
                        .attributes
                        .into_iter()
                        .map(|a| (a.key, a.value))
                        .collect(),
                }),
                wit::Decision::Reject(rejection) => RouteOutcome::Reject {
                    status: reject_status(rejection.status),
                    message: rejection.message,
                },
            }
        }
    };
}

use shared_bindings;
