//! `switchyard:policy@0.4.0`: a core WebAssembly module with a small
//! binary interface, what the SDK builds for `wasm32-unknown-unknown`.
//!
//! A call into a component pays for wasmtime's component machinery:
//! lowering and lifting, the plugin's allocator for every string handed
//! in, a post-return call, a resource lent and taken back. Inside a
//! proxied request, where that code and its data are cold, it costs
//! several times what it does in a loop. A call into a core module is one
//! typed function call with five numbers, and the plugin pulls what it
//! reads through one import, so a rule that reads nothing pays for
//! nothing.
//!
//! The interface, all integers little-endian, where "packed" is
//! `ptr << 32 | len` in the plugin's memory:
//!
//! - Exports: `memory`; `switchyard-0.4:alloc(len) -> ptr`, a buffer the
//!   next `init` takes; `switchyard-0.4:init(ptr, len) -> packed`, the
//!   configuration JSON in, 0 or an error message out;
//!   `switchyard-0.4:route(endpoint, message_count, prompt_chars,
//!   max_tokens, stream) -> packed` decision; `switchyard-0.4:review`,
//!   the same parameters, `-> packed` verdict. The endpoint is 0 chat
//!   completions, 1 completions, 2 embeddings; `max_tokens` is -1 when
//!   the client gave none. A returned buffer stays valid until the next
//!   call into the instance.
//! - Imports, module `switchyard-0.4`: `log(level, ptr, len)` with levels
//!   0 error to 4 trace; `now-unix-ms() -> i64`; `counter-add(ptr, len,
//!   value)`; and `read(what, key_ptr, key_len, out_ptr, out_cap) -> i32`,
//!   which copies one item of the call's request into the plugin when it
//!   fits in `out_cap` and returns its length either way (so the plugin
//!   retries with a bigger buffer), or -1 when the item is absent. The
//!   items are listed at [`Item`]; their encodings, and those of the
//!   decision and verdict, in [`wire`].

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use wasmtime::error::Context as _;
use wasmtime::{bail, format_err};
use wasmtime::{Caller, Engine, ExternType, Linker, Memory, Module, Store, TypedFunc, ValType};

use crate::state::{now_unix_ms, HostState, LogLevel, MAX_LOG_BYTES};
use crate::{Endpoint, ReviewAnswer, RouteOutcome, RouteRequest, Verdict};

/// The import module, and the prefix of every export.
const MODULE: &str = "switchyard-0.4";
const ALLOC: &str = "switchyard-0.4:alloc";
const INIT: &str = "switchyard-0.4:init";
const ROUTE: &str = "switchyard-0.4:route";
const REVIEW: &str = "switchyard-0.4:review";

/// What `read` answers when the item is absent.
const ABSENT: i32 = -1;

/// The parameters of `route` and `review`: endpoint, message count,
/// prompt characters, `max_tokens` or -1, stream.
type Facts = (i32, i32, i64, i64, i32);

/// Whether `bytes` start like a core module rather than a component.
pub(crate) fn is_core_module(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\0asm\x01\0\0\0")
}

/// The items `read` copies out, by their code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    /// 1: the `model` field's bytes.
    Model,
    /// 2: the chat messages ([`wire::messages`]).
    Messages,
    /// 3: prompts or inputs given as text ([`wire::strings`]).
    Prompt,
    /// 4: the value of the first header named by the key, compared
    /// without regard to ASCII case.
    Header,
    /// 5: every header ([`wire::pairs`]).
    Headers,
    /// 6: the host attribute named by the key; none are defined, so
    /// always absent.
    Attribute,
    /// 7: the small pool's answer, during `review` only
    /// ([`wire::answer`]).
    Answer,
}

impl Item {
    fn from_code(code: i32) -> Option<Item> {
        Some(match code {
            1 => Item::Model,
            2 => Item::Messages,
            3 => Item::Prompt,
            4 => Item::Header,
            5 => Item::Headers,
            6 => Item::Attribute,
            7 => Item::Answer,
            _ => return None,
        })
    }
}

