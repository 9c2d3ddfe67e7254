//! The host services a plugin may call: the clock and counters (logging is
//! in [`crate::log`]).
//!
//! In a component (`wasm32-wasip2`) these call the WIT `host` imports, in a
//! core module (`wasm32-unknown-unknown`) the `switchyard-0.4` imports; on
//! other targets (plugin unit tests) they fall back to the system clock
//! and do nothing, so policy code runs unchanged under `cargo test`.

/// Wall-clock time in milliseconds since the Unix epoch, from the host.
pub fn now_unix_ms() -> u64 {
    imp::now_unix_ms()
}

/// Adds `value` to the plugin counter `name`.
///
/// The host exports it as `switchyard_plugin_counter_total{plugin, name}`.
/// Use a small, fixed set of names (not request data): the host keeps at
/// most 64 distinct names per plugin and drops the rest. Natively this does
/// nothing.
pub fn counter_add(name: &str, value: u64) {
    imp::counter_add(name, value);
}

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
pub(crate) mod imp {
    use crate::component::bindings::switchyard::policy::host;
    use crate::log::Level;

    pub fn now_unix_ms() -> u64 {
        host::now_unix_ms()
    }

    pub fn counter_add(name: &str, value: u64) {
        host::counter_add(name, value);
    }

    pub fn log(level: Level, message: &str) {
        let level = match level {
            Level::Error => host::Level::Error,
            Level::Warn => host::Level::Warn,
            Level::Info => host::Level::Info,
            Level::Debug => host::Level::Debug,
            Level::Trace => host::Level::Trace,
        };
        host::log(level, message);
    }
}

#[cfg(core_abi)]
pub(crate) use crate::core_abi::host as imp;

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod imp {
    use std::time::{SystemTime, UNIX_EPOCH};

    use crate::log::Level;

    pub fn now_unix_ms() -> u64 {
        // A clock before 1970 is a broken machine; 0 is as good as any.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn counter_add(_name: &str, _value: u64) {}

    pub fn log(level: Level, message: &str) {
        eprintln!("[plugin {}] {message}", level.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_clock_is_after_2020() {
        assert!(now_unix_ms() > 1_577_836_800_000);
    }
}
