//! Byte-level BPE tokenization, built from the vocabulary, merges and
//! pre-tokenizer name stored in the GGUF file itself, and held to give the
//! same ids as llama.cpp.
//!
//! Encoding runs in three stages, as llama.cpp's does:
//!
//! 1. Special tokens: with `parse_special`, the texts of control tokens
//!    (and always those of user-defined tokens) are cut out of the input,
//!    longest token first, and become their ids.
//! 2. Pre-tokenizing: each remaining stretch of text is split into words
//!    by the model's pre-tokenizer (`tokenizer.ggml.pre`). For `smollm`
//!    every number character stands alone, then GPT-2's rules split the
//!    rest; `gpt2` applies GPT-2's rules only.
//! 3. BPE: each word's UTF-8 bytes are mapped to GPT-2's printable byte
//!    characters and merged pairwise, lowest merge rank first.
//!
//! This module knows nothing of chat formats ([`crate::chat`]) or of the
//! model's tensors.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

use crate::gguf::{GgufError, GgufFile};

mod unicode_tables;

/// The Unicode version whose letter and number categories the
/// pre-tokenizer uses (llama.cpp's tables are built from the same).
pub use unicode_tables::UNICODE_VERSION;

/// Why a tokenizer could not be built from a model file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),

    #[error(
        "tokenizer.ggml.model is {model}, which this executor does not \
         run; only byte-level BPE models (gpt2) are supported"
    )]
    UnsupportedModel { model: String },

    #[error(
        "tokenizer.ggml.pre is {pre}, a pre-tokenizer this executor does \
         not implement (supported: {SUPPORTED_PRE}); guessing one would \
         give different token ids from llama.cpp"
    )]
    UnsupportedPre { pre: String },

    #[error("the model's tokenizer data is malformed: {0}")]
    Malformed(String),
}

const SUPPORTED_PRE: &str = "smollm, gpt2";

/// How the vocabulary classes a token (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    Unknown,
    /// Markup such as `<|im_start|>`: parsed from text only on request,
    /// rendered as nothing by [`Tokenizer::decode`].
    Control,
    /// Added vocabulary that is always matched as a whole in text and
    /// decodes to its own text.
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn from_type(t: i32) -> Option<TokenKind> {
        Some(match t {
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => return None,
        })
    }
}

/// The pre-tokenizers this module implements, by their GGUF names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreTokenizer {
    /// Every `\p{N}` character on its own, then GPT-2's split.
    Smollm,
    /// GPT-2's split: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
    /// ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
}

/// Texts of tokens that end a turn in the chat formats we know; llama.cpp
/// stops generation on these as well as on EOS.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "<EOT>",
];

/// Marks a byte without a token, and a symbol merged away during BPE.
const NO_TOKEN: u32 = u32::MAX;

