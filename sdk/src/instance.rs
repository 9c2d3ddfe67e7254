//! The state of one plugin instance, shared by both ABIs: the policy value
//! that `init` builds, the panic hook, and the calls into [`Policy`] with
//! SDK types. `component` and `core_abi` convert to and from their own
//! wire forms around these; nothing here knows either.

use std::cell::RefCell;

use crate::request::Request;
use crate::types::{Answer, Decision, Verdict};
use crate::Policy;

thread_local! {
    /// The policy value of this instance, set by `init`. An instance is
    /// single-threaded, so a thread-local is the whole state.
    static POLICY: RefCell<Option<Box<dyn Policy>>> =
        const { RefCell::new(None) };
}

/// Status and message returned when the host calls `route` before `init`
/// succeeded, which a correct host never does.
const NOT_INITIALISED_STATUS: u16 = 500;
const NOT_INITIALISED: &str = "policy plugin was not initialised";

/// Sends panic messages to the host's log at error level, as "plugin
/// panicked at FILE:LINE: MESSAGE". Call it first thing in `init`: without
/// the hook a panic would only reach stderr, which the host discards (or,
/// in a core module, which does not exist).
pub(crate) fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(non-text payload)");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        crate::log::log(
            crate::log::Level::Error,
            &format!("plugin panicked{at}: {message}"),
        );
    }));
}

/// Parses the configuration (JSON text) and stores the policy value.
pub(crate) fn init<P: Policy>(config: &str) -> Result<(), String> {
    let config: serde_json::Value = serde_json::from_str(config)
        .map_err(|e| format!("policy config is not valid JSON: {e}"))?;
    let policy = P::init(&config)?;
    POLICY.with(|slot| *slot.borrow_mut() = Some(Box::new(policy)));
    Ok(())
}

/// Asks the policy where `req` goes; before `init` succeeded, a 500
/// rejection.
pub(crate) fn route(req: &Request<'_>) -> Decision {
    POLICY.with(|slot| match slot.borrow().as_deref() {
        Some(policy) => policy.route(req),
        None => Decision::reject(NOT_INITIALISED_STATUS, NOT_INITIALISED),
    })
}

/// Asks the policy to judge `answer`. Before `init` it accepts, which a
/// correct host never relies on.
pub(crate) fn review(req: &Request<'_>, answer: &Answer) -> Verdict {
    POLICY.with(|slot| match slot.borrow().as_deref() {
        Some(policy) => policy.review(req, answer),
        None => Verdict::Accept,
    })
}
