//! The llama-architecture forward pass: token ids in, logits out, over a KV
//! cache per sequence.
//!
//! One call runs a batch of rows, each a token of some sequence; rows of the
//! same sequence are consecutive positions (a prefill chunk), rows of
//! different sequences share every matrix product (continuous batching).
//! Scheduling lives in [`crate::engine`]; this module owns no queue.

use std::sync::Mutex;

use crate::gguf::{GgufError, GgufFile};
use crate::math;
use crate::pool::ThreadPool;
use crate::quant::{dequantize_matrix_row, interleave, matmul, KernelError};
use crate::tensor::QMatrix;

/// Shape and constants of a model, read from its GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Longest sequence the model was trained for, in tokens.
    pub context_length: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
}

impl ModelShape {
    /// Width of one position's keys (or values) across all KV heads.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

/// Why a model file cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    File(#[from] GgufError),
    #[error("architecture {0:?} is not supported; this executor runs \"llama\"")]
    Architecture(String),
    #[error("model metadata is inconsistent: {0}")]
    Shape(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("GPU: {0}")]
    Gpu(String),
}

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
}

/// A loaded model: weights stay in the memory-mapped file.
#[derive(Debug)]
pub struct Model {
    shape: ModelShape,
    tok_embd: QMatrix,
    output_norm: Vec<f32>,
    /// The output projection; `token_embd.weight` when the file ties them.
    output: QMatrix,
    layers: Vec<Layer>,
    /// Rotary frequencies, one per pair of a head's dimensions.
    inv_freq: Vec<f32>,
}

/// The keys and values a sequence has accumulated, `len` positions long:
/// one buffer per layer and KV head (layer l, head g at `l * n_head_kv +
/// g`), position after position. Attention reads one head's buffer from
/// start to end; with the heads of a position side by side it would read a
/// third of every stretch, which memory serves several times slower.
#[derive(Debug, Default)]
pub struct SeqCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl SeqCache {
    pub fn new(shape: &ModelShape) -> SeqCache {
        let buffers = shape.n_layer * shape.n_head_kv;
        SeqCache {
            k: vec![Vec::new(); buffers],
            v: vec![Vec::new(); buffers],
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cache's buffers.
    pub fn bytes(&self) -> usize {
        let floats: usize = self.k.iter().chain(&self.v).map(Vec::capacity).sum();
        floats * std::mem::size_of::<f32>()
    }
}

/// One token to run: which sequence (an index into the caches passed to
/// [`Model::forward`]), the token, and whether its logits are wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub seq: usize,
    pub token: u32,
    pub logits: bool,
}

/// Buffers reused from one forward pass to the next.
#[derive(Debug, Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    pos: Vec<usize>,
    /// Each row's rotary (sin, cos) pairs, the same for every head and
    /// layer, so computed once per pass.
    rotary: Vec<(f32, f32)>,
}