/// A byte-level BPE tokenizer for one model's vocabulary.
pub struct Tokenizer {
    /// Token texts as stored in the vocabulary (byte-level encoded).
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
    ids: HashMap<String, u32>,
    merges: Merges,
    /// The token of each byte's byte-level character, or [`NO_TOKEN`].
    byte_tokens: [u32; 256],
    /// What each token decodes to, all tokens end to end; token `i` is
    /// `pieces[piece_ends[i - 1]..piece_ends[i]]`.
    pieces: Vec<u8>,
    piece_ends: Vec<usize>,
    /// Control, unknown and user-defined tokens, longest text first: the
    /// order in which they are cut out of text.
    specials: Vec<u32>,
    end_of_generation: Vec<u32>,
    pre: PreTokenizer,
    bos: u32,
    eos: u32,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.texts.len())
            .field("merges", &self.merges.len())
            .field("pre", &self.pre)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata: `model` must
    /// be `gpt2` and `pre` `smollm` or `gpt2`; `tokens`, `merges`,
    /// `bos_token_id` and `eos_token_id` are required; `token_type` is
    /// optional (every token normal).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel {
                model: model.to_string(),
            });
        }
        let pre = match gguf.get_str("tokenizer.ggml.pre")? {
            "smollm" => PreTokenizer::Smollm,
            "gpt2" => PreTokenizer::Gpt2,
            other => {
                return Err(TokenizerError::UnsupportedPre {
                    pre: other.to_string(),
                })
            }
        };

        let texts: Vec<String> = gguf
            .get_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let kinds = token_kinds(gguf, texts.len())?;
        let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
        let bos = gguf.get_u32("tokenizer.ggml.bos_token_id")?;
        let eos = gguf.get_u32("tokenizer.ggml.eos_token_id")?;
        Tokenizer::new(texts, kinds, &merges, pre, bos, eos)
    }

    fn new(
        texts: Vec<String>,
        kinds: Vec<TokenKind>,
        merge_list: &[&str],
        pre: PreTokenizer,
        bos: u32,
        eos: u32,
    ) -> Result<Tokenizer, TokenizerError> {
        let n = texts.len();
        if n == 0 || n > u32::MAX as usize {
            let detail = format!("the vocabulary has {n} tokens");
            return Err(TokenizerError::Malformed(detail));
        }
        for (name, id) in [("bos", bos), ("eos", eos)] {
            if id as usize >= n {
                let detail = format!("{name} token id {id} is outside the {n} tokens");
                return Err(TokenizerError::Malformed(detail));
            }
        }

        // Later duplicates win, as in llama.cpp.
        let ids: HashMap<String, u32> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();

        let byte_tokens = byte_tokens(&ids)?;
        let merges = parse_merges(merge_list, &ids)?;
        let (pieces, piece_ends) = decode_pieces(&texts, &kinds);

        // Special tokens are cut out of text longest first.
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                let kind = kinds[i as usize];
                let special = matches!(
                    kind,
                    TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined
                );
                special && !texts[i as usize].is_empty()
            })
            .collect();
        specials.sort_by_key(|&i| Reverse(texts[i as usize].len()));

        let mut end_of_generation = vec![eos];
        for text in END_OF_GENERATION_TEXTS {
            match ids.get(*text) {
                Some(&id) if id != eos => end_of_generation.push(id),
                _ => {}
            }
        }

        Ok(Tokenizer {
            texts,
            kinds,
            ids,
            merges,
            byte_tokens,
            pieces,
            piece_ends,
            specials,
            end_of_generation,
            pre,
            bos,
            eos,
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The beginning-of-sequence token (`tokenizer.ggml.bos_token_id`).
    /// [`Tokenizer::encode`] never adds it.
    pub fn bos(&self) -> u32 {
        self.bos
    }

    /// The end-of-sequence token (`tokenizer.ggml.eos_token_id`).
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Whether generation should stop at `id`: EOS, or a control token
    /// that ends a turn (`<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, ...),
    /// as llama.cpp decides.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// Whether `id` is a control or unknown token: one that
    /// `parse_special` governs and that [`Tokenizer::decode`] renders as
    /// nothing.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.token_kind(id),
            Some(TokenKind::Control | TokenKind::Unknown)
        )
    }

    /// The vocabulary's class for `id`, or `None` outside the vocabulary.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// The id of the token whose vocabulary text is exactly `text` (for
    /// control tokens their markup, such as `<|im_end|>`; for normal
    /// tokens the byte-level form, such as `Ġthe`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// The vocabulary text of `id` as stored in the file.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The bytes token `id` stands for in decoded text. Normal tokens give
    /// their bytes with the byte-level mapping undone (possibly part of a
    /// UTF-8 character); user-defined tokens give their text. Control,
    /// unknown, unused and byte tokens, and ids outside the vocabulary,
    /// give nothing: llama.cpp's detokenizer does the same unless asked
    /// to render special tokens, and so OpenAI-style responses carry no
    /// `<|im_end|>`. Use [`Tokenizer::token_text`] for their markup.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i >= self.piece_ends.len() {
            return &[];
        }
        let start = if i == 0 { 0 } else { self.piece_ends[i - 1] };
        &self.pieces[start..self.piece_ends[i]]
    }

    /// The text of `ids`: their [`Tokenizer::token_bytes`] end to end, with
    /// invalid UTF-8 (a character cut between tokens) replaced by U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Token ids for `text`, without a BOS. With `parse_special`, control
    /// token texts in `text` (such as `<|im_start|>`) become their ids;
    /// without it they are encoded as ordinary text. User-defined tokens
    /// are matched either way, as in llama.cpp.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        for fragment in self.split_special(text, parse_special) {
            match fragment {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(range) => self.encode_text(&text[range], &mut out),
            }
        }
        out
    }

    /// Cuts special token texts out of `text`, each token in turn from the
    /// longest, leftmost occurrences first, as llama.cpp does.
    fn split_special(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text(0..text.len())];
        for &id in &self.specials {
            let kind = self.kinds[id as usize];
            if !parse_special && kind != TokenKind::UserDefined {
                continue;
            }
            let needle = self.texts[id as usize].as_str();
            if !text.contains(needle) {
                continue;
            }

            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(range) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut start = range.start;
                while let Some(at) = text[start..range.end].find(needle) {
                    let at = start + at;
                    if at > start {
                        next.push(Fragment::Text(start..at));
                    }
                    next.push(Fragment::Token(id));
                    start = at + needle.len();
                }
                if start < range.end {
                    next.push(Fragment::Text(start..range.end));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Pre-tokenizes `text` (free of special tokens) and appends the BPE
    /// tokens of each word.
    fn encode_text(&self, text: &str, out: &mut Vec<u32>) {
        let mut words = Vec::new();
        match self.pre {
            PreTokenizer::Gpt2 => split_gpt2(text, &mut words),
            PreTokenizer::Smollm => {
                // Number characters stand alone; GPT-2's rules split the
                // stretches between them, each on its own.
                let mut start = 0;
                for (at, c) in text.char_indices() {
                    if is_number(c) {
                        split_gpt2(&text[start..at], &mut words);
                        words.push(&text[at..at + c.len_utf8()]);
                        start = at + c.len_utf8();
                    }
                }
                split_gpt2(&text[start..], &mut words);
            }
        }
        for word in words {
            self.bpe(word.as_bytes(), out);
        }
    }

    /// Merges the bytes of one word into tokens, always taking the pair of
    /// adjacent symbols with the lowest merge rank, leftmost on ties. A heap
    /// of candidate pairs keeps long words O(n log n); a popped pair whose
    /// symbols have changed since it was pushed is skipped.
    fn bpe(&self, word: &[u8], out: &mut Vec<u32>) {
        if word.len() == 1 {
            let id = self.byte_tokens[word[0] as usize];
            if id != NO_TOKEN {
                out.push(id);
            }
            return;
        }

        // A doubly linked list of symbols, one per byte to start with.
        const NONE: usize = usize::MAX;
        let mut ids: Vec<u32> = word.iter().map(|&b| self.byte_tokens[b as usize]).collect();
        let mut prev: Vec<usize> = (0..word.len()).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=word.len()).collect();
        next[word.len() - 1] = NONE;

        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, ids: &[u32], l: usize, r: usize| {
            if l == NONE || r == NONE {
                return;
            }
            if let Some(&(rank, _)) = self.merges.get(&(ids[l], ids[r])) {
                heap.push(Reverse((rank, l, ids[l], ids[r])));
            }
        };
        for i in 1..word.len() {
            push(&mut heap, &ids, i - 1, i);
        }

        while let Some(Reverse((_, l, left_id, right_id))) = heap.pop() {
            let r = next[l];
            // A merged-away symbol holds NO_TOKEN, never a pushed id.
            if ids[l] != left_id || r == NONE || ids[r] != right_id {
                continue;
            }
            let Some(&(_, merged)) = self.merges.get(&(left_id, right_id)) else {
                continue;
            };

            // The right symbol joins the left one and leaves the list.
            ids[l] = merged;
            ids[r] = NO_TOKEN;
            next[l] = next[r];
            if next[r] != NONE {
                prev[next[r]] = l;
            }
            push(&mut heap, &ids, prev[l], l);
            push(&mut heap, &ids, l, next[l]);
        }

        // Bytes without a token never merged and are left out.
        let mut i = 0;
        while i != NONE {
            if ids[i] != NO_TOKEN {
                out.push(ids[i]);
            }
            i = next[i];
        }
    }
}

