//! A tiny llama model written as a GGUF file with every weight matrix
//! in `ty`, and the same weights dequantized for the reference.

use crate::gguf::MetaValue;
use crate::quant::dequantize_row;
use crate::quant::{quantize_row_q4_0, quantize_row_q4_1, quantize_row_q8_0};
use crate::tensor::GgmlType;
use crate::test_support::{GgufBuilder, TempFile};

pub const VOCAB: usize = 32;
pub const D: usize = 64;
pub const FF: usize = 96;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const LAYERS: usize = 2;
/// Every weight type the executor runs.
pub const TYPES: [GgmlType; 5] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
];
/// Tokens the synthetic tests run.
pub const TOKENS: [u32; 7] = [3, 17, 4, 29, 11, 0, 8];

/// Deterministic numbers in [-scale, scale).
pub fn weights(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `values` (rows of `cols`) encoded as `ty`, and decoded back.
fn encode(ty: GgmlType, values: &[f32], cols: usize) -> (u32, Vec<u8>, Vec<f32>) {
    let row_bytes = ty.row_bytes(cols).unwrap();
    let rows = values.len() / cols;
    let mut bytes = vec![0u8; rows * row_bytes];
    for (row, out) in values
        .chunks_exact(cols)
        .zip(bytes.chunks_exact_mut(row_bytes))
    {
        match ty {
            GgmlType::F32 => {
                for (v, o) in row.iter().zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            GgmlType::F16 => {
                for (v, o) in row.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
            }
            GgmlType::Q4_0 => quantize_row_q4_0(row, out).unwrap(),
            GgmlType::Q4_1 => quantize_row_q4_1(row, out).unwrap(),
            GgmlType::Q8_0 => quantize_row_q8_0(row, out).unwrap(),
        }
    }
    let mut decoded = vec![0.0; values.len()];
    for (b, out) in bytes
        .chunks_exact(row_bytes)
        .zip(decoded.chunks_exact_mut(cols))
    {
        dequantize_row(ty, b, out).unwrap();
    }
    let id = match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 8,
    };
    (id, bytes, decoded)
}

/// Rows for `tokens` of sequence `seq`, each wanting its logits.
pub fn rows(seq: usize, tokens: &[u32]) -> Vec<crate::model::Row> {
    tokens
        .iter()
        .map(|&token| crate::model::Row {
            seq,
            token,
            logits: true,
        })
        .collect()
}

/// The weights by tensor name, as the reference reads them.
pub type Weights = std::collections::HashMap<String, Vec<f32>>;

pub fn build(ty: GgmlType) -> (TempFile, Weights) {
    let kv = D / HEADS * KV_HEADS;
    let mut builder = GgufBuilder::new(3)
        .kv("general.architecture", MetaValue::Str("llama".into()))
        .kv("llama.block_count", MetaValue::U32(LAYERS as u32))
        .kv("llama.embedding_length", MetaValue::U32(D as u32))
        .kv("llama.attention.head_count", MetaValue::U32(HEADS as u32))
        .kv(
            "llama.attention.head_count_kv",
            MetaValue::U32(KV_HEADS as u32),
        )
        .kv("llama.feed_forward_length", MetaValue::U32(FF as u32))
        .kv("llama.context_length", MetaValue::U32(64))
        .kv("llama.vocab_size", MetaValue::U32(VOCAB as u32))
        .kv("llama.rope.freq_base", MetaValue::F32(10_000.0))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        );
    let mut reference = Weights::new();
    let mut seed = 1;
    let mut add = |builder: GgufBuilder, name: String, rows: usize, cols: usize| {
        seed += 1;
        let values = weights(seed, rows * cols, 0.3);
        let (id, bytes, decoded) = encode(ty, &values, cols);
        reference.insert(name.clone(), decoded);
        builder.tensor(&name, &[cols as u64, rows as u64], id, bytes)
    };
    builder = add(builder, "token_embd.weight".into(), VOCAB, D);
    for l in 0..LAYERS {
        builder = add(builder, format!("blk.{l}.attn_q.weight"), D, D);
        builder = add(builder, format!("blk.{l}.attn_k.weight"), kv, D);
        builder = add(builder, format!("blk.{l}.attn_v.weight"), kv, D);
        builder = add(builder, format!("blk.{l}.attn_output.weight"), D, D);
        builder = add(builder, format!("blk.{l}.ffn_gate.weight"), FF, D);
        builder = add(builder, format!("blk.{l}.ffn_up.weight"), FF, D);
        builder = add(builder, format!("blk.{l}.ffn_down.weight"), D, FF);
    }
    let mut norms = vec!["output_norm.weight".to_string()];
    for l in 0..LAYERS {
        norms.push(format!("blk.{l}.attn_norm.weight"));
        norms.push(format!("blk.{l}.ffn_norm.weight"));
    }
    for (k, name) in norms.into_iter().enumerate() {
        let values: Vec<f32> = weights(100 + k as u64, D, 0.5)
            .iter()
            .map(|w| 1.0 + w)
            .collect();
        let (id, bytes, decoded) = encode(GgmlType::F32, &values, D);
        reference.insert(name.clone(), decoded);
        builder = builder.tensor(&name, &[D as u64], id, bytes);
    }
    (builder.write(), reference)
}

