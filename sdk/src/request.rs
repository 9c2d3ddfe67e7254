//! What a policy is told about one request: [`Request`].
//!
//! Since `switchyard:policy@0.3.0` each call hands the plugin the request's
//! numbers and model name, and lends it a handle to the rest (messages,
//! prompts, headers), which stays in the host: each of those is one call
//! into the host when read. The 0.4.0 core module (`core_abi`) is handed
//! only the numbers, and reads the model too through the host's `read`.
//! This module hides the difference: a [`Request`] is either the
//! component's lent handle or the core module's call, each with caches so
//! that each list is fetched at most once per call, or the same facts held
//! in plugin memory, built with [`Request::new`] and the `with_*` methods
//! for unit tests. It must not copy anything from the host that the policy
//! did not ask for.

#[cfg(not(core_abi))]
use std::cell::OnceCell;
use std::fmt;

#[cfg(not(core_abi))]
use crate::component::{endpoint_from_wit, message_from_wit, pairs, wit};
use crate::types::{find, Endpoint, Message};

#[cfg(any(test, core_abi))]
mod hosted;

#[cfg(core_abi)]
pub(crate) use self::hosted::HostCall;
#[cfg(any(test, core_abi))]
use self::hosted::Hosted;

/// What a policy is told about one request.
///
/// The endpoint, model, message count, prompt length, `max_tokens` and
/// stream flag come with every call and cost nothing to read. In a plugin
/// the rest stays in the host, and each of
/// [`messages`](Request::messages), [`prompt`](Request::prompt),
/// [`headers`](Request::headers), [`header`](Request::header) and
/// [`attribute`](Request::attribute) asks the host for it: a policy pays
/// only for what it reads. The lists are fetched on first use and kept
/// for the rest of the call, so reading them twice costs nothing more;
/// `header` and `attribute` ask for one value each time, without
/// fetching the others (or look in the headers once `headers` has fetched
/// them).
///
/// The lifetime is that of the host's loan: a request lent to
/// [`Policy::route`](crate::Policy::route) or
/// [`Policy::review`](crate::Policy::review) cannot outlive that call.
/// Requests built with [`Request::new`] hold everything themselves and
/// are `Request<'static>`.
///
/// `Debug` never calls the host: for a lent request it shows what has
/// been read so far.
#[derive(Clone)]
pub struct Request<'a> {
    facts: Facts,
    rest: Rest<'a>,
}

/// What every call hands over (in the core module, all but the model,
/// which is then empty here and read on demand).
#[derive(Debug, Clone)]
struct Facts {
    endpoint: Endpoint,
    model: String,
    prompt_chars: u64,
    max_tokens: Option<u32>,
    stream: bool,
}

#[derive(Clone)]
enum Rest<'a> {
    /// Built in plugin code, for unit tests.
    Owned(Contents),
    /// Lent by the host for one call, to a component.
    #[cfg(not(core_abi))]
    Lent(Lent<'a>),
    /// Read from the host for one call, by a core module.
    #[cfg(any(test, core_abi))]
    Hosted(Hosted<'a>),
}

/// The lists of a request built in plugin code.
#[derive(Debug, Clone, Default)]
struct Contents {
    messages: Vec<Message>,
    prompt: Vec<String>,
    /// Names lowercase, in insertion order.
    headers: Vec<(String, String)>,
    attributes: Vec<(String, String)>,
}

/// The host's request, its message count, and the lists read from it so
/// far.
#[cfg(not(core_abi))]
#[derive(Clone)]
struct Lent<'a> {
    handle: &'a wit::Request,
    message_count: usize,
    messages: OnceCell<Vec<Message>>,
    prompt: OnceCell<Vec<String>>,
    headers: OnceCell<Vec<(String, String)>>,
}

impl<'a> Request<'a> {
    /// The request of one call: its `facts`, and the host's `handle` to
    /// the rest, none of which is read yet.
    #[cfg(not(core_abi))]
    pub(crate) fn lent(facts: wit::RequestFacts, handle: &'a wit::Request) -> Self {
        Request {
            facts: Facts {
                endpoint: endpoint_from_wit(facts.endpoint),
                model: facts.model,
                prompt_chars: facts.prompt_chars,
                max_tokens: facts.max_tokens,
                stream: facts.stream,
            },
            rest: Rest::Lent(Lent {
                handle,
                message_count: usize::try_from(facts.message_count).unwrap_or(usize::MAX),
                messages: OnceCell::new(),
                prompt: OnceCell::new(),
                headers: OnceCell::new(),
            }),
        }
    }

    /// The endpoint the request arrived on.
    pub fn endpoint(&self) -> Endpoint {
        self.facts.endpoint
    }

    /// The `model` field exactly as the client sent it, for example
    /// `auto` or `llama-3-8b`.
    pub fn model(&self) -> &str {
        #[cfg(any(test, core_abi))]
        if let Rest::Hosted(hosted) = &self.rest {
            return hosted.model();
        }
        &self.facts.model
    }

