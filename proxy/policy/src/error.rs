//! Errors of the policy host: [`LoadError`] when a plugin cannot be put
//! into service, [`CallError`] when one `route` call fails.
//!
//! Owns the wording and the metric labels of those failures; deciding the
//! HTTP answer for a failed call is the proxy's job.

use std::path::PathBuf;

/// Hint appended when the plugin file is missing.
const BUILD_HINT: &str = "build it with `make plugins`, or point \
                          [policy] plugin at an existing .wasm file";

/// Why a plugin could not be loaded. Every message names the plugin file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A `[policy]` setting is out of range.
    #[error("[policy] {key} {reason}")]
    Settings {
        /// The setting's key, e.g. `timeout_ms`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The plugin file does not exist.
    #[error("policy plugin {path} does not exist; {BUILD_HINT}", path = .path.display())]
    Missing {
        /// The configured plugin path.
        path: PathBuf,
    },

    /// The plugin file exists but could not be read.
    #[error("cannot read policy plugin {path}: {source}", path = .path.display())]
    Read {
        /// The configured plugin path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// The file is not a WebAssembly module or component wasmtime can
    /// compile.
    #[error(
        "policy plugin {path} is not a loadable WebAssembly plugin (build \
         it with switchyard-sdk for wasm32-unknown-unknown): {detail}",
        path = .path.display()
    )]
    Compile {
        /// The configured plugin path.
        path: PathBuf,
        /// Wasmtime's explanation.
        detail: String,
    },

    /// The component was built against a version of the interface this
    /// Switchyard does not load, usually a newer one.
    #[error(
        "policy plugin {path} was built against {found}, but this switchyard \
         loads {supported}: upgrade switchyard, or rebuild the plugin with \
         the switchyard-sdk of this release",
        path = .path.display()
    )]
    Interface {
        /// The configured plugin path.
        path: PathBuf,
        /// The version the component imports, e.g. `switchyard:policy@0.4.0`.
        found: String,
        /// The versions this host loads, joined for the message.
        supported: String,
    },

    /// The plugin exports none of the supported interface versions, or
    /// imports something the host does not provide (sockets, for
    /// example).
    #[error(
        "policy plugin {path} does not fit switchyard:policy@0.4.0, @0.3.0 \
         or @0.2.0: {detail} (rebuild it with this switchyard-sdk; a core \
         module may import only switchyard-0.4, a component only the host \
         interface and WASI cli, clocks, random, io and filesystem)",
        path = .path.display()
    )]
    Link {
        /// The configured plugin path.
        path: PathBuf,
        /// Wasmtime's explanation.
        detail: String,
    },

    /// The plugin's `init` returned an error, usually a bad config key.
    #[error(
        "policy plugin {path} rejected its configuration: {message}",
        path = .path.display()
    )]
    Init {
        /// The configured plugin path.
        path: PathBuf,
        /// The plugin's own message.
        message: String,
    },

    /// The plugin's `init` trapped, ran out of time or of memory.
    #[error("policy plugin {path} failed in init: {source}", path = .path.display())]
    InitFailed {
        /// The configured plugin path.
        path: PathBuf,
        /// How the call failed.
        source: CallError,
    },

    /// The plugin's own fixtures do not parse, or one of its cases got
    /// a decision other than the one it expects.
    #[error("policy plugin {path} fails its own fixtures: {detail}", path = .path.display())]
    Fixture {
        /// The configured plugin path.
        path: PathBuf,
        /// The case and what differed.
        detail: String,
    },

    /// The engine or its epoch thread could not be set up.
    #[error("cannot start the wasm engine for policy plugin {path}: {detail}", path = .path.display())]
    Engine {
        /// The configured plugin path.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

/// Why one call into the plugin failed. The instance that failed is
/// discarded, so the next call runs in a healthy one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The plugin trapped: it panicked, hit `unreachable`, or misused the
    /// host interface. Its panic message, if any, was logged at error.
    #[error("policy plugin {plugin} trapped: {detail}")]
    Trap {
        /// The plugin's name (file stem).
        plugin: String,
        /// The trap, as wasmtime describes it.
        detail: String,
    },

    /// The call ran past its deadline and was interrupted.
    #[error("policy plugin {plugin} ran past its deadline of {timeout_ms} ms")]
    Timeout {
        /// The plugin's name (file stem).
        plugin: String,
        /// The deadline, `[policy] timeout_ms`.
        timeout_ms: u64,
    },

    /// The plugin tried to grow its memory past the limit and then failed.
    #[error(
        "policy plugin {plugin} failed after reaching its memory limit of \
         {max_memory_bytes} bytes ([policy] max_memory_bytes)"
    )]
    Memory {
        /// The plugin's name (file stem).
        plugin: String,
        /// The limit, `[policy] max_memory_bytes`.
        max_memory_bytes: u64,
    },

    /// A fresh instance could not be created or initialised.
    #[error("policy plugin {plugin} could not start a fresh instance: {detail}")]
    Instantiate {
        /// The plugin's name (file stem).
        plugin: String,
        /// What failed.
        detail: String,
    },
}

impl CallError {
    /// Short, fixed label for metrics and logs: `trap`, `timeout`, `memory`
    /// or `instantiate`.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Trap { .. } => "trap",
            CallError::Timeout { .. } => "timeout",
            CallError::Memory { .. } => "memory",
            CallError::Instantiate { .. } => "instantiate",
        }
    }

    /// The name of the plugin that failed.
    pub fn plugin(&self) -> &str {
        match self {
            CallError::Trap { plugin, .. }
            | CallError::Timeout { plugin, .. }
            | CallError::Memory { plugin, .. }
            | CallError::Instantiate { plugin, .. } => plugin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_plugin_message_says_how_to_build_it() {
        let err = LoadError::Missing {
            path: PathBuf::from("target/x.wasm"),
        };
        let msg = err.to_string();
        assert!(msg.contains("target/x.wasm"), "{msg}");
        assert!(msg.contains("make plugins"), "{msg}");
    }

    #[test]
    fn call_error_kind_labels_are_stable() {
        let plugin = String::from("p");
        let timeout = CallError::Timeout {
            plugin: plugin.clone(),
            timeout_ms: 5,
        };
        assert_eq!(timeout.kind(), "timeout");
        assert_eq!(timeout.plugin(), "p");
        assert!(timeout.to_string().contains("5 ms"));
        let memory = CallError::Memory {
            plugin,
            max_memory_bytes: 1,
        };
        assert_eq!(memory.kind(), "memory");
    }
}
