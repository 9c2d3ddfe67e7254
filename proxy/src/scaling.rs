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

use std::collections::{BTreeMap, VecDeque};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::body::Body;
use crate::config::{ProbeKind, ScalerConfig, ScalerKind};
use crate::metrics;
use crate::upstream::Pool;

mod kubernetes;
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

/// How often a ready pool checks whether it wants more or fewer
/// replicas.
const SCALE_CHECK: Duration = Duration::from_millis(200);

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
    /// It waited until its deadline for one of the `max_in_flight`
    /// places of a ready pool.
    Saturated,
    /// The pool is being shut down.
    Stopped,
}

impl DivertReason {
    /// The reason in logs and error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Deadline => "its deadline ends before the expected cold start does",
            Self::StartFailed => "the pool's server failed to start",
            Self::TooManyHeld => "scaler.max_held requests already wait for the pool",
            Self::Saturated => {
                "the pool's scaler.max_in_flight places stayed taken for as long as it could wait"
            }
            Self::Stopped => "the pool is shutting down",
        }
    }

    /// Whether the pool's fallback may answer in its place. A request
    /// turned away for too many held is refused outright: the fallback is
    /// meant for the odd request that cannot wait, not for a flood.
    pub fn may_fall_back(self) -> bool {
        !matches!(self, Self::TooManyHeld)
    }
}

/// A request that may not wait for the pool: why, and when a retry could
/// find it ready.
#[derive(Debug, Clone, Copy)]
pub struct Diverted {
    pub reason: DivertReason,
    pub retry_after: Duration,
}

