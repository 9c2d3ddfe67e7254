//! Listeners: the API port and the admin port, their accept loops, HTTP/1.1
//! and HTTP/2 on every connection (cleartext, or on the API port TLS with
//! ALPN when `[server.tls]` is set), and graceful shutdown.
//!
//! On shutdown the listeners close first, `/readyz` turns 503, and
//! in-flight requests get up to `server.shutdown_grace_s` to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};

use crate::app::App;
use crate::body::{full, Body};
use crate::config::{BatchConfig, BatchMode, Config, PoolKind};
use crate::metrics::TLS_HANDSHAKE_FAILURES;
use crate::reload::{PolicyControl, Refusal, MAX_PLUGIN_BYTES};
use crate::tls::ServerTls;

/// How a coalescing pool batches, for the start-up line: mode, limits
/// and the endpoints where the upstream takes no arrays.
fn batch_summary(batch: &BatchConfig) -> String {
    let mode = match batch.mode {
        BatchMode::Adaptive => "adaptive",
        BatchMode::Fixed => "fixed",
    };
    let mut summary = format!(
        ", {mode} batch {} within {} ms, queue {}, {} in flight",
        batch.max_batch, batch.max_wait_ms, batch.max_queue, batch.max_inflight
    );
    for endpoint in ["completions", "embeddings"] {
        if !batch.array_endpoints.iter().any(|e| e == endpoint) {
            summary.push_str(&format!(", {endpoint} one item per request"));
        }
    }
    if batch.probe_arrays {
        summary.push_str(", probing arrays");
    }
    summary
}

/// Pause after a failed accept (out of file descriptors, say) before the
/// next, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Runs Switchyard until `shutdown` resolves, then drains.
pub async fn run(
    config: Config,
    policy: Option<switchyard_policy::Policy>,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    // Certificates load before binding, so a bad pair fails start-up
    // before anything could connect.
    let tls = match &config.server.tls {
        Some(settings) => {
            let tls = ServerTls::new(settings)
                .map_err(|e| format!("server.tls.{}: {}", e.field, e.message))?;
            let timeout = Duration::from_millis(settings.handshake_timeout_ms);
            Some((tls, timeout))
        }
        None => None,
    };
    let api_listener = bind(config.server.listen, "server.listen").await?;
    let admin_listener = bind(config.server.admin, "server.admin").await?;
    let api_addr = local_addr(&api_listener)?;
    let admin_addr = local_addr(&admin_listener)?;

    let plugin = policy
        .as_ref()
        .map(|p| format!("{} ({})", p.name(), p.version()));
    let app = Arc::new(App::new(&config, policy)?);
    let ready = Arc::new(AtomicBool::new(true));

    let pools: Vec<String> = config
        .pool
        .iter()
        .map(|pool| {
            let batch = pool.batch.as_ref().map_or(String::new(), batch_summary);
            let target = match pool.kind {
                PoolKind::Http => pool.endpoints.join(" "),
                PoolKind::Local => format!("local {}", pool.model_path().display()),
            };
            format!(
                "{} -> {target} (model {}{batch})",
                pool.name,
                pool.upstream_model()
            )
        })
        .collect();
    let tls_mode = match &config.server.tls {
        Some(settings) if settings.client_ca_path.is_some() => "mutual",
        Some(_) => "on",
        None => "off",
    };
    tracing::info!(
        api_addr = %api_addr,
        admin_addr = %admin_addr,
        tls = tls_mode,
        pools = %pools.join("; "),
        plugin = plugin.as_deref().unwrap_or("none"),
        "listening"
    );
    if config.pool.is_empty() {
        tracing::warn!("no pools are configured; every API request gets 404");
    }

    let graceful = GracefulShutdown::new();
    let control = Arc::new(PolicyControl::new(Arc::clone(&app), &config));
    control.watch();
    let admin_state = Arc::new(AdminState {
        metrics,
        control,
        ledger: app.ledger(),
        ready: Arc::clone(&ready),
    });

    let api_app = Arc::clone(&app);
    let api_service = move |request: Request<Incoming>| {
        let app = Arc::clone(&api_app);
        async move { Ok::<_, std::convert::Infallible>(app.handle(request).await) }
    };
    let admin_service = move |request: Request<Incoming>| {
        let state = Arc::clone(&admin_state);
        async move { Ok::<_, std::convert::Infallible>(state.handle(request).await) }
    };

    tokio::pin!(shutdown);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.server.header_read_timeout_ms));
    let first_byte = Duration::from_millis(config.server.header_read_timeout_ms);
    let tls = tls.map(|(tls, handshake)| {
        tls.watch();
        (TlsAcceptor::from(Arc::clone(&tls.config)), handshake)
    });
    let mut accept_errors = AcceptErrors::default();
    loop {
        tokio::select! {
            accepted = api_listener.accept() => {
                let Some(stream) = accept_errors.check(accepted).await else {
                    continue;
                };
                let service = service_fn(api_service.clone());
                let watcher = graceful.watcher();
                let builder = builder.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Some((acceptor, handshake)) = tls else {
                        serve(stream, builder, service, watcher, first_byte, "api").await;
                        return;
                    };
                    let Some(stream) = handshake_tls(stream, &acceptor, handshake).await
                    else {
                        return;
                    };
                    serve_tls(stream, builder, service, watcher, first_byte).await;
                });
            }
            accepted = admin_listener.accept() => {
                let Some(stream) = accept_errors.check(accepted).await else {
                    continue;
                };
                let service = service_fn(admin_service.clone());
                let watcher = graceful.watcher();
                let builder = builder.clone();
                tokio::spawn(async move {
                    serve(stream, builder, service, watcher, first_byte, "admin").await;
                });
            }
            () = &mut shutdown => break,
        }
    }

    // Stop taking connections, then let the ones we have finish.
    ready.store(false, Ordering::SeqCst);
    drop(api_listener);
    drop(admin_listener);
    let grace = Duration::from_secs(config.server.shutdown_grace_s);
    tracing::info!(grace_s = grace.as_secs(), "shutting down; draining");
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            grace_s = grace.as_secs(),
            "connections still open after the grace period; closing them"
        ),
    }
    Ok(())
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, String> {
    listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))
}

