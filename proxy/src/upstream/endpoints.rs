//! Which of a pool's endpoints may be chosen: passive outlier ejection
//! (failures in a row eject an endpoint for a while, then one request is
//! its recovery probe) and the verdicts of the active health checks.
//!
//! Choosing in turn, and what a failure is, are the pool's business; this
//! module keeps each endpoint's record and logs its transitions.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::UpstreamEndpoint;
use crate::config::{HealthConfig, OutlierConfig};
use crate::metrics;

/// The endpoints of one pool and their records.
#[derive(Debug)]
pub(crate) struct Endpoints {
    pool: String,
    list: Vec<UpstreamEndpoint>,
    records: Mutex<Vec<Record>>,
    outlier: OutlierConfig,
    /// How long a recovery probe holds the endpoint's single probe place:
    /// the pool's try timeout, after which the probe is presumed lost.
    probe_timeout: Duration,
}

/// One endpoint's recent history.
#[derive(Debug, Default, Clone)]
struct Record {
    /// Failed requests in a row.
    failures: u32,
    /// Ejected until then; a request after it is the recovery probe.
    ejected_until: Option<Instant>,
    /// Ejections in a row without `max_ejection_ms` of calm between them.
    ejections: u32,
    last_ejected: Option<Instant>,
    /// A recovery probe is in flight until then.
    probe_until: Option<Instant>,
    /// The health checks say the endpoint is down.
    down: bool,
    /// Health checks passed, and failed, in a row.
    passes: u32,
    fails: u32,
}

impl Record {
    fn healthy(&self) -> bool {
        !self.down && self.ejected_until.is_none()
    }
}

/// An endpoint chosen for one try.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Choice {
    pub(crate) index: usize,
    /// The try is the endpoint's recovery probe after an ejection.
    pub(crate) probe: bool,
}

