use super::*;
use crate::test_support::{open_model_or_skip, str_array, GgufBuilder, TempFile};

/// A small valid file: two tensors and a few metadata values.
fn small_file(version: u32) -> GgufBuilder {
    let norm: Vec<u8> = [1.0f32, -2.5, 0.25, 8.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    GgufBuilder::new(version)
        .kv("general.architecture", MetaValue::Str("llama".into()))
        .kv("llama.block_count", MetaValue::U32(2))
        .tensor("norm.weight", &[4], 0, norm)
        // Two rows of one Q8_0 block each.
        .tensor("w.weight", &[32, 2], 8, vec![7; 68])
}

fn open_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    let file = TempFile::with_bytes(bytes);
    GgufFile::open(&file.0)
}

fn open_err(bytes: &[u8]) -> String {
    open_bytes(bytes).unwrap_err().to_string()
}

#[test]
fn opens_v3_file_with_tensors() {
    let file = small_file(3).write();
    let gguf = GgufFile::open(&file.0).unwrap();

    assert_eq!(gguf.version(), 3);
    assert_eq!(gguf.alignment(), 32);
    assert_eq!(gguf.data_start() % 32, 0);
    assert_eq!(gguf.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(gguf.get_u32("llama.block_count").unwrap(), 2);
    assert_eq!(gguf.tensors().len(), 2);
    assert_eq!(
        gguf.vector_f32("norm.weight").unwrap(),
        [1.0, -2.5, 0.25, 8.0]
    );

    let w = gguf.matrix("w.weight").unwrap();
    assert_eq!((w.ty, w.rows, w.cols), (GgmlType::Q8_0, 2, 32));
    assert_eq!(w.row(1), Some(&[7; 34][..]));
    let info = gguf.tensor_info("w.weight").unwrap();
    assert_eq!(info.offset, 32);
    assert_eq!((info.size, info.elements()), (68, 64));
}

#[test]
fn opens_v2_file() {
    let file = small_file(2).write();
    let gguf = GgufFile::open(&file.0).unwrap();
    assert_eq!(gguf.version(), 2);
    assert_eq!(gguf.matrix("w.weight").unwrap().rows, 2);
}

#[test]
fn reads_every_metadata_type() {
    let nested = MetaValue::Array {
        elem: MetaType::Array,
        items: vec![
            MetaValue::Array {
                elem: MetaType::I32,
                items: vec![MetaValue::I32(-1), MetaValue::I32(2)],
            },
            str_array(&["x", "", "ünï"]),
        ],
    };
    let values = [
        ("u8", MetaValue::U8(200)),
        ("i8", MetaValue::I8(-100)),
        ("u16", MetaValue::U16(60000)),
        ("i16", MetaValue::I16(-30000)),
        ("u32", MetaValue::U32(4_000_000_000)),
        ("i32", MetaValue::I32(-2_000_000_000)),
        ("f32", MetaValue::F32(1e-5)),
        ("bool", MetaValue::Bool(true)),
        ("str", MetaValue::Str("héllo".into())),
        ("u64", MetaValue::U64(u64::MAX)),
        ("i64", MetaValue::I64(i64::MIN)),
        ("f64", MetaValue::F64(-0.125)),
        ("strs", str_array(&["a", "b c"])),
        ("empty", str_array(&[])),
        ("nested", nested),
    ];
    let mut builder = GgufBuilder::new(3);
    for (key, value) in &values {
        builder = builder.kv(key, value.clone());
    }
    let file = builder.write();
    let gguf = GgufFile::open(&file.0).unwrap();

    for (key, value) in &values {
        assert_eq!(gguf.metadata(key), Some(value), "{key}");
    }
    let keys: Vec<&str> = gguf.metadata_entries().map(|(k, _)| k).collect();
    assert_eq!(keys, values.map(|(k, _)| k));
    assert_eq!(gguf.get_f32("f32").unwrap(), 1e-5);
    assert_eq!(gguf.get_f32("f64").unwrap(), -0.125);
    assert!(gguf.get_bool("bool").unwrap());
    assert_eq!(gguf.get_str_array("strs").unwrap(), ["a", "b c"]);
    assert!(gguf.get_str_array("empty").unwrap().is_empty());
}

#[test]
fn get_u32_accepts_any_integer_that_fits() {
    let file = GgufBuilder::new(3)
        .kv("u8", MetaValue::U8(7))
        .kv("i32", MetaValue::I32(49152))
        .kv("u64", MetaValue::U64(8192))
        .kv("neg", MetaValue::I32(-1))
        .kv("big", MetaValue::U64(1 << 40))
        .kv("text", MetaValue::Str("12".into()))
        .kv(
            "ints",
            MetaValue::Array {
                elem: MetaType::U8,
                items: vec![MetaValue::U8(1), MetaValue::U8(3)],
            },
        )
        .write();
    let gguf = GgufFile::open(&file.0).unwrap();

    assert_eq!(gguf.get_u32("u8").unwrap(), 7);
    assert_eq!(gguf.get_u32("i32").unwrap(), 49152);
    assert_eq!(gguf.get_u32("u64").unwrap(), 8192);
    assert_eq!(gguf.get_i32_array("ints").unwrap(), [1, 3]);
    for key in ["neg", "big", "text"] {
        let err = gguf.get_u32(key).unwrap_err().to_string();
        assert!(err.starts_with(&format!("metadata key {key} is ")), "{err}");
    }
}

#[test]
fn getters_name_missing_and_mistyped_keys() {
    let file = small_file(3).write();
    let gguf = GgufFile::open(&file.0).unwrap();

    let err = gguf.get_str("tokenizer.ggml.pre").unwrap_err().to_string();
    assert_eq!(
        err,
        "metadata key tokenizer.ggml.pre is missing from the model file"
    );
    let err = gguf.get_str("llama.block_count").unwrap_err().to_string();
    assert_eq!(
        err,
        "metadata key llama.block_count is u32, expected a string"
    );
    let err = gguf.get_str_array("general.architecture").unwrap_err();
    assert!(err.to_string().contains("expected an array of strings"));
    let err = gguf.get_f32("general.architecture").unwrap_err();
    assert!(err.to_string().contains("is string, expected a float"));
}

#[test]
fn tensor_accessors_check_shape_and_type() {
    let half: Vec<u8> = [0.5f32, -3.0]
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let file = small_file(3).tensor("h.weight", &[2, 1], 1, half).write();
    let gguf = GgufFile::open(&file.0).unwrap();

    // F16 converts, and trailing unit dimensions are allowed.
    assert_eq!(gguf.vector_f32("h.weight").unwrap(), [0.5, -3.0]);
    let err = gguf.vector_f32("w.weight").unwrap_err().to_string();
    assert!(err.contains("expected a 1-D F32 or F16 vector"), "{err}");
    let err = gguf.matrix("norm.weight").unwrap_err().to_string();
    assert_eq!(
        err,
        "tensor norm.weight has shape [4] and type F32; expected a 2-D matrix"
    );
    let err = gguf.matrix("output.weight").unwrap_err().to_string();
    assert_eq!(err, "tensor output.weight is missing from the model file");
    assert!(gguf.tensor_bytes("w.weight").unwrap().as_slice().len() == 68);
}

#[test]
fn honours_general_alignment() {
    let file = small_file(3)
        .kv("general.alignment", MetaValue::U32(64))
        .tensor("x", &[1], 0, vec![0; 4]);
    let mut file = file;
    file.alignment = 64;
    let file = file.write();
    let gguf = GgufFile::open(&file.0).unwrap();

    assert_eq!(gguf.alignment(), 64);
    assert_eq!(gguf.data_start() % 64, 0);
    assert_eq!(gguf.tensor_info("x").unwrap().offset, 192);
}

#[test]
fn rejects_bad_alignment() {
    let bytes = small_file(3)
        .kv("general.alignment", MetaValue::U32(24))
        .build();
    assert!(open_err(&bytes).contains("general.alignment must be a power of two"));
}

#[test]
fn rejects_bad_magic() {
    let mut bytes = small_file(3).build();
    bytes[..4].copy_from_slice(b"GGML");
    let err = open_err(&bytes);
    assert!(
        err.contains("is not a GGUF file (it starts with \"GGML\""),
        "{err}"
    );
    assert!(open_err(b"").contains("is not a GGUF file"));
}

#[test]
fn rejects_version_1_by_name() {
    let err = open_err(&small_file(1).build());
    assert!(
        err.contains("is GGUF version 1, which this executor does not read"),
        "{err}"
    );
    assert!(err.contains("convert the model again"), "{err}");
}

#[test]
fn rejects_big_endian_and_future_versions() {
    let err = open_err(&small_file(3u32.swap_bytes()).build());
    assert!(err.contains("the file is big-endian"), "{err}");
    let err = open_err(&small_file(4).build());
    assert!(err.contains("only versions 2 and 3 are supported"), "{err}");
}

#[test]
fn truncated_header_is_reported() {
    let bytes = small_file(3).build();
    let err = open_err(&bytes[..12]);
    assert!(
        err.contains("ends inside the header (byte 8 of 12)"),
        "{err}"
    );
    assert!(err.contains("the file is truncated"), "{err}");
}

#[test]
fn truncated_metadata_is_reported() {
    let bytes = small_file(3).build();
    // The header is 24 bytes; cut into the first key, 20 bytes long.
    let err = open_err(&bytes[..50]);
    assert!(err.contains("ends inside metadata entry 0"), "{err}");
}

#[test]
fn truncated_tensor_data_is_reported() {
    let bytes = small_file(3).build();
    let err = open_err(&bytes[..bytes.len() - 1]);
    assert!(
        err.contains("ends inside the data of tensor w.weight"),
        "{err}"
    );
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = small_file(3).kv("nested", str_array(&["a", "b"])).build();
    for len in 0..bytes.len() {
        assert!(open_bytes(&bytes[..len]).is_err(), "prefix of {len} bytes");
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    let bytes = small_file(3).kv("nested", str_array(&["a", "b"])).build();

    // A fixed-seed generator keeps the test repeatable.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..300 {
        let mut corrupt = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % corrupt.len() as u64) as usize;
            corrupt[at] = next() as u8;
        }
        let _ = open_bytes(&corrupt);
    }
}