impl Model {
    /// Reads the shape and finds every weight; checks that each matrix has
    /// the shape the metadata implies.
    pub fn load(file: &GgufFile) -> Result<Model, ModelError> {
        let arch = file.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Architecture(arch.to_string()));
        }
        let shape = read_shape(file)?;

        let tok_embd = file.matrix("token_embd.weight")?;
        expect_shape(&tok_embd, "token_embd.weight", shape.vocab, shape.n_embd)?;
        let output = match file.tensor_info("output.weight") {
            Some(_) => file.matrix("output.weight")?,
            None => tok_embd.clone(),
        };
        expect_shape(&output, "output.weight", shape.vocab, shape.n_embd)?;

        // Every matrix is copied into the kernels' interleaved layout; tied
        // embeddings share the output projection's copy (rows are read
        // from either layout), so no weight is held twice.
        let tied = file.tensor_info("output.weight").is_none();
        let packed = interleave(&output)?;
        output.bytes.release_pages();
        let output = packed;
        let tok_embd = if tied { output.clone() } else { tok_embd };
        let output_norm = norm(file, "output_norm.weight", shape.n_embd)?;

        let (d, kv, ff) = (shape.n_embd, shape.kv_dim(), shape.n_ff);
        let mut layers = Vec::with_capacity(shape.n_layer);
        for i in 0..shape.n_layer {
            let m = |name: &str, rows, cols| -> Result<QMatrix, ModelError> {
                let full = format!("blk.{i}.{name}.weight");
                let matrix = file.matrix(&full)?;
                expect_shape(&matrix, &full, rows, cols)?;
                let packed = interleave(&matrix)?;
                matrix.bytes.release_pages();
                Ok(packed)
            };
            layers.push(Layer {
                attn_norm: norm(file, &format!("blk.{i}.attn_norm.weight"), d)?,
                wq: m("attn_q", d, d)?,
                wk: m("attn_k", kv, d)?,
                wv: m("attn_v", kv, d)?,
                wo: m("attn_output", d, d)?,
                ffn_norm: norm(file, &format!("blk.{i}.ffn_norm.weight"), d)?,
                gate: m("ffn_gate", ff, d)?,
                up: m("ffn_up", ff, d)?,
                down: m("ffn_down", d, ff)?,
            });
        }

        let inv_freq = rotary_frequencies(&shape);
        Ok(Model {
            shape,
            tok_embd,
            output_norm,
            output,
            layers,
            inv_freq,
        })
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// Runs `rows` and appends their keys and values to `caches`. Returns
    /// the logits of the rows that asked for them, in row order,
    /// `vocab` floats each.
    ///
    /// Rows of one sequence must be in position order; each row's position
    /// is its cache's length plus the rows of its sequence before it.
    pub fn forward(
        &self,
        pool: &ThreadPool,
        rows: &[Row],
        caches: &mut [SeqCache],
        s: &mut Scratch,
    ) -> Result<Vec<f32>, ModelError> {
        let sh = &self.shape;
        let (n, d, kv) = (rows.len(), sh.n_embd, sh.kv_dim());

        // Positions and their rotary angles, and the embeddings of the
        // input tokens.
        s.pos.clear();
        s.rotary.clear();
        let mut next: Vec<usize> = caches.iter().map(|c| c.len).collect();
        for row in rows {
            s.pos.push(next[row.seq]);
            self.rotary_turns(next[row.seq], &mut s.rotary);
            next[row.seq] += 1;
        }
        resize(&mut s.x, n * d);
        for (row, x) in rows.iter().zip(s.x.chunks_exact_mut(d)) {
            let token = (row.token as usize).min(sh.vocab - 1);
            dequantize_matrix_row(&self.tok_embd, token, x)?;
        }

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block: x += wo(attention(rope(q), rope(k), v)).
            rms_norm(&s.x, &layer.attn_norm, sh.rms_eps, &mut s.xn);
            resize(&mut s.q, n * d);
            resize(&mut s.k, n * kv);
            resize(&mut s.v, n * kv);
            matmul(pool, &layer.wq, &s.xn, n, &mut s.q)?;
            matmul(pool, &layer.wk, &s.xn, n, &mut s.k)?;
            matmul(pool, &layer.wv, &s.xn, n, &mut s.v)?;
            let half = self.inv_freq.len();
            for (i, turns) in s.rotary.chunks_exact(half).enumerate() {
                rope(&mut s.q[i * d..(i + 1) * d], turns);
                rope(&mut s.k[i * kv..(i + 1) * kv], turns);
            }

            // Keys and values join the caches before attention so that a
            // prefill chunk's rows see each other (up to their own position).
            let (hd, heads) = (sh.head_dim, sh.n_head_kv);
            for (i, row) in rows.iter().enumerate() {
                let cache = &mut caches[row.seq];
                for g in 0..heads {
                    let at = i * kv + g * hd;
                    cache.k[l * heads + g].extend_from_slice(&s.k[at..at + hd]);
                    cache.v[l * heads + g].extend_from_slice(&s.v[at..at + hd]);
                }
            }
            resize(&mut s.att, n * d);
            self.attention(pool, l, rows, &s.pos, caches, &s.q, &mut s.att);
            resize(&mut s.proj, n * d);
            matmul(pool, &layer.wo, &s.att, n, &mut s.proj)?;
            add(&mut s.x, &s.proj);

            // Feed-forward block: x += down(silu(gate(x)) * up(x)).
            rms_norm(&s.x, &layer.ffn_norm, sh.rms_eps, &mut s.xn);
            resize(&mut s.gate, n * sh.n_ff);
            resize(&mut s.up, n * sh.n_ff);
            matmul(pool, &layer.gate, &s.xn, n, &mut s.gate)?;
            matmul(pool, &layer.up, &s.xn, n, &mut s.up)?;
            math::silu_mul(&mut s.gate, &s.up);
            matmul(pool, &layer.down, &s.gate, n, &mut s.proj)?;
            add(&mut s.x, &s.proj);
        }
        for (cache, len) in caches.iter_mut().zip(next) {
            cache.len = len;
        }

        // Logits only for the rows that want them: projecting all 49152
        // vocabulary rows costs as much as several layers.
        let wanted: Vec<usize> = (0..n).filter(|&i| rows[i].logits).collect();
        let mut last = Vec::with_capacity(wanted.len() * d);
        for &i in &wanted {
            last.extend_from_slice(&s.x[i * d..(i + 1) * d]);
        }
        rms_norm(&last, &self.output_norm, sh.rms_eps, &mut s.xn);
        let mut logits = vec![0.0; wanted.len() * sh.vocab];
        if !wanted.is_empty() {
            matmul(pool, &self.output, &s.xn, wanted.len(), &mut logits)?;
        }
        Ok(logits)
    }

    /// The (sin, cos) of `pos` times each pair's rotary frequency.
    fn rotary_turns(&self, pos: usize, out: &mut Vec<(f32, f32)>) {
        out.extend(self.inv_freq.iter().map(|&f| (pos as f32 * f).sin_cos()));
    }

    /// Causal attention of each row's query heads over its sequence's
    /// cache, one task per (row, KV head): the query heads that share a KV
    /// head (h / group == g) read its keys and values together, once.
    #[expect(clippy::too_many_arguments, reason = "one step's working set")]
    fn attention(
        &self,
        pool: &ThreadPool,
        layer: usize,
        rows: &[Row],
        pos: &[usize],
        caches: &[SeqCache],
        q: &[f32],
        out: &mut [f32],
    ) {
        let sh = &self.shape;
        let hd = sh.head_dim;
        let group = sh.n_head / sh.n_head_kv;
        let scale = 1.0 / (hd as f32).sqrt();

        // A row's heads are in KV-head order, so each task's query heads
        // and outputs are one contiguous run.
        let outs: Vec<Mutex<&mut [f32]>> =
            out.chunks_exact_mut(group * hd).map(Mutex::new).collect();
        pool.for_each(rows.len() * sh.n_head_kv, &|task| {
            let (i, g) = (task / sh.n_head_kv, task % sh.n_head_kv);
            let cache = &caches[rows[i].seq];
            let buffer = layer * sh.n_head_kv + g;
            let heads = Heads {
                q: &q[i * sh.n_embd + g * group * hd..][..group * hd],
                keys: &cache.k[buffer],
                values: &cache.v[buffer],
                head_dim: hd,
                stride: hd,
                len: pos[i] + 1,
                scale,
            };
            let Ok(mut o) = outs[task].lock() else { return };
            heads.attend_fast(&mut o);
        });
    }
}

