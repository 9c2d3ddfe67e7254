//! The epoch ticker: one thread per engine that advances wasmtime's epoch
//! every millisecond, so that call deadlines set in epochs fire on time.
//!
//! Owns that thread and nothing else; the thread ends when the [`Ticker`]
//! is dropped.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::Duration;

/// Length of one epoch. Deadlines are whole epochs, so this is also their
/// resolution.
pub(crate) const TICK: Duration = Duration::from_millis(1);

// Limitation: the thread wakes every millisecond even while no call is in
// flight (a few microseconds of CPU per wake-up), and under heavy CPU load
// its wake-ups lag, stretching deadlines by the same amount. Deadlines are
// wall-clock: time a calling thread spends descheduled counts too.

/// Handle of a running ticker thread; dropping it stops the thread within
/// one tick.
#[derive(Debug)]
pub(crate) struct Ticker {
    /// Never sent on: dropping it disconnects the channel, which is the
    /// thread's signal to stop.
    _stop: Sender<()>,
}

impl Ticker {
    /// Starts a thread that calls `engine.increment_epoch()` every [`TICK`].
    pub(crate) fn start(engine: wasmtime::Engine) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                // Nothing is ever sent, so this runs until disconnection.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                    engine.increment_epoch();
                }
            })?;
        Ok(Ticker { _stop: stop })
    }
}
