//! Listeners: the API port, the admin port and, with `[server.transparent]`,
//! the port iptables redirects captured connections to; their accept
//! loops, HTTP/1.1 and HTTP/2 on every connection (cleartext, or on the
//! API port TLS with ALPN when `[server.tls]` is set), and graceful
//! shutdown.
//!
//! On shutdown the listeners close first, `/readyz` turns 503, and
//! in-flight requests get up to `server.shutdown_grace_s` to finish.
//!
//! Each request is served by the App that is live when it arrives
//! (`reconfigure::Live`), which a configuration reload replaces; the
//! listeners and connection settings stay as they were at start.
//!
//! The API listener enforces `server.max_connections` (and per client
//! address, `max_connections_per_ip`) by closing a connection over the
//! limit as soon as it is accepted: a client learns at once, instead of
//! waiting in the kernel's backlog; captured connections count against
//! the same limits. The admin listener has no such limit, so metrics and
//! health checks answer while the API port is full.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};

use crate::app::App;
use crate::body::{full, Body};
use crate::config::{BatchConfig, BatchMode, Config, PoolKind, ServerConfig};
use crate::connections::{Activity, ConnectionLimits, InFlight, Slot};
use crate::metrics::{CAPTURE_FAILURES, TLS_HANDSHAKE_FAILURES};
use crate::reconfigure::{AdminToken, Live, Reloader};
use crate::reload::{PolicyControl, Refusal, MAX_PLUGIN_BYTES};
use crate::tls::ServerTls;
use crate::transparent::{self, Capture};

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
/// How long a connection that has sent nothing yet may still send its
/// first request once shutdown has begun.
const SHUTDOWN_FIRST_BYTE: Duration = Duration::from_millis(500);
/// How long a closing connection with nothing in flight is left for its
/// client to close before it is cut off.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Runs Switchyard until `shutdown` resolves, then drains. `path` is the
/// file `config` came from, reloaded on SIGHUP, when it changes and on
/// `POST /admin/reload`; `None` for the embedded default.
pub async fn run(
    config: Config,
    path: Option<PathBuf>,
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
    let transparent_listener = match &config.server.transparent {
        Some(t) => Some(bind(t.listen, "server.transparent.listen").await?),
        None => None,
    };
    let transparent_addr = match &transparent_listener {
        Some(listener) => local_addr(listener)?.to_string(),
        None => "off".to_string(),
    };

    let plugin = policy
        .as_ref()
        .map(|p| format!("{} ({})", p.name(), p.version()));
    let app = Arc::new(App::new(&config, policy)?);
    let ledger = app.ledger();
    let live = Arc::new(Live::new(app));
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
            let capture = match pool.capture.as_slice() {
                [] => String::new(),
                list => format!(", captures {}", list.join(" ")),
            };
            format!(
                "{} -> {target} (model {}{batch}{capture})",
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
        transparent_addr = %transparent_addr,
        tls = tls_mode,
        pools = %pools.join("; "),
        plugin = plugin.as_deref().unwrap_or("none"),
        "listening"
    );
    if config.pool.is_empty() {
        tracing::warn!("no pools are configured; every API request gets 404");
    }
    if transparent_listener.is_some() && config.pool.iter().all(|p| p.capture.is_empty()) {
        tracing::warn!(
            "server.transparent is set but no pool has a `capture` list; \
             every captured connection gets 502"
        );
    }

    // Every connection holds a receiver: shutdown sends `true`, and the
    // drain is over once no receiver is left.
    let (stop, stopping) = watch::channel(false);
    let control = Arc::new(PolicyControl::new(Arc::clone(&live), &config));
    control.watch();
    let token = Arc::new(AdminToken::new(&config));
    let reloader = Arc::new(Reloader::new(
        path,
        config.clone(),
        Arc::clone(&live),
        Arc::clone(&control),
        Arc::clone(&token),
    ));
    reloader.watch_signal();
    reloader.watch_file();
    let admin_state = Arc::new(AdminState {
        live: Arc::clone(&live),
        metrics,
        control,
        token,
        reloader: Arc::clone(&reloader),
        ledger,
        ready: Arc::clone(&ready),
    });

    // A request keeps the App it started on to its end, whatever a
    // reload swaps in meanwhile.
    let api_live = Arc::clone(&live);
    let captured_live = Arc::clone(&live);
    let api_service = move |request: Request<Incoming>| {
        let app = api_live.app();
        async move { Ok::<_, std::convert::Infallible>(app.handle(request).await) }
    };
    let captured_service = move |capture: Arc<Capture>| {
        let live = Arc::clone(&captured_live);
        move |request: Request<Incoming>| {
            let app = live.app();
            let capture = Arc::clone(&capture);
            async move {
                let response = app.handle_captured(request, &capture).await;
                Ok::<_, std::convert::Infallible>(response)
            }
        }
    };
    let admin_service = move |request: Request<Incoming>| {
        let state = Arc::clone(&admin_state);
        async move { Ok::<_, std::convert::Infallible>(state.handle(request).await) }
    };

    tokio::pin!(shutdown);
    let builder = connection_builder(&config.server);
    let first_byte = Duration::from_millis(config.server.header_read_timeout_ms);
    let idle = Duration::from_millis(config.server.idle_timeout_ms);
    let write_timeout = Duration::from_millis(config.server.write_timeout_ms);
    let limits = ConnectionLimits::new(
        config.server.max_connections,
        config
            .server
            .max_connections_per_ip
            .unwrap_or(config.server.max_connections),
    );
    let tls = tls.map(|(tls, handshake)| {
        tls.watch();
        (TlsAcceptor::from(Arc::clone(&tls.config)), handshake)
    });
    let conn_for = |listener| Conn {
        builder: builder.clone(),
        stopping: stopping.clone(),
        idle,
        write_timeout,
        listener,
    };
    let mut accept_errors = AcceptErrors::default();
    loop {
        tokio::select! {
            accepted = api_listener.accept() => {
                let Some((stream, peer)) = accept_errors.check(accepted).await else {
                    continue;
                };

                // Over a limit, dropping the stream closes it now.
                let Some(slot) = admit(&limits, peer, "api") else {
                    continue;
                };
                let conn = conn_for("api");
                let service = api_service.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    // The slot is held for the connection's whole life.
                    let _slot = slot;
                    let Some((acceptor, handshake)) = tls else {
                        serve(stream, conn, service, first_byte).await;
                        return;
                    };
                    let Some(stream) = handshake_tls(stream, &acceptor, handshake).await
                    else {
                        return;
                    };
                    serve_tls(stream, conn, service, first_byte).await;
                });
            }
            accepted = accept_on(transparent_listener.as_ref()) => {
                let Some((stream, peer)) = accept_errors.check(accepted).await else {
                    continue;
                };

                // Captured connections count against the API limits: to
                // the client they are the same requests, only redirected.
                let Some(slot) = admit(&limits, peer, "transparent") else {
                    continue;
                };
                // The pool is chosen once per connection, by the capture
                // lists of the configuration serving when it opened.
                let capture = Arc::new(Capture::of(&stream, live.app().captures()));
                let conn = conn_for("transparent");
                let service = captured_service(Arc::clone(&capture));
                tokio::spawn(async move {
                    let _slot = slot;
                    serve_captured(stream, conn, service, first_byte, &capture).await;
                });
            }
            accepted = admin_listener.accept() => {
                let Some((stream, _peer)) = accept_errors.check(accepted).await else {
                    continue;
                };
                let conn = conn_for("admin");
                let service = admin_service.clone();
                tokio::spawn(async move {
                    serve(stream, conn, service, first_byte).await;
                });
            }
            () = &mut shutdown => break,
        }
    }

    // Stop taking connections, then let the ones we have finish.
    ready.store(false, Ordering::SeqCst);
    // Requests held for a cold pool would keep the drain waiting for a
    // start; they go to the fallback or get 503 now.
    live.app().retire_scalers();
    drop(api_listener);
    drop(admin_listener);
    drop(transparent_listener);
    let grace = reloader.shutdown_grace().await;
    tracing::info!(grace_s = grace.as_secs(), "shutting down; draining");
    drop(stopping);
    // No receiver left means no connection left, and then `send` fails;
    // that is no error here.
    let _ = stop.send(true);
    match tokio::time::timeout(grace, stop.closed()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            grace_s = grace.as_secs(),
            "connections still open after the grace period; closing them"
        ),
    }

    // Scaled pools' servers are children of this process: they stop with
    // it, SIGTERM first.
    // Limitation: only the serving configuration's scalers are stopped
    // this way; a pool dropped by a reload whose old requests still run
    // has its server killed when the runtime ends.
    live.app().stop_scalers().await;
    Ok(())
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))
}

