//! A request of the core module's ABI (`core_abi`): the numbers of the
//! `route` or `review` call, and caches of what the policy has read
//! through the host's `read`. Nothing is read before the policy asks, and
//! each list at most once per call.

use std::cell::OnceCell;
use std::fmt;
use std::marker::PhantomData;

use super::{Facts, Request, Rest};
use crate::core_abi::wire::{self, Item, WireError};
use crate::core_abi::{malformed, read};
use crate::types::{Endpoint, Message};

/// One `route` or `review` call in progress. A request borrows it, so that
/// it cannot outlive the call: its reads would answer for a later one.
#[derive(Debug, Default)]
pub(crate) struct HostCall {
    _private: (),
}

/// The core module's request: its message count, and what has been read
/// from the host so far.
#[derive(Clone)]
pub(super) struct Hosted<'a> {
    call: PhantomData<&'a HostCall>,
    message_count: usize,
    model: OnceCell<String>,
    messages: OnceCell<Vec<Message>>,
    prompt: OnceCell<Vec<String>>,
    headers: OnceCell<Vec<(String, String)>>,
}

impl<'a> Request<'a> {
    /// The request of one core-module call, from its parameters; the model
    /// and the lists are read from the host when first asked for.
    pub(crate) fn hosted(
        _call: &'a HostCall,
        endpoint: Endpoint,
        message_count: u32,
        prompt_chars: u64,
        max_tokens: Option<u32>,
        stream: bool,
    ) -> Self {
        Request {
            facts: Facts {
                endpoint,
                model: String::new(),
                prompt_chars,
                max_tokens,
                stream,
            },
            rest: Rest::Hosted(Hosted {
                call: PhantomData,
                message_count: usize::try_from(message_count).unwrap_or(usize::MAX),
                model: OnceCell::new(),
                messages: OnceCell::new(),
                prompt: OnceCell::new(),
                headers: OnceCell::new(),
            }),
        }
    }
}

impl Hosted<'_> {
    pub(super) fn message_count(&self) -> usize {
        self.message_count
    }

    /// The model, read on first use. The host always has one: its absence
    /// fails the call rather than routing on an empty name.
    pub(super) fn model(&self) -> &str {
        self.model
            .get_or_init(|| match fetch(Item::Model, "", wire::decode_text) {
                Some(model) => model,
                None => malformed(Item::Model.name(), &WireError::Absent),
            })
    }

    /// The model if read, for `Debug`.
    pub(super) fn model_read(&self) -> &dyn fmt::Debug {
        &self.model
    }

    pub(super) fn messages(&self) -> &[Message] {
        let decode = wire::decode_messages;
        self.messages.get_or_init(|| list(Item::Messages, decode))
    }

    pub(super) fn prompt(&self) -> &[String] {
        let decode = wire::decode_strings;
        self.prompt.get_or_init(|| list(Item::Prompt, decode))
    }

    pub(super) fn headers(&self) -> &[(String, String)] {
        let decode = wire::decode_pairs;
        self.headers.get_or_init(|| list(Item::Headers, decode))
    }

    /// The headers if `headers` has read them.
    pub(super) fn fetched_headers(&self) -> Option<&Vec<(String, String)>> {
        self.headers.get()
    }

    /// One header's value, asked of the host.
    pub(super) fn header(&self, name: &str) -> Option<String> {
        fetch(Item::Header, name, wire::decode_text)
    }

    /// One host attribute, asked of the host.
    pub(super) fn attribute(&self, key: &str) -> Option<String> {
        fetch(Item::Attribute, key, wire::decode_text)
    }

    /// What has been read so far, without reading more.
    pub(super) fn debug_fields<'s, 'f, 'b>(
        &self,
        out: &'s mut fmt::DebugStruct<'f, 'b>,
    ) -> &'s mut fmt::DebugStruct<'f, 'b> {
        out.field("messages", &self.messages)
            .field("prompt", &self.prompt)
            .field("headers", &self.headers)
    }
}

/// One item, decoded; `None` when the host has none. Bytes that do not
/// decode fail the call.
fn fetch<T>(item: Item, key: &str, decode: fn(&[u8]) -> Result<T, WireError>) -> Option<T> {
    let decoded = read(item, key, decode)?;
    Some(decoded.unwrap_or_else(|error| malformed(item.name(), &error)))
}

/// A list item; an absent list reads as empty.
fn list<T>(item: Item, decode: fn(&[u8]) -> Result<Vec<T>, WireError>) -> Vec<T> {
    fetch(item, "", decode).unwrap_or_default()
}

#[cfg(test)]
mod tests;
