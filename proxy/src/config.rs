//! Configuration: the TOML file's schema, its defaults and its validation.
//!
//! Parsing is strict: an unknown key is an error, and every error names the
//! full key path (`pool[1].batch.max_wait_ms`) and, where the TOML parser
//! knows it, the line. Nothing here opens sockets or loads plugins; the
//! checks that touch the outside world stop at reading files: does the
//! plugin exist, do the TLS certificates and keys parse and match.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default API listener.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// Default admin listener (metrics, health).
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9901));
/// Default largest request body: 8 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
/// Default time a shutdown waits for in-flight requests: 30 s.
pub const DEFAULT_SHUTDOWN_GRACE_S: u64 = 30;
/// Default time a client has to send request headers, and its body: 30 s.
pub const DEFAULT_CLIENT_TIMEOUT_MS: u64 = 30_000;
/// Default largest request head (request line and headers): 64 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 64 * 1024;
/// Smallest `server.max_header_bytes` accepted: hyper's HTTP/1 read
/// buffer cannot be smaller than 8 KiB.
pub const MIN_MAX_HEADER_BYTES: u64 = 8 * 1024;
/// Default largest number of headers in a request: 100.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Default time an idle client connection is kept: 60 s.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Default time a response waits for a client that stopped reading: 30 s.
pub const DEFAULT_WRITE_TIMEOUT_MS: u64 = 30_000;
/// Default most open connections on the API listener: 10,000.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default most concurrent HTTP/2 streams on one connection: 100.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Default time to establish an upstream connection: 2 s.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Default time an upstream has to start its response: 300 s, because a
/// long generation without streaming answers only when it is done.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 300_000;
/// Default items per coalesced upstream request.
pub const DEFAULT_MAX_BATCH: usize = 8;
/// Default longest time a request waits for others to join its batch.
pub const DEFAULT_MAX_WAIT_MS: u64 = 50;
/// Default requests a coalescing pool holds waiting for the upstream.
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// Default upstream requests in flight per endpoint of a coalescing pool.
pub const DEFAULT_MAX_INFLIGHT: usize = 4;
/// Default longest a low-priority request can be passed over: 1 s.
pub const DEFAULT_STARVATION_MS: u64 = 1_000;
/// Default priority of a request without `x-switchyard-priority`.
pub const DEFAULT_PRIORITY: u8 = 5;
/// Default model file of a `local` pool, relative to the working directory;
/// `make model` fetches it.
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Default sequences a `local` pool decodes at once.
pub const DEFAULT_LOCAL_MAX_BATCH: usize = 8;
/// Default tokens per sequence of a `local` pool, prompt and answer.
pub const DEFAULT_LOCAL_CONTEXT: usize = 2048;
/// Default requests a `local` pool holds beyond its running batch.
pub const DEFAULT_LOCAL_MAX_QUEUE: usize = 64;
/// Default of `pool.default_max_tokens`.
pub const DEFAULT_LOCAL_CHAT_MAX_TOKENS: usize = 1024;
/// Most threads a `local` pool takes by default, however many cores there
/// are: past a few, the small model's matrices are too narrow to share.
const DEFAULT_LOCAL_THREADS_MAX: usize = 8;

/// The configuration `switchyard run` uses without `--config`: the small
/// model, in-process, on the default addresses, no policy.
pub const EMBEDDED_DEFAULT: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin = "127.0.0.1:9901"

[[pool]]
name = "small"
kind = "local"
model_path = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
"#;

/// Default of `server.tls.reload_interval_ms`: 5 s.
pub const DEFAULT_TLS_RELOAD_INTERVAL_MS: u64 = 5_000;
/// Default of `server.tls.handshake_timeout_ms`: 10 s.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Largest accepted `max_batch`; beyond it one upstream request would carry
/// more than any model server is built to take at once.
const MAX_BATCH_LIMIT: usize = 4096;
/// Largest accepted `max_wait_ms`: waiting longer only adds latency.
const MAX_WAIT_LIMIT_MS: u64 = 10_000;
/// Largest accepted `batch.max_queue`.
const MAX_QUEUE_LIMIT: usize = 1 << 20;
/// Largest accepted `batch.max_inflight`.
const MAX_INFLIGHT_LIMIT: usize = 4096;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// Model pools, in the order they are written (`[[pool]]`).
    #[serde(default)]
    pub pool: Vec<PoolConfig>,
    /// The routing plugin. Without it, a request's `model` names its pool.
    pub policy: Option<PolicyConfig>,
    /// The cost ledger's baseline.
    #[serde(default)]
    pub costs: CostsConfig,
    /// Who may change the running proxy through the admin port.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Reloading this file while serving.
    #[serde(default)]
    pub reload: ReloadConfig,
}

/// `[admin]`: the bearer token of the admin port's calls that change
/// something (`PUT /admin/policy`, `POST /admin/policy/rollback`, `POST
/// /admin/reload`). Without a token those calls are refused.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Environment variable holding the token; unset or empty turns the
    /// calls off. Default `SWITCHYARD_ADMIN_TOKEN` (or the deprecated
    /// `policy.admin_token_env` when that is set).
    pub token_env: Option<String>,
    /// The token itself, used in place of `token_env`. Prefer `token_env`:
    /// whoever can read this file can read the token. Default: none.
    pub token: Option<String>,
}

/// `[reload]`: reloading the configuration file while serving.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// How often the file is checked for a change (modification time and
    /// size, then its text), in milliseconds; a changed file is reloaded
    /// as on SIGHUP. 0 turns the check off. Default 2000.
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch_interval_ms: DEFAULT_WATCH_INTERVAL_MS,
        }
    }
}

/// `[costs]`: what the ledger compares the answers' cost with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostsConfig {
    /// A priced pool: every answer is also costed at its price, as if it
    /// had served everything. Default: none (no baseline, no savings).
    pub baseline: Option<String>,
    /// Put each non-streamed answer's cost (and, with a baseline, the
    /// baseline's) in response headers `x-switchyard-cost-usd` and
    /// `x-switchyard-baseline-cost-usd`. Such answers are then read whole
    /// before their headers go out. Default false.
    #[serde(default)]
    pub header: bool,
}

/// `pool.price`: per million tokens, or per hour of hardware.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Dollars per million prompt tokens. Default 0.
    pub input_per_mtok: Option<f64>,
    /// Dollars per million completion tokens. Default 0.
    pub output_per_mtok: Option<f64>,
    /// Dollars per hour of the pool's hardware, turned into a price per
    /// completion token with the pool's measured throughput. Not with the
    /// per-token keys.
    pub gpu_hour: Option<f64>,
}

/// `[server]`: listeners and request limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the OpenAI API listener. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    /// Default `127.0.0.1:9901`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Largest request body accepted, in bytes; larger ones get 413.
    /// Default 8 MiB.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// How long a shutdown waits for in-flight requests, in seconds.
    /// Default 30.
    #[serde(default = "default_shutdown_grace_s")]
    pub shutdown_grace_s: u64,
    /// Time a client has to send a request's headers, in milliseconds;
    /// past it the connection is closed. Default 30000.
    #[serde(default = "default_client_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Time a client has to send a request's whole body, in milliseconds;
    /// past it the request gets 408. Default 30000.
    #[serde(default = "default_client_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// Largest request head (request line and headers; on HTTP/2 the
    /// decoded header list), in bytes; over it the client gets 431. At
    /// least 8192. Default 65536.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: u64,
    /// Most headers in one HTTP/1 request; over it the client gets 431.
    /// Default 100.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Time a client connection may stay open with no request in flight,
    /// in milliseconds; past it the connection is closed (HTTP/2: with a
    /// GOAWAY). Default 60000.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Time a response may wait to be written to a client that stopped
    /// reading it, in milliseconds; past it the connection is closed and
    /// what the response held upstream is let go. Waiting on the upstream
    /// never counts. Default 30000.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Most connections open at once on the API listener; past it a new
    /// connection is accepted and closed at once. The admin listener is
    /// not counted. Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most API connections open at once from one client IP address, so
    /// that one client cannot take every connection; past it the new
    /// connection is closed at once. Default: `max_connections`.
    pub max_connections_per_ip: Option<usize>,
    /// Most concurrent streams (requests) on one HTTP/2 connection; the
    /// client is told and further streams are refused. Default 100.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// TLS on the API listener. Default: none (cleartext HTTP/1.1 and
    /// h2c). The admin listener stays cleartext.
    pub tls: Option<ServerTlsConfig>,
    /// The listener for connections that iptables redirected to
    /// Switchyard (transparent capture). Default: none.
    pub transparent: Option<TransparentConfig>,
}

/// `[server.transparent]`: the listener for redirected connections, each
/// served by the pool whose `capture` list holds the address it was
/// opened to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransparentConfig {
    /// Address of the listener. iptables' REDIRECT sends a pod's own
    /// outbound connections to 127.0.0.1 (IPv4) or ::1 (IPv6) at the
    /// rules' `--proxy-port`. Default `127.0.0.1:15001`.
    // Limitation: one address, so one family: REDIRECT sends IPv4 to
    // 127.0.0.1 and IPv6 to ::1, and capturing both would need two
    // listeners.
    #[serde(default = "default_transparent_listen")]
    pub listen: SocketAddr,
}

/// `[server.tls]`: TLS termination on the API listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM file with the certificate chain, the server's own certificate
    /// first. Reloaded when it changes.
    pub cert_path: PathBuf,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or
    /// SEC1). Reloaded when it changes.
    pub key_path: PathBuf,
    /// PEM bundle of the CAs that sign client certificates. When set,
    /// every client must present a certificate signed by one of them
    /// (mutual TLS). Default: none; no client certificate is asked for.
    pub client_ca_path: Option<PathBuf>,
    /// How often `cert_path` and `key_path` are checked for a change
    /// (modification time and size), in milliseconds; 0 turns reloading
    /// off. Default 5000.
    #[serde(default = "default_tls_reload_interval_ms")]
    pub reload_interval_ms: u64,
    /// Time a client has to complete the TLS handshake, in milliseconds;
    /// past it the connection is closed. Default 10000.
    #[serde(default = "default_tls_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
}

/// `[pool.tls]`: how a pool's `https://` endpoints are verified.
/// Certificate and host name checks are always on.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolTlsConfig {
    /// PEM bundle of the CAs trusted for the endpoints' certificates, in
    /// place of the platform's store. Default: the platform's store.
    pub ca_path: Option<PathBuf>,
    /// Name sent as SNI and that the endpoints' certificates must be
    /// issued for, in place of each endpoint's host. Default: the host.
    pub server_name: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin: default_admin(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            shutdown_grace_s: DEFAULT_SHUTDOWN_GRACE_S,
            header_read_timeout_ms: DEFAULT_CLIENT_TIMEOUT_MS,
            body_read_timeout_ms: DEFAULT_CLIENT_TIMEOUT_MS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            write_timeout_ms: DEFAULT_WRITE_TIMEOUT_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: None,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            tls: None,
            transparent: None,
        }
    }
}

/// What serves a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// Upstream model servers over HTTP (`endpoints`). The default.
    #[default]
    Http,
    /// The executor inside this process (`model_path`).
    Local,
}

