//! A fixed set of persistent worker threads that run one job at a time, for
//! the matrix kernels in [`crate::quant`].
//!
//! Owns the threads and the hand-off of a job to them; knows nothing about
//! tensors. A decode step dispatches a few hundred small jobs of tens of
//! microseconds each, so dispatch must cost well under a microsecond: workers
//! spin for a short while after each job before they sleep on a condition
//! variable, and a dispatch allocates nothing.
//!
//! A job waits for its tasks to finish, never for every worker to turn up:
//! on a machine with more runnable threads than cores a descheduled worker
//! would otherwise stall each job for a scheduler time slice. Workers claim
//! task indices with a compare-and-swap on one word that also names the job,
//! so a late worker cannot claim a task of a job that has moved on.
//!
//! Spinning is kept short where it competes with the threads it waits for:
//! an idle worker spins briefly, then yields its core between looks, and a
//! dispatcher left waiting for the last tasks parks after a few
//! microseconds, to be woken by whichever thread finishes the last one. On
//! a machine whose cores are all busy, a worker that is slow to finish is
//! usually one that is not running, and parking gives it the core.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker waits for the next job before it sleeps: long
/// enough to cover the gaps between the matrix products of one decode step
/// (norms, attention), short enough not to burn a core between steps.
const SPIN: Duration = Duration::from_micros(200);

/// How much of [`SPIN`] a worker spends busy-spinning; the rest it spends
/// yielding its core between looks, so that on a machine with more
/// runnable threads than cores the threads it waits for (the dispatcher,
/// a straggling worker) get to run.
const BUSY_SPIN: Duration = Duration::from_micros(30);

/// How long a dispatcher that has run out of indices spins for the rest to
/// finish before it parks until the last one wakes it. Short: when a
/// worker is slow it is usually because it is not running, and parking
/// hands it this core.
const FINISH_SPIN: Duration = Duration::from_micros(20);

/// Spin iterations between two reads of the clock while spinning.
const SPINS_PER_CLOCK_READ: u32 = 64;

/// Most task indices one dispatch hands out; larger jobs are dispatched in
/// rounds of this many.
const MAX_TASKS: usize = (1 << TICKET_BITS) - 1;

/// Bits of the ticket for the task count and for the next index each.
const TICKET_BITS: u32 = 20;
const TICKET_MASK: u64 = (1 << TICKET_BITS) - 1;

/// The job type as workers see it: a shared reference to the caller's closure.
type Job<'a> = &'a (dyn Fn(usize) + Sync + 'a);

/// A pool of `threads - 1` worker threads plus the thread that dispatches.
///
/// [`ThreadPool::for_each`] runs a closure once for every index in
/// `0..tasks`, spread over all threads, and returns when every index has run.
/// Dropping the pool stops and joins the workers.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,

    /// Held while a job is out with the workers: one job at a time.
    dispatch: Mutex<()>,
}

/// State shared between the dispatching thread and the workers.
struct Shared {
    /// The current job's number (upper bits), task count and next index to
    /// hand out (see [`Ticket`]). Threads claim an index by advancing it.
    ticket: AtomicU64,

    /// Address of a [`Job`] on the dispatching thread's stack; valid while
    /// some claimed index of the current job has not finished.
    job: AtomicPtr<()>,

    /// Indices of the current job that have finished.
    done: AtomicUsize,

    /// Task count of the current job: the thread that finishes the last
    /// index wakes `waiter`.
    tasks: AtomicUsize,

    /// The dispatching thread, parked (or about to) when the last indices
    /// of its job are still running elsewhere.
    waiter: Mutex<Option<Thread>>,

    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,

    /// The first panic a worker caught in the current job, re-raised on the
    /// dispatching thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// The unpacked `Shared::ticket`: job number, task count, next index.
#[derive(Clone, Copy)]
struct Ticket {
    job: u64,
    tasks: usize,
    next: usize,
}

impl Ticket {
    fn unpack(word: u64) -> Ticket {
        Ticket {
            job: word >> (2 * TICKET_BITS),
            tasks: ((word >> TICKET_BITS) & TICKET_MASK) as usize,
            next: (word & TICKET_MASK) as usize,
        }
    }

