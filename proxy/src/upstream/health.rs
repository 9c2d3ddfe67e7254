//! Active health checks: a GET to each endpoint of a pool every
//! `health.interval_ms`, whose verdicts `endpoints` turns into marking an
//! endpoint down and up.

use std::sync::Weak;
use std::time::Duration;

use tokio::task::JoinSet;

use super::Pool;
use crate::config::HealthConfig;

/// Checks the pool's endpoints, side by side, every interval, until the
/// pool is dropped. The first round runs one interval after start-up, so
/// that a pool is not marked down before its servers had a chance.
pub(super) async fn run(pool: Weak<Pool>, health: HealthConfig) {
    let interval = Duration::from_millis(health.interval_ms);
    let first = tokio::time::Instant::now() + interval;
    let mut tick = tokio::time::interval_at(first, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };

        // Each check is bounded by health.timeout_ms, so a round is too.
        let mut checks = JoinSet::new();
        for index in 0..pool.endpoints.len() {
            let pool = pool.clone();
            let health = health.clone();
            checks.spawn(async move { (index, pool.check(index, &health).await) });
        }
        while let Some(done) = checks.join_next().await {
            if let Ok((index, passed)) = done {
                pool.endpoints.record_check(index, passed, &health);
            }
        }
    }
}