/// The next connection on `listener`; never resolves without one, so an
/// unconfigured listener's `select!` branch stays quiet.
async fn accept_on(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, String> {
    listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))
}

/// A place in `limits` for a connection from `peer`, or `None` (logged)
/// when a limit is full.
fn admit(limits: &Arc<ConnectionLimits>, peer: SocketAddr, listener: &'static str) -> Option<Slot> {
    match limits.admit(peer.ip()) {
        Ok(slot) => Some(slot),
        Err(refused) => {
            tracing::debug!(
                peer = %peer,
                limit = refused.key(),
                listener,
                "connection limit reached; closing the new connection"
            );
            None
        }
    }
}

/// The HTTP settings every client connection is served with: the header
/// limits and timeouts of HTTP/1, the header and stream limits of h2.
fn connection_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    // Validation keeps max_header_bytes within 8 KiB..4 GiB, so neither
    // conversion truncates nor does hyper's 8 KiB minimum panic.
    let head_bytes = server.max_header_bytes as usize;
    let head_list = u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX);
    let mut builder = auto::Builder::new(TokioExecutor::new());

    // Limitation: over max_header_bytes or max_headers, hyper answers
    // HTTP/1 with a bare 431 (no body) and closes the connection; the
    // service never sees the request, so the answer cannot carry the
    // OpenAI error JSON. On h2 the h2 crate sends the bare 431 and then
    // resets the stream with REFUSED_STREAM, which clients such as curl
    // take as safe to retry.
    // Hyper's header timer also runs while a keep-alive connection waits
    // for its next request, so an idle HTTP/1 connection closes after
    // the shorter of header_read_timeout_ms and idle_timeout_ms.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(server.header_read_timeout_ms))
        .max_buf_size(head_bytes)
        .max_headers(server.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(head_list)
        .max_concurrent_streams(server.max_concurrent_streams);
    builder
}

