//! What the expansions of [`export_policy!`](crate::export_policy) and
//! [`export_fixtures!`](crate::export_fixtures) call in the plugin crate;
//! nothing here is a stable API.
//!
//! For `wasm32-wasip2` (and natively) the component glue of `component`;
//! for `wasm32-unknown-unknown` the core-module glue is reached as
//! `$crate::core_abi` instead.

#[cfg(not(core_abi))]
pub use crate::component::{
    bindings, init, review, route, Guest, WitAnswer, WitDecision, WitRequest, WitRequestFacts,
    WitVerdict,
};

/// `bytes` as an array of `N` bytes, for [`export_fixtures!`]'s static;
/// `N` must be `bytes.len()`, which the macro guarantees.
///
/// [`export_fixtures!`]: crate::export_fixtures
pub const fn byte_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut array = [0u8; N];
    let mut i = 0;
    while i < N && i < bytes.len() {
        array[i] = bytes[i];
        i += 1;
    }
    array
}