/// The token of each byte's byte-level character, or [`NO_TOKEN`]. Some
/// vocabularies lack a few (SmolLM2 has none for 21 bytes that hardly
/// occur in text, such as 0x04 and 0xF5-0xFF).
/// Limitation: such a byte in the input is dropped from the ids, as
/// llama.cpp drops it; decode(encode(text)) then loses it.
fn byte_tokens(ids: &HashMap<String, u32>) -> Result<[u32; 256], TokenizerError> {
    let mut byte_tokens = [NO_TOKEN; 256];
    for (b, c) in byte_chars().iter().enumerate() {
        if let Some(&id) = ids.get(c.encode_utf8(&mut [0; 4]) as &str) {
            byte_tokens[b] = id;
        }
    }
    let missing = byte_tokens.iter().filter(|&&t| t == NO_TOKEN).count();
    if missing == 256 {
        let detail = "the vocabulary has no byte-level tokens; it is not a \
                      byte-level BPE vocabulary"
            .to_string();
        return Err(TokenizerError::Malformed(detail));
    }
    if missing > 0 {
        tracing::debug!(missing, "vocabulary lacks tokens for some bytes");
    }

    Ok(byte_tokens)
}

/// Merge rank and resulting token by pair of adjacent tokens.
type Merges = HashMap<(u32, u32), (u32, u32)>;

