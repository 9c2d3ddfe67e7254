//! A pool's circuit breaker. Closed, it counts the pool's requests and
//! failures over a window; when the failed share passes
//! `failure_percent`, it opens and refuses every request for `open_ms`;
//! then, half-open, it lets `half_open_requests` through: if all succeed
//! it closes, and one failure opens it again.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::window::Window;
use crate::config::CircuitConfig;
use crate::metrics;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Closed,
    /// Refusing until the instant.
    Open(Instant),
    /// Trying the pool again: probes in flight and succeeded so far.
    HalfOpen {
        in_flight: u32,
        succeeded: u32,
    },
}

impl State {
    /// The value of the state gauge.
    fn gauge(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen { .. } => 1,
            Self::Open(_) => 2,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Circuit {
    pool: String,
    config: CircuitConfig,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// `total`: requests; `marked`: failed ones. Counted while closed.
    window: Window,
}

/// Leave to send one request. A half-open probe that is dropped without
/// an outcome (its client went away) frees its place.
#[derive(Debug)]
pub(crate) struct Admission<'a> {
    circuit: &'a Circuit,
    probe: bool,
    recorded: bool,
}

impl Circuit {
    pub(crate) fn new(pool: &str, config: &CircuitConfig) -> Self {
        let window = Window::new(Duration::from_millis(config.window_ms), Instant::now());
        metrics::record_circuit_state(pool, 0);
        Self {
            pool: pool.to_string(),
            config: config.clone(),
            inner: Mutex::new(Inner {
                state: State::Closed,
                window,
            }),
        }
    }

    /// Lets a request through, or says how long until the breaker will
    /// try the pool again.
    pub(crate) fn admit(&self, now: Instant) -> Result<Admission<'_>, Duration> {
        let admitted = |probe| Admission {
            circuit: self,
            probe,
            recorded: false,
        };
        if self.config.failure_percent == 0 {
            return Ok(admitted(false));
        }
        let Ok(mut inner) = self.inner.lock() else {
            return Ok(admitted(false));
        };
        if let State::Open(until) = inner.state {
            if now < until {
                return Err(until - now);
            }
            self.enter(
                &mut inner,
                State::HalfOpen {
                    in_flight: 0,
                    succeeded: 0,
                },
                "open_ms is over; letting probes through",
            );
        }
        match &mut inner.state {
            State::Closed => Ok(admitted(false)),
            State::HalfOpen {
                in_flight,
                succeeded,
            } => {
                if *in_flight + *succeeded >= self.config.half_open_requests {
                    // The probes decide; until they do, wait a little.
                    return Err(Duration::from_millis(self.config.open_ms.min(1000)));
                }
                *in_flight += 1;
                Ok(admitted(true))
            }
            State::Open(_) => Err(Duration::from_millis(self.config.open_ms)),
        }
    }

    /// The breaker's state now, for tests and logs.
    #[cfg(test)]
    pub(crate) fn state(&self) -> State {
        self.inner
            .lock()
            .map(|inner| inner.state)
            .unwrap_or(State::Closed)
    }

