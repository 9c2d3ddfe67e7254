//! TLS: the API listener with certificates made in the test (HTTP/1.1 and
//! h2 chosen by ALPN), mutual TLS, certificate rotation while requests
//! flow, `https://` upstreams with a configured CA, and `switchyard check`
//! on TLS files.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::switchyard::log_message;
use crate::support::tls::{
    https_client, peer_certificate, server_config, server_tls_toml, Offer, TempDir, TestCa,
};
use crate::support::{
    chat_body, closed_port_url, pool_toml, post, send, server_toml, switchyard_check,
    wait_for_metric, MockUpstream, Switchyard,
};

/// How long the rotation test waits for new connections to see the new
/// certificate.
const ROTATION_TIMEOUT: Duration = Duration::from_secs(10);

/// A config with TLS on the API listener and the pool `small` on `mock`.
fn tls_config(dir: &TempDir, leaf: &crate::support::tls::Leaf, extra: &str, mock: &str) -> String {
    format!(
        "{}{}{}",
        server_toml(),
        server_tls_toml(dir, leaf, extra),
        pool_toml("small", mock, "smollm2")
    )
}

#[tokio::test]
async fn tls_listener_serves_http1_and_h2_as_alpn_agrees() {
    let mock = MockUpstream::start().await;
    let ca = TestCa::new("switchyard test CA");
    let leaf = ca.server_cert();
    let dir = TempDir::new();
    let sw = Switchyard::start(&tls_config(&dir, &leaf, "", &mock.url())).await;
    let started = sw
        .wait_for_log("the listening line", |l| {
            log_message(l) == Some("listening")
        })
        .await;
    assert_eq!(started["fields"]["tls"], "on", "{started}");

    // An HTTP/1.1-only client gets HTTP/1.1; one that offers h2 gets h2.
    let body = chat_body("small", "over tls");
    let url = sw.api_https_url();
    for (offer, version) in [
        (Offer::Http1, reqwest::Version::HTTP_11),
        (Offer::Both, reqwest::Version::HTTP_2),
    ] {
        let client = https_client(&ca, offer, None);
        let reply = post(&client, &url, "/v1/chat/completions", &body).await;
        reply.assert_status(200);
        assert_eq!(reply.version, version, "{offer:?}");
        assert_eq!(
            reply.json["choices"][0]["message"]["content"],
            "echo:over tls"
        );
    }

    // Cleartext HTTP on the TLS port fails its handshake, is counted, and
    // harms no other connection.
    let mut plain = tokio::net::TcpStream::connect(sw.api_addr()).await.unwrap();
    plain
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"),
        "cleartext request was served on the TLS port"
    );
    wait_for_metric(
        &sw,
        "switchyard_tls_handshake_failures_total",
        &["reason=\"refused\""],
    )
    .await;
    let client = https_client(&ca, Offer::Both, None);
    post(&client, &url, "/v1/chat/completions", &body)
        .await
        .assert_status(200);
}

