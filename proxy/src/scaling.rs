//! Scale to zero: the lifecycle of a pool whose model server runs only
//! while it has work (`[pool.scaler]`), the activator that holds requests
//! while the server starts, and the idle timeout that stops it.
//!
//! A scaled pool moves `cold` → `starting` → `ready` → `draining` →
//! `cold`. One supervisor task per pool owns the server (a child process
//! for `kind = "process"`) and makes every transition; the request path
//! only reads the state, counts its requests (held and in flight) and
//! wakes the supervisor when a request finds the pool cold.
//!
//! `[[pool.scaler.schedule]]` windows (`schedule`) keep a pool up at
//! set times of the week, read by an injected clock.
//!
//! With `kind = "webhook"` the supervisor POSTs the replicas it wants to
//! a URL, and with `kind = "kubernetes"` PATCHes a Deployment's scale
//! subresource (both in `webhook`); then it follows readiness by the
//! probe.
//!
//! This module decides when to start and stop and whether a request may
//! wait; it does not send requests (`app` does, to the pool or to its
//! fallback) and does not parse them.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::body::Body;
use crate::config::{ScalerConfig, ScalerKind};
use crate::metrics;
use crate::upstream::Pool;

mod schedule;
mod webhook;

pub use self::schedule::{system_clock, Clock, Schedule, ScheduleError, Window};
use self::webhook::Webhook;

/// Response header set on an answer that the pool's fallback gave in its
/// place: `fallback`.
pub const SERVED_BY_HEADER: &str = "x-switchyard-served-by";

/// Starts whose duration the cold-start estimate is taken from.
const RECENT_STARTS: usize = 20;

/// Time a single readiness probe has to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause before an always-up pool (`min_replicas = 1`) starts again after
/// its server exited or failed to start, so that a server that crashes at
/// once does not spin.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// How often a cold pool with a schedule checks whether a window began.
const SCHEDULE_CHECK: Duration = Duration::from_secs(1);

/// Where a scaled pool is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolState {
    /// No server runs; the next request starts one.
    Cold,
    /// The server was started and does not answer its probe yet.
    Starting,
    /// The server answers; requests go straight to it.
    Ready,
    /// The server is being stopped; new requests are held and start it
    /// again once it is down.
    Draining,
}

impl PoolState {
    const ALL: [PoolState; 4] = [Self::Cold, Self::Starting, Self::Ready, Self::Draining];

    /// The state's name in logs, metrics and `/admin/pools`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Cold => "cold",
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Draining => "draining",
        }
    }

    /// Servers the pool wants running in this state.
    fn desired_replicas(self) -> u32 {
        match self {
            Self::Starting | Self::Ready => 1,
            Self::Cold | Self::Draining => 0,
        }
    }
}

/// Why a request was not let through to a scaled pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DivertReason {
    /// Its deadline ends before the pool is expected to be ready.
    Deadline,
    /// The start it waited for failed or timed out.
    StartFailed,
    /// `max_held` requests are already waiting.
    TooManyHeld,
    /// The pool is being shut down.
    Stopped,
}

impl DivertReason {
    /// The reason in logs and error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Deadline => "its deadline ends before the expected cold start does",
            Self::StartFailed => "the pool's server failed to start",
            Self::TooManyHeld => "scaler.max_held requests already wait for the cold start",
            Self::Stopped => "the pool is shutting down",
        }
    }

    /// Whether the pool's fallback may answer in its place. A request
    /// turned away for too many held is refused outright: the fallback is
    /// meant for the odd request that cannot wait, not for a flood.
    pub fn may_fall_back(self) -> bool {
        matches!(self, Self::Deadline | Self::StartFailed | Self::Stopped)
    }
}

/// A request that may not wait for the pool: why, and when a retry could
/// find it ready.
#[derive(Debug, Clone, Copy)]
pub struct Diverted {
    pub reason: DivertReason,
    pub retry_after: Duration,
}

/// A scaled pool's lifecycle, shared by the request path and the
/// supervisor task. Dropping it stops the supervisor, which stops the
/// server.
#[derive(Debug)]
pub struct Scaler {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    pool: String,
    config: ScalerConfig,
    /// The replicas wanted at each time, read by `clock`.
    schedule: Schedule,
    clock: Clock,
    default_deadline: Option<Duration>,
    inner: Mutex<Inner>,
    /// Bumped on every transition and failed start; held requests wait on
    /// it.
    changed: watch::Sender<u64>,
    /// Wakes the supervisor of a cold pool: a request arrived.
    demand: Notify,
}

