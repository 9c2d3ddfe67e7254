//! The cost ledger: what every answer cost at its pool's price, what the
//! baseline pool would have charged for the same tokens, and the
//! cascade's escalation rate; served at `/admin/costs` and as metrics.
//!
//! Owns prices, totals and the body wrapper that reads an answer's token
//! usage as it passes. It never changes a body and decides no route.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use serde_json::{json, Value};

use crate::body::{Body, BoxError};
use crate::config::{Config, PriceConfig};
use crate::metrics;

/// Most bytes of a JSON answer kept to read its usage; past it the answer
/// is charged by what was counted (nothing, for JSON).
const MAX_SNIFF_BYTES: usize = 8 << 20;
const PER_MTOK: f64 = 1_000_000.0;
const SECONDS_PER_HOUR: f64 = 3600.0;

/// A pool's price.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Price {
    /// Dollars per million prompt and per million completion tokens.
    PerMtok { input: f64, output: f64 },
    /// Dollars per hour of the pool's hardware, spread over the completion
    /// tokens it generates at its measured throughput.
    // Limitation: prompt tokens of a gpu_hour pool cost nothing; their
    // prefill time is counted only through the throughput measurement.
    GpuHour { usd: f64 },
}

impl Price {
    pub fn from_config(config: &PriceConfig) -> Self {
        match config.gpu_hour {
            Some(usd) => Price::GpuHour { usd },
            None => Price::PerMtok {
                input: config.input_per_mtok.unwrap_or(0.0),
                output: config.output_per_mtok.unwrap_or(0.0),
            },
        }
    }
}

/// Tokens of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

/// Totals of one pool.
#[derive(Debug, Default)]
struct PoolTotals {
    answers: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
    /// Requests in flight now, and since when the pool has been busy.
    in_flight: u32,
    busy_since: Option<Instant>,
    /// Time with at least one request in flight.
    busy: Duration,
}

impl PoolTotals {
    /// Completion tokens per second of busy time; `None` before any.
    fn tokens_per_second(&self) -> Option<f64> {
        let busy = self.busy.as_secs_f64();
        (self.completion_tokens > 0 && busy > 0.0).then(|| self.completion_tokens as f64 / busy)
    }
}

#[derive(Debug, Default)]
struct Totals {
    pools: BTreeMap<String, PoolTotals>,
    cost_usd: f64,
    baseline_usd: f64,
    served: u64,
    cascaded: u64,
    escalated: u64,
}

/// The pools' prices and the baseline pool, from one configuration.
#[derive(Debug, Default)]
struct Pricing {
    prices: HashMap<String, Price>,
    baseline: Option<String>,
}

impl Pricing {
    fn new(config: &Config) -> Self {
        let prices = config
            .pool
            .iter()
            .filter_map(|p| Some((p.name.clone(), Price::from_config(p.price.as_ref()?))))
            .collect();
        Pricing {
            prices,
            baseline: config.costs.baseline.clone(),
        }
    }
}

/// Prices and running totals, shared by every request. A configuration
/// reload keeps the ledger, and so its totals, and changes its prices.
#[derive(Debug)]
pub struct Ledger {
    pricing: RwLock<Pricing>,
    totals: Mutex<Totals>,
}

impl Ledger {
    /// The ledger of a validated configuration.
    pub fn new(config: &Config) -> Self {
        Ledger {
            pricing: RwLock::new(Pricing::new(config)),
            totals: Mutex::default(),
        }
    }

    /// Takes the prices and baseline of a reloaded configuration; answers
    /// charged from now on pay them, totals so far stay.
    pub fn reprice(&self, config: &Config) {
        *self.pricing.write().unwrap_or_else(PoisonError::into_inner) = Pricing::new(config);
    }

