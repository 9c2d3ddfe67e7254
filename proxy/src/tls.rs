//! TLS: the API listener's certificate (PEM files, reloaded when they
//! change on disk), client certificate checks (mutual TLS), and the
//! client side of `https://` upstream endpoints.
//!
//! Everything uses rustls with the ring crypto provider, named on every
//! configuration rather than installed process-wide, so nothing depends on
//! which provider another crate enabled. This module reads files and
//! builds rustls configurations; it opens no sockets and serves nothing.

use std::error::Error as StdError;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{PoolTlsConfig, ServerTlsConfig};
use crate::metrics::TLS_RELOADS;

/// Protocols the API listener offers in ALPN, preferred first.
const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A TLS file that could not be used, with the config field (`cert_path`,
/// `key_path`, ...) that names it, so the caller can give the full key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// The field of the TLS table at fault, such as `key_path`.
    pub field: &'static str,
    pub message: String,
}

impl FileError {
    fn new(field: &'static str, message: String) -> Self {
        Self { field, message }
    }
}

/// The crypto provider of every TLS configuration here.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file, in order; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let iter =
        CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{shown} holds no PEM certificate (a -----BEGIN CERTIFICATE----- \
             block)"
        ));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file: PKCS#8, PKCS#1 (RSA) or
/// SEC1 (EC).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let shown = path.display();
    // Read first, so that a missing file is not reported as "no key".
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "{shown} holds no PEM private key (PKCS#8 `PRIVATE KEY`, PKCS#1 \
             `RSA PRIVATE KEY` or SEC1 `EC PRIVATE KEY`)"
        ),
        other => format!("{shown} is not valid PEM: {other}"),
    })
}

/// Reads a PEM bundle of CA certificates into a root store; every
/// certificate must parse as a trust anchor.
pub fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: a certificate is not a usable CA: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Loads the listener's certificate chain and key and checks that the key
/// belongs to the first certificate.
pub fn load_certified_key(tls: &ServerTlsConfig) -> Result<CertifiedKey, FileError> {
    let certs = read_certs(&tls.cert_path).map_err(|e| FileError::new("cert_path", e))?;
    let key = read_key(&tls.key_path).map_err(|e| FileError::new("key_path", e))?;

    // The key is parsed by the provider that will sign with it, then its
    // public half compared with the certificate's.
    let provider = provider();
    let key = provider.key_provider.load_private_key(key).map_err(|e| {
        let message = format!(
            "{}: not a private key this server can sign with: {e}",
            tls.key_path.display()
        );
        FileError::new("key_path", message)
    })?;
    let certified = CertifiedKey::new(certs, key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        // Keys whose public half the provider cannot tell are let through
        // (rustls does the same); the handshake would show a mismatch.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => Err(FileError::new(
            "key_path",
            format!(
                "{} does not belong to the first certificate of {}",
                tls.key_path.display(),
                tls.cert_path.display()
            ),
        )),
        Err(e) => Err(FileError::new(
            "cert_path",
            format!(
                "{}: the first certificate does not parse: {e}",
                tls.cert_path.display()
            ),
        )),
    }
}

/// Checks every file of `[server.tls]` as the listener would load it.
pub fn check_server_files(tls: &ServerTlsConfig) -> Result<(), FileError> {
    load_certified_key(tls)?;
    if let Some(path) = &tls.client_ca_path {
        client_verifier(path)?;
    }
    Ok(())
}

fn client_verifier(
    path: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, FileError> {
    let roots = read_roots(path).map_err(|e| FileError::new("client_ca_path", e))?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| {
            let message = format!("{}: cannot verify clients with it: {e}", path.display());
            FileError::new("client_ca_path", message)
        })
}

/// The API listener's TLS: the rustls configuration handshakes use, and
/// the certificate behind it, which `watch` swaps when the files change.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    resolver: Arc<RotatingCert>,
    settings: ServerTlsConfig,
}