/// Reads `merges` ("left right", in rank order). The space is searched
/// from the second byte on, like llama.cpp.
/// Limitation: a merge whose parts or result are not tokens is left out;
/// llama.cpp would still apply it to strings and then drop the unknown
/// result. The GGUF converters never write such merges.
fn parse_merges(merge_list: &[&str], ids: &HashMap<String, u32>) -> Result<Merges, TokenizerError> {
    let mut merges = HashMap::with_capacity(merge_list.len());
    for (rank, merge) in merge_list.iter().enumerate() {
        let split = merge
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(i, _)| i);
        let Some(split) = split else {
            let detail = format!("merge {rank} ({merge:?}) has no space");
            return Err(TokenizerError::Malformed(detail));
        };
        let (left, right) = (&merge[..split], &merge[split + 1..]);
        let joined = format!("{left}{right}");
        if let (Some(&l), Some(&r), Some(&m)) = (ids.get(left), ids.get(right), ids.get(&joined)) {
            // The first (lowest) rank of a repeated merge counts.
            merges.entry((l, r)).or_insert((rank as u32, m));
        }
    }

    Ok(merges)
}

/// What each token decodes to, end to end, and where each one ends,
/// following llama.cpp's token_to_piece with special tokens not rendered.
fn decode_pieces(texts: &[String], kinds: &[TokenKind]) -> (Vec<u8>, Vec<usize>) {
    let unbyte: HashMap<char, u8> = byte_chars()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    let mut pieces = Vec::new();
    let mut piece_ends = Vec::with_capacity(texts.len());
    for (text, kind) in texts.iter().zip(kinds) {
        match kind {
            TokenKind::Normal => {
                for c in text.chars() {
                    // A character outside the byte map (a malformed
                    // vocabulary) is kept as its own UTF-8.
                    match unbyte.get(&c) {
                        Some(&b) => pieces.push(b),
                        None => {
                            let mut utf8 = [0; 4];
                            let utf8 = c.encode_utf8(&mut utf8).as_bytes();
                            pieces.extend_from_slice(utf8)
                        }
                    }
                }
            }
            TokenKind::UserDefined => pieces.extend_from_slice(text.as_bytes()),
            _ => {}
        }
        piece_ends.push(pieces.len());
    }

    (pieces, piece_ends)
}

/// A stretch of input: text still to tokenize, or a special token.
#[derive(Debug)]
enum Fragment {
    Text(std::ops::Range<usize>),
    Token(u32),
}