    fn pricing(&self) -> std::sync::RwLockReadGuard<'_, Pricing> {
        self.pricing.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn totals(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.totals.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks a request in flight on `pool` until the guard is dropped, for
    /// the busy time that measures a pool's throughput.
    pub fn begin(self: &Arc<Self>, pool: &str) -> InFlight {
        let mut totals = self.totals();
        let entry = totals.pools.entry(pool.to_string()).or_default();
        if entry.in_flight == 0 {
            entry.busy_since = Some(Instant::now());
        }
        entry.in_flight += 1;
        InFlight {
            ledger: Arc::clone(self),
            pool: pool.to_string(),
        }
    }

    fn end(&self, pool: &str) {
        let mut totals = self.totals();
        let Some(entry) = totals.pools.get_mut(pool) else {
            return;
        };
        entry.in_flight = entry.in_flight.saturating_sub(1);
        if entry.in_flight == 0 {
            if let Some(since) = entry.busy_since.take() {
                entry.busy += since.elapsed();
            }
        }
    }

    /// Charges `usage` on `pool`. When `served`, this answer is the one the
    /// client got, and the baseline pool's price for it is counted too.
    /// Returns the charge in dollars.
    pub fn charge(&self, pool: &str, usage: Usage, served: bool) -> f64 {
        let price = self.pricing().prices.get(pool).copied();
        let mut totals = self.totals();
        let entry = totals.pools.entry(pool.to_string()).or_default();
        entry.answers += 1;
        entry.prompt_tokens += usage.prompt;
        entry.completion_tokens += usage.completion;
        let cost = match price {
            Some(price) => cost_of(price, usage, entry.tokens_per_second()),
            None => 0.0,
        };
        entry.cost_usd += cost;
        let pool_total = entry.cost_usd;
        totals.cost_usd += cost;
        drop(totals);

        metrics::record_cost(pool, pool_total);
        if served {
            self.serve(pool, usage);
        }
        cost
    }

    /// Counts an answer `pool` gave the client, and what the baseline pool
    /// would have charged for its `usage`. Returns that baseline charge
    /// (0 without a baseline).
    pub fn serve(&self, pool: &str, usage: Usage) -> f64 {
        let (base, price) = {
            let pricing = self.pricing();
            let base = pricing.baseline.clone();
            let price = base.as_ref().and_then(|b| pricing.prices.get(b).copied());
            (base, price)
        };
        let mut totals = self.totals();
        totals.served += 1;
        let Some(base) = base else {
            return 0.0;
        };
        let throughput = totals
            .pools
            .get(&base)
            .and_then(PoolTotals::tokens_per_second);
        let baseline = price.map_or(0.0, |price| cost_of(price, usage, throughput));
        totals.baseline_usd += baseline;
        drop(totals);
        metrics::record_baseline_cost(pool, baseline);
        baseline
    }

    /// Whether a baseline pool is configured.
    pub fn has_baseline(&self) -> bool {
        self.pricing().baseline.is_some()
    }

    /// Counts a cascaded request and whether it escalated.
    pub fn cascade(&self, escalated: bool) {
        let mut totals = self.totals();
        totals.cascaded += 1;
        if escalated {
            totals.escalated += 1;
        }
    }

    /// The `/admin/costs` document.
    pub fn report(&self) -> Value {
        let baseline = self.pricing().baseline.clone();
        let totals = self.totals();
        let pools: serde_json::Map<String, Value> = totals
            .pools
            .iter()
            .map(|(name, p)| {
                let doc = json!({
                    "answers": p.answers,
                    "prompt_tokens": p.prompt_tokens,
                    "completion_tokens": p.completion_tokens,
                    "cost_usd": p.cost_usd,
                    "tokens_per_second": p.tokens_per_second(),
                });
                (name.clone(), doc)
            })
            .collect();
        let savings = totals.baseline_usd - totals.cost_usd;
        let share = |part: f64, whole: f64| (whole > 0.0).then(|| part / whole);
        json!({
            "currency": "USD",
            "cost_usd": totals.cost_usd,
            "baseline_pool": baseline,
            "baseline_cost_usd": totals.baseline_usd,
            "savings_usd": savings,
            "savings_share": share(savings, totals.baseline_usd),
            "answers_served": totals.served,
            "cascaded": totals.cascaded,
            "escalated": totals.escalated,
            "escalation_rate": share(totals.escalated as f64, totals.cascaded as f64),
            "pools": pools,
        })
    }
}

/// Dollars for `usage` at `price`; a gpu_hour pool with no measured
/// throughput yet costs nothing.
fn cost_of(price: Price, usage: Usage, tokens_per_second: Option<f64>) -> f64 {
    match price {
        Price::PerMtok { input, output } => {
            (usage.prompt as f64 * input + usage.completion as f64 * output) / PER_MTOK
        }
        Price::GpuHour { usd } => match tokens_per_second {
            Some(rate) if rate > 0.0 => usage.completion as f64 * usd / SECONDS_PER_HOUR / rate,
            _ => 0.0,
        },
    }
}

/// A request in flight on a pool; dropping it ends the busy interval.
#[derive(Debug)]
pub struct InFlight {
    ledger: Arc<Ledger>,
    pool: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ledger.end(&self.pool);
    }
}

