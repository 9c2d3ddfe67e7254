//! The byte encodings of the core ABI, as plain safe Rust on every target
//! so that they are tested natively: the items the host lends (`read`),
//! the decision and verdict the plugin returns, the scalar parameters of
//! `route` and `review`, and `read`'s retry with a larger buffer. The
//! layouts are in the parent module's docs.
//!
//! Both directions of every encoding are here: the plugin needs only one
//! of each, and the other one lets the tests round-trip (and lets a host
//! written in Rust check itself against the SDK).
//!
//! Decoders trust nothing: a short buffer, a bad tag or flag, bad UTF-8,
//! a count larger than the bytes left or bytes after the end is a
//! [`WireError`], never a panic or a silent misreading.

use std::fmt;

use crate::types::{
    Answer, Decision, Endpoint, Escalation, LogprobSummary, Message, Rejection, Route, Verdict,
};

/// The items the host's `read` import copies into the plugin, by their
/// `what` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// 1: the model name's UTF-8 bytes, without a length prefix.
    Model = 1,
    /// 2: the chat messages (messages encoding).
    Messages = 2,
    /// 3: the prompt items or inputs (strings encoding).
    Prompt = 3,
    /// 4: the value of the first header named by the key, without a
    /// length prefix.
    Header = 4,
    /// 5: every header (pairs encoding).
    Headers = 5,
    /// 6: the value of the host attribute named by the key, without a
    /// length prefix.
    Attribute = 6,
    /// 7: the answer under review (answer encoding).
    Answer = 7,
}

impl Item {
    /// The `what` code passed to `read`.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The item's name in the ABI's documentation, for error messages.
    pub fn name(self) -> &'static str {
        match self {
            Item::Model => "MODEL",
            Item::Messages => "MESSAGES",
            Item::Prompt => "PROMPT",
            Item::Header => "HEADER",
            Item::Headers => "HEADERS",
            Item::Attribute => "ATTRIBUTE",
            Item::Answer => "ANSWER",
        }
    }
}

/// Why bytes or parameters from the host could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The bytes ended early: `wanted` more were needed at offset `at`,
    /// `left` remained. Also a count or length larger than what is left.
    Truncated {
        /// Offset of the field being read.
        at: usize,
        /// Bytes the field needs (at least).
        wanted: usize,
        /// Bytes left from `at`.
        left: usize,
    },
    /// A tag or flag byte at offset `at` that is none of the values its
    /// field allows.
    BadTag {
        /// The field, e.g. `decision` or `partial`.
        field: &'static str,
        /// Offset of the byte.
        at: usize,
        /// The byte found.
        byte: u8,
    },
    /// A string at offset `at` that is not UTF-8.
    BadUtf8 {
        /// Offset of the string's first byte.
        at: usize,
    },
    /// `count` bytes after the end of the encoded value.
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// The host has no such item (`read` returned -1) where one must be.
    Absent,
    /// A scalar parameter of `route` or `review`, or a length `read`
    /// returned, out of its range.
    BadParameter {
        /// The parameter, e.g. `endpoint`.
        name: &'static str,
        /// The value received.
        value: i64,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { at, wanted, left } => write!(
                f,
                "truncated at byte {at}: needs {wanted} bytes, {left} left"
            ),
            WireError::BadTag { field, at, byte } => {
                write!(f, "bad {field} byte {byte} at byte {at}")
            }
            WireError::BadUtf8 { at } => {
                write!(f, "string at byte {at} is not valid UTF-8")
            }
            WireError::TrailingBytes { count } => {
                write!(f, "{count} trailing bytes after the end")
            }
            WireError::Absent => f.write_str("absent (read returned -1)"),
            WireError::BadParameter { name, value } => {
                write!(f, "parameter {name} out of range: {value}")
            }
        }
    }
}

impl std::error::Error for WireError {}

/// Bytes the first `read` of an instance offers the host; the buffer then
/// keeps the largest size an item needed.
pub const FIRST_READ_BYTES: usize = 256;

