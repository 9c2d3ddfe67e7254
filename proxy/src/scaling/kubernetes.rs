//! The `kubernetes` scaler's call: set a Deployment's replicas through
//! its scale subresource with kube-rs, with credentials from a
//! kubeconfig (`pool.scaler.kubeconfig`, else `KUBECONFIG`), from
//! `api_url` and `token_env`, or from the pod's service account.
//!
//! This module makes one call; retrying it and deciding when to call is
//! `webhook`'s and the supervisor's.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

use crate::config::ScalerConfig;

/// Where the API server and the credentials come from.
#[derive(Debug, Clone)]
enum Source {
    /// A kubeconfig file (`pool.scaler.kubeconfig`).
    File(PathBuf),
    /// The kubeconfig files `KUBECONFIG` lists, merged.
    Env,
    /// `pool.scaler.api_url`, with `token_env` and `ca_path`.
    Url(http::Uri),
    /// The pod's service account and `KUBERNETES_SERVICE_HOST`.
    InCluster,
}

/// The Deployment one pool scales, and how to reach its API server.
#[derive(Debug)]
pub(super) struct Target {
    deployment: String,
    namespace: Option<String>,
    context: Option<String>,
    source: Source,
    token_env: Option<String>,
    ca_path: Option<PathBuf>,
    timeout: Duration,
}

impl Target {
    /// The target of `config`; fails when no API server can be found.
    /// Credentials are read at each call, so that rotated tokens and
    /// edited kubeconfigs are followed.
    pub(super) fn new(config: &ScalerConfig, timeout: Duration) -> Result<Self, String> {
        let Some(deployment) = &config.deployment else {
            return Err("pool.scaler.deployment is not set".to_string());
        };
        let kubeconfig_env = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty());
        let source = match (&config.kubeconfig, &config.api_url) {
            (Some(path), _) => Source::File(path.clone()),
            (None, Some(url)) => Source::Url(
                url.parse()
                    .map_err(|e| format!("pool.scaler.api_url {url:?} is not a URL: {e}"))?,
            ),
            (None, None) if kubeconfig_env.is_some() => Source::Env,
            (None, None) => {
                if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
                    return Err(NO_API_SERVER.to_string());
                }
                Source::InCluster
            }
        };
        Ok(Self {
            deployment: deployment.clone(),
            namespace: config.namespace.clone(),
            context: config.context.clone(),
            source,
            token_env: config.token_env.clone(),
            ca_path: config.ca_path.clone(),
            timeout,
        })
    }

    /// Where the calls go, for logs.
    pub(super) fn describe(&self) -> String {
        let source = match &self.source {
            Source::File(path) => format!("kubeconfig {}", path.display()),
            Source::Env => "kubeconfig from KUBECONFIG".to_string(),
            Source::Url(url) => url.to_string(),
            Source::InCluster => "the in-cluster API server".to_string(),
        };
        format!("deployments/{}/scale via {source}", self.deployment)
    }

    /// One PATCH of the scale subresource to `replicas`
    /// (`application/merge-patch+json`).
    pub(super) async fn scale(&self, replicas: u32) -> Result<(), String> {
        let config = self.client_config().await?;
        let namespace = self
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config)
            .map_err(|e| format!("cannot set up the Kubernetes client: {e}"))?;
        let api: Api<Deployment> = Api::namespaced(client, &namespace);
        let patch = json!({ "spec": { "replicas": replicas } });
        let params = PatchParams::default();
        api.patch_scale(&self.deployment, &params, &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "PATCH deployments/{}/scale in namespace {namespace:?} failed: {e}",
                    self.deployment
                )
            })
    }

    /// The client configuration, read afresh from its source, with
    /// `token_env` and `ca_path` applied.
    async fn client_config(&self) -> Result<kube::Config, String> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        let mut config = match &self.source {
            Source::File(path) => {
                let file = Kubeconfig::read_from(path)
                    .map_err(|e| format!("pool.scaler.kubeconfig {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| format!("pool.scaler.kubeconfig {}: {e}", path.display()))?
            }
            Source::Env => {
                let file = Kubeconfig::from_env()
                    .map_err(|e| format!("the kubeconfig KUBECONFIG names: {e}"))?
                    .ok_or_else(|| "KUBECONFIG is no longer set".to_string())?;
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| format!("the kubeconfig KUBECONFIG names: {e}"))?
            }
            Source::Url(url) => kube::Config::new(url.clone()),
            Source::InCluster => kube::Config::incluster()
                .map_err(|e| format!("cannot read the pod's service account: {e}"))?,
        };
        if let Some(name) = &self.token_env {
            let token = std::env::var(name).map_err(|_| {
                format!("pool.scaler.token_env names {name:?}, which is not set or not UTF-8")
            })?;
            config.auth_info = kube::config::AuthInfo {
                token: Some(token.into()),
                ..kube::config::AuthInfo::default()
            };
        }
        if let Some(path) = &self.ca_path {
            let certs = crate::tls::read_certs(path)?;
            config.root_cert = Some(certs.iter().map(|c| c.to_vec()).collect());
            config.root_cert_file = None;
        }

        // `webhook` retries, logging each failure; kube's own retries
        // would hide them.
        config.default_retry = false;
        config.connect_timeout = Some(self.timeout);
        config.read_timeout = Some(self.timeout);
        config.write_timeout = Some(self.timeout);
        Ok(config)
    }
}

/// Why a `kubernetes` scaler outside a cluster has nowhere to call.
const NO_API_SERVER: &str = "no Kubernetes API server: set pool.scaler.kubeconfig \
     (or KUBECONFIG), or pool.scaler.api_url, or run in a pod";