/// Reads token usage from an answer as it passes: a JSON answer's
/// `usage`, or a stream's usage chunk, else its text chunks counted as
/// one token each.
#[derive(Debug, Default)]
pub struct UsageReader {
    json: Vec<u8>,
    overflow: bool,
    stream: bool,
    pending: Vec<u8>,
    reported: Option<Usage>,
    chunks: u64,
}

impl UsageReader {
    pub fn new(stream: bool) -> Self {
        UsageReader {
            stream,
            ..UsageReader::default()
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        if !self.stream {
            if self.json.len() + data.len() > MAX_SNIFF_BYTES {
                self.overflow = true;
            } else {
                self.json.extend_from_slice(data);
            }
            return;
        }
        self.pending.extend_from_slice(data);
        while let Some(end) = find(&self.pending, b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            self.event(&event);
        }
    }

    fn event(&mut self, event: &[u8]) {
        let text = String::from_utf8_lossy(event);
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let Ok(chunk) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            if let Some(usage) = usage_of(&chunk) {
                self.reported = Some(usage);
            }
            let texts = chunk["choices"].as_array().map_or(0, |choices| {
                choices
                    .iter()
                    .filter(|c| {
                        let piece = c
                            .pointer("/delta/content")
                            .or_else(|| c.get("text"))
                            .and_then(Value::as_str);
                        piece.is_some_and(|p| !p.is_empty())
                    })
                    .count()
            });
            self.chunks += texts as u64;
        }
    }

    /// The usage read so far.
    pub fn usage(&self) -> Usage {
        if let Some(usage) = self.reported {
            return usage;
        }
        if !self.stream && !self.overflow {
            if let Ok(value) = serde_json::from_slice::<Value>(&self.json) {
                if let Some(usage) = usage_of(&value) {
                    return usage;
                }
            }
        }
        Usage {
            prompt: 0,
            completion: self.chunks,
        }
    }
}