/// The `read` protocol around one import call, `read_into(out)`, which
/// returns the item's length, or -1 for absent: offers `scratch` (sized
/// [`FIRST_READ_BYTES`] at first), and when the host names a larger
/// length, grows it to that and asks once more. Hands the item's bytes to
/// `decode`; `Ok(None)` when the item is absent.
pub fn read_with_retry<T>(
    scratch: &mut Vec<u8>,
    mut read_into: impl FnMut(&mut [u8]) -> i32,
    decode: impl FnOnce(&[u8]) -> T,
) -> Result<Option<T>, WireError> {
    if scratch.is_empty() {
        scratch.resize(FIRST_READ_BYTES, 0);
    }
    let Some(mut n) = read_length(read_into(scratch), "read's length")? else {
        return Ok(None);
    };
    if n > scratch.len() {
        scratch.resize(n, 0);
        let retried = read_length(read_into(scratch), "read's length")?;
        let Some(retried) = retried else {
            return Ok(None);
        };
        n = retried;
    }

    // Too large twice means the item changed during the call.
    if n > scratch.len() {
        let value = i64::try_from(n).unwrap_or(i64::MAX);
        let name = "read's length after a retry";
        return Err(bad_parameter(name, value));
    }
    Ok(Some(decode(&scratch[..n])))
}

/// What `read` returned: a length, or `None` for -1.
fn read_length(n: i32, name: &'static str) -> Result<Option<usize>, WireError> {
    match n {
        -1 => Ok(None),
        _ => match usize::try_from(n) {
            Ok(n) => Ok(Some(n)),
            Err(_) => Err(bad_parameter(name, n.into())),
        },
    }
}

/// Packs a guest pointer and length into the i64 that the exports return:
/// `(ptr << 32) | len`.
pub fn pack(ptr: u32, len: u32) -> i64 {
    ((u64::from(ptr) << 32) | u64::from(len)) as i64
}

/// Splits a packed i64 into pointer and length.
pub fn unpack(packed: i64) -> (u32, u32) {
    let bits = packed as u64;
    ((bits >> 32) as u32, bits as u32)
}

/// The `endpoint` parameter: 0 chat completions, 1 completions, 2
/// embeddings.
pub fn endpoint_from_code(code: i32) -> Result<Endpoint, WireError> {
    match code {
        0 => Ok(Endpoint::ChatCompletions),
        1 => Ok(Endpoint::Completions),
        2 => Ok(Endpoint::Embeddings),
        _ => Err(bad_parameter("endpoint", code.into())),
    }
}

/// The `endpoint` parameter's code for `endpoint`.
pub fn endpoint_code(endpoint: Endpoint) -> i32 {
    match endpoint {
        Endpoint::ChatCompletions => 0,
        Endpoint::Completions => 1,
        Endpoint::Embeddings => 2,
    }
}

/// The `max_tokens` parameter: -1 for none, else 0 to `u32::MAX`.
pub fn max_tokens_from_param(value: i64) -> Result<Option<u32>, WireError> {
    if value == -1 {
        return Ok(None);
    }
    u32::try_from(value)
        .map(Some)
        .map_err(|_| bad_parameter("max_tokens", value))
}

/// The `stream` parameter: 0 or 1.
pub fn stream_from_param(value: i32) -> Result<bool, WireError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(bad_parameter("stream", value.into())),
    }
}

fn bad_parameter(name: &'static str, value: i64) -> WireError {
    WireError::BadParameter { name, value }
}

/// A text item without a length prefix (MODEL, HEADER, ATTRIBUTE).
pub fn decode_text(bytes: &[u8]) -> Result<String, WireError> {
    utf8(bytes, 0)
}

/// The messages encoding: u32 count, then per message string role,
/// string content, pairs attributes.
pub fn decode_messages(bytes: &[u8]) -> Result<Vec<Message>, WireError> {
    whole(bytes, Reader::messages)
}

/// The strings encoding: u32 count, then that many strings.
pub fn decode_strings(bytes: &[u8]) -> Result<Vec<String>, WireError> {
    whole(bytes, Reader::strings)
}

/// The pairs encoding: u32 count, then per pair string key, string value.
pub fn decode_pairs(bytes: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    whole(bytes, Reader::pairs)
}

/// The answer encoding (see the parent module).
pub fn decode_answer(bytes: &[u8]) -> Result<Answer, WireError> {
    whole(bytes, Reader::answer)
}