/// What `read` answers from: the instance's memory and the call in
/// progress. Kept in the store's [`HostState`].
#[derive(Default)]
pub(crate) struct CallState {
    memory: Option<Memory>,
    request: Option<Arc<RouteRequest>>,
    /// The answer under review, already encoded.
    answer: Option<Vec<u8>>,
    /// The last item that did not fit the plugin's buffer, kept for the
    /// retry the plugin makes with a bigger one, so that a long chat is
    /// encoded once, not twice.
    unread: Option<Unread>,
}

/// An encoded item `read` could not hand over yet.
struct Unread {
    item: Item,
    key: Vec<u8>,
    bytes: Vec<u8>,
}

impl CallState {
    /// Forgets the call that just ended.
    fn end_call(&mut self) {
        self.request = None;
        self.answer = None;
        self.unread = None;
    }
}

/// A compiled module whose exports and imports fit 0.4.0.
pub(crate) struct Pre(wasmtime::InstancePre<HostState>);

impl Pre {
    /// Compiles nothing: checks `module`'s exports and links its imports.
    /// The error says what does not fit.
    pub(crate) fn new(engine: &Engine, module: &Module) -> wasmtime::Result<Pre> {
        use ValType::{I32, I64};
        check_export(module, ALLOC, &[I32], &[I32])?;
        check_export(module, INIT, &[I32, I32], &[I64])?;
        check_export(module, ROUTE, &[I32, I32, I64, I64, I32], &[I64])?;
        check_export(module, REVIEW, &[I32, I32, I64, I64, I32], &[I64])?;
        if !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
            bail!("the module exports no memory called `memory`");
        }
        Ok(Pre(linker(engine)?.instantiate_pre(module)?))
    }

    /// A new instance in `store`; no plugin code runs yet.
    pub(crate) fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Exports> {
        let instance = self.0.instantiate(&mut *store)?;
        let memory = instance
            .get_memory(&mut *store, "memory")
            .context("the module exports no memory")?;
        store.data_mut().core.memory = Some(memory);
        Ok(Exports {
            memory,
            alloc: instance.get_typed_func(&mut *store, ALLOC)?,
            init: instance.get_typed_func(&mut *store, INIT)?,
            route: instance.get_typed_func(&mut *store, ROUTE)?,
            review: instance.get_typed_func(&mut *store, REVIEW)?,
        })
    }
}

/// `name` must be a function taking `params` and returning `results`.
fn check_export(
    module: &Module,
    name: &str,
    params: &[ValType],
    results: &[ValType],
) -> wasmtime::Result<()> {
    let Some(ExternType::Func(ty)) = module.get_export(name) else {
        bail!("the module does not export the function `{name}`");
    };
    let same = |have: &mut dyn ExactSizeIterator<Item = ValType>, want: &[ValType]| {
        have.len() == want.len() && have.zip(want).all(|(h, w)| ValType::eq(&h, w))
    };
    if !same(&mut ty.params(), params) || !same(&mut ty.results(), results) {
        bail!("`{name}` has the type {ty}, not the one 0.4.0 defines");
    }
    Ok(())
}

/// One instance's exports.
pub(crate) struct Exports {
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    init: TypedFunc<(i32, i32), i64>,
    route: TypedFunc<Facts, i64>,
    review: TypedFunc<Facts, i64>,
}

impl Exports {
    /// Calls `init`; the inner `Err` is the plugin refusing its config.
    pub(crate) fn init(
        &self,
        store: &mut Store<HostState>,
        config_json: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        let len = i32::try_from(config_json.len()).context("the policy config is too large")?;
        let ptr = self.alloc.call(&mut *store, len)?;
        let range = guest_range(self.memory.data_size(&*store), ptr, len)?;
        self.memory.data_mut(&mut *store)[range].copy_from_slice(config_json.as_bytes());

        let packed = self.init.call(&mut *store, (ptr, len))?;
        if packed == 0 {
            return Ok(Ok(()));
        }
        let message = self.returned(store, packed)?;
        Ok(Err(String::from_utf8_lossy(message).into_owned()))
    }