/// How to serve one client connection once it is ready to read.
struct Conn {
    builder: auto::Builder<TokioExecutor>,
    /// Turns `true` on shutdown; held until the connection is closed.
    stopping: watch::Receiver<bool>,
    /// Time with no request in flight after which the connection closes.
    idle: Duration,
    /// Time a response may wait for a client that stopped reading.
    write_timeout: Duration,
    listener: &'static str,
}

/// Serves one connection until it closes. A client must send its first
/// byte within `first_byte`: hyper's own header timeout starts only once
/// it has seen a request line, so a silent connection would otherwise be
/// held for ever.
async fn serve<F, Fut>(stream: TcpStream, mut conn: Conn, service: F, first_byte: Duration)
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static,
{
    let Some(_) = first_byte_of(&stream, first_byte, &mut conn).await else {
        return;
    };
    serve_io(stream, conn, service).await;
}

/// Serves one connection redirected to the transparent listener, as
/// `serve` does, unless its client opens with a TLS handshake: captured
/// TLS is not decrypted, so such a connection is counted, logged and
/// closed, and the client sees its handshake fail.
async fn serve_captured<F, Fut>(
    stream: TcpStream,
    mut conn: Conn,
    service: F,
    first_byte: Duration,
    capture: &Capture,
) where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static,
{
    let Some(first) = first_byte_of(&stream, first_byte, &mut conn).await else {
        return;
    };
    if transparent::starts_tls(&[first]) {
        metrics::counter!(CAPTURE_FAILURES, "reason" => "tls").increment(1);
        let (pool, dst) = match capture {
            Capture::Pool { pool, dst } => (pool.as_str(), dst.to_string()),
            Capture::Refused(_) => ("none", "unknown".to_string()),
        };
        tracing::warn!(
            pool,
            original_dst = %dst,
            "captured connection opens a TLS handshake; captured TLS is not \
             decrypted, so it is closed (leave this port out of the iptables \
             rules, or point the client at server.listen)"
        );
        return;
    }
    serve_io(stream, conn, service).await;
}