impl ServerTls {
    /// Loads the files of `[server.tls]` and builds the configuration:
    /// TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`, client certificates
    /// required when `client_ca_path` is set.
    // Limitation: `client_ca_path` is read once, at start; a new client CA
    // bundle needs a restart (only the certificate and key are reloaded).
    pub fn new(tls: &ServerTlsConfig) -> Result<Self, FileError> {
        let certified = load_certified_key(tls)?;
        let resolver = Arc::new(RotatingCert {
            current: RwLock::new(Arc::new(certified)),
        });

        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| {
                let message = format!("the ring provider offers no TLS version: {e}");
                FileError::new("cert_path", message)
            })?;
        let builder = match &tls.client_ca_path {
            Some(path) => builder.with_client_cert_verifier(client_verifier(path)?),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();

        Ok(Self {
            config: Arc::new(config),
            resolver,
            settings: tls.clone(),
        })
    }

    /// Polls the certificate and key files every `reload_interval_ms`
    /// and, when either changed (modification time or size), loads the
    /// pair and swaps it in: new handshakes get the new certificate,
    /// established connections keep theirs. A pair that does not load is
    /// logged and the old one kept. Does nothing when the interval is 0.
    pub fn watch(&self) {
        let interval = self.settings.reload_interval_ms;
        if interval == 0 {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut seen = this.stamp();
            let mut tick = tokio::time::interval(Duration::from_millis(interval));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = this.stamp();
                if now == seen {
                    continue;
                }
                // Remembered even when loading fails: a half-written pair
                // is retried when the files change again, not warned
                // about on every tick.
                seen = now;
                this.reload();
            }
        });
    }

    fn reload(&self) {
        // Reading files blocks, but they are small and this is rare.
        match load_certified_key(&self.settings) {
            Ok(certified) => {
                self.resolver.replace(certified);
                metrics::counter!(TLS_RELOADS, "result" => "ok").increment(1);
                tracing::info!(
                    cert_path = %self.settings.cert_path.display(),
                    "tls certificate reloaded; new handshakes use it"
                );
            }
            Err(e) => {
                metrics::counter!(TLS_RELOADS, "result" => "error").increment(1);
                tracing::warn!(
                    key = %format!("server.tls.{}", e.field),
                    error = %e.message,
                    "changed tls certificate not loaded; still serving the \
                     previous one"
                );
            }
        }
    }

    /// What tells that a file changed: its modification time and size,
    /// for the certificate and the key.
    fn stamp(&self) -> [Option<(SystemTime, u64)>; 2] {
        let stamp = |path: &Path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        };
        [
            stamp(&self.settings.cert_path),
            stamp(&self.settings.key_path),
        ]
    }
}

/// The certificate every handshake gets, swapped whole on reload.
#[derive(Debug)]
struct RotatingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl RotatingCert {
    fn replace(&self, certified: CertifiedKey) {
        // A writer that panicked left a whole `Arc`; there is nothing
        // half-written to fear in a poisoned lock.
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Arc::new(certified);
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(Arc::clone(&current))
    }
}

/// The client TLS configuration of a pool's `https://` endpoints: trusted
/// roots from `tls.ca_path`, else the platform's store; certificate and
/// host name checks always on. ALPN is left to the connector.
pub fn client_config(pool: &str, tls: Option<&PoolTlsConfig>) -> Result<ClientConfig, String> {
    let roots = match tls.and_then(|t| t.ca_path.as_deref()) {
        Some(path) => read_roots(path).map_err(|e| format!("pool {pool:?}: tls.ca_path: {e}"))?,
        None => platform_roots(pool)?,
    };
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| format!("pool {pool:?}: tls setup failed: {e}"))
}

/// A client configuration that trusts nothing, for pools whose endpoints
/// are all cleartext: the connector wants one, and it is never used.
pub fn empty_client_config() -> Result<ClientConfig, rustls::Error> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    Ok(builder
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth())
}

/// The operating system's trusted CA certificates (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` are honoured).
fn platform_roots(pool: &str) -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::debug!(pool, error = %error, "skipped part of the platform's CA store");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        tracing::debug!(pool, ignored, "platform CA certificates that do not parse");
    }
    if added == 0 {
        return Err(format!(
            "pool {pool:?} has https endpoints but the platform's CA store \
             holds no usable certificate; set pool.tls.ca_path to a PEM \
             bundle of the CAs to trust"
        ));
    }
    Ok(roots)
}