/// Query heads that share one KV head, attending over one sequence's
/// cache: `q` holds the heads one after another, `head_dim` floats each;
/// the key and value of position t are at `keys[t * stride..]` and
/// `values[t * stride..]`, `head_dim` long.
struct Heads<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    head_dim: usize,
    stride: usize,
    len: usize,
    scale: f32,
}

impl Heads<'_> {
    /// Each head's softmax-weighted sum of the values into its
    /// `head_dim` floats of `out`, on AVX2 where the CPU has it: the same
    /// arithmetic in the same order as the plain version, so the same
    /// results.
    fn attend_fast(&self, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            #[allow(unsafe_code)]
            unsafe {
                x86::attend(self, out)
            };
            return;
        }
        self.attend(out);
    }

    /// The plain version of [`Heads::attend_fast`].
    fn attend(&self, out: &mut [f32]) {
        let (hd, len) = (self.head_dim, self.len);
        let mut scores = vec![0.0f32; self.q.len() / hd * len];
        for t in 0..len {
            let key = &self.keys[t * self.stride..][..hd];
            for (h, q) in self.q.chunks_exact(hd).enumerate() {
                scores[h * len + t] = dot(q, key) * self.scale;
            }
        }
        for (p, out) in scores.chunks_exact_mut(len).zip(out.chunks_exact_mut(hd)) {
            math::softmax_plain(p);
            self.weigh_values(p, 0, out);
        }
    }

    /// `out[j] = sum over t of p[t] * value_t[from + j]`, positions in
    /// order, for each j.
    fn weigh_values(&self, p: &[f32], from: usize, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for (t, &p) in p.iter().enumerate() {
                acc += p * self.values[t * self.stride + from + j];
            }
            *o = acc;
        }
    }
}

