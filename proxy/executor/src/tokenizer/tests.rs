use std::sync::OnceLock;

use super::*;
use crate::gguf::MetaValue;
use crate::test_support::{open_model_or_skip, str_array, GgufBuilder};

const TOKENIZER_JSONL: &str = include_str!("../../tests/data/smollm2/tokenizer.jsonl");
const GREEDY_JSONL: &str = include_str!("../../tests/data/smollm2/greedy.jsonl");

/// The real model's tokenizer, built once for all tests, or `None` (after
/// saying why) when the model file is absent.
fn smollm(test: &str) -> Option<&'static Tokenizer> {
    static TOKENIZER: OnceLock<Option<Tokenizer>> = OnceLock::new();
    let tokenizer = TOKENIZER.get_or_init(|| {
        let gguf = open_model_or_skip("tokenizer tests")?;
        Some(Tokenizer::from_gguf(&gguf).unwrap())
    });
    if tokenizer.is_none() {
        eprintln!("skipping {test}: no model file");
    }
    tokenizer.as_ref()
}

fn jsonl(data: &str) -> Vec<serde_json::Value> {
    data.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    split_gpt2(text, &mut out);
    out
}

/// A vocabulary of the 256 byte characters, three control tokens, one
/// user-defined token and whatever `merges` ("l r") produce, merged in
/// the order given. Without merges every byte is its own token, so words
/// show as their bytes; a merge list that joins whole words shows the
/// pre-tokenizer's cuts.
fn toy(pre: PreTokenizer, merges: &[&str]) -> Tokenizer {
    let mut texts: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    let mut kinds = vec![TokenKind::Normal; 256];
    for (text, kind) in [
        ("<s>", TokenKind::Control),
        ("</s>", TokenKind::Control),
        ("<s></s>x", TokenKind::Control),
        ("[USER]", TokenKind::UserDefined),
    ] {
        texts.push(text.to_string());
        kinds.push(kind);
    }
    for merge in merges {
        texts.push(merge.replace(' ', ""));
        kinds.push(TokenKind::Normal);
    }
    Tokenizer::new(texts, kinds, merges, pre, 256, 257).unwrap()
}

#[test]
fn gpt2_split_follows_the_pattern() {
    let cases: &[(&str, &[&str])] = &[
        ("Hello, world!", &["Hello", ",", " world", "!"]),
        ("double  space", &["double", " ", " space"]),
        ("trailing  ", &["trailing", "  "]),
        (" lead", &[" lead"]),
        ("\tabc", &["\t", "abc"]),
        ("a\n\nb", &["a", "\n", "\n", "b"]),
        ("a\n\n", &["a", "\n\n"]),
        ("a \nb", &["a", " ", "\n", "b"]),
        (
            "It's we're they'll I'd",
            &["It", "'s", " we", "'re", " they", "'ll", " I", "'d"],
        ),
        ("DON'T", &["DON", "'", "T"]),
        ("x'", &["x", "'"]),
        ("a12 b", &["a", "12", " b"]),
        ("!!!???...", &["!!!???..."]),
        ("a !!", &["a", " !!"]),
        ("  \tx", &["  ", "\t", "x"]),
        ("naïve café", &["naïve", " café"]),
        ("x\u{a0}y", &["x", "\u{a0}", "y"]),
        ("🚀🔥 go", &["🚀🔥", " go"]),
        ("", &[]),
    ];
    for (text, want) in cases {
        assert_eq!(words(text), *want, "{text:?}");
    }
}

#[test]
fn smollm_split_puts_each_number_alone() {
    let t = toy(
        PreTokenizer::Smollm,
        &["y e", "ye a", "yea r", "Ġ h", "Ġh a", "Ġha d"],
    );
    let pieces: Vec<&str> = t
        .encode("year 2024 had", false)
        .iter()
        .map(|&id| t.texts[id as usize].as_str())
        .collect();
    // The space before "2024" cannot join the digits: it ends its stretch.
    assert_eq!(pieces, ["year", "Ġ", "2", "0", "2", "4", "Ġhad"]);
}

#[test]
fn character_classes_follow_unicode_categories() {
    let cases = [
        ('é', Class::Letter),
        ('ß', Class::Letter),
        ('ǅ', Class::Letter),
        ('中', Class::Letter),
        ('ー', Class::Letter),
        ('٣', Class::Number),
        ('½', Class::Number),
        ('Ⅻ', Class::Number),
        ('\u{301}', Class::Other),
        ('\u{200d}', Class::Other),
        ('🚀', Class::Other),
        ('—', Class::Other),
        ('\u{a0}', Class::Space),
        ('\u{3000}', Class::Space),
        ('\u{85}', Class::Space),
        ('\u{b}', Class::Space),
    ];
    for (c, want) in cases {
        assert_eq!(class(c), want, "{c:?} U+{:04X}", c as u32);
    }
    assert_eq!(unicode_tables::UNICODE_VERSION, "15.1.0");
}

