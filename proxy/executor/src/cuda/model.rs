//! The llama forward pass on a GPU: the same arithmetic as
//! [`crate::model`], with weights dequantized to f32 on the device once,
//! a KV cache preallocated for `max_batch` sequences of `context`
//! positions, cuBLAS for the matrix products and [`super::SOURCE`]'s
//! kernels for the rest.
//!
//! Per layer: norm, one product for q, k and v together (their weights
//! stacked), rotary and cache store, attention, the output product added
//! into the residual stream (cuBLAS's beta = 1), norm, one product for
//! gate and up, SwiGLU, the down product added into the residual. The
//! logits of a greedy row stay on the device: only its best token and
//! log-softmax normaliser come back.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::Gpu;
use crate::compute::{Need, Next, StepLogits};
use crate::gguf::GgufFile;
use crate::model::{self, ModelError, ModelShape, Row};
use crate::tensor::GgmlType;

const F32: usize = std::mem::size_of::<f32>();
/// Device memory kept free beyond what the model counts, at least: 256 MiB
/// or a twentieth of what is free, whichever is more.
const HEADROOM_MIN: usize = 256 << 20;

#[derive(Debug)]
struct Layer {
    attn_norm: CudaSlice<f32>,
    /// wq, wk and wv stacked: (d + 2 kv) rows of d.
    qkv: CudaSlice<f32>,
    wo: CudaSlice<f32>,
    ffn_norm: CudaSlice<f32>,
    /// gate and up stacked: 2 ff rows of d.
    gate_up: CudaSlice<f32>,
    down: CudaSlice<f32>,
}

/// Device buffers for one step of at most `rows` rows; logits are made
/// `logit_rows` rows at a time.
#[derive(Debug)]
struct Buffers {
    rows: usize,
    logit_rows: usize,
    x: CudaSlice<f32>,
    xn: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    att: CudaSlice<f32>,
    gate_up: CudaSlice<f32>,
    h: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    summary: CudaSlice<f32>,
    /// The step's row data in one buffer, so that one copy brings it:
    /// tokens, positions and cache slots, `rows` each, then the indices
    /// of the rows that want logits (up to `rows`).
    meta: CudaSlice<i32>,
    rot: CudaSlice<f32>,
}

/// A sequence in the running batch: its cache slot and positions held.
#[derive(Clone, Copy, Debug)]
struct Sequence {
    slot: usize,
    len: usize,
}

/// The model on a GPU, with the running sequences' caches.
#[derive(Debug)]
pub struct CudaModel {
    gpu: Gpu,
    shape: ModelShape,
    embed: CudaSlice<f32>,
    /// The output projection; `None` when the file ties it to `embed`.
    output: Option<CudaSlice<f32>>,
    output_norm: CudaSlice<f32>,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
    context: usize,
    k_cache: CudaSlice<f32>,
    v_cache: CudaSlice<f32>,
    running: Vec<Sequence>,
    free: Vec<usize>,
    buffers: Buffers,
}

/// Sizes of what [`CudaModel::load`] puts on the device, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceBytes {
    pub weights: usize,
    pub kv_cache: usize,
    pub buffers: usize,
}

impl DeviceBytes {
    pub fn total(&self) -> usize {
        self.weights + self.kv_cache + self.buffers
    }
}

/// What the model needs on the device for `max_batch` sequences of
/// `context` positions and steps of up to `rows` rows.
pub fn device_bytes(
    shape: &ModelShape,
    tied: bool,
    max_batch: usize,
    context: usize,
    rows: usize,
) -> DeviceBytes {
    let (d, kv, ff, v) = (shape.n_embd, shape.kv_dim(), shape.n_ff, shape.vocab);
    let per_layer = (d + 2 * kv) * d + d * d + 3 * ff * d + 2 * d;
    let output = if tied { 0 } else { v * d };
    let weights = (v * d + output + d + shape.n_layer * per_layer) * F32;
    let kv_cache = 2 * max_batch * shape.n_layer * kv * context * F32;
    let per_row = 3 * d + (d + 2 * kv) + 3 * ff + 4 + shape.head_dim;
    let buffers = (rows * per_row + max_batch * (v + 3)) * F32;
    DeviceBytes {
        weights,
        kv_cache,
        buffers,
    }
}