/// Serves one connection until it closes. A client must send its first
/// byte within `first_byte`: hyper's own header timeout starts only once
/// it has seen a request line, so a silent connection would otherwise be
/// held for ever.
// Limitation: an HTTP/2 connection that opens no stream after its preface
// is held until the client closes it; there is no idle timeout yet.
async fn serve<S>(
    stream: TcpStream,
    builder: auto::Builder<TokioExecutor>,
    service: S,
    watcher: Watcher,
    first_byte: Duration,
    listener: &'static str,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut probe = [0u8; 1];
    match tokio::time::timeout(first_byte, stream.peek(&mut probe)).await {
        Ok(Ok(read)) if read > 0 => {}
        Ok(Ok(_)) | Ok(Err(_)) => return,
        Err(_) => {
            tracing::debug!(listener, "client sent nothing in time; closing");
            return;
        }
    }

    serve_io(stream, builder, service, watcher, listener).await;
}

/// Runs the TLS handshake of an API connection, at most `timeout`. A
/// failure is counted and logged, and concerns this connection only:
/// at debug when the client went away or was silent (health checks do
/// that), at info when the handshake was refused (a client certificate
/// missing or untrusted, no common protocol).
async fn handshake_tls(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let peer = stream.peer_addr().ok();
    let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
    let error = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(error)) => error,
        Err(_) => {
            count_handshake_failure("timeout");
            tracing::debug!(
                peer = %peer,
                timeout_ms = timeout.as_millis() as u64,
                "tls handshake not completed in time; closing"
            );
            return None;
        }
    };
    let closed = matches!(
        error.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
    );
    if closed {
        count_handshake_failure("closed");
        tracing::debug!(peer = %peer, error = %error, "client left during the tls handshake");
    } else {
        count_handshake_failure("refused");
        tracing::info!(peer = %peer, error = %error, "tls handshake failed");
    }
    None
}

fn count_handshake_failure(reason: &'static str) {
    metrics::counter!(TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(1);
}

/// Serves one API connection after its TLS handshake. As on cleartext,
/// the first request byte must come within `first_byte`; the buffer that
/// waits for it is where hyper then reads from, so nothing is lost.
async fn serve_tls<S>(
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    builder: auto::Builder<TokioExecutor>,
    service: S,
    watcher: Watcher,
    first_byte: Duration,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut stream = BufReader::new(stream);
    match tokio::time::timeout(first_byte, stream.fill_buf()).await {
        Ok(Ok(read)) if !read.is_empty() => {}
        Ok(Ok(_)) | Ok(Err(_)) => return,
        Err(_) => {
            tracing::debug!(listener = "api", "client sent nothing in time; closing");
            return;
        }
    }
    serve_io(stream, builder, service, watcher, "api").await;
}

/// Serves HTTP/1.1 or HTTP/2 (whichever the client speaks) on a ready
/// stream until it closes or shutdown ends it.
async fn serve_io<I, S>(
    io: I,
    builder: auto::Builder<TokioExecutor>,
    service: S,
    watcher: Watcher,
    listener: &'static str,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = builder.serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(listener, error = %e, "connection closed");
    }
}

