//! A fixed set of persistent worker threads that run one job at a time, for
//! the matrix kernels in [`crate::quant`].
//!
//! Owns the threads and the hand-off of a job to them; knows nothing about
//! tensors. A decode step dispatches a few hundred small jobs of tens of
//! microseconds each, so dispatch must cost well under a microsecond: workers
//! spin for a short while after each job before they sleep on a condition
//! variable, and a dispatch allocates nothing.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long an idle worker spins waiting for the next job before it sleeps.
/// Long enough to cover the gaps between the matrix products of one decode
/// step (norms, attention), short enough not to burn a core between steps.
const SPIN: Duration = Duration::from_micros(200);

/// Spin iterations between two reads of the clock while spinning.
const SPINS_PER_CLOCK_READ: u32 = 64;

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
    /// Bumped once per job (and once at shutdown); workers wait for it to
    /// change.
    epoch: AtomicU64,

    /// Address of a [`Job`] on the dispatching thread's stack; valid while
    /// `pending` is non-zero.
    job: AtomicPtr<()>,

    /// Number of indices in the current job.
    tasks: AtomicUsize,

    /// Next index to hand out; threads claim indices by incrementing it.
    next: AtomicUsize,

    /// Workers that have not yet finished with the current job.
    pending: AtomicUsize,

    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,

    /// The first panic a worker caught in the current job, re-raised on the
    /// dispatching thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl ThreadPool {
    /// Starts a pool of `threads` threads in all, counting the caller, so
    /// `threads - 1` workers are spawned. 0 is taken as 1 (no workers: jobs
    /// run on the caller).
    pub fn new(threads: usize) -> std::io::Result<ThreadPool> {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
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
            // because every job waits for all workers before returning.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                (0..tasks).for_each(f);
                return;
            }
        };
        let shared = &*self.shared;

        // Publish the job. The epoch bump releases the plain stores before it;
        // workers read them after they see the new epoch.
        let job: Job<'_> = f;
        let job_addr = &job as *const Job<'_> as *mut ();
        shared.job.store(job_addr, Ordering::Relaxed);
        shared.tasks.store(tasks, Ordering::Relaxed);
        shared.next.store(0, Ordering::Relaxed);
        shared.pending.store(self.workers.len(), Ordering::Relaxed);
        shared.epoch.fetch_add(1, Ordering::SeqCst);

        // Wake sleeping workers. SeqCst on both sides: a worker that counted
        // itself a sleeper after this load sees the new epoch before waiting.
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _lock = lock(&shared.lock);
            shared.wake.notify_all();
        }

        // Take our share of the indices, then wait for the workers: `job`
        // lives in this frame and must outlive their use of it, so a panic
        // here is held until they are done.
        let ours = panic::catch_unwind(AssertUnwindSafe(|| {
            run_indices(shared, f);
        }));
        wait_for_workers(shared);
        shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);

        if let Err(payload) = ours {
            panic::resume_unwind(payload);
        }
        if let Some(payload) = lock(&shared.panic).take() {
            panic::resume_unwind(payload);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // `&mut self`: no job is out, so every worker is waiting for the
        // next epoch.
        let shared = &*self.shared;
        shared.shutdown.store(true, Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
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

/// A worker: wait for a job, run indices until none are left, report done.
fn worker_loop(shared: &Shared) {
    // Epoch 0 is the pool before its first job, which may be dispatched
    // before this thread first runs: it must still count as new.
    let mut seen = 0;
    loop {
        seen = wait_for_epoch(shared, seen);
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }

        // SAFETY: `job` was stored before the epoch we just acquired, and the
        // dispatcher keeps the `Job` it points at alive, unchanged, until
        // `pending` drops to zero, which this worker does only below.
        #[allow(unsafe_code)]
        let job: Job<'_> = unsafe { *(shared.job.load(Ordering::Relaxed) as *const Job<'_>) };

        // Keep the first panic for the dispatcher; stop taking indices after
        // one, the other threads finish the job.
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            run_indices(shared, job);
        }));
        if let Err(payload) = result {
            let mut slot = lock(&shared.panic);
            if slot.is_none() {
                *slot = Some(payload);
            }
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

/// Claims and runs indices of the current job until there are none left.
fn run_indices(shared: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let tasks = shared.tasks.load(Ordering::Relaxed);
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= tasks {
            return;
        }
        f(i);
    }
}

/// Waits until the epoch differs from `seen` and returns it: spins for
/// [`SPIN`], then sleeps on the condition variable.
fn wait_for_epoch(shared: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let epoch = shared.epoch.load(Ordering::Acquire);
        if epoch != seen {
            return epoch;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(SPINS_PER_CLOCK_READ) && start.elapsed() > SPIN {
            break;
        }
        std::hint::spin_loop();
    }

    // Count ourselves a sleeper before the last look at the epoch, under the
    // lock the dispatcher takes to notify (see `for_each`).
    let mut guard = lock(&shared.lock);
    shared.sleepers.fetch_add(1, Ordering::SeqCst);
    loop {
        let epoch = shared.epoch.load(Ordering::SeqCst);
        if epoch != seen {
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            return epoch;
        }
        guard = shared
            .wake
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Waits for every worker to finish the current job: spins, since the
/// stragglers are normally a few microseconds behind, then yields.
fn wait_for_workers(shared: &Shared) {
    let mut spins = 0u32;
    while shared.pending.load(Ordering::Acquire) != 0 {
        spins = spins.saturating_add(1);
        if spins < 1 << 16 {
            std::hint::spin_loop();
        } else {
            thread::yield_now();
        }
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
    fn drop_joins_workers() {
        let pool = ThreadPool::new(4).unwrap();
        let weak = Arc::downgrade(&pool.shared);
        pool.for_each(8, &|_| {});
        drop(pool);

        // Every worker held a clone of `shared` until it returned.
        assert!(weak.upgrade().is_none());
    }
}