fn gpu_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> ModelError + '_ {
    move |e| ModelError::Gpu(format!("{what}: {e}"))
}

impl CudaModel {
    /// Puts the model's weights on `gpu` and allocates the caches for
    /// `max_batch` sequences of `context` positions and steps of up to
    /// `max_rows` rows. Fails, saying how much was needed, when the device
    /// has too little free memory.
    pub fn load(
        gpu: Gpu,
        file: &GgufFile,
        max_batch: usize,
        context: usize,
        max_rows: usize,
    ) -> Result<CudaModel, ModelError> {
        let arch = file.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Architecture(arch.to_string()));
        }
        let shape = model::read_shape(file)?;
        if shape.vocab >= 1 << 24 {
            return Err(ModelError::Shape(format!(
                "vocabulary of {} tokens: the GPU path returns token ids as \
                 floats, exact below 2^24",
                shape.vocab
            )));
        }
        let tied = file.tensor_info("output.weight").is_none();
        let need = device_bytes(&shape, tied, max_batch, context, max_rows);
        // Room beyond what is counted: cuBLAS's workspace, the quantized
        // weights on their way in, the allocator's rounding.
        let headroom = (gpu.free_memory / 20).max(HEADROOM_MIN);
        if need.total() + headroom > gpu.free_memory {
            return Err(ModelError::Gpu(format!(
                "out of device memory: the model needs {} MiB of weights, \
                 {} MiB of KV cache (max_batch {max_batch} x context {context}) \
                 and {} MiB of buffers, {} MiB in all with {} MiB to spare, and {} \
                 has {} MiB free; lower max_batch or context",
                need.weights >> 20,
                need.kv_cache >> 20,
                need.buffers >> 20,
                need.total() >> 20,
                headroom >> 20,
                gpu.name,
                gpu.free_memory >> 20
            )));
        }

        let (d, kv, ff) = (shape.n_embd, shape.kv_dim(), shape.n_ff);
        let embed = upload_matrices(&gpu, file, &[("token_embd.weight", shape.vocab)], d)?;
        let output = match tied {
            true => None,
            false => Some(upload_matrices(
                &gpu,
                file,
                &[("output.weight", shape.vocab)],
                d,
            )?),
        };
        let output_norm = upload_norm(&gpu, file, "output_norm.weight", d)?;
        let mut layers = Vec::with_capacity(shape.n_layer);
        for i in 0..shape.n_layer {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            let (q, k, v) = (name("attn_q"), name("attn_k"), name("attn_v"));
            let (gate, up) = (name("ffn_gate"), name("ffn_up"));
            layers.push(Layer {
                attn_norm: upload_norm(&gpu, file, &name("attn_norm"), d)?,
                qkv: upload_matrices(&gpu, file, &[(&q, d), (&k, kv), (&v, kv)], d)?,
                wo: upload_matrices(&gpu, file, &[(&name("attn_output"), d)], d)?,
                ffn_norm: upload_norm(&gpu, file, &name("ffn_norm"), d)?,
                gate_up: upload_matrices(&gpu, file, &[(&gate, ff), (&up, ff)], d)?,
                down: upload_matrices(&gpu, file, &[(&name("ffn_down"), d)], ff)?,
            });
        }

        let s = &gpu.stream;
        let cache_len = max_batch * shape.n_layer * kv * context;
        let alloc = |n: usize, what: &str| s.alloc_zeros::<f32>(n).map_err(gpu_err(what));
        let k_cache = alloc(cache_len, "allocating the key cache")?;
        let v_cache = alloc(cache_len, "allocating the value cache")?;
        let logit_rows = max_batch.max(1);
        let ints = |n: usize| {
            s.alloc_zeros::<i32>(n)
                .map_err(gpu_err("allocating buffers"))
        };
        let buffers = Buffers {
            rows: max_rows,
            logit_rows,
            x: alloc(max_rows * d, "allocating buffers")?,
            xn: alloc(max_rows * d, "allocating buffers")?,
            qkv: alloc(max_rows * (d + 2 * kv), "allocating buffers")?,
            att: alloc(max_rows * d, "allocating buffers")?,
            gate_up: alloc(max_rows * 2 * ff, "allocating buffers")?,
            h: alloc(max_rows * ff, "allocating buffers")?,
            logits: alloc(logit_rows * shape.vocab, "allocating buffers")?,
            summary: alloc(logit_rows * 3, "allocating buffers")?,
            meta: ints(4 * max_rows)?,
            rot: alloc(max_rows * shape.head_dim, "allocating buffers")?,
        };
        let attention_shared = attention_shared_bytes(&shape, context);
        if attention_shared > 48 * 1024 {
            let attribute = cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            gpu.kernels
                .attention
                .set_attribute(attribute, attention_shared as i32)
                .map_err(|e| {
                    ModelError::Gpu(format!(
                        "attention over a context of {context} needs {attention_shared} \
                         bytes of shared memory per block, more than {} allows: {e}; \
                         lower context",
                        gpu.name
                    ))
                })?;
        }
        s.synchronize().map_err(gpu_err("loading the weights"))?;

        let inv_freq = model::rotary_frequencies(&shape);
        Ok(CudaModel {
            gpu,
            shape,
            embed,
            output,
            output_norm,
            layers,
            inv_freq,
            context,
            k_cache,
            v_cache,
            running: Vec::new(),
            free: (0..max_batch).rev().collect(),
            buffers,
        })
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn add_sequence(&mut self) -> Result<(), ModelError> {
        let Some(slot) = self.free.pop() else {
            return Err(ModelError::Gpu(
                "every KV cache slot is taken; the running batch is over max_batch".to_string(),
            ));
        };
        self.running.push(Sequence { slot, len: 0 });
        Ok(())
    }

    pub fn remove_sequence(&mut self, i: usize) {
        if i < self.running.len() {
            let seq = self.running.swap_remove(i);
            self.free.push(seq.slot);
        }
    }

    pub fn clear(&mut self) {
        let slots = self.running.drain(..).map(|s| s.slot);
        self.free.extend(slots);
    }

    /// Runs `rows` as [`crate::model::Model::forward`] does; a row whose
    /// sequence `need`s only [`Need::Best`] brings back its best token
    /// rather than its logits.
    pub fn forward(
        &mut self,
        rows: &[Row],
        need: impl Fn(usize) -> Need,
    ) -> Result<StepLogits, ModelError> {
        let sh = self.shape.clone();
        let (n, d, kv, ff) = (rows.len(), sh.n_embd, sh.kv_dim(), sh.n_ff);
        if n == 0 {
            return Ok(StepLogits::with_vocab(sh.vocab));
        }
        if n > self.buffers.rows {
            return Err(ModelError::Gpu(format!(
                "{n} rows in one step, more than the {} the buffers hold",
                self.buffers.rows
            )));
        }

        // The step's rows on the host: tokens, positions, cache slots and
        // rotary angles (computed as the CPU path does, so both rotate by
        // the same numbers), and which rows want logits.
        let mut next: Vec<usize> = self.running.iter().map(|s| s.len).collect();
        let r = self.buffers.rows;
        let mut meta = vec![0i32; 3 * r];
        let mut rot = Vec::with_capacity(n * sh.head_dim);
        let mut wanted = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let Some(seq) = self.running.get(row.seq) else {
                return Err(ModelError::Gpu(format!("row {i} names no sequence")));
            };
            let p = next[row.seq];
            if p >= self.context {
                return Err(ModelError::Gpu(format!(
                    "position {p} is past the cache's context of {}",
                    self.context
                )));
            }
            next[row.seq] += 1;
            meta[i] = row.token as i32;
            meta[r + i] = p as i32;
            meta[2 * r + i] = seq.slot as i32;
            for &f in &self.inv_freq {
                let (sin, cos) = (p as f32 * f).sin_cos();
                rot.extend([sin, cos]);
            }
            if row.logits {
                wanted.push(i as i32);
            }
        }

        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(gpu_err("binding the context"))?;
        let gpu = &self.gpu;
        let s = &gpu.stream;
        let k = &gpu.kernels;
        let b = &mut self.buffers;
        let upload = gpu_err("copying the step's rows to the device");
        meta.extend(&wanted);
        s.memcpy_htod(&meta, &mut b.meta.slice_mut(..meta.len()))
            .map_err(&upload)?;
        s.memcpy_htod(&rot, &mut b.rot.slice_mut(..rot.len()))
            .map_err(&upload)?;
        let tokens = b.meta.slice(..r);
        let pos = b.meta.slice(r..2 * r);
        let slot = b.meta.slice(2 * r..3 * r);

        let launch_err = gpu_err("launching a kernel");
        let (d_i, vocab_i) = (d as i32, sh.vocab as i32);
        let rows_cfg = |threads: u32| LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let mut l = s.launch_builder(&k.embed);
            l.arg(&self.embed).arg(&tokens).arg(&mut b.x);
            l.arg(&d_i).arg(&vocab_i);
            // SAFETY: tokens holds n ids (clamped to the table in the
            // kernel); x holds n rows of d.
            #[allow(unsafe_code)]
            unsafe { l.launch(rows_cfg(256)) }.map_err(&launch_err)?;
        }

        let (n_head, n_head_kv) = (sh.n_head as i32, sh.n_head_kv as i32);
        let (head_dim, n_layer, context) =
            (sh.head_dim as i32, sh.n_layer as i32, self.context as i32);
        let eps = sh.rms_eps;
        let scale = 1.0 / (sh.head_dim as f32).sqrt();
        for (layer, w) in self.layers.iter().enumerate() {
            let layer_i = layer as i32;
            norm_rows(gpu, &b.x, None, &w.attn_norm, &mut b.xn, n, d, eps)?;
            matmul(
                gpu,
                &w.qkv,
                d + 2 * kv,
                d,
                &b.xn.slice(..n * d),
                n,
                &mut b.qkv.slice_mut(..),
                false,
            )?;
            {
                let mut l = s.launch_builder(&k.rope_store);
                l.arg(&mut b.qkv).arg(&b.rot).arg(&pos).arg(&slot);
                l.arg(&mut self.k_cache).arg(&mut self.v_cache);
                l.arg(&n_head).arg(&n_head_kv).arg(&head_dim);
                l.arg(&n_layer).arg(&layer_i).arg(&context);
                // SAFETY: n rows of qkv, rot, pos and slot; positions are
                // below context and slots below max_batch (checked above),
                // so every cache write is inside the cache.
                #[allow(unsafe_code)]
                unsafe { l.launch(rows_cfg(128)) }.map_err(&launch_err)?;
            }
            {
                let mut l = s.launch_builder(&k.attention);
                l.arg(&b.qkv).arg(&self.k_cache).arg(&self.v_cache);
                l.arg(&pos).arg(&slot).arg(&mut b.att);
                l.arg(&n_head).arg(&n_head_kv).arg(&head_dim);
                l.arg(&n_layer).arg(&layer_i).arg(&context).arg(&scale);
                let cfg = LaunchConfig {
                    grid_dim: (n as u32, sh.n_head as u32, 1),
                    block_dim: (ATTENTION_THREADS, 1, 1),
                    shared_mem_bytes: attention_shared_bytes(&sh, self.context) as u32,
                };
                // SAFETY: as for rope_store; reads positions 0..=pos of
                // the row's slot, all written by now.
                #[allow(unsafe_code)]
                unsafe { l.launch(cfg) }.map_err(&launch_err)?;
            }
            matmul(
                gpu,
                &w.wo,
                d,
                d,
                &b.att.slice(..n * d),
                n,
                &mut b.x.slice_mut(..),
                true,
            )?;
            norm_rows(gpu, &b.x, None, &w.ffn_norm, &mut b.xn, n, d, eps)?;
            matmul(
                gpu,
                &w.gate_up,
                2 * ff,
                d,
                &b.xn.slice(..n * d),
                n,
                &mut b.gate_up.slice_mut(..),
                false,
            )?;
            {
                let (n_i, ff_i) = (n as i32, ff as i32);
                let mut l = s.launch_builder(&k.silu_mul);
                l.arg(&b.gate_up).arg(&mut b.h).arg(&n_i).arg(&ff_i);
                // SAFETY: n rows of 2 ff in, n rows of ff out.
                #[allow(unsafe_code)]
                unsafe { l.launch(Gpu::elements(n * ff)) }.map_err(&launch_err)?;
            }
            matmul(
                gpu,
                &w.down,
                d,
                ff,
                &b.h.slice(..n * ff),
                n,
                &mut b.x.slice_mut(..),
                true,
            )?;
        }
        for seq in self.running.iter_mut().zip(next) {
            seq.0.len = seq.1;
        }
        if wanted.is_empty() {
            s.synchronize().map_err(gpu_err("running the step"))?;
            return Ok(StepLogits::with_vocab(sh.vocab));
        }

        // The wanted rows' norms, their logits and each one's summary,
        // `logit_rows` (max_batch) rows at a time: the engine asks for at
        // most one row a sequence, but a prefill that wants every
        // position's logits (the start-up check, the tests) takes several.
        let download = gpu_err("copying logits from the device");
        let output = self.output.as_ref().unwrap_or(&self.embed);
        let mut out = StepLogits::with_vocab(sh.vocab);
        let mut row = vec![0.0f32; sh.vocab];
        let mut summary = vec![0.0f32; b.logit_rows * 3];
        for (c, piece) in wanted.chunks(b.logit_rows).enumerate() {
            let (len, at) = (piece.len(), 3 * r + c * b.logit_rows);
            let picked = b.meta.slice(at..at + len);
            norm_rows(
                gpu,
                &b.x,
                Some(&picked),
                &self.output_norm,
                &mut b.xn,
                len,
                d,
                eps,
            )?;
            matmul(
                gpu,
                output,
                sh.vocab,
                d,
                &b.xn.slice(..len * d),
                len,
                &mut b.logits.slice_mut(..),
                false,
            )?;
            {
                let mut l = s.launch_builder(&k.logit_summary);
                l.arg(&b.logits).arg(&mut b.summary).arg(&vocab_i);
                let cfg = LaunchConfig {
                    grid_dim: (len as u32, 1, 1),
                    block_dim: (1024, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: len rows of vocab logits in, len rows of 3 out.
                #[allow(unsafe_code)]
                unsafe { l.launch(cfg) }.map_err(&launch_err)?;
            }
            s.memcpy_dtoh(&b.summary.slice(..len * 3), &mut summary[..len * 3])
                .map_err(&download)?;
            for (j, &i) in piece.iter().enumerate() {
                match need(rows[i as usize].seq) {
                    Need::Best => {
                        let [token, logit, lse] =
                            [summary[3 * j], summary[3 * j + 1], summary[3 * j + 2]];
                        out.push_best(token as u32, logit, lse);
                    }
                    Need::Full => {
                        let from = j * sh.vocab;
                        s.memcpy_dtoh(&b.logits.slice(from..from + sh.vocab), &mut row)
                            .map_err(&download)?;
                        out.push_full(&row);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Threads per attention block.
const ATTENTION_THREADS: u32 = 128;

/// Dynamic shared memory of one attention block: the query head, a score
/// per position, and the reduction's scratch.
fn attention_shared_bytes(shape: &ModelShape, context: usize) -> usize {
    (shape.head_dim + context + ATTENTION_THREADS as usize) * F32
}

/// `y (n x out_rows) = x (n x cols) . w^T`, or `y += ...` when
/// `accumulate`; `w` is `out_rows` rows of `cols`, row-major, as GGUF
/// stores weights. In cuBLAS's column-major terms: y = w^T x with w read
/// as a cols x out_rows matrix.
#[allow(clippy::too_many_arguments, reason = "one product's shapes")]
fn matmul(
    gpu: &Gpu,
    w: &CudaSlice<f32>,
    out_rows: usize,
    cols: usize,
    x: &CudaView<'_, f32>,
    n: usize,
    y: &mut CudaViewMut<'_, f32>,
    accumulate: bool,
) -> Result<(), ModelError> {
    if w.len() < out_rows * cols || x.len() < n * cols || y.len() < n * out_rows {
        return Err(ModelError::Gpu(format!(
            "matrix product of {out_rows}x{cols} by {n} rows does not fit its buffers"
        )));
    }
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: out_rows as i32,
        n: n as i32,
        k: cols as i32,
        alpha: 1.0f32,
        lda: cols as i32,
        ldb: cols as i32,
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: out_rows as i32,
    };
    // SAFETY: the three buffers are at least as long as the shapes read
    // and written (checked above).
    #[allow(unsafe_code)]
    unsafe { gpu.blas.gemm(cfg, &w.as_view(), x, y) }
        .map_err(|e| ModelError::Gpu(format!("cuBLAS product {out_rows}x{cols}: {e}")))
}

/// `out[i] = rms_norm(x[rows[i]]) * w` for i below n, or of x[i] without
/// `rows`.
#[allow(clippy::too_many_arguments, reason = "one kernel's arguments")]
fn norm_rows(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    rows: Option<&CudaView<'_, i32>>,
    w: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    n: usize,
    d: usize,
    eps: f32,
) -> Result<(), ModelError> {
    let d_i = d as i32;
    let s = &gpu.stream;
    let mut l = s.launch_builder(&gpu.kernels.rms_norm);
    l.arg(x);
    // The kernel reads x[i] itself when the index list is a null pointer.
    let none = 0u64;
    match rows {
        Some(rows) => l.arg(rows),
        None => l.arg(&none),
    };
    l.arg(w).arg(out).arg(&d_i).arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x, out hold at least n rows of d (the step's buffers); the
    // index list holds n rows of x.
    #[allow(unsafe_code)]
    unsafe { l.launch(cfg) }
        .map(|_| ())
        .map_err(gpu_err("launching rms_norm"))
}

/// A norm weight vector on the device.
fn upload_norm(
    gpu: &Gpu,
    file: &GgufFile,
    name: &str,
    len: usize,
) -> Result<CudaSlice<f32>, ModelError> {
    let v = model::norm(file, name, len)?;
    gpu.stream
        .clone_htod(&v)
        .map_err(gpu_err("copying weights to the device"))
}

/// The matrices `parts` (name, rows), each `cols` wide, stacked in order
/// and dequantized to f32 on the device.
fn upload_matrices(
    gpu: &Gpu,
    file: &GgufFile,
    parts: &[(&str, usize)],
    cols: usize,
) -> Result<CudaSlice<f32>, ModelError> {
    let s = &gpu.stream;
    let total: usize = parts.iter().map(|p| p.1).sum();
    let mut out = s
        .alloc_zeros::<f32>(total * cols)
        .map_err(gpu_err("allocating weights"))?;
    let mut at = 0;
    for &(name, rows) in parts {
        let matrix = file.matrix(name)?;
        model::expect_shape(&matrix, name, rows, cols)?;
        let bytes = matrix.bytes.as_slice();
        let mut dst = out.slice_mut(at..at + rows * cols);
        dequantize_into(gpu, matrix.ty, bytes, rows * cols, &mut dst)
            .map_err(|e| ModelError::Gpu(format!("{name}: {e}")))?;
        matrix.bytes.release_pages();
        at += rows * cols;
    }
    Ok(out)
}

/// Dequantizes `elements` elements of type `ty` from host `bytes` into
/// `dst` on the device.
pub(crate) fn dequantize_into(
    gpu: &Gpu,
    ty: GgmlType,
    bytes: &[u8],
    elements: usize,
    dst: &mut CudaViewMut<'_, f32>,
) -> Result<(), String> {
    let s = &gpu.stream;
    let expected = ty
        .row_bytes(elements)
        .ok_or_else(|| format!("{elements} elements are not whole {ty} blocks"))?;
    if bytes.len() != expected || dst.len() < elements {
        return Err(format!(
            "{} bytes of {ty} for {elements} elements, expected {expected}",
            bytes.len()
        ));
    }
    if ty == GgmlType::F32 {
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        return s
            .memcpy_htod(&floats, &mut dst.slice_mut(..elements))
            .map_err(|e| e.to_string());
    }
    let src = s.clone_htod(bytes).map_err(|e| e.to_string())?;
    let k = &gpu.kernels;
    // One thread per block of 32, or per element for F16.
    let kernel = match ty {
        GgmlType::Q4_0 => &k.dequant_q4_0,
        GgmlType::Q4_1 => &k.dequant_q4_1,
        GgmlType::Q8_0 => &k.dequant_q8_0,
        GgmlType::F16 | GgmlType::F32 => &k.dequant_f16,
    };
    let items = elements / ty.block_len();
    let count = items as i64;
    let mut l = s.launch_builder(kernel);
    l.arg(&src).arg(dst).arg(&count);
    // SAFETY: `src` holds `items` whole blocks (checked above) and `dst`
    // the elements they decode to.
    #[allow(unsafe_code)]
    unsafe { l.launch(Gpu::elements(items)) }.map_err(|e| e.to_string())?;
    // `src` is freed on return: let the kernel finish reading it first.
    s.synchronize().map_err(|e| e.to_string())
}

/// Tokens of the start-up check: spread over the vocabulary, so that
/// different embeddings and positions take part.
const CHECK_TOKENS: usize = 12;

impl CudaModel {
    /// Runs a short prompt through this model and through `cpu` and
    /// compares their logits at the tolerances the reference vectors hold
    /// the executor to: a device or a kernel that computes something else
    /// is refused at start-up rather than serving wrong answers.
    pub fn check_against(
        &mut self,
        cpu: &crate::model::Model,
        pool: &crate::pool::ThreadPool,
    ) -> Result<(), ModelError> {
        let vocab = self.shape.vocab;
        let tokens = CHECK_TOKENS.min(self.context).min(self.buffers.rows);
        let rows: Vec<Row> = (0..tokens)
            .map(|i| Row {
                seq: 0,
                token: ((i * 7919 + 1) % vocab) as u32,
                logits: true,
            })
            .collect();
        let mut caches = vec![crate::model::SeqCache::new(cpu.shape())];
        let want = cpu.forward(
            pool,
            &rows,
            &mut caches,
            &mut crate::model::Scratch::default(),
        )?;

        if !self.running.is_empty() {
            return Err(ModelError::Gpu("the check needs an idle model".to_string()));
        }
        // Whole logits (temperature sampling, alternatives), then the
        // summary greedy rows bring back instead.
        for need in [Need::Full, Need::Best] {
            self.add_sequence()?;
            let got = self.forward(&rows, |_| need);
            self.clear();
            let got = got?;
            for (pos, want) in want.chunks_exact(vocab).enumerate() {
                let agreed = match got.get(pos) {
                    Some(Next::Logits(got)) => logits_agree(want, got),
                    Some(Next::Best { token, logit, lse }) => best_agrees(want, token, logit - lse),
                    None => Err("no logits".to_string()),
                };
                agreed.map_err(|e| {
                    ModelError::Gpu(format!(
                        "the GPU's answer differs from the CPU's at position {pos} \
                         of the start-up check ({need:?}): {e}"
                    ))
                })?;
            }
        }
        Ok(())
    }
}

/// The best token of `logits` and how far it leads the runner-up.
fn best_and_margin(logits: &[f32]) -> (usize, f32) {
    let best = crate::sampler::argmax(logits) as usize;
    let runner_up = logits
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != best)
        .map(|(_, &v)| v)
        .fold(f32::NEG_INFINITY, f32::max);
    (best, logits[best] - runner_up)
}

/// Whether the GPU's greedy pick `token`, with log-probability
/// `logprob`, agrees with `want` (the CPU's logits) as [`logits_agree`]
/// asks of whole rows.
pub(crate) fn best_agrees(want: &[f32], token: u32, logprob: f32) -> Result<(), String> {
    use crate::sampler::log_sum_exp;
    let Some(&logit) = want.get(token as usize) else {
        return Err(format!("token {token} is past the vocabulary"));
    };
    let (best, margin) = best_and_margin(want);
    if margin >= 1.0 && token as usize != best {
        return Err(format!("best token {token}, expected {best}"));
    }
    let diff = logit - log_sum_exp(want) - logprob;
    if !diff.is_finite() || diff.abs() > 0.5 {
        return Err(format!("token {token}'s log-probability is off by {diff}"));
    }
    Ok(())
}

/// Whether `got` is `want` (one row of logits) within the reference
/// tolerances: the same best token where the best leads the runner-up by
/// at least 1, and the best token's log-probability within 0.5.
pub(crate) fn logits_agree(want: &[f32], got: &[f32]) -> Result<(), String> {
    use crate::sampler::{argmax, log_sum_exp};
    if want.len() != got.len() || got.iter().any(|v| !v.is_finite()) {
        return Err("logits of the wrong length or not finite".to_string());
    }
    let (best, margin) = best_and_margin(want);
    let got_best = argmax(got) as usize;
    if margin >= 1.0 && got_best != best {
        return Err(format!("best token {got_best}, expected {best}"));
    }
    let diff = (want[best] - log_sum_exp(want)) - (got[best] - log_sum_exp(got));
    if diff.abs() > 0.5 {
        return Err(format!("token {best}'s log-probability is off by {diff}"));
    }
    Ok(())
}
