//! The scale calls: `kind = "webhook"` tells something else (an
//! autoscaler, a deploy hook) how many replicas a pool wants by POSTing
//! `{"pool", "replicas", "reason"}` to `pool.scaler.url`; `kind =
//! "kubernetes"` PATCHes the scale subresource of a Deployment.
//!
//! This module only sends the calls and retries them; when to call and
//! what readiness means is the supervisor's (`scaling`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::json;

use crate::config::{ScalerConfig, ScalerKind};

/// Where a pod finds its service account's token, CA and namespace.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Time one call has to answer, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls made for one change of replicas before giving up.
const ATTEMPTS: u32 = 5;

/// Pause after the first failed call; it doubles after each failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Longest pause between two calls.
const MAX_BACKOFF: Duration = Duration::from_secs(4);

/// Where a call's bearer token comes from.
#[derive(Debug, Clone)]
enum Token {
    None,
    /// An environment variable, read at each call.
    Env(String),
    /// A file, read at each call (the kubelet rotates service-account
    /// tokens).
    File(PathBuf),
}

/// The scale calls of one scaled pool: where, how, and with which
/// headers.
#[derive(Debug)]
pub(super) struct Webhook {
    pool: String,
    kind: ScalerKind,
    method: Method,
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    token: Token,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Webhook {
    /// The calls of `pool`'s `webhook` or `kubernetes` scaler; fails when
    /// the URL, a header, the token's source or the TLS setup is unusable.
    pub(super) fn new(pool: &str, config: &ScalerConfig) -> Result<Self, String> {
        let target = match config.kind {
            ScalerKind::Kubernetes => kubernetes_target(config)?,
            ScalerKind::Webhook | ScalerKind::Process | ScalerKind::None => webhook_target(config)?,
        };
        let uri: Uri = target
            .url
            .parse()
            .map_err(|e| format!("the scale URL {:?} is not a URL: {e}", target.url))?;
        let mut headers = Vec::with_capacity(config.headers.len());
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("pool.scaler.headers.{name}: {e}"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| format!("pool.scaler.headers.{name}: {e}"))?;
            headers.push((name, value));
        }

        // Only an https URL needs roots: the configured CA, else the
        // platform's.
        let tls = if uri.scheme_str() == Some("https") {
            let roots = match &target.ca_path {
                Some(path) => Some(crate::tls::read_roots(path)?),
                None => None,
            };
            client_config(pool, roots)?
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
            pool: pool.to_string(),
            kind: config.kind,
            method: target.method,
            uri,
            headers,
            token: target.token,
            client,
        })
    }

    /// Asks for `replicas`, retrying a failed call with a doubling pause
    /// (250 ms up to 4 s) up to 5 calls. Returns the last error when all
    /// failed.
    pub(super) async fn scale(&self, replicas: u32, reason: &str) -> Result<(), String> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let error = match self.call(replicas, reason).await {
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
                    url = %self.uri,
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

    /// One POST; a 2xx answer is success.
    async fn call(&self, replicas: u32, reason: &str) -> Result<(), String> {
        let (body, content_type) = match self.kind {
            ScalerKind::Kubernetes => (
                json!({ "spec": { "replicas": replicas } }),
                "application/merge-patch+json",
            ),
            ScalerKind::Webhook | ScalerKind::Process | ScalerKind::None => (
                json!({ "pool": self.pool, "replicas": replicas, "reason": reason }),
                "application/json",
            ),
        };
        let mut request = Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone())
            .header(header::CONTENT_TYPE, content_type);
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        if let Some(token) = self.token()? {
            request = request.header(header::AUTHORIZATION, token);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| format!("cannot build the request: {e}"))?;

        let call = async {
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
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| format!("{} did not answer within {CALL_TIMEOUT:?}", self.uri))?
    }

    /// `Bearer <token>` from `token_env` or the token file, when set.
    fn token(&self) -> Result<Option<HeaderValue>, String> {
        let (token, from) = match &self.token {
            Token::None => return Ok(None),
            Token::Env(name) => {
                let token = std::env::var(name).map_err(|_| {
                    format!("pool.scaler.token_env names {name:?}, which is not set or not UTF-8")
                })?;
                (token, format!("{name:?} (pool.scaler.token_env)"))
            }
            Token::File(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    format!(
                        "cannot read the service-account token {}: {e}",
                        path.display()
                    )
                })?;
                (token.trim().to_string(), path.display().to_string())
            }
        };
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| format!("the token in {from} is not a valid header value"))?;
        value.set_sensitive(true);
        Ok(Some(value))
    }
}

/// Where and how a scaler's calls go.
struct Target {
    url: String,
    method: Method,
    token: Token,
    ca_path: Option<PathBuf>,
}

/// `kind = "webhook"`: POST to `url`, with the token from `token_env`.
fn webhook_target(config: &ScalerConfig) -> Result<Target, String> {
    let Some(url) = &config.url else {
        return Err("pool.scaler.url is not set".to_string());
    };
    Ok(Target {
        url: url.clone(),
        method: Method::POST,
        token: config.token_env.clone().map_or(Token::None, Token::Env),
        ca_path: None,
    })
}

/// `kind = "kubernetes"`: PATCH the Deployment's scale subresource, on
/// `api_url` or the cluster's own API server, with the token from
/// `token_env` or the pod's service account.
// Limitation: this speaks to the scale subresource with Switchyard's own
// HTTP client rather than a Kubernetes client crate (kube-rs): kube and
// k8s-openapi would add a large dependency tree for one PATCH. There is
// no kubeconfig support, no watch of the Deployment's status (readiness
// comes from the probe), and a conflicting writer (an HPA) is not
// detected.
fn kubernetes_target(config: &ScalerConfig) -> Result<Target, String> {
    let account = Path::new(SERVICE_ACCOUNT_DIR);
    let Some(deployment) = &config.deployment else {
        return Err("pool.scaler.deployment is not set".to_string());
    };
    let namespace = match &config.namespace {
        Some(namespace) => namespace.clone(),
        None => std::fs::read_to_string(account.join("namespace"))
            .map(|ns| ns.trim().to_string())
            .map_err(|e| {
                format!(
                    "pool.scaler.namespace is not set and the pod's namespace file \
                     cannot be read ({e}); set pool.scaler.namespace"
                )
            })?,
    };

    // Outside a cluster everything comes from the configuration; inside,
    // from the environment and the service account.
    let (base, in_cluster) = match &config.api_url {
        Some(url) => (url.trim_end_matches('/').to_string(), false),
        None => {
            let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                "pool.scaler.api_url is not set and KUBERNETES_SERVICE_HOST is not \
                 either (not running in a pod?); set pool.scaler.api_url"
                    .to_string()
            })?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            (format!("https://{host}:{port}"), true)
        }
    };
    let token = match &config.token_env {
        Some(name) => Token::Env(name.clone()),
        None => Token::File(account.join("token")),
    };
    let ca_path = match &config.ca_path {
        Some(path) => Some(path.clone()),
        None if in_cluster => Some(account.join("ca.crt")),
        None => None,
    };
    Ok(Target {
        url: format!("{base}/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}/scale"),
        method: Method::PATCH,
        token,
        ca_path,
    })
}

/// A client configuration that trusts `roots`, else the platform's store.
fn client_config(
    pool: &str,
    roots: Option<rustls::RootCertStore>,
) -> Result<rustls::ClientConfig, String> {
    let Some(roots) = roots else {
        return crate::tls::client_config(pool, None);
    };
    rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| format!("pool {pool:?}: tls setup failed: {e}"))
}
