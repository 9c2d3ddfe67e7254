//! Request loops: a request that Switchyard sent upstream and that comes
//! back to it (its own traffic captured by its iptables rules, or a pool
//! pointed at its own address) is refused at once with 508, while a
//! request through two chained Switchyards is served.

use std::time::{Duration, Instant};

use crate::support::switchyard::{log_message, log_text};
use crate::support::{
    chat_body, http1_client, pool_toml, post, server_toml, MockUpstream, Switchyard,
};

/// How long a looping request may take to be refused; a loop that is not
/// caught runs until the connection limit or the timeouts.
const QUICK: Duration = Duration::from_secs(5);

/// A loopback port nothing listens on now, for a config that must name
/// the API port before the process starts.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").port()
}

#[tokio::test]
async fn a_pool_pointed_at_switchyard_itself_gets_508() {
    // The pool is named for the model it sends, so the request that
    // comes back is routed to the same pool again: a real loop. A low
    // connection limit ends it soon should detection fail.
    let port = free_port();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:0\"\n\
         max_connections = 32\n{}",
        pool_toml("smollm2", &format!("http://127.0.0.1:{port}"), "smollm2")
    );
    let sw = Switchyard::start(&config).await;

    let started = Instant::now();
    let client = http1_client();
    let reply = post(
        &client,
        &sw.api_url(),
        "/v1/chat/completions",
        &chat_body("smollm2", "hi"),
    )
    .await;
    assert!(started.elapsed() < QUICK, "took {:?}", started.elapsed());
    let message = reply.assert_openai_error(508);
    assert_eq!(
        reply.json["error"]["code"], "loop_detected",
        "{}",
        reply.text
    );
    assert!(message.contains("switchyard iptables --uid"), "{message}");

    let line = sw
        .wait_for_log("the loop error", |l| {
            log_message(l).is_some_and(|m| m.starts_with("request loop"))
        })
        .await;
    assert_eq!(log_text(&line, "level").as_deref(), Some("ERROR"), "{line}");
}

#[tokio::test]
async fn two_chained_switchyards_serve_the_request() {
    let mock = MockUpstream::start().await;
    let back = Switchyard::start(&format!(
        "{}{}",
        server_toml(),
        pool_toml("smollm2", &mock.url(), "smollm2")
    ))
    .await;
    let front = Switchyard::start(&format!(
        "{}{}",
        server_toml(),
        pool_toml("small", &back.api_url(), "smollm2")
    ))
    .await;

    let client = http1_client();
    let reply = post(
        &client,
        &front.api_url(),
        "/v1/chat/completions",
        &chat_body("small", "hi"),
    )
    .await;
    reply.assert_status(200);

    // Both Switchyards' ids reach the upstream, in order.
    let requests = mock.requests_to("/v1/chat/completions");
    assert_eq!(requests.len(), 1);
    let ids: Vec<String> = requests[0]
        .headers
        .iter()
        .filter(|(name, _)| name == "x-switchyard-hop")
        .flat_map(|(_, value)| value.split(',').map(|id| id.trim().to_string()))
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_ne!(ids[0], ids[1]);
}