/// Waits for the client's first byte, without consuming it; `None` when
/// the client closed or sent nothing in time (see [`before_first_byte`]).
async fn first_byte_of(stream: &TcpStream, timeout: Duration, conn: &mut Conn) -> Option<u8> {
    let peek = async {
        let mut probe = [0u8; 1];
        match stream.peek(&mut probe).await {
            Ok(read) if read > 0 => Some(probe[0]),
            Ok(_) | Err(_) => None,
        }
    };
    match before_first_byte(peek, timeout, &mut conn.stopping).await {
        Some(byte) => byte,
        None => {
            tracing::debug!(
                listener = conn.listener,
                "client sent nothing in time; closing"
            );
            None
        }
    }
}

/// Waits for `read`, the client's first bytes, up to `timeout`. Once
/// shutdown begins it waits `SHUTDOWN_FIRST_BYTE` more at most: a
/// connection a client opened but never used (HTTP clients open spares)
/// must not hold the drain for the whole header timeout. `None` when the
/// time ran out.
async fn before_first_byte<T>(
    read: impl Future<Output = T>,
    timeout: Duration,
    stopping: &mut watch::Receiver<bool>,
) -> Option<T> {
    tokio::pin!(read);
    let limit = tokio::time::sleep(timeout);
    tokio::pin!(limit);
    let mut shortened = false;
    loop {
        tokio::select! {
            value = &mut read => return Some(value),
            () = &mut limit => return None,
            // An error means the sender is gone, which happens only after
            // shutdown began.
            _ = stopping.changed(), if !shortened => {
                shortened = true;
                let sooner = tokio::time::Instant::now() + SHUTDOWN_FIRST_BYTE;
                if sooner < limit.deadline() {
                    limit.as_mut().reset(sooner);
                }
            }
        }
    }
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
async fn serve_tls<F, Fut>(
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    mut conn: Conn,
    service: F,
    first_byte: Duration,
) where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static,
{
    let mut stream = BufReader::new(stream);
    let fill = async { stream.fill_buf().await.is_ok_and(|read| !read.is_empty()) };
    match before_first_byte(fill, first_byte, &mut conn.stopping).await {
        Some(true) => {}
        Some(false) => return,
        None => {
            tracing::debug!(listener = "api", "client sent nothing in time; closing");
            return;
        }
    }
    serve_io(stream, conn, service).await;
}

/// Serves HTTP/1.1 or HTTP/2 (whichever the client speaks) on a ready
/// stream until it closes, shutdown ends it, or it has had no request in
/// flight for `conn.idle`. Both of the latter close it gracefully: an
/// HTTP/1 request in flight finishes first, h2 gets a GOAWAY.
async fn serve_io<I, F, Fut>(io: I, conn: Conn, service: F)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static,
{
    let Conn {
        builder,
        mut stopping,
        idle,
        write_timeout,
        listener,
    } = conn;

    // A request counts as in flight until its response body is dropped,
    // that is sent or abandoned, so a long stream is never idle.
    let activity = Activity::new();
    let tracked = Arc::clone(&activity);
    let service = Arc::new(service);
    let service = service_fn(move |request: Request<Incoming>| {
        let guard = tracked.begin();
        let activity = Arc::clone(&tracked);
        let service = Arc::clone(&service);
        async move {
            let response = service(request).await?;
            Ok::<_, std::convert::Infallible>(response.map(|inner| {
                TrackedBody {
                    inner,
                    activity,
                    unwritten: false,
                    _guard: guard,
                }
                .boxed()
            }))
        }
    });

    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut closing = false;
    // Once closing, a client that keeps the connection open with nothing
    // in flight (an h2 client that ignores GOAWAY, a half-sent header
    // block) is cut off after CLOSE_GRACE.
    let cut_off = tokio::time::sleep(Duration::MAX);
    tokio::pin!(cut_off);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(listener, error = %e, "connection closed");
                }
                return;
            }
            () = activity.idle_for(idle), if !closing => {
                tracing::debug!(
                    listener,
                    idle_ms = idle.as_millis() as u64,
                    "connection idle; closing"
                );
                connection.as_mut().graceful_shutdown();
                closing = true;
                cut_off.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            // An error means the sender is gone, which happens only
            // after shutdown began; either way, close.
            _ = stopping.changed(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
                cut_off.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            () = &mut cut_off, if closing => {
                if !activity.busy() {
                    tracing::debug!(listener, "client kept a closing connection open; cutting it off");
                    return;
                }
                cut_off.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            () = activity.stalled_for(write_timeout) => {
                // Dropping the connection drops its response bodies, and
                // with them the upstream requests and queue places they
                // hold.
                tracing::warn!(
                    listener,
                    write_timeout_ms = write_timeout.as_millis() as u64,
                    "client stopped reading its response; closing the connection"
                );
                metrics::counter!(crate::metrics::WRITE_TIMEOUTS).increment(1);
                return;
            }
        }
    }
}