#[derive(Debug)]
struct Inner {
    state: PoolState,
    /// When `state` was entered.
    since: Instant,
    /// Requests let through whose response body has not been dropped.
    in_flight: usize,
    /// Requests waiting for the pool to be ready.
    held: usize,
    /// When the last in-flight request ended (or the pool became ready).
    last_done: Instant,
    /// Failed starts so far; a held request that sees it grow gives up.
    failures: u64,
    /// Durations of the last starts, oldest first.
    recent: VecDeque<Duration>,
    last_cold_start: Option<Duration>,
    cold_starts: u64,
    /// The pool no longer takes new work (shutdown, or a reload removed
    /// or replaced it): held requests leave, none are held anew.
    retired: bool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("pool", &self.pool)
            .field("config", &self.config)
            .field("schedule", &self.schedule)
            .finish_non_exhaustive()
    }
}

impl Scaler {
    /// Starts the supervisor of `pool`'s server. With `min_replicas = 1`,
    /// or inside a schedule window, the server starts now; else on the
    /// first request. Must run inside a tokio runtime.
    pub fn start(
        pool: Arc<Pool>,
        config: ScalerConfig,
        default_deadline_ms: Option<u64>,
    ) -> Arc<Self> {
        Self::start_with_clock(pool, config, default_deadline_ms, system_clock())
    }

    /// [`Scaler::start`] with schedules read by `clock`.
    pub fn start_with_clock(
        pool: Arc<Pool>,
        config: ScalerConfig,
        default_deadline_ms: Option<u64>,
        clock: Clock,
    ) -> Arc<Self> {
        let now = Instant::now();

        // Validation parsed the schedule already; a failure here cannot
        // happen, and would leave the pool with min_replicas only.
        let schedule = Schedule::parse(&config.schedule, config.min_replicas).unwrap_or_else(|e| {
            tracing::error!(pool = %pool.name, error = %e, "ignoring the pool's scaler.schedule");
            Schedule::fixed(config.min_replicas)
        });
        let shared = Arc::new(Shared {
            pool: pool.name.clone(),
            config,
            schedule,
            clock,
            default_deadline: default_deadline_ms.map(Duration::from_millis),
            inner: Mutex::new(Inner {
                state: PoolState::Cold,
                since: now,
                in_flight: 0,
                held: 0,
                last_done: now,
                failures: 0,
                recent: VecDeque::new(),
                last_cold_start: None,
                cold_starts: 0,
                retired: false,
            }),
            changed: watch::Sender::new(0),
            demand: Notify::new(),
        });
        publish_state(&shared.pool, PoolState::Cold);
        let (stop, stopping) = watch::channel(false);
        let task = tokio::spawn(supervise(Arc::clone(&shared), pool, stopping));
        Arc::new(Self {
            shared,
            stop,
            supervisor: Mutex::new(Some(task)),
        })
    }

    /// The pool's current state.
    pub fn state(&self) -> PoolState {
        self.shared.lock().state
    }

