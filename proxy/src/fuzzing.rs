//! Entry points for the fuzz targets in `fuzz/` (run by `make fuzz`) and
//! for the tests that replay their seeds and findings on stable Rust.
//!
//! Each takes arbitrary bytes, runs one piece of code that reads untrusted
//! input (a client's request body, an upstream's batch answer, an
//! upstream's event stream) and panics only when that code does, or when
//! an answer breaks what a caller relies on.

use serde_json::{json, Value};
use switchyard_policy::Endpoint;

use crate::api::ApiRequest;
use crate::coalesce::fuzzing::{check_split, check_sse_reader};

/// Parses `data` as a request body for each endpoint and, where it
/// parses, runs every rewrite a routing decision can ask for.
pub fn api_request(data: &[u8]) {
    let endpoints = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
    ];
    for endpoint in endpoints {
        let Ok(mut request) = ApiRequest::parse(endpoint, data) else {
            continue;
        };
        let _ = request.route_request(&std::sync::Arc::new(http::HeaderMap::new()));
        let _ = request.upstream_path();
        let _ = request.max_tokens();
        request.cap_max_tokens(16);
        request.add_system_instruction("Answer concisely.");
        request.keep_last_turns(1);
        assert!(
            request.max_tokens().is_some_and(|max| max <= 16),
            "a capped request asks for at most the cap"
        );
    }
}

/// Reads bytes off the front of a fuzz input; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&first, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        first
    }

    fn word(&mut self) -> u64 {
        (0..4).fold(0, |word, _| word << 8 | u64::from(self.byte()))
    }
}

/// Splits an upstream answer to a merged batch among its callers.
///
/// The first bytes choose the endpoint, `n`, the callers and their
/// prompts. Then either the rest is the upstream's body as it came, or
/// (more often useful) it shapes a well-formed answer with entries
/// shuffled, dropped, repeated or renumbered and usage of any size, so
/// that the fuzzer explores the splitting rather than JSON syntax.
pub fn batch_split(data: &[u8]) {
    let mut input = Bytes(data);
    let flags = input.byte();
    let endpoint = if flags & 1 == 0 {
        Endpoint::Completions
    } else {
        Endpoint::Embeddings
    };
    let n = u64::from(flags >> 2 & 3) + 1;
    let callers = usize::from(input.byte() % 4) + 1;
    let items: Vec<Vec<Value>> = (0..callers)
        .map(|_| {
            let count = usize::from(input.byte() % 4) + 1;
            let lengths: Vec<usize> = (0..count).map(|_| usize::from(input.byte())).collect();
            lengths
                .into_iter()
                .map(|len| json!("p".repeat(len)))
                .collect()
        })
        .collect();

    if flags & 2 == 0 {
        check_split(endpoint, items, n, input.0);
        return;
    }
    let per_item = if endpoint == Endpoint::Completions {
        n
    } else {
        1
    };
    let expected = items.iter().map(Vec::len).sum::<usize>() as u64 * per_item;
    let mut indices: Vec<u64> = (0..expected).collect();
    for i in (1..indices.len()).rev() {
        indices.swap(i, usize::from(input.byte()) % (i + 1));
    }
    match input.byte() % 8 {
        0 => drop(indices.pop()),
        1 => indices.push(u64::from(input.byte())),
        2 => {
            if let Some(first) = indices.first_mut() {
                *first = u64::from(input.byte());
            }
        }
        _ => {}
    }
    let (field, entries): (&str, Vec<Value>) = match endpoint {
        Endpoint::Completions => {
            let choice = |i: &u64| json!({"index": i, "text": "c".repeat((i % 7) as usize)});
            ("choices", indices.iter().map(choice).collect())
        }
        _ => {
            let vector = |i: &u64| json!({"index": i, "embedding": [0.5], "object": "embedding"});
            ("data", indices.iter().map(vector).collect())
        }
    };
    let mut answer = json!({"id": "fuzz", "model": "m", field: entries});
    if input.byte() % 4 != 0 {
        answer["usage"] = json!({
            "prompt_tokens": input.word(),
            "completion_tokens": input.word(),
            "total_tokens": 0,
        });
    }
    check_split(endpoint, items, n, answer.to_string().as_bytes());
}

/// Reads an event stream whole and cut into pieces; the first byte says
/// how many cuts, the next ones where.
pub fn sse_events(data: &[u8]) {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 8).min(rest.len());
    let (positions, stream) = rest.split_at(count);
    let mut cuts: Vec<usize> = positions.iter().map(|&at| usize::from(at)).collect();
    cuts.sort_unstable();
    check_sse_reader(stream, &cuts);
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A fuzz target's entry point.
    type Target = fn(&[u8]);

    /// Every fuzz target by the name of its directory under `fuzz/seeds`.
    const TARGETS: [(&str, Target); 3] = [
        ("api_request", api_request),
        ("batch_split", batch_split),
        ("sse_events", sse_events),
    ];

    /// The seeds and past findings of `target`, from `fuzz/seeds/`.
    fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/seeds")
            .join(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        let mut seeds: Vec<_> = entries
            .map(|entry| entry.unwrap().path())
            .map(|path| {
                let bytes = std::fs::read(&path).unwrap();
                (path, bytes)
            })
            .collect();
        seeds.sort();
        seeds
    }

    #[test]
    fn every_seed_and_past_finding_passes() {
        for (target, run) in TARGETS {
            let seeds = seeds(target);
            assert!(!seeds.is_empty(), "fuzz/seeds/{target} is empty");
            for (path, bytes) in seeds {
                let outcome = std::panic::catch_unwind(|| run(&bytes));
                assert!(outcome.is_ok(), "{} fails", path.display());
            }
        }
    }

    /// A few thousand pseudo-random inputs per target on every test run,
    /// so that stable CI exercises the checks `make fuzz` runs for longer.
    #[test]
    fn random_inputs_keep_every_check() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (target, run) in TARGETS {
            for case in 0..3000 {
                let len = (next() % 200) as usize;
                let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let outcome = std::panic::catch_unwind(|| run(&bytes));
                assert!(outcome.is_ok(), "{target} case {case}: {bytes:?}");
            }
        }
    }
}
