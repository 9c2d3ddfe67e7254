#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]

//! Decode speed of the executor's forward pass, driven directly (no HTTP,
//! no scheduler), the way `tests/bench/llama_cpp_decode.py` drives
//! llama.cpp: B sequences prefilled with the same prompt, then N greedy
//! steps that decode one token for every sequence in one forward pass.
//!
//! Prints one JSON line per batch size. Arguments (all optional):
//! `--threads T --batch 1,8 --steps N --model PATH`.

mod common;

use std::time::Instant;

use common::{Args, PROMPT};

use switchyard_executor::gguf::GgufFile;
use switchyard_executor::model::{Model, Scratch, SeqCache};
use switchyard_executor::pool::ThreadPool;
use switchyard_executor::sampler::argmax;
use switchyard_executor::tokenizer::Tokenizer;

/// Measured runs per batch size, after one warm-up; the median is reported.
const RUNS: usize = 3;

fn main() {
    common::exit_on_error("decode bench", run());
}

fn run() -> Result<(), String> {
    let args = Args::from_env();
    let threads = args.number("--threads", 1);
    let steps = args.number("--steps", 128);
    let batches = args.batches("1,8");
    let model_path = args.model();

    let file = GgufFile::open(std::path::Path::new(&model_path)).map_err(|e| e.to_string())?;
    let model = Model::load(&file).map_err(|e| e.to_string())?;
    let tokenizer = Tokenizer::from_gguf(&file).map_err(|e| e.to_string())?;
    let prompt = tokenizer.encode(PROMPT, true);
    let pool = ThreadPool::new(threads).map_err(|e| e.to_string())?;
    let file_bytes = std::fs::metadata(&model_path)
        .map_err(|e| e.to_string())?
        .len();

    for &batch in &batches {
        let mut results = Vec::new();
        for _ in 0..=RUNS {
            results.push(decode_run(&model, &pool, &prompt, batch, steps)?);
        }
        // The first run warms caches and page-ins; the median of the rest
        // is reported.
        let mut measured = results.split_off(1);
        measured.sort_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s));
        let run = &measured[measured.len() / 2];
        let rss = resident_bytes();
        println!(
            "{{\"engine\":\"switchyard\",\"threads\":{threads},\"batch\":{batch},\
             \"prompt_tokens\":{},\"steps\":{steps},\"runs\":{RUNS},\
             \"decode_tokens_per_s\":{:.1},\"decode_tokens_per_cpu_s\":{:.1},\
             \"prefill_ms\":{:.1},\
             \"argmax_ms_excluded\":{:.1},\"rss_bytes\":{rss},\
             \"model_file_bytes\":{file_bytes},\"kv_cache_bytes\":{}}}",
            prompt.len(),
            run.tokens_per_s,
            if run.tokens_per_cpu_s.is_finite() {
                run.tokens_per_cpu_s
            } else {
                0.0
            },
            run.prefill_ms,
            run.argmax_ms,
            run.kv_bytes,
        );
    }
    Ok(())
}

struct RunResult {
    tokens_per_s: f64,
    prefill_ms: f64,
    argmax_ms: f64,
    kv_bytes: usize,

    /// Tokens per second of the calling thread's CPU time, 0 where the
    /// system does not say: on a shared machine, with one thread, a
    /// steadier figure than wall-clock time for comparing two builds.
    tokens_per_cpu_s: f64,
}

/// Prefills `batch` sequences with `prompt`, then decodes `steps` greedy
/// tokens for each.
fn decode_run(
    model: &Model,
    pool: &ThreadPool,
    prompt: &[u32],
    batch: usize,
    steps: usize,
) -> Result<RunResult, String> {
    let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new(model.shape())).collect();
    let mut scratch = Scratch::default();

    let started = Instant::now();
    let rows = common::prefill_rows(batch, prompt);
    let vocab = model.shape().vocab;
    let logits = model
        .forward(pool, &rows, &mut caches, &mut scratch)
        .map_err(|e| e.to_string())?;
    let mut next: Vec<u32> = logits.chunks_exact(vocab).map(argmax).collect();
    let prefill_ms = started.elapsed().as_secs_f64() * 1e3;

    // Greedy decode; argmax is timed separately and left out, as the
    // llama.cpp script leaves out its own.
    let mut forward_s = 0.0;
    let mut forward_cpu_s = 0.0;
    let mut argmax_s = 0.0;
    for _ in 0..steps {
        let rows = common::decode_rows(&next);
        let t = Instant::now();
        let cpu = thread_cpu_s();
        let logits = model
            .forward(pool, &rows, &mut caches, &mut scratch)
            .map_err(|e| e.to_string())?;
        forward_s += t.elapsed().as_secs_f64();
        forward_cpu_s += thread_cpu_s() - cpu;
        let t = Instant::now();
        for (token, row) in next.iter_mut().zip(logits.chunks_exact(vocab)) {
            *token = argmax(row);
        }
        argmax_s += t.elapsed().as_secs_f64();
    }
    Ok(RunResult {
        tokens_per_s: (batch * steps) as f64 / forward_s,
        tokens_per_cpu_s: (batch * steps) as f64 / forward_cpu_s,
        prefill_ms,
        argmax_ms: argmax_s * 1e3,
        kv_bytes: caches.iter().map(SeqCache::bytes).sum(),
    })
}

/// CPU time this thread has run, in seconds, from Linux's schedstat; 0
/// where there is none.
fn thread_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns: f64 = stat
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    ns * 1e-9
}

/// Resident set size from /proc, 0 where there is none.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
