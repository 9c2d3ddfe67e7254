//! Choosing the next token from a row of logits: greedy, or temperature with
//! nucleus (top-p) filtering and a seeded generator; and the log-probabilities
//! reported back to callers.
//!
//! Log-probabilities are always those of the model's own distribution (the
//! log-softmax of the raw logits), whatever the sampling settings: a policy
//! reads them as the model's confidence, which temperature must not change.

/// How one sequence picks its tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy). Default 1.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probabilities add up
    /// to at least this; 1 keeps all. Default 1.
    pub top_p: f32,
    /// Seed of the sequence's random generator; `None` draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
        }
    }
}

/// One alternative token and its log-probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// A sequence's sampler: its settings and its random state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(fresh_seed);
        Sampler {
            params,
            rng: SplitMix64(seed),
        }
    }

    /// Whether this sampler always picks the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// Picks a token from `logits` (one per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }

        // Probabilities at the requested temperature, then the nucleus: the
        // most likely tokens, best first, until their mass reaches top_p.
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(id, &l)| (id as u32, ((l - max) * inv_t).exp()))
            .collect();
        let total: f32 = probs.iter().map(|&(_, p)| p).sum();
        if self.params.top_p >= 1.0 {
            // Every token stays: draw in id order, with no sorting (which
            // would cost milliseconds over a whole vocabulary).
            return draw(&probs, self.rng.next_f32() * total).unwrap_or_else(|| argmax(logits));
        }
        let keep = nucleus(&mut probs, self.params.top_p * total);
        let kept = &probs[..keep];

        // Draw within the kept mass.
        let mass: f32 = kept.iter().map(|&(_, p)| p).sum();
        draw(kept, self.rng.next_f32() * mass).unwrap_or_else(|| argmax(logits))
    }
}

/// The entry of `probs` whose share of the running sum holds `target`
/// (in `[0, sum)`); the last entry when rounding leaves `target` past the
/// end, `None` when there are none.
fn draw(probs: &[(u32, f32)], mut target: f32) -> Option<u32> {
    for &(id, p) in probs {
        if target < p {
            return Some(id);
        }
        target -= p;
    }
    probs.last().map(|&(id, _)| id)
}

/// Moves the smallest set of largest entries whose sum reaches `mass` to
/// the front of `probs`, sorted best first, and returns its length.
///
/// Sorting the whole vocabulary for every token would cost milliseconds, so
/// this sorts a small head first and widens it only when the head's mass
/// falls short.
fn nucleus(probs: &mut [(u32, f32)], mass: f32) -> usize {
    let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    let mut head = 64.min(probs.len());
    loop {
        if head < probs.len() {
            probs.select_nth_unstable_by(head, by_prob);
        }
        probs[..head].sort_unstable_by(by_prob);
        let mut sum = 0.0;
        for (i, &(_, p)) in probs[..head].iter().enumerate() {
            sum += p;
            if sum >= mass {
                return i + 1;
            }
        }
        if head == probs.len() {
            return head;
        }
        head = (head * 8).min(probs.len());
    }
}

/// Index of the largest logit; the lowest index wins a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The log-softmax normaliser of `logits`: `logprob(i) = logits[i] - lse`.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` most likely tokens, best first, with their log-probabilities.
pub fn top_logprobs(logits: &[f32], lse: f32, k: usize) -> Vec<TokenLogprob> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k < ids.len() {
        ids.select_nth_unstable_by(k - 1, by_logit);
    }
    ids.truncate(k);
    ids.sort_unstable_by(by_logit);
    ids.into_iter()
        .map(|id| TokenLogprob {
            id,
            logprob: logits[id as usize] - lse,
        })
        .collect()
}

/// A seed that differs between calls and between processes.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    SplitMix64(nanos ^ count.rotate_left(32) ^ u64::from(std::process::id())).next_u64()
}

/// Steele, Lea and Flood's SplitMix64: small, fast, and good enough to draw
/// tokens; the same seed gives the same sequence on every platform.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            seed: Some(seed),
        }
    }

    #[test]
    fn zero_temperature_is_argmax() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(params(0.0, 1.0, 1));
        assert_eq!(s.sample(&logits), 1);
    }

    #[test]
    fn same_seed_draws_same_tokens() {
        let logits: Vec<f32> = (0..1000).map(|i| (i % 17) as f32 * 0.1).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0.9, seed));
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_never_draws_outside_the_nucleus() {
        // Two tokens hold 0.94 of the mass, the first 0.59: with top_p 0.8
        // both are needed and nothing else qualifies.
        let mut logits = vec![0.0f32; 300];
        logits[5] = 8.0;
        logits[9] = 7.5;
        let mut s = Sampler::new(params(1.0, 0.8, 3));
        for _ in 0..500 {
            let t = s.sample(&logits);
            assert!(t == 5 || t == 9, "drew {t}");
        }
    }

    #[test]
    fn nucleus_widens_past_its_first_head() {
        // A flat distribution: 90% of the mass needs 900 of 1000 tokens.
        let mut probs: Vec<(u32, f32)> = (0..1000).map(|i| (i, 1.0)).collect();
        assert_eq!(nucleus(&mut probs, 900.0), 900);
    }

    #[test]
    fn draws_follow_the_distribution() {
        // p = softmax([ln 3, 0]) = [0.75, 0.25].
        // Both draws: over the whole vocabulary (top_p 1) and over a
        // nucleus that keeps both tokens.
        let logits = [3.0f32.ln(), 0.0];
        for top_p in [1.0, 0.999] {
            let mut s = Sampler::new(params(1.0, top_p, 11));
            let n = 20_000;
            let zeros = (0..n).filter(|_| s.sample(&logits) == 0).count();
            let share = zeros as f64 / n as f64;
            assert!((share - 0.75).abs() < 0.02, "top_p {top_p}: share {share}");
        }
    }

    #[test]
    fn top_logprobs_are_sorted_and_normalised() {
        let logits = [1.0, 4.0, 2.0, 3.0];
        let lse = log_sum_exp(&logits);
        let top = top_logprobs(&logits, lse, 3);
        let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
        assert_eq!(ids, [1, 3, 2]);
        let total: f32 = logits.iter().map(|l| (l - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!((top[0].logprob - (4.0 - lse)).abs() < 1e-6);
    }
}
