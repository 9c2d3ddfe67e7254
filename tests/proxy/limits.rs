//! `[server]` limits on client connections: header size and count (431),
//! the idle timeout, `max_connections` (the admin port stays reachable),
//! `max_connections_per_ip`, and `max_concurrent_streams` on h2.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::{
    assert_still_serves, chat_body, h2_client, http1_client, metrics_text, pool_toml, post, send,
    server_toml, switchyard::Switchyard, switchyard_check, wait_for_metric, MockUpstream,
};

/// A config with the pool `small` on `mock` and `limits` added to
/// `[server]`.
fn config_with(mock: &MockUpstream, limits: &str) -> String {
    format!(
        "{}{limits}\n{}",
        server_toml(),
        pool_toml("small", &mock.url(), "smollm2")
    )
}

/// A chat request as raw HTTP/1.1, kept alive unless `close`.
fn raw_chat(close: bool) -> Vec<u8> {
    let body = chat_body("small", "raw").to_string();
    let connection = if close { "connection: close\r\n" } else { "" };
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\
         {connection}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads until the server closes the connection, at most `limit`; the
/// text read, and whether it closed in time.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&text).into(), true),
            Ok(Ok(n)) => text.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&text).into(), false),
        }
    }
}

/// Opens a TCP connection to `to` from the loopback address `from`
/// (Linux routes all of 127.0.0.0/8 to `lo`).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Waits until `switchyard_connections_open` reads `open`.
async fn wait_for_open(sw: &Switchyard, open: usize) {
    let want = format!("switchyard_connections_open {open}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics_text(sw).await;
        if text.lines().any(|line| line == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no `{want}` in /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn oversized_or_too_many_headers_get_431_and_others_are_served() {
    let mock = MockUpstream::start().await;
    let limits = "max_header_bytes = 8192\nmax_headers = 20\n";
    let sw = Switchyard::start(&config_with(&mock, limits)).await;
    let url = format!("{}/v1/chat/completions", sw.api_url());
    let body = chat_body("small", "hi");

    // One header value larger than the whole head may be.
    let big = "a".repeat(10_000);
    let reply = send(http1_client().post(&url).header("x-big", &big).json(&body)).await;
    reply.assert_status(431);
    // Hyper answers this itself, before the service, with no body.
    assert!(reply.text.is_empty(), "body: {}", reply.text);

    // Small headers, but more of them than max_headers.
    let mut request = http1_client().post(&url).json(&body);
    for i in 0..30 {
        request = request.header(format!("x-extra-{i}"), "1");
    }
    send(request).await.assert_status(431);

    // On h2 the header list limit holds too, and the stream gets 431.
    let reply = send(h2_client().post(&url).header("x-big", &big).json(&body)).await;
    reply.assert_status(431);

    assert_eq!(mock.request_count(), 0, "a refused request went upstream");
    assert_still_serves(&sw).await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&config_with(&mock, "idle_timeout_ms = 300\n")).await;

    // HTTP/1: the answer comes, then the kept-alive connection closes
    // once idle for 300 ms, long before any other timeout.
    let mut stream = TcpStream::connect(sw.api_addr()).await.unwrap();
    let sent = Instant::now();
    stream.write_all(&raw_chat(false)).await.unwrap();
    let (text, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "reply: {text}");
    // Counting the request in flight keeps a fixed-length answer's size.
    let head = text.to_ascii_lowercase();
    assert!(head.contains("content-length:"), "reply: {text}");
    assert!(closed, "idle connection still open after 10 s");
    let open_for = sent.elapsed();
    assert!(
        open_for >= Duration::from_millis(300),
        "closed after {open_for:?}"
    );
    assert!(
        open_for < Duration::from_secs(5),
        "closed after {open_for:?}"
    );

    // h2: the client keeps its connection, the server closes it (GOAWAY)
    // and the open-connection gauge returns to 0.
    let client = h2_client();
    let api = sw.api_url();
    let path = "/v1/chat/completions";
    let body = chat_body("small", "x");
    post(&client, &api, path, &body).await.assert_status(200);
    wait_for_open(&sw, 0).await;

    // A request on the same client afterwards opens a new connection.
    post(&client, &api, path, &body).await.assert_status(200);
}

#[tokio::test]
async fn max_connections_closes_extra_ones_and_admin_still_answers() {
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&config_with(&mock, "max_connections = 2\n")).await;

    // Two idle connections fill the API listener.
    let mut first = TcpStream::connect(sw.api_addr()).await.unwrap();
    let second = TcpStream::connect(sw.api_addr()).await.unwrap();
    wait_for_open(&sw, 2).await;

    // The third is accepted and closed at once, and counted.
    let mut third = TcpStream::connect(sw.api_addr()).await.unwrap();
    let (text, closed) = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(
        closed && text.is_empty(),
        "third connection: {closed} {text:?}"
    );
    wait_for_metric(
        &sw,
        "switchyard_connections_rejected_total",
        &["reason=\"max_connections\""],
    )
    .await;

    // The admin port answers while the API port is full (the metric
    // waits above used it too), and the open connections are served.
    let health = send(http1_client().get(format!("{}/healthz", sw.admin_url()))).await;
    health.assert_status(200);
    first.write_all(&raw_chat(true)).await.unwrap();
    let (text, closed) = read_until_closed(&mut first, Duration::from_secs(10)).await;
    assert!(closed && text.starts_with("HTTP/1.1 200"), "reply: {text}");

    // Once connections close, new ones are served again.
    drop(first);
    drop(second);
    wait_for_open(&sw, 0).await;
    assert_still_serves(&sw).await;
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let mock = MockUpstream::start().await;
    let limits = "max_connections = 10\nmax_connections_per_ip = 2\n";
    let sw = Switchyard::start(&config_with(&mock, limits)).await;

    // 127.0.0.2 takes its two connections; its third is closed.
    let _a = connect_from([127, 0, 0, 2], sw.api_addr()).await;
    let _b = connect_from([127, 0, 0, 2], sw.api_addr()).await;
    wait_for_open(&sw, 2).await;
    let mut c = connect_from([127, 0, 0, 2], sw.api_addr()).await;
    let (text, closed) = read_until_closed(&mut c, Duration::from_secs(5)).await;
    assert!(
        closed && text.is_empty(),
        "third connection: {closed} {text:?}"
    );
    wait_for_metric(
        &sw,
        "switchyard_connections_rejected_total",
        &["reason=\"max_connections_per_ip\""],
    )
    .await;

    // Another address is still served.
    let mut other = connect_from([127, 0, 0, 3], sw.api_addr()).await;
    other.write_all(&raw_chat(true)).await.unwrap();
    let (text, closed) = read_until_closed(&mut other, Duration::from_secs(10)).await;
    assert!(closed && text.starts_with("HTTP/1.1 200"), "reply: {text}");
}

#[tokio::test]
async fn h2_streams_past_the_limit_wait_and_all_succeed() {
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&config_with(&mock, "max_concurrent_streams = 2\n")).await;
    let client = h2_client();
    let url = format!("{}/v1/chat/completions", sw.api_url());

    // 12 requests at once on one h2 connection, each held 200 ms
    // upstream: the client learns the limit from the server's SETTINGS
    // and queues the rest, so none fails and at most 2 run at once.
    let requests: Vec<_> = (0..12)
        .map(|i| {
            let request = client
                .post(&url)
                .header("x-mock-delay-ms", "200")
                .json(&chat_body("small", &format!("n{i}")));
            tokio::spawn(send(request))
        })
        .collect();
    for request in requests {
        request.await.unwrap().assert_status(200);
    }
    assert_eq!(mock.request_count(), 12);
    assert!(
        mock.max_concurrent() <= 2,
        "{} at once",
        mock.max_concurrent()
    );
}

