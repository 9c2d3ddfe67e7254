//! A loaded policy plugin: its engine, compiled component and the warm
//! instances that serve `route` calls, one kept by each calling thread and
//! a small shared pool besides.
//!
//! Owns instance lifecycle (create, init, reuse, discard) and the per-call
//! deadline and memory cap. An instance that failed a call is never
//! reused: it is dropped and the next call gets a healthy one.

use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use thread_local::ThreadLocal;
use wasmtime::component::Component;
use wasmtime::{Engine, Module, Store, Trap};

use crate::bindings::{self, Bindings, PolicyPre};
use crate::error::{CallError, LoadError};
use crate::fixtures::{self, Fixtures};
use crate::linker;
use crate::state::{HostState, PluginMeta};
use crate::ticker::{tick_for, Ticker};
use crate::{PolicySettings, ReviewAnswer, RouteOutcome, RouteRequest, Verdict};

/// Most idle instances kept for reuse, per-thread ones included; more are
/// dropped when returned. The number of instances in use at once is
/// bounded by the threads calling [`Policy::route`], so this only caps
/// memory kept after a burst.
const MAX_IDLE_INSTANCES: usize = 32;

/// Least deadline of `init`, in ms. `init` runs once per instance, and a
/// fresh instance's first call also pays for touching its memory, which
/// on a loaded machine can take longer than a `route` budget.
const MIN_INIT_TIMEOUT_MS: u64 = 1000;

/// Hex digits of the SHA-256 of the plugin file kept as its version.
const VERSION_HEX_DIGITS: usize = 12;

// Limitation: each idle instance keeps the linear memory it grew to (wasm
// memories never shrink), so the worst case held is MAX_IDLE_INSTANCES
// times max_memory_bytes; typical Rust plugins use 1 to 2 MiB each.

/// A loaded routing policy plugin, ready to answer [`Policy::route`].
///
/// Cheap to share: `Send + Sync`, meant to live behind an `Arc` and be
/// called from many threads or tokio tasks at once. Dropping it stops its
/// epoch thread and frees its instances.
pub struct Policy {
    path: PathBuf,
    name: String,
    version: String,
    /// `settings.config` as JSON, handed to `init` of every instance.
    config_json: String,
    timeout_ms: u64,
    max_memory_bytes: u64,
    /// Per-call deadline in epochs (ticks of the policy's ticker), rounded
    /// up.
    deadline_ticks: u64,
    /// Deadline of `init` in epochs.
    init_deadline_ticks: u64,
    meta: Arc<PluginMeta>,
    engine: Engine,
    /// The component, linked against the interface version it was built
    /// for.
    pre: PolicyPre,
    /// One warm instance per calling thread: a tokio worker calls into
    /// its own instance, whose memory stays in its core's cache, without
    /// taking a lock. At most `MAX_IDLE_INSTANCES` threads get one.
    local: ThreadLocal<Cell<Option<Instance>>>,
    /// Threads with a slot in `local`.
    local_slots: AtomicUsize,
    /// Warm instances of no thread in particular.
    idle: Mutex<Vec<Instance>>,
    _ticker: Ticker,
}

/// One instantiated, initialised plugin and its store.
struct Instance {
    store: Store<HostState>,
    bindings: Bindings,
}

/// Why a fresh instance could not be made ready.
enum InstanceError {
    /// `init` returned this error message.
    Refused(String),
    /// Instantiation or `init` failed.
    Failed(CallError),
}

