//! The core module's exports and imports (`wasm32-unknown-unknown` only),
//! with the only `unsafe` code of the SDK: the calls to the four imports,
//! allowed function by function. Everything the host hands over is
//! decoded by `wire`, and every result is encoded into one reused buffer.

use std::cell::RefCell;

use super::malformed;
use super::wire::{self, Item, WireError};
use crate::request::{HostCall, Request};
use crate::Policy;

thread_local! {
    /// The result of the last call (encoded decision or verdict, or
    /// `init`'s error message), which the host reads after the call
    /// returns; cleared and refilled by every call.
    static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };

    /// Where `read` asks the host to copy items: reused, and grown when
    /// an item does not fit (`wire::read_with_retry`).
    // Limitation: it never shrinks, so one huge item (a long chat read
    // through `messages`) keeps its size in memory for the instance's
    // life. Instances are replaced often enough that this is not worth a
    // shrink on every call.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };

    /// The buffer `alloc` handed out, which the next `init` takes.
    static CONFIG: RefCell<Option<Box<[u8]>>> = const { RefCell::new(None) };
}

/// The host's functions, as the module imports them.
mod ffi {
    #[link(wasm_import_module = "switchyard-0.4")]
    extern "C" {
        #[link_name = "log"]
        pub fn log(level: i32, ptr: i32, len: i32);
        #[link_name = "now-unix-ms"]
        pub fn now_unix_ms() -> i64;
        #[link_name = "counter-add"]
        pub fn counter_add(name_ptr: i32, name_len: i32, value: i64);
        #[link_name = "read"]
        pub fn read(what: i32, key_ptr: i32, key_len: i32, out_ptr: i32, out_cap: i32) -> i32;
    }
}

/// A guest address as the ABI's i32; `usize` is 32 bits on wasm32.
fn addr<T>(ptr: *const T) -> i32 {
    ptr as usize as i32
}

/// A guest length as the ABI's i32 (at most `isize::MAX`, so positive).
fn len(len: usize) -> i32 {
    len as i32
}

/// The host services of `crate::host` and `crate::log`.
pub(crate) mod host {
    use super::{addr, ffi, len};
    use crate::log::Level;

    #[expect(unsafe_code, reason = "calls a host import")]
    pub fn now_unix_ms() -> u64 {
        // SAFETY: takes no arguments; the host only reads its clock.
        let ms = unsafe { ffi::now_unix_ms() };
        ms as u64
    }

    #[expect(unsafe_code, reason = "calls a host import")]
    pub fn counter_add(name: &str, value: u64) {
        let (ptr, n) = (addr(name.as_ptr()), len(name.len()));
        // SAFETY: the host reads `n` bytes at `ptr`, which `name` owns
        // for the whole call, and keeps no pointer.
        unsafe { ffi::counter_add(ptr, n, value as i64) }
    }

    #[expect(unsafe_code, reason = "calls a host import")]
    pub fn log(level: Level, message: &str) {
        let level = match level {
            Level::Error => 0,
            Level::Warn => 1,
            Level::Info => 2,
            Level::Debug => 3,
            Level::Trace => 4,
        };
        let (ptr, n) = (addr(message.as_ptr()), len(message.len()));
        // SAFETY: as in `counter_add`, the host only reads `message`.
        unsafe { ffi::log(level, ptr, n) }
    }
}

/// Reads `item` (with `key` for HEADER and ATTRIBUTE) of the current call
/// and hands its bytes to `decode`, or returns `None` when the host has
/// no such item. A length the host cannot mean fails the call.
#[expect(unsafe_code, reason = "calls the host's `read` import")]
pub(crate) fn read<T>(item: Item, key: &str, decode: impl FnOnce(&[u8]) -> T) -> Option<T> {
    let (key_ptr, key_len) = match key.is_empty() {
        true => (0, 0),
        false => (addr(key.as_ptr()), len(key.len())),
    };
    let read_into = |out: &mut [u8]| {
        let (out_ptr, out_cap) = (addr(out.as_mut_ptr()), len(out.len()));
        // SAFETY: the host reads `key_len` bytes at `key_ptr`, which `key`
        // owns, and writes at most `out_cap` bytes at `out_ptr`, which
        // `out` borrows mutably for the call (initialised bytes, so any
        // content is a valid `u8`). It keeps neither pointer.
        unsafe { ffi::read(item.code(), key_ptr, key_len, out_ptr, out_cap) }
    };
    let result = SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        wire::read_with_retry(&mut scratch, read_into, decode)
    });
    result.unwrap_or_else(|error| malformed(item.name(), &error))
}