#[test]
fn zero_limits_are_rejected_with_their_key() {
    let keys = [
        "max_headers",
        "idle_timeout_ms",
        "write_timeout_ms",
        "max_connections",
        "max_connections_per_ip",
        "max_concurrent_streams",
    ];
    for key in keys {
        let config = format!("{}{key} = 0\n", server_toml());
        let (code, stderr) = switchyard_check(&config);
        assert_ne!(code, 0, "{key} = 0 was accepted");
        assert!(stderr.contains(&format!("server.{key}")), "{stderr}");
    }
    let config = format!("{}max_header_bytes = 1024\n", server_toml());
    let (code, stderr) = switchyard_check(&config);
    assert_ne!(code, 0, "max_header_bytes = 1024 was accepted");
    assert!(
        stderr.contains("server.max_header_bytes: must be >= 8192"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_h2_client_that_ignores_goaway_is_cut_off() {
    let mock = MockUpstream::start().await;
    let sw = Switchyard::start(&config_with(&mock, "idle_timeout_ms = 300\n")).await;

    // The h2 preface and an empty SETTINGS frame, then silence: the
    // client never acknowledges anything and never closes.
    let mut stream = TcpStream::connect(sw.api_addr()).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    stream.write_all(&hello).await.unwrap();

    // Idle after 300 ms, GOAWAY, then 5 s for the client to close.
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(30)).await;
    assert!(closed, "a client ignoring GOAWAY kept its connection 30 s");
    wait_for_open(&sw, 0).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_frees_its_place() {
    let mock = MockUpstream::start().await;
    let config = format!(
        "{}write_timeout_ms = 500\n{}[pool.batch]\nmax_inflight = 1\n",
        server_toml(),
        pool_toml("small", &mock.url(), "smollm2")
    );
    let sw = Switchyard::start(&config).await;

    // A stream of 300,000 events (the mock echoes one per word) to a
    // client with a small receive buffer that never reads: the pool's
    // one in-flight place is held while the answer cannot be written.
    let words = "w ".repeat(300_000);
    let body = serde_json::json!({
        "model": "small",
        "stream": true,
        "messages": [{"role": "user", "content": words}],
    })
    .to_string();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(sw.api_addr()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stuck.write_all(head.as_bytes()).await.unwrap();
    stuck.write_all(body.as_bytes()).await.unwrap();
    // The stuck request holds the place before the next one asks for it.
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while mock.request_count() == 0 {
        assert!(
            tokio::time::Instant::now() < end,
            "the stuck request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Another caller of the same pool is served once the reader that
    // stopped is cut off.
    let url = format!("{}/v1/chat/completions", sw.api_url());
    let other = http1_client().post(&url).json(&chat_body("small", "next"));
    let reply = tokio::time::timeout(Duration::from_secs(30), send(other))
        .await
        .expect("the stuck reader kept the pool's place for 30 s");
    reply.assert_status(200);
    wait_for_metric(&sw, "switchyard_client_write_timeouts_total", &[]).await;
    drop(stuck);
}
