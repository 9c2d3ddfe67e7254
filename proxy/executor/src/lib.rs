//! Switchyard's in-process executor for small llama-family models stored as
//! GGUF files.
//!
//! The pieces, bottom up: [`gguf`] reads the file (memory-mapped), [`quant`]
//! holds the block formats and the matrix kernels, [`tokenizer`] and [`chat`]
//! turn text and messages into token ids, [`model`] runs the forward pass over
//! a KV cache, [`sampler`] picks tokens, and [`engine`] schedules many
//! sequences into one running batch. Nothing here knows about HTTP.

pub mod pool;
pub mod quant;
pub mod tensor;
