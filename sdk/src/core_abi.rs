//! The plugin side of `switchyard:policy` 0.4.0: a core WebAssembly module
//! (built with `--target wasm32-unknown-unknown`) with a small ABI of its
//! own, which [`export_policy!`](crate::export_policy) wires up and
//! [`Request`](crate::Request) reads through. Plugin authors never see it;
//! this is its specification, shared with the host.
//!
//! A call into a component costs the host several microseconds of
//! canonical-ABI work even for a plugin that does nothing; a typed call
//! into a core module costs a fraction of that. Version 0.3.0 components
//! (`wasm32-wasip2`) keep working; this is the faster path.
//!
//! # Conventions
//!
//! Integers are little-endian. An `i32` pointer or length is an offset
//! into the plugin's linear memory (read as u32). A *packed* `i64` is
//! `(ptr << 32) | len`, both u32.
//!
//! # Exports
//!
//! The module exports `memory` and these four functions:
//!
//! - `switchyard-0.4:alloc(len: i32) -> i32`: allocates `len` bytes
//!   (alignment 1; `len` may be 0) and returns the pointer. The host
//!   writes the configuration there; the next `init` takes and frees it.
//! - `switchyard-0.4:init(config_ptr: i32, config_len: i32) -> i64`: the
//!   buffer from `alloc`, holding the `[policy.config]` table as JSON text.
//!   Returns 0 on success, else a packed UTF-8 error message.
//! - `switchyard-0.4:route(endpoint: i32, message_count: i32,
//!   prompt_chars: i64, max_tokens: i64, stream: i32) -> i64`: returns a
//!   packed, encoded decision. `endpoint` is 0 (chat completions), 1
//!   (completions) or 2 (embeddings); `message_count` is a u32;
//!   `prompt_chars` a u64; `max_tokens` -1 for none, else 0 to
//!   `u32::MAX`; `stream` 0 or 1.
//! - `switchyard-0.4:review(...)`, the same five parameters: returns a
//!   packed, encoded verdict. The answer under review is read with
//!   `read(ANSWER)`.
//!
//! What a packed result points at stays valid until the next call into the
//! instance: the SDK encodes every result into one reused buffer.
//!
//! # Imports
//!
//! From module `switchyard-0.4`, and nothing else:
//!
//! - `log(level: i32, ptr: i32, len: i32)`: level 0 error, 1 warn,
//!   2 info, 3 debug, 4 trace; a UTF-8 message, which the host cuts at
//!   4 KiB.
//! - `now-unix-ms() -> i64`: wall-clock milliseconds since the Unix epoch.
//! - `counter-add(name_ptr: i32, name_len: i32, value: i64)`: adds the
//!   u64 `value` to the counter `name`.
//! - `read(what: i32, key_ptr: i32, key_len: i32, out_ptr: i32,
//!   out_cap: i32) -> i32`: copies one item of the current call into
//!   `out_ptr` and returns its length when it fits in `out_cap` bytes;
//!   when it does not, copies nothing and still returns its length, so
//!   that the plugin retries with a big enough buffer. -1 means absent (no
//!   such header or attribute, an unknown `what`, or no call in progress).
//!   The key is used only by HEADER and ATTRIBUTE; 0, 0 otherwise.
//!
//! `what` codes (`wire::Item`): 1 MODEL (the model name's bytes, no
//! length prefix), 2 MESSAGES (messages), 3 PROMPT (strings), 4 HEADER
//! (the value of the first header named `key`, ASCII case-insensitive, no
//! length prefix), 5 HEADERS (pairs), 6 ATTRIBUTE (a host attribute's
//! value, no length prefix; none are defined), 7 ANSWER (answer, only
//! during `review`).
//!
//! # Encodings
//!
//! - string: u32 byte length, then that many UTF-8 bytes.
//! - strings: u32 count, then that many strings.
//! - pairs: u32 count, then per pair a string key and a string value.
//! - messages: u32 count, then per message string role, string content,
//!   pairs attributes.
//! - answer: string pool, string text, string finish_reason, u32
//!   completion_tokens, u32 n and n f32 token_logprobs, f32 mean, f32 min,
//!   f32 share_below, f32 threshold, u32 latency_ms, u8 partial (0 or 1),
//!   pairs attributes.
//! - decision: u8 0 for a route, then string pool, u8 has_cap (0 or 1)
//!   and a u32 cap if 1, u8 has_escalate (0 or 1) and a string
//!   escalate_to if 1, pairs attributes; or u8 1 for a rejection, then u16
//!   status, string message, pairs attributes.
//! - verdict: u8 0 to accept; or u8 1 to escalate, then string pool,
//!   string reason, pairs attributes.
//!
//! Each side rejects what it cannot decode exactly: a short buffer, a tag
//! or flag out of range, bad UTF-8, a count or length beyond the bytes
//! left, or bytes after the end. The host fails the call as if it had
//! trapped and discards the instance; the SDK panics with the item's name
//! and the error, which logs through the host and traps.
//!
//! `wire` holds the encodings and is compiled on every target (so that
//! they are tested natively); the exports and imports exist only on
//! `wasm32-unknown-unknown`.

pub mod wire;

#[cfg(core_abi)]
mod guest;

#[cfg(core_abi)]
pub use self::guest::{alloc, init, review, route, Params};

#[cfg(core_abi)]
pub(crate) use self::guest::{host, read};

#[cfg(all(test, not(core_abi)))]
pub(crate) mod fake_host;

#[cfg(all(test, not(core_abi)))]
pub(crate) use self::fake_host::read;

/// Fails the current call because the host sent something the SDK cannot
/// decode: reading on would misread it. The panic is logged through the
/// host (by the hook `init` installs) and traps.
#[cfg(any(test, core_abi))]
#[expect(
    clippy::panic,
    reason = "the core ABI has no error channel: trapping is how a call fails"
)]
pub(crate) fn malformed(what: &str, error: &wire::WireError) -> ! {
    panic!("malformed {what} from the host: {error}")
}
