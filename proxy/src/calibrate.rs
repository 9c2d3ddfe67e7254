//! `switchyard calibrate`: sends a set of requests through the small pool,
//! and shows for a range of mean-logprob thresholds how many would
//! escalate, how many of those labelled hard would be caught, and what
//! the mix would cost against the large pool alone.
//!
//! Owns only the measurement and its table; pools are built as `run`
//! builds them, in this process.

use std::fmt::Write as _;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use switchyard_policy::Endpoint;

use crate::api::ApiRequest;
use crate::app::{App, Outcome};
use crate::config::{Config, DEFAULT_LOW_LOGPROB};
use crate::costs::{usage_of, Price, Usage};

/// Thresholds tried when none are given.
pub const DEFAULT_THRESHOLDS: [f32; 7] = [-0.1, -0.25, -0.5, -0.75, -1.0, -1.5, -2.0];

/// One request's result on the small pool.
#[derive(Debug, Clone)]
struct Sample {
    hard: Option<bool>,
    mean: f32,
    truncated: bool,
    usage: Usage,
}

/// What to calibrate.
#[derive(Debug)]
pub struct Calibration {
    pub config: Config,
    /// JSON lines: `{"request": {OpenAI body}, "label": "easy"|"hard",
    /// "headers": {"name": "value"}}`; `label` and `headers` optional.
    pub requests: String,
    pub small: String,
    pub large: String,
    pub thresholds: Vec<f32>,
}

/// Runs the calibration and returns the table as text.
pub async fn run(calibration: Calibration) -> Result<String, String> {
    let Calibration {
        config,
        requests,
        small,
        large,
        thresholds,
    } = calibration;
    for pool in [&small, &large] {
        if !config.pool.iter().any(|p| &p.name == pool) {
            return Err(format!("no pool named {pool:?} in the configuration"));
        }
    }
    let price = |name: &str| {
        config
            .pool
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.price.as_ref())
            .map(Price::from_config)
    };
    let (small_price, large_price) = (price(&small), price(&large));
    let app = App::new(&config, None)?;

    let mut samples = Vec::new();
    for (n, line) in requests.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let sample = measure(&app, &small, line)
            .await
            .map_err(|e| format!("requests line {}: {e}", n + 1))?;
        samples.push(sample);
    }
    if samples.is_empty() {
        return Err("the requests file has no requests".into());
    }
    Ok(table(&samples, &thresholds, small_price, large_price))
}

async fn measure(app: &App, small: &str, line: &str) -> Result<Sample, String> {
    let line: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let request = line.get("request").ok_or("missing `request`")?;
    let hard = match line.get("label").and_then(Value::as_str) {
        Some("hard") => Some(true),
        Some("easy") => Some(false),
        Some(other) => return Err(format!("label must be easy or hard, got {other:?}")),
        None => None,
    };
    let mut headers = HeaderMap::new();
    if let Some(Value::Object(map)) = line.get("headers") {
        for (name, value) in map {
            let name = HeaderName::try_from(name.as_str()).map_err(|e| e.to_string())?;
            let value = HeaderValue::try_from(value.as_str().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            headers.insert(name, value);
        }
    }

    let endpoint = if request.get("messages").is_some() {
        Endpoint::ChatCompletions
    } else {
        Endpoint::Completions
    };
    let mut body = request.clone();
    body["stream"] = Value::Bool(false);
    let mut api =
        ApiRequest::parse(endpoint, body.to_string().as_bytes()).map_err(|e| e.message)?;
    crate::cascade::ask_logprobs(&mut api);
    let mut outcome = Outcome::default();
    let response = app
        .dispatch(small, &headers, api, &mut outcome, false)
        .await
        .map_err(|e| e.message)?;
    if !response.status().is_success() {
        return Err(format!("pool {small:?} answered {}", response.status()));
    }
    let bytes = crate::cascade::read_limited(response.into_body()).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let answer = crate::cascade::review_answer_of(&value, small, DEFAULT_LOW_LOGPROB);
    Ok(Sample {
        hard,
        mean: answer.summary.mean,
        truncated: answer.finish_reason == "length",
        usage: usage_of(&value).unwrap_or(Usage {
            prompt: 0,
            completion: u64::from(answer.completion_tokens),
        }),
    })
}

fn table(
    samples: &[Sample],
    thresholds: &[f32],
    small_price: Option<Price>,
    large_price: Option<Price>,
) -> String {
    let cost = |price: Option<Price>, usage: Usage| match price {
        Some(Price::PerMtok { input, output }) => {
            (usage.prompt as f64 * input + usage.completion as f64 * output) / 1e6
        }
        // Throughput is not measured here; hardware prices are left out.
        _ => 0.0,
    };
    let hard_total = samples.iter().filter(|s| s.hard == Some(true)).count();
    let baseline: f64 = samples.iter().map(|s| cost(large_price, s.usage)).sum();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} requests ({hard_total} labelled hard); cost of the large pool alone: ${baseline:.6}",
        samples.len()
    );
    let _ = writeln!(
        out,
        "{:>10} {:>11} {:>12} {:>12} {:>9}",
        "threshold", "escalated", "hard caught", "cost $", "savings"
    );
    for &threshold in thresholds {
        let escalates = |s: &Sample| s.truncated || s.mean < threshold;
        let escalated = samples.iter().filter(|s| escalates(s)).count();
        let caught = samples
            .iter()
            .filter(|s| s.hard == Some(true) && escalates(s))
            .count();
        // Every request pays for the small answer; escalations pay the
        // large pool too (estimated with the small answer's tokens).
        let total: f64 = samples
            .iter()
            .map(|s| {
                let large = if escalates(s) {
                    cost(large_price, s.usage)
                } else {
                    0.0
                };
                cost(small_price, s.usage) + large
            })
            .sum();
        let share = |n: usize, of: usize| {
            if of == 0 {
                "-".to_string()
            } else {
                format!("{:.1}%", 100.0 * n as f64 / of as f64)
            }
        };
        let savings = if baseline > 0.0 {
            format!("{:.1}%", 100.0 * (baseline - total) / baseline)
        } else {
            "-".to_string()
        };
        let _ = writeln!(
            out,
            "{threshold:>10.2} {:>11} {:>12} {total:>12.6} {savings:>9}",
            share(escalated, samples.len()),
            share(caught, hard_total),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_counts_escalations_hard_catches_and_savings() {
        let usage = Usage {
            prompt: 1_000_000,
            completion: 0,
        };
        let samples = vec![
            Sample {
                hard: Some(false),
                mean: -0.1,
                truncated: false,
                usage,
            },
            Sample {
                hard: Some(true),
                mean: -2.0,
                truncated: false,
                usage,
            },
        ];
        let small = Some(Price::PerMtok {
            input: 1.0,
            output: 0.0,
        });
        let large = Some(Price::PerMtok {
            input: 10.0,
            output: 0.0,
        });
        let text = table(&samples, &[-1.0], small, large);
        // Threshold -1: the hard one escalates. Cost 1 + 1 + 10 of 20.
        let row = text.lines().nth(2).unwrap_or_default();
        assert!(row.contains("50.0%"), "{text}");
        assert!(row.contains("100.0%"), "{text}");
        assert!(row.contains("12.000000"), "{text}");
        assert!(row.contains("40.0%"), "{text}");
    }
}
