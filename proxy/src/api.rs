//! The OpenAI request bodies Switchyard understands: parsing, the checks a
//! request must pass before it is routed, and the summary the routing
//! policy sees.
//!
//! Only the fields Switchyard acts on are interpreted; every other field is
//! kept as the client wrote it and sent upstream unchanged.

use std::sync::Arc;

use http::HeaderMap;
use serde_json::{Map, Value};
use switchyard_policy::{Endpoint, Message, RequestContent, RouteRequest};

use crate::error::ApiError;

/// Headers the routing policy is not shown: they carry credentials, or
/// (the hop list) Switchyard's own loop detection.
const PRIVATE_HEADERS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "api-key",
    "x-api-key",
    crate::upstream::hop::HOP_HEADER,
];

/// A parsed API request.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub endpoint: Endpoint,
    /// The JSON object as the client sent it; shared with what the
    /// routing policy reads, and copied on write while it is.
    pub body: Arc<Map<String, Value>>,
    pub model: String,
    pub stream: bool,
    /// The prompt (completions) or input (embeddings) split into items, in
    /// order; empty for chat.
    pub items: Vec<Value>,
    /// Whether `items` are strings or token-id arrays. Both cannot be
    /// mixed in one upstream request.
    pub item_form: ItemForm,
    /// Choices per prompt (`n`). Default 1.
    pub n: u64,
    /// The request URI's query string, sent upstream unchanged.
    pub query: Option<String>,
    /// On a captured connection, the pool whose server the client opened
    /// it to: the request's default route, and its `model` is sent there
    /// as written.
    pub captured_pool: Option<String>,
}

/// How the prompt or input items are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemForm {
    Text,
    Tokens,
}