    /// Lets a request through to the pool, holding it while the pool is
    /// not ready; the returned guard counts it in flight until dropped
    /// (keep it with the response body). `deadline` is the request's own
    /// (`x-switchyard-deadline-ms`), else the pool's
    /// `default_deadline_ms` applies.
    pub async fn admit(&self, deadline: Option<Duration>) -> Result<Busy, Diverted> {
        let shared = &self.shared;
        let arrived = Instant::now();
        let deadline = deadline.or(shared.default_deadline);

        // The state check and the count happen under one lock, so the
        // supervisor never drains a pool a request was just let into.
        let (mut changes, seen_failures) = {
            let mut inner = shared.lock();
            if inner.state == PoolState::Ready {
                inner.in_flight += 1;
                return Ok(Busy::new(Arc::clone(shared)));
            }
            if inner.retired {
                let reason = DivertReason::Stopped;
                let retry_after = Duration::from_secs(1);
                return Err(Diverted {
                    reason,
                    retry_after,
                });
            }
            let expected = inner.expected_ready(&shared.config, arrived);
            if inner.held >= shared.config.max_held {
                let reason = DivertReason::TooManyHeld;
                return Err(Diverted {
                    reason,
                    retry_after: expected,
                });
            }

            // Any request for a cold pool is demand, even one that goes
            // to the fallback: traffic that cannot wait still wants the
            // pool up. One wake-up is stored however many arrive, so a
            // burst starts one server.
            if matches!(inner.state, PoolState::Cold | PoolState::Draining) {
                shared.demand.notify_one();
            }
            if deadline.is_some_and(|d| d < expected) {
                return Err(Diverted {
                    reason: DivertReason::Deadline,
                    retry_after: expected,
                });
            }
            inner.held += 1;
            (shared.changed.subscribe(), inner.failures)
        };
        let _held = Held(Arc::clone(shared));

        // Held until ready, a failed start, or the request's own limit.
        let limit = deadline.unwrap_or(Duration::from_secs(shared.config.ready_timeout_s));
        let until = arrived + limit;
        loop {
            let now_ready = {
                let mut inner = shared.lock();
                if inner.state == PoolState::Ready {
                    inner.in_flight += 1;
                    true
                } else if inner.retired {
                    let reason = DivertReason::Stopped;
                    let retry_after = Duration::from_secs(1);
                    return Err(Diverted {
                        reason,
                        retry_after,
                    });
                } else if inner.failures > seen_failures {
                    let retry_after = inner.expected_ready(&shared.config, Instant::now());
                    let reason = DivertReason::StartFailed;
                    return Err(Diverted {
                        reason,
                        retry_after,
                    });
                } else {
                    false
                }
            };
            if now_ready {
                return Ok(Busy::new(Arc::clone(shared)));
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        let retry_after = Duration::from_secs(1);
                        let reason = DivertReason::Stopped;
                        return Err(Diverted { reason, retry_after });
                    }
                }
                () = tokio::time::sleep_until(until) => {
                    let retry_after = {
                        let inner = shared.lock();
                        inner.expected_ready(&shared.config, Instant::now())
                    };
                    let reason = match deadline {
                        Some(_) => DivertReason::Deadline,
                        None => DivertReason::StartFailed,
                    };
                    return Err(Diverted { reason, retry_after });
                }
            }
        }
    }

    /// Counts a request answered by the fallback in the pool's place.
    pub fn record_fallback(&self) {
        metrics::record_pool_fallback(&self.shared.pool);
    }

    /// The pool's lifecycle for `GET /admin/pools`.
    pub fn report(&self) -> Value {
        let inner = self.shared.lock();
        json!({
            "scaler": self.shared.config.kind.label(),
            "state": inner.state.label(),
            "state_for_s": inner.since.elapsed().as_secs_f64(),
            "desired_replicas": inner.state.desired_replicas(),
            "min_replicas_now": self.shared.min_replicas_now(),
            "in_flight": inner.in_flight,
            "held": inner.held,
            "cold_starts": inner.cold_starts,
            "failed_starts": inner.failures,
            "last_cold_start_s": inner.last_cold_start.map(|d| d.as_secs_f64()),
            "expected_cold_start_s": inner.estimate(&self.shared.config).as_secs_f64(),
        })
    }

    /// Takes no more work: requests held for the pool leave at once (to
    /// the fallback, or with 503) and none are held anew, while requests
    /// already let through finish. For shutdown and for a reload that
    /// removed or replaced the pool.
    pub fn retire(&self) {
        self.shared.lock().retired = true;
        self.shared.changed.send_modify(|n| *n += 1);
    }

    /// Stops the server (SIGTERM, then SIGKILL after `stop_grace_s`) and
    /// waits for the supervisor to end: Switchyard is shutting down.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let task = self
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::warn!(pool = %self.shared.pool, error = %e, "scaler task failed");
            }
        }
    }
}

impl Drop for Scaler {
    fn drop(&mut self) {
        // The supervisor sees the stop and stops the server on its own
        // time; a reload that dropped the pool does not wait for it.
        self.stop.send_replace(true);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The least replicas wanted now: a schedule window's, else
    /// `min_replicas`.
    fn min_replicas_now(&self) -> u32 {
        self.schedule.min_replicas_at((self.clock)())
    }

    /// Why the pool starts without a request, when it wants to be up.
    fn always_up_reason(&self) -> Option<&'static str> {
        if self.min_replicas_now() == 0 {
            None
        } else if self.config.min_replicas > 0 {
            Some("min_replicas = 1")
        } else {
            Some("inside a scaler.schedule window")
        }
    }

