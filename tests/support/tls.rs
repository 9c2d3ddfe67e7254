//! Test certificates, made in the test with rcgen: a CA, server
//! certificates it signs for `localhost` and `127.0.0.1`, client
//! certificates, their PEM files in a folder removed on drop, and HTTPS
//! clients that trust only the test CA.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority that signs the test's certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate and its key, PEM and DER.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's DER, to compare with what a server presented.
    pub cert_der: Vec<u8>,
}

impl TestCa {
    /// A new CA whose common name is `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-sign CA");
        Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server_cert(&self) -> Leaf {
        self.server_cert_for(&["localhost", "127.0.0.1"])
    }

    /// A server certificate for the given DNS names and IP addresses.
    pub fn server_cert_for(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.leaf(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate, for mutual TLS.
    pub fn client_cert(&self) -> Leaf {
        self.leaf(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, names: Vec<String>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().expect("generate leaf key");
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, "switchyard test");
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        }
    }
}

/// A folder under the system temp folder, removed with its files on drop.
#[derive(Debug)]
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let name = format!(
            "switchyard-tls-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create temp folder");
        Self { path }
    }

    /// Writes `text` to `name` in the folder and returns its path, as a
    /// string ready for a TOML value.
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.path.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.display().to_string()
    }

    /// Replaces `name` at once (write aside, then rename), as a
    /// certificate manager does.
    pub fn replace(&self, name: &str, text: &str) {
        let aside = self.path.join(format!(".{name}.new"));
        std::fs::write(&aside, text).expect("write replacement");
        std::fs::rename(&aside, self.path.join(name)).expect("rename replacement");
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Writes `leaf` as `cert.pem` and `key.pem` into `dir` and returns the
/// `[server.tls]` table for them, with `extra` keys appended.
pub fn server_tls_toml(dir: &TempDir, leaf: &Leaf, extra: &str) -> String {
    let cert = dir.write("cert.pem", &leaf.cert_pem);
    let key = dir.write("key.pem", &leaf.key_pem);
    format!("\n[server.tls]\ncert_path = {cert:?}\nkey_path = {key:?}\n{extra}")
}

/// Which HTTP version a test client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// ALPN `http/1.1` only.
    Http1,
    /// ALPN `h2` and `http/1.1`; the server picks.
    Both,
}

/// An HTTPS client that trusts only `ca`, keeps TLS details on responses
/// (`reqwest::tls::TlsInfo`) and, with `identity`, presents a client
/// certificate.
pub fn https_client(ca: &TestCa, offer: Offer, identity: Option<&Leaf>) -> reqwest::Client {
    let root = reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).expect("CA PEM");
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .tls_info(true)
        .timeout(std::time::Duration::from_secs(30));
    if offer == Offer::Http1 {
        builder = builder.http1_only();
    }
    if let Some(leaf) = identity {
        let pem = format!("{}{}", leaf.cert_pem, leaf.key_pem);
        let identity = reqwest::Identity::from_pem(pem.as_bytes()).expect("client identity");
        builder = builder.identity(identity);
    }
    builder.build().expect("build HTTPS client")
}

/// The certificate a response's server presented, DER.
pub fn peer_certificate(response: &reqwest::Response) -> Option<Vec<u8>> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .map(<[u8]>::to_vec)
}

/// A rustls server configuration with `leaf` and the given ALPN protocols,
/// for a TLS mock upstream.
pub fn server_config(leaf: &Leaf, alpn: &[&str]) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = vec![CertificateDer::from(leaf.cert_der.clone())];
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("leaf key PEM");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("mock certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}
