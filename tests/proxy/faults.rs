//! Faults on either side of the proxy: an upstream that stalls halfway
//! through its body, a client that gives up, clients that send their
//! request too slowly, and requests whose body length is ambiguous (the
//! stuff of request smuggling). Each ends in a bounded way, is logged or
//! counted, and leaves the proxy serving.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    assert_still_serves, chat_body, http1_client, pool_toml, server_toml,
    switchyard::{log_message, log_text},
    wait_for_metric, MockUpstream, Switchyard,
};

/// Request timeout of the `stalling` pool, in ms: it also bounds how long
/// the upstream may go quiet mid-body.
const STALL_TIMEOUT_MS: u64 = 1000;

/// Pool whose request timeout is `STALL_TIMEOUT_MS`.
const STALLING_POOL: &str = "stalling";

/// The warn line of a response cut off after an upstream stall.
const STALL_MESSAGE: &str = "upstream stalled mid-body; cutting the response off";

/// Header and body read timeouts of the slow-client rig, in ms.
const CLIENT_READ_TIMEOUT_MS: u64 = 500;

/// Safety limit for raw-socket reads: far above any timeout under test,
/// so only a proxy that never gives up trips it.
const SAFETY_TIMEOUT: Duration = Duration::from_secs(10);

/// Pools `small` (10 s request timeout) and `stalling` (1 s) on one mock,
/// with `server_extra` appended to the `[server]` table.
async fn fault_rig(server_extra: &str) -> (MockUpstream, Switchyard) {
    let mock = MockUpstream::start().await;
    let mut config = server_toml();
    config.push_str(server_extra);
    config.push_str(&pool_toml("small", &mock.url(), "smollm2"));
    config.push_str(&format!(
        "\n[[pool]]\nname = \"{STALLING_POOL}\"\nendpoints = [\"{}\"]\n\
         model = \"m\"\nrequest_timeout_ms = {STALL_TIMEOUT_MS}\n",
        mock.url()
    ));
    let sw = Switchyard::start(&config).await;
    (mock, sw)
}

/// Sends a chat to the stalling pool whose upstream stalls mid-body.
async fn send_stalling_chat(sw: &Switchyard, body: &Value) -> reqwest::Response {
    let response = http1_client()
        .post(format!("{}/v1/chat/completions", sw.api_url()))
        .header("x-mock-stall-body", "1")
        .json(body)
        .send()
        .await
        .expect("send the stalling chat");
    assert_eq!(response.status(), 200, "the upstream's status passes");
    response
}

/// Waits for the warn line of a cut-off response from the stalling pool.
async fn assert_cut_off_logged(sw: &Switchyard) {
    let line = sw
        .wait_for_log("the stalled-body warn line", |l| {
            log_message(l) == Some(STALL_MESSAGE)
        })
        .await;
    assert_eq!(log_text(&line, "level").as_deref(), Some("WARN"), "{line}");
    assert_eq!(
        log_text(&line, "pool").as_deref(),
        Some(STALLING_POOL),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_whose_upstream_stalls_mid_body_is_cut_off() {
    let (_mock, sw) = fault_rig("").await;

    let response = send_stalling_chat(&sw, &chat_body(STALLING_POOL, "stall")).await;
    let body = response.bytes().await;

    // A clean end would hand the client half a JSON document as if whole.
    assert!(
        body.is_err(),
        "the body should end with an error, got {body:?}"
    );
    assert_cut_off_logged(&sw).await;
    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_upstream_stalls_mid_body_is_cut_off() {
    let (_mock, sw) = fault_rig("").await;

    let mut body = chat_body(STALLING_POOL, "stall while streaming");
    body["stream"] = json!(true);
    let mut response = send_stalling_chat(&sw, &body).await;

    let mut text = String::new();
    let mut broken = None;
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => text.push_str(&String::from_utf8_lossy(&bytes)),
            Ok(None) => break,
            Err(e) => {
                broken = Some(e);
                break;
            }
        }
    }

    // The first event got through; the stream then ended, not cleanly.
    assert!(
        text.contains("chat.completion.chunk"),
        "the event sent before the stall should arrive: {text:?}"
    );
    assert!(
        !text.contains("[DONE]"),
        "a cut-off stream must not look complete (error: {broken:?}): {text:?}"
    );
    assert_cut_off_logged(&sw).await;
    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_is_logged_and_counted_as_499() {
    let (mock, sw) = fault_rig("").await;

    // The upstream takes 3 s; the client leaves after 300 ms.
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("build impatient client");
    let sent = impatient
        .post(format!("{}/v1/chat/completions", sw.api_url()))
        .header("x-mock-delay-ms", "3000")
        .json(&chat_body("small", "never mind"))
        .send()
        .await;
    let error = sent.expect_err("the client should time out first");
    assert!(error.is_timeout(), "expected a client timeout: {error}");

    let line = sw
        .wait_for_log("the client-went-away line", |l| {
            log_message(l) == Some("client went away")
        })
        .await;
    assert_eq!(log_text(&line, "level").as_deref(), Some("INFO"), "{line}");
    assert_eq!(log_text(&line, "status").as_deref(), Some("499"), "{line}");
    assert_eq!(log_text(&line, "pool").as_deref(), Some("small"), "{line}");

    let gone = ["pool=\"small\"", "status=\"499\""];
    wait_for_metric(&sw, "switchyard_requests_total", &gone).await;
    assert_eq!(
        mock.request_count(),
        1,
        "the request did reach the upstream"
    );
    assert_still_serves(&sw).await;
}

/// `[server]` read timeouts for the slow-client tests.
fn read_timeouts() -> String {
    format!(
        "header_read_timeout_ms = {CLIENT_READ_TIMEOUT_MS}\n\
         body_read_timeout_ms = {CLIENT_READ_TIMEOUT_MS}\n"
    )
}

/// Opens a raw TCP connection to the API listener.
async fn connect(sw: &Switchyard) -> TcpStream {
    let api = sw.api_url();
    let addr = api.strip_prefix("http://").unwrap_or(&api);
    TcpStream::connect(addr).await.expect("connect to the API")
}

/// Reads until the peer closes the connection (or breaks it); what it
/// sent before. Fails after `SAFETY_TIMEOUT`.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(SAFETY_TIMEOUT, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the proxy kept the connection open past {SAFETY_TIMEOUT:?}; \
         received {:?}",
        String::from_utf8_lossy(&received)
    );
    received
}