    /// Resolves when a schedule window that wants the pool up begins;
    /// never without a schedule.
    async fn window_opened(&self) {
        if !self.schedule.is_timed() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(SCHEDULE_CHECK).await;
            if self.min_replicas_now() > 0 {
                return;
            }
        }
    }

    /// Moves to `state`, logs why, publishes it and wakes held requests.
    fn transition(&self, state: PoolState, reason: &str) {
        let from = self.lock().enter(state);
        self.announce(from, state, reason);
    }

    /// Logs, publishes and wakes held requests for a transition already
    /// made.
    fn announce(&self, from: PoolState, state: PoolState, reason: &str) {
        tracing::info!(
            pool = %self.pool,
            from = from.label(),
            to = state.label(),
            reason,
            "pool state changed"
        );
        publish_state(&self.pool, state);
        self.changed.send_modify(|n| *n += 1);
    }

    /// A start began.
    fn starting(&self, reason: &str) {
        self.lock().cold_starts += 1;
        metrics::record_pool_cold_start(&self.pool);
        self.transition(PoolState::Starting, reason);
    }

    /// The server answered its probe `took` after it was started.
    fn ready(&self, took: Duration) {
        {
            let mut inner = self.lock();
            inner.last_cold_start = Some(took);
            inner.recent.push_back(took);
            if inner.recent.len() > RECENT_STARTS {
                inner.recent.pop_front();
            }
        }
        metrics::record_pool_cold_start_duration(&self.pool, took);
        let reason = format!("ready after {:.3} s", took.as_secs_f64());
        self.transition(PoolState::Ready, &reason);
    }

    /// The start failed: back to cold, and held requests give up.
    fn start_failed(&self, reason: &str) {
        self.lock().failures += 1;
        self.transition(PoolState::Cold, reason);
    }

    /// Moves a ready pool to draining when it has been idle long enough:
    /// nothing in flight or held, no answer for `idle_timeout_s`, up for
    /// `min_up_s`. Returns whether it did.
    fn drain_if_idle(&self) -> bool {
        if self.min_replicas_now() > 0 {
            return false;
        }
        let idle = Duration::from_secs(self.config.idle_timeout_s);
        let min_up = Duration::from_secs(self.config.min_up_s);
        let idle_for = {
            let mut inner = self.lock();
            let now = Instant::now();
            let idle_for = now.duration_since(inner.last_done);
            let quiet = inner.in_flight == 0 && inner.held == 0;
            let up_long_enough = now.duration_since(inner.since) >= min_up;
            if !(inner.state == PoolState::Ready && quiet && up_long_enough && idle_for >= idle) {
                return false;
            }
            // Set under the lock that `admit` takes: no request gets in
            // from here on.
            inner.enter(PoolState::Draining);
            idle_for
        };
        let reason = format!("idle for {} s", idle_for.as_secs());
        self.announce(PoolState::Ready, PoolState::Draining, &reason);
        true
    }
}

impl Inner {
    /// Sets the state; returns the one it replaced.
    fn enter(&mut self, state: PoolState) -> PoolState {
        let from = self.state;
        self.state = state;
        self.since = Instant::now();
        if state == PoolState::Ready {
            self.last_done = self.since;
        }
        from
    }

    /// The expected cold start: the 90th percentile of recent starts,
    /// else `cold_start_estimate_s`, else `ready_timeout_s`.
    fn estimate(&self, config: &ScalerConfig) -> Duration {
        if self.recent.is_empty() {
            let seconds = config
                .cold_start_estimate_s
                .unwrap_or(config.ready_timeout_s);
            return Duration::from_secs(seconds);
        }
        let mut sorted: Vec<Duration> = self.recent.iter().copied().collect();
        sorted.sort();
        let rank = (sorted.len() * 9).div_ceil(10).saturating_sub(1);
        sorted.get(rank).copied().unwrap_or_default()
    }

    /// Time from `now` until the pool is expected to be ready.
    fn expected_ready(&self, config: &ScalerConfig, now: Instant) -> Duration {
        let estimate = self.estimate(config);
        match self.state {
            PoolState::Ready => Duration::ZERO,
            PoolState::Starting => estimate.saturating_sub(now.duration_since(self.since)),
            PoolState::Cold | PoolState::Draining => estimate,
        }
    }
}

/// Counts a held request until it is let through or gives up.
struct Held(Arc<Shared>);

impl Drop for Held {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.held = inner.held.saturating_sub(1);
    }
}

/// A request let through to a scaled pool; counted in flight until
/// dropped, and the idle timeout counts from the last drop.
#[derive(Debug)]
pub struct Busy(Arc<Shared>);

impl Busy {
    fn new(shared: Arc<Shared>) -> Self {
        Self(shared)
    }

    /// Wraps a response body so that the request stays in flight until
    /// the body ends or the client drops it: a long stream keeps the pool
    /// up.
    pub fn hold(self, body: Body) -> Body {
        crate::body::with_guard(body, self)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.in_flight = inner.in_flight.saturating_sub(1);
        inner.last_done = Instant::now();
    }
}

