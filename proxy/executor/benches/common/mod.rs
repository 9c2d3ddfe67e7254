//! What the executor's benchmarks share: the prompt, argument parsing and
//! the rows of a step.

use switchyard_executor::model::Row;

/// The same prompt as `tests/bench/llama_cpp_decode.py`'s default.
pub const PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, \
trained by Hugging Face<|im_end|>\n<|im_start|>user\nWrite a Python function that adds \
two numbers.<|im_end|>\n<|im_start|>assistant\n";

/// Runs a benchmark's `run`, exiting 1 with its error after `name`.
pub fn exit_on_error(name: &str, result: Result<(), String>) {
    if let Err(e) = result {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}

/// The command line, read as `--name value` pairs.
pub struct Args(Vec<String>);

impl Args {
    pub fn from_env() -> Args {
        Args(std::env::args().collect())
    }

    /// The value after `--name`.
    pub fn get(&self, name: &str) -> Option<String> {
        let at = self.0.iter().position(|a| a == name)?;
        self.0.get(at + 1).cloned()
    }

    /// `--name`'s number, or `default`.
    pub fn number(&self, name: &str, default: usize) -> usize {
        self.get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// `--batch`'s comma-separated sizes, or `default`'s.
    pub fn batches(&self, default: &str) -> Vec<usize> {
        self.get("--batch")
            .unwrap_or_else(|| default.to_string())
            .split(',')
            .filter_map(|b| b.parse().ok())
            .collect()
    }

    /// `--model`, or the project's model file.
    pub fn model(&self) -> String {
        self.get("--model").unwrap_or_else(|| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf"
            )
            .to_string()
        })
    }
}

/// `batch` sequences each prefilled with `prompt`, logits at each one's
/// last token.
pub fn prefill_rows(batch: usize, prompt: &[u32]) -> Vec<Row> {
    (0..batch)
        .flat_map(|seq| {
            prompt.iter().enumerate().map(move |(i, &token)| Row {
                seq,
                token,
                logits: i + 1 == prompt.len(),
            })
        })
        .collect()
}

/// One decode step: sequence i takes `next[i]`, logits wanted.
pub fn decode_rows(next: &[u32]) -> Vec<Row> {
    next.iter()
        .enumerate()
        .map(|(seq, &token)| Row {
            seq,
            token,
            logits: true,
        })
        .collect()
}