    /// Number of chat messages; 0 for the other endpoints. Free, unlike
    /// `messages().len()`, which fetches the messages.
    pub fn message_count(&self) -> usize {
        match &self.rest {
            Rest::Owned(contents) => contents.messages.len(),
            #[cfg(not(core_abi))]
            Rest::Lent(lent) => lent.message_count,
            #[cfg(any(test, core_abi))]
            Rest::Hosted(hosted) => hosted.message_count(),
        }
    }

    /// Characters (Unicode scalar values) in all messages, prompts or
    /// inputs together: a cheap proxy for prompt length.
    pub fn prompt_chars(&self) -> u64 {
        self.facts.prompt_chars
    }

    /// The client's `max_tokens` (or `max_completion_tokens`), if set.
    pub fn max_tokens(&self) -> Option<u32> {
        self.facts.max_tokens
    }

    /// Whether the client asked for a streamed response.
    pub fn stream(&self) -> bool {
        self.facts.stream
    }

    /// Chat messages, in order (chat completions only; empty otherwise).
    pub fn messages(&self) -> &[Message] {
        match &self.rest {
            Rest::Owned(contents) => &contents.messages,
            #[cfg(not(core_abi))]
            Rest::Lent(lent) => lent.messages.get_or_init(|| {
                let messages = lent.handle.messages();
                messages.into_iter().map(message_from_wit).collect()
            }),
            #[cfg(any(test, core_abi))]
            Rest::Hosted(hosted) => hosted.messages(),
        }
    }

    /// Prompt items (completions) or inputs (embeddings) given as text;
    /// empty for chat completions.
    pub fn prompt(&self) -> &[String] {
        match &self.rest {
            Rest::Owned(contents) => &contents.prompt,
            #[cfg(not(core_abi))]
            Rest::Lent(lent) => lent.prompt.get_or_init(|| lent.handle.prompt()),
            #[cfg(any(test, core_abi))]
            Rest::Hosted(hosted) => hosted.prompt(),
        }
    }

    /// The value of the first header called `name`, compared without
    /// regard to ASCII case. One call into the host per lookup, which
    /// copies only that value. Credentials (`authorization`,
    /// `proxy-authorization`, `cookie`, `api-key`, `x-api-key`) and values
    /// that are not UTF-8 are never shown to a plugin.
    pub fn header(&self, name: &str) -> Option<String> {
        let all = match &self.rest {
            Rest::Owned(contents) => &contents.headers,
            #[cfg(not(core_abi))]
            Rest::Lent(lent) => match lent.headers.get() {
                Some(headers) => headers,
                None => return lent.handle.header(name),
            },
            #[cfg(any(test, core_abi))]
            Rest::Hosted(hosted) => match hosted.fetched_headers() {
                Some(headers) => headers,
                None => return hosted.header(name),
            },
        };
        find(all, name, str::eq_ignore_ascii_case).map(str::to_owned)
    }

    /// All request headers as (name, value); names are lowercase, in the
    /// order each name first arrived, with a repeated header's values
    /// together in arrival order (`x-a`, `x-b`, `x-a` lists both `x-a`
    /// first). Copies every header into the plugin: prefer
    /// [`header`](Request::header) for a few known names.
    pub fn headers(&self) -> &[(String, String)] {
        match &self.rest {
            Rest::Owned(contents) => &contents.headers,
            #[cfg(not(core_abi))]
            Rest::Lent(lent) => lent.headers.get_or_init(|| pairs(lent.handle.headers())),
            #[cfg(any(test, core_abi))]
            Rest::Hosted(hosted) => hosted.headers(),
        }
    }

    /// The value of the host attribute `key` (exact match); the host
    /// defines none yet.
    pub fn attribute(&self, key: &str) -> Option<String> {
        match &self.rest {
            Rest::Owned(contents) => {
                find(&contents.attributes, key, |a, b| a == b).map(str::to_owned)
            }
            #[cfg(not(core_abi))]
            Rest::Lent(lent) => lent.handle.attribute(key),
            #[cfg(any(test, core_abi))]
            Rest::Hosted(hosted) => hosted.attribute(key),
        }
    }
}