#[tokio::test]
async fn a_silent_client_is_dropped_at_the_handshake_timeout() {
    let mock = MockUpstream::start().await;
    let ca = TestCa::new("switchyard test CA");
    let dir = TempDir::new();
    let extra = "handshake_timeout_ms = 200\n";
    let sw = Switchyard::start(&tls_config(&dir, &ca.server_cert(), extra, &mock.url())).await;

    // A connection that never starts its handshake is closed by the
    // server, well before the test's own limit.
    let mut silent = tokio::net::TcpStream::connect(sw.api_addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "connection not closed: {read:?}"
    );
    wait_for_metric(
        &sw,
        "switchyard_tls_handshake_failures_total",
        &["reason=\"timeout\""],
    )
    .await;
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_trusted_certificate() {
    let mock = MockUpstream::start().await;
    let server_ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    let stranger_ca = TestCa::new("some other CA");
    let dir = TempDir::new();
    let client_ca_path = dir.write("clients.pem", &client_ca.cert_pem);
    let extra = format!("client_ca_path = {client_ca_path:?}\n");
    let config = tls_config(&dir, &server_ca.server_cert(), &extra, &mock.url());
    let sw = Switchyard::start(&config).await;
    let body = chat_body("small", "who goes there");
    let url = format!("{}/v1/chat/completions", sw.api_https_url());

    // No certificate, or one from a CA the server does not trust: refused.
    let anonymous = https_client(&server_ca, Offer::Both, None);
    let stranger = stranger_ca.client_cert();
    let impostor = https_client(&server_ca, Offer::Both, Some(&stranger));
    for (who, client) in [("no certificate", anonymous), ("untrusted", impostor)] {
        let sent = client.post(&url).json(&body).send().await;
        assert!(sent.is_err(), "a client with {who} was served: {sent:?}");
    }
    assert_eq!(mock.request_count(), 0, "a refused client reached upstream");

    // A certificate signed by the client CA: served, over h2.
    let member = client_ca.client_cert();
    let client = https_client(&server_ca, Offer::Both, Some(&member));
    let reply = send(client.post(&url).json(&body)).await;
    reply.assert_status(200);
    assert_eq!(reply.version, reqwest::Version::HTTP_2);
    let line = wait_for_metric(
        &sw,
        "switchyard_tls_handshake_failures_total",
        &["reason=\"refused\""],
    )
    .await;
    let failures: f64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(failures >= 2.0, "{line}");
}

#[tokio::test]
async fn rotated_certificate_reaches_new_connections_while_requests_flow() {
    let mock = MockUpstream::start().await;
    let ca = TestCa::new("rotation CA");
    let old = ca.server_cert();
    let new = ca.server_cert();
    let dir = TempDir::new();
    let extra = "reload_interval_ms = 100\n";
    let sw = Switchyard::start(&tls_config(&dir, &old, extra, &mock.url())).await;
    let url = format!("{}/v1/chat/completions", sw.api_https_url());

    // Two loaders: one keeps its connection (and so the old certificate)
    // the whole time, the other opens a new connection per request.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut loaders = Vec::new();
    for fresh in [false, true] {
        let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
        let (url, ca_client) = (url.clone(), https_client(&ca, Offer::Both, None));
        let ca_pem = ca.cert_pem.clone();
        loaders.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let client = if fresh {
                    fresh_client(&ca_pem)
                } else {
                    ca_client.clone()
                };
                let body = chat_body("small", "rotate");
                match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // Let traffic run on the old certificate, then replace both files.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(presented(&sw, &ca).await, old.cert_der, "before rotation");
    dir.replace("cert.pem", &new.cert_pem);
    dir.replace("key.pem", &new.key_pem);

    // New connections see the new certificate soon after.
    let deadline = Instant::now() + ROTATION_TIMEOUT;
    while presented(&sw, &ca).await != new.cert_der {
        assert!(
            Instant::now() < deadline,
            "new connections still get the old certificate\n{}",
            sw.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sw.wait_for_log("the reload line", |l| {
        log_message(l).is_some_and(|m| m.starts_with("tls certificate reloaded"))
    })
    .await;

    // Traffic goes on a little after the swap; no request failed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for loader in loaders {
        loader.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "requests failed: {failures:?}");
    assert!(sent.load(Ordering::SeqCst) >= 10, "too little traffic");
}

#[tokio::test]
async fn a_bad_new_certificate_pair_keeps_the_old_one_serving() {
    let mock = MockUpstream::start().await;
    let ca = TestCa::new("rotation CA");
    let old = ca.server_cert();
    let other = ca.server_cert();
    let dir = TempDir::new();
    let extra = "reload_interval_ms = 100\n";
    let sw = Switchyard::start(&tls_config(&dir, &old, extra, &mock.url())).await;

    // A key that belongs to another certificate is refused with a warning
    // naming the key; handshakes still get the old certificate.
    dir.replace("key.pem", &other.key_pem);
    let warning = sw
        .wait_for_log("the refused reload", |l| {
            l["level"] == "WARN"
                && log_message(l).is_some_and(|m| m.contains("tls certificate not loaded"))
        })
        .await;
    assert_eq!(warning["fields"]["key"], "server.tls.key_path", "{warning}");
    assert_eq!(presented(&sw, &ca).await, old.cert_der);
    wait_for_metric(
        &sw,
        "switchyard_tls_certificate_reloads_total",
        &["result=\"error\""],
    )
    .await;

    // Completing the pair brings the new certificate in.
    dir.replace("cert.pem", &other.cert_pem);
    let deadline = Instant::now() + ROTATION_TIMEOUT;
    while presented(&sw, &ca).await != other.cert_der {
        assert!(Instant::now() < deadline, "never reloaded\n{}", sw.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn https_upstreams_are_reached_with_the_configured_ca() {
    let ca = TestCa::new("upstream CA");
    let dir = TempDir::new();
    let ca_path = dir.write("upstream-ca.pem", &ca.cert_pem);

    // One upstream offers h2 and HTTP/1.1, one only HTTP/1.1, and one has
    // a certificate for another name, reached with `server_name`.
    let h2 = MockUpstream::start_tls(server_config(&ca.server_cert(), &["h2", "http/1.1"])).await;
    let h1 = MockUpstream::start_tls(server_config(&ca.server_cert(), &["http/1.1"])).await;
    let named_leaf = ca.server_cert_for(&["models.internal"]);
    let named = MockUpstream::start_tls(server_config(&named_leaf, &["h2", "http/1.1"])).await;
    let tls = format!("[pool.tls]\nca_path = {ca_path:?}\n");
    let mut config = server_toml();
    config.push_str(&pool_toml("h2", &h2.url(), "m"));
    config.push_str(&tls);
    config.push_str(&pool_toml("h1", &h1.url(), "m"));
    config.push_str(&tls);
    config.push_str(&pool_toml("named", &named.url(), "m"));
    config.push_str(&format!("{tls}server_name = \"models.internal\"\n"));
    let sw = Switchyard::start(&config).await;
    let client = crate::support::http1_client();

    for (pool, mock, version) in [
        ("h2", &h2, "HTTP/2.0"),
        ("h1", &h1, "HTTP/1.1"),
        ("named", &named, "HTTP/2.0"),
    ] {
        let body = chat_body(pool, "secret");
        let reply = post(&client, &sw.api_url(), "/v1/chat/completions", &body).await;
        reply.assert_status(200);
        assert_eq!(
            reply.json["choices"][0]["message"]["content"],
            "echo:secret"
        );
        let seen = mock.requests_to("/v1/chat/completions");
        assert_eq!(seen.len(), 1, "{pool}");
        assert_eq!(seen[0].version, version, "{pool}");
    }
}

#[tokio::test]
async fn an_untrusted_upstream_certificate_is_a_502_naming_the_fix() {
    let upstream_ca = TestCa::new("upstream CA");
    let other_ca = TestCa::new("not the upstream's CA");
    let dir = TempDir::new();
    let wrong = dir.write("wrong-ca.pem", &other_ca.cert_pem);
    let mock =
        MockUpstream::start_tls(server_config(&upstream_ca.server_cert(), &["http/1.1"])).await;
    let config = format!(
        "{}{}[pool.tls]\nca_path = {wrong:?}\n",
        server_toml(),
        pool_toml("small", &mock.url(), "smollm2")
    );
    let sw = Switchyard::start(&config).await;

    let body = chat_body("small", "hello");
    let client = crate::support::http1_client();
    let reply = post(&client, &sw.api_url(), "/v1/chat/completions", &body).await;
    let message = reply.assert_openai_error(502);
    for needle in ["certificate", "pool.tls.ca_path", "small", &mock.url()] {
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    assert_eq!(mock.request_count(), 0);
}

#[test]
fn check_names_the_tls_key_at_fault() {
    let ca = TestCa::new("check CA");
    let leaf = ca.server_cert();
    let other = ca.server_cert();
    let dir = TempDir::new();
    let pool = pool_toml("small", &closed_port_url(), "smollm2");
    let tls = |cert: &str, key: &str, extra: &str| {
        format!(
            "{}\n[server.tls]\ncert_path = {cert:?}\nkey_path = {key:?}\n{extra}{pool}",
            server_toml()
        )
    };
    let cert = dir.write("cert.pem", &leaf.cert_pem);
    let key = dir.write("key.pem", &leaf.key_pem);
    let other_key = dir.write("other-key.pem", &other.key_pem);
    let missing = dir.file("missing.pem").display().to_string();

    let (code, stderr) = switchyard_check(&tls(&cert, &key, ""));
    assert_eq!(code, 0, "{stderr}");

    let cases = [
        (
            tls(&missing, &key, ""),
            "server.tls.cert_path",
            "cannot read",
        ),
        (
            tls(&cert, &cert, ""),
            "server.tls.key_path",
            "no PEM private key",
        ),
        (
            tls(&cert, &other_key, ""),
            "server.tls.key_path",
            "does not belong",
        ),
        (
            tls(&key, &key, ""),
            "server.tls.cert_path",
            "no PEM certificate",
        ),
        (
            tls(&cert, &key, &format!("client_ca_path = {missing:?}\n")),
            "server.tls.client_ca_path",
            "cannot read",
        ),
        (
            tls(&cert, &key, "handshake_timeout_ms = 0\n"),
            "server.tls.handshake_timeout_ms",
            "> 0",
        ),
    ];
    for (config, key, words) in cases {
        let (code, stderr) = switchyard_check(&config);
        assert_ne!(code, 0, "accepted:\n{config}");
        assert!(stderr.contains(key), "{key:?} not in {stderr}");
        assert!(stderr.contains(words), "{words:?} not in {stderr}");
    }

    // A pool's TLS table: its CA bundle must load, and it needs https.
    let https = pool_toml("small", "https://127.0.0.1:9", "smollm2");
    let pool_cases = [
        (
            format!(
                "{}{https}[pool.tls]\nca_path = {missing:?}\n",
                server_toml()
            ),
            "pool[0].tls.ca_path",
        ),
        (
            format!(
                "{}{https}[pool.tls]\nserver_name = \"a b\"\n",
                server_toml()
            ),
            "pool[0].tls.server_name",
        ),
        (
            format!("{}{pool}[pool.tls]\nca_path = {cert:?}\n", server_toml()),
            "pool[0].tls",
        ),
    ];
    for (config, key) in pool_cases {
        let (code, stderr) = switchyard_check(&config);
        assert_ne!(code, 0, "accepted:\n{config}");
        assert!(stderr.contains(key), "{key:?} not in {stderr}");
    }
    let good = format!("{}{https}[pool.tls]\nca_path = {cert:?}\n", server_toml());
    let (code, stderr) = switchyard_check(&good);
    assert_eq!(code, 0, "{stderr}");
}

/// A client that opens its own connection: pooling is off, so every
/// request does a new handshake.
fn fresh_client(ca_pem: &str) -> reqwest::Client {
    let root = reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The certificate a new connection to the API listener is shown.
async fn presented(sw: &Switchyard, ca: &TestCa) -> Vec<u8> {
    let client = https_client(ca, Offer::Both, None);
    let url = format!("{}/v1/models", sw.api_https_url());
    let response = client.get(&url).send().await.unwrap();
    peer_certificate(&response).expect("a certificate in the TLS info")
}