/// Publishes the pool's state (1 for the current one, 0 for the others)
/// and the replicas it wants.
fn publish_state(pool: &str, state: PoolState) {
    for each in PoolState::ALL {
        metrics::record_pool_state(pool, each.label(), each == state);
    }
    metrics::record_pool_desired_replicas(pool, state.desired_replicas());
}

/// Whether the supervisor goes on or was told to stop.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// Resolves when the scaler is told to stop or is dropped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: the scaler was dropped.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The supervisor: waits for demand while cold, then runs one life of the
/// server, until told to stop.
async fn supervise(shared: Arc<Shared>, pool: Arc<Pool>, mut stop: watch::Receiver<bool>) {
    // The webhook client is built once; a broken one fails every start
    // with the reason in the log.
    let webhook = match shared.config.kind {
        ScalerKind::Webhook | ScalerKind::Kubernetes => Webhook::new(&shared.pool, &shared.config),
        ScalerKind::Process | ScalerKind::None => Err("not a webhook scaler".to_string()),
    };
    loop {
        // Cold: a pool that wants to be up starts at once, the others
        // on demand or when a schedule window begins.
        let reason = match shared.always_up_reason() {
            Some(reason) => reason,
            None => tokio::select! {
                () = shared.demand.notified() => "request for a cold pool",
                () = shared.window_opened() => "a scaler.schedule window began",
                () = stopped(&mut stop) => return,
            },
        };
        let flow = match shared.config.kind {
            ScalerKind::Process => run_process(&shared, &pool, &mut stop, reason).await,
            ScalerKind::None => follow(&shared, &pool, &mut stop, reason).await,
            ScalerKind::Webhook | ScalerKind::Kubernetes => {
                run_webhook(&shared, &pool, webhook.as_ref(), &mut stop, reason).await
            }
        };
        if flow == Flow::Stop {
            return;
        }
        if shared.always_up_reason().is_some() {
            tokio::select! {
                () = tokio::time::sleep(RESTART_BACKOFF) => {}
                () = stopped(&mut stop) => return,
            }
        }
    }
}

/// How waiting for readiness ended.
enum Startup {
    Ready,
    TimedOut,
    Exited(std::io::Result<ExitStatus>),
    Stopped,
}

/// One life of a `process` server: start it, wait for its probe, serve
/// until it exits, idles out, or the scaler stops.
async fn run_process(
    shared: &Shared,
    pool: &Pool,
    stop: &mut watch::Receiver<bool>,
    reason: &str,
) -> Flow {
    shared.starting(reason);
    let started = Instant::now();
    let mut child = match spawn(shared) {
        Ok(child) => child,
        Err(message) => {
            tracing::error!(pool = %shared.pool, error = %message, "cannot start the pool's server");
            shared.start_failed("the command could not be started");
            return Flow::Continue;
        }
    };

    // Starting: probe until ready, while watching the child and the clock.
    let ready_timeout = Duration::from_secs(shared.config.ready_timeout_s);
    let startup = tokio::select! {
        ready = tokio::time::timeout(ready_timeout, wait_ready(pool, &shared.config)) => {
            match ready {
                Ok(()) => Startup::Ready,
                Err(_) => Startup::TimedOut,
            }
        }
        status = child.wait() => Startup::Exited(status),
        () = stopped(stop) => Startup::Stopped,
    };
    match startup {
        Startup::Ready => shared.ready(started.elapsed()),
        Startup::TimedOut => {
            tracing::error!(
                pool = %shared.pool,
                ready_timeout_s = shared.config.ready_timeout_s,
                probe_path = %shared.config.probe_path,
                "the pool's server did not answer its probe within \
                 scaler.ready_timeout_s; stopping it"
            );
            shared.transition(PoolState::Draining, "start timed out");
            stop_child(shared, &mut child).await;
            shared.start_failed("start timed out");
            return Flow::Continue;
        }
        Startup::Exited(status) => {
            log_exit(shared, &status, "while starting");
            shared.start_failed("server exited while starting");
            return Flow::Continue;
        }
        Startup::Stopped => {
            shared.transition(PoolState::Draining, "scaler stopped");
            stop_child(shared, &mut child).await;
            shared.transition(PoolState::Cold, "scaler stopped");
            return Flow::Stop;
        }
    }

    // Ready: serve until the child exits, the pool idles out, or stop.
    let check = idle_check_interval(&shared.config);
    loop {
        tokio::select! {
            // Limitation: requests in flight when the server dies fail,
            // and under load they may open the pool's circuit breaker,
            // which then refuses for circuit.open_ms after the restart.
            status = child.wait() => {
                log_exit(shared, &status, "while ready");
                shared.transition(PoolState::Cold, "server exited");
                return Flow::Continue;
            }
            () = tokio::time::sleep(check) => {
                if shared.drain_if_idle() {
                    stop_child(shared, &mut child).await;
                    shared.transition(PoolState::Cold, "server stopped after idling");
                    return Flow::Continue;
                }
            }
            () = stopped(stop) => {
                shared.transition(PoolState::Draining, "scaler stopped");
                stop_child(shared, &mut child).await;
                shared.transition(PoolState::Cold, "scaler stopped");
                return Flow::Stop;
            }
        }
    }
}

