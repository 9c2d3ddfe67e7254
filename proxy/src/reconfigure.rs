//! Reloading the whole configuration while serving: on SIGHUP, when the
//! file changes on disk (`[reload] watch_interval_ms`), and on `POST
//! /admin/reload`. The new file is parsed and validated first; a bad one
//! is refused, logged with its line and key, and counted, and the old
//! configuration keeps serving. A good one builds a new [`App`] that new
//! requests are served by, while requests already accepted finish on the
//! one they started with.
//!
//! Also owns the admin token that guards the admin port's calls that
//! change something.
//!
//! Owns the swap, not the request path (`app`) nor the listeners
//! (`server`): settings that shape listeners and connections keep their
//! value from start and are reported as needing a restart.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use serde_json::{json, Value};

use crate::app::{App, PoolChanges};
use crate::config::{Config, ServerConfig};
use crate::metrics::CONFIG_RELOADS;
use crate::reload::{PolicyControl, Refusal};

/// The App new requests are served by, replaced whole by a reload.
#[derive(Debug)]
pub struct Live {
    app: RwLock<Arc<App>>,
}

impl Live {
    pub fn new(app: Arc<App>) -> Self {
        Live {
            app: RwLock::new(app),
        }
    }

    /// The App a new request is served by; the request holds it to its
    /// end, whatever is swapped in meanwhile.
    pub fn app(&self) -> Arc<App> {
        Arc::clone(&self.app.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Serves new requests by `app`; returns the one it replaced.
    fn replace(&self, app: Arc<App>) -> Arc<App> {
        let mut current = self.app.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut current, app)
    }
}

/// The bearer token the admin port's changing calls must carry:
/// `admin.token`, else the variable `admin.token_env` names. Replaced by
/// a reload.
#[derive(Debug)]
pub struct AdminToken {
    current: RwLock<TokenSetting>,
}

#[derive(Debug, Clone)]
struct TokenSetting {
    /// `None` refuses every call.
    token: Option<String>,
    /// The variable it is read from, for the refusal's message.
    env: String,
}

impl TokenSetting {
    fn new(config: &Config) -> Self {
        let env = config.admin_token_env().to_string();
        let token = match &config.admin.token {
            Some(token) => Some(token.clone()),
            None => std::env::var(&env).ok().filter(|t| !t.is_empty()),
        };
        TokenSetting { token, env }
    }
}

impl AdminToken {
    pub fn new(config: &Config) -> Self {
        let setting = TokenSetting::new(config);
        if config
            .policy
            .as_ref()
            .is_some_and(|p| p.admin_token_env.is_some())
        {
            tracing::warn!(
                env = %setting.env,
                "policy.admin_token_env is deprecated; set admin.token_env instead"
            );
        }
        AdminToken {
            current: RwLock::new(setting),
        }
    }

    /// Takes the token of a reloaded configuration.
    fn set(&self, config: &Config) {
        let setting = TokenSetting::new(config);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = setting;
    }

    /// Checks an admin call's `Authorization` header.
    pub fn authorize(&self, authorization: Option<&str>) -> Result<(), Refusal> {
        let setting = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(token) = setting.token else {
            let message = format!(
                "admin calls that change something are off: set the \
                 environment variable {} (admin.token_env) to a token",
                setting.env
            );
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                message,
            });
        };
        let given = authorization.and_then(bearer_token);
        if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return Ok(());
        }
        Err(Refusal {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong bearer token".into(),
        })
    }
}

/// The token of an `Authorization: Bearer TOKEN` value. The scheme is
/// case-insensitive and may be followed by several spaces (RFC 7235).
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// What a successful reload did, for the log and `POST /admin/reload`.
#[derive(Debug, Clone)]
pub struct Reloaded {
    /// Pools configured now, in order.
    pub pools: Vec<String>,
    pub changes: PoolChanges,
    /// `"kept"` (same plugin settings: the running versions stay),
    /// `"loaded"` (new settings: loaded anew) or `"none"`.
    pub policy: &'static str,
    /// Changed keys that keep their old value until a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Reloaded {
    /// The answer of `POST /admin/reload`.
    pub fn to_json(&self) -> Value {
        json!({
            "reloaded": true,
            "pools": self.pools,
            "started": self.changes.started,
            "reused": self.changes.reused,
            "stopped": self.changes.stopped,
            "policy": self.policy,
            "needs_restart": self.needs_restart,
        })
    }
}