/// AVX2 versions of the attention loops.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{dot_tail, math, Heads};

    /// Whether this CPU runs the functions here.
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Positions ahead of the one being read whose keys (or values) are
    /// fetched into cache: a sequence's cache is read once per step,
    /// mostly from memory, and one position's work is too short for the
    /// hardware prefetcher to keep up with the stride.
    const AHEAD: usize = 8;

    /// Fetches `floats` floats at `at` into cache; never faults, so `at`
    /// may lie past the end of the cache.
    #[inline]
    fn prefetch(at: *const f32, floats: usize) {
        // A plain loop: `step_by` here cost more than the prefetches.
        let mut line = 0;
        while line < floats {
            let at = at.wrapping_add(line) as *const i8;
            // SAFETY: a prefetch reads nothing architecturally.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at) };
            line += 16;
        }
    }

    /// [`Heads::attend`] on AVX2.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend(heads: &Heads<'_>, out: &mut [f32]) {
        // SAFETY (both): the caller's guarantee, passed on.
        match heads.head_dim {
            64 => return unsafe { attend_fixed::<8>(heads, out) },
            128 => return unsafe { attend_fixed::<16>(heads, out) },
            _ => {}
        }
        let (hd, len, stride) = (heads.head_dim, heads.len, heads.stride);
        let mut scores = vec![0.0f32; heads.q.len() / hd * len];

        // Eight positions at a time where the head width allows: their
        // keys are read once for all heads, and the eight sums reduced
        // together (in `dot`'s order). The rest one at a time.
        let mut t = 0;
        if hd.is_multiple_of(16) {
            while t + 8 <= len {
                for p in t + AHEAD..t + AHEAD + 8 {
                    prefetch(heads.keys.as_ptr().wrapping_add(p * stride), hd);
                }
                let keys = &heads.keys[t * stride..];
                for (h, q) in heads.q.chunks_exact(hd).enumerate() {
                    let scale = _mm256_set1_ps(heads.scale);
                    let s = _mm256_mul_ps(dot8(q, keys, stride), scale);
                    let to = &mut scores[h * len + t..][..8];
                    // SAFETY: `to` holds 8 floats; an unaligned store.
                    unsafe { _mm256_storeu_ps(to.as_mut_ptr(), s) };
                }
                t += 8;
            }
        }
        for t in t..len {
            prefetch(heads.keys.as_ptr().wrapping_add((t + AHEAD) * stride), hd);
            let key = &heads.keys[t * stride..][..hd];
            for (h, q) in heads.q.chunks_exact(hd).enumerate() {
                scores[h * len + t] = dot(q, key) * heads.scale;
            }
        }

        // Dimensions 64, then 32, at a time in registers; the rest plain.
        for (p, out) in scores.chunks_exact_mut(len).zip(out.chunks_exact_mut(hd)) {
            math::softmax(p);
            let mut from = 0;
            while from + 64 <= hd {
                weigh::<8, true>(heads, p, from, &mut out[from..from + 64]);
                from += 64;
            }
            while from + 32 <= hd {
                weigh::<4, true>(heads, p, from, &mut out[from..from + 32]);
                from += 32;
            }
            heads.weigh_values(p, from, &mut out[from..]);
        }
    }

    /// [`attend`] for heads of `8 * V` dimensions (`V` a multiple of 8),
    /// every loop over a head's width unrolled: a head's query stays in
    /// registers while the keys go past. Keys and values are fetched on
    /// the first head's pass over the keys only; the group's other heads,
    /// and the weighing, find them in cache. Same arithmetic in the same
    /// order, so the same results.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_fixed<const V: usize>(heads: &Heads<'_>, out: &mut [f32]) {
        let (hd, len, stride) = (8 * V, heads.len, heads.stride);
        let keys = heads.keys.as_ptr();
        let values = heads.values.as_ptr();
        let scale = _mm256_set1_ps(heads.scale);
        let mut scores = vec![0.0f32; heads.q.len() / hd * len];

        // The keys' first positions, which the loop below does not fetch
        // ahead.
        for p in 0..AHEAD.min(len) {
            prefetch(keys.wrapping_add(p * stride), hd);
        }
        for (h, (q, row)) in heads
            .q
            .chunks_exact(hd)
            .zip(scores.chunks_exact_mut(len))
            .enumerate()
        {
            // Plain loops, not closures, here: a closure would not inherit
            // this function's target features and calls its intrinsics.
            let mut qv = [_mm256_setzero_ps(); V];
            for (i, qv) in qv.iter_mut().enumerate() {
                // SAFETY: `q` holds 8 * V floats; an unaligned load.
                *qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(8 * i)) };
            }
            let mut t = 0;
            while t + 8 <= len {
                // On the first head's pass the values of the same
                // positions are fetched too, for the weighing after the
                // softmax: two streams in flight instead of one, and none
                // when the weighing starts.
                if h == 0 {
                    for p in t + AHEAD..t + AHEAD + 8 {
                        prefetch(keys.wrapping_add(p * stride), hd);
                    }
                    for p in t..t + 8 {
                        prefetch(values.wrapping_add(p * stride), hd);
                    }
                }
                let mut sums = [_mm256_setzero_ps(); 8];
                for (p, sum) in sums.iter_mut().enumerate() {
                    *sum = dot_fixed(&qv, &heads.keys[(t + p) * stride..][..hd]);
                }
                let s = _mm256_mul_ps(reduce8(sums), scale);
                // SAFETY: `t + 8 <= len`, the row's length; unaligned.
                unsafe { _mm256_storeu_ps(row.as_mut_ptr().add(t), s) };
                t += 8;
            }
            for (t, score) in row.iter_mut().enumerate().skip(t) {
                if h == 0 {
                    prefetch(values.wrapping_add(t * stride), hd);
                }
                *score = dot(q, &heads.keys[t * stride..][..hd]) * heads.scale;
            }
        }

        math::softmax_rows(&mut scores, len);
        for (p, out) in scores.chunks_exact(len).zip(out.chunks_exact_mut(hd)) {
            for (c, out) in out.chunks_exact_mut(64).enumerate() {
                weigh::<8, false>(heads, p, 64 * c, out);
            }
        }
    }

    /// [`dot`] of a query held in registers with one key of `8 * V`
    /// floats, before the final halving: lanes 0..8 and 8..16 of its
    /// partial sums, added.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn dot_fixed<const V: usize>(q: &[__m256; V], k: &[f32]) -> __m256 {
        let k = &k[..8 * V];
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in 0..V / 2 {
            // SAFETY: `16 * i + 16 <= 8 * V`, the length of `k`; unaligned.
            unsafe {
                let pk = k.as_ptr().add(16 * i);
                lo = _mm256_add_ps(lo, _mm256_mul_ps(q[2 * i], _mm256_loadu_ps(pk)));
                hi = _mm256_add_ps(hi, _mm256_mul_ps(q[2 * i + 1], _mm256_loadu_ps(pk.add(8))));
            }
        }
        _mm256_add_ps(lo, hi)
    }

    /// [`Heads::weigh_values`] for `8 * R` dimensions from `from`, in `R`
    /// registers, fetching values ahead when `FETCH` (when they are not
    /// in cache already).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn weigh<const R: usize, const FETCH: bool>(
        h: &Heads<'_>,
        p: &[f32],
        from: usize,
        out: &mut [f32],
    ) {
        let values = h.values.as_ptr().wrapping_add(from);
        let mut acc = [_mm256_setzero_ps(); R];
        for (t, &p) in p.iter().enumerate() {
            if FETCH {
                prefetch(values.wrapping_add((t + AHEAD) * h.stride), 8 * R);
            }
            let v = &h.values[t * h.stride + from..][..8 * R];
            let p = _mm256_set1_ps(p);
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `v` holds 8 * R floats; an unaligned load.
                let v = unsafe { _mm256_loadu_ps(v.as_ptr().add(8 * k)) };
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(p, v));
            }
        }
        for (o, acc) in out.chunks_exact_mut(8).zip(acc) {
            // SAFETY: `o` holds 8 floats; an unaligned store.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), acc) };
        }
    }

    /// [`dot`] of `q` with the keys of eight consecutive positions, at
    /// `keys[p * stride..]` for p in 0..8, as one vector of eight sums.
    /// Each sum is formed exactly as `dot` forms it; `q.len()` is a
    /// multiple of 16.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn dot8(q: &[f32], keys: &[f32], stride: usize) -> __m256 {
        let hd = q.len();
        let mut sums = [_mm256_setzero_ps(); 8];
        for (p, sum) in sums.iter_mut().enumerate() {
            let k = &keys[p * stride..][..hd];
            let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= hd {
                // SAFETY: `i + 16 <= hd`, the length of `q` and `k`;
                // unaligned loads.
                unsafe {
                    let (pq, pk) = (q.as_ptr().add(i), k.as_ptr().add(i));
                    let x = _mm256_mul_ps(_mm256_loadu_ps(pq), _mm256_loadu_ps(pk));
                    let y = _mm256_mul_ps(_mm256_loadu_ps(pq.add(8)), _mm256_loadu_ps(pk.add(8)));
                    lo = _mm256_add_ps(lo, x);
                    hi = _mm256_add_ps(hi, y);
                }
                i += 16;
            }
            *sum = _mm256_add_ps(lo, hi);
        }
        reduce8(sums)
    }

    /// The eight sums of [`dot`]'s halving, one per vector of `sums`
    /// (each `dot`'s 16 lanes already folded to 8), as one vector.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn reduce8(sums: [__m256; 8]) -> __m256 {
        // Lane k plus lane k + 4, then k + 2, then k + 1, as `dot` halves
        // its sums, for all eight at once: halves of positions p and p + 4
        // share a register, then quarters of p, p + 1 (and p + 4, p + 5).
        let half = |a: __m256, b: __m256| {
            let lows = _mm256_permute2f128_ps::<0x20>(a, b);
            let highs = _mm256_permute2f128_ps::<0x31>(a, b);
            _mm256_add_ps(lows, highs)
        };
        let s04 = half(sums[0], sums[4]);
        let s15 = half(sums[1], sums[5]);
        let s26 = half(sums[2], sums[6]);
        let s37 = half(sums[3], sums[7]);
        let quarter = |a: __m256, b: __m256| {
            let firsts = _mm256_shuffle_ps::<0b01_00_01_00>(a, b);
            let seconds = _mm256_shuffle_ps::<0b11_10_11_10>(a, b);
            _mm256_add_ps(firsts, seconds)
        };
        let w0 = quarter(s04, s15);
        let w1 = quarter(s26, s37);
        let evens = _mm256_shuffle_ps::<0b10_00_10_00>(w0, w1);
        let odds = _mm256_shuffle_ps::<0b11_01_11_01>(w0, w1);
        _mm256_add_ps(evens, odds)
    }

    /// [`super::dot`] on AVX2: lanes 0..8 and 8..16 of its partial sums in
    /// two registers, reduced in the same order.
    #[target_feature(enable = "avx2")]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let len = a.len().min(b.len());
        let whole = len / 16 * 16;
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..whole).step_by(16) {
            // SAFETY: `i + 16 <= whole <= len`; unaligned loads.
            unsafe {
                let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
                let x = _mm256_mul_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb));
                let y = _mm256_mul_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)));
                lo = _mm256_add_ps(lo, x);
                hi = _mm256_add_ps(hi, y);
            }
        }
        let v8 = _mm256_add_ps(lo, hi);
        let v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
        let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
        let v1 = _mm_add_ss(v2, _mm_movehdup_ps(v2));
        _mm_cvtss_f32(v1) + dot_tail(&a[whole..len], &b[whole..len])
    }
}