/// `[[pool]]`: a set of interchangeable upstream model servers, or the
/// in-process executor (`kind = "local"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Name that routes and metrics use; unique among pools.
    pub name: String,
    /// `"http"` (default) or `"local"`.
    #[serde(default)]
    pub kind: PoolKind,
    /// Base URLs of the servers (`http://host:port`), used in turn. Only
    /// for `http` pools, which need at least one.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Written into the upstream request's `model` field. Default: the
    /// pool's name.
    pub model: Option<String>,
    /// Time to establish a connection, in milliseconds. Default 2000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time for the upstream to start answering, in milliseconds; past it
    /// the caller gets 504. Default 300000.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Time one try has for the upstream's response headers, in
    /// milliseconds; past it the caller gets 504 and the request is not
    /// retried (the upstream may be generating). Default:
    /// `request_timeout_ms`.
    pub try_timeout_ms: Option<u64>,
    /// Time all tries of one request have together for the response
    /// headers, in milliseconds; past it the caller gets 504. Default:
    /// `request_timeout_ms`.
    pub total_timeout_ms: Option<u64>,
    /// `[pool.retry]`: retries of requests that never reached an upstream.
    /// Default: the table's defaults.
    pub retry: Option<RetryConfig>,
    /// `[pool.outlier]`: ejection of endpoints that keep failing. Default:
    /// the table's defaults.
    pub outlier: Option<OutlierConfig>,
    /// `[pool.circuit]`: the pool's circuit breaker. Default: the table's
    /// defaults.
    pub circuit: Option<CircuitConfig>,
    /// `[pool.health]`: active health checks of each endpoint. Without
    /// this table there are none.
    pub health: Option<HealthConfig>,
    /// Coalescing of `/v1/completions` and `/v1/embeddings`. Without this
    /// table, requests go upstream one by one. Only for `http` pools.
    pub batch: Option<BatchConfig>,
    /// `local` pools: the GGUF model file, relative to the working
    /// directory. Default `models/SmolLM2-135M-Instruct.Q4_1.gguf`.
    pub model_path: Option<PathBuf>,
    /// `local` pools: threads for the model's arithmetic. Default: the
    /// machine's cores, at most 8.
    pub threads: Option<usize>,
    /// `local` pools: where the model runs: `"auto"` (the first GPU when
    /// a driver and a device are usable, else the CPU), `"cpu"`, `"cuda"`
    /// or `"cuda:N"` (that GPU, or the pool does not start). Default
    /// `"auto"`.
    pub device: Option<String>,
    /// `local` pools: most sequences decoded at once. Default 8.
    pub max_batch: Option<usize>,
    /// `local` pools: most tokens per sequence, prompt and answer
    /// together. Default 2048, at most the model's own context.
    pub context: Option<usize>,
    /// `local` pools: most requests waiting beyond the running batch; past
    /// it requests get 429 with `Retry-After`. Default 64.
    pub max_queue: Option<usize>,
    /// `local` pools: most tokens of a chat answer whose request sets no
    /// `max_tokens`, so that a small model that never says it is done
    /// does not hold a place to the end of the context. Completions
    /// default to 16, as OpenAI's do. Default 1024.
    pub default_max_tokens: Option<usize>,
    /// The pool's price, for the cost ledger. Default: none (its answers
    /// cost nothing).
    pub price: Option<PriceConfig>,
    /// TLS to `https://` endpoints. Default: the platform's CA store and
    /// each endpoint's host name. Only for pools with an https endpoint.
    pub tls: Option<PoolTlsConfig>,
    /// Destinations whose captured connections this pool serves, as
    /// `ADDR:PORT` with an IPv4 address or CIDR block, or a bracketed
    /// IPv6 one (`10.0.0.5:8000`, `10.0.1.0/24:8000`, `[fd00::5]:8000`).
    /// Needs `[server.transparent]`. Default: none.
    #[serde(default)]
    pub capture: Vec<String>,
    /// `[pool.scaler]`: scale-to-zero of the pool's model server. Without
    /// this table the pool is always up. Only for `http` pools.
    pub scaler: Option<ScalerConfig>,
    /// The pool that answers a request which cannot wait for this pool's
    /// cold start (its deadline ends before the expected ready time), or
    /// whose start failed. Needs `[pool.scaler]`; must name another pool
    /// without a scaler. Default: none (such requests get 503).
    pub fallback: Option<String>,
    /// Deadline of a request to this pool that sends no
    /// `x-switchyard-deadline-ms` header, in milliseconds from arrival;
    /// the activator compares it with the expected cold start. Needs
    /// `[pool.scaler]`. Default: none (the request waits for the start).
    pub default_deadline_ms: Option<u64>,
}

impl PoolConfig {
    /// The model name sent upstream.
    pub fn upstream_model(&self) -> &str {
        self.model.as_deref().unwrap_or(&self.name)
    }

    /// A `local` pool's model file.
    pub fn model_path(&self) -> PathBuf {
        self.model_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL_PATH))
    }

    /// A `local` pool's executor settings, defaults filled in.
    pub fn engine_config(&self) -> switchyard_executor::engine::EngineConfig {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        switchyard_executor::engine::EngineConfig {
            name: self.name.clone(),
            model_path: self.model_path(),
            threads: self.threads.unwrap_or(cores.min(DEFAULT_LOCAL_THREADS_MAX)),
            max_batch: self.max_batch.unwrap_or(DEFAULT_LOCAL_MAX_BATCH),
            context: self.context.unwrap_or(DEFAULT_LOCAL_CONTEXT),
            max_queue: self.max_queue.unwrap_or(DEFAULT_LOCAL_MAX_QUEUE),
            prefill_chunk: switchyard_executor::engine::DEFAULT_PREFILL_CHUNK,
            // Checked by `validate_local_pool`.
            device: self
                .device
                .as_deref()
                .and_then(|d| d.parse().ok())
                .unwrap_or_default(),
        }
    }
}

/// What brings a scaled pool's model server up and down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScalerKind {
    /// Switchyard runs `command` as a child process. The default.
    #[default]
    Process,
    /// Something else starts and stops the server; Switchyard only
    /// follows its readiness and holds requests while it is not ready.
    None,
    /// Switchyard POSTs the replicas it wants to `url` (an autoscaler,
    /// a deploy hook) and follows readiness as with `none`.
    Webhook,
    /// Switchyard sets the replicas of a Deployment through the
    /// Kubernetes scale subresource and follows readiness as with `none`.
    Kubernetes,
}

impl ScalerKind {
    /// The kind as written in the configuration.
    pub fn label(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::None => "none",
            Self::Webhook => "webhook",
            Self::Kubernetes => "kubernetes",
        }
    }
}

/// `[pool.scaler]`: the pool's model server runs only while it has work.
/// A request for a pool that is not ready is held while it starts; the
/// server stops after `idle_timeout_s` without requests.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalerConfig {
    /// `"process"` (default), `"none"`, `"webhook"` or `"kubernetes"`.
    #[serde(default)]
    pub kind: ScalerKind,
    /// `webhook`: the `http://` or `https://` URL that is POSTed
    /// `{"pool", "replicas", "reason"}` when the pool should come up
    /// (`min_replicas`, at least 1), step with load, or go down (0).
    pub url: Option<String>,
    /// `webhook`: headers added to each POST. Default: none.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `webhook`, `kubernetes`: environment variable holding a token sent
    /// as `Authorization: Bearer <token>`, read at each call. Default:
    /// none (`kubernetes`: the pod's service-account token).
    pub token_env: Option<String>,
    /// `kubernetes`: the Deployment whose replicas are set.
    pub deployment: Option<String>,
    /// `kubernetes`: the Deployment's namespace. Default: the pod's own.
    pub namespace: Option<String>,
    /// `kubernetes`: the API server's `https://` (or `http://`) URL.
    /// Default: the kubeconfig's (`kubeconfig`, else `KUBECONFIG`), else
    /// the cluster's own, from `KUBERNETES_SERVICE_HOST` and
    /// `KUBERNETES_SERVICE_PORT` with the pod's service account.
    pub api_url: Option<String>,
    /// `kubernetes`: a kubeconfig file whose cluster and user are used.
    /// Default: the files `KUBECONFIG` names, else the pod's service
    /// account.
    pub kubeconfig: Option<PathBuf>,
    /// `kubernetes`: the kubeconfig context to use. Default: its
    /// `current-context`.
    pub context: Option<String>,
    /// `kubernetes`: PEM file of the CA that signed the API server's
    /// certificate. Default: the service account's `ca.crt` in a pod,
    /// else the platform's roots.
    pub ca_path: Option<PathBuf>,
    /// `process`: the program and its arguments, run without a shell.
    #[serde(default)]
    pub command: Vec<String>,
    /// `process`: variables added to Switchyard's own environment.
    /// Default: none.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `process`: working directory. Default: Switchyard's.
    pub cwd: Option<PathBuf>,
    /// Seconds without a request in flight after which the server is
    /// stopped. Default 300.
    #[serde(default = "default_scaler_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// Seconds a started server stays up at least, however idle. Default
    /// 60.
    #[serde(default = "default_scaler_min_up_s")]
    pub min_up_s: u64,
    /// Replicas kept up however idle: 0 starts the server on the first
    /// request and stops it when idle; 1 or more start at boot and never
    /// go below it. More than 1 needs `max_replicas` at least as high
    /// (not with `process`). Default 0.
    #[serde(default)]
    pub min_replicas: u32,
    /// Most replicas asked for when queue wait or in-flight requests go
    /// over their targets. Only for `none`, `webhook` and `kubernetes`,
    /// where replicas are a number that something else acts on; the
    /// `process` scaler runs one server. Default 1.
    #[serde(default = "default_scaler_max_replicas")]
    pub max_replicas: u32,
    /// Most requests in flight to each replica at once; more wait, held
    /// like requests for a cold pool, and are let through in deadline
    /// order as earlier ones finish. The pool's limit is this times the
    /// replicas asked for. Default 64.
    #[serde(default = "default_scaler_max_in_flight")]
    pub max_in_flight: usize,
    /// Requests in flight per replica at which one more replica is asked
    /// for (up to `max_replicas`). Default: `max_in_flight`.
    pub target_in_flight: Option<usize>,
    /// Milliseconds the longest-held request of a ready pool may wait
    /// before one more replica is asked for. Default 1000.
    #[serde(default = "default_scaler_target_queue_wait_ms")]
    pub target_queue_wait_ms: u64,
    /// Seconds with nothing in flight or held, and since the last change
    /// of replicas, before one replica fewer is asked for; each further
    /// step waits as long again. Default 60.
    #[serde(default = "default_scaler_scale_down_after_s")]
    pub scale_down_after_s: u64,
    /// Seconds a start has to answer the readiness probe; past it the
    /// start has failed. Default 600.
    #[serde(default = "default_scaler_ready_timeout_s")]
    pub ready_timeout_s: u64,
    /// Path GET on the pool's endpoints; a 2xx answer means ready.
    /// Default `/v1/models`.
    #[serde(default = "default_health_path")]
    pub probe_path: String,
    /// What readiness means: `"get"`, a 2xx answer to a GET of
    /// `probe_path`; `"completion"`, that and then a one-token
    /// `/v1/completions` request that answers 2xx. Default `"get"`.
    #[serde(default)]
    pub probe: ProbeKind,
    /// Seconds the one-token completion of `probe = "completion"` has to
    /// answer (a first generation may compile kernels). Default 30.
    #[serde(default = "default_scaler_completion_probe_timeout_s")]
    pub completion_probe_timeout_s: u64,
    /// Milliseconds between readiness probes while starting; the gap
    /// grows by half after each failed probe, up to 4 times this.
    /// Default 500.
    #[serde(default = "default_scaler_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// Expected cold start, in seconds, until starts have been measured
    /// (then the 90th percentile of recent starts is used): requests
    /// whose deadline ends sooner go to the fallback, and refused ones
    /// are told to retry after it. Default: `ready_timeout_s` for
    /// deadlines; for `Retry-After`, the longest gap between two probes.
    pub cold_start_estimate_s: Option<u64>,
    /// Most requests held while the server starts; past it requests get
    /// 503 with `Retry-After`. Default 256.
    #[serde(default = "default_scaler_max_held")]
    pub max_held: usize,
    /// `process`: seconds between SIGTERM and SIGKILL when stopping.
    /// Default 10.
    #[serde(default = "default_scaler_stop_grace_s")]
    pub stop_grace_s: u64,
    /// `[[pool.scaler.schedule]]`: windows in which the pool is kept up
    /// (started if cold, never idled down). Default: none.
    #[serde(default)]
    pub schedule: Vec<ScheduleConfig>,
}