impl Policy {
    /// Loads the plugin named by `settings.plugin`: reads and compiles it,
    /// links it against the host interface and a sandboxed WASI, and
    /// initialises one instance with `settings.config`.
    ///
    /// Compilation takes tens to hundreds of milliseconds; call this at
    /// start-up or reload, not per request.
    pub fn load(settings: &PolicySettings) -> Result<Policy, LoadError> {
        validate(settings)?;
        let path = settings.plugin.clone();

        let bytes = std::fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                LoadError::Missing { path: path.clone() }
            } else {
                LoadError::Read {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Policy::load_bytes(settings, &bytes)
    }

    /// Like [`Policy::load`], with the component's bytes given rather than
    /// read from `settings.plugin` (which still names it in logs and
    /// errors): for a plugin uploaded to a running Switchyard.
    pub fn load_bytes(settings: &PolicySettings, bytes: &[u8]) -> Result<Policy, LoadError> {
        validate(settings)?;
        let path = settings.plugin.clone();
        let version = version_of(bytes);
        let name = name_of(&path);

        // Epoch interruption lets a deadline stop a plugin stuck in a loop
        // at the cost of a counter check on loop back-edges.
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let engine_error = |detail: String| LoadError::Engine {
            path: path.clone(),
            detail,
        };
        let engine = Engine::new(&config).map_err(|e| engine_error(error_chain(&e)))?;

        let pre = if bindings::is_core_module(bytes) {
            compile_core(&engine, bytes, &path)?
        } else {
            compile_component(&engine, bytes, &path)?
        };

        let config_json =
            serde_json::to_string(&settings.config).map_err(|e| LoadError::Settings {
                key: "config",
                reason: format!("cannot be encoded as JSON: {e}"),
            })?;
        let tick = tick_for(settings.timeout_ms);
        let ticker = Ticker::start(engine.clone(), tick)
            .map_err(|e| engine_error(format!("epoch thread: {e}")))?;

        let policy = Policy {
            path: path.clone(),
            meta: Arc::new(PluginMeta::new(name.clone())),
            name,
            version,
            config_json,
            timeout_ms: settings.timeout_ms,
            max_memory_bytes: settings.max_memory_bytes,
            deadline_ticks: deadline_ticks(settings.timeout_ms, tick),
            init_deadline_ticks: deadline_ticks(init_timeout_ms(settings.timeout_ms), tick),
            engine,
            pre,
            local: ThreadLocal::new(),
            local_slots: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
            _ticker: ticker,
        };

        // One instance now, so that a bad config fails the load rather than
        // the first request.
        let instance = policy.instantiate().map_err(|e| match e {
            InstanceError::Refused(message) => LoadError::Init {
                path: path.clone(),
                message,
            },
            InstanceError::Failed(source) => LoadError::InitFailed {
                path: path.clone(),
                source,
            },
        })?;
        // Shared, so that the first thread to call takes it: the loading
        // thread may never call.
        policy
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(instance);

        // The plugin's own fixtures must hold before it serves anything.
        let fixtures = fixtures::embedded(bytes).map_err(|detail| LoadError::Fixture {
            path: path.clone(),
            detail,
        })?;
        let cases = match &fixtures {
            Some(fixtures) => policy.check_fixtures(fixtures)?,
            None => 0,
        };

        tracing::info!(
            plugin = %policy.name,
            version = %policy.version,
            path = %policy.path.display(),
            interface = policy.pre.interface(),
            timeout_ms = policy.timeout_ms,
            max_memory_bytes = policy.max_memory_bytes,
            fixtures = cases,
            "policy plugin loaded",
        );
        Ok(policy)
    }

    /// Asks the plugin where `req` goes.
    ///
    /// Synchronous and usually a few microseconds; bounded by
    /// `timeout_ms` (plus the deadline's resolution, a tenth of it between
    /// 1 and 10 ms) and, when no warm instance is free, the time to create
    /// one.
    ///
    /// The plugin reads `req` through the handle it is lent for the call,
    /// hence the `Arc`: nothing is copied until the plugin asks for it.
    pub fn route(&self, req: &Arc<RouteRequest>) -> Result<RouteOutcome, CallError> {
        let mut instance = match self.take_idle() {
            Some(instance) => instance,
            None => self.instantiate().map_err(|e| self.fresh_failed(e))?,
        };

        let store = &mut instance.store;
        store.data_mut().limits.memory_denied = false;
        store.set_epoch_deadline(self.deadline_ticks);
        let result = instance.bindings.route(store, req);

        match result {
            Ok(outcome) => {
                self.put_back(instance);
                Ok(outcome)
            }
            // The instance is dropped here: after a trap its state is
            // undefined, so it must never serve another call.
            Err(err) => {
                let state = instance.store.data();
                Err(self.call_failed(&err, state, self.timeout_ms))
            }
        }
    }

    /// Asks the plugin whether the small pool's `answer` to `req` stands
    /// or the request escalates.
    ///
    /// Same budget, instance handling and errors as [`Policy::route`]. A
    /// request should be reviewed by the same `Policy` value that routed
    /// it (hold an `Arc<Policy>` for the request), so both calls see one
    /// plugin version even across a reload.
    pub fn review(
        &self,
        req: &Arc<RouteRequest>,
        answer: &ReviewAnswer,
    ) -> Result<Verdict, CallError> {
        let mut instance = match self.take_idle() {
            Some(instance) => instance,
            None => self.instantiate().map_err(|e| self.fresh_failed(e))?,
        };

        let store = &mut instance.store;
        store.data_mut().limits.memory_denied = false;
        store.set_epoch_deadline(self.deadline_ticks);
        let result = instance.bindings.review(store, req, answer);

        match result {
            Ok(verdict) => {
                self.put_back(instance);
                Ok(verdict)
            }
            // Dropped: a trapped instance never serves again.
            Err(err) => {
                let state = instance.store.data();
                Err(self.call_failed(&err, state, self.timeout_ms))
            }
        }
    }

    /// The plugin's name: its file name without extension.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's version: the first 12 hex digits of the SHA-256 of
    /// its file, so two loads of the same bytes report the same version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The interface version the plugin was built against, for example
    /// `switchyard:policy@0.3.0`.
    pub fn interface(&self) -> &'static str {
        self.pre.interface()
    }