/// The model in plain f64 arithmetic over the decoded weights: the
/// logits after each of `tokens`.
pub fn reference_logits(w: &Weights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let hd = D / HEADS;
    let kv = hd * KV_HEADS;
    let matvec = |name: &str, x: &[f64], rows: usize| -> Vec<f64> {
        let m = &w[name];
        let cols = x.len();
        (0..rows)
            .map(|r| (0..cols).map(|c| f64::from(m[r * cols + c]) * x[c]).sum())
            .collect()
    };
    let norm = |name: &str, x: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        x.iter()
            .zip(&w[name])
            .map(|(v, g)| v * inv * f64::from(*g))
            .collect()
    };
    let rope = |x: &mut [f64], pos: usize| {
        for head in x.chunks_exact_mut(hd) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let theta = pos as f64 * 10_000f64.powf(-(2.0 * i as f64) / hd as f64);
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * theta.cos() - b * theta.sin();
                pair[1] = a * theta.sin() + b * theta.cos();
            }
        }
    };

    let mut keys = vec![Vec::<Vec<f64>>::new(); LAYERS];
    let mut values = vec![Vec::<Vec<f64>>::new(); LAYERS];
    let mut out = Vec::new();
    for (pos, &token) in tokens.iter().enumerate() {
        let embd = &w["token_embd.weight"][token as usize * D..][..D];
        let mut x: Vec<f64> = embd.iter().map(|&v| f64::from(v)).collect();
        for l in 0..LAYERS {
            let p = |n: &str| format!("blk.{l}.{n}.weight");
            let xn = norm(&p("attn_norm"), &x);
            let mut q = matvec(&p("attn_q"), &xn, D);
            let mut k = matvec(&p("attn_k"), &xn, kv);
            let v = matvec(&p("attn_v"), &xn, kv);
            rope(&mut q, pos);
            rope(&mut k, pos);
            keys[l].push(k);
            values[l].push(v);
            let mut att = vec![0.0; D];
            for h in 0..HEADS {
                let g = h / (HEADS / KV_HEADS);
                let qh = &q[h * hd..][..hd];
                let scores: Vec<f64> = keys[l]
                    .iter()
                    .map(|k| {
                        let kh = &k[g * hd..][..hd];
                        qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exp.iter().sum();
                for (t, e) in exp.iter().enumerate() {
                    for i in 0..hd {
                        att[h * hd + i] += e / total * values[l][t][g * hd + i];
                    }
                }
            }
            let o = matvec(&p("attn_output"), &att, D);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xn = norm(&p("ffn_norm"), &x);
            let gate = matvec(&p("ffn_gate"), &xn, FF);
            let up = matvec(&p("ffn_up"), &xn, FF);
            let h: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(&p("ffn_down"), &h, D);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        let xn = norm("output_norm.weight", &x);
        out.push(matvec("token_embd.weight", &xn, VOCAB));
    }
    out
}