#[test]
fn byte_map_is_gpt2s() {
    let chars = byte_chars();
    assert_eq!(chars[b'!' as usize], '!');
    assert_eq!(chars[b' ' as usize], 'Ġ');
    assert_eq!(chars[b'\n' as usize], 'Ċ');
    assert_eq!(chars[0], 'Ā');
    assert_eq!(chars[0xAD], 'Ń');
    let mut sorted = chars.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 256);
}

#[test]
fn bpe_merges_lowest_rank_first() {
    // "b c" outranks "a b", so "abc" becomes a + bc, not ab + c.
    let t = toy(PreTokenizer::Gpt2, &["b c", "a b", "a bc"]);
    let pieces = |text| -> Vec<String> {
        t.encode(text, false)
            .iter()
            .map(|&id| t.texts[id as usize].clone())
            .collect()
    };
    assert_eq!(pieces("abc"), ["abc"]);
    assert_eq!(pieces("ab"), ["ab"]);
    assert_eq!(pieces("abcab"), ["abc", "ab"]);

    // Equal pairs merge leftmost first.
    let t = toy(PreTokenizer::Gpt2, &["a a"]);
    let ids = t.encode("aaa", false);
    let pieces: Vec<&str> = ids
        .iter()
        .map(|&id| t.texts[id as usize].as_str())
        .collect();
    assert_eq!(pieces, ["aa", "a"]);
}

#[test]
fn special_tokens_are_cut_out_longest_first() {
    let t = toy(PreTokenizer::Gpt2, &[]);
    let (s, end, long, user) = (256, 257, 258, 259);

    assert_eq!(t.encode("<s></s>xy", true)[..1], [long]);
    assert_eq!(t.encode("a<s>b</s>", true), [97, s, 98, end]);
    // Without parse_special control markup is text; user tokens still
    // match.
    let plain = t.encode("<s>[USER]", false);
    assert_eq!(plain.len(), 4);
    assert_eq!(plain[3], user);
    assert!(t.is_special(s) && !t.is_special(user) && !t.is_special(97));
}

#[test]
fn decode_renders_control_tokens_as_nothing() {
    let t = toy(PreTokenizer::Gpt2, &[]);
    let ids = t.encode("<s>hi [USER] ü</s>", true);
    assert_eq!(t.decode(&ids), "hi [USER] ü");
    assert_eq!(t.token_bytes(256), b"");
    assert_eq!(t.token_text(256), Some("<s>"));
    assert_eq!(t.token_bytes(259), b"[USER]");
    assert_eq!(t.token_bytes(u32::MAX), b"");
    // A character split across tokens decodes lossily alone.
    assert_eq!(t.decode(&ids[ids.len() - 3..ids.len() - 2]), "\u{fffd}");
}

#[test]
fn bytes_without_tokens_are_dropped_like_llama_cpp() {
    // Token ids of the toy vocabulary are the bytes themselves.
    let mut t = toy(PreTokenizer::Gpt2, &[]);
    t.byte_tokens[b'b' as usize] = NO_TOKEN;
    assert_eq!(t.encode("abc b", false), [97, 99, 32]);
}

#[test]
fn long_inputs_encode_quickly() {
    let t = toy(PreTokenizer::Smollm, &["a a", "aa aa", "aaaa aaaa"]);
    let text = "a".repeat(200_000) + &" b1".repeat(50_000) + &"!".repeat(100_000);
    let start = std::time::Instant::now();
    let ids = t.encode(&text, true);
    assert_eq!(t.decode(&ids), text);
    let elapsed = start.elapsed();
    assert!(elapsed.as_secs() < 10, "took {elapsed:?}");
}

/// A GGUF with a tokenizer of the given model and pre-tokenizer names.
fn tokenizer_gguf(model: &str, pre: Option<&str>) -> GgufBuilder {
    let chars: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
    let mut b = GgufBuilder::new(3)
        .kv("tokenizer.ggml.model", MetaValue::Str(model.into()))
        .kv("tokenizer.ggml.tokens", str_array(&chars))
        .kv("tokenizer.ggml.merges", str_array(&["a b"]))
        .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(0))
        .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(1));
    if let Some(pre) = pre {
        b = b.kv("tokenizer.ggml.pre", MetaValue::Str(pre.into()));
    }
    b
}

fn from_gguf_err(b: GgufBuilder) -> String {
    let file = b.write();
    let gguf = GgufFile::open(&file.0).unwrap();
    Tokenizer::from_gguf(&gguf).unwrap_err().to_string()
}