/// Reads `tokenizer.ggml.token_type`, or takes every token as normal when
/// the file has none.
fn token_kinds(gguf: &GgufFile, n: usize) -> Result<Vec<TokenKind>, TokenizerError> {
    let key = "tokenizer.ggml.token_type";
    if gguf.metadata(key).is_none() {
        return Ok(vec![TokenKind::Normal; n]);
    }
    let types = gguf.get_i32_array(key)?;
    if types.len() != n {
        let detail = format!("{key} has {} entries for {n} tokens", types.len());
        return Err(TokenizerError::Malformed(detail));
    }
    types
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            TokenKind::from_type(t).ok_or_else(|| {
                let detail = format!("token {i} has unknown type {t}");
                TokenizerError::Malformed(detail)
            })
        })
        .collect()
}

/// GPT-2's map from bytes to printable characters: printable Latin-1
/// bytes stand for themselves, the rest (controls, space, 0x7F-0xA0, 0xAD)
/// take the code points from U+0100 on, in byte order.
fn byte_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        chars[b as usize] = if printable {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(0xFF + shifted).unwrap_or('\0')
        };
    }
    chars
}

/// The character classes GPT-2's split distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn in_table(table: &[(u32, u32)], c: char) -> bool {
    let c = c as u32;
    table
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// `\p{N}`: general categories Nd, Nl, No.
fn is_number(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    in_table(unicode_tables::NUMBERS, c)
}

fn class(c: char) -> Class {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => Class::Letter,
            '0'..='9' => Class::Number,
            // ASCII White_Space: tab, LF, VT, FF, CR, space.
            '\t'..='\r' | ' ' => Class::Space,
            _ => Class::Other,
        };
    }
    // Rust's is_whitespace is Unicode's White_Space, which is what
    // llama.cpp's \s means.
    if c.is_whitespace() {
        Class::Space
    } else if in_table(unicode_tables::LETTERS, c) {
        Class::Letter
    } else if in_table(unicode_tables::NUMBERS, c) {
        Class::Number
    } else {
        Class::Other
    }
}

/// Splits `text` by GPT-2's pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|
/// ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, appending the words to
/// `words`. The edges of `text` are hard: a lookahead sees nothing past
/// them.
fn split_gpt2<'t>(text: &'t str, words: &mut Vec<&'t str>) {
    if text.is_empty() {
        return;
    }
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let classes: Vec<Class> = chars.iter().map(|&(_, c)| class(c)).collect();
    let n = chars.len();
    let class_at = |i: usize| classes.get(i).copied();
    let byte_at = |i: usize| chars.get(i).map_or(text.len(), |&(b, _)| b);

    let mut start = 0;
    let mut pos = 0;
    while pos < n {
        let c = chars[pos].1;

        // Contractions, lowercase only: 's 't 'm 'd, then 're 've 'll.
        if c == '\'' && pos + 1 < n {
            let c1 = chars[pos + 1].1;
            let c2 = chars.get(pos + 2).map(|&(_, c)| c);
            let len = match (c1, c2) {
                ('s' | 't' | 'm' | 'd', _) => 2,
                ('r', Some('e')) | ('v', Some('e')) | ('l', Some('l')) => 3,
                _ => 0,
            };
            if len > 0 {
                pos += len;
                words.push(&text[byte_at(start)..byte_at(pos)]);
                start = pos;
                continue;
            }
        }

        // An optional space, then a run of letters, numbers or other
        // non-space characters.
        let lead = usize::from(c == ' ');
        let run = class_at(pos + lead).filter(|&k| k != Class::Space);
        if let Some(kind) = run {
            pos += lead;
            while class_at(pos) == Some(kind) {
                pos += 1;
            }
            words.push(&text[byte_at(start)..byte_at(pos)]);
            start = pos;
            continue;
        }

        // Whitespace: a run followed by a non-space character leaves its
        // last character to lead the next word; otherwise it is taken
        // whole. (`c` is whitespace here: every other character matched
        // above.)
        let mut spaces = 0;
        while class_at(pos + spaces) == Some(Class::Space) {
            spaces += 1;
        }
        pos += if spaces > 1 && pos + spaces < n {
            spaces - 1
        } else {
            spaces.max(1)
        };
        words.push(&text[byte_at(start)..byte_at(pos)]);
        start = pos;
    }
}

#[cfg(test)]
mod tests;