#[test]
fn unsupported_tensor_type_is_named() {
    let bytes = small_file(3)
        .tensor("blk.0.attn_q.weight", &[256, 1], 13, vec![0; 176])
        .build();
    assert_eq!(
        open_err(&bytes),
        "tensor blk.0.attn_q.weight has type Q5_K, which this executor does \
         not run; supported: F32, F16, Q4_0, Q4_1, Q8_0"
    );
    let bytes = small_file(3).tensor("x", &[1], 999, vec![0; 4]).build();
    assert!(open_err(&bytes).contains("has type unknown (999)"));
}

#[test]
fn misaligned_tensor_offset_is_rejected() {
    let bytes = small_file(3)
        .tensor_at("x", &[1], 0, vec![0; 4], Some(100))
        .build();
    let err = open_err(&bytes);
    assert!(err.contains("tensor x starts at data offset 100"), "{err}");
    assert!(
        err.contains("not a multiple of the alignment (32 bytes)"),
        "{err}"
    );
}

#[test]
fn partial_block_rows_are_rejected() {
    let bytes = small_file(3).tensor("q", &[48, 1], 2, vec![0; 36]).build();
    let err = open_err(&bytes);
    assert!(
        err.contains("tensor q has rows of 48 elements, not a whole number of Q4_0 blocks"),
        "{err}"
    );
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    // Tensor count.
    let mut bytes = small_file(3).build();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = open_err(&bytes);
    assert!(
        err.contains("the tensor table claims 18446744073709551615 tensors"),
        "{err}"
    );

    // Metadata count.
    let mut bytes = small_file(3).build();
    bytes[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(open_err(&bytes).contains("metadata entries, more than"));

    // An array's element count.
    let mut bytes = GgufBuilder::new(3).kv("a", str_array(&["x"])).build();
    let at = 24 + 8 + 1 + 4 + 4;
    bytes[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let err = open_err(&bytes);
    assert!(err.contains("metadata entry 0 (a) claims"), "{err}");

    // A string's length.
    let mut bytes = GgufBuilder::new(3)
        .kv("a", MetaValue::Str("x".into()))
        .build();
    let at = 24 + 8 + 1 + 4;
    bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(&bytes).contains("ends inside metadata entry 0 (a)"));
}

#[test]
fn overflowing_tensor_sizes_are_rejected() {
    let bytes = small_file(3)
        .tensor("x", &[32, u64::MAX / 2, 4], 0, vec![])
        .build();
    assert!(open_err(&bytes).contains("tensor x has impossible size"));

    // A zero dimension makes an empty tensor, whatever the others are.
    let file = small_file(3)
        .tensor("z", &[32, 0, u64::MAX, 2], 0, vec![])
        .write();
    let gguf = GgufFile::open(&file.0).unwrap();
    assert_eq!(gguf.tensor_info("z").unwrap().elements(), 0);
}

#[test]
fn duplicate_names_are_rejected() {
    let bytes = small_file(3)
        .kv("llama.block_count", MetaValue::U32(3))
        .build();
    assert!(open_err(&bytes).contains("metadata key llama.block_count appears twice"));
    let bytes = small_file(3)
        .tensor("w.weight", &[1], 0, vec![0; 4])
        .build();
    assert!(open_err(&bytes).contains("tensor w.weight appears twice"));
}

#[test]
fn missing_file_names_the_path() {
    let err = GgufFile::open("/nonexistent/model.gguf").unwrap_err();
    let err = err.to_string();
    assert!(
        err.starts_with("cannot read model file /nonexistent/model.gguf: "),
        "{err}"
    );
}

#[test]
fn real_model_matches_reference_facts() {
    let Some(gguf) = open_model_or_skip("real_model_matches_reference_facts") else {
        return;
    };

    assert_eq!(gguf.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(gguf.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(gguf.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(gguf.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(gguf.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(gguf.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(gguf.get_u32("llama.context_length").unwrap(), 8192);
    assert_eq!(gguf.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    let eps = gguf
        .get_f32("llama.attention.layer_norm_rms_epsilon")
        .unwrap();
    assert_eq!(eps, 1e-5);
    assert_eq!(
        gguf.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );

    // Tensor types as the README counts them.
    let count = |ty| gguf.tensors().iter().filter(|t| t.ty == ty).count();
    assert_eq!(count(GgmlType::Q4_1), 210);
    assert_eq!(count(GgmlType::F32), 61);
    assert_eq!(count(GgmlType::Q8_0), 1);

    let embd = gguf.matrix("token_embd.weight").unwrap();
    assert_eq!(
        (embd.ty, embd.rows, embd.cols),
        (GgmlType::Q8_0, 49152, 576)
    );
    assert_eq!(gguf.vector_f32("output_norm.weight").unwrap().len(), 576);
}