impl Diverted {
    /// The pool is shutting down or was removed.
    fn stopped() -> Self {
        Self {
            reason: DivertReason::Stopped,
            retry_after: Duration::from_secs(1),
        }
    }
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
    /// Requests waiting for the pool to be ready or for a place among
    /// its `max_in_flight`, earliest deadline first (ties by arrival).
    waiting: BTreeMap<(Instant, u64), Waiter>,
    /// Numbers the waiting requests, so that equal deadlines keep their
    /// order of arrival.
    next_ticket: u64,
    /// Replicas asked for while starting or ready.
    replicas: u32,
    /// Replicas counted for the in-flight limit: those asked for, less a
    /// replica added within the expected cold start (it cannot serve
    /// yet).
    serving: u32,
    /// When `replicas` last changed.
    last_scaled: Instant,
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

/// A request held for the pool: dispatch sends it its place, a failed
/// start or a retired pool the reason it must leave.
#[derive(Debug)]
struct Waiter {
    arrived: Instant,
    grant: oneshot::Sender<Result<Busy, DivertReason>>,
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
            inner: Mutex::new(Inner::new(now)),
            demand: Notify::new(),
        });
        publish_state(&shared.pool, PoolState::Cold, 0);
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
    /// not ready or its `max_in_flight` places are taken; the returned
    /// guard counts it in flight until dropped (keep it with the response
    /// body). Held requests are let through earliest deadline first.
    /// `deadline` is the request's own (`x-switchyard-deadline-ms`), else
    /// the pool's `default_deadline_ms` applies.
    pub async fn admit(&self, deadline: Option<Duration>) -> Result<Busy, Diverted> {
        let shared = &self.shared;
        let config = &shared.config;
        let arrived = Instant::now();
        let deadline = deadline.or(shared.default_deadline);
        let limit = deadline.unwrap_or(Duration::from_secs(config.ready_timeout_s));
        let until = arrived + limit;

        // The state check and the count happen under one lock, so the
        // supervisor never drains a pool a request was just let into.
        let (mut grant, _held, refused) = {
            let mut inner = shared.lock();
            let free = inner.in_flight < inner.limit(config);
            if inner.state == PoolState::Ready && inner.waiting.is_empty() && free {
                inner.in_flight += 1;
                return Ok(Busy::new(Arc::clone(shared)));
            }
            if inner.retired {
                return Err(Diverted::stopped());
            }
            let expected = inner.expected_ready(config, arrived);
            let retry_after = inner.retry_after(config, arrived);
            if inner.waiting.len() >= config.max_held {
                metrics::record_pool_held_refused(&shared.pool);
                let reason = DivertReason::TooManyHeld;
                return Err(Diverted {
                    reason,
                    retry_after,
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
                    retry_after,
                });
            }

            // Held in deadline order; a request without one waits up to
            // ready_timeout_s and so goes after those that cannot.
            let (sender, receiver) = oneshot::channel();
            let key = (until, inner.next_ticket);
            inner.next_ticket += 1;
            let waiter = Waiter {
                arrived,
                grant: sender,
            };
            inner.waiting.insert(key, waiter);
            let held = Held {
                shared: Arc::clone(shared),
                key,
            };
            let refused = dispatch(shared, &mut inner);
            (receiver, held, refused)
        };
        drop(refused);

        // Held until dispatched, sent away (a failed start, a retired
        // pool), or the request's own limit. A place sent as the request
        // gives up is not lost: it is dropped with the receiver, which
        // frees it.
        let reason = tokio::select! {
            biased;
            granted = &mut grant => match granted {
                Ok(Ok(busy)) => return Ok(busy),
                Ok(Err(reason)) => reason,
                Err(_) => DivertReason::Stopped,
            },
            () = tokio::time::sleep_until(until) => {
                match (deadline, self.state()) {
                    (Some(_), _) => DivertReason::Deadline,
                    (None, PoolState::Ready) => DivertReason::Saturated,
                    (None, _) => DivertReason::StartFailed,
                }
            }
        };
        let retry_after = match reason {
            DivertReason::Stopped => Duration::from_secs(1),
            _ => shared.lock().retry_after(config, Instant::now()),
        };
        Err(Diverted {
            reason,
            retry_after,
        })
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
            "desired_replicas": inner.desired_replicas(),
            "min_replicas_now": self.shared.min_replicas_now(),
            "max_replicas": self.shared.config.max_replicas,
            "in_flight": inner.in_flight,
            "max_in_flight_now": inner.limit(&self.shared.config),
            "held": inner.waiting.len(),
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
        let waiting = {
            let mut inner = self.shared.lock();
            inner.retired = true;
            std::mem::take(&mut inner.waiting)
        };
        send_away(waiting, DivertReason::Stopped);
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
            Some("scaler.min_replicas > 0")
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
        let desired = self.lock().desired_replicas();
        publish_state(&self.pool, state, desired);
    }

    /// A start began, asking for the least replicas wanted now (at
    /// least one), or as many as before when requests are still in
    /// flight or held (the pool went cold on a failed probe): work in
    /// flight is never scaled down. Returns them.
    fn starting(&self, reason: &str) -> u32 {
        let floor = self.min_replicas_now().max(1);
        let replicas = {
            let mut inner = self.lock();
            let busy = inner.in_flight > 0 || !inner.waiting.is_empty();
            let replicas = if busy {
                floor.max(inner.replicas)
            } else {
                floor
            };
            inner.cold_starts += 1;
            inner.replicas = replicas;
            inner.serving = replicas;
            inner.last_scaled = Instant::now();
            replicas
        };
        metrics::record_pool_cold_start(&self.pool);
        self.transition(PoolState::Starting, reason);
        // Every request that found the pool cold woke the supervisor, and
        // `notify_one` keeps one wake-up when it is not waiting. They did
        // so under the lock, before this transition: this start answers
        // them all, so a kept wake-up is spent here rather than starting
        // the pool again, with no request, once it idles out.
        let _ = std::pin::pin!(self.demand.notified()).enable();
        replicas
    }

    /// The server answered its probe `took` after it was started: held
    /// requests are let through, earliest deadline first, up to the
    /// in-flight limit.
    fn ready(self: &Arc<Self>, took: Duration) {
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
        self.dispatch();
    }

    /// Lets held requests through while the ready pool has places.
    fn dispatch(self: &Arc<Self>) {
        let refused = dispatch(self, &mut self.lock());
        drop(refused);
    }

    /// The start failed: back to cold, and held requests give up.
    fn start_failed(&self, reason: &str) {
        let waiting = {
            let mut inner = self.lock();
            inner.failures += 1;
            std::mem::take(&mut inner.waiting)
        };
        metrics::record_pool_failed_start(&self.pool);
        self.transition(PoolState::Cold, reason);
        send_away(waiting, DivertReason::StartFailed);
    }

    /// Whether requests wait for the pool: a cold pool with some starts
    /// again without waiting for another request.
    fn has_waiting(&self) -> bool {
        !self.lock().waiting.is_empty()
    }

    /// Steps the replicas of a ready pool one up or down when its load
    /// asks for it; returns the new number and why, when it changed.
    /// One more when the in-flight requests per replica reach
    /// `target_in_flight` or the longest-held request waited past
    /// `target_queue_wait_ms`, no sooner than the expected cold start
    /// after the last step; one fewer, never below the least wanted
    /// now, only with nothing in flight or held for `scale_down_after_s`
    /// and as long after the last change.
    fn rescale(self: &Arc<Self>) -> Option<(u32, &'static str)> {
        let config = &self.config;
        let floor = self.min_replicas_now().max(1);
        let mut inner = self.lock();
        if inner.state != PoolState::Ready {
            return None;
        }
        let now = Instant::now();
        let since_change = now.duration_since(inner.last_scaled);
        let step_up_after = inner
            .estimate(config)
            .max(Duration::from_millis(config.probe_interval_ms));

        // A replica added one cold start ago can take its share.
        // Limitation: that is a guess; the replicas actually ready are
        // not watched, so a slow one gets its share early (the rest
        // carry more for a while) and a fast one late.
        if inner.serving < inner.replicas && since_change >= step_up_after {
            inner.serving = inner.replicas;
            let refused = dispatch(self, &mut inner);
            drop(inner);
            drop(refused);
            inner = self.lock();
        }

        let replicas = inner.replicas;
        let target = config.target_in_flight.unwrap_or(config.max_in_flight);
        let busy = inner.in_flight >= target.saturating_mul(replicas as usize);
        let longest_wait = inner
            .waiting
            .values()
            .map(|w| now.duration_since(w.arrived))
            .max()
            .unwrap_or_default();
        let queued = longest_wait > Duration::from_millis(config.target_queue_wait_ms);
        let room = replicas < config.max_replicas;
        if (busy || queued) && room && since_change >= step_up_after {
            inner.replicas += 1;
            inner.last_scaled = now;
            let why = if busy {
                "in-flight requests reached scaler.target_in_flight per replica"
            } else {
                "a held request waited past scaler.target_queue_wait_ms"
            };
            return Some((inner.replicas, why));
        }

        let hold = Duration::from_secs(config.scale_down_after_s);
        let quiet = inner.in_flight == 0 && inner.waiting.is_empty();
        let quiet_for = now.duration_since(inner.last_done);
        if replicas > floor && quiet && quiet_for >= hold && since_change >= hold {
            inner.replicas -= 1;
            inner.serving = inner.replicas;
            inner.last_scaled = now;
            return Some((
                inner.replicas,
                "nothing in flight for scaler.scale_down_after_s",
            ));
        }
        None
    }

    /// Undoes a step to `replicas` that the scaler could not make: the
    /// pool keeps the replicas it had.
    fn rescale_failed(&self, replicas: u32, before: u32) {
        let mut inner = self.lock();
        if inner.replicas == replicas {
            inner.replicas = before;
            inner.serving = inner.serving.min(before);
        }
        metrics::record_pool_desired_replicas(&self.pool, inner.desired_replicas());
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
            let quiet = inner.in_flight == 0 && inner.waiting.is_empty();
            let up_long_enough = now.duration_since(inner.since) >= min_up;
            if !(inner.state == PoolState::Ready && quiet && up_long_enough && idle_for >= idle) {
                return false;
            }
            // Set under the lock that `admit` takes: no request gets in
            // from here on. The next start asks for the least replicas.
            inner.enter(PoolState::Draining);
            inner.replicas = 0;
            idle_for
        };
        let reason = format!("idle for {} s", idle_for.as_secs());
        self.announce(PoolState::Ready, PoolState::Draining, &reason);
        true
    }
}