/// The decision encoding; the plugin only encodes decisions, the host
/// decodes them.
pub fn decode_decision(bytes: &[u8]) -> Result<Decision, WireError> {
    whole(bytes, Reader::decision)
}

/// The verdict encoding; the plugin only encodes verdicts, the host
/// decodes them.
pub fn decode_verdict(bytes: &[u8]) -> Result<Verdict, WireError> {
    whole(bytes, Reader::verdict)
}

/// Appends `decision` to `out` in the decision encoding.
pub fn encode_decision(decision: &Decision, out: &mut Vec<u8>) {
    match decision {
        Decision::Route(route) => {
            out.push(0);
            put_string(out, &route.pool);
            match route.max_tokens_cap {
                None => out.push(0),
                Some(cap) => {
                    out.push(1);
                    out.extend_from_slice(&cap.to_le_bytes());
                }
            }
            match &route.escalate_to {
                None => out.push(0),
                Some(pool) => {
                    out.push(1);
                    put_string(out, pool);
                }
            }
            put_pairs(out, &route.attributes);
        }
        Decision::Reject(rejection) => {
            out.push(1);
            out.extend_from_slice(&rejection.status.to_le_bytes());
            put_string(out, &rejection.message);
            put_pairs(out, &rejection.attributes);
        }
    }
}

/// Appends `verdict` to `out` in the verdict encoding.
pub fn encode_verdict(verdict: &Verdict, out: &mut Vec<u8>) {
    match verdict {
        Verdict::Accept => out.push(0),
        Verdict::Escalate(escalation) => {
            out.push(1);
            put_string(out, &escalation.pool);
            put_string(out, &escalation.reason);
            put_pairs(out, &escalation.attributes);
        }
    }
}

/// Appends `messages` to `out` in the messages encoding.
pub fn encode_messages(messages: &[Message], out: &mut Vec<u8>) {
    put_len(out, messages.len());
    for message in messages {
        put_string(out, &message.role);
        put_string(out, &message.content);
        put_pairs(out, &message.attributes);
    }
}

/// Appends `strings` to `out` in the strings encoding.
pub fn encode_strings(strings: &[String], out: &mut Vec<u8>) {
    put_len(out, strings.len());
    for s in strings {
        put_string(out, s);
    }
}

/// Appends `pairs` to `out` in the pairs encoding.
pub fn encode_pairs(pairs: &[(String, String)], out: &mut Vec<u8>) {
    put_pairs(out, pairs);
}

/// Appends `answer` to `out` in the answer encoding.
pub fn encode_answer(answer: &Answer, out: &mut Vec<u8>) {
    put_string(out, &answer.pool);
    put_string(out, &answer.text);
    put_string(out, &answer.finish_reason);
    out.extend_from_slice(&answer.completion_tokens.to_le_bytes());
    put_len(out, answer.token_logprobs.len());
    for logprob in &answer.token_logprobs {
        out.extend_from_slice(&logprob.to_le_bytes());
    }
    let s = &answer.summary;
    for value in [s.mean, s.min, s.share_below, s.threshold] {
        out.extend_from_slice(&value.to_le_bytes());
    }
    out.extend_from_slice(&answer.latency_ms.to_le_bytes());
    out.push(u8::from(answer.partial));
    put_pairs(out, &answer.attributes);
}

// Limitation: a length or count above u32::MAX is written as u32::MAX,
// which the reader rejects as out of range. No value in a 32-bit guest's
// memory can be that long, so only a native caller could hit it.
fn put_len(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(String, String)]) {
    put_len(out, pairs.len());
    for (key, value) in pairs {
        put_string(out, key);
        put_string(out, value);
    }
}

/// Decodes one value that must fill `bytes` exactly.
fn whole<'a, T>(
    bytes: &'a [u8],
    read: impl FnOnce(&mut Reader<'a>) -> Result<T, WireError>,
) -> Result<T, WireError> {
    let mut reader = Reader { bytes, at: 0 };
    let value = read(&mut reader)?;
    match bytes.len() - reader.at {
        0 => Ok(value),
        count => Err(WireError::TrailingBytes { count }),
    }
}