/// What a scaled pool's readiness probe asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// A GET of `probe_path` answers 2xx. The default.
    #[default]
    Get,
    /// That, and then a `/v1/completions` request for the pool's model
    /// with `max_tokens: 1` answers 2xx: the weights are loaded and the
    /// server generates.
    Completion,
}

/// `[[pool.scaler.schedule]]`: a weekly window in which the pool wants at
/// least `min_replicas`; outside every window the scaler's own
/// `min_replicas` applies.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Days the window starts on: `"mon"` to `"sun"`. Default: every day.
    #[serde(default = "default_schedule_days")]
    pub days: Vec<String>,
    /// Local start time, `"HH:MM"`.
    pub start: String,
    /// Local end time, `"HH:MM"` (`"24:00"` for midnight); at or before
    /// `start`, the window ends on the next day.
    pub end: String,
    /// IANA time zone of `start` and `end`, such as `"Europe/Berlin"`;
    /// daylight saving is followed. Default `"UTC"`.
    #[serde(default = "default_schedule_timezone")]
    pub timezone: String,
    /// Replicas wanted inside the window: 0 or 1. Default 1.
    #[serde(default = "default_schedule_min_replicas")]
    pub min_replicas: u32,
}

/// `[pool.retry]`: a request that never reached an upstream (connection
/// refused or failed, TLS failure, HTTP/2 stream refused) goes to another
/// endpoint, within a budget so that retries cannot multiply an outage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Most retries of one request; 0 turns retries off. Default 2.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Retries may add at most this percentage to the pool's requests of
    /// the last 10 s. Default 20.
    #[serde(default = "default_budget_percent")]
    pub budget_percent: u32,
    /// Retries per second allowed whatever the percentage says, so that a
    /// quiet pool can still retry. Default 3.
    #[serde(default = "default_min_retries_per_s")]
    pub min_retries_per_s: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: default_max_retries(),
            budget_percent: default_budget_percent(),
            min_retries_per_s: default_min_retries_per_s(),
        }
    }
}

/// `[pool.outlier]`: passive ejection of an endpoint whose requests keep
/// failing (connection errors, timeouts, 5xx answers).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Failures in a row that eject an endpoint; 0 turns ejection off.
    /// Default 5.
    #[serde(default = "default_outlier_failures")]
    pub consecutive_failures: u32,
    /// How long the first ejection lasts, in milliseconds; each ejection
    /// that follows soon after lasts twice the one before. Default 30000.
    #[serde(default = "default_ejection_ms")]
    pub ejection_ms: u64,
    /// Longest an ejection lasts, in milliseconds. Default 300000.
    #[serde(default = "default_max_ejection_ms")]
    pub max_ejection_ms: u64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: default_outlier_failures(),
            ejection_ms: default_ejection_ms(),
            max_ejection_ms: default_max_ejection_ms(),
        }
    }
}

/// `[pool.circuit]`: when too many of the pool's requests fail, the pool
/// answers 503 at once for a while instead of piling requests onto it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitConfig {
    /// Percentage of failed requests over `window_ms` that opens the
    /// circuit; 0 turns the breaker off. Default 50.
    #[serde(default = "default_failure_percent")]
    pub failure_percent: u32,
    /// Fewest requests in the window before the percentage counts.
    /// Default 20.
    #[serde(default = "default_circuit_min_requests")]
    pub min_requests: u64,
    /// The window failures are counted over, in milliseconds. Default
    /// 10000.
    #[serde(default = "default_circuit_window_ms")]
    pub window_ms: u64,
    /// How long the circuit stays open, in milliseconds. Default 5000.
    #[serde(default = "default_open_ms")]
    pub open_ms: u64,
    /// Requests let through once `open_ms` is over; all must succeed to
    /// close the circuit, and one failure opens it again. Default 3.
    #[serde(default = "default_half_open_requests")]
    pub half_open_requests: u32,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            failure_percent: default_failure_percent(),
            min_requests: default_circuit_min_requests(),
            window_ms: default_circuit_window_ms(),
            open_ms: default_open_ms(),
            half_open_requests: default_half_open_requests(),
        }
    }
}

/// `[pool.health]`: a GET to each endpoint every `interval_ms`; an
/// endpoint that fails `unhealthy_threshold` checks in a row is not
/// chosen until it passes `healthy_threshold` in a row.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Path checked, after the endpoint's base URL. A 2xx answer passes.
    /// Default `/v1/models`.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Time between two checks of an endpoint, in milliseconds. Default
    /// 5000.
    #[serde(default = "default_health_interval_ms")]
    pub interval_ms: u64,
    /// Time a check has to answer, in milliseconds. Default 1000.
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: u64,
    /// Failed checks in a row that mark an endpoint down. Default 3.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that mark it up again. Default 2.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
}

/// `[pool.batch]`: how requests are queued and coalesced.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// `"adaptive"` (default): send a batch as soon as waiting longer no
    /// longer pays, by the upstream's fitted cost; `"fixed"`: wait for
    /// `max_batch` items or `max_wait_ms`, whichever comes first.
    #[serde(default)]
    pub mode: BatchMode,
    /// Most prompt or input items in one upstream request. Default 8.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Most estimated tokens in one upstream request (prompt tokens, about
    /// 4 characters each, plus `max_tokens` × `n`). Default: no limit.
    pub max_batch_tokens: Option<u64>,
    /// Longest time a request waits for others to join, in milliseconds;
    /// a hard bound in both modes. Default 50.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Most requests waiting for the upstream; past it requests get 429
    /// (503 while the pool is unavailable) with `Retry-After`. Default 256.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Most upstream requests in flight per endpoint (completions,
    /// embeddings, chat); the rest wait in the queue. Default 4.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// Longest a request waits while higher priorities go first, in
    /// milliseconds; past it, it goes before them. Default 1000.
    #[serde(default = "default_starvation_ms")]
    pub starvation_ms: u64,
    /// Header whose value names a request's tenant for fair sharing.
    /// Default: the `Authorization` bearer token.
    pub tenant_header: Option<String>,
    /// Weight of each tenant (by `tenant_header` value) in fair sharing;
    /// a tenant not listed weighs 1.
    #[serde(default)]
    pub tenant_weights: BTreeMap<String, u32>,
    /// Endpoints whose upstream takes a prompt or input array:
    /// `"completions"`, `"embeddings"`. On the others one item goes per
    /// upstream request. Default both.
    #[serde(default = "default_array_endpoints")]
    pub array_endpoints: Vec<String>,
    /// Ask the upstream at start-up whether it takes arrays on
    /// `array_endpoints`, and send one item per request where it does
    /// not. Default false.
    #[serde(default)]
    pub probe_arrays: bool,
    /// Send identical embeddings inputs of one batch upstream once.
    /// Default true.
    #[serde(default = "default_true")]
    pub collapse_embeddings: bool,
    /// Send identical completions prompts of one batch upstream once when
    /// the answer is deterministic (`temperature` 0 or a `seed`). Default
    /// false.
    #[serde(default)]
    pub collapse_completions: bool,
}

/// When a coalescing pool sends a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchMode {
    /// Cost-model driven, bounded by `max_wait_ms`. The default.
    #[default]
    Adaptive,
    /// At `max_batch` items or after `max_wait_ms`.
    Fixed,
}

/// `[policy]`: the WebAssembly routing plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Path of the compiled plugin, relative to the working directory.
    pub plugin: PathBuf,
    /// Handed to the plugin's `init` as JSON. Default: an empty table.
    #[serde(default = "empty_table")]
    pub config: toml::Table,
    /// Pool for requests whose plugin call failed (trap, timeout, memory)
    /// and whose `model` names no pool. Default: none, so those requests
    /// get 404.
    pub fallback_pool: Option<String>,
    /// Budget of one call into the plugin, in milliseconds; a call past it
    /// is stopped and the request takes the default route. Default 50.
    #[serde(default = "default_policy_timeout_ms")]
    pub timeout_ms: u64,
    /// Largest memory of one plugin instance, in bytes. Default 64 MiB.
    #[serde(default = "default_policy_max_memory_bytes")]
    pub max_memory_bytes: u64,
    /// How small-first requests (a route with `escalate-to`) are served.
    #[serde(default)]
    pub cascade: CascadeConfig,
    /// How often the plugin file is checked for a new version, in
    /// milliseconds; 0 turns the check off. Default 2000.
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
    /// Deprecated alias of `admin.token_env`, kept so that older files
    /// still load; not with `admin.token_env`. Default: none.
    pub admin_token_env: Option<String>,
    /// What a failed plugin call (trap, timeout, memory) leads to:
    /// `"default-route"` (the default: the pool the `model` names, else
    /// `fallback_pool`), `"reject"` (503, code `policy_failed`) or
    /// `"previous"` (the previous plugin version decides, when there is
    /// one).
    #[serde(default)]
    pub on_error: OnError,
    /// Share of failed calls (0 to 1) past which a plugin version that
    /// was swapped in is rolled back automatically; 0 never. Default 0.5.
    #[serde(default = "default_rollback_error_rate")]
    pub rollback_error_rate: f64,
    /// Calls a swapped-in version makes before its error rate counts.
    /// Default 20.
    #[serde(default = "default_rollback_min_calls")]
    pub rollback_min_calls: u64,
}

/// What a failed plugin call leads to (`policy.on_error`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// The pool the `model` names, else `policy.fallback_pool`.
    #[default]
    DefaultRoute,
    /// 503 with code `policy_failed`.
    Reject,
    /// The previous plugin version decides; without one, the default
    /// route.
    Previous,
}

impl OnError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::DefaultRoute => "default-route",
            OnError::Reject => "reject",
            OnError::Previous => "previous",
        }
    }
}

fn default_rollback_error_rate() -> f64 {
    0.5
}

fn default_rollback_min_calls() -> u64 {
    20
}

/// Default of `policy.watch_interval_ms`.
pub const DEFAULT_WATCH_INTERVAL_MS: u64 = 2000;
/// Default of `admin.token_env`.
pub const DEFAULT_ADMIN_TOKEN_ENV: &str = "SWITCHYARD_ADMIN_TOKEN";

fn default_watch_interval_ms() -> u64 {
    DEFAULT_WATCH_INTERVAL_MS
}

/// How a streamed small-first request is reviewed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// Hold the whole small answer until `review` accepts it. The default.
    #[default]
    Buffer,
    /// Review after the first `probe_tokens` tokens: keep streaming the
    /// small answer, or drop it and stream the escalation pool's.
    Probe,
}

/// `[policy.cascade]`: the small-first cascade.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CascadeConfig {
    /// `"buffer"` (default) or `"probe"`, for streamed requests.
    #[serde(default)]
    pub stream_mode: StreamMode,
    /// Tokens a `probe` review waits for. Default 16.
    #[serde(default = "default_probe_tokens")]
    pub probe_tokens: usize,
    /// Log-probability (natural log) under which a token counts as low in
    /// the summary's `share-below`. Default -2.3 (ln 0.1).
    #[serde(default = "default_low_logprob")]
    pub low_logprob: f32,
    /// Shadow mode: `review` runs and its verdict is logged and counted,
    /// but the small answer is always served. Default false.
    #[serde(default)]
    pub shadow: bool,
}

impl Default for CascadeConfig {
    fn default() -> Self {
        Self {
            stream_mode: StreamMode::Buffer,
            probe_tokens: DEFAULT_PROBE_TOKENS,
            low_logprob: DEFAULT_LOW_LOGPROB,
            shadow: false,
        }
    }
}

