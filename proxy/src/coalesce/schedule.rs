//! The scheduler: one task per pool that owns the queue, admits or turns
//! away requests, decides when each batch goes upstream and hands out the
//! in-flight slots of each endpoint.
//!
//! It never waits on the network: batches are sent by their own tasks
//! (`batch`), and slots come back as events when they finish, so one slow
//! upstream request never holds up the queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use switchyard_policy::Endpoint;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::batch::{self, BatchReply, Member, Part};
use super::model::{ArrivalRate, CostModel};
use super::{Arrays, BatchSettings, Permit, Ticket};
use crate::config::BatchMode;
use crate::error::{ApiError, ErrorKind};
use crate::metrics;
use crate::upstream::Pool;

/// A batch is sent this much before the last moment its earliest
/// deadline allows, for the time it takes to reach the upstream.
const DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// Priority of a request that has waited past `starvation_ms`: above any
/// a client can ask for.
const STARVED_PRIORITY: u8 = u8::MAX;

/// Why a batch was sent, as the `reason` label of
/// `switchyard_batches_total` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// It reached `max_batch`, `max_batch_tokens`, or the size the cost
    /// model says keeps up with arrivals.
    Full,
    /// Its oldest request reached `max_wait_ms`, or waiting longer would
    /// not fill it in time to pay.
    Window,
    /// Its earliest deadline left no more time to wait.
    Deadline,
    /// The upstream had nothing in flight on this endpoint.
    Idle,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Window => "window",
            Self::Deadline => "deadline",
            Self::Idle => "idle",
        }
    }
}

/// What a queued request is waiting for.
#[derive(Debug)]
pub enum Work {
    /// Items to merge into a batch; the answer is the caller's share.
    Batch {
        part: Box<Part>,
        reply: oneshot::Sender<Result<BatchReply, ApiError>>,
    },
    /// A slot to send one request of its own (chat, streams).
    Slot(oneshot::Sender<Result<Permit, ApiError>>),
}

impl Work {
    fn is_closed(&self) -> bool {
        match self {
            Self::Batch { reply, .. } => reply.is_closed(),
            Self::Slot(reply) => reply.is_closed(),
        }
    }

    fn fail(self, error: ApiError) {
        // A caller that already left needs no answer.
        match self {
            Self::Batch { reply, .. } => drop(reply.send(Err(error))),
            Self::Slot(reply) => drop(reply.send(Err(error))),
        }
    }
}

/// One request (or one chunk of a caller's array) in the queue.
#[derive(Debug)]
pub struct Job {
    /// Requests share a batch only when their keys are equal.
    pub key: String,
    pub endpoint: Endpoint,
    /// Items, counted as the upstream will see them.
    pub items: usize,
    /// The items as text, where identical items collapse into one;
    /// empty otherwise.
    pub collapse_keys: Vec<String>,
    /// Estimated tokens.
    pub tokens: u64,
    pub ticket: Ticket,
    pub arrived: Instant,
    pub work: Work,
}

/// Messages from batches, permits and callers to the scheduler.
#[derive(Debug)]
pub enum Event {
    /// An in-flight slot of `endpoint` is free again; `sample` is the
    /// batch's items and time when it succeeded, `healthy` what it says
    /// about the upstream.
    Done {
        endpoint: Endpoint,
        sample: Option<(usize, Duration)>,
        healthy: Option<bool>,
    },
    /// A caller went away; its jobs can be dropped from the queue.
    Left,
}

/// One endpoint's in-flight slots and what is known of its cost.
#[derive(Debug, Default)]
struct Lane {
    /// Start and predicted time of each request in flight, oldest first.
    running: VecDeque<(Instant, Duration)>,
    model: CostModel,
    rate: ArrivalRate,
}

/// The scheduler's state.
#[derive(Debug)]
pub struct Scheduler {
    pool: Arc<Pool>,
    settings: Arc<BatchSettings>,
    arrays: Arc<Arrays>,
    events: mpsc::UnboundedSender<Event>,
    queues: HashMap<String, Vec<Job>>,
    queued: usize,
    lanes: HashMap<Endpoint, Lane>,
    /// Items sent for each tenant with queued work, divided by its
    /// weight: who is owed the next turn, across batches, slots and
    /// compatibility keys. A tenant leaves it when its queue empties.
    service: HashMap<String, f64>,
    /// The last upstream request failed to reach the pool.
    unavailable: bool,
    /// No more jobs will come: send what is queued without waiting.
    draining: bool,
}

/// When a key's batch should go.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Send(Reason),
    Wait(Option<Instant>),
}

/// Which of two due batches takes a free slot first.
#[derive(Debug, Clone, Copy)]
struct Urgency {
    /// The highest effective priority among its jobs.
    priority: u8,
    /// It is due because a deadline allows no more waiting.
    deadline: bool,
    /// The least weighted service of a tenant at that priority.
    service: f64,
    /// The earliest time any of its jobs needs to go.
    soonest: Instant,
}

