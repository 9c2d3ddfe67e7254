//! `RawUpstream`: an upstream on loopback that fails below HTTP, for the
//! resilience tests. Each accepted connection reads the request's first
//! bytes and then, by `Fault`:
//!
//! - `Reset`: closes the connection with a TCP reset (linger 0), as a
//!   crashing server does;
//! - `Stall`: keeps the connection open and never answers;
//! - `Garbage`: writes bytes that are not HTTP and closes;
//! - `InvalidJson`: answers a well-formed `200 OK` whose
//!   `application/json` body is not JSON.
//!
//! `connections()` counts accepted connections, so a test can tell how
//! many tries reached it.
//!
//! `RawUpstream::start_refusing_h2` serves HTTP/2 over TLS and refuses
//! every stream (`RST_STREAM` with `REFUSED_STREAM`), as a server that is
//! shutting down or over its stream limit does: the request was never
//! processed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Bytes a `Garbage` upstream answers with.
pub const GARBAGE: &[u8] = b"this is not an http response\r\n\r\n";

/// Body of an `InvalidJson` upstream's answer.
pub const INVALID_JSON: &str = "{\"choices\": [oops";

/// How a `RawUpstream` misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Reset,
    Stall,
    Garbage,
    InvalidJson,
}

/// A misbehaving upstream on `127.0.0.1`, stopped when dropped.
#[derive(Debug)]
pub struct RawUpstream {
    addr: SocketAddr,
    tls: bool,
    connections: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start(fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw upstream on loopback");
        let addr = listener.local_addr().expect("raw upstream addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(misbehave(stream, fault));
            }
        });
        Self {
            addr,
            tls: false,
            connections,
            accept,
        }
    }

    /// Starts an HTTP/2 server with TLS `config` (whose ALPN must offer
    /// `h2`) that refuses every stream. `url()` is then `https://`.
    pub async fn start_refusing_h2(config: Arc<rustls::ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind refusing upstream on loopback");
        let addr = listener.local_addr().expect("refusing upstream addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(refuse_streams(acceptor.clone(), stream));
            }
        });
        Self {
            addr,
            tls: true,
            connections,
            accept,
        }
    }

    /// Base URL, `http://127.0.0.1:PORT` (`https://` for the refusing
    /// HTTP/2 server).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn refuse_streams(acceptor: tokio_rustls::TlsAcceptor, stream: TcpStream) {
    let Ok(stream) = acceptor.accept(stream).await else {
        return;
    };
    let Ok(mut connection) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((_request, mut respond))) = connection.accept().await {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
    }
}

async fn misbehave(mut stream: TcpStream, fault: Fault) {
    // The request's head (and, for small requests, its body) arrives in
    // the first read.
    let mut buf = [0u8; 8192];
    let _ = stream.read(&mut buf).await;
    match fault {
        Fault::Reset => {
            let _ = stream.set_zero_linger();
            drop(stream);
        }
        Fault::Stall => {
            // Hold the connection until the peer gives up.
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        }
        Fault::Garbage => {
            let _ = stream.write_all(GARBAGE).await;
            let _ = stream.shutdown().await;
        }
        Fault::InvalidJson => {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n",
                INVALID_JSON.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(INVALID_JSON.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    }
}