    /// The longest one `route` or `review` call may run (`timeout_ms`).
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The plugin file this policy was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs the plugin's own fixtures on an instance of their own; the
    /// first case decided differently fails the load. Returns the number
    /// of cases.
    fn check_fixtures(&self, fixtures: &Fixtures) -> Result<usize, LoadError> {
        let failed = |detail: String| LoadError::Fixture {
            path: self.path.clone(),
            detail,
        };
        let config_json = match &fixtures.config {
            Some(config) => config.to_string(),
            None => self.config_json.clone(),
        };
        let mut instance = self.instantiate_with(&config_json).map_err(|e| {
            failed(match e {
                InstanceError::Refused(message) => format!("init rejected their config: {message}"),
                InstanceError::Failed(error) => format!("init with their config failed: {error}"),
            })
        })?;

        for case in &fixtures.cases {
            let in_case = |detail: String| failed(format!("case {:?}: {detail}", case.name));
            let req = Arc::new(case.request.to_route_request().map_err(in_case)?);
            let store = &mut instance.store;
            store.set_epoch_deadline(self.deadline_ticks);
            let decision = match instance.bindings.route(store, &req) {
                Ok(decision) => decision,
                Err(err) => {
                    let error = self.call_failed(&err, instance.store.data(), self.timeout_ms);
                    return Err(in_case(error.to_string()));
                }
            };
            case.expect.check(&decision).map_err(in_case)?;
        }
        Ok(fixtures.cases.len())
    }

    /// Creates an instance and runs `init` on it.
    fn instantiate(&self) -> Result<Instance, InstanceError> {
        self.instantiate_with(&self.config_json)
    }

    /// Creates an instance and runs `init` on it with `config_json`.
    fn instantiate_with(&self, config_json: &str) -> Result<Instance, InstanceError> {
        let max_memory = usize::try_from(self.max_memory_bytes).unwrap_or(usize::MAX);
        let state = HostState::new(Arc::clone(&self.meta), max_memory);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);

