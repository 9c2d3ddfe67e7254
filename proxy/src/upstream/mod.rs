//! Upstream pools: the model servers behind each pool, the pooled HTTP
//! and HTTPS connections to them, and the translation of transport
//! failures into errors that name the pool.
//!
//! A pool sends a finished request body to one of its endpoints, chosen in
//! turn, and hands back the response as it arrives. It keeps the pool
//! resilient: a request that never reached an upstream is retried on
//! another endpoint within a budget (`budget`), endpoints that keep
//! failing are ejected for a while (`endpoints`), active health checks
//! mark endpoints down and up (`health`), and a circuit breaker answers
//! for the whole pool while it fails (`circuit`). It does not parse
//! bodies or decide routes.

mod budget;
mod circuit;
mod endpoints;
mod health;
pub mod hop;
mod window;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use self::budget::RetryBudget;
use self::circuit::Circuit;
use self::endpoints::{Choice, Endpoints};
use crate::body::UpstreamBody;
use crate::config::{HealthConfig, PoolConfig};
use crate::error::{ApiError, ErrorKind};
use crate::metrics;

/// Idle upstream connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Headers that describe one hop, not the message, and must not be
/// forwarded (RFC 9110 section 7.6.1), plus those Switchyard rewrites.
const HOP_HEADERS: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// One upstream model server's base address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamEndpoint {
    /// `http` or `https`.
    scheme: Scheme,
    authority: Authority,
    /// Path prefix before `/v1/...`, without a trailing slash; usually "".
    prefix: String,
}

impl UpstreamEndpoint {
    fn uri(&self, path: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.prefix, path))
            .build()
    }
}

impl std::fmt::Display for UpstreamEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}

/// Parses an endpoint URL from the configuration. A trailing `/v1` is
/// accepted and dropped, since clients' base URLs are often written so.
pub fn parse_endpoint(url: &str) -> Result<UpstreamEndpoint, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => {
            return Err(format!(
                "{url:?} must start with http:// or https:// (for example \
                 http://127.0.0.1:8001)"
            ))
        }
    };
    let Some(authority) = uri.authority().cloned() else {
        return Err(format!("{url:?} has no host"));
    };
    // Credentials in the URL would be neither sent nor kept secret (they
    // appear in logs); they belong in headers.
    if authority.as_str().contains('@') {
        return Err("must not carry credentials (user:password@); send them \
                    as an authorization header from the client"
            .to_string());
    }
    if uri.query().is_some() {
        return Err(format!("{url:?} must not have a query string"));
    }
    let mut prefix = uri.path().trim_end_matches('/').to_string();
    let api_paths = ["/completions", "/embeddings", "/models"];
    if api_paths.iter().any(|api| prefix.ends_with(api)) {
        return Err(format!(
            "{url:?} names an API path; give the server's base URL \
             (for example http://127.0.0.1:8001/v1)"
        ));
    }
    if prefix.ends_with("/v1") {
        prefix.truncate(prefix.len() - 3);
    }
    Ok(UpstreamEndpoint {
        scheme,
        authority,
        prefix,
    })
}

/// A pool of interchangeable upstream servers.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    /// Written into each upstream request's `model` field.
    pub model: String,
    endpoints: Endpoints,
    next: AtomicUsize,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    request_timeout: Duration,
    try_timeout: Duration,
    total_timeout: Duration,
    max_retries: u32,
    budget: RetryBudget,
    circuit: Circuit,
    health: Option<HealthConfig>,
}

/// An upstream's answer, with how long it took to start.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub response: Response<Incoming>,
    pub endpoint: UpstreamEndpoint,
    /// Time from sending to the response headers.
    pub elapsed: Duration,
}

/// How one try ended when it brought no response.
#[derive(Debug)]
enum TryFailure {
    /// The request never reached the upstream; another endpoint may take
    /// it. The reason is the retry metric's label.
    NeverSent(&'static str, ApiError),
    /// The upstream may have seen the request: it is not sent again.
    Final(ApiError),
}

impl Pool {
    pub fn new(config: &PoolConfig) -> Result<Self, String> {
        let endpoints = config
            .endpoints
            .iter()
            .map(|url| parse_endpoint(url))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(format!("pool {:?} has no endpoints", config.name));
        }