    fn record(&self, probe: bool, ok: bool, now: Instant) {
        // A 0 percent breaker is off: it never opens, so it never logs or
        // publishes an open state either.
        if self.config.failure_percent == 0 {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        match inner.state {
            State::Closed => {
                inner.window.add(now, !ok);
                let counts = inner.window.counts(now);
                let percent = u64::from(self.config.failure_percent);
                let tripped = counts.total >= self.config.min_requests
                    && counts.marked * 100 >= percent * counts.total;
                if tripped {
                    let until = now + Duration::from_millis(self.config.open_ms);
                    let reason = format!(
                        "{} of the last {} requests failed",
                        counts.marked, counts.total
                    );
                    self.enter(&mut inner, State::Open(until), &reason);
                }
            }
            State::HalfOpen {
                in_flight,
                succeeded,
            } if probe => {
                if !ok {
                    let until = now + Duration::from_millis(self.config.open_ms);
                    self.enter(&mut inner, State::Open(until), "a probe failed");
                    return;
                }
                let succeeded = succeeded + 1;
                if succeeded >= self.config.half_open_requests {
                    inner.window.clear();
                    self.enter(&mut inner, State::Closed, "every probe succeeded");
                    return;
                }
                inner.state = State::HalfOpen {
                    in_flight: in_flight.saturating_sub(1),
                    succeeded,
                };
            }
            // An answer to a request let through before the breaker
            // opened says nothing about the pool now.
            State::HalfOpen { .. } | State::Open(_) => {}
        }
    }

    /// A probe ended without an outcome: its place is free again.
    fn release(&self) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if let State::HalfOpen { in_flight, .. } = &mut inner.state {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    fn enter(&self, inner: &mut Inner, state: State, reason: &str) {
        inner.state = state;
        metrics::record_circuit_state(&self.pool, state.gauge());
        match state {
            State::Open(_) => tracing::warn!(
                pool = %self.pool,
                reason,
                open_ms = self.config.open_ms,
                "circuit breaker opened; the pool's requests get 503"
            ),
            State::HalfOpen { .. } => tracing::info!(
                pool = %self.pool,
                reason,
                "circuit breaker half-open"
            ),
            State::Closed => tracing::info!(
                pool = %self.pool,
                reason,
                "circuit breaker closed"
            ),
        }
    }
}

impl Admission<'_> {
    /// Reports how the request went: `ok` is false for a connection
    /// failure, a timeout or a 5xx answer.
    pub(crate) fn finish(mut self, ok: bool) {
        self.recorded = true;
        self.circuit.record(self.probe, ok, Instant::now());
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.circuit.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit() -> Circuit {
        Circuit::new(
            "p",
            &CircuitConfig {
                failure_percent: 50,
                min_requests: 4,
                window_ms: 10_000,
                open_ms: 1_000,
                half_open_requests: 2,
            },
        )
    }

    fn send(circuit: &Circuit, ok: bool) {
        let admission = circuit.admit(Instant::now()).expect("admitted");
        admission.finish(ok);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_when_half_the_requests_fail() {
        let circuit = circuit();
        send(&circuit, true);
        send(&circuit, false);
        send(&circuit, true);
        assert_eq!(circuit.state(), State::Closed, "too few requests yet");
        send(&circuit, false);
        assert!(matches!(circuit.state(), State::Open(_)));

        let wait = circuit.admit(Instant::now()).expect_err("open refuses");
        assert_eq!(wait, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn closes_after_the_probes_succeed() {
        let circuit = circuit();
        for _ in 0..4 {
            send(&circuit, false);
        }
        tokio::time::advance(Duration::from_millis(1_001)).await;

        // Two probes go; a third waits for their outcome.
        let first = circuit.admit(Instant::now()).expect("probe 1");
        let second = circuit.admit(Instant::now()).expect("probe 2");
        assert!(circuit.admit(Instant::now()).is_err());
        first.finish(true);
        assert!(matches!(circuit.state(), State::HalfOpen { .. }));
        second.finish(true);
        assert_eq!(circuit.state(), State::Closed);

        // The failures from before are forgotten.
        send(&circuit, false);
        assert_eq!(circuit.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again() {
        let circuit = circuit();
        for _ in 0..4 {
            send(&circuit, false);
        }
        tokio::time::advance(Duration::from_millis(1_001)).await;
        send(&circuit, false);
        assert!(matches!(circuit.state(), State::Open(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_percent_breaker_never_opens() {
        let circuit = Circuit::new(
            "p",
            &CircuitConfig {
                failure_percent: 0,
                min_requests: 1,
                window_ms: 10_000,
                open_ms: 1_000,
                half_open_requests: 2,
            },
        );
        for _ in 0..4 {
            send(&circuit, true);
            send(&circuit, false);
        }
        assert_eq!(circuit.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_its_place() {
        let circuit = circuit();
        for _ in 0..4 {
            send(&circuit, false);
        }
        tokio::time::advance(Duration::from_millis(1_001)).await;
        let first = circuit.admit(Instant::now()).expect("probe 1");
        let _second = circuit.admit(Instant::now()).expect("probe 2");
        drop(first);
        assert!(circuit.admit(Instant::now()).is_ok(), "the place is free");
    }
}