    /// Calls `route` with `req`, which `read` answers from meanwhile.
    pub(crate) fn route(
        &self,
        store: &mut Store<HostState>,
        req: &Arc<RouteRequest>,
    ) -> wasmtime::Result<RouteOutcome> {
        store.data_mut().core.request = Some(Arc::clone(req));
        let result = self.route.call(&mut *store, facts(req));
        store.data_mut().core.end_call();
        let bytes = self.returned(store, result?)?;
        wire::decision(bytes)
            .map_err(|e| format_err!("the plugin returned a malformed decision: {e}"))
    }

    /// Calls `review` with `req` and the small pool's `answer`.
    pub(crate) fn review(
        &self,
        store: &mut Store<HostState>,
        req: &Arc<RouteRequest>,
        answer: &ReviewAnswer,
    ) -> wasmtime::Result<Verdict> {
        let call = &mut store.data_mut().core;
        call.request = Some(Arc::clone(req));
        call.answer = Some(wire::answer(answer));
        let result = self.review.call(&mut *store, facts(req));
        store.data_mut().core.end_call();
        let bytes = self.returned(store, result?)?;
        wire::verdict(bytes)
            .map_err(|e| format_err!("the plugin returned a malformed verdict: {e}"))
    }

    /// The bytes a call returned as `packed`.
    fn returned<'a>(&self, store: &'a Store<HostState>, packed: i64) -> wasmtime::Result<&'a [u8]> {
        let data = self.memory.data(store);
        // The two halves are u32s; the casts only reinterpret bits.
        let ptr = (packed as u64 >> 32) as u32 as i32;
        let len = packed as u64 as u32 as i32;
        Ok(&data[guest_range(data.len(), ptr, len)?])
    }
}

/// The parameters of `route` and `review` for `req`. Counts are u32s
/// reinterpreted as i32, as the plugin reads them back.
fn facts(req: &RouteRequest) -> Facts {
    let endpoint = match req.endpoint {
        Endpoint::ChatCompletions => 0,
        Endpoint::Completions => 1,
        Endpoint::Embeddings => 2,
    };
    (
        endpoint,
        req.message_count as i32,
        req.prompt_chars as i64,
        req.max_tokens.map_or(-1, i64::from),
        i32::from(req.stream),
    )
}

/// The range `ptr..ptr + len` of a memory of `size` bytes, both read as
/// the u32s they are in the plugin.
fn guest_range(size: usize, ptr: i32, len: i32) -> wasmtime::Result<Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start.saturating_add(len as u32 as usize);
    if end > size {
        bail!("the plugin passed the buffer {start}..{end} outside its {size}-byte memory");
    }
    Ok(start..end)
}

/// The linker of the four imports.
fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    linker.func_wrap(MODULE, "log", log)?;
    linker.func_wrap(MODULE, "now-unix-ms", || {
        i64::try_from(now_unix_ms()).unwrap_or(i64::MAX)
    })?;
    linker.func_wrap(MODULE, "counter-add", counter_add)?;
    linker.func_wrap(MODULE, "read", read)?;
    Ok(linker)
}

fn memory(caller: &Caller<'_, HostState>) -> wasmtime::Result<Memory> {
    caller
        .data()
        .core
        .memory
        .context("the plugin called the host before it was instantiated")
}

fn log(mut caller: Caller<'_, HostState>, level: i32, ptr: i32, len: i32) -> wasmtime::Result<()> {
    let level = match level {
        0 => LogLevel::Error,
        1 => LogLevel::Warn,
        2 => LogLevel::Info,
        3 => LogLevel::Debug,
        _ => LogLevel::Trace,
    };
    let memory = memory(&caller)?;
    let (data, state) = memory.data_and_store_mut(&mut caller);
    let range = guest_range(data.len(), ptr, len)?;
    // Only what the log keeps is converted; a character cut here shows
    // as one replacement character.
    let kept = range.start..range.end.min(range.start + MAX_LOG_BYTES);
    state.plugin_log(level, &String::from_utf8_lossy(&data[kept]));
    Ok(())
}

