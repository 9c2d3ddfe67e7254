//! Per-instance store state and what the `host` interface plugins import
//! does: log, clock and counters (each interface version's bindings call
//! into these).
//!
//! Owns what one plugin instance may reach (an empty WASI context, its
//! resource limits) and the plugin-wide bookkeeping shared by all
//! instances (counter names). It must not touch the request path.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::CallState;

/// Longest log message kept from a plugin, in bytes; longer ones are cut
/// at a character boundary.
pub(crate) const MAX_LOG_BYTES: usize = 4096;

/// Distinct counter names one plugin may use; further names are dropped so
/// that metric labels stay bounded.
pub(crate) const MAX_COUNTER_NAMES: usize = 64;

/// Core instances, tables and memories one component instance may create.
/// A Rust plugin needs a handful of each (its module plus the adapter
/// shims `wit-component` adds).
const MAX_INSTANCES: usize = 32;
const MAX_TABLES: usize = 32;
const MAX_MEMORIES: usize = 8;

/// Elements one table may hold. Rust plugins use a few hundred.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Metric that `counter-add` increments.
const COUNTER_METRIC: &str = "switchyard_plugin_counter_total";

/// Facts about a plugin shared by all of its instances.
#[derive(Debug)]
pub(crate) struct PluginMeta {
    /// The plugin's name (file stem), used in logs and metric labels.
    pub(crate) name: String,
    /// Counter names seen so far, at most [`MAX_COUNTER_NAMES`].
    counter_names: Mutex<HashSet<String>>,
    /// Whether the "too many counter names" warning was logged.
    counter_overflow_warned: AtomicBool,
}

impl PluginMeta {
    pub(crate) fn new(name: String) -> Self {
        PluginMeta {
            name,
            counter_names: Mutex::new(HashSet::new()),
            counter_overflow_warned: AtomicBool::new(false),
        }
    }

    fn counter_add(&self, counter: String, value: u64) {
        // A panic elsewhere while holding the lock leaves the set intact,
        // so a poisoned lock is still usable.
        let mut names = self
            .counter_names
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !names.contains(&counter) {
            if names.len() >= MAX_COUNTER_NAMES {
                drop(names);
                self.warn_counter_overflow(&counter);
                return;
            }
            names.insert(counter.clone());
        }
        drop(names);
        metrics::counter!(
            COUNTER_METRIC,
            "plugin" => self.name.clone(),
            "name" => counter,
        )
        .increment(value);
    }

    fn warn_counter_overflow(&self, counter: &str) {
        if self.counter_overflow_warned.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(
            target: "switchyard::plugin",
            plugin = %self.name,
            counter = %counter,
            limit = MAX_COUNTER_NAMES,
            "plugin uses too many counter names; dropping new ones",
        );
    }
}

/// Resource limits of one store: [`StoreLimits`] plus a note of whether a
/// memory grow was refused, so a failure after it is reported as "memory".
#[derive(Debug)]
pub(crate) struct Limits {
    inner: StoreLimits,
    /// Set when the plugin asked for more than `max_memory_bytes`.
    pub(crate) memory_denied: bool,
}

impl Limits {
    pub(crate) fn new(max_memory_bytes: usize) -> Self {
        let inner = StoreLimitsBuilder::new()
            .memory_size(max_memory_bytes)
            .table_elements(MAX_TABLE_ELEMENTS)
            .instances(MAX_INSTANCES)
            .tables(MAX_TABLES)
            .memories(MAX_MEMORIES)
            .build();
        Limits {
            inner,
            memory_denied: false,
        }
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum)?;
        if !allowed {
            self.memory_denied = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

// Limitation: plugin stdout and stderr are discarded rather than routed to
// the log, so `println!` debugging is lost; plugins must use the SDK's log
// functions.

/// The data of one plugin instance's store.
pub(crate) struct HostState {
    /// Empty WASI context: no files, environment, arguments or network;
    /// stdin is closed and stdout/stderr are discarded.
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: Limits,
    meta: Arc<PluginMeta>,
    /// The memory and call in progress of a 0.4.0 plugin.
    pub(crate) core: CallState,
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("plugin", &self.meta.name)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl HostState {
    pub(crate) fn new(meta: Arc<PluginMeta>, max_memory_bytes: usize) -> Self {
        HostState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: Limits::new(max_memory_bytes),
            meta,
            core: CallState::default(),
        }
    }

    pub(crate) fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    pub(crate) fn table_ref(&self) -> &ResourceTable {
        &self.table
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Severity of a plugin's log message, as every interface version has it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

// Limitation: plugin logs are not rate-limited; a plugin that logs at error
// on every request floods the host's log.
impl HostState {
    /// `log`: writes `message` to the log at `level`, tagged with the
    /// plugin's name and cut to [`MAX_LOG_BYTES`].
    pub(crate) fn plugin_log(&self, level: LogLevel, message: &str) {
        let message = truncate(message, MAX_LOG_BYTES);
        let plugin = self.meta.name.as_str();

        // `tracing` needs the level at compile time, hence one arm each.
        match level {
            LogLevel::Error => tracing::error!(
                target: "switchyard::plugin", plugin, "{message}"
            ),
            LogLevel::Warn => tracing::warn!(
                target: "switchyard::plugin", plugin, "{message}"
            ),
            LogLevel::Info => tracing::info!(
                target: "switchyard::plugin", plugin, "{message}"
            ),
            LogLevel::Debug => tracing::debug!(
                target: "switchyard::plugin", plugin, "{message}"
            ),
            LogLevel::Trace => tracing::trace!(
                target: "switchyard::plugin", plugin, "{message}"
            ),
        }
    }

    /// `counter-add`: adds `value` to the plugin counter `name`.
    pub(crate) fn plugin_counter_add(&self, name: String, value: u64) {
        self.meta.counter_add(name, value);
    }
}

/// `now-unix-ms`: wall-clock milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    // A clock before 1970 is a broken machine; 0 is as good as any.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_cuts_at_a_character_boundary() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn counter_names_beyond_the_bound_are_dropped() {
        let meta = PluginMeta::new("p".into());
        for i in 0..MAX_COUNTER_NAMES + 10 {
            meta.counter_add(format!("c{i}"), 1);
        }
        meta.counter_add("c0".into(), 1);
        let names = meta
            .counter_names
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        assert_eq!(names.len(), MAX_COUNTER_NAMES);
        assert!(names.contains("c0"));
        assert!(meta.counter_overflow_warned.load(Ordering::Relaxed));
    }

    #[test]
    fn refused_memory_grow_is_remembered() {
        let mut limits = Limits::new(1 << 20);
        let grew = limits.memory_growing(0, 2 << 20, None);
        assert!(matches!(grew, Ok(false)));
        assert!(limits.memory_denied);
    }
}
