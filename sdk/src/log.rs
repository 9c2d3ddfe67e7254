//! Logging from a plugin into the host's log.
//!
//! Messages go to the host's `tracing` output with target
//! `switchyard::plugin` and a `plugin` field naming the plugin; the host's
//! log filter decides what is kept. Natively (plugin unit tests) they go to
//! stderr.
//!
//! ```
//! use switchyard_sdk::log;
//!
//! log::info!("loaded {} rules", 3);
//! log::log(log::Level::Warn, "no rules for embeddings");
//! ```
//!
//! Plugins have no usable stdout or stderr: the host discards both, so
//! `println!` output is lost. Use these instead.

// Limitation: the message is formatted even when the host will drop it at
// its current level, since the interface has no "is this level enabled"
// call; keep debug and trace logging off hot paths.

/// Severity of a log message; maps to the `tracing` level of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Something failed and a request or the plugin is affected.
    Error,
    /// Something is wrong but was handled.
    Warn,
    /// A normal but notable event.
    Info,
    /// Detail for debugging a plugin.
    Debug,
    /// Very verbose detail.
    Trace,
}

impl Level {
    /// Lowercase name: `error`, `warn`, `info`, `debug` or `trace`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

/// Writes `message` to the host's log at `level`. The host truncates
/// messages longer than 4 KiB.
pub fn log(level: Level, message: &str) {
    crate::host::imp::log(level, message);
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_at {
    ($level:ident, $($arg:tt)+) => {
        $crate::log::log(
            $crate::log::Level::$level,
            &::std::format!($($arg)+),
        )
    };
}

/// Logs a `format!`-style message at error level.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_error {
    ($($arg:tt)+) => { $crate::__log_at!(Error, $($arg)+) };
}

/// Logs a `format!`-style message at warn level.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_warn {
    ($($arg:tt)+) => { $crate::__log_at!(Warn, $($arg)+) };
}

/// Logs a `format!`-style message at info level.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_info {
    ($($arg:tt)+) => { $crate::__log_at!(Info, $($arg)+) };
}

/// Logs a `format!`-style message at debug level.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_debug {
    ($($arg:tt)+) => { $crate::__log_at!(Debug, $($arg)+) };
}

/// Logs a `format!`-style message at trace level.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_trace {
    ($($arg:tt)+) => { $crate::__log_at!(Trace, $($arg)+) };
}

/// Logs a `format!`-style message at error level.
#[doc(inline)]
pub use crate::__log_error as error;

/// Logs a `format!`-style message at warn level.
#[doc(inline)]
pub use crate::__log_warn as warn;

/// Logs a `format!`-style message at info level.
#[doc(inline)]
pub use crate::__log_info as info;

/// Logs a `format!`-style message at debug level.
#[doc(inline)]
pub use crate::__log_debug as debug;

/// Logs a `format!`-style message at trace level.
#[doc(inline)]
pub use crate::__log_trace as trace;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_order_from_most_to_least_severe() {
        assert!(Level::Error < Level::Warn);
        assert!(Level::Debug < Level::Trace);
        assert_eq!(Level::Warn.as_str(), "warn");
    }

    #[test]
    fn macros_format_their_arguments() {
        crate::log::info!("x = {}", 1);
        crate::log::trace!("plain");
    }
}