/// Reloads the configuration file and swaps the result in.
#[derive(Debug)]
pub struct Reloader {
    /// The configuration file; `None` when serving the embedded default,
    /// which has nothing to reload.
    path: Option<PathBuf>,
    live: Arc<Live>,
    policy: Arc<PolicyControl>,
    token: Arc<AdminToken>,
    /// Held for a whole reload, so reloads run one at a time.
    serving: tokio::sync::Mutex<Serving>,
    /// Whether the file watcher runs.
    watching: AtomicBool,
}

/// The configuration that serves now.
#[derive(Debug)]
struct Serving {
    config: Config,
    /// The file's text at the last reload, good or bad: the watcher does
    /// not reload a file whose text it already tried.
    tried: Option<String>,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        config: Config,
        live: Arc<Live>,
        policy: Arc<PolicyControl>,
        token: Arc<AdminToken>,
    ) -> Self {
        let tried = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
        Reloader {
            path,
            live,
            policy,
            token,
            serving: tokio::sync::Mutex::new(Serving { config, tried }),
            watching: AtomicBool::new(false),
        }
    }

    /// The time shutdown gives requests in flight
    /// (`server.shutdown_grace_s`, which a reload may change).
    pub async fn shutdown_grace(&self) -> Duration {
        let serving = self.serving.lock().await;
        Duration::from_secs(serving.config.server.shutdown_grace_s)
    }

    /// Reloads the file; `source` (`signal`, `file`, `admin`) is logged.
    /// Logs and counts the result either way.
    pub async fn reload(self: &Arc<Self>, source: &'static str) -> Result<Reloaded, Refusal> {
        let result = self.try_reload(source).await;
        match &result {
            Ok(reloaded) => {
                metrics::counter!(CONFIG_RELOADS, "result" => "ok").increment(1);
                let changes = &reloaded.changes;
                tracing::info!(
                    source,
                    pools = %reloaded.pools.join(","),
                    started = %changes.started.join(","),
                    reused = %changes.reused.join(","),
                    stopped = %changes.stopped.join(","),
                    policy = reloaded.policy,
                    "configuration reloaded; new requests use it"
                );
            }
            Err(refusal) => {
                metrics::counter!(CONFIG_RELOADS, "result" => "error").increment(1);
                tracing::warn!(
                    source,
                    error = %refusal.message,
                    "configuration reload rejected; the previous configuration keeps serving"
                );
            }
        }
        // A reload may turn the file watcher on.
        self.watch_file();
        result
    }

    async fn try_reload(&self, source: &'static str) -> Result<Reloaded, Refusal> {
        let Some(path) = &self.path else {
            return Err(Refusal {
                status: StatusCode::CONFLICT,
                message: "switchyard runs on the embedded default \
                          configuration (no --config), so there is no file \
                          to reload"
                    .into(),
            });
        };
        let mut serving = self.serving.lock().await;

        // Read, parse and validate before anything changes.
        let rejected = |message: String| Refusal {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!("{}: {message}", path.display()),
        };
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| rejected(format!("cannot read the file: {e}")))?;
        serving.tried = Some(text.clone());
        let mut config = Config::parse(&text).map_err(|e| rejected(e.to_string()))?;
        let needs_restart = keep_restart_settings(&serving.config.server, &mut config);
        if !needs_restart.is_empty() {
            tracing::warn!(
                source,
                keys = %needs_restart.join(","),
                "configuration change needs a restart; the running value is kept"
            );
        }

        // Building may load a plugin or a model: off the async workers.
        let old = self.live.app();
        let old_config = serving.config.clone();
        let next = config.clone();
        let built = tokio::task::spawn_blocking(move || build(&next, &old, &old_config)).await;
        let (app, changes, policy) = match built {
            Ok(Ok(built)) => built,
            Ok(Err(message)) => return Err(rejected(message)),
            Err(e) => {
                return Err(Refusal {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: format!("building the new configuration failed: {e}"),
                })
            }
        };

        // The swap. Policy swaps wait meanwhile, so a version swapped in
        // just before is the one taken over.
        let exclusive = self.policy.exclusive().await;
        let old = self.live.app();
        if policy == "kept" {
            app.router().adopt_policies(old.router());
        }
        app.ledger().reprice(&config);
        self.live.replace(Arc::new(app));
        // Requests held for a removed or replaced pool's cold start would
        // wait on a server that no longer serves new work.
        old.retire_scalers_of(&changes.stopped);
        self.policy.reconfigure(&config);
        drop(exclusive);
        self.token.set(&config);

        let pools = config.pool.iter().map(|p| p.name.clone()).collect();
        serving.config = config;
        Ok(Reloaded {
            pools,
            changes,
            policy,
            needs_restart,
        })
    }

    /// Reloads on every SIGHUP. Registered at once, so that a SIGHUP
    /// from then on reloads rather than ends the process.
    pub fn watch_signal(self: &Arc<Self>) {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut hangups = match signal(SignalKind::hangup()) {
                Ok(hangups) => hangups,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "cannot watch SIGHUP; reload with POST /admin/reload"
                    );
                    return;
                }
            };
            let reloader = Arc::clone(self);
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    // The result is logged and counted by `reload`.
                    let _ = reloader.reload("signal").await;
                }
            });
        }
    }

    /// Polls the file every `reload.watch_interval_ms` and reloads it when
    /// its modification time or size changed and its text is not the one
    /// last tried. Ends when a reload sets the interval to 0; does
    /// nothing when the watcher already runs or there is no file.
    pub fn watch_file(self: &Arc<Self>) {
        let Some(path) = self.path.clone() else {
            return;
        };
        if self.watching.swap(true, Ordering::SeqCst) {
            return;
        }
        let reloader = Arc::clone(self);
        tokio::spawn(async move {
            let mut seen = stamp(&path);
            loop {
                // Turned off under the lock, so that a reload turning the
                // watcher back on (after it releases the lock) sees it off.
                let serving = reloader.serving.lock().await;
                let interval = serving.config.reload.watch_interval_ms;
                if interval == 0 {
                    reloader.watching.store(false, Ordering::SeqCst);
                    return;
                }
                drop(serving);
                tokio::time::sleep(Duration::from_millis(interval)).await;
                let now = stamp(&path);
                if now == seen || now.is_none() {
                    continue;
                }
                seen = now;
                let Ok(text) = tokio::fs::read_to_string(&path).await else {
                    continue;
                };
                let tried = reloader.serving.lock().await.tried.clone();
                if tried.as_deref() == Some(text.as_str()) {
                    continue;
                }
                // The result is logged and counted by `reload`.
                let _ = reloader.reload("file").await;
            }
        });
    }
}

