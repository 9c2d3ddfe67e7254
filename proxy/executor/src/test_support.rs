//! Helpers shared by the unit tests: where the real model file is, and a
//! small writer for synthetic GGUF files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::gguf::{GgufFile, MetaValue};

pub mod synthetic;

use serde_json::Value;

/// The model the reference vectors were made with.
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the real model is: `SWITCHYARD_MODEL` if set, else
/// `<workspace>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHYARD_MODEL") {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(MODEL_FILE)
}

/// Opens the real model, or returns `None` after saying why `test` is
/// skipped when the file is absent. With `SWITCHYARD_REQUIRE_MODEL=1` an
/// absent model fails the test instead.
pub fn open_model_or_skip(test: &str) -> Option<GgufFile> {
    let path = model_path();
    if !path.exists() {
        let required = std::env::var("SWITCHYARD_REQUIRE_MODEL").as_deref() == Ok("1");
        assert!(
            !required,
            "{test}: model file {} is missing and SWITCHYARD_REQUIRE_MODEL=1; \
             fetch it (see proxy/executor/tests/data/smollm2/README.md) or \
             set SWITCHYARD_MODEL",
            path.display()
        );
        eprintln!(
            "skipping {test}: model file {} is missing (set SWITCHYARD_MODEL \
             or copy the model to models/)",
            path.display()
        );
        return None;
    }
    Some(GgufFile::open(&path).unwrap())
}

/// A file in the temp directory, removed when dropped.
#[derive(Debug)]
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// Writes `bytes` to a fresh file with a name unique to this process.
    pub fn with_bytes(bytes: &[u8]) -> TempFile {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("switchyard-test-{}-{n}.gguf", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A tensor to write: name, dims, type id, data, offset written instead
/// of the real one.
type TestTensor = (String, Vec<u64>, u32, Vec<u8>, Option<u64>);

/// Builds GGUF files byte by byte, including broken ones.
#[derive(Debug)]
pub struct GgufBuilder {
    pub version: u32,
    /// Alignment used to place tensor data. Default 32.
    pub alignment: u64,
    kvs: Vec<(String, MetaValue)>,
    tensors: Vec<TestTensor>,
}

impl GgufBuilder {
    pub fn new(version: u32) -> GgufBuilder {
        GgufBuilder {
            version,
            alignment: 32,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    pub fn kv(mut self, key: &str, value: MetaValue) -> GgufBuilder {
        self.kvs.push((key.to_string(), value));
        self
    }

    /// Adds a tensor of GGUF type `type_id` with `data` as its bytes.
    pub fn tensor(self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> GgufBuilder {
        self.tensor_at(name, dims, ty, data, None)
    }

    /// Like [`GgufBuilder::tensor`], but with the data offset written as
    /// `offset` when given (the data is still placed where it would be).
    pub fn tensor_at(
        mut self,
        name: &str,
        dims: &[u64],
        type_id: u32,
        data: Vec<u8>,
        offset: Option<u64>,
    ) -> GgufBuilder {
        let name = name.to_string();
        self.tensors
            .push((name, dims.to_vec(), type_id, data, offset));
        self
    }

    /// The whole file: header, metadata, tensor table, padding, data.
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.kvs.len() as u64);
        for (key, value) in &self.kvs {
            put_str(&mut out, key);
            out.extend_from_slice(&value.meta_type().id().to_le_bytes());
            put_value(&mut out, value);
        }

        // Tensor data is laid out in order, each piece aligned.
        let mut data = Vec::new();
        for (name, dims, type_id, bytes, offset) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                put_u64(&mut out, *d);
            }
            out.extend_from_slice(&type_id.to_le_bytes());
            pad_to(&mut data, self.alignment);
            put_u64(&mut out, offset.unwrap_or(data.len() as u64));
            data.extend_from_slice(bytes);
        }
        pad_to(&mut out, self.alignment);
        out.extend_from_slice(&data);
        out
    }

    /// Builds the file into the temp directory.
    pub fn write(&self) -> TempFile {
        TempFile::with_bytes(&self.build())
    }
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    while !(out.len() as u64).is_multiple_of(alignment) {
        out.push(0);
    }
}

pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A value's bytes without its type id.
pub fn put_value(out: &mut Vec<u8>, value: &MetaValue) {
    match value {
        MetaValue::U8(v) => out.push(*v),
        MetaValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Array { elem, items } => {
            out.extend_from_slice(&elem.id().to_le_bytes());
            put_u64(out, items.len() as u64);
            for item in items {
                put_value(out, item);
            }
        }
    }
}

/// A string array value.
pub fn str_array(items: &[&str]) -> MetaValue {
    MetaValue::Array {
        elem: crate::gguf::MetaType::Str,
        items: items
            .iter()
            .map(|s| MetaValue::Str(s.to_string()))
            .collect(),
    }
}

// The reference vectors (tests/data/smollm2/greedy.jsonl) and the
// tolerances the forward pass is held to, for every backend.

/// One reference prompt and what llama.cpp computed at each step.
pub struct Case {
    pub prompt: Vec<u32>,
    pub greedy: Vec<u32>,
    pub margin: Vec<f32>,
    pub top1_logprob: Vec<f32>,
    pub top5: Vec<Vec<(u32, f32)>>,
}

pub fn cases() -> Vec<Case> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/smollm2/greedy.jsonl"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let top5 = v["top5"]
                .as_array()
                .unwrap()
                .iter()
                .map(|step| {
                    step.as_array()
                        .unwrap()
                        .iter()
                        .map(|e| (e[0].as_u64().unwrap() as u32, e[1].as_f64().unwrap() as f32))
                        .collect()
                })
                .collect();
            Case {
                prompt: ids(&v["prompt_ids"]),
                greedy: ids(&v["greedy_ids"]),
                margin: floats(&v["top1_margin"]),
                top1_logprob: floats(&v["top1_logprob"]),
                top5,
            }
        })
        .collect()
}