/// Default of `policy.cascade.probe_tokens`.
pub const DEFAULT_PROBE_TOKENS: usize = 16;
/// Default of `policy.cascade.low_logprob`: ln(0.1).
pub const DEFAULT_LOW_LOGPROB: f32 = -2.3;
/// Largest accepted `policy.cascade.probe_tokens`.
const MAX_PROBE_TOKENS: usize = 4096;

fn default_probe_tokens() -> usize {
    DEFAULT_PROBE_TOKENS
}

fn default_low_logprob() -> f32 {
    DEFAULT_LOW_LOGPROB
}

impl PolicyConfig {
    /// Whether `other` loads the same plugin the same way (file, its
    /// configuration and limits), so that a running instance can stay.
    pub fn same_plugin(&self, other: &PolicyConfig) -> bool {
        self.plugin == other.plugin
            && self.config == other.config
            && self.timeout_ms == other.timeout_ms
            && self.max_memory_bytes == other.max_memory_bytes
    }

    /// The host's view of this table.
    pub fn settings(&self) -> switchyard_policy::PolicySettings {
        let config = serde_json::to_value(&self.config).unwrap_or(serde_json::Value::Null);
        switchyard_policy::PolicySettings {
            plugin: self.plugin.clone(),
            config,
            timeout_ms: self.timeout_ms,
            max_memory_bytes: self.max_memory_bytes,
        }
    }
}

/// A configuration that could not be read or is not valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Full key path, such as `pool[0].batch.max_wait_ms`; empty when the
    /// file as a whole is at fault.
    pub key: String,
    /// 1-based line of the offending key, where the parser gives one.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The environment variable the admin token is read from:
    /// `admin.token_env`, else the deprecated `policy.admin_token_env`,
    /// else `SWITCHYARD_ADMIN_TOKEN`.
    pub fn admin_token_env(&self) -> &str {
        let deprecated = self
            .policy
            .as_ref()
            .and_then(|p| p.admin_token_env.as_deref());
        self.admin
            .token_env
            .as_deref()
            .or(deprecated)
            .unwrap_or(DEFAULT_ADMIN_TOKEN_ENV)
    }

    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            key: String::new(),
            line: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Config::parse(&text)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config = parse_strict(text)?;
        config.validate().map_err(|mut e| {
            e.line = e.line.or_else(|| line_of_key(text, &e.key));
            e
        })?;
        Ok(config)
    }

    /// Checks what the types cannot: ranges, uniqueness, addresses, files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be > 0"));
        }
        if self.server.header_read_timeout_ms == 0 {
            return Err(invalid("server.header_read_timeout_ms", "must be > 0"));
        }
        if self.server.body_read_timeout_ms == 0 {
            return Err(invalid("server.body_read_timeout_ms", "must be > 0"));
        }
        validate_server_limits(&self.server)?;
        if self.server.listen == self.server.admin && self.server.listen.port() != 0 {
            return Err(invalid("server.admin", "must differ from server.listen"));
        }
        if let Some(tls) = &self.server.tls {
            validate_server_tls(tls)?;
        }

        let mut names = HashSet::new();
        for (i, pool) in self.pool.iter().enumerate() {
            validate_pool(i, pool)?;
            if !names.insert(pool.name.as_str()) {
                let message = format!("pool name {:?} is used twice", pool.name);
                return Err(invalid(&format!("pool[{i}].name"), &message));
            }
        }
        validate_capture(self)?;
        validate_fallbacks(self)?;

        for (i, pool) in self.pool.iter().enumerate() {
            if let Some(price) = &pool.price {
                validate_price(&format!("pool[{i}].price"), price)?;
            }
        }
        if let Some(baseline) = &self.costs.baseline {
            let priced = self
                .pool
                .iter()
                .any(|p| &p.name == baseline && p.price.is_some());
            if !priced {
                let message = format!("must name a pool with a price, got {baseline:?}");
                return Err(invalid("costs.baseline", &message));
            }
        }

        validate_admin(self)?;
        if self.reload.watch_interval_ms > 0 && self.reload.watch_interval_ms < 10 {
            return Err(invalid(
                "reload.watch_interval_ms",
                "must be 0 (off) or at least 10",
            ));
        }

        if let Some(policy) = &self.policy {
            validate_policy(policy)?;
            if let Some(fallback) = &policy.fallback_pool {
                if !names.contains(fallback.as_str()) {
                    let message = format!("names no configured pool: {fallback:?}");
                    return Err(invalid("policy.fallback_pool", &message));
                }
            }
        }
        Ok(())
    }
}

fn validate_pool(i: usize, pool: &PoolConfig) -> Result<(), ConfigError> {
    let key = |field: &str| format!("pool[{i}].{field}");
    if pool.name.is_empty() || !pool.name.chars().all(is_name_char) {
        return Err(invalid(
            &key("name"),
            "must be non-empty and use only letters, digits, '-', '_', '.'",
        ));
    }
    if pool.kind == PoolKind::Local {
        return validate_local_pool(i, pool);
    }
    let local_keys = [
        ("model_path", pool.model_path.is_some()),
        ("threads", pool.threads.is_some()),
        ("device", pool.device.is_some()),
        ("max_batch", pool.max_batch.is_some()),
        ("context", pool.context.is_some()),
        ("max_queue", pool.max_queue.is_some()),
        ("default_max_tokens", pool.default_max_tokens.is_some()),
    ];
    if let Some((field, _)) = local_keys.iter().find(|(_, set)| *set) {
        // Only max_batch has an http pool's counterpart to point to.
        let hint = match *field {
            "max_batch" => " (for an http pool's coalescing, use pool.batch.max_batch)",
            _ => "",
        };
        let message = format!("applies only to pools with kind = \"local\"{hint}");
        return Err(invalid(&key(field), &message));
    }
    if pool.endpoints.is_empty() {
        return Err(invalid(&key("endpoints"), "must list at least one URL"));
    }
    for (j, url) in pool.endpoints.iter().enumerate() {
        if let Err(message) = crate::upstream::parse_endpoint(url) {
            return Err(invalid(&key(&format!("endpoints[{j}]")), &message));
        }
    }
    if let Some(tls) = &pool.tls {
        validate_pool_tls(&key, pool, tls)?;
    }
    if pool.connect_timeout_ms == 0 {
        return Err(invalid(&key("connect_timeout_ms"), "must be > 0"));
    }
    if pool.request_timeout_ms == 0 {
        return Err(invalid(&key("request_timeout_ms"), "must be > 0"));
    }
    validate_resilience(&key, pool)?;
    if let Some(batch) = &pool.batch {
        if batch.max_batch == 0 || batch.max_batch > MAX_BATCH_LIMIT {
            let message = format!("must be between 1 and {MAX_BATCH_LIMIT}");
            return Err(invalid(&key("batch.max_batch"), &message));
        }
        if batch.max_wait_ms == 0 || batch.max_wait_ms > MAX_WAIT_LIMIT_MS {
            let message = format!("must be between 1 and {MAX_WAIT_LIMIT_MS} ms");
            return Err(invalid(&key("batch.max_wait_ms"), &message));
        }
        validate_batch(&key, batch)?;
    }
    if let Some(scaler) = &pool.scaler {
        validate_scaler(&key, scaler)?;
    }
    Ok(())
}

/// `[pool.scaler]`: a process scaler has a command, and no duration that
/// would mean "never" is 0.
fn validate_scaler(key: &dyn Fn(&str) -> String, scaler: &ScalerConfig) -> Result<(), ConfigError> {
    let process_only = scaler.kind != ScalerKind::Process
        && (!scaler.command.is_empty() || !scaler.env.is_empty() || scaler.cwd.is_some());
    if process_only {
        return Err(invalid(
            &key("scaler.command"),
            "command, env and cwd apply only to kind = \"process\"; with \
             kind = \"none\" or \"webhook\" something else runs the server",
        ));
    }
    validate_webhook(key, scaler)?;
    for (i, window) in scaler.schedule.iter().enumerate() {
        crate::scaling::Window::parse(window).map_err(|e| {
            let field = format!("scaler.schedule[{i}].{}", e.field);
            invalid(&key(&field), &e.message)
        })?;
    }
    let blank = scaler
        .command
        .first()
        .is_none_or(|program| program.is_empty());
    if scaler.kind == ScalerKind::Process && blank {
        return Err(invalid(
            &key("scaler.command"),
            "must name the program to run, e.g. [\"vllm\", \"serve\", \"model\"]",
        ));
    }
    validate_replicas(key, scaler)?;
    if !scaler.probe_path.starts_with('/') {
        return Err(invalid(&key("scaler.probe_path"), "must start with '/'"));
    }
    let positive = [
        ("idle_timeout_s", scaler.idle_timeout_s),
        ("ready_timeout_s", scaler.ready_timeout_s),
        ("probe_interval_ms", scaler.probe_interval_ms),
        ("max_held", scaler.max_held as u64),
        ("max_in_flight", scaler.max_in_flight as u64),
        (
            "target_in_flight",
            scaler.target_in_flight.unwrap_or(1) as u64,
        ),
        ("target_queue_wait_ms", scaler.target_queue_wait_ms),
        (
            "completion_probe_timeout_s",
            scaler.completion_probe_timeout_s,
        ),
    ];
    for (field, value) in positive {
        if value == 0 {
            return Err(invalid(&key(&format!("scaler.{field}")), "must be > 0"));
        }
    }
    // A replica never has more than max_in_flight in flight, so a higher
    // target would never ask for another replica.
    if scaler
        .target_in_flight
        .is_some_and(|target| target > scaler.max_in_flight)
    {
        return Err(invalid(
            &key("scaler.target_in_flight"),
            "must be at most scaler.max_in_flight: a replica never has more in flight",
        ));
    }
    Ok(())
}

/// `min_replicas` and `max_replicas`: at least one replica at most, no
/// more at least; more than one only where replicas are a number.
fn validate_replicas(
    key: &dyn Fn(&str) -> String,
    scaler: &ScalerConfig,
) -> Result<(), ConfigError> {
    if scaler.kind == ScalerKind::Process && scaler.max_replicas > 1 {
        let message = format!("must be 1 {PROCESS_ONE_REPLICA}");
        return Err(invalid(&key("scaler.max_replicas"), &message));
    }
    if scaler.kind == ScalerKind::Process && scaler.min_replicas > 1 {
        let message = format!("must be 0 or 1 {PROCESS_ONE_REPLICA}");
        return Err(invalid(&key("scaler.min_replicas"), &message));
    }
    if scaler.max_replicas == 0 {
        return Err(invalid(&key("scaler.max_replicas"), "must be > 0"));
    }
    if scaler.min_replicas > scaler.max_replicas {
        return Err(invalid(
            &key("scaler.min_replicas"),
            "must be at most scaler.max_replicas",
        ));
    }
    Ok(())
}

/// Why the process scaler refuses more than one replica.
const PROCESS_ONE_REPLICA: &str = "with kind = \"process\": it runs one \
     server per pool (behind the pool's endpoints); for more replicas let \
     something else run them (kind = \"none\", \"webhook\" or \"kubernetes\")";