/// Builds the App of `config` from the running `old` one, loading the
/// policy plugin only when its settings changed. Returns the App, what
/// happened to the pools and to the policy.
fn build(
    config: &Config,
    old: &App,
    old_config: &Config,
) -> Result<(App, PoolChanges, &'static str), String> {
    let (plugin, policy) = match (&old_config.policy, &config.policy) {
        (_, None) => (None, "none"),
        (Some(before), Some(now)) if before.same_plugin(now) => (None, "kept"),
        (_, Some(now)) => {
            let loaded = switchyard_policy::Policy::load(&now.settings())
                .map_err(|e| format!("policy.plugin: {e}"))?;
            (Some(loaded), "loaded")
        }
    };
    let (app, changes) = App::reload(config, plugin, old, old_config)?;
    Ok((app, changes, policy))
}

/// Keys under `[server]` that shape listeners and connections, which a
/// reload cannot change: the ones `new` changes are named, and `new`
/// gets the running values back. The request limits that the App reads
/// (`max_body_bytes`, `body_read_timeout_ms`) and `shutdown_grace_s`
/// change live.
fn keep_restart_settings(running: &ServerConfig, new: &mut Config) -> Vec<&'static str> {
    let next = &new.server;
    let checks = [
        ("server.listen", running.listen == next.listen),
        ("server.admin", running.admin == next.admin),
        ("server.tls", running.tls == next.tls),
        (
            "server.transparent",
            running.transparent == next.transparent,
        ),
        (
            "server.header_read_timeout_ms",
            running.header_read_timeout_ms == next.header_read_timeout_ms,
        ),
        (
            "server.max_header_bytes",
            running.max_header_bytes == next.max_header_bytes,
        ),
        (
            "server.max_headers",
            running.max_headers == next.max_headers,
        ),
        (
            "server.idle_timeout_ms",
            running.idle_timeout_ms == next.idle_timeout_ms,
        ),
        (
            "server.write_timeout_ms",
            running.write_timeout_ms == next.write_timeout_ms,
        ),
        (
            "server.max_connections",
            running.max_connections == next.max_connections,
        ),
        (
            "server.max_connections_per_ip",
            running.max_connections_per_ip == next.max_connections_per_ip,
        ),
        (
            "server.max_concurrent_streams",
            running.max_concurrent_streams == next.max_concurrent_streams,
        ),
    ];
    let changed: Vec<&'static str> = checks
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(key, _)| key)
        .collect();
    new.server = ServerConfig {
        max_body_bytes: next.max_body_bytes,
        body_read_timeout_ms: next.body_read_timeout_ms,
        shutdown_grace_s: next.shutdown_grace_s,
        ..running.clone()
    };
    changed
}