impl Inner {
    /// A cold pool that has never started, as of `now`.
    fn new(now: Instant) -> Inner {
        Inner {
            state: PoolState::Cold,
            since: now,
            in_flight: 0,
            waiting: BTreeMap::new(),
            next_ticket: 0,
            replicas: 0,
            serving: 0,
            last_scaled: now,
            last_done: now,
            failures: 0,
            recent: VecDeque::new(),
            last_cold_start: None,
            cold_starts: 0,
            retired: false,
        }
    }

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

    /// Servers the pool wants running.
    fn desired_replicas(&self) -> u32 {
        match self.state {
            PoolState::Starting | PoolState::Ready => self.replicas,
            PoolState::Cold | PoolState::Draining => 0,
        }
    }

    /// Most requests in flight at once: `max_in_flight` per serving
    /// replica.
    fn limit(&self, config: &ScalerConfig) -> usize {
        let serving = self.serving.max(1) as usize;
        config.max_in_flight.saturating_mul(serving)
    }

    /// When a refused request may come back: the expected ready time,
    /// or before any start was measured and without
    /// `cold_start_estimate_s`, the longest gap between two probes
    /// (the pool may pass its next one), at least a second.
    fn retry_after(&self, config: &ScalerConfig, now: Instant) -> Duration {
        let measured = !self.recent.is_empty() || config.cold_start_estimate_s.is_some();
        if measured {
            return self.expected_ready(config, now);
        }
        let longest_gap = Duration::from_millis(config.probe_interval_ms) * 4;
        longest_gap.max(Duration::from_secs(1))
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

/// Lets held requests through, earliest deadline first, while the pool
/// is ready and below its in-flight limit. Returns the places whose
/// request had left already, to drop once the lock is released (each
/// drop dispatches again).
#[must_use = "the refused places must be dropped after the lock"]
fn dispatch(shared: &Arc<Shared>, inner: &mut Inner) -> Vec<Busy> {
    let mut refused = Vec::new();
    let limit = inner.limit(&shared.config);
    while inner.state == PoolState::Ready && inner.in_flight < limit {
        let Some((_, waiter)) = inner.waiting.pop_first() else {
            break;
        };
        inner.in_flight += 1;
        if let Err(Ok(busy)) = waiter.grant.send(Ok(Busy::new(Arc::clone(shared)))) {
            refused.push(busy);
        }
    }
    refused
}

/// Tells held requests to leave, for `reason`.
fn send_away(waiting: BTreeMap<(Instant, u64), Waiter>, reason: DivertReason) {
    for waiter in waiting.into_values() {
        // One that left already needs no telling.
        let _ = waiter.grant.send(Err(reason));
    }
}

/// A held request's place in the queue, given up when it leaves before
/// it was dispatched.
struct Held {
    shared: Arc<Shared>,
    key: (Instant, u64),
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared.lock().waiting.remove(&self.key);
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
        // The freed place goes to the held request with the earliest
        // deadline.
        let refused = {
            let mut inner = self.0.lock();
            inner.in_flight = inner.in_flight.saturating_sub(1);
            inner.last_done = Instant::now();
            dispatch(&self.0, &mut inner)
        };
        drop(refused);
    }
}

/// Publishes the pool's state (1 for the current one, 0 for the others)
/// and the replicas it wants.
fn publish_state(pool: &str, state: PoolState, desired: u32) {
    for each in PoolState::ALL {
        metrics::record_pool_state(pool, each.label(), each == state);
    }
    metrics::record_pool_desired_replicas(pool, desired);
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
            None if shared.has_waiting() => "requests held for the pool",
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
    shared: &Arc<Shared>,
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
    shared: &Arc<Shared>,
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

    match watch_ready(shared, pool, None, stop).await {
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

/// Watches a ready `none`, `webhook` or `kubernetes` pool: probes it
/// every `probe_interval_ms`, checks for idleness, and steps its
/// replicas with its load (through `webhook` when it has one), each on
/// its own clock.
async fn watch_ready(
    shared: &Arc<Shared>,
    pool: &Pool,
    webhook: Option<&Webhook>,
    stop: &mut watch::Receiver<bool>,
) -> Watched {
    use tokio::time::MissedTickBehavior;

    let probe_every = Duration::from_millis(shared.config.probe_interval_ms);
    let mut probes = tokio::time::interval(probe_every);
    let mut checks = tokio::time::interval(idle_check_interval(&shared.config));
    let mut scale_checks = tokio::time::interval(SCALE_CHECK);
    probes.set_missed_tick_behavior(MissedTickBehavior::Delay);
    checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    scale_checks.set_missed_tick_behavior(MissedTickBehavior::Delay);

    // An interval ticks at once; the pool just passed its probe.
    probes.reset();
    checks.reset();
    scale_checks.reset();
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
            _ = scale_checks.tick() => {
                let before = shared.lock().replicas;
                let Some((replicas, why)) = shared.rescale() else {
                    continue;
                };
                tracing::info!(pool = %shared.pool, from = before, to = replicas, reason = why, "pool replicas changed");
                metrics::record_pool_desired_replicas(&shared.pool, replicas);
                // A webhook that does not answer keeps a call retrying for
                // up to a minute; stopping does not wait for it.
                // Limitation: the probe and idle checks do wait for it.
                if let Some(webhook) = webhook {
                    tokio::select! {
                        scaled = webhook.scale(replicas, why) => if scaled.is_err() {
                            shared.rescale_failed(replicas, before);
                        },
                        () = stopped(stop) => return Watched::Stopped,
                    }
                }
            }
            () = stopped(stop) => return Watched::Stopped,
        }
    }
}

/// One life of a `webhook` or `kubernetes` pool: ask for `min_replicas`
/// (at least 1), wait for the probe, serve (stepping the replicas with
/// load) until the probe fails or the pool idles out (then ask for
/// replicas 0), or the scaler stops.
// Limitation: when Switchyard stops or a reload removes the pool, no
// replicas 0 is sent: a restarting sidecar should not take the model
// server down with it, so a pool left up is scaled down by whatever
// runs it, not by Switchyard.
async fn run_webhook(
    shared: &Arc<Shared>,
    pool: &Pool,
    webhook: Result<&Webhook, &String>,
    stop: &mut watch::Receiver<bool>,
    reason: &str,
) -> Flow {
    let replicas = shared.starting(reason);
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
        webhook.scale(replicas, reason).await?;
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

    match watch_ready(shared, pool, Some(webhook), stop).await {
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

/// Probes the pool until it answers (with `probe = "completion"`, until
/// a one-token completion succeeds too): every `probe_interval_ms` at
/// first, the gap growing by half after each failure, up to four times
/// it.
async fn wait_ready(pool: &Pool, config: &ScalerConfig) {
    let first = Duration::from_millis(config.probe_interval_ms);
    let cap = first * 4;
    let mut gap = first;
    let completion_timeout = Duration::from_secs(config.completion_probe_timeout_s);
    loop {
        let ready = pool.probe(&config.probe_path, PROBE_TIMEOUT).await
            && match config.probe {
                ProbeKind::Get => true,
                ProbeKind::Completion => pool.probe_completion(completion_timeout).await,
            };
        if ready {
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
        Inner {
            recent: recent.iter().map(|s| Duration::from_secs(*s)).collect(),
            ..Inner::new(Instant::now())
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
        answering(usize::MAX).await.0
    }

    /// A loopback server that answers 200 to its first `answered`
    /// requests and never to the later ones; with the requests it got.
    async fn answering(
        answered: usize,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = Arc::clone(&counted);
                let service = hyper::service::service_fn(move |_req| {
                    let answer = counted.fetch_add(1, Ordering::SeqCst) < answered;
                    async move {
                        if !answer {
                            std::future::pending::<()>().await;
                        }
                        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"{}"));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                    }
                });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        (addr, calls)
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_freed_place_goes_to_the_earliest_deadline_and_none_is_lost() {
        let addr = always_ready().await;
        let text = format!(
            "[[pool]]\nname = \"big\"\nendpoints = [\"http://{addr}\"]\n\
             [pool.scaler]\nkind = \"none\"\nmax_in_flight = 1\n\
             probe_interval_ms = 50\n"
        );
        let config = crate::config::Config::parse(&text).unwrap();
        let pool = Arc::new(Pool::new(&config.pool[0]).unwrap());
        let scaler_config = config.pool[0].scaler.clone().unwrap();
        let scaler = Scaler::start(pool, scaler_config, None);

        // The first request starts the pool and takes its one place.
        let first = scaler.admit(None).await.unwrap();
        assert_eq!(scaler.state(), PoolState::Ready);

        // Three wait: no deadline, 60 s, and 30 s, in that order.
        let scaler = Arc::new(scaler);
        let wait = |deadline: Option<u64>| {
            let scaler = Arc::clone(&scaler);
            tokio::spawn(async move {
                let deadline = deadline.map(Duration::from_secs);
                scaler.admit(deadline).await
            })
        };
        let unbounded = wait(None);
        let late = wait(Some(60));
        let early = wait(Some(30));
        let held = || scaler.report()["held"].as_u64().unwrap();
        while held() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // The 60 s one gives up; its place in the queue goes with it.
        late.abort();
        assert!(late.await.unwrap_err().is_cancelled());
        assert_eq!(held(), 2);

        // None gets in while the place is taken.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!early.is_finished() && !unbounded.is_finished());

        // The freed place goes to the 30 s deadline, then to the one
        // without a deadline.
        let within = |task| tokio::time::timeout(Duration::from_secs(5), task);
        drop(first);
        let second = within(early)
            .await
            .expect("the 30 s deadline was not let through");
        let second = second.unwrap().unwrap();
        assert!(!unbounded.is_finished());
        assert_eq!(scaler.report()["in_flight"], 1);
        drop(second);
        let third = within(unbounded)
            .await
            .expect("the request without a deadline was not let through");
        let third = third.unwrap().unwrap();
        drop(third);
        assert_eq!(scaler.report()["in_flight"], 0);
        assert_eq!(held(), 0);
        scaler.shutdown().await;
    }

    /// Two requests that find the pool cold before its supervisor has
    /// run each wake it; the second wake-up is kept by the `Notify`. The
    /// one start answers both, so once the pool idles out it stays cold
    /// rather than starting again with no request. On a current-thread
    /// runtime the spawned requests run before the woken supervisor, so
    /// the race happens every time.
    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_that_found_the_pool_cold_does_not_start_it_again_after_idling() {
        let addr = always_ready().await;
        let text = format!(
            "[[pool]]\nname = \"big\"\nendpoints = [\"http://{addr}\"]\n\
             [pool.scaler]\nkind = \"none\"\nidle_timeout_s = 1\nmin_up_s = 0\n\
             probe_interval_ms = 50\n"
        );
        let config = crate::config::Config::parse(&text).unwrap();
        let pool = Arc::new(Pool::new(&config.pool[0]).unwrap());
        let scaler_config = config.pool[0].scaler.clone().unwrap();
        let scaler = Arc::new(Scaler::start(pool, scaler_config, None));
        // The supervisor waits for demand.
        tokio::task::yield_now().await;

        let admit = || {
            let scaler = Arc::clone(&scaler);
            tokio::spawn(async move { scaler.admit(None).await.map(drop).is_ok() })
        };
        let (first, second) = (admit(), admit());
        assert!(first.await.unwrap() && second.await.unwrap());
        assert_eq!(scaler.report()["cold_starts"], 1);

        // Idle for 1 s: cold, and still cold well after, with one start.
        wait_for(&scaler, PoolState::Cold).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(scaler.state(), PoolState::Cold, "{}", scaler.report());
        assert_eq!(scaler.report()["cold_starts"], 1);
        scaler.shutdown().await;
    }

    /// A webhook that answers the start and then no more: a replica step
    /// hangs in its retries, and stopping the pool must not wait for them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_does_not_wait_for_a_replica_step_the_webhook_never_answers() {
        use std::sync::atomic::Ordering;
        let addr = always_ready().await;
        let (hook, calls) = answering(1).await;
        let text = format!(
            "[[pool]]\nname = \"big\"\nendpoints = [\"http://{addr}\"]\n\
             [pool.scaler]\nkind = \"webhook\"\nurl = \"http://{hook}/scale\"\n\
             max_in_flight = 1\nmax_replicas = 2\nprobe_interval_ms = 50\n"
        );
        let config = crate::config::Config::parse(&text).unwrap();
        let pool = Arc::new(Pool::new(&config.pool[0]).unwrap());
        let scaler_config = config.pool[0].scaler.clone().unwrap();
        let scaler = Scaler::start(pool, scaler_config, None);

        // One request in flight asks for a second replica; that call hangs.
        let busy = scaler.admit(None).await.unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while calls.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < end, "no replica step: {}", scaler.report());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(busy);
        // The call alone retries for about a minute.
        tokio::time::timeout(Duration::from_secs(10), scaler.shutdown())
            .await
            .expect("shutdown waited for the hanging replica step");
    }

    #[test]
    fn all_but_too_many_held_may_fall_back() {
        assert!(DivertReason::Deadline.may_fall_back());
        assert!(DivertReason::StartFailed.may_fall_back());
        assert!(DivertReason::Stopped.may_fall_back());
        assert!(!DivertReason::TooManyHeld.may_fall_back());
    }
}
