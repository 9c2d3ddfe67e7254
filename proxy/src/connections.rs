//! Client connection limits on the API listener: how many may be open
//! at once, in all and from one IP address, and when an open one counts
//! as idle. The listener asks here before serving a connection; what a
//! connection carries (HTTP, TLS) is none of this module's business.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::{CONNECTIONS_OPEN, CONNECTIONS_REJECTED};

/// Counts the API listener's open connections, in all and per client
/// address, and refuses a new one past either limit.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    /// One lock keeps the two counts in step.
    open: Mutex<OpenCounts>,
}

/// Open connections, in all and by client address.
#[derive(Debug, Default)]
struct OpenCounts {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// Which limit refused a connection, as the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `server.max_connections` connections were open.
    Total,
    /// `server.max_connections_per_ip` were open from this address.
    PerIp,
}

impl Refused {
    /// The metric label and config key of the limit.
    pub fn key(self) -> &'static str {
        match self {
            Refused::Total => "max_connections",
            Refused::PerIp => "max_connections_per_ip",
        }
    }
}

impl ConnectionLimits {
    /// Limits of `max_total` connections, `max_per_ip` from one address.
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            open: Mutex::new(OpenCounts::default()),
        })
    }

    /// Takes a slot for a connection from `peer`, or says which limit is
    /// full; the refusal is counted. The slot frees when dropped.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refused> {
        // A poisoned lock only means a panic elsewhere; the counts in it
        // are still whole numbers.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let from_peer = open.by_peer.get(&peer).copied().unwrap_or(0);
        let refused = if open.total >= self.max_total {
            Some(Refused::Total)
        } else if from_peer >= self.max_per_ip {
            Some(Refused::PerIp)
        } else {
            None
        };
        if let Some(refused) = refused {
            metrics::counter!(CONNECTIONS_REJECTED, "reason" => refused.key()).increment(1);
            return Err(refused);
        }
        *open.by_peer.entry(peer).or_insert(0) += 1;
        open.total += 1;
        metrics::gauge!(CONNECTIONS_OPEN).set(open.total as f64);
        Ok(Slot {
            limits: Arc::clone(self),
            peer,
        })
    }

    fn release(&self, peer: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(count) = open.by_peer.get_mut(&peer) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            open.by_peer.remove(&peer);
        }
        open.total -= 1;
        metrics::gauge!(CONNECTIONS_OPEN).set(open.total as f64);
    }
}

/// One open connection's place in [`ConnectionLimits`]; dropping it
/// frees the place.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.release(self.peer);
    }
}

/// Whether a connection has a request in flight, and since when it has
/// had none, for the idle timeout; and whether its client still reads
/// what it is sent, for the write timeout.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `started` to the last time a request began or
    /// ended.
    last_change_ms: AtomicU64,
    /// Response bodies that handed out a frame the connection has not yet
    /// written: it asks for the next frame only once the last is out.
    unwritten: AtomicUsize,
    /// Milliseconds from `started` to the last time any response body was
    /// asked for a frame.
    last_write_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_change_ms: AtomicU64::new(0),
            unwritten: AtomicUsize::new(0),
            last_write_ms: AtomicU64::new(0),
        })
    }

    /// Whether a request is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0
    }

    /// Records that a response body was asked for its next frame, so the
    /// frame it gave before (`had_unwritten`) is written out.
    pub fn wrote(&self, had_unwritten: bool) {
        if had_unwritten {
            self.unwritten.fetch_sub(1, Ordering::SeqCst);
        }
        let now = self.started.elapsed().as_millis() as u64;
        self.last_write_ms.store(now, Ordering::SeqCst);
    }

    /// Records that a response body handed out a frame to write.
    pub fn handed_out(&self) {
        self.unwritten.fetch_add(1, Ordering::SeqCst);
    }

    /// Records that a body was dropped with its last frame handed out
    /// and not asked past.
    pub fn dropped_unwritten(&self) {
        self.unwritten.fetch_sub(1, Ordering::SeqCst);
    }

    /// Resolves once a frame has waited `timeout` to be written with no
    /// response body on the connection asked for another meanwhile: the
    /// client stopped reading. A body waiting on its upstream is not
    /// waiting to be written, so slow generation never counts.
    pub async fn stalled_for(&self, timeout: Duration) {
        loop {
            let wait = if self.unwritten.load(Ordering::SeqCst) == 0 {
                timeout
            } else {
                let last = self.last_write_ms.load(Ordering::SeqCst);
                let quiet = self
                    .started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last));
                if quiet >= timeout {
                    return;
                }
                timeout - quiet
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Marks a request in flight until the returned guard drops (when
    /// its response body has been sent, or abandoned).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        InFlight {
            activity: Arc::clone(self),
        }
    }

    fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_change_ms.store(now, Ordering::SeqCst);
    }

    /// Resolves once the connection has had no request in flight for
    /// `idle`. Checked on a timer: each wake-up sleeps until the earliest
    /// moment the connection could have become idle for long enough.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let wait = if self.in_flight.load(Ordering::SeqCst) > 0 {
                idle
            } else {
                let last = self.last_change_ms.load(Ordering::SeqCst);
                let quiet = self
                    .started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last));
                if quiet >= idle {
                    return;
                }
                idle - quiet
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A request in flight on a connection; see [`Activity::begin`].
#[derive(Debug)]
pub struct InFlight {
    activity: Arc<Activity>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.touch();
        self.activity.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_address_and_free_on_drop() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refused::PerIp);
        let _third = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Refused::Total);
        drop(first);
        assert!(limits.admit(a).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_requests_to_end() {
        let activity = Activity::new();
        let request = activity.begin();
        let idle = Duration::from_secs(5);
        let waited = tokio::time::timeout(Duration::from_secs(20), activity.idle_for(idle));
        assert!(waited.await.is_err(), "idle while a request was in flight");

        drop(request);
        let start = Instant::now();
        activity.idle_for(idle).await;
        assert_eq!(start.elapsed(), idle);
    }
}
