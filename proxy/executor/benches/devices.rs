#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]

//! Decode speed on the GPU and on the CPU in one run, through the same
//! compute backends the engine uses: B sequences prefilled with the same
//! prompt, then greedy steps that decode one token for every sequence in
//! one forward pass (the best token picked on the device for the GPU, from
//! the logits on the host for the CPU).
//!
//! Prints a table: tokens per second for each device and batch size, and
//! the GPU's over the CPU's. Arguments (all optional): `--batch 1,8,32,128
//! --steps N --cpu-steps N --threads T --model PATH`. Without a usable GPU
//! it says why and measures the CPU alone.

mod common;

use std::time::Instant;

use common::{Args, PROMPT};

use switchyard_executor::compute::{Compute, Need, Next};
use switchyard_executor::cuda::model::CudaModel;
use switchyard_executor::cuda::Gpu;
use switchyard_executor::gguf::GgufFile;
use switchyard_executor::model::{Model, Row};
use switchyard_executor::pool::ThreadPool;
use switchyard_executor::sampler::argmax;
use switchyard_executor::tokenizer::Tokenizer;

fn main() {
    common::exit_on_error("devices bench", run());
}

fn run() -> Result<(), String> {
    let args = Args::from_env();
    let steps = args.number("--steps", 128);
    let cpu_steps = args.number("--cpu-steps", 16);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = args.number("--threads", cores);
    let batches = args.batches("1,8,32,128");
    let path = args.model();
    let file = GgufFile::open(std::path::Path::new(&path)).map_err(|e| e.to_string())?;
    let tokenizer = Tokenizer::from_gguf(&file).map_err(|e| e.to_string())?;
    let prompt = tokenizer.encode(PROMPT, true);
    let most = batches.iter().copied().max().unwrap_or(1);
    let context = prompt.len() + steps.max(cpu_steps) + 1;

    let mut gpu = match Gpu::open(0) {
        Ok(gpu) => {
            let name = gpu.name.clone();
            let rows = most * prompt.len();
            let model =
                CudaModel::load(gpu, &file, most, context, rows).map_err(|e| e.to_string())?;
            println!("GPU: {name}");
            Some(Compute::Gpu(Box::new(model)))
        }
        Err(why) => {
            println!("no usable GPU ({why}); measuring the CPU alone");
            None
        }
    };
    let model = Model::load(&file).map_err(|e| e.to_string())?;
    let pool = ThreadPool::new(threads).map_err(|e| e.to_string())?;
    let mut cpu = Compute::cpu(model, pool);
    println!("CPU: {threads} threads; prompt {} tokens", prompt.len());

    println!("| batch | GPU tokens/s | CPU tokens/s | GPU / CPU |");
    println!("|---|---|---|---|");
    for &batch in &batches {
        let on_gpu = match gpu.as_mut() {
            Some(gpu) => Some(decode(gpu, &prompt, batch, steps)?),
            None => None,
        };
        let on_cpu = decode(&mut cpu, &prompt, batch, cpu_steps)?;
        let shown = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let ratio = on_gpu.map_or("-".to_string(), |g| format!("{:.1}x", g / on_cpu));
        println!("| {batch} | {} | {on_cpu:.0} | {ratio} |", shown(on_gpu));
    }
    Ok(())
}

/// Tokens per second of `steps` greedy decode steps over `batch`
/// sequences prefilled with `prompt` (the prefill is not timed).
fn decode(
    compute: &mut Compute,
    prompt: &[u32],
    batch: usize,
    steps: usize,
) -> Result<f64, String> {
    compute.clear();
    for _ in 0..batch {
        compute.add_sequence().map_err(|e| e.to_string())?;
    }
    let rows = common::prefill_rows(batch, prompt);
    let mut next = pick(compute, &rows)?;
    let started = Instant::now();
    for _ in 0..steps {
        let rows = common::decode_rows(&next);
        next = pick(compute, &rows)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    compute.clear();
    Ok((batch * steps) as f64 / seconds)
}

/// One forward pass and each logits row's best token.
fn pick(compute: &mut Compute, rows: &[Row]) -> Result<Vec<u32>, String> {
    let step = compute
        .forward(rows, |_| Need::Best)
        .map_err(|e| e.to_string())?;
    (0..step.len())
        .map(|i| match step.get(i) {
            Some(Next::Best { token, .. }) => Ok(token),
            Some(Next::Logits(logits)) => Ok(argmax(logits)),
            None => Err(format!("no logits for row {i}")),
        })
        .collect()
}