/// Reads one HTTP/1.1 response with a `content-length` body: its status
/// and body. Fails after `SAFETY_TIMEOUT`.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut received = Vec::new();
    let read = tokio::time::timeout(SAFETY_TIMEOUT, async {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(response) = parse_response(&received) {
                return Some(response);
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&received).into_owned();
    match read {
        Ok(Some(response)) => response,
        Ok(None) => panic!("connection closed before a whole response: {text:?}"),
        Err(_) => panic!("no whole response within {SAFETY_TIMEOUT:?}: {text:?}"),
    }
}

/// A complete response in `bytes`, or `None` while some is missing.
fn parse_response(bytes: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    (body.len() >= length).then(|| (status, body[..length].to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_disconnected() {
    let (mock, sw) = fault_rig(&read_timeouts()).await;

    let mut stream = connect(&sw).await;
    read_until_closed(&mut stream).await;

    assert_eq!(mock.request_count(), 0, "nothing reaches the upstream");
    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let (mock, sw) = fault_rig(&read_timeouts()).await;

    let mut stream = connect(&sw).await;
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write partial headers");
    read_until_closed(&mut stream).await;

    assert_eq!(mock.request_count(), 0, "nothing reaches the upstream");
    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_body_gets_408() {
    let (mock, sw) = fault_rig(&read_timeouts()).await;

    let mut stream = connect(&sw).await;
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\
                content-type: application/json\r\ncontent-length: 100\r\n\r\n";
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write headers");
    stream
        .write_all(b"{\"model\": ")
        .await
        .expect("write 10 of the 100 body bytes");
    let (status, body) = read_response(&mut stream).await;

    assert_eq!(status, 408, "body: {body}");
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let error = &json["error"];
    assert!(error["message"].is_string(), "not an OpenAI error: {body}");
    assert!(error["type"].is_string(), "not an OpenAI error: {body}");
    assert_eq!(error["code"], "body_timeout", "body: {body}");
    assert_eq!(mock.request_count(), 0, "nothing reaches the upstream");

    assert_still_serves(&sw).await;
}

/// A raw HTTP/1.1 chat request head for the `small` pool, ending in
/// `framing` (the body-length headers under test) and the blank line.
fn raw_head(framing: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\
         content-type: application/json\r\n{framing}\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_read_as_chunked_alone() {
    let (mock, sw) = fault_rig("").await;
    let body = chat_body("small", "framed").to_string();

    // The Content-Length covers only part of the body: a server that read
    // by it would see a broken body and then take the rest as a second
    // request. Chunked wins, as RFC 9112 says; the upstream gets the whole
    // body once.
    let framing = "content-length: 5\r\ntransfer-encoding: chunked\r\n";
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let mut stream = connect(&sw).await;
    let request = raw_head(framing) + &chunked;
    stream.write_all(request.as_bytes()).await.expect("write");
    let (status, reply) = read_response(&mut stream).await;

    assert_eq!(status, 200, "body: {reply}");
    let requests = mock.requests();
    assert_eq!(requests.len(), 1, "upstream requests: {requests:?}");
    assert_eq!(requests[0].body["messages"][0]["content"], "framed");
    assert_still_serves(&sw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_body_lengths_are_refused_and_the_connection_closed() {
    let (mock, sw) = fault_rig("").await;
    let body = chat_body("small", "smuggled").to_string();
    let n = body.len();
    let cases = [
        format!("content-length: {n}\r\ncontent-length: {}\r\n", n + 7),
        format!("content-length: +{n}\r\n"),
        format!("transfer-encoding: gzip\r\ncontent-length: {n}\r\n"),
        format!("transfer-encoding: chunked, gzip\r\ncontent-length: {n}\r\n"),
    ];

    for framing in cases {
        let mut stream = connect(&sw).await;
        let request = raw_head(&framing) + &body;
        stream.write_all(request.as_bytes()).await.expect("write");
        let received = read_until_closed(&mut stream).await;
        let text = String::from_utf8_lossy(&received);
        // Hyper answers these itself, before Switchyard sees a request.
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "{framing:?} was answered {text:?}"
        );
    }

    assert_eq!(
        mock.request_count(),
        0,
        "an ambiguous request went upstream"
    );
    assert_still_serves(&sw).await;
}