impl ApiRequest {
    /// Parses a request body for `endpoint`.
    pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}")))?;
        let Value::Object(body) = value else {
            return Err(ApiError::invalid("request body must be a JSON object"));
        };

        let model = match body.get("model") {
            Some(Value::String(model)) if !model.is_empty() => model.clone(),
            Some(Value::String(_)) => {
                return Err(ApiError::bad_field("model", "a non-empty string"))
            }
            Some(_) => return Err(ApiError::bad_field("model", "a string")),
            None => return Err(ApiError::missing("model")),
        };
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(stream)) => *stream,
            Some(_) => return Err(ApiError::bad_field("stream", "a boolean")),
        };
        let n = match body.get("n") {
            None | Some(Value::Null) => 1,
            Some(value) => match value.as_u64() {
                Some(n @ 1..=128) => n,
                _ => return Err(ApiError::bad_field("n", "an integer between 1 and 128")),
            },
        };
        for field in ["max_tokens", "max_completion_tokens"] {
            if let Some(value) = body.get(field) {
                if !value.is_null() && value.as_u64().is_none() {
                    return Err(ApiError::bad_field(field, "a non-negative integer"));
                }
            }
        }

        let (items, item_form) = match endpoint {
            Endpoint::ChatCompletions => {
                check_messages(body.get("messages"))?;
                (Vec::new(), ItemForm::Text)
            }
            Endpoint::Completions => split_items("prompt", body.get("prompt"))?,
            Endpoint::Embeddings => split_items("input", body.get("input"))?,
        };

        Ok(Self {
            endpoint,
            body: Arc::new(body),
            model,
            stream,
            items,
            item_form,
            n,
            query: None,
            captured_pool: None,
        })
    }

    /// The path and query to request upstream.
    pub fn upstream_path(&self) -> String {
        match &self.query {
            Some(query) => format!("{}?{query}", self.endpoint.path()),
            None => self.endpoint.path().to_string(),
        }
    }

    /// The field that holds the items: `prompt` or `input`.
    pub fn items_field(&self) -> Option<&'static str> {
        match self.endpoint {
            Endpoint::ChatCompletions => None,
            Endpoint::Completions => Some("prompt"),
            Endpoint::Embeddings => Some("input"),
        }
    }

    /// The client's token limit (`max_tokens`, or for chat
    /// `max_completion_tokens`).
    pub fn max_tokens(&self) -> Option<u64> {
        ["max_tokens", "max_completion_tokens"]
            .iter()
            .find_map(|field| self.body.get(*field).and_then(Value::as_u64))
    }

    /// Lowers the token limit to `cap` if the client asked for more or set
    /// none.
    pub fn cap_max_tokens(&mut self, cap: u32) {
        let cap = u64::from(cap);
        let body = Arc::make_mut(&mut self.body);
        let mut capped_any = false;
        for field in ["max_tokens", "max_completion_tokens"] {
            if let Some(value) = body.get_mut(field) {
                if let Some(current) = value.as_u64() {
                    *value = Value::from(current.min(cap));
                    capped_any = true;
                }
            }
        }
        if !capped_any {
            body.insert("max_tokens".to_string(), Value::from(cap));
        }
    }

    /// Adds `text` as a leading system message (chat only; other
    /// endpoints are left alone).
    pub fn add_system_instruction(&mut self, text: &str) {
        if let Some(Value::Array(messages)) = Arc::make_mut(&mut self.body).get_mut("messages") {
            let message = serde_json::json!({"role": "system", "content": text});
            messages.insert(0, message);
        }
    }

    /// Keeps the system messages and the last `turns` other messages of a
    /// chat request, in order (other endpoints are left alone). At least
    /// one non-system message is always kept.
    pub fn keep_last_turns(&mut self, turns: usize) {
        let Some(Value::Array(messages)) = Arc::make_mut(&mut self.body).get_mut("messages") else {
            return;
        };
        let is_system = |m: &Value| m.get("role").and_then(Value::as_str) == Some("system");
        let others = messages.iter().filter(|m| !is_system(m)).count();
        let mut drop = others.saturating_sub(turns.max(1));
        messages.retain(|m| {
            if drop > 0 && !is_system(m) {
                drop -= 1;
                return false;
            }
            true
        });
    }

    /// What the routing policy is told about this request. Its messages,
    /// prompts and headers stay where they are, shared with `self` and
    /// the caller, until the plugin reads them.
    pub fn route_request(&self, headers: &Arc<HeaderMap>) -> RouteRequest {
        let messages = match self.body.get("messages") {
            Some(Value::Array(messages)) => messages.as_slice(),
            _ => &[],
        };
        let prompt_chars = messages
            .iter()
            .map(text_chars)
            .chain(self.items.iter().map(|item| match item {
                Value::String(text) => char_count(text),
                other => char_count(&other.to_string()),
            }))
            .sum();
        let content = RequestBody {
            endpoint: self.endpoint,
            body: Arc::clone(&self.body),
            headers: Arc::clone(headers),
        };

        let mut request = RouteRequest::new(self.endpoint, self.model.clone());
        request.message_count = u32::try_from(messages.len()).unwrap_or(u32::MAX);
        request.prompt_chars = prompt_chars;
        request.max_tokens = self
            .max_tokens()
            .map(|tokens| u32::try_from(tokens).unwrap_or(u32::MAX));
        request.stream = self.stream;
        request.with_content(Arc::new(content))
    }
}

/// A request's content as the routing policy reads it: from the parsed
/// body and the headers, shared rather than copied.
#[derive(Debug)]
struct RequestBody {
    endpoint: Endpoint,
    body: Arc<Map<String, Value>>,
    headers: Arc<HeaderMap>,
}

impl RequestContent for RequestBody {
    fn messages(&self) -> Vec<Message> {
        match self.body.get("messages") {
            Some(Value::Array(messages)) => messages.iter().map(message_text).collect(),
            _ => Vec::new(),
        }
    }

    fn prompt(&self) -> Vec<String> {
        let field = match self.endpoint {
            Endpoint::ChatCompletions => return Vec::new(),
            Endpoint::Completions => "prompt",
            Endpoint::Embeddings => "input",
        };
        // Parsing checked the field, so it splits.
        let split = split_items(field, self.body.get(field));
        let items = split.map(|(items, _form)| items).unwrap_or_default();
        items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => text,
                other => other.to_string(),
            })
            .collect()
    }

    fn header(&self, name: &str) -> Option<String> {
        if is_private(name) {
            return None;
        }
        // The first value `headers` would show: a repeated header whose
        // first value is not UTF-8 answers with its next one, as the
        // plugin's own lookup in a fetched `headers` list does.
        self.headers
            .get_all(name)
            .iter()
            .find_map(visible_value)
            .map(str::to_string)
    }

    fn headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(name, _)| !is_private(name.as_str()))
            .filter_map(|(name, value)| {
                Some((name.as_str().to_string(), visible_value(value)?.to_string()))
            })
            .collect()
    }
}