/// `[pool.scaler]` of `kind = "webhook"`: an http(s) URL, headers that
/// are valid HTTP, and the webhook keys on no other kind.
fn validate_webhook(
    key: &dyn Fn(&str) -> String,
    scaler: &ScalerConfig,
) -> Result<(), ConfigError> {
    let calls = matches!(scaler.kind, ScalerKind::Webhook | ScalerKind::Kubernetes);
    if !calls && scaler.token_env.is_some() {
        return Err(invalid(
            &key("scaler.token_env"),
            "applies only to kind = \"webhook\" or \"kubernetes\"",
        ));
    }
    if scaler.token_env.as_deref().is_some_and(str::is_empty) {
        return Err(invalid(
            &key("scaler.token_env"),
            "must name an environment variable",
        ));
    }
    validate_kubernetes(key, scaler)?;
    if scaler.kind != ScalerKind::Webhook {
        let set = [
            ("url", scaler.url.is_some()),
            ("headers", !scaler.headers.is_empty()),
        ];
        if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
            return Err(invalid(
                &key(&format!("scaler.{field}")),
                "applies only to kind = \"webhook\"",
            ));
        }
        return Ok(());
    }
    let Some(url) = &scaler.url else {
        return Err(invalid(
            &key("scaler.url"),
            "is required with kind = \"webhook\": the URL to POST the wanted replicas to",
        ));
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e| invalid(&key("scaler.url"), &format!("is not a URL: {e}")))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.host().is_none() {
        return Err(invalid(
            &key("scaler.url"),
            "must be an absolute http:// or https:// URL with a host",
        ));
    }
    for (name, value) in &scaler.headers {
        let field = key(&format!("scaler.headers.{name}"));
        if http::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(invalid(&field, "is not a valid HTTP header name"));
        }
        if http::header::HeaderValue::from_str(value).is_err() {
            return Err(invalid(&field, "is not a valid HTTP header value"));
        }
    }
    Ok(())
}

/// `[pool.scaler]` of `kind = "kubernetes"`: a Deployment named as
/// Kubernetes names things, an http(s) `api_url`, and these keys on no
/// other kind.
fn validate_kubernetes(
    key: &dyn Fn(&str) -> String,
    scaler: &ScalerConfig,
) -> Result<(), ConfigError> {
    if scaler.kind != ScalerKind::Kubernetes {
        let set = [
            ("deployment", scaler.deployment.is_some()),
            ("namespace", scaler.namespace.is_some()),
            ("api_url", scaler.api_url.is_some()),
            ("ca_path", scaler.ca_path.is_some()),
            ("kubeconfig", scaler.kubeconfig.is_some()),
            ("context", scaler.context.is_some()),
        ];
        if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
            return Err(invalid(
                &key(&format!("scaler.{field}")),
                "applies only to kind = \"kubernetes\"",
            ));
        }
        return Ok(());
    }
    if scaler.kubeconfig.is_some() {
        let set = [
            ("api_url", scaler.api_url.is_some()),
            ("token_env", scaler.token_env.is_some()),
            ("ca_path", scaler.ca_path.is_some()),
        ];
        if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
            return Err(invalid(
                &key(&format!("scaler.{field}")),
                "does not apply with scaler.kubeconfig: the kubeconfig's cluster \
                 and user are used",
            ));
        }
    }
    if scaler.api_url.is_some() && scaler.context.is_some() {
        return Err(invalid(
            &key("scaler.context"),
            "applies to a kubeconfig, not to scaler.api_url",
        ));
    }
    let Some(deployment) = &scaler.deployment else {
        return Err(invalid(
            &key("scaler.deployment"),
            "is required with kind = \"kubernetes\": the Deployment to scale",
        ));
    };
    let names = [
        ("deployment", Some(deployment)),
        ("namespace", scaler.namespace.as_ref()),
    ];
    for (field, name) in names {
        let Some(name) = name else { continue };
        let dns_name = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !name.starts_with(['-', '.'])
            && !name.ends_with(['-', '.']);
        if !dns_name {
            return Err(invalid(
                &key(&format!("scaler.{field}")),
                "must be a Kubernetes name: lowercase letters, digits, '-' and '.'",
            ));
        }
    }
    if let Some(url) = &scaler.api_url {
        let uri: Result<http::Uri, _> = url.parse();
        let ok = uri
            .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if !ok {
            return Err(invalid(
                &key("scaler.api_url"),
                "must be an absolute https:// (or http://) URL, e.g. \
                 \"https://10.96.0.1:443\"",
            ));
        }
    }
    Ok(())
}

/// `fallback` and `default_deadline_ms` belong to scaled pools, and a
/// fallback is another pool that is always up, so that it can answer at
/// once.
fn validate_fallbacks(config: &Config) -> Result<(), ConfigError> {
    for (i, pool) in config.pool.iter().enumerate() {
        let key = |field: &str| format!("pool[{i}].{field}");
        if pool.scaler.is_none() {
            let set = [
                ("fallback", pool.fallback.is_some()),
                ("default_deadline_ms", pool.default_deadline_ms.is_some()),
            ];
            if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    &key(field),
                    "applies only to pools with a [pool.scaler] table",
                ));
            }
            continue;
        }
        if pool.default_deadline_ms == Some(0) {
            return Err(invalid(&key("default_deadline_ms"), "must be > 0"));
        }
        let Some(fallback) = &pool.fallback else {
            continue;
        };
        let target = config.pool.iter().find(|p| &p.name == fallback);
        let message = match target {
            None => format!("names no configured pool: {fallback:?}"),
            Some(p) if p.name == pool.name => "must name another pool".to_string(),
            Some(p) if p.scaler.is_some() => format!(
                "pool {fallback:?} has a [pool.scaler] and may be cold itself; \
                 a fallback must be always up"
            ),
            Some(_) => continue,
        };
        return Err(invalid(&key("fallback"), &message));
    }
    Ok(())
}

/// `server.transparent` and every `pool.capture`: each entry parses, is
/// not on loopback, no destination is claimed twice (overlapping blocks
/// are allowed: the narrowest wins), and the listener differs from the
/// others.
fn validate_capture(config: &Config) -> Result<(), ConfigError> {
    use crate::transparent::CaptureTarget;

    if let Some(transparent) = &config.server.transparent {
        let listen = transparent.listen;
        let taken = [
            ("server.listen", config.server.listen),
            ("server.admin", config.server.admin),
        ];
        for (key, addr) in taken {
            if same_socket(addr, listen) {
                let message = format!("must differ from {key} ({addr})");
                return Err(invalid("server.transparent.listen", &message));
            }
        }
    }

    let mut seen: Vec<(CaptureTarget, String)> = Vec::new();
    for (i, pool) in config.pool.iter().enumerate() {
        for (j, text) in pool.capture.iter().enumerate() {
            let key = format!("pool[{i}].capture[{j}]");
            if config.server.transparent.is_none() {
                return Err(invalid(
                    &key,
                    "needs a [server.transparent] listener for the \
                     redirected connections",
                ));
            }
            let target = CaptureTarget::parse(text).map_err(|e| invalid(&key, &e))?;
            if target.is_loopback() {
                let never = crate::iptables::LOOPBACK_NEVER_CAPTURED;
                return Err(invalid(&key, &format!("{text:?} {never}")));
            }
            if let Some((_, other)) = seen.iter().find(|(t, _)| *t == target) {
                let message = format!("{target} is already captured by pool {other:?}");
                return Err(invalid(&key, &message));
            }
            seen.push((target, pool.name.clone()));
        }
    }
    Ok(())
}

/// Whether two listeners would take the same socket: the same port (not
/// 0, which the OS picks) on the same address, or on the wildcard.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The connection and header limits: none may be 0, and the head limit
/// must fit hyper's smallest read buffer.
fn validate_server_limits(server: &ServerConfig) -> Result<(), ConfigError> {
    if server.max_header_bytes < MIN_MAX_HEADER_BYTES {
        return Err(invalid("server.max_header_bytes", "must be >= 8192"));
    }
    if server.max_header_bytes > u64::from(u32::MAX) {
        return Err(invalid("server.max_header_bytes", "must be < 4 GiB"));
    }
    let nonzero = [
        ("server.max_headers", server.max_headers as u64),
        ("server.idle_timeout_ms", server.idle_timeout_ms),
        ("server.write_timeout_ms", server.write_timeout_ms),
        ("server.max_connections", server.max_connections as u64),
        (
            "server.max_concurrent_streams",
            u64::from(server.max_concurrent_streams),
        ),
    ];
    for (key, value) in nonzero {
        if value == 0 {
            return Err(invalid(key, "must be > 0"));
        }
    }
    match server.max_connections_per_ip {
        Some(0) => Err(invalid("server.max_connections_per_ip", "must be > 0")),
        _ => Ok(()),
    }
}

fn validate_admin(config: &Config) -> Result<(), ConfigError> {
    let admin = &config.admin;
    if admin.token_env.as_deref() == Some("") {
        return Err(invalid("admin.token_env", "must not be empty"));
    }
    if admin.token.as_deref() == Some("") {
        return Err(invalid(
            "admin.token",
            "must not be empty (leave it out to turn the admin calls off)",
        ));
    }
    let Some(policy) = &config.policy else {
        return Ok(());
    };
    match (
        policy.admin_token_env.as_deref(),
        admin.token_env.as_deref(),
    ) {
        (Some(""), _) => Err(invalid("policy.admin_token_env", "must not be empty")),
        (Some(_), Some(_)) => Err(invalid(
            "policy.admin_token_env",
            "is a deprecated alias of admin.token_env; set only admin.token_env",
        )),
        _ => Ok(()),
    }
}

fn validate_server_tls(tls: &ServerTlsConfig) -> Result<(), ConfigError> {
    if tls.handshake_timeout_ms == 0 {
        return Err(invalid("server.tls.handshake_timeout_ms", "must be > 0"));
    }
    // The files are read and parsed as the listener will, so that a wrong
    // path or a key of another certificate fails `switchyard check`.
    crate::tls::check_server_files(tls)
        .map_err(|e| invalid(&format!("server.tls.{}", e.field), &e.message))
}

fn validate_pool_tls(
    key: &dyn Fn(&str) -> String,
    pool: &PoolConfig,
    tls: &PoolTlsConfig,
) -> Result<(), ConfigError> {
    if !pool.endpoints.iter().any(|url| url.starts_with("https://")) {
        return Err(invalid(
            &key("tls"),
            "applies only to https:// endpoints, and this pool has none",
        ));
    }
    if let Some(path) = &tls.ca_path {
        crate::tls::read_roots(path).map_err(|e| invalid(&key("tls.ca_path"), &e))?;
    }
    if let Some(name) = &tls.server_name {
        crate::tls::server_name(name).map_err(|e| invalid(&key("tls.server_name"), &e))?;
    }
    Ok(())
}

/// Timeouts, retries, ejection, the circuit breaker and health checks:
/// durations and thresholds must be > 0 where 0 would mean "never".
fn validate_resilience(key: &dyn Fn(&str) -> String, pool: &PoolConfig) -> Result<(), ConfigError> {
    let mut nonzero = vec![
        ("try_timeout_ms", pool.try_timeout_ms.unwrap_or(1)),
        ("total_timeout_ms", pool.total_timeout_ms.unwrap_or(1)),
    ];
    if let Some(outlier) = &pool.outlier {
        nonzero.push(("outlier.ejection_ms", outlier.ejection_ms));
        nonzero.push(("outlier.max_ejection_ms", outlier.max_ejection_ms));
        if outlier.max_ejection_ms < outlier.ejection_ms {
            let message = "must be >= pool.outlier.ejection_ms";
            return Err(invalid(&key("outlier.max_ejection_ms"), message));
        }
    }
    if let Some(circuit) = &pool.circuit {
        if circuit.failure_percent > 100 {
            let message = "must be between 0 (off) and 100";
            return Err(invalid(&key("circuit.failure_percent"), message));
        }
        nonzero.push(("circuit.min_requests", circuit.min_requests));
        nonzero.push(("circuit.window_ms", circuit.window_ms));
        nonzero.push(("circuit.open_ms", circuit.open_ms));
        let half_open = u64::from(circuit.half_open_requests);
        nonzero.push(("circuit.half_open_requests", half_open));
    }
    if let Some(health) = &pool.health {
        if !health.path.starts_with('/') {
            let message = format!("{:?} must start with '/'", health.path);
            return Err(invalid(&key("health.path"), &message));
        }
        if health.path.parse::<http::uri::PathAndQuery>().is_err() {
            let message = format!("{:?} is not a valid URL path", health.path);
            return Err(invalid(&key("health.path"), &message));
        }
        nonzero.push(("health.interval_ms", health.interval_ms));
        nonzero.push(("health.timeout_ms", health.timeout_ms));
        let down = u64::from(health.unhealthy_threshold);
        nonzero.push(("health.unhealthy_threshold", down));
        nonzero.push((
            "health.healthy_threshold",
            u64::from(health.healthy_threshold),
        ));
    }
    for (field, value) in nonzero {
        if value == 0 {
            return Err(invalid(&key(field), "must be > 0"));
        }
    }
    Ok(())
}