fn counter_add(
    mut caller: Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    value: i64,
) -> wasmtime::Result<()> {
    let memory = memory(&caller)?;
    let (data, state) = memory.data_and_store_mut(&mut caller);
    let name = &data[guest_range(data.len(), ptr, len)?];
    let name = String::from_utf8_lossy(name).into_owned();
    // The plugin's u64, reinterpreted.
    state.plugin_counter_add(name, value as u64);
    Ok(())
}

fn read(
    mut caller: Caller<'_, HostState>,
    what: i32,
    key_ptr: i32,
    key_len: i32,
    out_ptr: i32,
    out_cap: i32,
) -> wasmtime::Result<i32> {
    let memory = memory(&caller)?;
    let (data, state) = memory.data_and_store_mut(&mut caller);
    let call = &mut state.core;
    let (Some(req), Some(item)) = (call.request.as_deref(), Item::from_code(what)) else {
        return Ok(ABSENT);
    };
    let key = &data[guest_range(data.len(), key_ptr, key_len)?];
    let bytes = match call.unread.take() {
        Some(unread) if unread.item == item && unread.key == key => Cow::Owned(unread.bytes),
        _ => match item_bytes(req, call.answer.as_deref(), item, key) {
            Some(bytes) => bytes,
            None => return Ok(ABSENT),
        },
    };

    let len = i32::try_from(bytes.len()).map_err(|_| {
        format_err!(
            "a request item of {} bytes is too large to read",
            bytes.len()
        )
    })?;
    if len > out_cap {
        call.unread = Some(Unread {
            item,
            key: key.to_vec(),
            bytes: bytes.into_owned(),
        });
        return Ok(len);
    }
    let range = guest_range(data.len(), out_ptr, len)?;
    data[range].copy_from_slice(&bytes);
    Ok(len)
}

/// The encoded `item` of `req`, or `None` when it is absent.
// Limitation: an item is built, encoded, copied into the plugin and
// checked as UTF-8 there, where a component gets a string in one copy; a
// plugin that reads a 7 MB message pays about 1.6 times what it would as
// a 0.3.0 component. Routing rules rarely read that much.
fn item_bytes<'a>(
    req: &'a RouteRequest,
    answer: Option<&'a [u8]>,
    item: Item,
    key: &[u8],
) -> Option<Cow<'a, [u8]>> {
    Some(match item {
        Item::Model => Cow::Borrowed(req.model.as_bytes()),
        Item::Messages => Cow::Owned(wire::messages(&req.messages())),
        Item::Prompt => Cow::Owned(wire::strings(&req.prompt())),
        // A name that is not UTF-8 names no header.
        Item::Header => Cow::Owned(req.header(std::str::from_utf8(key).ok()?)?.into_bytes()),
        Item::Headers => Cow::Owned(wire::pairs(&req.headers())),
        Item::Attribute => return None,
        Item::Answer => Cow::Borrowed(answer?),
    })
}

/// The encodings of 0.4.0, little-endian throughout:
///
/// - string: u32 byte length, then UTF-8 bytes;
/// - strings: u32 count, then each string;
/// - pairs: u32 count, then each (key string, value string);
/// - messages: u32 count, then each (role, content, attribute pairs);
/// - answer: pool, text and finish reason strings, u32 completion
///   tokens, u32 count and that many f32 log-probabilities, f32 mean,
///   min, share below and threshold, u32 latency in ms, u8 partial (0 or
///   1), attribute pairs;
/// - decision: u8 0 then a route (pool string, u8 1 and a u32 cap or u8
///   0, u8 1 and an escalation pool string or u8 0, attribute pairs), or
///   u8 1 then a rejection (u16 status, message string, attribute pairs);
/// - verdict: u8 0 to accept, or u8 1 then an escalation (pool string,
///   reason string, attribute pairs).
///
/// Decoding refuses short input, unknown tags, text that is not UTF-8
/// and bytes left over.
pub(crate) mod wire {
    use crate::bindings::reject_status;
    use crate::{Message, ReviewAnswer, RouteDecision, RouteOutcome, Verdict};