        // The TCP connector must let https URIs through: TLS is layered
        // on top of it for those, and plain http goes as it is.
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_ms)));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let connector = https_connector(config, &endpoints, tcp)?;

        // ALPN decides per connection: h2 when the upstream offers it,
        // else HTTP/1.1; cleartext endpoints always get HTTP/1.1.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);

        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let try_timeout = config
            .try_timeout_ms
            .map_or(request_timeout, Duration::from_millis);
        let total_timeout = config
            .total_timeout_ms
            .map_or(request_timeout, Duration::from_millis);
        let retry = config.retry.clone().unwrap_or_default();
        let outlier = config.outlier.clone().unwrap_or_default();
        let circuit = config.circuit.clone().unwrap_or_default();
        Ok(Self {
            name: config.name.clone(),
            model: config.upstream_model().to_string(),
            endpoints: Endpoints::new(&config.name, endpoints, outlier, try_timeout),
            next: AtomicUsize::new(0),
            client,
            request_timeout,
            try_timeout,
            total_timeout,
            max_retries: retry.max_retries,
            budget: RetryBudget::new(&retry),
            circuit: Circuit::new(&config.name, &circuit),
            health: config.health.clone(),
        })
    }

    /// Starts the pool's active health checks, when `[pool.health]` asks
    /// for them. They stop when the pool is dropped.
    pub fn start_health_checks(self: &Arc<Self>) {
        if let Some(health) = self.health.clone() {
            let pool: Weak<Self> = Arc::downgrade(self);
            tokio::spawn(health::run(pool, health));
        }
    }

    /// Sends `body` as a POST to `path` on the next endpoint and waits for
    /// the response headers, at most the pool's try timeout per try and
    /// its total timeout in all. The body of the response is not awaited:
    /// it streams, so once its first bytes are out nothing is retried.
    ///
    /// A request that never reached an upstream (connection refused or
    /// failed, TLS failure, HTTP/2 stream refused) goes to another
    /// endpoint, at most `retry.max_retries` times and within the retry
    /// budget. One the upstream may have seen (a timeout after sending, a
    /// connection lost mid-answer) is not sent again: generating costs
    /// money and is not idempotent. While the pool's circuit is open, the
    /// request is refused at once.
    pub async fn post(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, ApiError> {
        let admission = match self.circuit.admit(tokio::time::Instant::now()) {
            Ok(admission) => admission,
            Err(wait) => return Err(self.circuit_open(wait)),
        };
        let sent = self.send(path, headers, body).await;
        let ok = sent
            .as_ref()
            .is_ok_and(|answer| !answer.response.status().is_server_error());
        admission.finish(ok);
        sent
    }

    /// The tries of one request, on endpoints chosen in turn.
    async fn send(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, ApiError> {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let now = tokio::time::Instant::now();
        let total_deadline = now + self.total_timeout;
        self.budget.record_request(now);

        let mut tried = Vec::new();
        loop {
            let now = tokio::time::Instant::now();
            let Some(choice) = self.endpoints.choose(first, &tried, now) else {
                let message = format!("pool {:?} has no endpoints", self.name);
                return Err(ApiError::new(ErrorKind::Internal, message));
            };
            tried.push(choice.index);
            let deadline = total_deadline.min(now + self.try_timeout);
            let request = self.build_request(choice, path, headers, body.clone())?;
            let failure = match self
                .try_once(choice, request, deadline, total_deadline)
                .await
            {
                Ok(response) => {
                    return Ok(UpstreamResponse {
                        response,
                        endpoint: self.endpoints.get(choice.index).clone(),
                        elapsed: started.elapsed(),
                    })
                }
                Err(failure) => failure,
            };

            // Only a request no upstream saw may go again, to an
            // endpoint it has not been to, while time and budget last.
            let (reason, error) = match failure {
                TryFailure::Final(error) => return Err(error),
                TryFailure::NeverSent(reason, error) => (reason, error),
            };
            let endpoint = self.endpoints.get(choice.index);
            let retries = tried.len() - 1;
            let untried_left = tried.len() < self.endpoints.len();
            let time_left = tokio::time::Instant::now() < total_deadline;
            if !untried_left || retries >= self.max_retries as usize || !time_left {
                if retries > 0 {
                    tracing::error!(
                        pool = %self.name,
                        upstream = %endpoint,
                        attempts = tried.len(),
                        error = %error.message,
                        "upstream request failed on every endpoint tried"
                    );
                }
                return Err(error);
            }
            if !self.budget.withdraw(tokio::time::Instant::now()) {
                metrics::record_retry_denied(&self.name, "budget");
                tracing::warn!(
                    pool = %self.name,
                    upstream = %endpoint,
                    error = %error.message,
                    "retry budget spent; not retrying on another endpoint"
                );
                return Err(error);
            }
            metrics::record_retry(&self.name, reason);
            tracing::warn!(
                pool = %self.name,
                upstream = %endpoint,
                reason,
                attempt = tried.len(),
                error = %error.message,
                "request never reached the upstream; retrying on the pool's next endpoint"
            );
        }
    }

    /// One try on one endpoint, recorded for outlier ejection.
    // Limitation: only how a try goes up to its response headers counts
    // for ejection and the circuit breaker; a body that breaks off or
    // stalls afterwards (cut off by `watch_body`) does not.
    async fn try_once(
        &self,
        choice: Choice,
        request: Request<Full<Bytes>>,
        deadline: tokio::time::Instant,
        total_deadline: tokio::time::Instant,
    ) -> Result<Response<Incoming>, TryFailure> {
        let endpoint = self.endpoints.get(choice.index);
        if choice.probe {
            tracing::info!(
                pool = %self.name,
                upstream = %endpoint,
                "ejection over; this request is the endpoint's recovery probe"
            );
        }
        let sent = tokio::time::timeout_at(deadline, self.client.request(request)).await;
        let now = tokio::time::Instant::now();
        match sent {
            Ok(Ok(response)) => {
                let ok = !response.status().is_server_error();
                self.endpoints.record(choice.index, ok, now);
                Ok(response)
            }
            Ok(Err(error)) => {
                self.endpoints.record(choice.index, false, now);
                let api_error = self.transport_error(endpoint, &error);
                match never_sent(&error) {
                    Some(reason) => Err(TryFailure::NeverSent(reason, api_error)),
                    None => Err(TryFailure::Final(api_error)),
                }
            }
            Err(_) => {
                self.endpoints.record(choice.index, false, now);
                let (limit, key) = if deadline == total_deadline {
                    (self.total_timeout, "total_timeout_ms")
                } else {
                    (self.try_timeout, "try_timeout_ms")
                };
                let message = format!(
                    "pool {:?}: upstream {endpoint} did not answer within \
                     {} ms (pool.{key})",
                    self.name,
                    limit.as_millis()
                );
                Err(TryFailure::Final(ApiError::new(
                    ErrorKind::UpstreamTimeout,
                    message,
                )))
            }
        }
    }

    /// The answer while the circuit is open: 503 at once, with when to
    /// come back.
    fn circuit_open(&self, wait: Duration) -> ApiError {
        let message = format!(
            "pool {:?}: circuit breaker open after repeated upstream \
             failures; retry in {} ms (pool.circuit)",
            self.name,
            wait.as_millis()
        );
        ApiError {
            retry_after: Some(wait),
            ..ApiError::new(ErrorKind::CircuitOpen, message)
        }
    }

    /// Sends one health check to endpoint `index`: whether it answered
    /// 2xx within the check's timeout.
    async fn check(&self, index: usize, health: &HealthConfig) -> bool {
        let timeout = Duration::from_millis(health.timeout_ms);
        self.get_ok(index, &health.path, timeout).await
    }

    /// Whether any endpoint answers a GET of `path` with 2xx within
    /// `timeout`: the readiness probe of a pool whose server a scaler
    /// starts. Endpoints are tried in order; ejections are not consulted.
    pub async fn probe(&self, path: &str, timeout: Duration) -> bool {
        for index in 0..self.endpoints.len() {
            if self.get_ok(index, path, timeout).await {
                return true;
            }
        }
        false
    }

    /// Whether any endpoint answers a one-token `/v1/completions`
    /// request for the pool's model with 2xx within `timeout`: the
    /// readiness probe that shows the server generates.
    pub async fn probe_completion(&self, timeout: Duration) -> bool {
        let body = serde_json::json!({
            "model": self.model,
            "prompt": "Hello",
            "max_tokens": 1,
        });
        let body = Bytes::from(body.to_string());
        for index in 0..self.endpoints.len() {
            let post = Some(body.clone());
            if self.probe_ok(index, "/v1/completions", post, timeout).await {
                return true;
            }
        }
        false
    }

    /// One GET of `path` on endpoint `index`: true for a 2xx answer.
    async fn get_ok(&self, index: usize, path: &str, timeout: Duration) -> bool {
        self.probe_ok(index, path, None, timeout).await
    }

    /// One GET of `path` on endpoint `index`, or a POST of the JSON
    /// `post`: true for a 2xx answer.
    async fn probe_ok(
        &self,
        index: usize,
        path: &str,
        post: Option<Bytes>,
        timeout: Duration,
    ) -> bool {
        let endpoint = self.endpoints.get(index);
        let Ok(uri) = endpoint.uri(path) else {
            return false;
        };
        let mut request = match post {
            Some(body) => {
                let mut request = Request::new(Full::new(body));
                *request.method_mut() = Method::POST;
                let json = HeaderValue::from_static("application/json");
                request.headers_mut().insert(header::CONTENT_TYPE, json);
                request
            }
            None => Request::new(Full::new(Bytes::new())),
        };
        *request.uri_mut() = uri;
        hop::mark(request.headers_mut());
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => response.status().is_success(),
            Ok(Err(error)) => {
                tracing::debug!(
                    pool = %self.name,
                    upstream = %endpoint,
                    error = %error_chain(&error),
                    "health check failed"
                );
                false
            }
            Err(_) => false,
        }
    }

    /// Wraps an upstream response body so that a stall longer than the
    /// pool's request timeout cuts it off.
    pub fn watch_body(&self, body: Incoming) -> UpstreamBody<Incoming> {
        UpstreamBody::new(body, &self.name, self.request_timeout)
    }

    fn build_request(
        &self,
        choice: Choice,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ApiError> {
        let uri =
            self.endpoints.get(choice.index).uri(path).map_err(|e| {
                ApiError::new(ErrorKind::Internal, format!("bad upstream uri: {e}"))
            })?;
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;

        // Headers the client named in `Connection` are for this hop only.
        let hop_only: Vec<String> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|name| name.trim().to_ascii_lowercase())
            .collect();
        let forwarded = request.headers_mut();
        for (name, value) in headers {
            if is_forwarded(name) && !hop_only.iter().any(|hop| hop == name.as_str()) {
                forwarded.append(name.clone(), value.clone());
            }
        }
        forwarded.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        // Says this process sent it, should it come back round.
        hop::mark(forwarded);
        Ok(request)
    }

    fn transport_error(
        &self,
        endpoint: &UpstreamEndpoint,
        error: &hyper_util::client::legacy::Error,
    ) -> ApiError {
        if is_parse_error(error) {
            let message = format!(
                "pool {:?}: upstream {endpoint} answered with something that \
                 is not HTTP: {}",
                self.name,
                error_chain(error)
            );
            return ApiError::new(ErrorKind::UpstreamInvalid, message);
        }
        let what = if error.is_connect() {
            "cannot connect to"
        } else {
            "lost the connection to"
        };
        let mut cause = error_chain(error);
        if let Some(hint) = crate::tls::certificate_hint(error) {
            cause.push_str(" (");
            cause.push_str(hint);
            cause.push(')');
        }
        let message = format!("pool {:?}: {what} upstream {endpoint}: {cause}", self.name);
        ApiError::new(ErrorKind::UpstreamUnavailable, message)
    }
}