fn validate_batch(key: &dyn Fn(&str) -> String, batch: &BatchConfig) -> Result<(), ConfigError> {
    if batch.max_batch_tokens == Some(0) {
        return Err(invalid(&key("batch.max_batch_tokens"), "must be > 0"));
    }
    if batch.max_queue == 0 || batch.max_queue > MAX_QUEUE_LIMIT {
        let message = format!("must be between 1 and {MAX_QUEUE_LIMIT}");
        return Err(invalid(&key("batch.max_queue"), &message));
    }
    if batch.max_inflight == 0 || batch.max_inflight > MAX_INFLIGHT_LIMIT {
        let message = format!("must be between 1 and {MAX_INFLIGHT_LIMIT}");
        return Err(invalid(&key("batch.max_inflight"), &message));
    }
    if batch.starvation_ms == 0 {
        return Err(invalid(&key("batch.starvation_ms"), "must be > 0"));
    }
    if let Some(name) = &batch.tenant_header {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            let message = format!("{name:?} is not a valid header name");
            return Err(invalid(&key("batch.tenant_header"), &message));
        }
    }
    for (tenant, weight) in &batch.tenant_weights {
        if *weight == 0 {
            let field = format!("batch.tenant_weights.{tenant}");
            return Err(invalid(&key(&field), "must be > 0"));
        }
    }
    for (j, name) in batch.array_endpoints.iter().enumerate() {
        if !matches!(name.as_str(), "completions" | "embeddings") {
            let message = format!("{name:?} must be \"completions\" or \"embeddings\"");
            return Err(invalid(
                &key(&format!("batch.array_endpoints[{j}]")),
                &message,
            ));
        }
    }
    Ok(())
}

fn validate_local_pool(i: usize, pool: &PoolConfig) -> Result<(), ConfigError> {
    let key = |field: &str| format!("pool[{i}].{field}");
    if !pool.endpoints.is_empty() {
        return Err(invalid(
            &key("endpoints"),
            "a local pool runs its model in-process and has no endpoints",
        ));
    }
    if pool.batch.is_some() {
        return Err(invalid(
            &key("batch"),
            "a local pool batches on its own; set pool.max_batch instead",
        ));
    }
    if pool.tls.is_some() {
        return Err(invalid(
            &key("tls"),
            "a local pool runs its model in-process; there is nothing to \
             reach over TLS",
        ));
    }
    let upstream_keys = [
        ("try_timeout_ms", pool.try_timeout_ms.is_some()),
        ("total_timeout_ms", pool.total_timeout_ms.is_some()),
        ("retry", pool.retry.is_some()),
        ("outlier", pool.outlier.is_some()),
        ("circuit", pool.circuit.is_some()),
        ("health", pool.health.is_some()),
        ("scaler", pool.scaler.is_some()),
    ];
    if let Some((field, _)) = upstream_keys.iter().find(|(_, set)| *set) {
        return Err(invalid(
            &key(field),
            "applies only to http pools: a local pool has no upstream \
             endpoints to time out, retry or eject",
        ));
    }
    let ranges = [
        ("threads", pool.threads, 1, 256),
        ("max_batch", pool.max_batch, 1, 1024),
        ("context", pool.context, 16, 1 << 20),
        ("max_queue", pool.max_queue, 0, 1 << 20),
        ("default_max_tokens", pool.default_max_tokens, 1, 1 << 20),
    ];
    for (field, value, lo, hi) in ranges {
        if value.is_some_and(|v| v < lo || v > hi) {
            return Err(invalid(
                &key(field),
                &format!("must be between {lo} and {hi}"),
            ));
        }
    }
    if let Some(device) = &pool.device {
        if let Err(message) = device.parse::<switchyard_executor::device::DeviceChoice>() {
            return Err(invalid(&key("device"), &message));
        }
    }
    let path = pool.model_path();
    if !path.is_file() {
        let message = format!(
            "model file {} does not exist or is not a file (relative paths \
             start from the working directory); `make model` fetches the \
             default model into models/",
            path.display()
        );
        return Err(invalid(&key("model_path"), &message));
    }
    Ok(())
}

fn validate_price(key: &str, price: &PriceConfig) -> Result<(), ConfigError> {
    let fields = [
        ("input_per_mtok", price.input_per_mtok),
        ("output_per_mtok", price.output_per_mtok),
        ("gpu_hour", price.gpu_hour),
    ];
    for (field, value) in fields {
        if value.is_some_and(|v| !v.is_finite() || v < 0.0) {
            let key = format!("{key}.{field}");
            return Err(invalid(&key, "must be a non-negative number of dollars"));
        }
    }
    let per_token = price.input_per_mtok.is_some() || price.output_per_mtok.is_some();
    if per_token && price.gpu_hour.is_some() {
        return Err(invalid(
            &format!("{key}.gpu_hour"),
            "cannot be combined with input_per_mtok or output_per_mtok",
        ));
    }
    if !per_token && price.gpu_hour.is_none() {
        return Err(invalid(
            key,
            "needs input_per_mtok and output_per_mtok, or gpu_hour",
        ));
    }
    Ok(())
}

fn validate_policy(policy: &PolicyConfig) -> Result<(), ConfigError> {
    if !policy.plugin.is_file() {
        // Relative paths resolve against the working directory, which is
        // worth saying when the file is not found from there.
        let resolved = std::env::current_dir()
            .map(|dir| dir.join(&policy.plugin))
            .unwrap_or_else(|_| policy.plugin.clone());
        let message = format!(
            "plugin file {} does not exist (looked at {}; relative paths \
             start from the working directory; build the bundled plugins \
             with `make plugins`)",
            policy.plugin.display(),
            resolved.display()
        );
        return Err(invalid("policy.plugin", &message));
    }
    if policy.timeout_ms == 0 {
        return Err(invalid("policy.timeout_ms", "must be > 0"));
    }
    if policy.max_memory_bytes < 1024 * 1024 {
        return Err(invalid("policy.max_memory_bytes", "must be >= 1 MiB"));
    }
    if !(0.0..=1.0).contains(&policy.rollback_error_rate) {
        return Err(invalid(
            "policy.rollback_error_rate",
            "must be between 0 and 1 (0 turns automatic rollback off)",
        ));
    }
    let cascade = &policy.cascade;
    if cascade.probe_tokens == 0 || cascade.probe_tokens > MAX_PROBE_TOKENS {
        let message = format!("must be between 1 and {MAX_PROBE_TOKENS}");
        return Err(invalid("policy.cascade.probe_tokens", &message));
    }
    if cascade.low_logprob.is_nan() || cascade.low_logprob > 0.0 {
        return Err(invalid(
            "policy.cascade.low_logprob",
            "must be <= 0 (a natural-log probability, e.g. -2.3 for 0.1)",
        ));
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Deserializes with unknown keys rejected, recording the key path of the
/// first error and the line the parser points at.
fn parse_strict(text: &str) -> Result<Config, ConfigError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError {
        key: String::new(),
        line: e.span().map(|span| line_of(text, span.start)),
        message: e.message().to_string(),
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        ConfigError {
            key: if key == "." { String::new() } else { key },
            line: inner.span().map(|span| line_of(text, span.start)),
            message: inner.message().to_string(),
        }
    })
}

/// The line where the value at `key` (`pool[1].batch.max_wait_ms`) is
/// written, found by parsing the text again with spans.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut span = root.span();
    let mut value = toml::de::DeValue::Table(root.into_inner());
    for segment in key.split('.') {
        let (name, indices) = segment.split_once('[').unwrap_or((segment, ""));
        let mut next = value.get(name)?.clone();
        for index in indices.split('[') {
            let Ok(index) = index.trim_end_matches(']').parse::<usize>() else {
                continue;
            };
            next = next.get_ref().get(index)?.clone();
        }
        span = next.span();
        value = next.into_inner();
    }
    Some(line_of(text, span.start))
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn invalid(key: &str, message: &str) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        line: None,
        message: message.to_string(),
    }
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
}

fn default_admin() -> SocketAddr {
    DEFAULT_ADMIN
}

fn default_transparent_listen() -> SocketAddr {
    let port = crate::transparent::DEFAULT_TRANSPARENT_PORT;
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}

fn default_shutdown_grace_s() -> u64 {
    DEFAULT_SHUTDOWN_GRACE_S
}

fn default_client_timeout_ms() -> u64 {
    DEFAULT_CLIENT_TIMEOUT_MS
}

fn default_max_header_bytes() -> u64 {
    DEFAULT_MAX_HEADER_BYTES
}

fn default_max_headers() -> usize {
    DEFAULT_MAX_HEADERS
}

fn default_idle_timeout_ms() -> u64 {
    DEFAULT_IDLE_TIMEOUT_MS
}

fn default_write_timeout_ms() -> u64 {
    DEFAULT_WRITE_TIMEOUT_MS
}

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

fn default_max_concurrent_streams() -> u32 {
    DEFAULT_MAX_CONCURRENT_STREAMS
}

fn default_tls_reload_interval_ms() -> u64 {
    DEFAULT_TLS_RELOAD_INTERVAL_MS
}

fn default_tls_handshake_timeout_ms() -> u64 {
    DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS
}

fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}

fn default_request_timeout_ms() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_MS
}

fn default_max_retries() -> u32 {
    2
}

fn default_budget_percent() -> u32 {
    20
}

fn default_min_retries_per_s() -> u32 {
    3
}

fn default_outlier_failures() -> u32 {
    5
}

fn default_ejection_ms() -> u64 {
    30_000
}

fn default_max_ejection_ms() -> u64 {
    300_000
}

fn default_failure_percent() -> u32 {
    50
}

fn default_circuit_min_requests() -> u64 {
    20
}

fn default_circuit_window_ms() -> u64 {
    10_000
}

fn default_open_ms() -> u64 {
    5_000
}

fn default_half_open_requests() -> u32 {
    3
}

fn default_scaler_idle_timeout_s() -> u64 {
    300
}

fn default_scaler_min_up_s() -> u64 {
    60
}

fn default_scaler_ready_timeout_s() -> u64 {
    600
}

fn default_scaler_probe_interval_ms() -> u64 {
    500
}

fn default_scaler_max_held() -> usize {
    256
}

fn default_scaler_stop_grace_s() -> u64 {
    10
}

fn default_scaler_completion_probe_timeout_s() -> u64 {
    30
}

fn default_scaler_max_replicas() -> u32 {
    1
}

fn default_scaler_max_in_flight() -> usize {
    64
}

fn default_scaler_target_queue_wait_ms() -> u64 {
    1000
}

fn default_scaler_scale_down_after_s() -> u64 {
    60
}

fn default_schedule_days() -> Vec<String> {
    ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        .map(String::from)
        .to_vec()
}

fn default_schedule_timezone() -> String {
    "UTC".to_string()
}

fn default_schedule_min_replicas() -> u32 {
    1
}

