//! What the scheduler knows about an upstream lane: the cost of a batch,
//! fitted online as `time = a + b × items`, and how fast items arrive.
//!
//! Both are plain numbers updated by the scheduler task; nothing here
//! waits, sends or reads the clock by itself.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Batches the fit remembers; older ones are forgotten, so the model
/// follows an upstream whose speed changes.
const FIT_SAMPLES: usize = 64;

/// Time over which the arrival rate averages, in seconds.
const RATE_WINDOW_S: f64 = 0.5;

/// The cost of one upstream request of `items` items, `a + b × items`
/// seconds, refitted by least squares after every finished batch with
/// both coefficients kept non-negative. Until the first batch both are 0,
/// so nothing is predicted to take time.
#[derive(Debug, Clone)]
pub struct CostModel {
    samples: VecDeque<(f64, f64)>,
    /// Fixed cost of one upstream request, in seconds.
    a: f64,
    /// Cost of each item, in seconds.
    b: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            samples: VecDeque::with_capacity(FIT_SAMPLES),
            a: 0.0,
            b: 0.0,
        }
    }
}

impl CostModel {
    /// Adds one finished batch of `items` items that took `elapsed`.
    pub fn record(&mut self, items: usize, elapsed: Duration) {
        if self.samples.len() == FIT_SAMPLES {
            self.samples.pop_front();
        }
        self.samples
            .push_back((items.max(1) as f64, elapsed.as_secs_f64()));
        self.refit();
    }

    /// `(a, b)`: seconds per request and seconds per item.
    pub fn coefficients(&self) -> (f64, f64) {
        (self.a, self.b)
    }

    /// Predicted time of one upstream request of `items` items.
    pub fn predict(&self, items: usize) -> Duration {
        let seconds = self.a + self.b * items as f64;
        Duration::from_secs_f64(seconds.max(0.0))
    }

    /// The smallest batch that keeps up with `rate` items per second when
    /// batches run one after another: `n` such that `n / (a + b n)` is
    /// the rate, so `n = rate a / (1 - rate b)`. At least 1, at most
    /// `cap`, and `cap` when no batch size keeps up.
    pub fn keep_up_size(&self, rate: f64, cap: usize) -> usize {
        let load = rate * self.b;
        if load >= 1.0 {
            return cap;
        }
        let n = (rate * self.a / (1.0 - load)).ceil();
        (n.max(1.0) as usize).min(cap)
    }

    fn refit(&mut self) {
        let count = self.samples.len() as f64;
        let mean_x = self.samples.iter().map(|s| s.0).sum::<f64>() / count;
        let mean_t = self.samples.iter().map(|s| s.1).sum::<f64>() / count;
        let sxx: f64 = self.samples.iter().map(|s| (s.0 - mean_x).powi(2)).sum();
        let sxt: f64 = self
            .samples
            .iter()
            .map(|s| (s.0 - mean_x) * (s.1 - mean_t))
            .sum();

        // Batches all of one size cannot tell a from b: keep the slope
        // learned so far and let a absorb the rest.
        let mut b = if sxx > 1e-9 { sxt / sxx } else { self.b };
        let mut a = mean_t - b * mean_x;

        // The least-squares optimum with a coefficient clamped at 0 is
        // the fit of the other alone.
        if b < 0.0 {
            b = 0.0;
            a = mean_t;
        }
        if a < 0.0 {
            a = 0.0;
            let sx2: f64 = self.samples.iter().map(|s| s.0 * s.0).sum();
            let sx_t: f64 = self.samples.iter().map(|s| s.0 * s.1).sum();
            b = (sx_t / sx2).max(0.0);
        }
        self.a = a.max(0.0);
        self.b = b.max(0.0);
    }
}

/// Items arriving per second, averaged exponentially over about half a
/// second.
#[derive(Debug, Clone, Default)]
pub struct ArrivalRate {
    level: f64,
    last: Option<Instant>,
}

impl ArrivalRate {
    /// Counts `items` arriving at `now`.
    pub fn record(&mut self, now: Instant, items: usize) {
        self.level = self.decayed(now) + items as f64;
        self.last = Some(now);
    }

    /// Items per second at `now`.
    pub fn per_second(&self, now: Instant) -> f64 {
        self.decayed(now) / RATE_WINDOW_S
    }

    fn decayed(&self, now: Instant) -> f64 {
        let Some(last) = self.last else { return 0.0 };
        let age = now.saturating_duration_since(last).as_secs_f64();
        self.level * (-age / RATE_WINDOW_S).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: f64) -> Duration {
        Duration::from_secs_f64(value / 1000.0)
    }

    #[test]
    fn fit_recovers_a_linear_cost() {
        let mut model = CostModel::default();
        for items in [1, 4, 2, 8, 3, 16] {
            model.record(items, ms(20.0 + items as f64));
        }
        let (a, b) = model.coefficients();
        assert!((a - 0.020).abs() < 1e-6, "a = {a}");
        assert!((b - 0.001).abs() < 1e-6, "b = {b}");
        assert!((model.predict(10).as_secs_f64() - 0.030).abs() < 1e-6);
    }

    #[test]
    fn fit_keeps_coefficients_non_negative() {
        // Bigger batches faster: a negative slope is clamped to 0.
        let mut model = CostModel::default();
        for (items, t) in [(1, 30.0), (8, 20.0), (16, 10.0)] {
            model.record(items, ms(t));
        }
        let (a, b) = model.coefficients();
        assert_eq!(b, 0.0);
        assert!((a - 0.020).abs() < 1e-9, "a = {a}");

        // Steep through the origin: a negative intercept is clamped to 0.
        let mut model = CostModel::default();
        for (items, t) in [(1, 1.0), (2, 10.0), (3, 19.0)] {
            model.record(items, ms(t));
        }
        let (a, b) = model.coefficients();
        assert_eq!(a, 0.0);
        assert!(b > 0.0);
    }

    #[test]
    fn batches_of_one_size_are_all_fixed_cost() {
        let mut model = CostModel::default();
        for _ in 0..5 {
            model.record(1, ms(21.0));
        }
        let (a, b) = model.coefficients();
        assert!((a - 0.021).abs() < 1e-9);
        assert_eq!(b, 0.0);
    }

    #[test]
    fn keep_up_size_grows_with_the_rate() {
        let mut model = CostModel::default();
        for items in [1, 2, 4, 8] {
            model.record(items, ms(20.0 + items as f64));
        }
        // 50 items/s: n = 50 × 0.02 / (1 - 0.05) = 1.05, so 2.
        assert_eq!(model.keep_up_size(50.0, 32), 2);
        assert_eq!(model.keep_up_size(0.0, 32), 1);
        assert_eq!(model.keep_up_size(500.0, 32), 20);
        // 1000 items/s at 1 ms each: nothing keeps up.
        assert_eq!(model.keep_up_size(1000.0, 32), 32);
    }

    #[tokio::test(start_paused = true)]
    async fn arrival_rate_follows_and_decays() {
        let mut rate = ArrivalRate::default();
        let start = Instant::now();
        assert_eq!(rate.per_second(start), 0.0);
        for k in 0..200 {
            rate.record(start + ms(10.0 * k as f64), 1);
        }
        let end = start + ms(1990.0);
        let now = rate.per_second(end);
        assert!((now - 100.0).abs() < 10.0, "rate {now}");
        let later = rate.per_second(end + Duration::from_secs(5));
        assert!(later < 1.0, "rate {later}");
    }
}