impl Urgency {
    /// Higher priority first; then a batch held by a deadline; then the
    /// tenant served least; then the earliest.
    fn before(&self, other: &Urgency) -> bool {
        let order = other
            .priority
            .cmp(&self.priority)
            .then(other.deadline.cmp(&self.deadline))
            .then(self.service.total_cmp(&other.service))
            .then(self.soonest.cmp(&other.soonest));
        order == std::cmp::Ordering::Less
    }
}

impl Scheduler {
    pub fn new(
        pool: Arc<Pool>,
        settings: Arc<BatchSettings>,
        arrays: Arc<Arrays>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        Self {
            pool,
            settings,
            arrays,
            events,
            queues: HashMap::new(),
            queued: 0,
            lanes: HashMap::new(),
            service: HashMap::new(),
            unavailable: false,
            draining: false,
        }
    }

    /// Runs until every submitter is gone and the queue is empty.
    pub async fn run(
        mut self,
        mut jobs: mpsc::Receiver<Job>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        loop {
            let wake = self.next_wake(Instant::now());
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };

            tokio::select! {
                job = jobs.recv(), if !self.draining => match job {
                    Some(job) => self.admit(job),
                    None => self.draining = true,
                },
                Some(event) = events.recv() => self.on_event(event),
                () = sleep => {}
            }

            // Whatever woke us, the queue may now hold callers that left,
            // deadlines that passed and batches that are due.
            let now = Instant::now();
            self.prune(now);
            self.dispatch(now);
            metrics::record_queue_depth(&self.pool.name, self.queued);
            if self.draining && self.queued == 0 {
                break;
            }
        }
    }

    /// Admits `job` into the queue or answers it at once with why not.
    fn admit(&mut self, job: Job) {
        if job.work.is_closed() {
            return;
        }
        let now = Instant::now();
        let ahead = self.queued_items(job.endpoint);

        // A full queue turns requests away with the wait a caller can
        // expect, rather than let them time out.
        if self.queued >= self.settings.max_queue {
            let wait = self
                .predict_start(job.endpoint, ahead, now)
                .max(self.settings.max_wait);
            let (kind, reason, what) = if self.unavailable {
                (ErrorKind::PoolUnavailable, "unavailable", "is failing and ")
            } else {
                (ErrorKind::Overloaded, "queue_full", "")
            };
            let message = format!(
                "pool {:?} {what}has {} requests queued \
                 (pool.batch.max_queue); retry after {} ms",
                self.pool.name,
                self.queued,
                wait.as_millis()
            );
            self.reject(job, kind, message, Some(wait), reason);
            return;
        }

        // A deadline that the upstream could not meet even alone and
        // idle is refused outright; one that only the queue ahead
        // spoils is refused with the wait.
        if let Some(deadline) = job.ticket.deadline {
            let lane = self.lanes.entry(job.endpoint).or_default();
            let alone = lane.model.predict(job.items);
            if now + alone > deadline {
                let message = format!(
                    "the deadline ({} ms, {}) is shorter than pool {:?} \
                     takes for this request alone (about {} ms)",
                    job.ticket.deadline_ms,
                    super::DEADLINE_HEADER,
                    self.pool.name,
                    alone.as_millis()
                );
                self.reject(job, ErrorKind::DeadlineExceeded, message, None, "deadline");
                return;
            }
            let (start, ride) = self.predict_ride(&job, ahead, now);
            if now + start + ride + DEADLINE_MARGIN > deadline {
                let message = format!(
                    "pool {:?} cannot meet the deadline ({} ms, {}): \
                     about {} ms of queued work is ahead",
                    self.pool.name,
                    job.ticket.deadline_ms,
                    super::DEADLINE_HEADER,
                    start.as_millis()
                );
                let kind = ErrorKind::Overloaded;
                self.reject(job, kind, message, Some(start), "deadline");
                return;
            }
        }

        let lane = self.lanes.entry(job.endpoint).or_default();
        lane.rate.record(now, job.items);
        // A tenant that had nothing queued starts level with the least
        // served one: next in line, with no credit banked while away.
        if !self.service.contains_key(&job.ticket.tenant) {
            let start = self.service_of(&job.ticket.tenant);
            self.service.insert(job.ticket.tenant.clone(), start);
        }
        self.queued += 1;
        self.queues.entry(job.key.clone()).or_default().push(job);
    }

    fn reject(
        &self,
        job: Job,
        kind: ErrorKind,
        message: String,
        retry_after: Option<Duration>,
        reason: &'static str,
    ) {
        metrics::record_rejected(&self.pool.name, job.endpoint, reason);
        tracing::debug!(pool = %self.pool.name, reason, "request turned away");
        let mut error = ApiError::new(kind, message);
        error.retry_after = retry_after;
        job.work.fail(error);
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Done {
                endpoint,
                sample,
                healthy,
            } => {
                let lane = self.lanes.entry(endpoint).or_default();
                lane.running.pop_front();
                if let Some((items, elapsed)) = sample {
                    lane.model.record(items, elapsed);
                    let (a, b) = lane.model.coefficients();
                    metrics::record_cost_model(&self.pool.name, endpoint, a, b);
                }
                match healthy {
                    Some(false) if !self.unavailable => {
                        tracing::warn!(pool = %self.pool.name, "pool marked unavailable");
                        self.unavailable = true;
                    }
                    Some(true) if self.unavailable => {
                        tracing::info!(pool = %self.pool.name, "pool available again");
                        self.unavailable = false;
                    }
                    _ => {}
                }
            }
            Event::Left => {}
        }
    }

    /// Drops jobs whose callers left and fails those whose deadline can
    /// no longer be met, so that neither is ever sent upstream.
    fn prune(&mut self, now: Instant) {
        let mut removed = 0;
        for jobs in self.queues.values_mut() {
            let mut kept = Vec::with_capacity(jobs.len());
            for job in jobs.drain(..) {
                if job.work.is_closed() {
                    removed += 1;
                    continue;
                }
                let model = &self.lanes.entry(job.endpoint).or_default().model;
                let hopeless = job
                    .ticket
                    .deadline
                    .is_some_and(|deadline| now + model.predict(job.items) > deadline);
                if hopeless {
                    removed += 1;
                    metrics::record_rejected(&self.pool.name, job.endpoint, "deadline");
                    let message = format!(
                        "pool {:?} could not start this request before its \
                         deadline ({} ms, {})",
                        self.pool.name,
                        job.ticket.deadline_ms,
                        super::DEADLINE_HEADER
                    );
                    job.work
                        .fail(ApiError::new(ErrorKind::DeadlineExceeded, message));
                    continue;
                }
                kept.push(job);
            }
            *jobs = kept;
        }
        self.queues.retain(|_, jobs| !jobs.is_empty());
        self.queued -= removed;
    }

    /// Sends every batch that is due and has a free slot, most urgent
    /// first.
    fn dispatch(&mut self, now: Instant) {
        loop {
            let mut best: Option<(Urgency, String, Reason)> = None;
            for (key, jobs) in &self.queues {
                let Some(first) = jobs.first() else { continue };
                if self.free_slots(first.endpoint) == 0 {
                    continue;
                }
                let Decision::Send(reason) = self.decide(jobs, now) else {
                    continue;
                };
                let urgency = self.urgency(jobs, reason, now);
                if best.as_ref().is_none_or(|(u, _, _)| urgency.before(u)) {
                    best = Some((urgency, key.clone(), reason));
                }
            }
            let Some((_, key, reason)) = best else { return };
            self.send(&key, reason, now);
        }
    }

    /// How `jobs`, due for `reason`, rank against other keys' batches.
    fn urgency(&self, jobs: &[Job], reason: Reason, now: Instant) -> Urgency {
        let priority = jobs
            .iter()
            .map(|job| self.priority(job, now))
            .max()
            .unwrap_or(0);
        let service = jobs
            .iter()
            .filter(|job| self.priority(job, now) == priority)
            .map(|job| self.service_of(&job.ticket.tenant))
            .fold(f64::INFINITY, f64::min);
        let soonest = jobs
            .iter()
            .map(|job| {
                job.ticket
                    .deadline
                    .unwrap_or(job.arrived + self.settings.max_wait)
            })
            .min()
            .unwrap_or(now);
        Urgency {
            priority,
            deadline: reason == Reason::Deadline,
            service,
            soonest,
        }
    }

    /// The weighted service `tenant` has had while it had work queued;
    /// for a tenant with none, that of the least served one.
    fn service_of(&self, tenant: &str) -> f64 {
        if let Some(service) = self.service.get(tenant) {
            return *service;
        }
        self.service
            .values()
            .copied()
            .fold(None, |least: Option<f64>, s| {
                Some(least.map_or(s, |l| l.min(s)))
            })
            .unwrap_or(0.0)
    }

    /// Counts the jobs just sent to their tenants, and forgets tenants
    /// with nothing queued any more.
    fn record_service(&mut self, sent: &[Job]) {
        for job in sent {
            let tenant = &job.ticket.tenant;
            let weight = f64::from(self.settings.weight(tenant));
            let start = self.service_of(tenant);
            *self.service.entry(tenant.clone()).or_insert(start) += job.items as f64 / weight;
        }
        let queued: HashSet<&str> = self
            .queues
            .values()
            .flatten()
            .map(|job| job.ticket.tenant.as_str())
            .collect();
        self.service
            .retain(|tenant, _| queued.contains(tenant.as_str()));
    }

    fn priority(&self, job: &Job, now: Instant) -> u8 {
        if now.saturating_duration_since(job.arrived) >= self.settings.starvation {
            return STARVED_PRIORITY;
        }
        job.ticket.priority
    }

    fn free_slots(&self, endpoint: Endpoint) -> usize {
        let running = self
            .lanes
            .get(&endpoint)
            .map_or(0, |lane| lane.running.len());
        self.settings.max_inflight.saturating_sub(running)
    }

    /// Most items one upstream request of `endpoint` may carry.
    fn item_cap(&self, endpoint: Endpoint) -> usize {
        if self.arrays.accepts(endpoint) {
            self.settings.max_batch
        } else {
            1
        }
    }

    /// Whether the batch that `jobs` would make should go now.
    fn decide(&self, jobs: &[Job], now: Instant) -> Decision {
        let Some(first) = jobs.first() else {
            return Decision::Wait(None);
        };
        if self.draining || matches!(first.work, Work::Slot(_)) {
            return Decision::Send(Reason::Full);
        }
        let endpoint = first.endpoint;
        let cap = self.item_cap(endpoint);
        let items = distinct_items(jobs).min(cap);
        let tokens: u64 = jobs.iter().map(|job| job.tokens).sum();
        let over_tokens = self
            .settings
            .max_batch_tokens
            .is_some_and(|limit| tokens >= limit);
        if items >= cap || over_tokens {
            return Decision::Send(Reason::Full);
        }

        // The batch must leave early enough for its earliest deadline.
        let lane = self.lanes.get(&endpoint);
        let cost = lane.map_or(Duration::ZERO, |lane| lane.model.predict(items));
        let latest = jobs
            .iter()
            .filter_map(|job| job.ticket.deadline)
            .min()
            .map(|deadline| deadline.checked_sub(cost + DEADLINE_MARGIN).unwrap_or(now));
        if latest.is_some_and(|latest| now >= latest) {
            return Decision::Send(Reason::Deadline);
        }
        let oldest = jobs.iter().map(|job| job.arrived).min().unwrap_or(now);
        let window_end = oldest + self.settings.max_wait;
        if now >= window_end {
            return Decision::Send(Reason::Window);
        }
        let wake = Some(latest.map_or(window_end, |latest| latest.min(window_end)));
        if self.settings.mode == BatchMode::Fixed {
            return Decision::Wait(wake);
        }

        // Adaptive: an idle upstream gets the batch at once; a busy one
        // gets it once it holds what keeps up with arrivals, or when that
        // size would not be reached within the window anyway.
        let Some(lane) = lane.filter(|lane| !lane.running.is_empty()) else {
            return Decision::Send(Reason::Idle);
        };
        let rate = lane.rate.per_second(now);
        let target = lane.model.keep_up_size(rate, cap);
        if items >= target {
            return Decision::Send(Reason::Full);
        }
        let missing = (target - items) as f64;
        let filled_at = if rate > 0.0 {
            now + Duration::from_secs_f64((missing / rate).min(60.0))
        } else {
            window_end + self.settings.max_wait
        };
        if filled_at > window_end {
            return Decision::Send(Reason::Window);
        }
        Decision::Wait(wake.map(|wake| wake.min(filled_at)))
    }

    /// The next time a decision could change without an event: a window
    /// or a deadline.
    fn next_wake(&self, now: Instant) -> Option<Instant> {
        // Only times still ahead count: one already past has been acted
        // on, and waking for it again would spin.
        let mut wake: Option<Instant> = None;
        let mut earliest = |at: Instant| {
            if at > now {
                wake = Some(wake.map_or(at, |w: Instant| w.min(at)));
            }
        };
        for jobs in self.queues.values() {
            if let Decision::Wait(Some(at)) = self.decide(jobs, now) {
                earliest(at.max(now + Duration::from_millis(1)));
            }
            for job in jobs {
                // Starvation lifts a job's priority at a known time.
                earliest(job.arrived + self.settings.starvation);
                let Some(deadline) = job.ticket.deadline else {
                    continue;
                };
                let model = self.lanes.get(&job.endpoint).map(|lane| &lane.model);
                let alone = model.map_or(Duration::ZERO, |m| m.predict(job.items));
                if let Some(hopeless) = deadline.checked_sub(alone) {
                    earliest(hopeless);
                }
            }
        }
        wake
    }

    /// Takes the jobs of `key` that make the next batch and sends it.
    fn send(&mut self, key: &str, reason: Reason, now: Instant) {
        let Some(mut jobs) = self.queues.remove(key) else {
            return;
        };
        let Some(endpoint) = jobs.first().map(|job| job.endpoint) else {
            return;
        };
        let order = self.batch_order(&jobs, now);
        let cap = self.item_cap(endpoint);

        // Jobs join in priority and fairness order until the next one
        // would pass a limit; the first always goes.
        let mut taken = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let (mut items, mut tokens) = (0usize, 0u64);
        for &index in &order {
            let job = &jobs[index];
            let new_items = if job.collapse_keys.is_empty() {
                job.items
            } else {
                let fresh: HashSet<&str> = job
                    .collapse_keys
                    .iter()
                    .map(String::as_str)
                    .filter(|k| !seen.contains(k))
                    .collect();
                fresh.len()
            };
            let over_tokens = self
                .settings
                .max_batch_tokens
                .is_some_and(|limit| tokens + job.tokens > limit);
            if !taken.is_empty() && (items + new_items > cap || over_tokens) {
                break;
            }
            seen.extend(job.collapse_keys.iter().map(String::as_str));
            items += new_items;
            tokens += job.tokens;
            taken.push(index);
        }
        taken.sort_unstable();
        let mut batch = Vec::with_capacity(taken.len());
        for index in taken.into_iter().rev() {
            batch.push(jobs.remove(index));
        }
        batch.reverse();
        if !jobs.is_empty() {
            self.queues.insert(key.to_string(), jobs);
        }
        self.queued -= batch.len();
        self.record_service(&batch);

        // The slot is taken now and given back by the permit's drop.
        let lane = self.lanes.entry(endpoint).or_default();
        lane.running.push_back((now, lane.model.predict(items)));
        let permit = Permit::new(self.events.clone(), endpoint);
        for job in &batch {
            let waited = now.saturating_duration_since(job.arrived);
            metrics::record_queue_wait(&self.pool.name, endpoint, waited);
        }

        let mut members = Vec::with_capacity(batch.len());
        let mut permit = Some(permit);
        for job in batch {
            match job.work {
                // A slot job is alone in its "batch": the caller sends
                // its own request. Its time teaches the lane's model.
                Work::Slot(reply) => {
                    if let Some(mut permit) = permit.take() {
                        permit.sample_items = Some(1);
                        let _ = reply.send(Ok(permit));
                    }
                }
                Work::Batch { part, reply } => members.push(Member { part: *part, reply }),
            }
        }
        let Some(permit) = permit else { return };
        metrics::record_dispatch(&self.pool.name, endpoint, tokens, reason.label());
        tracing::debug!(
            pool = %self.pool.name,
            endpoint = endpoint.label(),
            callers = members.len(),
            items,
            reason = reason.label(),
            "batch sent"
        );
        batch::spawn(Arc::clone(&self.pool), endpoint, members, permit);
    }

    /// Indices of `jobs` in the order they join a batch: higher
    /// (effective) priority first; within a priority, tenants take turns
    /// by weight, the least served so far (across batches) first, each
    /// tenant's jobs first in, first out.
    fn batch_order(&self, jobs: &[Job], now: Instant) -> Vec<usize> {
        let mut by_level: Vec<(u8, usize)> = jobs
            .iter()
            .enumerate()
            .map(|(index, job)| (self.priority(job, now), index))
            .collect();
        by_level.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));

        let mut order = Vec::with_capacity(jobs.len());
        let mut start = 0;
        while start < by_level.len() {
            let level = by_level[start].0;
            let end = by_level[start..]
                .iter()
                .position(|(p, _)| *p != level)
                .map_or(by_level.len(), |offset| start + offset);
            let mut pending: Vec<usize> = by_level[start..end].iter().map(|x| x.1).collect();
            let mut served: HashMap<&str, f64> = pending
                .iter()
                .map(|&i| jobs[i].ticket.tenant.as_str())
                .map(|tenant| (tenant, self.service_of(tenant)))
                .collect();
            while !pending.is_empty() {
                // The tenant with the least weighted service so far goes
                // next; ties go to the oldest job.
                let pick = pending
                    .iter()
                    .enumerate()
                    .min_by(|(_, &x), (_, &y)| {
                        let share = |i: usize| {
                            let tenant = jobs[i].ticket.tenant.as_str();
                            served.get(tenant).copied().unwrap_or(0.0)
                        };
                        share(x).total_cmp(&share(y)).then(x.cmp(&y))
                    })
                    .map_or(0, |(k, _)| k);
                let index = pending.remove(pick);
                let job = &jobs[index];
                let weight = f64::from(self.settings.weight(&job.ticket.tenant));
                *served.entry(job.ticket.tenant.as_str()).or_default() += job.items as f64 / weight;
                order.push(index);
            }
            start = end;
        }
        order
    }

    /// Items queued for `endpoint`.
    fn queued_items(&self, endpoint: Endpoint) -> usize {
        self.queues
            .values()
            .flatten()
            .filter(|job| job.endpoint == endpoint)
            .map(|job| job.items)
            .sum()
    }

    /// When the batch that would carry `job` starts, and how long it
    /// takes. The full batches of the `ahead` queued items go first; the
    /// rest share the job's batch, with what arrives while it waits, so
    /// that under load it is a full batch, not the job alone.
    fn predict_ride(&self, job: &Job, ahead: usize, now: Instant) -> (Duration, Duration) {
        let cap = self.item_cap(job.endpoint).max(1);
        let partial = ahead % cap;
        let start = self.predict_start(job.endpoint, ahead - partial, now);
        let Some(lane) = self.lanes.get(&job.endpoint) else {
            return (start, Duration::ZERO);
        };
        let joining = lane.rate.per_second(now) * start.as_secs_f64();
        let fill = (partial + job.items).saturating_add(joining.ceil() as usize);
        (start, lane.model.predict(fill.min(cap)))
    }

    /// Predicted time until a request behind `ahead` queued items of
    /// `endpoint` could start: the in-flight requests finish as the model
    /// predicts and the queue leaves in full batches over every slot.
    fn predict_start(&self, endpoint: Endpoint, ahead: usize, now: Instant) -> Duration {
        let slots_count = self.settings.max_inflight.max(1);
        let mut slots = vec![Duration::ZERO; slots_count];
        let Some(lane) = self.lanes.get(&endpoint) else {
            return Duration::ZERO;
        };
        for (slot, (started, predicted)) in slots.iter_mut().zip(&lane.running) {
            *slot = (*started + *predicted).saturating_duration_since(now);
        }
        let cap = self.item_cap(endpoint).max(1);
        let mut remaining = ahead;
        while remaining > 0 {
            let items = remaining.min(cap);
            if let Some(slot) = slots.iter_mut().min() {
                *slot += lane.model.predict(items);
            }
            remaining -= items;
        }
        slots.into_iter().min().unwrap_or(Duration::ZERO)
    }
}

