//! What the executor's benchmarks share: the prompt and argument parsing.

/// The same prompt as `tests/bench/llama_cpp_decode.py`'s default.
pub const PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, \
trained by Hugging Face<|im_end|>\n<|im_start|>user\nWrite a Python function that adds \
two numbers.<|im_end|>\n<|im_start|>assistant\n";

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