/// Parses `tls.server_name` as the name to send and verify.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string())
        .map_err(|e| format!("{name:?} is not a DNS name or IP address: {e}"))
}

/// When `error` (or a cause) is a failed certificate check, a hint at the
/// keys that fix it; `None` for other failures.
pub fn certificate_hint(error: &(dyn StdError + 'static)) -> Option<&'static str> {
    match find_rustls_error(error)? {
        rustls::Error::InvalidCertificate(_) => Some(
            "the upstream's certificate is not trusted or not issued for \
             its name; set pool.tls.ca_path to the CA bundle that signed it, \
             or pool.tls.server_name to the name it was issued for",
        ),
        _ => None,
    }
}

/// The rustls error behind `error`, looking inside `io::Error`s too, whose
/// `source()` skips the error they wrap.
fn find_rustls_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    if let Some(found) = error.downcast_ref::<rustls::Error>() {
        return Some(found);
    }
    if let Some(inner) = error
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if let Some(found) = find_rustls_error(inner) {
            return Some(found);
        }
    }
    find_rustls_error(error.source()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// A self-signed certificate for `localhost` and its key, written as
    /// PEM files `name.crt` and `name.key` into `dir`.
    fn pair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn settings(cert_path: &Path, key_path: &Path) -> ServerTlsConfig {
        ServerTlsConfig {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            client_ca_path: None,
            reload_interval_ms: 0,
            handshake_timeout_ms: 1000,
        }
    }

    fn temp_dir(test: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("switchyard-tls-unit-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_key_of_another_certificate_is_blamed_on_key_path() {
        let dir = temp_dir("mismatch");
        let (cert, _) = pair(&dir, "a");
        let (_, other_key) = pair(&dir, "b");
        let err = load_certified_key(&settings(&cert, &other_key)).unwrap_err();
        assert_eq!(err.field, "key_path", "{err:?}");
        assert!(err.message.contains("does not belong"), "{err:?}");

        let (cert, key) = pair(&dir, "c");
        assert!(load_certified_key(&settings(&cert, &key)).is_ok());
        let err = load_certified_key(&settings(&key, &key)).unwrap_err();
        assert_eq!(err.field, "cert_path", "{err:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reload_swaps_the_pair_and_keeps_it_when_the_new_one_is_bad() {
        let dir = temp_dir("reload");
        let (cert, key) = pair(&dir, "live");
        let tls = ServerTls::new(&settings(&cert, &key)).unwrap();
        let first = current(&tls);

        // A key that does not match: the old pair stays.
        let (_, stranger) = pair(&dir, "stranger");
        std::fs::copy(&stranger, &key).unwrap();
        tls.reload();
        assert_eq!(current(&tls), first);

        // A whole new pair: swapped in.
        let (new_cert, new_key) = pair(&dir, "next");
        std::fs::copy(&new_cert, &cert).unwrap();
        std::fs::copy(&new_key, &key).unwrap();
        tls.reload();
        let second = current(&tls);
        assert_ne!(second, first);
        assert_eq!(second, read_certs(&new_cert).unwrap()[0].to_vec());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn current(tls: &ServerTls) -> Vec<u8> {
        let key = tls.resolver.current.read().unwrap();
        key.end_entity_cert().unwrap().to_vec()
    }

    #[test]
    fn alpn_offers_h2_before_http1() {
        let dir = temp_dir("alpn");
        let (cert, key) = pair(&dir, "alpn");
        let tls = ServerTls::new(&settings(&cert, &key)).unwrap();
        assert_eq!(
            tls.config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn certificate_failures_inside_io_errors_get_a_hint() {
        let bad = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = io::Error::other(io::Error::new(io::ErrorKind::InvalidData, bad));
        assert!(certificate_hint(&wrapped).is_some_and(|h| h.contains("ca_path")));

        let other = io::Error::other(rustls::Error::HandshakeNotComplete);
        assert!(certificate_hint(&other).is_none());
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(certificate_hint(&refused).is_none());
    }
}