impl Request<'static> {
    /// An empty request for `model` on `endpoint`, for tests: no messages,
    /// no prompt, no headers, zero characters, not streamed.
    pub fn new(endpoint: Endpoint, model: impl Into<String>) -> Self {
        Request {
            facts: Facts {
                endpoint,
                model: model.into(),
                prompt_chars: 0,
                max_tokens: None,
                stream: false,
            },
            rest: Rest::Owned(Contents::default()),
        }
    }

    /// Sets the character count.
    pub fn with_prompt_chars(mut self, chars: u64) -> Self {
        self.facts.prompt_chars = chars;
        self
    }

    /// Adds a header; the name is stored lowercase, as the host does.
    pub fn with_header(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into().to_ascii_lowercase();
        let value = value.into();
        self.edit(|contents| contents.headers.push((name, value)))
    }

    /// Appends a chat message and counts its characters.
    pub fn with_message(mut self, message: Message) -> Self {
        self.facts.prompt_chars += message.content.chars().count() as u64;
        self.edit(|contents| contents.messages.push(message))
    }

    /// Appends a prompt item and counts its characters.
    pub fn with_prompt(mut self, prompt: impl Into<String>) -> Self {
        let prompt = prompt.into();
        self.facts.prompt_chars += prompt.chars().count() as u64;
        self.edit(|contents| contents.prompt.push(prompt))
    }

    /// Sets the client's `max_tokens`.
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.facts.max_tokens = Some(max_tokens);
        self
    }

    /// Marks the request as streamed.
    pub fn with_stream(mut self, stream: bool) -> Self {
        self.facts.stream = stream;
        self
    }

    /// Adds an attribute.
    pub fn with_attribute(self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let pair = (key.into(), value.into());
        self.edit(|contents| contents.attributes.push(pair))
    }

    fn edit(mut self, change: impl FnOnce(&mut Contents)) -> Self {
        // Only built requests reach here: the SDK lends the host's
        // request for one call, never for 'static.
        if let Rest::Owned(contents) = &mut self.rest {
            change(contents);
        }
        self
    }
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let facts = &self.facts;
        let model: &dyn fmt::Debug = &facts.model;
        // The core module reads the model on demand too.
        #[cfg(any(test, core_abi))]
        let model = match &self.rest {
            Rest::Hosted(hosted) => hosted.model_read(),
            _ => model,
        };
        let mut out = f.debug_struct("Request");
        out.field("endpoint", &facts.endpoint)
            .field("model", model)
            .field("message_count", &self.message_count())
            .field("prompt_chars", &facts.prompt_chars)
            .field("max_tokens", &facts.max_tokens)
            .field("stream", &facts.stream);
        match &self.rest {
            Rest::Owned(contents) => out
                .field("messages", &contents.messages)
                .field("prompt", &contents.prompt)
                .field("headers", &contents.headers)
                .field("attributes", &contents.attributes)
                .finish(),
            // What has been read so far; asking the host here would make
            // a debug log line change what the plugin pays for.
            #[cfg(not(core_abi))]
            Rest::Lent(lent) => out
                .field("messages", &lent.messages)
                .field("prompt", &lent.prompt)
                .field("headers", &lent.headers)
                .finish_non_exhaustive(),
            #[cfg(any(test, core_abi))]
            Rest::Hosted(hosted) => hosted.debug_fields(&mut out).finish_non_exhaustive(),
        }
    }
}

// The lent path calls into the host, which only a component instance has
// (natively the generated imports are `unreachable!()`), so these tests
// cover built requests; the host's tests (`proxy/policy`) call a built
// plugin through the lent path. The core module's path is tested against
// a fake host in `hosted`.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lookup_ignores_name_case() {
        let req = Request::new(Endpoint::ChatCompletions, "auto").with_header("X-Tier", "premium");
        assert_eq!(req.header("x-tier").as_deref(), Some("premium"));
        assert_eq!(req.header("X-TIER").as_deref(), Some("premium"));
        assert_eq!(req.header("x-other"), None);
        assert_eq!(req.headers(), [("x-tier".into(), "premium".into())]);
    }

    #[test]
    fn builders_count_prompt_characters() {
        let req = Request::new(Endpoint::ChatCompletions, "auto")
            .with_message(Message::new("user", "héllo"))
            .with_prompt("abc");
        assert_eq!(req.prompt_chars(), 8);
        assert_eq!(req.message_count(), 1);
        assert_eq!(req.prompt(), ["abc"]);
    }

    #[test]
    fn built_request_answers_every_accessor() {
        let req = Request::new(Endpoint::Completions, "llama")
            .with_max_tokens(7)
            .with_stream(true)
            .with_prompt_chars(42)
            .with_attribute("k", "v");
        assert_eq!(req.endpoint(), Endpoint::Completions);
        assert_eq!(req.model(), "llama");
        assert_eq!(req.max_tokens(), Some(7));
        assert!(req.stream());
        assert_eq!(req.prompt_chars(), 42);
        assert_eq!(req.attribute("k").as_deref(), Some("v"));
        assert_eq!(req.attribute("K"), None);
        assert!(req.messages().is_empty());
    }

    #[test]
    fn debug_shows_a_built_request_as_request() {
        let req = Request::new(Endpoint::ChatCompletions, "auto");
        let text = format!("{req:?}");
        assert!(text.starts_with("Request {"), "{text}");
        assert!(text.contains("model: \"auto\""), "{text}");
    }
}