/// Whether the policy must not see header `name`.
fn is_private(name: &str) -> bool {
    PRIVATE_HEADERS
        .iter()
        .any(|private| private.eq_ignore_ascii_case(name))
}

/// A header value as the policy sees it. `to_str` takes visible ASCII
/// only, which would hide a value such as `x-user: José` from the policy.
// Limitation: a value that is not UTF-8 (Latin-1, say) is left out, as a
// WIT string cannot carry it.
fn visible_value(value: &http::HeaderValue) -> Option<&str> {
    std::str::from_utf8(value.as_bytes()).ok()
}

fn check_messages(messages: Option<&Value>) -> Result<(), ApiError> {
    let Some(messages) = messages else {
        return Err(ApiError::missing("messages"));
    };
    let Value::Array(messages) = messages else {
        return Err(ApiError::bad_field("messages", "an array"));
    };
    if messages.is_empty() {
        return Err(ApiError::bad_field("messages", "a non-empty array"));
    }
    for message in messages {
        let valid = message
            .as_object()
            .is_some_and(|message| message.get("role").is_some_and(Value::is_string));
        if !valid {
            return Err(ApiError::bad_field(
                "messages",
                "an array of objects with a string `role`",
            ));
        }
    }
    Ok(())
}

/// Splits a `prompt` or `input` into items: a string is one item, an array
/// of strings or of token-id arrays is one item each, and an array of
/// integers is one tokenized item.
fn split_items(
    field: &'static str,
    value: Option<&Value>,
) -> Result<(Vec<Value>, ItemForm), ApiError> {
    const EXPECTED: &str = "a string, an array of strings, an array of \
                            token ids or an array of token-id arrays";
    let Some(value) = value else {
        return Err(ApiError::missing(field));
    };
    match value {
        Value::String(_) => Ok((vec![value.clone()], ItemForm::Text)),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::bad_field(field, "a non-empty array"))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => {
            Ok((items.clone(), ItemForm::Text))
        }
        Value::Array(items) if items.iter().all(is_token_id) => {
            Ok((vec![value.clone()], ItemForm::Tokens))
        }
        Value::Array(items) if items.iter().all(is_token_array) => {
            Ok((items.clone(), ItemForm::Tokens))
        }
        _ => Err(ApiError::bad_field(field, EXPECTED)),
    }
}

fn is_token_id(value: &Value) -> bool {
    value.is_u64()
}

fn is_token_array(value: &Value) -> bool {
    matches!(value, Value::Array(ids) if !ids.is_empty()
        && ids.iter().all(is_token_id))
}

/// A chat message's role and text; content given as parts keeps only its
/// text parts.
fn message_text(message: &Value) -> Message {
    let role = message
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let content = match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    };
    Message { role, content }
}

/// The characters in `text`. Most prompts are ASCII, whose check is
/// several times cheaper than counting characters.
fn char_count(text: &str) -> u64 {
    let count = if text.is_ascii() {
        text.len()
    } else {
        text.chars().count()
    };
    count as u64
}