impl Endpoints {
    pub(crate) fn new(
        pool: &str,
        list: Vec<UpstreamEndpoint>,
        outlier: OutlierConfig,
        probe_timeout: Duration,
    ) -> Self {
        for endpoint in &list {
            metrics::record_endpoint_healthy(pool, &endpoint.to_string(), true);
        }
        let records = Mutex::new(vec![Record::default(); list.len()]);
        Self {
            pool: pool.to_string(),
            list,
            records,
            outlier,
            probe_timeout,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    pub(crate) fn get(&self, index: usize) -> &UpstreamEndpoint {
        &self.list[index % self.list.len()]
    }

    /// The next endpoint from `first` on, in turn, that this request has
    /// not `tried`: a healthy one, else one whose ejection is over (as its
    /// recovery probe). When every untried endpoint is ejected or down,
    /// the next untried one anyway: a pool never refuses for want of a
    /// healthy endpoint (its circuit breaker is what answers fast).
    pub(crate) fn choose(&self, first: usize, tried: &[usize], now: Instant) -> Option<Choice> {
        let n = self.list.len();
        let mut untried = (0..n)
            .map(|k| (first + k) % n)
            .filter(|index| !tried.contains(index));
        let Ok(mut records) = self.records.lock() else {
            return untried.next().map(|index| Choice {
                index,
                probe: false,
            });
        };
        let mut fallback = None;
        for index in untried {
            let record = &mut records[index];
            fallback.get_or_insert(index);
            if record.down {
                continue;
            }
            match record.ejected_until {
                None => {
                    return Some(Choice {
                        index,
                        probe: false,
                    })
                }
                Some(until) if until <= now && record.probe_until.is_none_or(|p| p <= now) => {
                    record.probe_until = Some(now + self.probe_timeout);
                    return Some(Choice { index, probe: true });
                }
                Some(_) => {}
            }
        }
        fallback.map(|index| Choice {
            index,
            probe: false,
        })
    }

    /// Records a try's outcome: `ok` is false for a connection failure,
    /// a timeout or a 5xx answer.
    pub(crate) fn record(&self, index: usize, ok: bool, now: Instant) {
        let Ok(mut records) = self.records.lock() else {
            return;
        };
        let endpoint = self.get(index).to_string();
        let record = &mut records[index];
        if ok {
            record.failures = 0;
            record.probe_until = None;
            if record.ejected_until.take().is_some() {
                tracing::info!(
                    pool = %self.pool,
                    upstream = %endpoint,
                    reason = "a request succeeded",
                    "upstream endpoint returned after ejection"
                );
                metrics::record_endpoint_healthy(&self.pool, &endpoint, record.healthy());
            }
            return;
        }

        record.failures = record.failures.saturating_add(1);
        let threshold = self.outlier.consecutive_failures;
        let probe_failed = record.probe_until.take().is_some();
        let tripped = threshold > 0 && record.failures >= threshold;
        if probe_failed || (tripped && record.ejected_until.is_none()) {
            self.eject(record, &endpoint, now, probe_failed);
        }
    }

    /// Records an active health check's result.
    pub(crate) fn record_check(&self, index: usize, passed: bool, health: &HealthConfig) {
        let Ok(mut records) = self.records.lock() else {
            return;
        };
        let endpoint = self.get(index).to_string();
        let record = &mut records[index];
        if passed {
            record.passes = record.passes.saturating_add(1);
            record.fails = 0;
        } else {
            record.fails = record.fails.saturating_add(1);
            record.passes = 0;
        }

        let was_healthy = record.healthy();
        if record.down && record.passes >= health.healthy_threshold {
            record.down = false;
            tracing::info!(
                pool = %self.pool,
                upstream = %endpoint,
                passes = record.passes,
                "upstream endpoint passes its health checks; marked up"
            );
        } else if !record.down && record.fails >= health.unhealthy_threshold {
            record.down = true;
            tracing::warn!(
                pool = %self.pool,
                upstream = %endpoint,
                failures = record.fails,
                path = %health.path,
                "upstream endpoint fails its health checks; marked down"
            );
        }
        // A passed check after an ejection's end serves as the probe.
        let ejection_over = record.ejected_until.is_some_and(|t| t <= Instant::now());
        if passed && ejection_over {
            record.ejected_until = None;
            record.failures = 0;
            tracing::info!(
                pool = %self.pool,
                upstream = %endpoint,
                reason = "a health check passed",
                "upstream endpoint returned after ejection"
            );
        }
        if record.healthy() != was_healthy {
            metrics::record_endpoint_healthy(&self.pool, &endpoint, record.healthy());
        }
    }

    fn eject(&self, record: &mut Record, endpoint: &str, now: Instant, probe_failed: bool) {
        // Ejections close together last longer each time.
        let max = Duration::from_millis(self.outlier.max_ejection_ms);
        if record
            .last_ejected
            .is_some_and(|at| now.duration_since(at) > max * 2)
        {
            record.ejections = 0;
        }
        let doubling = 2u32.saturating_pow(record.ejections.min(16));
        let base = Duration::from_millis(self.outlier.ejection_ms);
        let length = base.saturating_mul(doubling).min(max);
        record.ejections = record.ejections.saturating_add(1);
        record.last_ejected = Some(now);
        record.ejected_until = Some(now + length);

        let reason = if probe_failed {
            "its recovery probe failed".to_string()
        } else {
            format!("{} failures in a row", record.failures)
        };
        tracing::warn!(
            pool = %self.pool,
            upstream = %endpoint,
            reason,
            ejection_ms = length.as_millis() as u64,
            "upstream endpoint ejected"
        );
        metrics::record_ejection(&self.pool, endpoint);
        metrics::record_endpoint_healthy(&self.pool, endpoint, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Endpoints {
        let list = (0..n)
            .map(|i| super::super::parse_endpoint(&format!("http://127.0.0.1:{}", 9000 + i)))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_default();
        let outlier = OutlierConfig {
            consecutive_failures: 2,
            ejection_ms: 1_000,
            max_ejection_ms: 4_000,
        };
        Endpoints::new("p", list, outlier, Duration::from_secs(1))
    }

    fn chosen(endpoints: &Endpoints, first: usize) -> Option<(usize, bool)> {
        endpoints
            .choose(first, &[], Instant::now())
            .map(|c| (c.index, c.probe))
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_eject_until_a_probe_succeeds() {
        let endpoints = endpoints(2);
        let now = Instant::now();
        endpoints.record(0, false, now);
        assert_eq!(chosen(&endpoints, 0), Some((0, false)), "one failure");
        endpoints.record(0, false, now);
        assert_eq!(chosen(&endpoints, 0), Some((1, false)), "ejected");

        // After the ejection, one request probes; others pass it by.
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert_eq!(chosen(&endpoints, 0), Some((0, true)));
        assert_eq!(chosen(&endpoints, 0), Some((1, false)));
        endpoints.record(0, true, Instant::now());
        assert_eq!(chosen(&endpoints, 0), Some((0, false)), "returned");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_ejects_for_longer() {
        let endpoints = endpoints(2);
        endpoints.record(0, false, Instant::now());
        endpoints.record(0, false, Instant::now());
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert_eq!(chosen(&endpoints, 0), Some((0, true)));
        endpoints.record(0, false, Instant::now());

        // The second ejection lasts 2 s.
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(chosen(&endpoints, 0), Some((1, false)));
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(chosen(&endpoints, 0), Some((0, true)));
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_endpoint_out_the_pool_tries_anyway() {
        let endpoints = endpoints(2);
        for index in 0..2 {
            endpoints.record(index, false, Instant::now());
            endpoints.record(index, false, Instant::now());
        }
        assert_eq!(chosen(&endpoints, 1), Some((1, false)));
        let tried = endpoints.choose(0, &[0, 1], Instant::now());
        assert!(tried.is_none(), "no endpoint is tried twice");
    }

    #[tokio::test(start_paused = true)]
    async fn health_checks_mark_down_and_up() {
        let endpoints = endpoints(2);
        let health = HealthConfig {
            path: "/v1/models".to_string(),
            interval_ms: 100,
            timeout_ms: 100,
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        };
        endpoints.record_check(0, false, &health);
        assert_eq!(chosen(&endpoints, 0), Some((0, false)));
        endpoints.record_check(0, false, &health);
        assert_eq!(chosen(&endpoints, 0), Some((1, false)), "down");
        endpoints.record_check(0, true, &health);
        assert_eq!(chosen(&endpoints, 0), Some((1, false)), "one pass");
        endpoints.record_check(0, true, &health);
        assert_eq!(chosen(&endpoints, 0), Some((0, false)), "up");
    }
}
