//! Renders chat messages into a prompt with the model's own chat template
//! (`tokenizer.chat_template`, Jinja), as llama.cpp's server and Hugging
//! Face's `apply_chat_template` do.
//!
//! The template is compiled once with the settings those use (blocks trim
//! their trailing newline and leading indentation) and gets `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`, plus a
//! `raise_exception` function that templates use to refuse input. The
//! rendered prompt is text: tokenize it with special tokens parsed.
//!
//! Limitation: Python string methods (`.strip()`, `.startswith()`, ...)
//! and `strftime_now` are not provided; templates that use them fail to
//! render with a [`ChatError::Render`] naming the method. SmolLM2's
//! template needs neither.

use std::fmt;

use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::gguf::{GgufError, GgufFile, MetaValue};

/// Name under which the template is kept in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Metadata key of the template in GGUF files.
const TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (the template decides what it
    /// accepts).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(
        "the model file has no {TEMPLATE_KEY}, so chat messages cannot be \
         rendered; send a raw prompt to the completions endpoint instead"
    )]
    MissingTemplate,

    #[error(transparent)]
    Gguf(#[from] GgufError),

    #[error("the model's chat template does not compile: {0}")]
    Syntax(String),

    #[error("the model's chat template failed to render these messages: {0}")]
    Render(String),
}

/// A compiled chat template and the token texts it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `tokenizer.chat_template` from the model file, with the
    /// texts of its BOS and EOS tokens (empty when the file names none).
    pub fn from_gguf(gguf: &GgufFile) -> Result<ChatTemplate, ChatError> {
        let source = match gguf.metadata(TEMPLATE_KEY) {
            None => return Err(ChatError::MissingTemplate),
            Some(_) => gguf.get_str(TEMPLATE_KEY)?,
        };
        let token_text = |key: &str| -> Result<String, ChatError> {
            if gguf.metadata(key).is_none() {
                return Ok(String::new());
            }
            let id = gguf.get_u32(key)? as usize;
            let text = match gguf.metadata("tokenizer.ggml.tokens") {
                Some(MetaValue::Array { items, .. }) => items.get(id),
                _ => None,
            };
            Ok(text.and_then(MetaValue::as_str).unwrap_or("").to_string())
        };
        let bos = token_text("tokenizer.ggml.bos_token_id")?;
        let eos = token_text("tokenizer.ggml.eos_token_id")?;
        ChatTemplate::new(source, &bos, &eos)
    }

    /// Compiles a template from its Jinja `source`; `bos` and `eos` are the
    /// texts it sees as `bos_token` and `eos_token`.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();

        // Hugging Face and llama.cpp compile chat templates this way;
        // without it, templates written over several lines gain newlines.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);

        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos.to_string(),
            eos_token: eos.to_string(),
        })
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends with
    /// the header of the assistant's turn, ready for generation.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render(describe(&e)))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        template
            .render(ctx)
            .map_err(|e| ChatError::Render(describe(&e)))
    }
}

/// `raise_exception(message)`: templates call it to reject a conversation
/// (say, roles that do not alternate).
fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// A template error in one line: its message and, where known, the line.
fn describe(e: &Error) -> String {
    let mut out = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        out.push_str(&format!(" (template line {line})"));
    }
    out
}

#[cfg(test)]
mod tests;
