//! Transparent capture: connections that iptables redirected to the
//! `[server.transparent]` listener, the destination each was really
//! opened to (`SO_ORIGINAL_DST`), and the pool that destination belongs
//! to (`pool.capture`).
//!
//! This module answers "which pool did the client mean?" for one
//! connection; serving the connection's requests is `server`'s and
//! `app`'s business, and writing the rules is `iptables`'s.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpStream;

use crate::config::Config;
use crate::error::{ApiError, ErrorKind};
use crate::metrics::{CAPTURED_CONNECTIONS, CAPTURE_FAILURES};

/// Default of `server.transparent.listen`: the port Envoy-style sidecars
/// take for redirected outbound traffic.
pub const DEFAULT_TRANSPARENT_PORT: u16 = 15001;

/// First byte of a TLS record carrying a handshake: a captured client
/// that starts with it expected to talk TLS to its server.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// One `pool.capture` entry: a destination address, or a block of them,
/// and a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureTarget {
    /// The network's first address (host bits cleared).
    network: IpAddr,
    /// Leading bits that must match: 32 (IPv4) or 128 (IPv6) for one
    /// address.
    prefix_len: u8,
    port: u16,
}

impl CaptureTarget {
    /// Parses `ADDR:PORT` where `ADDR` is an IPv4 address or CIDR block
    /// (`10.0.0.5`, `10.0.0.0/24`) or a bracketed IPv6 one (`[fd00::5]`,
    /// `[fd00::/64]`). Host names are refused: iptables and the kernel
    /// see addresses only.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, port) = text.rsplit_once(':').ok_or_else(|| {
            format!("{text:?} needs a port: write ADDR:PORT, such as 10.0.0.5:8000")
        })?;
        let port = match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("{text:?}: port must be 1 to 65535, got {port:?}")),
        };
        let bracketed = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']'));
        let (ip, prefix) = match bracketed.unwrap_or(addr).split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (bracketed.unwrap_or(addr), None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| {
            format!(
                "{text:?}: {ip:?} is not an IP address; capture matches the \
                 addresses connections are opened to, so resolve host names \
                 (a Service's cluster IP, say) and write the address"
            )
        })?;
        if ip.is_ipv6() && bracketed.is_none() {
            return Err(format!(
                "{text:?}: write an IPv6 address in brackets, [{ip}]:{port}"
            ));
        }
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            None => max,
            Some(prefix) => match prefix.parse::<u8>() {
                Ok(len) if len <= max => len,
                _ => {
                    let message = format!("{text:?}: prefix length must be 0 to {max}");
                    return Err(message);
                }
            },
        };
        Ok(Self {
            network: masked(ip, prefix_len),
            prefix_len,
            port,
        })
    }

    /// Whether the entry's network is on loopback (127.0.0.0/8, ::1),
    /// whose connections the iptables rules never redirect.
    pub fn is_loopback(&self) -> bool {
        canonical(self.network).is_loopback()
    }

    /// Whether a connection opened to `dst` is one of this entry's.
    pub fn matches(&self, dst: SocketAddr) -> bool {
        let ip = canonical(dst.ip());
        dst.port() == self.port
            && ip.is_ipv4() == self.network.is_ipv4()
            && masked(ip, self.prefix_len) == self.network
    }
}

impl fmt::Display for CaptureTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.network.is_ipv4() { 32 } else { 128 };
        let net = match self.prefix_len {
            len if len == full => self.network.to_string(),
            len => format!("{}/{len}", self.network),
        };
        match self.network {
            IpAddr::V4(_) => write!(f, "{net}:{}", self.port),
            IpAddr::V6(_) => write!(f, "[{net}]:{}", self.port),
        }
    }
}

