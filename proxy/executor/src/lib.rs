//! Switchyard's in-process executor for small llama-family models stored as
//! GGUF files.
//!
//! The pieces, bottom up: [`gguf`] reads the file (memory-mapped), [`quant`]
//! holds the block formats and the matrix kernels, [`math`] the elementwise
//! functions, [`tokenizer`] and [`chat`] turn text and messages into token
//! ids, [`model`] runs the forward pass over a KV cache, [`sampler`] picks
//! tokens, and [`engine`] schedules many sequences into one running batch
//! over a [`compute`] backend: the CPU, or an NVIDIA GPU through [`cuda`]
//! (chosen by [`device`]).
//! Nothing here knows about HTTP.

pub mod chat;
pub mod compute;
pub mod cuda;
pub mod device;
pub mod engine;
pub mod gguf;
pub mod math;
pub mod model;
pub mod pool;
pub mod quant;
pub mod sampler;
pub mod tensor;
pub mod tokenizer;

#[cfg(test)]
mod test_support;

/// Opens a model file and checks everything the executor needs from it
/// (weights, vocabulary, chat template) without running it.
pub fn check_model(path: &std::path::Path) -> Result<(), engine::EngineError> {
    let file = gguf::GgufFile::open(path).map_err(model::ModelError::from)?;
    model::Model::load(&file)?;
    tokenizer::Tokenizer::from_gguf(&file)?;
    chat::ChatTemplate::from_gguf(&file)?;
    Ok(())
}