/// Rotary frequencies, one per pair of a head's dimensions.
pub(crate) fn rotary_frequencies(shape: &ModelShape) -> Vec<f32> {
    (0..shape.head_dim / 2)
        .map(|i| {
            shape
                .rope_base
                .powf(-(2.0 * i as f32) / shape.head_dim as f32)
        })
        .collect()
}

pub(crate) fn read_shape(file: &GgufFile) -> Result<ModelShape, ModelError> {
    let u = |key: &str| -> Result<usize, ModelError> {
        Ok(file.get_u32(&format!("llama.{key}"))? as usize)
    };
    let n_embd = u("embedding_length")?;
    let n_head = u("attention.head_count")?;
    let n_head_kv = match file.get_u32("llama.attention.head_count_kv") {
        Ok(v) => v as usize,
        Err(_) => n_head,
    };
    let vocab = match file.get_u32("llama.vocab_size") {
        Ok(v) => v as usize,
        Err(_) => file.get_str_array("tokenizer.ggml.tokens")?.len(),
    };
    let shape = ModelShape {
        n_layer: u("block_count")?,
        n_embd,
        n_head,
        n_head_kv,
        n_ff: u("feed_forward_length")?,
        head_dim: n_embd.checked_div(n_head).unwrap_or(0),
        vocab,
        context_length: u("context_length")?,
        rope_base: file.get_f32("llama.rope.freq_base").unwrap_or(10_000.0),
        rms_eps: file.get_f32("llama.attention.layer_norm_rms_epsilon")?,
    };

    let ok = shape.n_head > 0
        && shape.n_head_kv > 0
        && shape.n_head.is_multiple_of(shape.n_head_kv)
        && shape.n_embd.is_multiple_of(shape.n_head)
        && shape.head_dim.is_multiple_of(2)
        && shape.vocab > 0
        && shape.n_layer > 0;
    if !ok {
        return Err(ModelError::Shape(format!(
            "width {}, {} heads, {} kv heads, {} layers, vocabulary {}",
            shape.n_embd, shape.n_head, shape.n_head_kv, shape.n_layer, shape.vocab
        )));
    }
    Ok(shape)
}