/// The pool's connector: TLS with SNI and certificate checks for https
/// endpoints, plain TCP for http ones. The trusted roots are loaded only
/// when the pool has an https endpoint.
// Limitation: Switchyard presents no client certificate to upstreams, so
// an upstream that requires mutual TLS cannot be reached.
fn https_connector(
    config: &PoolConfig,
    endpoints: &[UpstreamEndpoint],
    tcp: HttpConnector,
) -> Result<HttpsConnector<HttpConnector>, String> {
    let any_https = endpoints.iter().any(|e| e.scheme == Scheme::HTTPS);
    let tls = if any_https {
        crate::tls::client_config(&config.name, config.tls.as_ref())?
    } else {
        crate::tls::empty_client_config()
            .map_err(|e| format!("pool {:?}: tls setup failed: {e}", config.name))?
    };
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let builder = match config.tls.as_ref().and_then(|t| t.server_name.as_deref()) {
        Some(name) => {
            let name = crate::tls::server_name(name)
                .map_err(|e| format!("pool {:?}: tls.server_name: {e}", config.name))?;
            builder.with_server_name_resolver(FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    Ok(builder.enable_http1().enable_http2().wrap_connector(tcp))
}

/// Whether a client request header goes upstream: hop-by-hop headers and
/// those Switchyard sets itself do not.
fn is_forwarded(name: &header::HeaderName) -> bool {
    let name = name.as_str();
    !HOP_HEADERS.contains(&name)
        && name != "content-length"
        && name != "content-type"
        && name != "accept-encoding"
        && name != "expect"
}

/// Copies upstream response headers that describe the message (not the
/// hop) onto a response for the client.
pub fn copy_response_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !HOP_HEADERS.contains(&name.as_str()) {
            to.append(name.clone(), value.clone());
        }
    }
}

/// Why a failed request is known never to have reached the upstream, or
/// `None` when it may have: a connection that could not be made (TCP or
/// TLS), or an HTTP/2 stream the upstream refused before processing it.
// Limitation: a GOAWAY that names the request's stream as unprocessed is
// not told apart from one that arrived after the upstream had it, so
// such a request is not retried here (hyper-util's own pool still resends
// requests whose pooled connection closed before they were written).
fn never_sent(error: &hyper_util::client::legacy::Error) -> Option<&'static str> {
    if error.is_connect() {
        return Some("connect");
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let refused = cause
            .downcast_ref::<h2::Error>()
            .is_some_and(|e| e.reason() == Some(h2::Reason::REFUSED_STREAM));
        if refused {
            return Some("refused_stream");
        }
        source = cause.source();
    }
    None
}