/// Modification time and length of the file.
fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_equal_bytes() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn listener_settings_keep_their_running_value() {
        let running = Config::parse("[server]\nlisten = \"127.0.0.1:8000\"\n").unwrap();
        let mut new = Config::parse(
            "[server]\nlisten = \"127.0.0.1:8001\"\nmax_connections = 5\n\
             max_body_bytes = 100\nshutdown_grace_s = 1\n",
        )
        .unwrap();
        let changed = keep_restart_settings(&running.server, &mut new);
        assert_eq!(changed, ["server.listen", "server.max_connections"]);
        assert_eq!(new.server.listen, running.server.listen);
        assert_eq!(new.server.max_connections, running.server.max_connections);
        assert_eq!(new.server.max_body_bytes, 100);
        assert_eq!(new.server.shutdown_grace_s, 1);
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let config = Config::parse("[admin]\ntoken = \"s3cret\"\n").unwrap();
        let token = AdminToken::new(&config);
        for given in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret"] {
            assert!(token.authorize(Some(given)).is_ok(), "{given}");
        }
        for given in ["Basic s3cret", "Bearers3cret", "bearer S3CRET"] {
            assert!(token.authorize(Some(given)).is_err(), "{given}");
        }
    }

    #[test]
    fn a_literal_token_wins_over_the_environment() {
        let config = Config::parse("[admin]\ntoken = \"s3cret\"\n").unwrap();
        let token = AdminToken::new(&config);
        assert!(token.authorize(Some("Bearer s3cret")).is_ok());
        let refusal = token.authorize(Some("Bearer nope")).unwrap_err();
        assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);

        let config =
            Config::parse("[admin]\ntoken_env = \"SWITCHYARD_TEST_TOKEN_THAT_IS_NEVER_SET\"\n")
                .unwrap();
        token.set(&config);
        let refusal = token.authorize(Some("Bearer s3cret")).unwrap_err();
        assert_eq!(refusal.status, StatusCode::FORBIDDEN);
        assert!(
            refusal
                .message
                .contains("SWITCHYARD_TEST_TOKEN_THAT_IS_NEVER_SET"),
            "{}",
            refusal.message
        );
    }
}
