//! The scale calls: `kind = "webhook"` tells something else (an
//! autoscaler, a deploy hook) how many replicas a pool wants by POSTing
//! `{"pool", "replicas", "reason"}` to `pool.scaler.url`; `kind =
//! "kubernetes"` PATCHes the scale subresource of a Deployment
//! (`kubernetes`).
//!
//! This module only sends the calls and retries them; when to call and
//! what readiness means is the supervisor's (`scaling`).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::json;

use super::kubernetes;
use crate::config::{ScalerConfig, ScalerKind};

/// Time one call has to answer, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls made for one change of replicas before giving up.
const ATTEMPTS: u32 = 5;

/// Pause after the first failed call; it doubles after each failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Longest pause between two calls.
const MAX_BACKOFF: Duration = Duration::from_secs(4);

/// The scale calls of one scaled pool.
#[derive(Debug)]
pub(super) struct Webhook {
    pool: String,
    call: Call,
}

/// Where and how a pool's scale calls go.
#[derive(Debug)]
enum Call {
    /// `kind = "webhook"`: a POST to `url`.
    Post(Box<Post>),
    /// `kind = "kubernetes"`: a PATCH of a Deployment's scale.
    Kubernetes(Box<kubernetes::Target>),
}

/// A webhook's POST: where, and with which headers and token.
#[derive(Debug)]
struct Post {
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Environment variable of the bearer token, read at each call.
    token_env: Option<String>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Webhook {
    /// The calls of `pool`'s `webhook` or `kubernetes` scaler; fails when
    /// the URL, a header, the TLS setup or the API server is unusable.
    pub(super) fn new(pool: &str, config: &ScalerConfig) -> Result<Self, String> {
        let call = match config.kind {
            ScalerKind::Kubernetes => {
                Call::Kubernetes(Box::new(kubernetes::Target::new(config, CALL_TIMEOUT)?))
            }
            ScalerKind::Webhook | ScalerKind::Process | ScalerKind::None => {
                Call::Post(Box::new(Post::new(pool, config)?))
            }
        };
        Ok(Self {
            pool: pool.to_string(),
            call,
        })
    }

    /// Where the calls go, for logs.
    fn target(&self) -> String {
        match &self.call {
            Call::Post(post) => post.uri.to_string(),
            Call::Kubernetes(target) => target.describe(),
        }
    }
}

impl Post {
    /// The POST of a `webhook` scaler; fails when the URL, a header or
    /// the TLS setup is unusable.
    fn new(pool: &str, config: &ScalerConfig) -> Result<Self, String> {
        let Some(url) = &config.url else {
            return Err("pool.scaler.url is not set".to_string());
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("the scale URL {url:?} is not a URL: {e}"))?;
        let mut headers = Vec::with_capacity(config.headers.len());
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("pool.scaler.headers.{name}: {e}"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| format!("pool.scaler.headers.{name}: {e}"))?;
            headers.push((name, value));
        }

        // Only an https URL needs roots: the platform's.
        let tls = if uri.scheme_str() == Some("https") {
            crate::tls::client_config(pool, None)?
        } else {
            crate::tls::empty_client_config()
                .map_err(|e| format!("pool {pool:?}: tls setup failed: {e}"))?
        };
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(CALL_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            uri,
            headers,
            token_env: config.token_env.clone(),
            client,
        })
    }
}

impl Webhook {
    /// Asks for `replicas`, retrying a failed call with a doubling pause
    /// (250 ms up to 4 s) up to 5 calls. Returns the last error when all
    /// failed.
    pub(super) async fn scale(&self, replicas: u32, reason: &str) -> Result<(), String> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let error = match self.call_once(replicas, reason).await {
                Ok(()) => {
                    tracing::info!(
                        pool = %self.pool,
                        replicas,
                        reason,
                        attempt,
                        "scale call accepted"
                    );
                    return Ok(());
                }
                Err(error) => error,
            };
            if attempt >= ATTEMPTS {
                tracing::error!(
                    pool = %self.pool,
                    replicas,
                    attempts = attempt,
                    error = %error,
                    target = %self.target(),
                    "scale call failed; giving up"
                );
                return Err(error);
            }
            tracing::warn!(
                pool = %self.pool,
                replicas,
                attempt,
                retry_in_ms = backoff.as_millis() as u64,
                error = %error,
                "scale call failed; retrying"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }

    /// One call, bounded by the call timeout.
    async fn call_once(&self, replicas: u32, reason: &str) -> Result<(), String> {
        let call = async {
            match &self.call {
                Call::Post(post) => post.send(&self.pool, replicas, reason).await,
                Call::Kubernetes(target) => target.scale(replicas).await,
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| format!("{} did not answer within {CALL_TIMEOUT:?}", self.target()))?
    }
}

impl Post {
    /// One POST; a 2xx answer is success.
    async fn send(&self, pool: &str, replicas: u32, reason: &str) -> Result<(), String> {
        let body = json!({ "pool": pool, "replicas": replicas, "reason": reason });
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json");
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        if let Some(token) = self.token()? {
            request = request.header(header::AUTHORIZATION, token);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| format!("cannot build the request: {e}"))?;

        let response = self.client.request(request).await.map_err(|e| {
            let source = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            format!("cannot reach {}: {e}{source}", self.uri)
        })?;
        let status = response.status();

        // The body is read so that the connection can be reused, and
        // dropped: an autoscaler's answer is not ours to log.
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{} answered {status}", self.uri))
        }
    }

    /// `Bearer <token>` from `token_env`, when set.
    fn token(&self) -> Result<Option<HeaderValue>, String> {
        let Some(name) = &self.token_env else {
            return Ok(None);
        };
        let token = std::env::var(name).map_err(|_| {
            format!("pool.scaler.token_env names {name:?}, which is not set or not UTF-8")
        })?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            format!("the token in {name:?} (pool.scaler.token_env) is not a valid header value")
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }
}