#[test]
fn unknown_pre_tokenizer_is_an_error() {
    let err = from_gguf_err(tokenizer_gguf("gpt2", Some("llama-bpe")));
    assert_eq!(
        err,
        "tokenizer.ggml.pre is llama-bpe, a pre-tokenizer this executor does \
         not implement (supported: smollm, gpt2); guessing one would give \
         different token ids from llama.cpp"
    );
    let err = from_gguf_err(tokenizer_gguf("gpt2", None));
    assert_eq!(
        err,
        "metadata key tokenizer.ggml.pre is missing from the model file"
    );
    let err = from_gguf_err(tokenizer_gguf("llama", Some("default")));
    assert!(
        err.starts_with("tokenizer.ggml.model is llama, which"),
        "{err}"
    );
}

#[test]
fn synthetic_gguf_tokenizer_builds() {
    let file = tokenizer_gguf("gpt2", Some("gpt2")).write();
    let gguf = GgufFile::open(&file.0).unwrap();
    let t = Tokenizer::from_gguf(&gguf).unwrap();
    assert_eq!(t.vocab_size(), 256);
    assert_eq!(t.decode(&t.encode("hi there", false)), "hi there");
}

#[test]
fn malformed_vocabularies_are_errors() {
    let texts = vec!["<a>".to_string(); 10];
    let kinds = vec![TokenKind::Normal; 10];
    let err = Tokenizer::new(texts, kinds, &[], PreTokenizer::Gpt2, 0, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the vocabulary has no byte-level tokens"),
        "{err}"
    );

    let t = toy(PreTokenizer::Gpt2, &[]);
    let err = Tokenizer::new(
        t.texts.clone(),
        t.kinds.clone(),
        &["ab"],
        PreTokenizer::Gpt2,
        0,
        1,
    )
    .unwrap_err();
    assert!(err.to_string().contains("merge 0 (\"ab\") has no space"));
    let err = Tokenizer::new(
        t.texts.clone(),
        t.kinds.clone(),
        &[],
        PreTokenizer::Gpt2,
        0,
        999,
    )
    .unwrap_err();
    assert!(err.to_string().contains("eos token id 999 is outside"));
}

#[test]
fn matches_llama_cpp_on_every_reference_line() {
    let Some(t) = smollm("matches_llama_cpp_on_every_reference_line") else {
        return;
    };
    let lines = jsonl(TOKENIZER_JSONL);
    assert_eq!(lines.len(), 39);
    for line in lines {
        let text = line["text"].as_str().unwrap();
        let special = line["special"].as_bool().unwrap_or(false);
        assert_eq!(
            t.encode(text, special),
            ids(&line["ids"]),
            "{text:?} special={special}"
        );
    }
}

#[test]
fn reference_prompts_encode_and_continuations_decode() {
    let Some(t) = smollm("reference_prompts_encode_and_continuations_decode") else {
        return;
    };
    for line in jsonl(GREEDY_JSONL) {
        let prompt = line["prompt"].as_str().unwrap();
        assert_eq!(
            t.encode(prompt, true),
            ids(&line["prompt_ids"]),
            "{prompt:?}"
        );
        let text = line["text"].as_str().unwrap();
        assert_eq!(t.decode(&ids(&line["greedy_ids"])), text);
    }
}

#[test]
fn decode_inverts_encode_on_reference_texts() {
    let Some(t) = smollm("decode_inverts_encode_on_reference_texts") else {
        return;
    };
    let texts = jsonl(TOKENIZER_JSONL)
        .into_iter()
        .chain(jsonl(GREEDY_JSONL))
        .map(|l| {
            let key = if l.get("text").is_some() && l.get("prompt").is_none() {
                "text"
            } else {
                "prompt"
            };
            l[key].as_str().unwrap().to_string()
        });
    for text in texts {
        assert_eq!(t.decode(&t.encode(&text, false)), text);
    }
}

#[test]
fn smollm_vocabulary_facts() {
    let Some(t) = smollm("smollm_vocabulary_facts") else {
        return;
    };
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!((t.bos(), t.eos()), (1, 2));
    assert_eq!(t.token_id("<|im_start|>"), Some(1));
    assert_eq!(t.token_id("Ġthe"), Some(260));
    assert!((0..17).all(|id| t.is_special(id)));
    assert!(!t.is_special(17));
    assert!(t.is_end_of_generation(2) && t.is_end_of_generation(0));
    assert!(!t.is_end_of_generation(1));
    assert_eq!(t.token_text(2), Some("<|im_end|>"));
    assert_eq!(t.token_bytes(2), b"");
    assert_eq!(t.token_bytes(260), b" the");
}