/// The `usage` object of an answer or chunk.
pub fn usage_of(value: &Value) -> Option<Usage> {
    let usage = value.get("usage")?;
    Some(Usage {
        prompt: usage.get("prompt_tokens")?.as_u64()?,
        completion: usage
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An answer body that charges its usage to the ledger when it ends (or
/// is dropped, as when the client leaves).
pub struct MeteredBody {
    inner: Body,
    reader: UsageReader,
    ledger: Arc<Ledger>,
    pool: String,
    served: bool,
    charged: bool,
    _in_flight: InFlight,
}

impl std::fmt::Debug for MeteredBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl MeteredBody {
    pub fn new(inner: Body, stream: bool, served: bool, in_flight: InFlight) -> Self {
        MeteredBody {
            inner,
            reader: UsageReader::new(stream),
            ledger: Arc::clone(&in_flight.ledger),
            pool: in_flight.pool.clone(),
            served,
            charged: false,
            _in_flight: in_flight,
        }
    }

    fn charge(&mut self) {
        if !self.charged {
            self.charged = true;
            self.ledger
                .charge(&self.pool, self.reader.usage(), self.served);
        }
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.reader.push(data);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.charge(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        self.charge();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(baseline: Option<&str>) -> Ledger {
        let mut prices = HashMap::new();
        prices.insert(
            "small".to_string(),
            Price::PerMtok {
                input: 0.1,
                output: 0.2,
            },
        );
        prices.insert(
            "large".to_string(),
            Price::PerMtok {
                input: 1.0,
                output: 4.0,
            },
        );
        let pricing = Pricing {
            prices,
            baseline: baseline.map(str::to_string),
        };
        Ledger {
            pricing: RwLock::new(pricing),
            totals: Mutex::default(),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn per_mtok_prices_charge_prompt_and_completion_tokens() {
        let l = ledger(Some("large"));
        let usage = Usage {
            prompt: 1_000_000,
            completion: 500_000,
        };
        assert!(close(l.charge("small", usage, true), 0.1 + 0.1));
        let report = l.report();
        assert!(close(report["cost_usd"].as_f64().unwrap_or(0.0), 0.2));
        assert!(close(
            report["baseline_cost_usd"].as_f64().unwrap_or(0.0),
            3.0
        ));
        assert!(close(report["savings_usd"].as_f64().unwrap_or(0.0), 2.8));
    }

    #[test]
    fn repricing_keeps_the_totals_and_charges_the_new_price() {
        let l = ledger(None);
        let usage = Usage {
            prompt: 1_000_000,
            completion: 0,
        };
        assert!(close(l.charge("small", usage, true), 0.1));
        let config = Config::parse(
            "[[pool]]\nname = \"small\"\nendpoints = [\"http://127.0.0.1:1\"]\n\
             price = { input_per_mtok = 2.0 }\n",
        )
        .unwrap();
        l.reprice(&config);
        assert!(close(l.charge("small", usage, true), 2.0));
        let report = l.report();
        assert!(close(report["cost_usd"].as_f64().unwrap_or(0.0), 2.1));
        assert_eq!(report["answers_served"], 2);
    }

    #[test]
    fn escalated_request_pays_both_pools_but_one_baseline() {
        let l = ledger(Some("large"));
        let usage = Usage {
            prompt: 10,
            completion: 10,
        };
        l.charge("small", usage, false);
        l.charge("large", usage, true);
        l.cascade(true);
        l.cascade(false);
        let report = l.report();
        let cost = 10.0 * (0.1 + 0.2 + 1.0 + 4.0) / PER_MTOK;
        assert!(close(report["cost_usd"].as_f64().unwrap_or(0.0), cost));
        let baseline = 10.0 * 5.0 / PER_MTOK;
        assert!(close(
            report["baseline_cost_usd"].as_f64().unwrap_or(0.0),
            baseline
        ));
        assert_eq!(report["answers_served"], 1);
        assert_eq!(report["escalation_rate"], 0.5);
    }

    #[test]
    fn gpu_hour_price_spreads_over_measured_throughput() {
        // $3.6 an hour at 100 tokens/s: a token costs $0.00001.
        let cost = cost_of(
            Price::GpuHour { usd: 3.6 },
            Usage {
                prompt: 50,
                completion: 200,
            },
            Some(100.0),
        );
        assert!(close(cost, 200.0 * 0.00001));
        assert_eq!(
            cost_of(Price::GpuHour { usd: 3.6 }, Usage::default(), None),
            0.0
        );
    }

    #[test]
    fn usage_is_read_from_json_and_from_streams() {
        let mut json = UsageReader::new(false);
        json.push(br#"{"choices":[],"usage":{"prompt_tokens":3,"#);
        json.push(br#""completion_tokens":4}}"#);
        assert_eq!(
            json.usage(),
            Usage {
                prompt: 3,
                completion: 4
            }
        );

        let mut stream = UsageReader::new(true);
        stream.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choi");
        stream.push(b"ces\":[{\"text\":\" b\"}]}\n\ndata: [DONE]\n\n");
        assert_eq!(stream.usage().completion, 2);
        stream.push(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":9}}\n\n",
        );
        assert_eq!(stream.usage().completion, 9);
    }
}