/// The characters of [`message_text`]'s content, counted in place.
fn text_chars(message: &Value) -> u64 {
    match message.get("content") {
        Some(Value::String(text)) => char_count(text),
        Some(Value::Array(parts)) => {
            let texts = parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str));
            let (count, chars) = texts.fold((0u64, 0u64), |(count, chars), text| {
                (count + 1, chars + char_count(text))
            });
            // Parts are joined by one newline each.
            chars + count.saturating_sub(1)
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(endpoint: Endpoint, body: &str) -> Result<ApiRequest, ApiError> {
        ApiRequest::parse(endpoint, body.as_bytes())
    }

    /// A chat request for `auto` with one short user message.
    fn short_chat() -> ApiRequest {
        let body = r#"{"model": "auto",
            "messages": [{"role": "user", "content": "hi"}]}"#;
        parse(Endpoint::ChatCompletions, body).unwrap()
    }

    #[test]
    fn prompt_forms_split_into_items() {
        let cases = [
            (r#""a b""#, 1, ItemForm::Text),
            (r#"["a", "b", "c"]"#, 3, ItemForm::Text),
            (r#"[1, 2, 3]"#, 1, ItemForm::Tokens),
            (r#"[[1, 2], [3]]"#, 2, ItemForm::Tokens),
        ];
        for (prompt, count, form) in cases {
            let body = format!(r#"{{"model": "m", "prompt": {prompt}}}"#);
            let request = parse(Endpoint::Completions, &body).unwrap();
            assert_eq!(request.items.len(), count, "{prompt}");
            assert_eq!(request.item_form, form, "{prompt}");
        }
    }

    #[test]
    fn mixed_prompt_array_is_rejected() {
        let body = r#"{"model": "m", "prompt": ["a", [1]]}"#;
        let err = parse(Endpoint::Completions, body).unwrap_err();
        assert_eq!(err.param, Some("prompt"));
    }

    #[test]
    fn missing_fields_are_named() {
        let cases = [
            (Endpoint::ChatCompletions, r#"{"messages": []}"#, "model"),
            (Endpoint::ChatCompletions, r#"{"model": "m"}"#, "messages"),
            (Endpoint::Completions, r#"{"model": "m"}"#, "prompt"),
            (Endpoint::Embeddings, r#"{"model": "m"}"#, "input"),
        ];
        for (endpoint, body, field) in cases {
            let err = parse(endpoint, body).unwrap_err();
            assert_eq!(err.param, Some(field), "{body}");
            assert!(err.message.contains(field));
        }
    }

    #[test]
    fn malformed_json_is_invalid_request() {
        let err = parse(Endpoint::Completions, "{not json").unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
        let err = parse(Endpoint::Completions, "[1]").unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
    }

    #[test]
    fn cap_lowers_only_larger_limits() {
        let body = r#"{"model": "m", "prompt": "x", "max_tokens": 100}"#;
        let mut request = parse(Endpoint::Completions, body).unwrap();
        request.cap_max_tokens(5);
        assert_eq!(request.body["max_tokens"], 5);

        let body = r#"{"model": "m", "prompt": "x", "max_tokens": 3}"#;
        let mut request = parse(Endpoint::Completions, body).unwrap();
        request.cap_max_tokens(5);
        assert_eq!(request.body["max_tokens"], 3);

        let body = r#"{"model": "m", "prompt": "x"}"#;
        let mut request = parse(Endpoint::Completions, body).unwrap();
        request.cap_max_tokens(5);
        assert_eq!(request.body["max_tokens"], 5);
    }

    #[test]
    fn history_trim_keeps_system_messages_and_the_last_turns() {
        let body = r#"{"model": "m", "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}
        ]}"#;
        let mut request = parse(Endpoint::ChatCompletions, body).unwrap();
        request.keep_last_turns(1);
        request.add_system_instruction("be brief");
        let contents: Vec<&str> = request.body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert_eq!(contents, vec!["be brief", "s", "u2"]);
    }

    #[test]
    fn route_request_counts_characters_of_all_messages() {
        let body = r#"{"model": "auto", "messages": [
            {"role": "system", "content": "abc"},
            {"role": "user", "content": [{"type": "text", "text": "de"},
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "text", "text": "f"}]}
        ]}"#;
        let request = parse(Endpoint::ChatCompletions, body).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer secret".parse().unwrap());
        headers.insert("x-tier", "premium".parse().unwrap());
        headers.insert("x-switchyard-hop", "0123456789abcdef".parse().unwrap());
        for credential in ["proxy-authorization", "cookie", "api-key", "x-api-key"] {
            headers.insert(credential, "secret".parse().unwrap());
        }
        let summary = request.route_request(&Arc::new(headers));
        // "abc" and "de\nf": text parts are joined by a newline.
        assert_eq!(summary.prompt_chars, 7);
        assert_eq!(summary.message_count, 2);
        let names: Vec<String> = summary.headers().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["x-tier"]);
        assert_eq!(summary.header("X-Tier").as_deref(), Some("premium"));
        assert_eq!(summary.header("Authorization"), None);
        assert_eq!(summary.header("X-Api-Key"), None);
        assert_eq!(summary.header("x-switchyard-hop"), None);
        assert_eq!(summary.header("not a header name"), None);
        let messages = summary.messages();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[1].content, "de\nf");
        assert_eq!(summary.prompt(), Vec::<String>::new());
    }

    #[test]
    fn route_request_reads_prompts_of_each_form() {
        let cases = [
            (Endpoint::Completions, r#""héllo""#, vec!["héllo"], 5),
            (Endpoint::Completions, r#"["a", "bc"]"#, vec!["a", "bc"], 3),
            (Endpoint::Completions, "[1, 2]", vec!["[1,2]"], 5),
            (Endpoint::Embeddings, r#"["xyz"]"#, vec!["xyz"], 3),
        ];
        for (endpoint, prompt, texts, chars) in cases {
            let field = if endpoint == Endpoint::Embeddings {
                "input"
            } else {
                "prompt"
            };
            let body = format!(r#"{{"model": "m", "{field}": {prompt}}}"#);
            let request = parse(endpoint, &body).unwrap();
            let summary = request.route_request(&Arc::new(HeaderMap::new()));
            assert_eq!(summary.prompt(), texts, "{body}");
            assert_eq!(summary.prompt_chars, chars, "{body}");
            assert_eq!(summary.message_count, 0, "{body}");
        }
    }

    #[test]
    fn route_request_shares_the_body_and_keeps_what_the_client_sent() {
        let body = r#"{"model": "auto", "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}]}"#;
        let mut request = parse(Endpoint::ChatCompletions, body).unwrap();
        let summary = request.route_request(&Arc::new(HeaderMap::new()));
        assert_eq!(
            Arc::strong_count(&request.body),
            2,
            "the body is shared, not copied"
        );

        request.add_system_instruction("be brief");
        request.cap_max_tokens(5);
        assert_eq!(request.body["messages"].as_array().unwrap().len(), 2);
        assert_eq!(request.body["max_tokens"], 5);
        assert_eq!(
            summary.messages().len(),
            1,
            "the policy sees the client's messages"
        );
        assert_eq!(summary.max_tokens, Some(50));

        drop(summary);
        let before = Arc::as_ptr(&request.body);
        request.cap_max_tokens(4);
        assert_eq!(
            Arc::as_ptr(&request.body),
            before,
            "once unshared, edited in place"
        );
    }

    #[test]
    fn route_request_shows_utf8_header_values() {
        let request = short_chat();
        let mut headers = HeaderMap::new();
        let utf8 = http::HeaderValue::from_bytes("José".as_bytes()).unwrap();
        headers.insert("x-user", utf8);
        let latin1 = http::HeaderValue::from_bytes(b"Jos\xe9").unwrap();
        headers.insert("x-latin1", latin1);
        let summary = request.route_request(&Arc::new(headers));
        assert_eq!(
            summary.headers(),
            vec![("x-user".to_owned(), "José".to_owned())]
        );
        assert_eq!(summary.header("x-user").as_deref(), Some("José"));
        assert_eq!(summary.header("x-latin1"), None);
    }

    #[test]
    fn header_lookup_agrees_with_the_header_list() {
        let request = short_chat();
        let mut headers = HeaderMap::new();
        let latin1 = http::HeaderValue::from_bytes(b"Jos\xe9").unwrap();
        headers.append("x-user", latin1);
        let utf8 = http::HeaderValue::from_bytes("José".as_bytes()).unwrap();
        headers.append("x-user", utf8);
        let summary = request.route_request(&Arc::new(headers));
        assert_eq!(
            summary.headers(),
            vec![("x-user".to_owned(), "José".to_owned())]
        );
        assert_eq!(
            summary.header("X-User").as_deref(),
            Some("José"),
            "the first value the list shows, whatever the plugin read first"
        );
        assert_eq!(summary.header("bad name"), None);
        assert_eq!(summary.header(""), None);
        assert_eq!(summary.header(&"x".repeat(100 * 1024)), None);
    }
}