/// Whether the upstream's bytes could not be read as HTTP.
fn is_parse_error(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// An error and its causes on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_accept_a_v1_suffix() {
        let plain = parse_endpoint("http://127.0.0.1:8001").unwrap();
        let v1 = parse_endpoint("http://127.0.0.1:8001/v1/").unwrap();
        assert_eq!(plain, v1);
        let uri = plain.uri("/v1/completions").unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:8001/v1/completions");

        let prefixed = parse_endpoint("http://h:1/llm/v1").unwrap();
        let uri = prefixed.uri("/v1/embeddings").unwrap();
        assert_eq!(uri.to_string(), "http://h:1/llm/v1/embeddings");
    }

    #[test]
    fn https_endpoints_keep_their_scheme() {
        let endpoint = parse_endpoint("https://models.internal:8443/v1").unwrap();
        assert_eq!(endpoint.to_string(), "https://models.internal:8443");
        let uri = endpoint.uri("/v1/completions").unwrap();
        assert_eq!(
            uri.to_string(),
            "https://models.internal:8443/v1/completions"
        );
    }

    #[test]
    fn endpoint_urls_without_http_are_rejected() {
        let urls = [
            "127.0.0.1:8001",
            "ftp://h:1",
            "http://",
            "http://u:p@h:1",
            "http://h:1/v1/chat/completions",
        ];
        for url in urls {
            assert!(parse_endpoint(url).is_err(), "{url}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        assert!(!is_forwarded(&header::CONNECTION));
        assert!(!is_forwarded(&header::HOST));
        assert!(!is_forwarded(&header::CONTENT_LENGTH));
        assert!(is_forwarded(&header::AUTHORIZATION));
        assert!(is_forwarded(&header::HeaderName::from_static("x-tier")));
    }
}