/// One life of a server something else runs (`kind = "none"`): wait for
/// its probe, then call it cold again when the probe fails or the pool
/// idles out. Idling out stops nothing; it sets desired replicas to 0,
/// which an autoscaler reading `switchyard_pool_desired_replicas` (KEDA)
/// acts on.
// Limitation: with kind = "none" Switchyard cannot tell whether the server
// was really scaled down; while it still runs, the next request finds the
// pool cold and is held for one passing probe.
async fn follow(
    shared: &Shared,
    pool: &Pool,
    stop: &mut watch::Receiver<bool>,
    reason: &str,
) -> Flow {
    shared.starting(reason);
    let started = Instant::now();
    let ready_timeout = Duration::from_secs(shared.config.ready_timeout_s);
    tokio::select! {
        ready = tokio::time::timeout(ready_timeout, wait_ready(pool, &shared.config)) => {
            if ready.is_err() {
                shared.start_failed("server did not become ready");
                return Flow::Continue;
            }
        }
        () = stopped(stop) => return Flow::Stop,
    }
    shared.ready(started.elapsed());

    match watch_ready(shared, pool, stop).await {
        Watched::ProbeFailed => shared.transition(PoolState::Cold, "readiness probe failed"),
        Watched::Idle => shared.transition(PoolState::Cold, "idled out; desired replicas 0"),
        Watched::Stopped => return Flow::Stop,
    }
    Flow::Continue
}

/// How a ready pool that Switchyard does not run stopped being ready.
enum Watched {
    /// Its probe failed.
    ProbeFailed,
    /// It idled out and is now draining.
    Idle,
    /// The scaler was told to stop.
    Stopped,
}

/// Watches a ready `none` or `webhook` pool: probes it every
/// `probe_interval_ms` and checks for idleness, each on its own clock.
async fn watch_ready(shared: &Shared, pool: &Pool, stop: &mut watch::Receiver<bool>) -> Watched {
    use tokio::time::MissedTickBehavior;

    let probe_every = Duration::from_millis(shared.config.probe_interval_ms);
    let mut probes = tokio::time::interval(probe_every);
    let mut checks = tokio::time::interval(idle_check_interval(&shared.config));
    probes.set_missed_tick_behavior(MissedTickBehavior::Delay);
    checks.set_missed_tick_behavior(MissedTickBehavior::Delay);

    // An interval ticks at once; the pool just passed its probe.
    probes.reset();
    checks.reset();
    loop {
        tokio::select! {
            _ = probes.tick() => {
                if !pool.probe(&shared.config.probe_path, PROBE_TIMEOUT).await {
                    return Watched::ProbeFailed;
                }
            }
            _ = checks.tick() => {
                if shared.drain_if_idle() {
                    return Watched::Idle;
                }
            }
            () = stopped(stop) => return Watched::Stopped,
        }
    }
}