pub(crate) fn expect_shape(
    m: &QMatrix,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<(), ModelError> {
    if m.rows == rows && m.cols == cols {
        return Ok(());
    }
    Err(ModelError::Shape(format!(
        "{name} is {}x{}, expected {rows}x{cols}",
        m.rows, m.cols
    )))
}

pub(crate) fn norm(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let v = file.vector_f32(name)?;
    if v.len() != len {
        return Err(ModelError::Shape(format!(
            "{name} has {} entries, expected {len}",
            v.len()
        )));
    }
    Ok(v)
}

/// Rotates each head's adjacent pairs (x[2i], x[2i+1]) by the angle whose
/// (sin, cos) is `turns[i]`: GGUF stores llama's q and k weights permuted so
/// that this pairing matches the original model's.
fn rope(x: &mut [f32], turns: &[(f32, f32)]) {
    let head_dim = turns.len() * 2;
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, &(sin, cos)) in head.chunks_exact_mut(2).zip(turns) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }
}

/// Makes `v` `len` long. What it held is left in place, not zeroed again:
/// every buffer is written in full before it is read, and zeroing them
/// all cost a decode step of 8 sequences a megabyte of stores per layer.
fn resize(v: &mut Vec<f32>, len: usize) {
    v.resize(len, 0.0);
}