fn default_health_path() -> String {
    "/v1/models".to_string()
}

fn default_health_interval_ms() -> u64 {
    5_000
}

fn default_health_timeout_ms() -> u64 {
    1_000
}

fn default_unhealthy_threshold() -> u32 {
    3
}

fn default_healthy_threshold() -> u32 {
    2
}

fn default_max_batch() -> usize {
    DEFAULT_MAX_BATCH
}

fn default_max_wait_ms() -> u64 {
    DEFAULT_MAX_WAIT_MS
}

fn default_max_queue() -> usize {
    DEFAULT_MAX_QUEUE
}

fn default_max_inflight() -> usize {
    DEFAULT_MAX_INFLIGHT
}

fn default_starvation_ms() -> u64 {
    DEFAULT_STARVATION_MS
}

fn default_array_endpoints() -> Vec<String> {
    vec!["completions".to_string(), "embeddings".to_string()]
}

fn default_true() -> bool {
    true
}

fn default_policy_timeout_ms() -> u64 {
    switchyard_policy::DEFAULT_TIMEOUT_MS
}

fn default_policy_max_memory_bytes() -> u64 {
    switchyard_policy::DEFAULT_MAX_MEMORY_BYTES
}

fn empty_table() -> toml::Table {
    toml::Table::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin = "127.0.0.1:9901"

[[pool]]
name = "small"
endpoints = ["http://127.0.0.1:8001"]
model = "smollm2"
[pool.batch]
max_batch = 8
max_wait_ms = 50

[[pool]]
name = "large"
endpoints = ["http://127.0.0.1:8002"]
model = "big"
"#;

    #[test]
    fn example_parses_with_defaults_filled_in() {
        let config = Config::parse(EXAMPLE).unwrap();
        assert_eq!(config.pool.len(), 2);
        assert_eq!(config.pool[0].upstream_model(), "smollm2");
        assert_eq!(config.pool[1].batch.as_ref().map(|b| b.max_batch), None);
        assert_eq!(config.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(
            config.pool[1].request_timeout_ms,
            DEFAULT_REQUEST_TIMEOUT_MS
        );
    }

    #[test]
    fn a_local_pools_device_is_checked_by_name() {
        let local = "[[pool]]\nname = \"small\"\nkind = \"local\"\ndevice = \"gpu\"\n";
        let err = Config::parse(local).unwrap_err();
        assert_eq!(err.key, "pool[0].device", "{err}");
        assert!(err.message.contains("\"cuda:N\""), "{err}");
        let http = EXAMPLE.replace("model = \"big\"", "model = \"big\"\ndevice = \"cpu\"");
        let err = Config::parse(&http).unwrap_err();
        assert_eq!(err.key, "pool[1].device", "{err}");
        assert!(err.message.contains("kind = \"local\""), "{err}");
        // The coalescing hint is for max_batch, not for device.
        assert!(!err.message.contains("coalescing"), "{err}");
        let http = EXAMPLE.replace("model = \"big\"", "model = \"big\"\nmax_batch = 4");
        let err = Config::parse(&http).unwrap_err();
        assert_eq!(err.key, "pool[1].max_batch", "{err}");
        assert!(err.message.contains("pool.batch.max_batch"), "{err}");
    }

    #[test]
    fn empty_file_is_a_valid_config() {
        let config = Config::parse("").unwrap();
        assert!(config.pool.is_empty());
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.server.admin.to_string(), "127.0.0.1:9901");
    }

    #[test]
    fn unknown_key_names_its_path_and_line() {
        let text = EXAMPLE.replace("max_wait_ms = 50", "max_wait = 50");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.key.starts_with("pool[0].batch"), "{err}");
        assert!(err.message.contains("max_wait"), "{err}");
        assert_eq!(err.line, Some(12), "{err}");
    }

    #[test]
    fn wrong_type_names_its_path() {
        let text = EXAMPLE.replace("max_batch = 8", "max_batch = \"8\"");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.key, "pool[0].batch.max_batch", "{err}");
    }

    #[test]
    fn zero_wait_is_rejected_with_full_key_and_line() {
        let text = EXAMPLE.replace("max_wait_ms = 50", "max_wait_ms = 0");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.key, "pool[0].batch.max_wait_ms");
        assert_eq!(err.line, Some(12), "{err}");
    }

    #[test]
    fn invalid_values_in_arrays_report_their_line() {
        let text = EXAMPLE.replace("http://127.0.0.1:8002", "127.0.0.1:8002");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.line, Some(16), "{err}");
        let text = EXAMPLE.replace("name = \"large\"", "name = \"small\"");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.line, Some(15), "{err}");
    }

    #[test]
    fn duplicate_pool_names_are_rejected() {
        let text = EXAMPLE.replace("name = \"large\"", "name = \"small\"");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.key, "pool[1].name");
        assert!(err.message.contains("small"));
    }

    #[test]
    fn resilience_tables_are_validated_with_their_key_paths() {
        let cases = [
            ("try_timeout_ms = 0", "pool[1].try_timeout_ms"),
            ("[pool.retry]\nmax_retry = 1", "pool[1].retry.max_retry"),
            (
                "[pool.outlier]\nejection_ms = 5000\nmax_ejection_ms = 10",
                "pool[1].outlier.max_ejection_ms",
            ),
            (
                "[pool.circuit]\nfailure_percent = 101",
                "pool[1].circuit.failure_percent",
            ),
            ("[pool.circuit]\nopen_ms = 0", "pool[1].circuit.open_ms"),
            ("[pool.health]\npath = \"v1/models\"", "pool[1].health.path"),
            (
                "[pool.health]\nunhealthy_threshold = 0",
                "pool[1].health.unhealthy_threshold",
            ),
        ];
        for (extra, key) in cases {
            let text = format!("{EXAMPLE}{extra}\n");
            let err = Config::parse(&text).unwrap_err();
            assert!(err.key.starts_with(key), "{extra}: {err}");
        }

        // Zero retries and an empty budget are allowed: retries off.
        let off = "[pool.retry]\nmax_retries = 0\nbudget_percent = 0\n\
                   min_retries_per_s = 0\n[pool.outlier]\n\
                   consecutive_failures = 0\n";
        let config = Config::parse(&format!("{EXAMPLE}{off}")).unwrap();
        let retry = config.pool[1].retry.clone().unwrap_or_default();
        assert_eq!(retry.max_retries, 0);
        assert!(config.pool[1].health.is_none(), "health checks are opt-in");
    }

    #[test]
    fn scaler_tables_are_validated_with_their_key_paths() {
        let scaler = "[pool.scaler]\ncommand = [\"serve\"]\n";
        let cases = [
            (
                "[pool.scaler]\nidle_timeout_s = 5\n",
                "pool[1].scaler.command",
            ),
            (
                "[pool.scaler]\ncommand = [\"\"]\n",
                "pool[1].scaler.command",
            ),
            (
                "[pool.scaler]\nkind = \"none\"\ncommand = [\"serve\"]\n",
                "pool[1].scaler.command",
            ),
            (
                &format!("{scaler}min_replicas = 2\n"),
                "pool[1].scaler.min_replicas",
            ),
            (
                &format!("{scaler}max_replicas = 2\n"),
                "pool[1].scaler.max_replicas",
            ),
            (
                "[pool.scaler]\nkind = \"none\"\nmin_replicas = 3\nmax_replicas = 2\n",
                "pool[1].scaler.min_replicas",
            ),
            (
                "[pool.scaler]\nkind = \"none\"\nmax_replicas = 0\n",
                "pool[1].scaler.max_replicas",
            ),
            (
                &format!("{scaler}max_in_flight = 0\n"),
                "pool[1].scaler.max_in_flight",
            ),
            (
                "[pool.scaler]\nkind = \"none\"\nmax_in_flight = 2\ntarget_in_flight = 3\n",
                "pool[1].scaler.target_in_flight",
            ),
            (
                &format!("{scaler}probe = \"chat\"\n"),
                "pool[1].scaler.probe",
            ),
            (
                &format!("{scaler}idle_timeout_s = 0\n"),
                "pool[1].scaler.idle_timeout_s",
            ),
            (
                &format!("{scaler}probe_path = \"v1\"\n"),
                "pool[1].scaler.probe_path",
            ),
            (
                &format!("{scaler}max_held = 0\n"),
                "pool[1].scaler.max_held",
            ),
            (&format!("{scaler}kind = \"k8s\"\n"), "pool[1].scaler.kind"),
            ("[pool.scaler]\nkind = \"webhook\"\n", "pool[1].scaler.url"),
            (
                "[pool.scaler]\nkind = \"webhook\"\nurl = \"ftp://h/x\"\n",
                "pool[1].scaler.url",
            ),
            (
                "[pool.scaler]\nkind = \"webhook\"\nurl = \"http://h/\"\n\
                 headers = { \"bad name\" = \"v\" }\n",
                "pool[1].scaler.headers.bad name",
            ),
            (
                "[pool.scaler]\nkind = \"webhook\"\nurl = \"http://h/\"\ntoken_env = \"\"\n",
                "pool[1].scaler.token_env",
            ),
            (
                "[pool.scaler]\nkind = \"webhook\"\nurl = \"http://h/\"\ncommand = [\"x\"]\n",
                "pool[1].scaler.command",
            ),
            (
                &format!("{scaler}url = \"http://h/\"\n"),
                "pool[1].scaler.url",
            ),
            (
                "[pool.scaler]\nkind = \"kubernetes\"\n",
                "pool[1].scaler.deployment",
            ),
            (
                "[pool.scaler]\nkind = \"kubernetes\"\ndeployment = \"Big_Model\"\n",
                "pool[1].scaler.deployment",
            ),
            (
                "[pool.scaler]\nkind = \"kubernetes\"\ndeployment = \"vllm\"\n\
                 api_url = \"10.0.0.1\"\n",
                "pool[1].scaler.api_url",
            ),
            (
                "[pool.scaler]\nkind = \"kubernetes\"\ndeployment = \"vllm\"\n\
                 url = \"http://h/\"\n",
                "pool[1].scaler.url",
            ),
            (
                &format!("{scaler}deployment = \"vllm\"\n"),
                "pool[1].scaler.deployment",
            ),
            (
                &format!("{scaler}kubeconfig = \"/k\"\n"),
                "pool[1].scaler.kubeconfig",
            ),
            (
                "[pool.scaler]\nkind = \"kubernetes\"\ndeployment = \"vllm\"\n\
                 kubeconfig = \"/k\"\ntoken_env = \"T\"\n",
                "pool[1].scaler.token_env",
            ),
            (
                "[pool.scaler]\nkind = \"kubernetes\"\ndeployment = \"vllm\"\n\
                 api_url = \"https://h\"\ncontext = \"c\"\n",
                "pool[1].scaler.context",
            ),
            (
                &format!(
                    "{scaler}[[pool.scaler.schedule]]\ndays = [\"mon\", \"caturday\"]\n\
                     start = \"09:00\"\nend = \"18:00\"\n"
                ),
                "pool[1].scaler.schedule[0].days",
            ),
            (
                &format!("{scaler}[[pool.scaler.schedule]]\nstart = \"9am\"\nend = \"18:00\"\n"),
                "pool[1].scaler.schedule[0].start",
            ),
            (
                &format!(
                    "{scaler}[[pool.scaler.schedule]]\nstart = \"09:00\"\nend = \"18:00\"\n\
                     timezone = \"Mars/Olympus\"\n"
                ),
                "pool[1].scaler.schedule[0].timezone",
            ),
            ("fallback = \"small\"\n", "pool[1].fallback"),
            ("default_deadline_ms = 100\n", "pool[1].default_deadline_ms"),
            (
                &format!("fallback = \"none\"\n{scaler}"),
                "pool[1].fallback",
            ),
            (
                &format!("fallback = \"large\"\n{scaler}"),
                "pool[1].fallback",
            ),
        ];
        for (extra, key) in cases {
            let text = format!("{EXAMPLE}{extra}");
            let err = Config::parse(&text).unwrap_err();
            assert!(err.key.starts_with(key), "{extra}: {err}");
        }

        // Defaults, and a fallback that is always up.
        let text = format!("{EXAMPLE}fallback = \"small\"\n{scaler}");
        let config = Config::parse(&text).unwrap();
        let scaler = config.pool[1].scaler.clone().unwrap();
        assert_eq!(scaler.kind, ScalerKind::Process);
        assert_eq!(scaler.idle_timeout_s, 300);
        assert_eq!(scaler.min_up_s, 60);
        assert_eq!(scaler.min_replicas, 0);
        assert_eq!(scaler.ready_timeout_s, 600);
        assert_eq!(scaler.probe_path, "/v1/models");
        assert_eq!(scaler.probe_interval_ms, 500);
        assert_eq!(scaler.max_held, 256);
        assert_eq!(scaler.max_replicas, 1);
        assert_eq!(scaler.max_in_flight, 64);
        assert_eq!(scaler.target_in_flight, None);
        assert_eq!(scaler.target_queue_wait_ms, 1000);
        assert_eq!(scaler.scale_down_after_s, 60);
        assert_eq!(scaler.probe, ProbeKind::Get);
        assert_eq!(config.pool[1].fallback.as_deref(), Some("small"));
    }

    #[test]
    fn bad_endpoint_url_is_rejected() {
        let text = EXAMPLE.replace("http://127.0.0.1:8002", "127.0.0.1:8002");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.key, "pool[1].endpoints[0]", "{err}");
    }

    #[test]
    fn missing_plugin_file_is_rejected() {
        let text = format!("{EXAMPLE}\n[policy]\nplugin = \"/nonexistent/x.wasm\"\n");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.key, "policy.plugin");
        assert!(err.message.contains("make plugins"));
    }

    #[test]
    fn batch_keys_have_defaults_and_are_checked() {
        let config = Config::parse(EXAMPLE).unwrap();
        let batch = config.pool[0].batch.as_ref().unwrap();
        assert_eq!(batch.mode, BatchMode::Adaptive);
        assert_eq!(batch.max_queue, DEFAULT_MAX_QUEUE);
        assert_eq!(batch.max_inflight, DEFAULT_MAX_INFLIGHT);
        assert!(batch.collapse_embeddings && !batch.collapse_completions);

        let text = EXAMPLE.replace("max_wait_ms = 50", "max_wait_ms = 50\nmax_inflight = 0");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.key, "pool[0].batch.max_inflight", "{err}");
        let text = EXAMPLE.replace("max_wait_ms = 50", "max_wait_ms = 50\nmode = \"eager\"");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.key, "pool[0].batch.mode", "{err}");
        let text = EXAMPLE.replace(
            "max_wait_ms = 50",
            "max_wait_ms = 50\narray_endpoints = [\"chat\"]",
        );
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.key, "pool[0].batch.array_endpoints[0]", "{err}");
    }

    #[test]
    fn cascade_defaults_and_bad_probe_tokens_name_the_key() {
        let plugin = std::env::current_exe().unwrap();
        let policy = format!("\n[policy]\nplugin = {:?}\n", plugin.display().to_string());
        let config = Config::parse(&format!("{EXAMPLE}{policy}")).unwrap();
        let cascade = &config.policy.unwrap().cascade;
        assert_eq!(cascade.stream_mode, StreamMode::Buffer);
        assert_eq!(cascade.probe_tokens, 16);
        assert!(!cascade.shadow);

        let text = format!("{EXAMPLE}{policy}[policy.cascade]\nprobe_tokens = 0\n");
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.key, "policy.cascade.probe_tokens", "{err}");
        let text = format!("{EXAMPLE}{policy}[policy.cascade]\nmode = \"probe\"\n");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.key.starts_with("policy.cascade"), "{err}");
    }

    #[test]
    fn prices_and_baseline_are_checked_with_their_keys() {
        let priced = EXAMPLE.replace(
            "name = \"large\"",
            "name = \"large\"\nprice = { input_per_mtok = 1.0, output_per_mtok = 2.0 }",
        );
        let config = Config::parse(&format!("{priced}\n[costs]\nbaseline = \"large\"\n")).unwrap();
        assert_eq!(config.costs.baseline.as_deref(), Some("large"));

        let err =
            Config::parse(&format!("{EXAMPLE}\n[costs]\nbaseline = \"large\"\n")).unwrap_err();
        assert_eq!(err.key, "costs.baseline", "{err}");
        let both = EXAMPLE.replace(
            "name = \"large\"",
            "name = \"large\"\nprice = { output_per_mtok = 1.0, gpu_hour = 2.0 }",
        );
        let err = Config::parse(&both).unwrap_err();
        assert_eq!(err.key, "pool[1].price.gpu_hour", "{err}");
        let negative = EXAMPLE.replace(
            "name = \"large\"",
            "name = \"large\"\nprice = { gpu_hour = -1.0 }",
        );
        let err = Config::parse(&negative).unwrap_err();
        assert_eq!(err.key, "pool[1].price.gpu_hour", "{err}");
    }

    #[test]
    fn pool_tls_needs_an_https_endpoint_and_a_readable_ca() {
        let tls = "[pool.tls]\nserver_name = \"models.internal\"\n";
        let http_only = format!("{EXAMPLE}{tls}");
        let err = Config::parse(&http_only).unwrap_err();
        assert_eq!(err.key, "pool[1].tls", "{err}");

        let https = EXAMPLE.replace("http://127.0.0.1:8002", "https://127.0.0.1:8002");
        let config = Config::parse(&format!("{https}{tls}")).unwrap();
        let pool_tls = config.pool[1].tls.as_ref().unwrap();
        assert_eq!(pool_tls.server_name.as_deref(), Some("models.internal"));
        assert!(pool_tls.ca_path.is_none());

        let missing = format!("{https}[pool.tls]\nca_path = \"/nonexistent/ca.pem\"\n");
        let err = Config::parse(&missing).unwrap_err();
        assert_eq!(err.key, "pool[1].tls.ca_path", "{err}");
        assert!(err.message.contains("cannot read"), "{err}");
    }

    #[test]
    fn server_tls_files_are_read_at_load() {
        let text = "[server.tls]\ncert_path = \"/nonexistent/c.pem\"\n\
                    key_path = \"/nonexistent/k.pem\"\n";
        let err = Config::parse(text).unwrap_err();
        assert_eq!(err.key, "server.tls.cert_path", "{err}");
        assert_eq!(err.line, Some(2), "{err}");

        let err = Config::parse("[server.tls]\ncert_path = \"c.pem\"\n").unwrap_err();
        assert!(err.message.contains("key_path"), "{err}");
    }

    #[test]
    fn connection_limits_have_defaults_and_refuse_zero() {
        let config = Config::parse(EXAMPLE).unwrap();
        assert_eq!(config.server.max_header_bytes, DEFAULT_MAX_HEADER_BYTES);
        assert_eq!(config.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(config.server.max_connections_per_ip, None);

        let err = Config::parse(
            "[server]
max_connections = 0
",
        )
        .unwrap_err();
        assert_eq!(err.key, "server.max_connections", "{err}");
        assert_eq!(err.line, Some(2), "{err}");
        let err = Config::parse(
            "[server]
max_header_bytes = 100
",
        )
        .unwrap_err();
        assert_eq!(err.key, "server.max_header_bytes", "{err}");
    }

    #[test]
    fn capture_needs_the_transparent_listener_and_unique_addresses() {
        let captured = EXAMPLE.replace(
            "model = \"big\"",
            "model = \"big\"\ncapture = [\"10.0.0.5:8000\", \"10.0.1.0/24:8000\"]",
        );
        let err = Config::parse(&captured).unwrap_err();
        assert_eq!(err.key, "pool[1].capture[0]", "{err}");
        assert!(err.message.contains("[server.transparent]"), "{err}");

        let text = captured.replace(
            "admin = \"127.0.0.1:9901\"\n",
            "admin = \"127.0.0.1:9901\"\n[server.transparent]\n",
        );
        let config = Config::parse(&text).unwrap();
        let transparent = config.server.transparent.as_ref().unwrap();
        assert_eq!(transparent.listen.to_string(), "127.0.0.1:15001");
        assert_eq!(config.pool[1].capture.len(), 2);

        let named = text.replace("10.0.0.5:8000", "vllm.default.svc:8000");
        let err = Config::parse(&named).unwrap_err();
        assert_eq!(err.key, "pool[1].capture[0]", "{err}");
        assert!(err.message.contains("resolve host names"), "{err}");
        let twice = text.replace("10.0.1.0/24:8000", "10.0.0.5:8000");
        let err = Config::parse(&twice).unwrap_err();
        assert_eq!(err.key, "pool[1].capture[1]", "{err}");
        let clash = text.replace(
            "[server.transparent]",
            "[server.transparent]\nlisten = \"127.0.0.1:8080\"",
        );
        let err = Config::parse(&clash).unwrap_err();
        assert_eq!(err.key, "server.transparent.listen", "{err}");
    }

    #[test]
    fn capture_on_loopback_is_refused() {
        let text = EXAMPLE.replace(
            "admin = \"127.0.0.1:9901\"\n",
            "admin = \"127.0.0.1:9901\"\n[server.transparent]\n",
        );
        for loopback in ["127.0.0.1:8000", "127.0.0.0/8:8000", "[::1]:8000"] {
            let captured = text.replace(
                "model = \"big\"",
                &format!("model = \"big\"\ncapture = [\"10.0.0.5:8000\", \"{loopback}\"]"),
            );
            let err = Config::parse(&captured).unwrap_err();
            assert_eq!(err.key, "pool[1].capture[1]", "{err}");
            assert!(err.message.contains("is loopback"), "{err}");
        }
    }

    #[test]
    fn transparent_listen_on_the_wildcard_of_another_port_is_refused() {
        let text = EXAMPLE.replace(
            "admin = \"127.0.0.1:9901\"\n",
            "admin = \"127.0.0.1:9901\"\n[server.transparent]\nlisten = \"0.0.0.0:9901\"\n",
        );
        let err = Config::parse(&text).unwrap_err();
        assert_eq!(err.key, "server.transparent.listen", "{err}");
        assert!(err.message.contains("server.admin"), "{err}");
    }

    #[test]
    fn syntax_error_reports_a_line() {
        let err = Config::parse("[server]\nlisten = \n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
    }

    #[test]
    fn admin_token_env_defaults_and_takes_the_deprecated_alias() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.admin_token_env(), DEFAULT_ADMIN_TOKEN_ENV);
        assert_eq!(config.reload.watch_interval_ms, DEFAULT_WATCH_INTERVAL_MS);
        let config = Config::parse("[admin]\ntoken_env = \"MY_TOKEN\"\n").unwrap();
        assert_eq!(config.admin_token_env(), "MY_TOKEN");

        // The plugin must exist for `[policy]` to validate; the manifest
        // will do as a file.
        let plugin = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let policy = format!("[policy]\nplugin = \"{plugin}\"\nadmin_token_env = \"OLD\"\n");
        let config = Config::parse(&policy).unwrap();
        assert_eq!(config.admin_token_env(), "OLD");
        let both = format!("{policy}[admin]\ntoken_env = \"NEW\"\n");
        let err = Config::parse(&both).unwrap_err();
        assert_eq!(err.key, "policy.admin_token_env", "{err}");
        let err = Config::parse("[admin]\ntoken = \"\"\n").unwrap_err();
        assert_eq!(err.key, "admin.token", "{err}");
    }
}