/// Handles failed accepts: pauses so the loop does not spin, and warns at
/// most once a second (running out of file descriptors fails every
/// accept).
#[derive(Debug, Default)]
struct AcceptErrors {
    last_warning: Option<std::time::Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    async fn check(
        &mut self,
        accepted: std::io::Result<(TcpStream, SocketAddr)>,
    ) -> Option<TcpStream> {
        let error = match accepted {
            Ok((stream, _peer)) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                return Some(stream);
            }
            Err(error) => error,
        };

        let now = std::time::Instant::now();
        let quiet = self
            .last_warning
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1));
        if quiet {
            self.suppressed += 1;
        } else {
            tracing::warn!(
                error = %error,
                failures_since_last_warning = self.suppressed,
                "accept failed; retrying"
            );
            self.last_warning = Some(now);
            self.suppressed = 0;
        }
        tokio::time::sleep(ACCEPT_BACKOFF).await;
        None
    }
}

/// What the admin port serves.
#[derive(Debug)]
struct AdminState {
    metrics: PrometheusHandle,
    control: Arc<PolicyControl>,
    ledger: Arc<crate::costs::Ledger>,
    ready: Arc<AtomicBool>,
}

impl AdminState {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        if request.uri().path().starts_with("/admin/policy") {
            return self.policy(request).await;
        }
        if request.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match request.uri().path() {
            "/metrics" => {
                let mut response = text(StatusCode::OK, self.metrics.render());
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/admin/costs" => {
                let mut response = text(StatusCode::OK, self.ledger.report().to_string());
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
            "/readyz" if self.ready.load(Ordering::SeqCst) => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

impl AdminState {
    /// `GET /admin/policy`, `PUT /admin/policy` (the plugin's bytes as the
    /// body) and `POST /admin/policy/rollback`; the last two need the
    /// bearer token.
    async fn policy(&self, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        if method == Method::GET && path == "/admin/policy" {
            return json_reply(StatusCode::OK, &self.control.status());
        }
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Err(refusal) = self.control.authorize(authorization) {
            return refused(refusal);
        }
        let result = match (method, path.as_str()) {
            (Method::PUT, "/admin/policy") => {
                let limited = Limited::new(request.into_body(), MAX_PLUGIN_BYTES);
                match limited.collect().await {
                    Ok(body) => self.control.install(body.to_bytes(), "admin").await,
                    Err(e) => Err(Refusal {
                        status: StatusCode::PAYLOAD_TOO_LARGE,
                        message: format!("could not read the plugin: {e}"),
                    }),
                }
            }
            (Method::POST, "/admin/policy/rollback") => self.control.rollback(),
            _ => {
                return text(StatusCode::NOT_FOUND, "not found\n");
            }
        };
        match result {
            Ok(version) => {
                let mut status = self.control.status();
                status["version"] = Value::from(version);
                json_reply(StatusCode::OK, &status)
            }
            Err(refusal) => refused(refusal),
        }
    }
}

/// A refused admin call, as an error in the OpenAI shape that the API
/// port uses too.
fn refused(refusal: Refusal) -> Response<Body> {
    let (kind, code) = match refusal.status {
        StatusCode::UNAUTHORIZED => ("authentication_error", "invalid_token"),
        StatusCode::FORBIDDEN => ("permission_error", "admin_disabled"),
        StatusCode::CONFLICT => ("invalid_request_error", "conflict"),
        StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", "body_too_large"),
        status if status.is_server_error() => ("server_error", "internal_error"),
        _ => ("invalid_request_error", "plugin_rejected"),
    };
    let error = json!({"error": {
        "message": refusal.message, "type": kind, "param": null, "code": code,
    }});
    json_reply(refusal.status, &error)
}

fn json_reply(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = text(status, value.to_string());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