    fn pack(self) -> u64 {
        (self.job << (2 * TICKET_BITS))
            | ((self.tasks as u64 & TICKET_MASK) << TICKET_BITS)
            | (self.next as u64 & TICKET_MASK)
    }
}

impl ThreadPool {
    /// Starts a pool of `threads` threads in all, counting the caller, so
    /// `threads - 1` workers are spawned. 0 is taken as 1 (no workers: jobs
    /// run on the caller).
    pub fn new(threads: usize) -> std::io::Result<ThreadPool> {
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            tasks: AtomicUsize::new(0),
            waiter: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            panic: Mutex::new(None),
        });
        let mut pool = ThreadPool {
            shared,
            workers: Vec::new(),
            dispatch: Mutex::new(()),
        };

        // On a spawn failure the pool built so far is dropped, which joins
        // the workers already started.
        for i in 1..threads.max(1) {
            let shared = Arc::clone(&pool.shared);
            let handle = thread::Builder::new()
                .name(format!("switchyard-kernel-{i}"))
                .spawn(move || worker_loop(&shared))?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Threads that run jobs, counting the dispatching thread.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` exactly once for every `i` in `0..tasks`, on all threads of
    /// the pool including the caller, and returns once all have finished.
    /// Indices are handed out in increasing order to whichever thread is
    /// free, so uneven tasks balance themselves.
    ///
    /// If another job is already out (a call from inside a task, or from a
    /// second thread at the same time) this one runs on the calling thread
    /// alone rather than wait. A panic in `f` is re-raised here after every
    /// thread has stopped using `f`.
    pub fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.workers.is_empty() || tasks == 1 {
            (0..tasks).for_each(f);
            return;
        }
        let _dispatch = match self.dispatch.try_lock() {
            Ok(guard) => guard,
            // A previous job panicked; the pool's state is still sound
            // because every job waits for all its tasks before returning.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                (0..tasks).for_each(f);
                return;
            }
        };

        // Huge jobs go out in rounds; the ticket has room for MAX_TASKS.
        let mut start = 0;
        while start < tasks {
            let round = (tasks - start).min(MAX_TASKS);
            let shifted = move |i: usize| f(start + i);
            self.dispatch_round(round, &shifted);
            start += round;
        }
    }

    /// One job of at most [`MAX_TASKS`] indices; the dispatch lock is held.
    fn dispatch_round(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let shared = &*self.shared;

        // Publish the job: the plain stores first, then the ticket that
        // names the new job, which releases them to whoever claims from it.
        let job: Job<'_> = f;
        let job_addr = &job as *const Job<'_> as *mut ();
        shared.job.store(job_addr, Ordering::Relaxed);
        shared.done.store(0, Ordering::Relaxed);
        shared.tasks.store(tasks, Ordering::Relaxed);
        {
            let mut waiter = lock(&shared.waiter);
            if waiter.as_ref().map(Thread::id) != Some(thread::current().id()) {
                *waiter = Some(thread::current());
            }
        }
        let previous = Ticket::unpack(shared.ticket.load(Ordering::Relaxed));
        let ticket = Ticket {
            job: previous.job.wrapping_add(1),
            tasks,
            next: 0,
        };
        shared.ticket.store(ticket.pack(), Ordering::SeqCst);

        // Wake sleeping workers. SeqCst on both sides: a worker that counted
        // itself a sleeper after this load sees the new ticket before waiting.
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _lock = lock(&shared.lock);
            shared.wake.notify_all();
        }

        // Take our share of the indices, then wait for the rest to finish:
        // `job` lives in this frame and must outlive their use of it, so
        // panics are held (by `run_indices`) until all are done.
        run_indices(shared, ticket.job, f);
        wait_for_tasks(shared, tasks);
        shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);

        if let Some(payload) = lock(&shared.panic).take() {
            panic::resume_unwind(payload);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // `&mut self`: no job is out. A new job number with no tasks wakes
        // every worker to see the flag.
        let shared = &*self.shared;
        shared.shutdown.store(true, Ordering::SeqCst);
        let previous = Ticket::unpack(shared.ticket.load(Ordering::SeqCst));
        let ticket = Ticket {
            job: previous.job.wrapping_add(1),
            tasks: 0,
            next: 0,
        };
        shared.ticket.store(ticket.pack(), Ordering::SeqCst);
        {
            let _lock = lock(&shared.lock);
            shared.wake.notify_all();
        }

        // A worker cannot panic outside `catch_unwind`; if one somehow did,
        // there is nothing left to clean up for it.
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads())
            .finish()
    }
}

/// A worker: wait for a new job, run indices of it until none are left.
fn worker_loop(shared: &Shared) {
    // Job 0 is the pool before its first job, which may be dispatched
    // before this thread first runs: it must still count as new.
    let mut seen = 0;
    loop {
        seen = wait_for_job(shared, seen);
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }

        // SAFETY: only read after claiming an index of job `job` (in
        // `run_indices`): the dispatcher stored the pointer before it
        // published that job, and keeps the `Job` it points at alive until
        // the claimed index has finished.
        #[allow(unsafe_code)]
        let claimed = |i: usize| {
            let job: Job<'_> = unsafe { *(shared.job.load(Ordering::Relaxed) as *const Job<'_>) };
            job(i);
        };

        run_indices(shared, seen, &claimed);
    }
}

/// Claims and runs indices of job `job` until none are left or the job is
/// no longer current. A panicking index still counts as done, after its
/// panic (the job's first) is kept for the dispatcher to re-raise, so the
/// dispatcher never waits forever nor misses it.
fn run_indices(shared: &Shared, job: u64, f: &(dyn Fn(usize) + Sync)) {
    let mut word = shared.ticket.load(Ordering::Acquire);
    loop {
        let ticket = Ticket::unpack(word);
        if ticket.job != job || ticket.next >= ticket.tasks {
            return;
        }
        let claim = Ticket {
            next: ticket.next + 1,
            ..ticket
        };
        match shared.ticket.compare_exchange_weak(
            word,
            claim.pack(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                let result = panic::catch_unwind(AssertUnwindSafe(|| f(ticket.next)));
                if let Err(payload) = result {
                    let mut slot = lock(&shared.panic);
                    if slot.is_none() {
                        *slot = Some(payload);
                    }
                }
                let done = shared.done.fetch_add(1, Ordering::AcqRel) + 1;
                if done == shared.tasks.load(Ordering::Relaxed) {
                    // The dispatcher may be parked waiting for this one. A
                    // wake-up it does not need (it finished the job itself,
                    // or a later job has begun) only makes one of its
                    // parks return early, and it checks `done` again.
                    if let Some(waiter) = lock(&shared.waiter).as_ref() {
                        waiter.unpark();
                    }
                }
                word = shared.ticket.load(Ordering::Acquire);
            }
            Err(current) => word = current,
        }
    }
}

/// Waits until the job number differs from `seen` and returns it: spins
/// for [`BUSY_SPIN`], yields between looks until [`SPIN`] has passed, then
/// sleeps on the condition variable.
fn wait_for_job(shared: &Shared, seen: u64) -> u64 {
    let current = || Ticket::unpack(shared.ticket.load(Ordering::SeqCst)).job;
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let job = current();
        if job != seen {
            return job;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(SPINS_PER_CLOCK_READ) {
            let waited = start.elapsed();
            if waited > SPIN {
                break;
            }
            if waited > BUSY_SPIN {
                thread::yield_now();
                continue;
            }
        }
        std::hint::spin_loop();
    }

    // Count ourselves a sleeper before the last look at the ticket, under
    // the lock the dispatcher takes to notify (see `dispatch_round`).
    let mut guard = lock(&shared.lock);
    shared.sleepers.fetch_add(1, Ordering::SeqCst);
    loop {
        let job = current();
        if job != seen {
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            return job;
        }
        guard = shared
            .wake
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Waits until `tasks` indices of the current job have finished: spins
/// for [`FINISH_SPIN`], since the last ones are normally a few microseconds
/// from done, then parks until the thread that finishes the last one
/// wakes it (see `run_indices`).
fn wait_for_tasks(shared: &Shared, tasks: usize) {
    let finished = || shared.done.load(Ordering::Acquire) >= tasks;
    let start = Instant::now();
    let mut spins = 0u32;
    while !finished() {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(SPINS_PER_CLOCK_READ) && start.elapsed() > FINISH_SPIN {
            break;
        }
        std::hint::spin_loop();
    }

    // `done` is read after every park: a wake-up may be stale, and one that
    // comes before the park makes it return at once.
    while !finished() {
        thread::park_timeout(Duration::from_millis(1));
    }
}

/// Locks a mutex whose data cannot be left inconsistent by a panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn counts(len: usize) -> Vec<AtomicU32> {
        (0..len).map(|_| AtomicU32::new(0)).collect()
    }

    #[test]
    fn every_index_runs_exactly_once() {
        for threads in [1, 2, 3, 5] {
            let pool = ThreadPool::new(threads).unwrap();
            assert_eq!(pool.threads(), threads);
            for tasks in [0, 1, 2, 3, 7, 64, 1000] {
                let hits = counts(tasks);
                pool.for_each(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "threads {threads}, tasks {tasks}"
                );
            }
        }
    }

    #[test]
    fn many_jobs_in_a_row_all_complete() {
        let pool = ThreadPool::new(3).unwrap();
        let total = AtomicUsize::new(0);
        for round in 0..20_000 {
            let tasks = round % 9 + 1;
            pool.for_each(tasks, &|i| {
                total.fetch_add(i + 1, Ordering::Relaxed);
            });
        }
        let want: usize = (0..20_000).map(|r| (r % 9 + 1) * (r % 9 + 2) / 2).sum();
        assert_eq!(total.load(Ordering::Relaxed), want);
    }

    #[test]
    fn jobs_after_workers_fall_asleep_still_run() {
        let pool = ThreadPool::new(2).unwrap();
        for _ in 0..3 {
            thread::sleep(SPIN * 5);
            let hits = counts(16);
            pool.for_each(16, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn work_spreads_over_worker_threads() {
        let pool = ThreadPool::new(2).unwrap();
        let caller = thread::current().id();
        let elsewhere = AtomicUsize::new(0);

        // Tasks long enough that the worker wakes before the caller is done.
        for _ in 0..50 {
            pool.for_each(8, &|_| {
                thread::sleep(Duration::from_micros(200));
                if thread::current().id() != caller {
                    elsewhere.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        assert!(elsewhere.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn nested_job_runs_on_the_calling_thread() {
        let pool = ThreadPool::new(2).unwrap();
        let hits = counts(4 * 4);
        pool.for_each(4, &|i| {
            pool.for_each(4, &|j| {
                hits[i * 4 + j].fetch_add(1, Ordering::Relaxed);
            });
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn concurrent_dispatchers_each_finish_their_job() {
        let pool = ThreadPool::new(3).unwrap();
        thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..2000 {
                        let hits = counts(12);
                        pool.for_each(12, &|i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                });
            }
        });
    }

    #[test]
    fn panic_in_a_task_reaches_the_caller_and_pool_still_works() {
        let pool = ThreadPool::new(3).unwrap();
        for bad in [0, 5, 63] {
            let result = panic::catch_unwind(AssertUnwindSafe(|| {
                pool.for_each(64, &|i| {
                    if i == bad {
                        panic!("task {i} failed");
                    }
                });
            }));
            assert!(result.is_err(), "panic in task {bad} was lost");
        }
        let hits = counts(64);
        pool.for_each(64, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn jobs_larger_than_a_ticket_run_in_rounds() {
        let pool = ThreadPool::new(2).unwrap();
        let tasks = MAX_TASKS * 2 + 3;
        let hits = counts(tasks);
        pool.for_each(tasks, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn drop_joins_workers() {
        let pool = ThreadPool::new(4).unwrap();
        let weak = Arc::downgrade(&pool.shared);
        pool.for_each(8, &|_| {});
        drop(pool);

        // Every worker held a clone of `shared` until it returned.
        assert!(weak.upgrade().is_none());
    }
}
