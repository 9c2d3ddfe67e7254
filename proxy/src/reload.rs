//! Policy hot swap: a new plugin, from its file changing or a `PUT
//! /admin/policy`, is compiled, initialised with the configured
//! `[policy.config]` and tried on trial requests before new requests are
//! routed by it; `POST /admin/policy/rollback` returns to the one it
//! replaced. Requests in flight keep the version they started with (they
//! hold it from routing to review).
//!
//! A configuration reload that keeps the same `[policy]` plugin settings
//! keeps the running version (and the one a rollback returns to); one
//! that changes them loads the plugin anew (`reconfigure`).
//!
//! Owns the admin side of the policy's lifecycle; routing itself is
//! `routing`'s, and nothing here touches a request. Who may call the
//! admin endpoints is `reconfigure::AdminToken`'s business.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, Value};
use switchyard_policy::{Endpoint, Policy, PolicySettings, RouteRequest};

use crate::config::Config;
use crate::reconfigure::Live;

/// Largest plugin accepted by `PUT /admin/policy`, in bytes.
pub const MAX_PLUGIN_BYTES: usize = 64 << 20;

/// Why a swap or rollback was refused, with the status the admin client
/// gets.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

/// The policy's admin controls, shared by the admin port, the watcher and
/// configuration reloads.
#[derive(Debug)]
pub struct PolicyControl {
    /// The App whose router new versions are swapped into.
    live: Arc<Live>,
    /// What the `[policy]` table now says; replaced by a reload.
    state: RwLock<PolicyState>,
    /// The task polling the plugin file, when one runs.
    watcher: Mutex<Option<tokio::task::AbortHandle>>,
    /// Held by every change of the active version (a swap, a rollback, a
    /// configuration reload taking the versions over), so they happen
    /// one at a time and none is lost to another.
    changes: tokio::sync::Mutex<()>,
}

/// The `[policy]` settings new versions are loaded with.
#[derive(Debug, Clone, Default)]
struct PolicyState {
    /// `None` without a `[policy]` table, when nothing can be swapped in.
    settings: Option<PolicySettings>,
    watch_interval: Option<Duration>,
}

impl PolicyState {
    fn new(config: &Config) -> Self {
        let policy = config.policy.as_ref();
        let watch_interval = policy
            .map(|p| p.watch_interval_ms)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        PolicyState {
            settings: policy.map(|p| p.settings()),
            watch_interval,
        }
    }

    /// What the watcher polls: the plugin file and how often.
    fn watched(&self) -> Option<(PathBuf, Duration)> {
        Some((self.settings.as_ref()?.plugin.clone(), self.watch_interval?))
    }
}