impl Case {
    /// Teacher forcing as one prefill: the prompt and the reference
    /// continuation, logits from the prompt's last token on.
    pub fn forced_rows(&self) -> Vec<crate::model::Row> {
        let mut tokens = self.prompt.clone();
        tokens.extend(&self.greedy[..self.greedy.len().saturating_sub(1)]);
        let first = self.prompt.len() - 1;
        tokens
            .iter()
            .enumerate()
            .map(|(i, &token)| crate::model::Row {
                seq: 0,
                token,
                logits: i >= first,
            })
            .collect()
    }
}

/// Holds a backend's teacher-forced logits (`logits_for(case)`, one row
/// per step) to llama.cpp's, at the tolerances in
/// tests/data/smollm2/README.md.
pub fn check_against_reference(logits_for: impl Fn(&Case) -> Vec<Vec<f32>>) {
    use crate::sampler::{argmax, log_sum_exp, top_logprobs};

    let (mut steps, mut confident, mut agree_confident) = (0, 0, 0);
    let (mut lp_sum, mut lp_max) = (0.0f64, 0.0f32);
    let (mut top5_sum, mut top5_steps) = (0.0f64, 0);
    for (c, case) in cases().iter().enumerate() {
        let logits = logits_for(case);
        assert_eq!(logits.len(), case.greedy.len());
        for (i, row) in logits.iter().enumerate() {
            let lse = log_sum_exp(row);
            let best = argmax(row);
            let want = case.greedy[i];
            let margin = case.margin[i];
            steps += 1;

            assert!(
                margin < 1.0 || best == want,
                "case {c} step {i}: best token {best}, llama.cpp {want} (margin {margin})"
            );
            if margin > 0.5 {
                confident += 1;
                agree_confident += usize::from(best == want);
            }

            let diff = (row[want as usize] - lse - case.top1_logprob[i]).abs();
            assert!(
                diff <= 0.5,
                "case {c} step {i}: greedy log-prob off by {diff}"
            );
            lp_sum += f64::from(diff);
            lp_max = lp_max.max(diff);

            let mut step_sum = 0.0;
            for &(id, reference) in &case.top5[i] {
                let d = (row[id as usize] - lse - reference).abs();
                if reference >= -4.0 {
                    assert!(d <= 0.75, "case {c} step {i}: top-5 token {id} off by {d}");
                }
                step_sum += f64::from(d);
            }
            top5_sum += step_sum / case.top5[i].len() as f64;
            top5_steps += 1;
            // Our own top-5 is well formed.
            assert_eq!(top_logprobs(row, lse, 5)[0].id, best);
        }
    }

    let share = agree_confident as f64 / confident.max(1) as f64;
    let lp_mean = lp_sum / steps as f64;
    let top5_mean = top5_sum / top5_steps as f64;
    eprintln!(
        "reference: {steps} steps; confident agreement {agree_confident}/{confident}; \
         greedy log-prob diff mean {lp_mean:.4} max {lp_max:.4}; top-5 mean {top5_mean:.4}"
    );
    assert!(
        share >= 0.97,
        "best token agrees at {share:.3} of confident steps"
    );
    assert!(lp_mean <= 0.08, "mean greedy log-prob difference {lp_mean}");
    assert!(top5_mean < 0.15, "mean top-5 difference {top5_mean}");
}