/// out = x / rms(x) * w, row by row (rows of `w.len()`).
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    resize(out, x.len());
    for (xr, or) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Float dot product in 16 independent partial sums, lane k taking the
/// elements at k mod 16, then halved pairwise: a single running sum would
/// make every addition wait for the one before, and attention's scores
/// are mostly such dot products. The order depends only on the lengths,
/// so a row's result is the same in any batch.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let len = a.len().min(b.len());
    let whole = len / LANES * LANES;
    let mut acc = [0.0f32; LANES];
    for (a, b) in a[..whole]
        .chunks_exact(LANES)
        .zip(b[..whole].chunks_exact(LANES))
    {
        for k in 0..LANES {
            acc[k] += a[k] * b[k];
        }
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for k in 0..width {
            acc[k] += acc[k + width];
        }
    }
    acc[0] + dot_tail(&a[whole..len], &b[whole..len])
}

/// The part of [`dot`] past its last 16 elements: one running sum.
fn dot_tail(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        sum += x * y;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_paths_agree_bit_for_bit() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let cases = [
            (64, 3, 192, 1),
            (64, 3, 192, 103),
            (64, 3, 64, 16),
            (128, 2, 128, 37),
            (96, 1, 96, 9),
            (40, 2, 40, 17),
            (8, 4, 24, 5),
        ];
        for (hd, n, stride, len) in cases {
            let q: Vec<f32> = (0..n * hd).map(|_| next()).collect();
            let keys: Vec<f32> = (0..len * stride).map(|_| next()).collect();
            let values: Vec<f32> = (0..len * stride).map(|_| next()).collect();
            let heads = Heads {
                q: &q,
                keys: &keys,
                values: &values,
                head_dim: hd,
                stride,
                len,
                scale: 0.125,
            };
            let (mut plain, mut fast) = (vec![0.0; n * hd], vec![0.0; n * hd]);
            heads.attend(&mut plain);
            heads.attend_fast(&mut fast);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&plain), bits(&fast), "hd {hd} len {len}");
        }
    }

    use crate::sampler::argmax;
    use crate::test_support::{check_against_reference, open_model_or_skip, synthetic, Case};

    /// Logits for every step of a case with teacher forcing: the prompt and
    /// the reference continuation run as one prefill, logits from the
    /// prompt's last token on.
    fn forced_logits(model: &Model, pool: &ThreadPool, case: &Case) -> Vec<Vec<f32>> {
        let rows = case.forced_rows();
        let mut caches = vec![SeqCache::new(model.shape())];
        let logits = model
            .forward(pool, &rows, &mut caches, &mut Scratch::default())
            .unwrap();
        logits
            .chunks_exact(model.shape().vocab)
            .map(<[f32]>::to_vec)
            .collect()
    }

    #[test]
    fn forward_pass_matches_llama_cpp_with_teacher_forcing() {
        let Some(file) = open_model_or_skip("forward_pass_matches_llama_cpp") else {
            return;
        };
        let model = Model::load(&file).unwrap();
        let pool = ThreadPool::new(2).unwrap();
        check_against_reference(|case| forced_logits(&model, &pool, case));
    }

    #[test]
    fn batched_decode_equals_decoding_alone() {
        let Some(file) = open_model_or_skip("batched_decode_equals_decoding_alone") else {
            return;
        };
        let model = Model::load(&file).unwrap();
        let pool = ThreadPool::new(2).unwrap();
        let prompts: [&[u32]; 3] = [&[1, 9690, 198], &[1, 4093, 198, 19556], &[1, 46, 2]];

        // Each prompt alone, then three greedy steps.
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut caches = vec![SeqCache::new(model.shape())];
                let mut s = Scratch::default();
                let rows: Vec<Row> = p
                    .iter()
                    .enumerate()
                    .map(|(i, &token)| Row {
                        seq: 0,
                        token,
                        logits: i + 1 == p.len(),
                    })
                    .collect();
                let mut out = vec![argmax(
                    &model.forward(&pool, &rows, &mut caches, &mut s).unwrap(),
                )];
                for _ in 0..3 {
                    let row = [Row {
                        seq: 0,
                        token: out[out.len() - 1],
                        logits: true,
                    }];
                    out.push(argmax(
                        &model.forward(&pool, &row, &mut caches, &mut s).unwrap(),
                    ));
                }
                out
            })
            .collect();

        // All three prefilled in one pass, then decoded together.
        let mut caches: Vec<SeqCache> = prompts
            .iter()
            .map(|_| SeqCache::new(model.shape()))
            .collect();
        let mut s = Scratch::default();
        let rows: Vec<Row> = prompts
            .iter()
            .enumerate()
            .flat_map(|(seq, p)| {
                p.iter().enumerate().map(move |(i, &token)| Row {
                    seq,
                    token,
                    logits: i + 1 == p.len(),
                })
            })
            .collect();
        let vocab = model.shape().vocab;
        let logits = model.forward(&pool, &rows, &mut caches, &mut s).unwrap();
        let mut together: Vec<Vec<u32>> = logits
            .chunks_exact(vocab)
            .map(|l| vec![argmax(l)])
            .collect();
        for _ in 0..3 {
            let rows: Vec<Row> = together
                .iter()
                .enumerate()
                .map(|(seq, out)| Row {
                    seq,
                    token: out[out.len() - 1],
                    logits: true,
                })
                .collect();
            let logits = model.forward(&pool, &rows, &mut caches, &mut s).unwrap();
            for (out, l) in together.iter_mut().zip(logits.chunks_exact(vocab)) {
                out.push(argmax(l));
            }
        }
        assert_eq!(together, alone);
    }

    #[test]
    fn synthetic_models_of_every_type_match_a_plain_reference() {
        use crate::tensor::GgmlType;
        let pool = ThreadPool::new(2).unwrap();
        let tokens = synthetic::TOKENS;
        for ty in synthetic::TYPES {
            let (file, weights) = synthetic::build(ty);
            let model = Model::load(&GgufFile::open(&file.0).unwrap()).unwrap();
            let want = synthetic::reference_logits(&weights, &tokens);

            // All tokens as one prefill, logits for every position.
            let rows = synthetic::rows(0, &tokens);
            let mut caches = vec![SeqCache::new(model.shape())];
            let prefill = model
                .forward(&pool, &rows, &mut caches, &mut Scratch::default())
                .unwrap();

            // Quantized weights take 8-bit activations, as llama.cpp does:
            // close to the float reference, not equal.
            let tolerance = match ty {
                GgmlType::F32 | GgmlType::F16 => 1e-3,
                _ => 0.05,
            };
            let vocab = synthetic::VOCAB;
            for (pos, (got, want)) in prefill.chunks_exact(vocab).zip(&want).enumerate() {
                let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                for (g, w) in got.iter().zip(want) {
                    let err = (f64::from(*g) - w).abs() / scale;
                    assert!(err < tolerance, "{ty} position {pos}: {g} vs {w}");
                }
            }

            // The same tokens one at a time give the same logits exactly.
            let mut caches = vec![SeqCache::new(model.shape())];
            let mut s = Scratch::default();
            for (pos, &token) in tokens.iter().enumerate() {
                let row = [Row {
                    seq: 0,
                    token,
                    logits: true,
                }];
                let step = model.forward(&pool, &row, &mut caches, &mut s).unwrap();
                assert_eq!(step, prefill[pos * vocab..][..vocab], "{ty} position {pos}");
            }
        }
    }

    #[test]
    fn a_file_missing_a_weight_is_a_clear_error() {
        use crate::gguf::MetaValue;
        use crate::test_support::GgufBuilder;
        let file = GgufBuilder::new(3)
            .kv("general.architecture", MetaValue::Str("llama".into()))
            .kv("llama.block_count", MetaValue::U32(1))
            .kv("llama.embedding_length", MetaValue::U32(32))
            .kv("llama.attention.head_count", MetaValue::U32(2))
            .kv("llama.feed_forward_length", MetaValue::U32(32))
            .kv("llama.context_length", MetaValue::U32(16))
            .kv("llama.vocab_size", MetaValue::U32(4))
            .kv(
                "llama.attention.layer_norm_rms_epsilon",
                MetaValue::F32(1e-5),
            )
            .write();
        let err = Model::load(&GgufFile::open(&file.0).unwrap()).unwrap_err();
        assert!(err.to_string().contains("token_embd.weight"), "{err}");

        let other = GgufBuilder::new(3)
            .kv("general.architecture", MetaValue::Str("mamba".into()))
            .write();
        let err = Model::load(&GgufFile::open(&other.0).unwrap()).unwrap_err();
        assert!(err.to_string().contains("mamba"), "{err}");
    }
}