fn utf8(bytes: &[u8], at: usize) -> Result<String, WireError> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(WireError::BadUtf8 { at }),
    }
}

/// A cursor over encoded bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    /// Offset of the next byte to read.
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(WireError::Truncated {
                at: self.at,
                wanted: n,
                left,
            });
        }
        let bytes = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_le_bytes)
    }

    fn f32(&mut self) -> Result<f32, WireError> {
        self.array().map(f32::from_le_bytes)
    }

    /// A tag byte that must be below `limit`.
    fn tag(&mut self, field: &'static str, limit: u8) -> Result<u8, WireError> {
        let at = self.at;
        let byte = self.u8()?;
        if byte >= limit {
            return Err(WireError::BadTag { field, at, byte });
        }
        Ok(byte)
    }

    fn flag(&mut self, field: &'static str) -> Result<bool, WireError> {
        self.tag(field, 2).map(|byte| byte == 1)
    }

    /// A u32 count of items each at least `min_bytes` long, checked
    /// against the bytes left, so that a bogus count fails here instead
    /// of reserving memory for it.
    fn count(&mut self, min_bytes: usize) -> Result<usize, WireError> {
        let at = self.at;
        let count = self.u32()? as usize;
        let left = self.bytes.len() - self.at;
        let wanted = count.saturating_mul(min_bytes);
        if wanted > left {
            return Err(WireError::Truncated { at, wanted, left });
        }
        Ok(count)
    }

    fn string(&mut self) -> Result<String, WireError> {
        let len = self.u32()? as usize;
        let at = self.at;
        let bytes = self.take(len)?;
        utf8(bytes, at)
    }

    fn strings(&mut self) -> Result<Vec<String>, WireError> {
        let count = self.count(4)?;
        (0..count).map(|_| self.string()).collect()
    }

    fn pairs(&mut self) -> Result<Vec<(String, String)>, WireError> {
        let count = self.count(8)?;
        (0..count)
            .map(|_| Ok((self.string()?, self.string()?)))
            .collect()
    }

    fn messages(&mut self) -> Result<Vec<Message>, WireError> {
        let count = self.count(12)?;
        (0..count)
            .map(|_| {
                Ok(Message {
                    role: self.string()?,
                    content: self.string()?,
                    attributes: self.pairs()?,
                })
            })
            .collect()
    }

    fn answer(&mut self) -> Result<Answer, WireError> {
        let pool = self.string()?;
        let text = self.string()?;
        let finish_reason = self.string()?;
        let completion_tokens = self.u32()?;
        let n = self.count(4)?;
        let token_logprobs = (0..n).map(|_| self.f32()).collect::<Result<_, _>>()?;
        let summary = LogprobSummary {
            mean: self.f32()?,
            min: self.f32()?,
            share_below: self.f32()?,
            threshold: self.f32()?,
        };
        Ok(Answer {
            pool,
            text,
            finish_reason,
            completion_tokens,
            token_logprobs,
            summary,
            latency_ms: self.u32()?,
            partial: self.flag("partial")?,
            attributes: self.pairs()?,
        })
    }

    fn decision(&mut self) -> Result<Decision, WireError> {
        if self.tag("decision", 2)? == 1 {
            return Ok(Decision::Reject(Rejection {
                status: self.u16()?,
                message: self.string()?,
                attributes: self.pairs()?,
            }));
        }
        let pool = self.string()?;
        let max_tokens_cap = match self.flag("has_cap")? {
            true => Some(self.u32()?),
            false => None,
        };
        let escalate_to = match self.flag("has_escalate")? {
            true => Some(self.string()?),
            false => None,
        };
        Ok(Decision::Route(Route {
            pool,
            max_tokens_cap,
            escalate_to,
            attributes: self.pairs()?,
        }))
    }

    fn verdict(&mut self) -> Result<Verdict, WireError> {
        if self.tag("verdict", 2)? == 0 {
            return Ok(Verdict::Accept);
        }
        Ok(Verdict::Escalate(Escalation {
            pool: self.string()?,
            reason: self.string()?,
            attributes: self.pairs()?,
        }))
    }
}

#[cfg(test)]
mod tests;
