//! The retry budget: retries may add only a share to a pool's requests,
//! so that when every endpoint fails, retries do not multiply the load.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::window::Window;
use crate::config::RetryConfig;

/// The span the budget is counted over.
const BUDGET_SPAN: Duration = Duration::from_secs(10);

/// Requests and retries of one pool over the last 10 s.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    /// `total`: first tries and retries; `marked`: retries.
    window: Mutex<Window>,
    percent: u64,
    /// Retries allowed over the span whatever the percentage says.
    floor: u64,
}

impl RetryBudget {
    pub(crate) fn new(config: &RetryConfig) -> Self {
        let floor = u64::from(config.min_retries_per_s) * BUDGET_SPAN.as_secs();
        Self {
            window: Mutex::new(Window::new(BUDGET_SPAN, Instant::now())),
            percent: u64::from(config.budget_percent),
            floor,
        }
    }

    /// Counts a request's first try.
    pub(crate) fn record_request(&self, now: Instant) {
        if let Ok(mut window) = self.window.lock() {
            window.add(now, false);
        }
    }

    /// Takes one retry from the budget; false when it is spent.
    pub(crate) fn withdraw(&self, now: Instant) -> bool {
        let Ok(mut window) = self.window.lock() else {
            return false;
        };
        let counts = window.counts(now);
        let requests = counts.total - counts.marked;
        let allowed = (requests * self.percent / 100).max(self.floor);
        if counts.marked >= allowed {
            return false;
        }
        window.add(now, true);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(percent: u32, per_s: u32) -> RetryBudget {
        RetryBudget::new(&RetryConfig {
            max_retries: 2,
            budget_percent: percent,
            min_retries_per_s: per_s,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_add_at_most_the_percentage() {
        let budget = budget(20, 0);
        let now = Instant::now();
        for _ in 0..50 {
            budget.record_request(now);
        }
        let granted = (0..50).filter(|_| budget.withdraw(now)).count();
        assert_eq!(granted, 10, "20% of 50 requests");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_pool_keeps_its_floor() {
        let budget = budget(20, 1);
        let now = Instant::now();
        budget.record_request(now);
        let granted = (0..50).filter(|_| budget.withdraw(now)).count();
        assert_eq!(granted, 10, "1 retry a second over 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_as_retries_age() {
        let budget = budget(0, 0);
        assert!(!budget.withdraw(Instant::now()), "an empty budget refuses");

        let budget = self::budget(100, 0);
        let start = Instant::now();
        budget.record_request(start);
        assert!(budget.withdraw(start));
        assert!(!budget.withdraw(start), "one request pays for one retry");

        tokio::time::advance(BUDGET_SPAN + Duration::from_secs(1)).await;
        let now = Instant::now();
        budget.record_request(now);
        assert!(budget.withdraw(now), "the old retry no longer counts");
    }
}