/// Items of `jobs` counted once per distinct item where they collapse.
fn distinct_items(jobs: &[Job]) -> usize {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut items = 0;
    for job in jobs {
        if job.collapse_keys.is_empty() {
            items += job.items;
        } else {
            for key in &job.collapse_keys {
                if seen.insert(key) {
                    items += 1;
                }
            }
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiRequest;
    use http::HeaderMap;

    fn scheduler(batch_toml: &str) -> Scheduler {
        let pool: crate::config::PoolConfig =
            toml::from_str("name = \"p\"\nendpoints = [\"http://127.0.0.1:9\"]").unwrap();
        let pool = Arc::new(Pool::new(&pool).unwrap());
        let config: crate::config::BatchConfig = toml::from_str(batch_toml).unwrap();
        let settings = Arc::new(BatchSettings::from_config(&config));
        let arrays = Arc::new(Arrays::new(&settings.array_endpoints));
        let (events, _) = mpsc::unbounded_channel();
        Scheduler::new(pool, settings, arrays, events)
    }

    fn ticket(priority: u8, tenant: &str, deadline: Option<Instant>) -> Ticket {
        Ticket {
            priority,
            deadline,
            deadline_ms: 0,
            tenant: tenant.to_string(),
        }
    }

    /// A one-input embeddings job and the receiver of its answer.
    fn job(input: &str, ticket: Ticket) -> (Job, oneshot::Receiver<Result<BatchReply, ApiError>>) {
        let body = serde_json::json!({"model": "p", "input": input}).to_string();
        let request = ApiRequest::parse(Endpoint::Embeddings, body.as_bytes()).unwrap();
        let part = Part::new(request, &HeaderMap::new()).unwrap();
        let (reply, answer) = oneshot::channel();
        let job = Job {
            key: part.key.clone(),
            endpoint: Endpoint::Embeddings,
            items: 1,
            collapse_keys: Vec::new(),
            tokens: 1,
            ticket,
            arrived: Instant::now(),
            work: Work::Batch {
                part: Box::new(part),
                reply,
            },
        };
        (job, answer)
    }

    /// Marks `n` requests of the embeddings lane in flight and teaches
    /// the model a cost of 20 ms + 1 ms per item.
    fn busy(scheduler: &mut Scheduler, n: usize) {
        let lane = scheduler.lanes.entry(Endpoint::Embeddings).or_default();
        for items in [1, 2, 4, 8] {
            let ms = 20 + items as u64;
            lane.model.record(items, Duration::from_millis(ms));
        }
        for _ in 0..n {
            lane.running
                .push_back((Instant::now(), Duration::from_millis(21)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_request_to_an_idle_upstream_goes_at_once() {
        let mut s = scheduler("max_wait_ms = 5000");
        let (job, _answer) = job("a", ticket(5, "", None));
        s.admit(job);
        let jobs = &s.queues.values().next().unwrap()[..];
        assert_eq!(s.decide(jobs, Instant::now()), Decision::Send(Reason::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn the_fixed_window_waits_for_max_wait() {
        let mut s = scheduler("mode = \"fixed\"\nmax_wait_ms = 40");
        let (job, _answer) = job("a", ticket(5, "", None));
        let start = Instant::now();
        s.admit(job);
        let jobs = &s.queues.values().next().unwrap()[..];
        let window_end = start + Duration::from_millis(40);
        assert_eq!(s.decide(jobs, start), Decision::Wait(Some(window_end)));
        assert_eq!(s.decide(jobs, window_end), Decision::Send(Reason::Window));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_upstream_gets_a_batch_once_it_keeps_up_with_arrivals() {
        let mut s = scheduler("max_batch = 32\nmax_wait_ms = 100\nmax_inflight = 2");
        busy(&mut s, 1);
        // 200 items/s for a while: the batch that keeps up holds about
        // 200 × 0.02 / (1 - 0.2) = 5 items.
        let lane = s.lanes.entry(Endpoint::Embeddings).or_default();
        let start = Instant::now();
        for k in 0..200 {
            lane.rate
                .record(start - Duration::from_millis(5 * (200 - k)), 1);
        }
        let mut answers = Vec::new();
        for k in 0..3 {
            let (job, answer) = job(&format!("x{k}"), ticket(5, "", None));
            s.admit(job);
            answers.push(answer);
        }
        let jobs = &s.queues.values().next().unwrap()[..];
        assert!(matches!(s.decide(jobs, start), Decision::Wait(Some(_))));
        for k in 3..6 {
            let (job, answer) = job(&format!("x{k}"), ticket(5, "", None));
            s.admit(job);
            answers.push(answer);
        }
        let jobs = &s.queues.values().next().unwrap()[..];
        assert_eq!(s.decide(jobs, start), Decision::Send(Reason::Full));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_sends_the_batch_before_the_window_ends() {
        let mut s = scheduler("mode = \"fixed\"\nmax_wait_ms = 1000");
        busy(&mut s, 0);
        let start = Instant::now();
        let deadline = start + Duration::from_millis(100);
        let (job, _answer) = job("a", ticket(5, "", Some(deadline)));
        s.admit(job);
        let jobs = &s.queues.values().next().unwrap()[..];
        // 21 ms of upstream work and the margin leave until 77 ms.
        let latest = deadline - Duration::from_millis(23);
        assert_eq!(s.decide(jobs, start), Decision::Wait(Some(latest)));
        assert_eq!(s.decide(jobs, latest), Decision::Send(Reason::Deadline));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unmeetable_deadline_is_refused_at_once() {
        let mut s = scheduler("max_inflight = 1");
        busy(&mut s, 1);
        let now = Instant::now();

        // Shorter than the request alone: 504, no retry hint.
        let (short, mut answer) = job("a", ticket(5, "", Some(now + Duration::from_millis(10))));
        s.admit(short);
        let err = answer.try_recv().unwrap().unwrap_err();
        assert_eq!(err.kind, ErrorKind::DeadlineExceeded);

        // Enough alone, not behind the batch in flight: 429 with the wait.
        let (queued, mut answer) = job("b", ticket(5, "", Some(now + Duration::from_millis(30))));
        s.admit(queued);
        let err = answer.try_recv().unwrap().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Overloaded);
        assert_eq!(err.retry_after, Some(Duration::from_millis(21)));
        assert_eq!(s.queued, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn admission_counts_the_full_batch_a_request_will_ride_in() {
        let mut s = scheduler("max_batch = 4\nmax_inflight = 1\nmax_wait_ms = 50");
        busy(&mut s, 1);
        let now = Instant::now();
        let lane = s.lanes.entry(Endpoint::Embeddings).or_default();
        for k in 0..100 {
            lane.rate
                .record(now - Duration::from_millis(5 * (100 - k)), 1);
        }
        let mut kept = Vec::new();
        for k in 0..4 {
            let (queued, answer) = job(&format!("x{k}"), ticket(5, "", None));
            s.admit(queued);
            kept.push(answer);
        }

        // 21 ms in flight, then the 4 queued (24 ms): the next starts at
        // 45 ms in a batch that fills to 4 (24 ms), plus the margin. Alone
        // it would take 21 ms and seem to fit 70 ms.
        let (tight, mut answer) = job("t", ticket(5, "", Some(now + Duration::from_millis(70))));
        s.admit(tight);
        let err = answer.try_recv().unwrap().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Overloaded);
        assert_eq!(err.retry_after, Some(Duration::from_millis(45)));

        let (fits, mut answer) = job("f", ticket(5, "", Some(now + Duration::from_millis(75))));
        s.admit(fits);
        assert!(answer.try_recv().is_err(), "admitted, so not answered yet");
        assert_eq!(s.queued, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_answers_429_with_the_predicted_wait() {
        let mut s = scheduler("max_queue = 2\nmax_inflight = 1\nmax_wait_ms = 5");
        busy(&mut s, 1);
        let mut answers = Vec::new();
        for k in 0..3 {
            let (job, answer) = job(&format!("x{k}"), ticket(5, "", None));
            s.admit(job);
            answers.push(answer);
        }
        let err = answers[2].try_recv().unwrap().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Overloaded);
        // 21 ms left of the batch in flight, then the two queued as one
        // batch (22 ms).
        assert_eq!(err.retry_after, Some(Duration::from_millis(43)));
        assert!(err.message.contains("max_queue"), "{}", err.message);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_of_a_failing_pool_answers_503() {
        let mut s = scheduler("max_queue = 1\nmax_inflight = 1");
        busy(&mut s, 2);
        s.on_event(Event::Done {
            endpoint: Endpoint::Embeddings,
            sample: None,
            healthy: Some(false),
        });
        let (first, _kept) = job("a", ticket(5, "", None));
        s.admit(first);
        let (second, mut answer) = job("b", ticket(5, "", None));
        s.admit(second);
        let err = answer.try_recv().unwrap().unwrap_err();
        assert_eq!(err.kind, ErrorKind::PoolUnavailable);
        assert!(err.retry_after.is_some());

        // One success and the pool is merely busy again.
        s.on_event(Event::Done {
            endpoint: Endpoint::Embeddings,
            sample: None,
            healthy: Some(true),
        });
        let (third, mut answer) = job("c", ticket(5, "", None));
        s.admit(third);
        let err = answer.try_recv().unwrap().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Overloaded);
    }

    #[tokio::test(start_paused = true)]
    async fn higher_priority_first_and_tenants_take_turns() {
        let s = scheduler("");
        let jobs: Vec<Job> = [
            (5, "noisy"),
            (5, "noisy"),
            (5, "noisy"),
            (5, "quiet"),
            (9, "late"),
        ]
        .iter()
        .enumerate()
        .map(|(k, (priority, tenant))| job(&format!("x{k}"), ticket(*priority, tenant, None)).0)
        .collect();
        let order = s.batch_order(&jobs, Instant::now());
        assert_eq!(order, vec![4, 0, 3, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_served_in_earlier_batches_waits_its_turn() {
        let mut s = scheduler("mode = \"fixed\"");
        let mut answers = Vec::new();
        for (input, tenant) in [("n1", "noisy"), ("n2", "noisy"), ("q", "quiet")] {
            let (queued, answer) = job(input, ticket(5, tenant, None));
            s.admit(queued);
            answers.push(answer);
        }
        let (sent, _answer) = job("n0", ticket(5, "noisy", None));

        s.record_service(&[sent]);

        let jobs = s.queues.values().next().unwrap();
        let order = s.batch_order(jobs, Instant::now());
        assert_eq!(order, vec![2, 0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_with_nothing_queued_is_forgotten() {
        let mut s = scheduler("");
        let (sent, _answer) = job("n0", ticket(5, "noisy", None));
        s.record_service(&[sent]);
        assert!(s.service.is_empty());
        assert_eq!(s.service_of("anyone"), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_starved_request_goes_before_higher_priorities() {
        let s = scheduler("starvation_ms = 100");
        let old = job("old", ticket(0, "", None)).0;
        tokio::time::advance(Duration::from_millis(150)).await;
        let new = job("new", ticket(9, "", None)).0;
        let order = s.batch_order(&[new, old], Instant::now());
        assert_eq!(order, vec![1, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_starved_job_behind_a_busy_slot_sets_no_wake_in_the_past() {
        let mut s = scheduler("max_inflight = 1\nstarvation_ms = 10");
        busy(&mut s, 1);
        let (queued, _answer) = job("a", ticket(5, "", None));
        s.admit(queued);
        tokio::time::advance(Duration::from_millis(500)).await;
        let now = Instant::now();
        assert!(s.next_wake(now).is_none_or(|at| at > now));
    }

    #[tokio::test(start_paused = true)]
    async fn callers_that_left_are_dropped_from_the_queue() {
        let mut s = scheduler("mode = \"fixed\"");
        let (job, answer) = job("a", ticket(5, "", None));
        s.admit(job);
        assert_eq!(s.queued, 1);
        drop(answer);
        s.prune(Instant::now());
        assert_eq!(s.queued, 0);
        assert!(s.queues.is_empty());
    }
}