        // Instantiation runs no plugin code, but the deadline must be set
        // before `init` runs.
        store.set_epoch_deadline(self.init_deadline_ticks);
        let bindings = match self.pre.instantiate(&mut store) {
            Ok(bindings) => bindings,
            Err(err) => {
                let error = self.instantiate_failed(&err, store.data());
                return Err(InstanceError::Failed(error));
            }
        };
        match bindings.init(&mut store, config_json) {
            Ok(Ok(())) => Ok(Instance { store, bindings }),
            Ok(Err(message)) => Err(InstanceError::Refused(message)),
            Err(err) => Err(InstanceError::Failed(self.call_failed(
                &err,
                store.data(),
                init_timeout_ms(self.timeout_ms),
            ))),
        }
    }

    /// A warm instance: the calling thread's own, else a shared one.
    fn take_idle(&self) -> Option<Instance> {
        if let Some(instance) = self.local.get().and_then(Cell::take) {
            return Some(instance);
        }
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    /// Keeps `instance` warm: as the calling thread's own when its slot
    /// is free, else in the shared pool while it has room.
    fn put_back(&self, instance: Instance) {
        let instance = match self.local_slot() {
            Some(slot) => match slot.replace(Some(instance)) {
                None => return,
                // The thread's slot was taken meanwhile (a call within a
                // call); the older instance goes to the shared pool.
                Some(older) => older,
            },
            None => instance,
        };
        let room = MAX_IDLE_INSTANCES.saturating_sub(self.local_slots.load(Ordering::Relaxed));
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < room {
            idle.push(instance);
            return;
        }
        // Drop the surplus instance after releasing the lock.
        drop(idle);
        drop(instance);
    }

    /// The calling thread's slot, made now if there is room for one more.
    fn local_slot(&self) -> Option<&Cell<Option<Instance>>> {
        if let Some(slot) = self.local.get() {
            return Some(slot);
        }
        let claimed = self
            .local_slots
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_IDLE_INSTANCES).then_some(n + 1)
            })
            .is_ok();
        claimed.then(|| self.local.get_or(|| Cell::new(None)))
    }

    /// Classifies a failed call into the plugin that ran under a deadline
    /// of `timeout_ms`.
    fn call_failed(&self, err: &wasmtime::Error, state: &HostState, timeout_ms: u64) -> CallError {
        let plugin = self.name.clone();
        let error = if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            CallError::Timeout { plugin, timeout_ms }
        } else if state.limits.memory_denied {
            CallError::Memory {
                plugin,
                max_memory_bytes: self.max_memory_bytes,
            }
        } else {
            CallError::Trap {
                plugin,
                detail: root_cause(err),
            }
        };
        tracing::debug!(
            plugin = %self.name,
            kind = error.kind(),
            error = %error_chain(err),
            "policy plugin call failed; instance discarded",
        );
        error
    }

    fn instantiate_failed(&self, err: &wasmtime::Error, state: &HostState) -> CallError {
        // A core module's start function runs at instantiation, under
        // `init`'s deadline.
        if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return CallError::Timeout {
                plugin: self.name.clone(),
                timeout_ms: init_timeout_ms(self.timeout_ms),
            };
        }
        if state.limits.memory_denied {
            return CallError::Memory {
                plugin: self.name.clone(),
                max_memory_bytes: self.max_memory_bytes,
            };
        }
        CallError::Instantiate {
            plugin: self.name.clone(),
            detail: error_chain(err),
        }
    }

    /// A fresh instance for a `route` call failed; report it as
    /// "instantiate", whatever went wrong inside.
    fn fresh_failed(&self, err: InstanceError) -> CallError {
        let detail = match err {
            InstanceError::Refused(message) => {
                format!("init rejected the configuration: {message}")
            }
            InstanceError::Failed(CallError::Instantiate { detail, .. }) => detail,
            InstanceError::Failed(other) => format!("init failed: {other}"),
        };
        CallError::Instantiate {
            plugin: self.name.clone(),
            detail,
        }
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let idle = self.idle.lock().map_or(0, |idle| idle.len());
        f.debug_struct("Policy")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("timeout_ms", &self.timeout_ms)
            .field("max_memory_bytes", &self.max_memory_bytes)
            .field("thread_slots", &self.local_slots.load(Ordering::Relaxed))
            .field("shared_idle_instances", &idle)
            .finish_non_exhaustive()
    }
}

fn validate(settings: &PolicySettings) -> Result<(), LoadError> {
    if settings.timeout_ms == 0 {
        return Err(LoadError::Settings {
            key: "timeout_ms",
            reason: "must be at least 1".into(),
        });
    }
    if settings.max_memory_bytes == 0 {
        return Err(LoadError::Settings {
            key: "max_memory_bytes",
            reason: "must be at least 1 (a Rust plugin needs about 2 MiB)".into(),
        });
    }
    Ok(())
}

/// The `switchyard:policy` version `component` imports (every plugin the
/// SDK builds imports the `host` interface), or `None`.
fn imported_interface(component: &Component, engine: &Engine) -> Option<String> {
    let ty = component.component_type();
    let names: Vec<&str> = ty.imports(engine).map(|(name, _)| name).collect();
    interface_of(&names)
}

/// Compiles and links a core module against 0.4.0.
fn compile_core(engine: &Engine, bytes: &[u8], path: &Path) -> Result<PolicyPre, LoadError> {
    let module = Module::new(engine, bytes).map_err(|e| LoadError::Compile {
        path: path.to_owned(),
        detail: error_chain(&e),
    })?;
    PolicyPre::core(engine, &module).map_err(|e| LoadError::Link {
        path: path.to_owned(),
        detail: error_chain(&e),
    })
}

/// Compiles a component and links it against the interface version it
/// was built for, 0.3.0 or 0.2.0, and a sandboxed WASI.
fn compile_component(engine: &Engine, bytes: &[u8], path: &Path) -> Result<PolicyPre, LoadError> {
    let component = Component::new(engine, bytes).map_err(|e| LoadError::Compile {
        path: path.to_owned(),
        detail: error_chain(&e),
    })?;
    if let Some(found) = imported_interface(&component, engine) {
        if !crate::SUPPORTED_INTERFACES.contains(&found.as_str()) {
            return Err(LoadError::Interface {
                path: path.to_owned(),
                found,
                supported: crate::SUPPORTED_INTERFACES.join(" and "),
            });
        }
    }
    let link_error = |e: wasmtime::Error| LoadError::Link {
        path: path.to_owned(),
        detail: error_chain(&e),
    };
    let linker = linker::linker(engine).map_err(link_error)?;
    let pre = linker.instantiate_pre(&component).map_err(link_error)?;
    PolicyPre::component(pre).map_err(link_error)
}