/// `ip` with every bit past the first `prefix_len` cleared.
fn masked(ip: IpAddr, prefix_len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(ip) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(ip) & mask))
        }
        IpAddr::V6(ip) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(ip) & mask))
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.5`) as the IPv4 address
/// it stands for; anything else as it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Every `pool.capture` entry with its pool.
#[derive(Debug, Clone, Default)]
pub struct CaptureTable {
    entries: Vec<(CaptureTarget, String)>,
}

impl CaptureTable {
    /// The entries of a validated configuration.
    pub fn from_config(config: &Config) -> Self {
        let entries = config
            .pool
            .iter()
            .flat_map(|pool| {
                pool.capture
                    .iter()
                    .filter_map(|text| CaptureTarget::parse(text).ok())
                    .map(|target| (target, pool.name.clone()))
            })
            .collect();
        Self { entries }
    }

    /// Whether no pool captures anything.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pool whose entry matches `dst`; where blocks overlap, the
    /// narrowest (longest prefix) wins.
    pub fn pool_for(&self, dst: SocketAddr) -> Option<&str> {
        self.entries
            .iter()
            .filter(|(target, _)| target.matches(dst))
            .max_by_key(|(target, _)| target.prefix_len)
            .map(|(_, pool)| pool.as_str())
    }
}

/// What a captured connection's requests are served by: the pool its
/// original destination belongs to, or the error every request on it
/// gets.
#[derive(Debug, Clone)]
pub enum Capture {
    /// The connection was opened to `dst`, one of `pool`'s.
    Pool { pool: String, dst: SocketAddr },
    /// The connection cannot be served; each request gets this error.
    Refused(ApiError),
}

impl Capture {
    /// Reads the original destination of a connection accepted on the
    /// transparent listener, finds its pool, counts the outcome and logs
    /// a failure once per connection.
    pub fn of(stream: &TcpStream, table: &CaptureTable) -> Capture {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "unknown".to_string(), |p| p.to_string());
        let dst = match original_dst(stream) {
            Ok(dst) => dst,
            Err(reason) => {
                metrics::counter!(CAPTURE_FAILURES, "reason" => "not_redirected").increment(1);
                tracing::warn!(
                    peer = %peer,
                    reason = %reason,
                    "connection on the transparent listener was not redirected; \
                     answering its requests with 421"
                );
                let message = format!("{NOT_REDIRECTED} ({reason})");
                return Capture::Refused(ApiError::new(ErrorKind::NotRedirected, message));
            }
        };
        match table.pool_for(dst) {
            Some(pool) => {
                metrics::counter!(CAPTURED_CONNECTIONS, "pool" => pool.to_string()).increment(1);
                tracing::debug!(peer = %peer, original_dst = %dst, pool, "captured connection");
                Capture::Pool {
                    pool: pool.to_string(),
                    dst,
                }
            }
            // Limitation: a destination no pool captures is refused, not
            // relayed to where the client meant it to go: Switchyard has
            // no plain TCP relay, so rules wider than the capture lists
            // break that traffic.
            None => {
                metrics::counter!(CAPTURE_FAILURES, "reason" => "unknown_destination").increment(1);
                tracing::warn!(
                    peer = %peer,
                    original_dst = %dst,
                    "captured connection to an address no pool.capture lists; \
                     answering its requests with 502"
                );
                let message = format!(
                    "the connection was opened to {dst}, which no pool captures; \
                     add it to a pool's `capture` list or leave it out of the \
                     iptables rules (switchyard iptables --ports/--destinations)"
                );
                Capture::Refused(ApiError::new(ErrorKind::UnknownDestination, message))
            }
        }
    }

    /// The captured pool, when the connection has one.
    pub fn pool(&self) -> Option<&str> {
        match self {
            Capture::Pool { pool, .. } => Some(pool),
            Capture::Refused(_) => None,
        }
    }
}

/// What a client that reached the transparent port directly is told.
const NOT_REDIRECTED: &str = "this port serves connections that iptables redirected \
     to Switchyard (server.transparent), and this one was not; send API \
     requests to server.listen instead";

/// The address the client opened the connection to, before iptables
/// redirected it here. An error, saying why, when the connection was not
/// redirected: the kernel has no NAT record of it, or the record's
/// destination is this listener itself (a direct connection).
pub fn original_dst(stream: &TcpStream) -> Result<SocketAddr, String> {
    let local = stream
        .local_addr()
        .map_err(|e| format!("cannot read the local address: {e}"))?;
    let dst = read_original_dst(stream, local)?;
    let dst = SocketAddr::new(canonical(dst.ip()), dst.port());
    if dst == SocketAddr::new(canonical(local.ip()), local.port()) {
        return Err(format!("its destination is this listener, {local}"));
    }
    Ok(dst)
}

/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6), whichever
/// fits the family the connection arrived on.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn read_original_dst(stream: &TcpStream, local: SocketAddr) -> Result<SocketAddr, String> {
    let socket = socket2::SockRef::from(stream);
    let read = if canonical(local.ip()).is_ipv4() {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    let addr = read.map_err(|e| match e.raw_os_error() {
        // ENOENT: conntrack has no entry, so nothing rewrote it.
        Some(2) => "the kernel has no NAT record of it".to_string(),
        _ => format!("cannot read SO_ORIGINAL_DST: {e}"),
    })?;
    addr.as_socket()
        .ok_or_else(|| "SO_ORIGINAL_DST is not an IP address".to_string())
}

// Limitation: only Linux keeps the original destination of a redirected
// connection where a socket option can read it; elsewhere every
// connection on the transparent listener is refused.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn read_original_dst(_stream: &TcpStream, _local: SocketAddr) -> Result<SocketAddr, String> {
    Err("transparent capture needs Linux (SO_ORIGINAL_DST)".to_string())
}

/// Whether the first bytes a captured client sent open a TLS handshake.
/// Switchyard serves captured connections as cleartext HTTP only.
pub fn starts_tls(first: &[u8]) -> bool {
    first.first() == Some(&TLS_HANDSHAKE_RECORD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn capture_targets_parse_addresses_blocks_and_ipv6() {
        let one = CaptureTarget::parse("10.0.0.5:8000").unwrap();
        assert!(one.matches(addr("10.0.0.5:8000")));
        assert!(!one.matches(addr("10.0.0.6:8000")));
        assert!(!one.matches(addr("10.0.0.5:8001")));
        assert_eq!(one.to_string(), "10.0.0.5:8000");

        let block = CaptureTarget::parse("10.0.1.77/24:8000").unwrap();
        assert!(block.matches(addr("10.0.1.200:8000")));
        assert!(!block.matches(addr("10.0.2.1:8000")));
        assert_eq!(block.to_string(), "10.0.1.0/24:8000");

        let v6 = CaptureTarget::parse("[fd00::/64]:8000").unwrap();
        assert!(v6.matches(addr("[fd00::1234]:8000")));
        assert!(!v6.matches(addr("10.0.0.5:8000")));
        assert_eq!(v6.to_string(), "[fd00::/64]:8000");

        let mapped = addr("[::ffff:10.0.0.5]:8000");
        assert!(one.matches(mapped), "an IPv4-mapped address is IPv4");
    }

    #[test]
    fn capture_targets_refuse_names_and_missing_ports_with_a_fix() {
        let err = CaptureTarget::parse("vllm.default.svc:8000").unwrap_err();
        assert!(err.contains("resolve host names"), "{err}");
        let err = CaptureTarget::parse("10.0.0.5").unwrap_err();
        assert!(err.contains("ADDR:PORT"), "{err}");
        let err = CaptureTarget::parse("10.0.0.5:0").unwrap_err();
        assert!(err.contains("port"), "{err}");
        let err = CaptureTarget::parse("10.0.0.0/33:80").unwrap_err();
        assert!(err.contains("0 to 32"), "{err}");
        let err = CaptureTarget::parse("fd00::5:80").unwrap_err();
        assert!(err.contains("brackets"), "{err}");
    }

    #[test]
    fn the_narrowest_capture_entry_wins() {
        let table = CaptureTable {
            entries: vec![
                (
                    CaptureTarget::parse("10.0.0.0/8:8000").unwrap(),
                    "wide".into(),
                ),
                (CaptureTarget::parse("10.0.0.5:8000").unwrap(), "one".into()),
            ],
        };
        assert_eq!(table.pool_for(addr("10.0.0.5:8000")), Some("one"));
        assert_eq!(table.pool_for(addr("10.9.0.5:8000")), Some("wide"));
        assert_eq!(table.pool_for(addr("192.168.0.5:8000")), None);
    }

    #[test]
    fn a_tls_client_hello_is_recognised() {
        assert!(starts_tls(&[0x16, 0x03, 0x01]));
        assert!(!starts_tls(b"POST /v1/chat/completions HTTP/1.1"));
        assert!(!starts_tls(b""));
    }
}