impl PolicyControl {
    pub fn new(live: Arc<Live>, config: &Config) -> Self {
        PolicyControl {
            live,
            state: RwLock::new(PolicyState::new(config)),
            watcher: Mutex::new(None),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> PolicyState {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until no swap or rollback is under way and keeps others out
    /// while the guard lives.
    pub async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.lock().await
    }

    /// Takes the `[policy]` settings of a reloaded configuration, and
    /// restarts the file watcher when its file or interval changed.
    pub fn reconfigure(self: &Arc<Self>, config: &Config) {
        let next = PolicyState::new(config);
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let rewatch = state.watched() != next.watched();
        *state = next;
        drop(state);
        if rewatch {
            self.watch();
        }
    }

    /// `GET /admin/policy`: the active and previous versions.
    pub fn status(&self) -> Value {
        let describe = |p: Option<Arc<Policy>>| {
            p.map(|p| json!({"name": p.name(), "version": p.version(), "interface": p.interface()}))
        };
        let app = self.live.app();
        json!({
            "active": describe(app.router().policy()),
            "previous": describe(app.router().previous_policy()),
        })
    }

    /// Validates `bytes` as a plugin and, if it passes, swaps it in.
    /// Returns the new version.
    pub async fn install(&self, bytes: Bytes, source: &str) -> Result<String, Refusal> {
        let _exclusive = self.exclusive().await;
        let Some(settings) = self.state().settings else {
            return Err(Refusal {
                status: StatusCode::CONFLICT,
                message: "no [policy] is configured, so there is nothing to replace".into(),
            });
        };
        let old = self.live.app().router().policy();
        let configured = settings.plugin.display().to_string();
        let loaded = tokio::task::spawn_blocking(move || prepare(&settings, &bytes)).await;
        let policy = match loaded {
            Ok(Ok(policy)) => policy,
            Ok(Err(message)) => {
                let message = refusal_message(&message, &configured, source);
                tracing::warn!(source, error = %message, "new policy plugin rejected; the old one keeps serving");
                return Err(Refusal {
                    status: StatusCode::BAD_REQUEST,
                    message,
                });
            }
            Err(e) => {
                return Err(Refusal {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: format!("loading the plugin failed: {e}"),
                })
            }
        };
        let version = policy.version().to_string();
        if old.as_ref().is_some_and(|o| o.version() == version) {
            return Ok(version);
        }
        // The App may have been replaced by a reload while the plugin
        // compiled; the swap goes to the one serving now.
        self.live.app().router().swap_policy(Arc::new(policy));
        tracing::info!(
            source,
            version = %version,
            previous = old.as_ref().map(|o| o.version()),
            "policy plugin swapped"
        );
        Ok(version)
    }

    /// `POST /admin/policy/rollback`: back to the previous version.
    pub async fn rollback(&self) -> Result<String, Refusal> {
        let _exclusive = self.exclusive().await;
        match self.live.app().router().rollback_policy() {
            Some(policy) => {
                tracing::info!(version = policy.version(), "policy plugin rolled back");
                Ok(policy.version().to_string())
            }
            None => Err(Refusal {
                status: StatusCode::CONFLICT,
                message: "there is no previous policy version to roll back to".into(),
            }),
        }
    }

    /// Polls the plugin file every `policy.watch_interval_ms` and installs
    /// it when its bytes change. Replaces the watcher already running.
    pub fn watch(self: &Arc<Self>) {
        let mut watcher = self.watcher.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = watcher.take() {
            old.abort();
        }
        let Some((path, interval)) = self.state().watched() else {
            return;
        };
        let control = Arc::clone(self);
        let task = tokio::spawn(async move {
            let mut seen = stamp(&path);
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let now = stamp(&path);
                if now == seen || now.is_none() {
                    continue;
                }
                seen = now;
                let Ok(bytes) = tokio::fs::read(&path).await else {
                    continue;
                };
                // A rejected file is logged; the old plugin keeps serving.
                let _ = control.install(Bytes::from(bytes), "file").await;
            }
        });
        *watcher = Some(task.abort_handle());
    }
}

/// Modification time and length of the plugin file.
fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Compiles and initialises a plugin, which runs the fixtures it ships
/// (`switchyard_sdk::export_fixtures!`), and tries it on two built-in
/// trial requests that any plugin must answer without failing.
fn prepare(settings: &PolicySettings, bytes: &[u8]) -> Result<Policy, String> {
    let policy = Policy::load_bytes(settings, bytes).map_err(|e| e.to_string())?;
    for request in trial_requests() {
        if let Err(e) = policy.route(&request) {
            return Err(format!(
                "trial request for model {:?} failed: {e}",
                request.model
            ));
        }
    }
    Ok(policy)
}

fn trial_requests() -> Vec<Arc<RouteRequest>> {
    let chat = RouteRequest::new(Endpoint::ChatCompletions, "auto").with_message("user", "Hello");
    let mut completion =
        RouteRequest::new(Endpoint::Completions, "auto").with_prompt("Once upon a time");
    completion.stream = true;
    vec![Arc::new(chat), Arc::new(completion)]
}

/// Most characters of a refusal's message; wasmtime's explanations of a
/// malformed file can run to pages.
const MAX_REFUSAL_CHARS: usize = 600;

/// A load error's message for whoever sent the new plugin: the loader
/// names the configured file, which an upload is not; multi-line dumps
/// are folded onto one line and cut.
fn refusal_message(message: &str, configured: &str, source: &str) -> String {
    let named = if source == "file" {
        message.to_string()
    } else {
        message
            .replace(
                &format!("policy plugin {configured}"),
                "the uploaded policy plugin",
            )
            .replace(configured, "the uploaded plugin")
    };
    let folded: String = named.split_whitespace().collect::<Vec<_>>().join(" ");
    match folded.char_indices().nth(MAX_REFUSAL_CHARS) {
        Some((cut, _)) => format!("{} ...", &folded[..cut]),
        None => folded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_upload_and_fit_on_a_line() {
        let message = "policy plugin p/x.wasm rejected its configuration:\n  bad\n  key";
        assert_eq!(
            refusal_message(message, "p/x.wasm", "admin"),
            "the uploaded policy plugin rejected its configuration: bad key"
        );
        assert_eq!(
            refusal_message(message, "p/x.wasm", "file"),
            "policy plugin p/x.wasm rejected its configuration: bad key"
        );
        let long = "x ".repeat(1000);
        let cut = refusal_message(&long, "p", "admin");
        assert!(cut.ends_with(" ...") && cut.len() < MAX_REFUSAL_CHARS + 10);
    }
}
