//! The cost ledger: answers charged at their pool's price from the
//! upstream's `usage`, the baseline pool's price for what was served, and
//! `/admin/costs` with savings and the escalation rate, on a cascade.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    chat_body, http1_client, metric_lines, metrics_text, plugin, pools_config, send, MockUpstream,
    Switchyard,
};

/// Dollars per million tokens of the two pools: small (1 in, 2 out) and
/// large (10 in, 20 out).
const SMALL_PRICE: &str = "price = { input_per_mtok = 1.0, output_per_mtok = 2.0 }\n";
const LARGE_PRICE: &str = "price = { input_per_mtok = 10.0, output_per_mtok = 20.0 }\n";

async fn costs(sw: &Switchyard) -> Value {
    let reply = send(http1_client().get(format!("{}/admin/costs", sw.admin_url()))).await;
    reply.assert_status(200);
    reply.json
}

/// Polls `/admin/costs` until `answers_served` reaches `served`.
async fn costs_after(sw: &Switchyard, served: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let report = costs(sw).await;
        if report["answers_served"].as_u64() == Some(served) || Instant::now() > deadline {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn close(value: &Value, want: f64) -> bool {
    value.as_f64().is_some_and(|v| (v - want).abs() < 1e-12)
}

/// Priced pools small and large on their mocks, large as the baseline
/// (with `costs` lines added to `[costs]`), and confidence_cascade
/// escalating below a mean logprob of -1.
fn cascade_config(small: &MockUpstream, large: &MockUpstream, costs: &str) -> String {
    let mut config = pools_config(&[
        ("small", &small.url(), "smollm2"),
        ("large", &large.url(), "big"),
    ]);
    // Each pool table gets its price right after its name.
    config = config
        .replace(
            "name = \"small\"\n",
            &format!("name = \"small\"\n{SMALL_PRICE}"),
        )
        .replace(
            "name = \"large\"\n",
            &format!("name = \"large\"\n{LARGE_PRICE}"),
        );
    config.push_str(&format!(
        "\n[costs]\nbaseline = \"large\"\n{costs}\n[policy]\nplugin = \"{}\"\n\
         timeout_ms = 1000\nconfig = {{ min_mean_logprob = -1.0 }}\n",
        plugin("confidence_cascade")
    ));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_charges_both_cascade_pools_and_one_baseline() {
    let small = MockUpstream::start().await;
    let large = MockUpstream::start().await;
    let config = cascade_config(&small, &large, "");
    let sw = Switchyard::start(&config).await;
    let client = http1_client();
    let url = format!("{}/v1/chat/completions", sw.api_url());

    // Three prompt words and the mock's two completion tokens each time:
    // accepted on small, then escalated to large.
    let body = chat_body("auto", "capital of France");
    for logprobs in ["-0.1", "-5"] {
        let request = client
            .post(&url)
            .header("x-mock-logprobs", logprobs)
            .json(&body);
        send(request).await.assert_status(200);
    }

    let report = costs_after(&sw, 2).await;
    let small_cost = (3.0 * 1.0 + 2.0 * 2.0) / 1e6;
    let large_cost = (3.0 * 10.0 + 2.0 * 20.0) / 1e6;
    assert!(
        close(&report["pools"]["small"]["cost_usd"], 2.0 * small_cost),
        "{report}"
    );
    assert!(
        close(&report["pools"]["large"]["cost_usd"], large_cost),
        "{report}"
    );
    assert!(
        close(&report["cost_usd"], 2.0 * small_cost + large_cost),
        "{report}"
    );
    assert!(
        close(&report["baseline_cost_usd"], 2.0 * large_cost),
        "{report}"
    );
    assert!(
        close(&report["savings_usd"], large_cost - 2.0 * small_cost),
        "{report}"
    );
    assert_eq!(report["cascaded"], 2, "{report}");
    assert_eq!(report["escalation_rate"], 0.5, "{report}");
    assert_eq!(report["pools"]["small"]["completion_tokens"], 4, "{report}");

    let text = metrics_text(&sw).await;
    let cost_lines = metric_lines(&text, "switchyard_cost_usd_total");
    assert!(
        cost_lines.iter().any(|l| l.contains("pool=\"large\"")),
        "{text}"
    );
    assert!(
        !metric_lines(&text, "switchyard_baseline_cost_usd_total").is_empty(),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_are_charged_from_the_upstream_usage() {
    let mock = MockUpstream::start().await;
    let config = pools_config(&[("small", &mock.url(), "smollm2")]).replace(
        "name = \"small\"\n",
        &format!("name = \"small\"\n{SMALL_PRICE}"),
    );
    let sw = Switchyard::start(&config).await;
    let client = http1_client();

    let body = chat_body("small", "one two");
    let url = format!("{}/v1/chat/completions", sw.api_url());
    send(client.post(&url).json(&body)).await.assert_status(200);
    let report = costs_after(&sw, 1).await;
    assert!(close(&report["cost_usd"], (2.0 + 4.0) / 1e6), "{report}");
    assert_eq!(report["baseline_pool"], Value::Null);
    assert_eq!(report["escalation_rate"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_headers_count_every_answer_a_request_took() {
    let small = MockUpstream::start().await;
    let large = MockUpstream::start().await;
    let sw = Switchyard::start(&cascade_config(&small, &large, "header = true\n")).await;
    let client = http1_client();
    let url = format!("{}/v1/chat/completions", sw.api_url());
    let cost = |reply: &crate::support::Reply, name: &str| -> f64 {
        let value = reply.header(name).unwrap_or_else(|| panic!("no {name}"));
        value.parse().unwrap()
    };

    // Three prompt words and two completion tokens per answer, as above.
    let small_cost = (3.0 * 1.0 + 2.0 * 2.0) / 1e6;
    let large_cost = (3.0 * 10.0 + 2.0 * 20.0) / 1e6;
    let body = chat_body("auto", "capital of France");
    let accepted = send(
        client
            .post(&url)
            .header("x-mock-logprobs", "-0.1")
            .json(&body),
    )
    .await;
    let escalated = send(
        client
            .post(&url)
            .header("x-mock-logprobs", "-5")
            .json(&body),
    )
    .await;

    accepted.assert_status(200);
    assert!((cost(&accepted, "x-switchyard-cost-usd") - small_cost).abs() < 1e-12);
    let baseline = cost(&accepted, "x-switchyard-baseline-cost-usd");
    assert!((baseline - large_cost).abs() < 1e-12, "{baseline}");
    escalated.assert_status(200);
    let both = cost(&escalated, "x-switchyard-cost-usd");
    assert!((both - (small_cost + large_cost)).abs() < 1e-12, "{both}");

    // A streamed answer's cost is not known when its headers go out.
    let mut stream = body.clone();
    stream["stream"] = Value::Bool(true);
    let streamed = send(
        client
            .post(&url)
            .header("x-mock-logprobs", "-0.1")
            .json(&stream),
    )
    .await;
    streamed.assert_status(200);
    assert_eq!(streamed.header("x-switchyard-cost-usd"), None);
}