/// The `switchyard:policy@X` version among import `names` such as
/// `switchyard:policy/host@0.3.0`.
fn interface_of(names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| {
        let rest = name.strip_prefix("switchyard:policy/")?;
        let (_, version) = rest.split_once('@')?;
        Some(format!("switchyard:policy@{version}"))
    })
}

/// Deadline of `init` in ms for a `route` deadline of `timeout_ms`.
fn init_timeout_ms(timeout_ms: u64) -> u64 {
    timeout_ms.max(MIN_INIT_TIMEOUT_MS)
}

/// Deadline of a call in epochs: `timeout_ms` rounded up to whole ticks,
/// plus one because the current epoch is already partly over.
fn deadline_ticks(timeout_ms: u64, tick: Duration) -> u64 {
    let tick_ms = u64::try_from(tick.as_millis()).unwrap_or(1).max(1);
    timeout_ms.div_ceil(tick_ms).saturating_add(1)
}

fn version_of(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(VERSION_HEX_DIGITS);
    for byte in digest.iter().take(VERSION_HEX_DIGITS.div_ceil(2)) {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex.truncate(VERSION_HEX_DIGITS);
    hex
}

fn name_of(path: &Path) -> String {
    path.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The innermost cause: for a trap, wasmtime's description of it
/// ("wasm trap: wasm `unreachable` instruction executed").
fn root_cause(err: &wasmtime::Error) -> String {
    err.root_cause().to_string()
}

/// All causes on one line, outermost first; a wasm backtrace in the chain
/// stays multi-line.
fn error_chain(err: &wasmtime::Error) -> String {
    let causes: Vec<String> = err.chain().map(ToString::to_string).collect();
    causes.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_rounds_up_and_adds_a_tick() {
        assert_eq!(deadline_ticks(50, Duration::from_millis(1)), 51);
        assert_eq!(deadline_ticks(1, Duration::from_millis(1)), 2);
        assert_eq!(deadline_ticks(50, Duration::from_millis(5)), 11);
        assert_eq!(deadline_ticks(1000, Duration::from_millis(10)), 101);
    }

    #[test]
    fn version_is_twelve_hex_digits_of_sha256() {
        // SHA-256 of the empty input starts e3b0c44298fc.
        assert_eq!(version_of(b""), "e3b0c44298fc");
    }

    #[test]
    fn the_interface_version_is_read_from_the_imports() {
        let names = ["wasi:cli/stdout@0.2.6", "switchyard:policy/host@0.4.0"];
        assert_eq!(
            interface_of(&names).as_deref(),
            Some("switchyard:policy@0.4.0")
        );
        assert_eq!(interface_of(&["wasi:cli/stdout@0.2.6"]), None);
    }

    #[test]
    fn name_is_the_file_stem() {
        assert_eq!(name_of(Path::new("a/b/cost_router.wasm")), "cost_router");
    }

    #[test]
    fn zero_timeout_is_rejected_with_its_key() {
        let settings = PolicySettings::new("x.wasm").with_timeout_ms(0);
        let err = validate(&settings).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("[policy] timeout_ms must be at least 1")
        );
    }

    #[test]
    fn each_thread_gets_back_its_own_warm_instance() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/wasm32-unknown-unknown/release/test_faults.wasm");
        assert!(
            path.is_file(),
            "{} is missing: run `make plugins`",
            path.display()
        );
        let policy = Policy::load(&PolicySettings::new(&path)).unwrap();
        let address = |instance: &Instance| std::ptr::from_ref(instance.store.data()).addr();

        // This thread takes the instance made at load and keeps it.
        let mine = policy.take_idle().expect("the instance made at load");
        let my_address = address(&mine);
        policy.put_back(mine);

        // Another thread finds none of its own and must not take this
        // thread's; the one it makes stays its own.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                assert!(
                    policy.take_idle().is_none(),
                    "took another thread's instance"
                );
                let theirs = policy.instantiate().ok().expect("a fresh instance");
                policy.put_back(theirs);
            });
        });

        let again = policy.take_idle().expect("this thread's instance");
        assert_eq!(address(&again), my_address);
    }

    #[test]
    fn policy_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Policy>();
    }
}