/// One life of a `webhook` or `kubernetes` pool: ask for replicas 1, wait for the probe,
/// serve until the probe fails or the pool idles out (then ask for
/// replicas 0), or the scaler stops.
// Limitation: when Switchyard stops or a reload removes the pool, no
// replicas 0 is sent: a restarting sidecar should not take the model
// server down with it, so a pool left up is scaled down by whatever
// runs it, not by Switchyard.
async fn run_webhook(
    shared: &Shared,
    pool: &Pool,
    webhook: Result<&Webhook, &String>,
    stop: &mut watch::Receiver<bool>,
    reason: &str,
) -> Flow {
    shared.starting(reason);
    let started = Instant::now();
    let webhook = match webhook {
        Ok(webhook) => webhook,
        Err(message) => {
            tracing::error!(pool = %shared.pool, error = %message, "cannot set up the scaler's calls");
            shared.start_failed("the scaler's calls could not be set up");
            return Flow::Continue;
        }
    };

    // Starting: the call and the wait for readiness share ready_timeout_s.
    let ready_timeout = Duration::from_secs(shared.config.ready_timeout_s);
    let up = async {
        webhook.scale(1, reason).await?;
        wait_ready(pool, &shared.config).await;
        Ok::<(), String>(())
    };
    tokio::select! {
        up = tokio::time::timeout(ready_timeout, up) => match up {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                shared.start_failed("the scale call failed");
                return Flow::Continue;
            }
            Err(_) => {
                tracing::error!(
                    pool = %shared.pool,
                    ready_timeout_s = shared.config.ready_timeout_s,
                    probe_path = %shared.config.probe_path,
                    "the pool did not answer its probe within scaler.ready_timeout_s \
                     after the webhook call"
                );
                shared.start_failed("server did not become ready");
                return Flow::Continue;
            }
        },
        () = stopped(stop) => return Flow::Stop,
    }
    shared.ready(started.elapsed());

    match watch_ready(shared, pool, stop).await {
        Watched::ProbeFailed => shared.transition(PoolState::Cold, "readiness probe failed"),
        Watched::Idle => {
            // Cold even when the call failed: the pool cannot tell, and
            // the next request asks for replicas 1.
            let _ = webhook.scale(0, "idle for scaler.idle_timeout_s").await;
            shared.transition(PoolState::Cold, "scaled down after idling");
        }
        Watched::Stopped => return Flow::Stop,
    }
    Flow::Continue
}

/// Probes the pool until it answers: every `probe_interval_ms` at first,
/// the gap growing by half after each failure, up to four times it.
async fn wait_ready(pool: &Pool, config: &ScalerConfig) {
    let first = Duration::from_millis(config.probe_interval_ms);
    let cap = first * 4;
    let mut gap = first;
    loop {
        if pool.probe(&config.probe_path, PROBE_TIMEOUT).await {
            return;
        }
        tokio::time::sleep(gap).await;
        gap = (gap + gap / 2).min(cap);
    }
}

/// How often a ready pool checks whether it idled out: a quarter of the
/// idle timeout, between 50 ms and 1 s.
fn idle_check_interval(config: &ScalerConfig) -> Duration {
    let quarter = Duration::from_secs(config.idle_timeout_s) / 4;
    quarter.clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Starts the command, its output going to the log line by line.
fn spawn(shared: &Shared) -> Result<Child, String> {
    let config = &shared.config;
    let Some((program, args)) = config.command.split_first() else {
        return Err("pool.scaler.command is empty".to_string());
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(&config.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that stopping it reaches what a
        // wrapper script started too.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = &config.cwd {
        command.current_dir(cwd);
    }
    let mut child = command.spawn().map_err(|e| {
        format!("pool.scaler.command: cannot run {program:?}: {e} (is it installed and on PATH?)")
    })?;
    tracing::info!(
        pool = %shared.pool,
        pid = child.id(),
        command = %config.command.join(" "),
        "started the pool's server"
    );
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(forward_lines(shared.pool.clone(), "stdout", stdout));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(forward_lines(shared.pool.clone(), "stderr", stderr));
    }
    Ok(child)
}

/// Logs each line the server writes, naming the pool, until it closes
/// the stream.
async fn forward_lines(pool: String, stream: &'static str, output: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(output).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(pool = %pool, stream, line = %line, "pool server output");
    }
}

/// Stops the server: SIGTERM, then SIGKILL after `stop_grace_s`.
async fn stop_child(shared: &Shared, child: &mut Child) {
    let grace = Duration::from_secs(shared.config.stop_grace_s);
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let signal = rustix::process::Signal::TERM;
        if let Err(e) = rustix::process::kill_process_group(pid, signal) {
            tracing::warn!(pool = %shared.pool, error = %e, "cannot send SIGTERM to the pool's server");
        }
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => log_exit(shared, &status, "after SIGTERM"),
        Err(_) => {
            tracing::warn!(
                pool = %shared.pool,
                stop_grace_s = shared.config.stop_grace_s,
                "the pool's server ignored SIGTERM for scaler.stop_grace_s; killing it"
            );
            if let Some(pid) = pid {
                // Whatever the server started; the server itself below.
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            if let Err(e) = child.kill().await {
                tracing::error!(pool = %shared.pool, error = %e, "cannot kill the pool's server");
            }
        }
    }
}