/// Clears the result buffer, lets `encode` fill it and returns it packed.
fn output(encode: impl FnOnce(&mut Vec<u8>)) -> i64 {
    OUTPUT.with(|out| {
        let mut out = out.borrow_mut();
        out.clear();
        encode(&mut out);
        wire::pack(addr(out.as_ptr()) as u32, len(out.len()) as u32)
    })
}

/// The export `switchyard-0.4:alloc`: `len` zeroed bytes for `init`'s
/// configuration, replacing any buffer that no `init` took.
pub fn alloc(len: i32) -> i32 {
    let buffer = vec![0u8; len as u32 as usize].into_boxed_slice();
    let ptr = addr(buffer.as_ptr());
    CONFIG.with(|slot| *slot.borrow_mut() = Some(buffer));
    ptr
}

/// The export `switchyard-0.4:init`: installs the panic hook, takes the
/// configuration from the buffer `alloc` handed out (freeing it) and sets
/// up the policy. 0, or the packed error message.
pub fn init<P: Policy>(config_ptr: i32, config_len: i32) -> i64 {
    crate::instance::install_panic_hook();

    // The buffer is found by what `alloc` kept rather than trusted from
    // the pointer: a host that passes another one gets an error, not a
    // read of arbitrary memory.
    let buffer = CONFIG.with(|slot| slot.borrow_mut().take());
    let given = (config_ptr, config_len);
    let result = match buffer {
        Some(buffer) if (addr(buffer.as_ptr()), len(buffer.len())) == given => {
            match std::str::from_utf8(&buffer) {
                Ok(config) => crate::instance::init::<P>(config),
                Err(e) => Err(format!("policy config is not valid UTF-8: {e}")),
            }
        }
        _ => Err(CONFIG_NOT_FROM_ALLOC.to_owned()),
    };
    match result {
        Ok(()) => 0,
        Err(message) => output(|out| out.extend_from_slice(message.as_bytes())),
    }
}

const CONFIG_NOT_FROM_ALLOC: &str = "init's config pointer and length are not \
     the buffer the last switchyard-0.4:alloc returned";

/// The five parameters of `switchyard-0.4:route` and `review`, as the
/// ABI passes them.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub endpoint: i32,
    pub message_count: i32,
    pub prompt_chars: i64,
    pub max_tokens: i64,
    pub stream: i32,
}

/// The export `switchyard-0.4:route`: the packed, encoded decision.
pub fn route(params: Params) -> i64 {
    let call = HostCall::default();
    let req = request(&call, params);
    let decision = crate::instance::route(&req);
    output(|out| wire::encode_decision(&decision, out))
}

/// The export `switchyard-0.4:review`: reads the answer, and returns the
/// packed, encoded verdict.
pub fn review(params: Params) -> i64 {
    let call = HostCall::default();
    let req = request(&call, params);
    let answer = match read(Item::Answer, "", wire::decode_answer) {
        Some(Ok(answer)) => answer,
        Some(Err(error)) => malformed(Item::Answer.name(), &error),
        None => malformed(Item::Answer.name(), &WireError::Absent),
    };
    let verdict = crate::instance::review(&req, &answer);
    output(|out| wire::encode_verdict(&verdict, out))
}

/// The request of one `route` or `review` call, from its parameters; the
/// rest is read when the policy asks.
fn request(call: &HostCall, params: Params) -> Request<'_> {
    let checked = || -> Result<_, WireError> {
        Ok((
            wire::endpoint_from_code(params.endpoint)?,
            wire::max_tokens_from_param(params.max_tokens)?,
            wire::stream_from_param(params.stream)?,
        ))
    };
    let (endpoint, max_tokens, stream) = match checked() {
        Ok(checked) => checked,
        Err(error) => malformed("call parameters", &error),
    };

    // Both counts are unsigned on the host; the ABI passes their bits.
    let message_count = params.message_count as u32;
    let prompt_chars = params.prompt_chars as u64;
    Request::hosted(
        call,
        endpoint,
        message_count,
        prompt_chars,
        max_tokens,
        stream,
    )
}