    pub(crate) fn strings(items: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        put_len(&mut out, items.len());
        for item in items {
            put_str(&mut out, item);
        }
        out
    }

    pub(crate) fn pairs(items: &[(String, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        put_pairs(&mut out, items);
        out
    }

    pub(crate) fn messages(items: &[Message]) -> Vec<u8> {
        let mut out = Vec::new();
        put_len(&mut out, items.len());
        for message in items {
            put_str(&mut out, &message.role);
            put_str(&mut out, &message.content);
            put_pairs(&mut out, &[]);
        }
        out
    }

    pub(crate) fn answer(answer: &ReviewAnswer) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + answer.text.len() + 4 * answer.token_logprobs.len());
        put_str(&mut out, &answer.pool);
        put_str(&mut out, &answer.text);
        put_str(&mut out, &answer.finish_reason);
        out.extend_from_slice(&answer.completion_tokens.to_le_bytes());
        put_len(&mut out, answer.token_logprobs.len());
        for logprob in &answer.token_logprobs {
            out.extend_from_slice(&logprob.to_le_bytes());
        }
        let s = answer.summary;
        for value in [s.mean, s.min, s.share_below, s.threshold] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&answer.latency_ms.to_le_bytes());
        out.push(u8::from(answer.partial));
        put_pairs(&mut out, &[]);
        out
    }

    /// A decision as the host acts on it. A rejection status outside
    /// 400..=599 becomes 500 and a rejection's attributes are dropped, as
    /// for the other versions.
    pub(crate) fn decision(bytes: &[u8]) -> Result<RouteOutcome, String> {
        let mut r = Reader(bytes);
        let outcome = match r.u8("the tag")? {
            0 => {
                let pool = r.string("the pool")?;
                let max_tokens_cap = match r.flag("the cap flag")? {
                    true => Some(r.u32("the cap")?),
                    false => None,
                };
                let escalate_to = match r.flag("the escalation flag")? {
                    true => Some(r.string("the escalation pool")?),
                    false => None,
                };
                let attributes = r.pairs("the attributes")?;
                RouteOutcome::Route(RouteDecision {
                    pool,
                    max_tokens_cap,
                    escalate_to,
                    attributes,
                })
            }
            1 => {
                let status = r.u16("the status")?;
                let message = r.string("the message")?;
                r.pairs("the attributes")?;
                RouteOutcome::Reject {
                    status: reject_status(status),
                    message,
                }
            }
            tag => return Err(format!("unknown decision tag {tag}")),
        };
        r.finish()?;
        Ok(outcome)
    }

    /// A verdict; an escalation's attributes are dropped, as for the
    /// other versions.
    pub(crate) fn verdict(bytes: &[u8]) -> Result<Verdict, String> {
        let mut r = Reader(bytes);
        let verdict = match r.u8("the tag")? {
            0 => Verdict::Accept,
            1 => {
                let pool = r.string("the pool")?;
                let reason = r.string("the reason")?;
                r.pairs("the attributes")?;
                Verdict::Escalate { pool, reason }
            }
            tag => return Err(format!("unknown verdict tag {tag}")),
        };
        r.finish()?;
        Ok(verdict)
    }

    fn put_len(out: &mut Vec<u8>, len: usize) {
        // Host data far below 4 GiB: a request body is capped well under.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        put_len(out, s.len());
        out.extend_from_slice(s.as_bytes());
    }

    fn put_pairs(out: &mut Vec<u8>, pairs: &[(String, String)]) {
        put_len(out, pairs.len());
        for (key, value) in pairs {
            put_str(out, key);
            put_str(out, value);
        }
    }

    /// The unread rest of a plugin's answer.
    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err(format!("it ends inside {what}"));
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }

        fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
            let mut array = [0; N];
            array.copy_from_slice(self.take(N, what)?);
            Ok(array)
        }

        fn u8(&mut self, what: &str) -> Result<u8, String> {
            Ok(self.array::<1>(what)?[0])
        }

        fn flag(&mut self, what: &str) -> Result<bool, String> {
            match self.u8(what)? {
                0 => Ok(false),
                1 => Ok(true),
                other => Err(format!("{what} is {other}, not 0 or 1")),
            }
        }

        fn u16(&mut self, what: &str) -> Result<u16, String> {
            Ok(u16::from_le_bytes(self.array(what)?))
        }

        fn u32(&mut self, what: &str) -> Result<u32, String> {
            Ok(u32::from_le_bytes(self.array(what)?))
        }

        fn string(&mut self, what: &str) -> Result<String, String> {
            let len = self.u32(what)? as usize;
            let bytes = self.take(len, what)?;
            String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
        }

        fn pairs(&mut self, what: &str) -> Result<Vec<(String, String)>, String> {
            let count = self.u32(what)? as usize;
            // Each pair takes at least 8 bytes: a bad count cannot make
            // this allocate more than the input justifies.
            let mut pairs = Vec::with_capacity(count.min(self.0.len() / 8));
            for _ in 0..count {
                pairs.push((self.string(what)?, self.string(what)?));
            }
            Ok(pairs)
        }

        fn finish(&self) -> Result<(), String> {
            match self.0.len() {
                0 => Ok(()),
                n => Err(format!("{n} bytes follow its end")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wire;
    use super::*;

    fn route_bytes(pool: &str, cap: Option<u32>, escalate: Option<&str>) -> Vec<u8> {
        let mut out = vec![0];
        put_str(&mut out, pool);
        match cap {
            Some(cap) => {
                out.push(1);
                out.extend_from_slice(&cap.to_le_bytes());
            }
            None => out.push(0),
        }
        match escalate {
            Some(pool) => {
                out.push(1);
                put_str(&mut out, pool);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&1u32.to_le_bytes());
        put_str(&mut out, "switchyard.label.tier");
        put_str(&mut out, "free");
        out
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    #[test]
    fn route_decodes_with_cap_escalation_and_attributes() {
        let bytes = route_bytes("small", Some(64), Some("large"));
        let RouteOutcome::Route(route) = wire::decision(&bytes).unwrap() else {
            unreachable!("a route must decode as a route");
        };
        assert_eq!(route.pool, "small");
        assert_eq!(route.max_tokens_cap, Some(64));
        assert_eq!(route.escalate_to.as_deref(), Some("large"));
        assert_eq!(route.attribute("switchyard.label.tier"), Some("free"));

        let plain = wire::decision(&route_bytes("large", None, None)).unwrap();
        let RouteOutcome::Route(plain) = plain else {
            unreachable!("a route must decode as a route");
        };
        assert_eq!((plain.max_tokens_cap, plain.escalate_to), (None, None));
    }

    #[test]
    fn rejection_keeps_an_error_status_and_replaces_others() {
        let reject = |status: u16| {
            let mut out = vec![1];
            out.extend_from_slice(&status.to_le_bytes());
            put_str(&mut out, "no");
            out.extend_from_slice(&0u32.to_le_bytes());
            wire::decision(&out).unwrap()
        };
        let expect = |status| RouteOutcome::Reject {
            status,
            message: "no".into(),
        };
        assert_eq!(reject(403), expect(403));
        assert_eq!(reject(200), expect(500));
    }

    #[test]
    fn malformed_decisions_are_refused_with_the_reason() {
        let good = route_bytes("small", Some(64), None);
        let short = wire::decision(&good[..good.len() - 1]).unwrap_err();
        assert!(short.contains("ends inside"), "{short}");

        let mut trailing = good.clone();
        trailing.push(0);
        let trailing = wire::decision(&trailing).unwrap_err();
        assert!(trailing.contains("1 bytes follow"), "{trailing}");

        let tag = wire::decision(&[9]).unwrap_err();
        assert!(tag.contains("tag 9"), "{tag}");

        let mut not_utf8 = vec![0];
        not_utf8.extend_from_slice(&2u32.to_le_bytes());
        not_utf8.extend_from_slice(&[0xff, 0xfe]);
        let not_utf8 = wire::decision(&not_utf8).unwrap_err();
        assert!(not_utf8.contains("not UTF-8"), "{not_utf8}");

        let mut flag = route_bytes("small", None, None);
        flag[10] = 7;
        let flag = wire::decision(&flag).unwrap_err();
        assert!(flag.contains("not 0 or 1"), "{flag}");

        // A count far beyond the input fails instead of allocating.
        let mut huge = vec![0];
        put_str(&mut huge, "small");
        huge.extend_from_slice(&[0, 0]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(wire::decision(&huge).is_err());
    }

    #[test]
    fn verdicts_decode() {
        assert_eq!(wire::verdict(&[0]).unwrap(), Verdict::Accept);
        let mut out = vec![1];
        put_str(&mut out, "large");
        put_str(&mut out, "low-confidence");
        out.extend_from_slice(&0u32.to_le_bytes());
        let expect = Verdict::Escalate {
            pool: "large".into(),
            reason: "low-confidence".into(),
        };
        assert_eq!(wire::verdict(&out).unwrap(), expect);
        assert!(wire::verdict(&[1]).is_err());
        assert!(wire::verdict(&[0, 0]).is_err());
    }

    #[test]
    fn request_items_encode_as_the_interface_says() {
        let messages = wire::messages(&[crate::Message {
            role: "user".into(),
            content: "hé".into(),
        }]);
        let mut expect = 1u32.to_le_bytes().to_vec();
        put_str(&mut expect, "user");
        put_str(&mut expect, "hé");
        expect.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(messages, expect);

        let pairs = wire::pairs(&[("x-tier".into(), "premium".into())]);
        let mut expect = 1u32.to_le_bytes().to_vec();
        put_str(&mut expect, "x-tier");
        put_str(&mut expect, "premium");
        assert_eq!(pairs, expect);

        let strings = wire::strings(&["a".into(), "bc".into()]);
        let mut expect = 2u32.to_le_bytes().to_vec();
        put_str(&mut expect, "a");
        put_str(&mut expect, "bc");
        assert_eq!(strings, expect);
    }

    #[test]
    fn buffers_outside_the_memory_are_refused() {
        assert_eq!(guest_range(100, 10, 20).unwrap(), 10..30);
        assert_eq!(guest_range(100, 100, 0).unwrap(), 100..100);
        assert!(guest_range(100, 90, 20).is_err());
        // A negative i32 is a large u32 offset, not a negative one.
        assert!(guest_range(100, -1, 1).is_err());
        assert!(guest_range(usize::MAX, -1, -1).is_ok());
    }

    #[test]
    fn only_core_modules_take_this_path() {
        assert!(is_core_module(b"\0asm\x01\0\0\0rest"));
        assert!(!is_core_module(b"\0asm\x0d\0\x01\0rest"));
        assert!(!is_core_module(b"\0as"));
    }

    #[test]
    fn facts_reinterpret_the_numbers_the_plugin_reads_back() {
        let mut req = RouteRequest::new(Endpoint::Embeddings, "m");
        req.message_count = u32::MAX;
        req.prompt_chars = 7;
        req.stream = true;
        assert_eq!(facts(&req), (2, -1, 7, -1, 1));
        req.max_tokens = Some(u32::MAX);
        assert_eq!(facts(&req).3, i64::from(u32::MAX));
    }
}