fn log_exit(shared: &Shared, status: &std::io::Result<ExitStatus>, when: &'static str) {
    match status {
        Ok(status) => {
            tracing::info!(pool = %shared.pool, status = %status, when, "the pool's server exited")
        }
        Err(e) => {
            tracing::warn!(pool = %shared.pool, error = %e, when, "cannot wait for the pool's server")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ScalerConfig {
        let toml = "command = [\"true\"]\nready_timeout_s = 30\n";
        toml::from_str(toml).unwrap()
    }

    fn inner(recent: &[u64]) -> Inner {
        let now = Instant::now();
        Inner {
            state: PoolState::Cold,
            since: now,
            in_flight: 0,
            held: 0,
            last_done: now,
            failures: 0,
            recent: recent.iter().map(|s| Duration::from_secs(*s)).collect(),
            last_cold_start: None,
            cold_starts: 0,
            retired: false,
        }
    }

    #[test]
    fn estimate_is_ready_timeout_before_any_start() {
        assert_eq!(inner(&[]).estimate(&config()), Duration::from_secs(30));
        let mut with_estimate = config();
        with_estimate.cold_start_estimate_s = Some(4);
        assert_eq!(inner(&[]).estimate(&with_estimate), Duration::from_secs(4));
    }

    #[test]
    fn estimate_is_the_90th_percentile_of_recent_starts() {
        let recent: Vec<u64> = (1..=10).collect();
        assert_eq!(inner(&recent).estimate(&config()), Duration::from_secs(9));
        assert_eq!(inner(&[7]).estimate(&config()), Duration::from_secs(7));
    }

    /// A loopback server that answers 200 to everything: the probe
    /// target of a pool whose "server" is `sleep`.
    async fn always_ready() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|_req| async {
                    let body = http_body_util::Full::new(bytes::Bytes::from_static(b"{}"));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        addr
    }

    /// Polls until the scaler is in `state`, for up to 10 s.
    async fn wait_for(scaler: &Scaler, state: PoolState) {
        let end = Instant::now() + Duration::from_secs(10);
        while scaler.state() != state {
            assert!(Instant::now() < end, "not {state:?}: {}", scaler.report());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_schedule_window_keeps_the_pool_up_past_its_idle_timeout() {
        let addr = always_ready().await;
        let text = format!(
            "[[pool]]\nname = \"big\"\nendpoints = [\"http://{addr}\"]\n\
             [pool.scaler]\ncommand = [\"sleep\", \"600\"]\n\
             idle_timeout_s = 1\nmin_up_s = 0\nprobe_interval_ms = 50\nstop_grace_s = 2\n\
             [[pool.scaler.schedule]]\ndays = [\"mon\"]\nstart = \"09:00\"\n\
             end = \"18:00\"\ntimezone = \"Europe/Berlin\"\n"
        );
        let config = crate::config::Config::parse(&text).unwrap();
        let pool_config = &config.pool[0];
        let pool = Arc::new(Pool::new(pool_config).unwrap());
        let now = Arc::new(Mutex::new("2026-01-11T12:00:00Z".parse().unwrap()));
        let read = Arc::clone(&now);
        let clock: Clock = Arc::new(move || *read.lock().unwrap());
        let scaler_config = pool_config.scaler.clone().unwrap();
        let scaler = Scaler::start_with_clock(pool, scaler_config, None, clock);
        let set = |at: &str| *now.lock().unwrap() = at.parse().unwrap();

        // Sunday: no window, no request, the pool stays cold.
        tokio::time::sleep(SCHEDULE_CHECK + Duration::from_millis(500)).await;
        assert_eq!(scaler.state(), PoolState::Cold);

        // Monday 09:30 in Berlin (08:30 UTC in winter): it starts, and
        // stays up well past its 1 s idle timeout.
        set("2026-01-12T08:30:00Z");
        wait_for(&scaler, PoolState::Ready).await;
        assert_eq!(scaler.report()["min_replicas_now"], 1);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(scaler.state(), PoolState::Ready);

        // 18:30 in Berlin: the window closed, the idle pool is let go.
        set("2026-01-12T17:30:00Z");
        wait_for(&scaler, PoolState::Cold).await;
        assert_eq!(scaler.report()["cold_starts"], 1);
        assert_eq!(scaler.report()["min_replicas_now"], 0);
        scaler.shutdown().await;
    }

    #[test]
    fn all_but_too_many_held_may_fall_back() {
        assert!(DivertReason::Deadline.may_fall_back());
        assert!(DivertReason::StartFailed.may_fall_back());
        assert!(DivertReason::Stopped.may_fall_back());
        assert!(!DivertReason::TooManyHeld.may_fall_back());
    }
}