/// A response body that keeps its request counted as in flight until it
/// is dropped. Every other call goes to `inner`, the size hint included,
/// so a fixed-length answer keeps its `content-length`.
struct TrackedBody {
    inner: Body,
    activity: Arc<Activity>,
    /// The last frame handed out has not been asked past yet.
    unwritten: bool,
    _guard: InFlight,
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if self.unwritten {
            self.activity.dropped_unwritten();
        }
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        // Being asked for a frame means the one before is written out.
        let had_unwritten = std::mem::take(&mut self.unwritten);
        self.activity.wrote(had_unwritten);
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(_))) = &polled {
            self.unwritten = true;
            self.activity.handed_out();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
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
    ) -> Option<(TcpStream, SocketAddr)> {
        let error = match accepted {
            Ok((stream, peer)) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                return Some((stream, peer));
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
    /// The serving configuration, for `/admin/pools`.
    live: Arc<Live>,
    metrics: PrometheusHandle,
    control: Arc<PolicyControl>,
    /// Guards every call that changes something.
    token: Arc<AdminToken>,
    reloader: Arc<Reloader>,
    ledger: Arc<crate::costs::Ledger>,
    ready: Arc<AtomicBool>,
}

impl AdminState {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        if request.uri().path().starts_with("/admin/policy") {
            return self.policy(request).await;
        }
        if request.uri().path() == "/admin/reload" {
            return self.reload(&request).await;
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
            "/admin/pools" => {
                let report = self.live.app().pools_report();
                json_reply(StatusCode::OK, &report)
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
        if let Err(refusal) = self.token.authorize(authorization) {
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
            (Method::POST, "/admin/policy/rollback") => self.control.rollback().await,
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

impl AdminState {
    /// `POST /admin/reload`: reloads the configuration file, as SIGHUP
    /// does, and answers what changed. Needs the bearer token.
    async fn reload(&self, request: &Request<Incoming>) -> Response<Body> {
        if request.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "POST only\n");
        }
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Err(refusal) = self.token.authorize(authorization) {
            return refused(refusal);
        }
        // On its own task: a client that leaves mid-way neither cuts the
        // reload short nor loses its log line and count.
        let reloader = Arc::clone(&self.reloader);
        match tokio::spawn(async move { reloader.reload("admin").await }).await {
            Ok(Ok(reloaded)) => json_reply(StatusCode::OK, &reloaded.to_json()),
            Ok(Err(refusal)) => refused(refusal),
            Err(e) => refused(Refusal {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("the reload task failed: {e}"),
            }),
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
        StatusCode::UNPROCESSABLE_ENTITY => ("invalid_request_error", "config_rejected"),
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
