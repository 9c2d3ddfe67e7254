//! The epoch ticker: one thread per engine that advances wasmtime's epoch
//! at a steady tick, so that call deadlines set in epochs fire on time.
//!
//! Owns that thread and nothing else; the thread ends when the [`Ticker`]
//! is dropped.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::Duration;

/// Shortest and longest tick.
const MIN_TICK_MS: u64 = 1;
const MAX_TICK_MS: u64 = 10;

/// The tick for calls of `timeout_ms`: a tenth of it, from 1 to 10 ms.
/// Deadlines are whole ticks, so a call may overrun its budget by up to a
/// tick (10%). A coarser tick wakes the thread less often: each wake-up
/// preempts whatever runs on its core, a policy call among others, and at
/// one a millisecond that was the main source of slow decisions.
pub(crate) fn tick_for(timeout_ms: u64) -> Duration {
    Duration::from_millis((timeout_ms / 10).clamp(MIN_TICK_MS, MAX_TICK_MS))
}

// Limitation: the thread wakes every tick even while no call is in flight,
// and under heavy CPU load its wake-ups lag, stretching deadlines by the
// same amount. Deadlines are wall-clock: time a calling thread spends
// descheduled counts too.

/// Handle of a running ticker thread; dropping it stops the thread within
/// one tick.
#[derive(Debug)]
pub(crate) struct Ticker {
    /// Never sent on: dropping it disconnects the channel, which is the
    /// thread's signal to stop.
    _stop: Sender<()>,
}

impl Ticker {
    /// Starts a thread that calls `engine.increment_epoch()` every `tick`.
    pub(crate) fn start(engine: wasmtime::Engine, tick: Duration) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                // Nothing is ever sent, so this runs until disconnection.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    engine.increment_epoch();
                }
            })?;
        Ok(Ticker { _stop: stop })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_is_a_tenth_of_the_budget_within_bounds() {
        assert_eq!(tick_for(1), Duration::from_millis(1));
        assert_eq!(tick_for(19), Duration::from_millis(1));
        assert_eq!(tick_for(50), Duration::from_millis(5));
        assert_eq!(tick_for(1000), Duration::from_millis(10));
    }
}
