//! Upstream pools: the model servers behind each pool, the pooled HTTP
//! and HTTPS connections to them, and the translation of transport
//! failures into errors that name the pool.
//!
//! A pool sends a finished request body to one of its endpoints, chosen in
//! turn, and hands back the response as it arrives. It does not parse
//! bodies or decide routes.

use std::sync::atomic::{AtomicUsize, Ordering};
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

use crate::body::UpstreamBody;
use crate::config::PoolConfig;
use crate::error::{ApiError, ErrorKind};

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
    endpoints: Vec<UpstreamEndpoint>,
    next: AtomicUsize,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    request_timeout: Duration,
}

/// An upstream's answer, with how long it took to start.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub response: Response<Incoming>,
    pub endpoint: UpstreamEndpoint,
    /// Time from sending to the response headers.
    pub elapsed: Duration,
}

impl Pool {
    pub fn new(config: &PoolConfig) -> Result<Self, String> {
        let endpoints = config
            .endpoints
            .iter()
            .map(|url| parse_endpoint(url))
            .collect::<Result<Vec<_>, _>>()?;

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

        Ok(Self {
            name: config.name.clone(),
            model: config.upstream_model().to_string(),
            endpoints,
            next: AtomicUsize::new(0),
            client,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
        })
    }

    /// Sends `body` as a POST to `path` on the next endpoint and waits for
    /// the response headers, at most the pool's request timeout. The body
    /// of the response is not awaited: it streams.
    ///
    /// An endpoint that cannot be connected to never saw the request, so
    /// the next endpoint is tried, each at most once.
    // Limitation: a failing endpoint stays in the rotation; nothing ejects
    // it, so every turn of the rotation pays its connect attempt.
    pub async fn post(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, ApiError> {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.request_timeout;

        for attempt in 0..self.endpoints.len() {
            let endpoint = &self.endpoints[(first + attempt) % self.endpoints.len()];
            let request = self.build_request(endpoint, path, headers, body.clone())?;
            let sent = self.client.request(request);
            let error = match tokio::time::timeout_at(deadline, sent).await {
                Ok(Ok(response)) => {
                    return Ok(UpstreamResponse {
                        response,
                        endpoint: endpoint.clone(),
                        elapsed: started.elapsed(),
                    })
                }
                Ok(Err(e)) => e,
                Err(_) => {
                    let message = format!(
                        "pool {:?}: upstream {endpoint} did not answer within \
                         {} ms",
                        self.name,
                        self.request_timeout.as_millis()
                    );
                    return Err(ApiError::new(ErrorKind::UpstreamTimeout, message));
                }
            };

            let last = attempt + 1 == self.endpoints.len();
            if !error.is_connect() || last {
                return Err(self.transport_error(endpoint, &error));
            }
            tracing::warn!(
                pool = %self.name,
                upstream = %endpoint,
                error = %error_chain(&error),
                "cannot connect to upstream; trying the pool's next endpoint"
            );
        }
        Err(ApiError::new(
            ErrorKind::Internal,
            format!("pool {:?} has no endpoints", self.name),
        ))
    }

    /// Wraps an upstream response body so that a stall longer than the
    /// pool's request timeout cuts it off.
    pub fn watch_body(&self, body: Incoming) -> UpstreamBody<Incoming> {
        UpstreamBody::new(body, &self.name, self.request_timeout)
    }

    fn build_request(
        &self,
        endpoint: &UpstreamEndpoint,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ApiError> {
        let uri = endpoint
            .uri(path)
            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("bad upstream uri: {e}")))?;
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
        Ok(request)
    }

    fn transport_error(
        &self,
        endpoint: &UpstreamEndpoint,
        error: &hyper_util::client::legacy::Error,
    ) -> ApiError {
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
