//! Loop detection. Every Switchyard process draws a random id at start
//! and marks each upstream request it sends with it; a request that comes
//! back carrying the process's own id went round in a loop, which happens
//! when the process's own upstream traffic is captured by its iptables
//! rules. Ids of other Switchyards (two chained) are kept, so a loop
//! through several of them is caught too.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::time::SystemTime;

use http::{HeaderMap, HeaderValue};

/// Lists the Switchyard processes a request has passed through, by id.
pub const HOP_HEADER: &str = "x-switchyard-hop";

/// This process's id: 64 random bits in hex, drawn once.
pub fn own_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        // RandomState's keys are random per process; the time and pid
        // only make two draws in one process differ too.
        let mut hasher = RandomState::new().build_hasher();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        hasher.write_u128(now);
        hasher.write_u32(std::process::id());
        format!("{:016x}", hasher.finish())
    })
}

/// Whether the request has already passed through this process.
pub fn is_own_loop(headers: &HeaderMap) -> bool {
    headers
        .get_all(HOP_HEADER)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|id| id.trim() == own_id())
}

/// Adds this process's id to an upstream request's hop list, after those
/// of the Switchyards it has passed through.
pub fn mark(headers: &mut HeaderMap) {
    headers.append(HOP_HEADER, HeaderValue::from_static(own_id()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_id_is_64_bits_of_hex() {
        assert_eq!(own_id().len(), 16);
        assert!(own_id().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn only_its_own_id_is_a_loop() {
        let mut headers = HeaderMap::new();
        headers.insert(HOP_HEADER, HeaderValue::from_static("0123456789abcdef"));
        assert!(!is_own_loop(&headers), "another switchyard's id passes");

        mark(&mut headers);
        assert!(is_own_loop(&headers));
        let ids: Vec<_> = headers.get_all(HOP_HEADER).iter().collect();
        assert_eq!(ids.len(), 2, "the other id is kept");
    }

    #[test]
    fn ids_in_one_comma_separated_value_count() {
        let mut headers = HeaderMap::new();
        let value = format!("0123456789abcdef, {}", own_id());
        headers.insert(HOP_HEADER, HeaderValue::from_str(&value).unwrap());
        assert!(is_own_loop(&headers));
    }
}
