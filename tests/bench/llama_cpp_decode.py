#!/usr/bin/env python3
"""Greedy decode speed of llama.cpp on SmolLM2-135M-Instruct: the baseline
that the in-process executor's benchmark is compared with.

For each batch size B, B sequences (seq ids 0..B-1) are each prefilled with
the same prompt, all in one llama_decode call; then every step decodes one
token for every sequence in one llama_decode call, the next token being the
argmax of its logits. Steps continue past end-of-sequence tokens: this
measures speed, not answers. Each batch size gets a fresh context with room
for all its sequences, and a warm-up run before the measured ones.

Prints one JSON line per batch size on standard output:

    engine, model, threads, batch, prompt_tokens, steps, runs
    prefill_ms           the prefill call (B * prompt_tokens tokens)
    decode_tokens_per_s  B * steps over the time spent in llama_decode
                         (llama.cpp's own speed; argmax excluded)
    loop_tokens_per_s    B * steps over the whole loop, argmax (numpy) and
                         filling the batch included
    decode_ms_per_step   time in llama_decode per step

Timed values are the median of --runs runs.

It drives llama-cpp-python's low-level bindings (0.3.36) directly, so the
Python wrapper's own overhead is left out. Run it with the interpreter from
`make bench-llama-venv`:

    .venv-llama/bin/python tests/bench/llama_cpp_decode.py --threads 2
"""

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

NEED_VENV = (
    "llama_cpp_decode: {} is not installed for {}; run this script with "
    ".venv-llama/bin/python (make bench-llama-venv builds it)"
)

try:
    import llama_cpp
except ImportError:
    sys.exit(NEED_VENV.format("llama-cpp-python", sys.executable))
try:
    import numpy as np
except ImportError:
    sys.exit(NEED_VENV.format("numpy", sys.executable))

ROOT = Path(__file__).resolve().parents[2]
# The executor's tests look in the same places.
DEFAULT_MODEL = Path(os.environ.get(
    "SWITCHYARD_MODEL",
    ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))

# A chat prompt in the model's own template: 39 tokens, and an answer that
# runs past 48 tokens without end-of-sequence.
DEFAULT_PROMPT = (
    "<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
    "<|im_start|>user\n"
    "Write a Python function that adds two numbers.<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# llama.cpp's default; a larger physical batch only costs memory.
MAX_UBATCH = 512

# llama.cpp pads each sequence's context to a multiple of this; asking for
# a multiple keeps it from rounding (and warning).
CTX_PAD = 256

# ggml's log levels (ggml.h): warnings and errors are shown without
# --verbose; CONT continues the previous message.
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_CONT = 5


def parse_args():
    p = argparse.ArgumentParser(
        description="llama.cpp greedy decode tokens/s, one JSON line "
        "per batch size"
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="GGUF file (default: $SWITCHYARD_MODEL, else "
                   "models/SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="threads for decode and prefill (default: the "
                   "CPUs this process may use, %(default)s)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8],
                   metavar="B",
                   help="batch sizes, sequences decoded together "
                   "(default: 1 8)")
    p.add_argument("--steps", type=int, default=128,
                   help="decode steps per run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3,
                   help="measured runs per batch size; the median is "
                   "reported (default: %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="prompt text, special tokens parsed (default: a "
                   "39-token chat prompt)")
    p.add_argument("--show", action="store_true",
                   help="print sequence 0's continuation to stderr")
    p.add_argument("--verbose", action="store_true",
                   help="show llama.cpp's log")
    args = p.parse_args()
    for name in ("threads", "steps", "runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if min(args.batch) < 1:
        p.error("--batch sizes must be >= 1")
    return args


def default_threads():
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def quiet_llama_log(verbose):
    """Sends llama.cpp's log to stderr: warnings and errors only, unless
    `verbose`."""
    state = {"show": True}

    @llama_cpp.llama_log_callback
    def log(level, text, _user_data):
        if level != GGML_LOG_LEVEL_CONT:
            state["show"] = verbose or level >= GGML_LOG_LEVEL_WARN
        if state["show"]:
            sys.stderr.write(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    # The C side keeps only the pointer; the callback must outlive it.
    return log


def tokenize(vocab, text):
    raw = text.encode("utf-8")
    cap = len(raw) + 16
    buf = (llama_cpp.llama_token * cap)()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, cap,
                                 False, True)
    if n < 0:
        raise RuntimeError(f"prompt needs {-n} tokens, buffer holds {cap}")
    return list(buf[:n])


def piece(vocab, token):
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[:max(n, 0)].decode("utf-8", "replace")


def fill(batch, entries):
    """Writes (token, pos, seq_id, wants_logits) entries into `batch`."""
    for i, (token, pos, seq, out) in enumerate(entries):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = out
    batch.n_tokens = len(entries)


def decode(ctx, batch):
    """Runs llama_decode to completion; returns the seconds it took."""
    t0 = time.perf_counter()
    rc = llama_cpp.llama_decode(ctx, batch)
    llama_cpp.llama_synchronize(ctx)
    elapsed = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    return elapsed


def argmax(ctx, index, n_vocab):
    logits = llama_cpp.llama_get_logits_ith(ctx, index)
    return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())


def run_once(ctx, batch, prompt, n_seq, steps, n_vocab):
    """One prefill and `steps` decode steps over `n_seq` sequences.

    Returns (prefill_s, decode_s, loop_s, seq 0's tokens).
    """
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    n_prompt = len(prompt)

    # Prefill: every sequence its own copy of the prompt; logits only for
    # each sequence's last prompt token.
    fill(batch, [
        (token, pos, seq, pos == n_prompt - 1)
        for seq in range(n_seq)
        for pos, token in enumerate(prompt)
    ])
    prefill_s = decode(ctx, batch)
    last = [argmax(ctx, seq * n_prompt + n_prompt - 1, n_vocab)
            for seq in range(n_seq)]
    shown = [last[0]]

    # Decode: output i of each step belongs to sequence i.
    decode_s = 0.0
    t0 = time.perf_counter()
    for step in range(steps):
        pos = n_prompt + step
        fill(batch, [(last[seq], pos, seq, True) for seq in range(n_seq)])
        decode_s += decode(ctx, batch)
        last = [argmax(ctx, seq, n_vocab) for seq in range(n_seq)]
        shown.append(last[0])
    loop_s = time.perf_counter() - t0
    return prefill_s, decode_s, loop_s, shown


def bench(model, vocab, args, prompt, n_seq):
    n_prompt = len(prompt)
    per_seq = n_prompt + args.steps + 1
    per_seq = -(-per_seq // CTX_PAD) * CTX_PAD
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_seq * per_seq
    params.n_batch = n_seq * n_prompt
    params.n_ubatch = max(n_seq, min(params.n_batch, MAX_UBATCH))
    params.n_seq_max = n_seq
    params.n_threads = args.threads
    params.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"could not create a context for batch {n_seq}")
    if llama_cpp.llama_n_ctx_seq(ctx) < per_seq:
        llama_cpp.llama_free(ctx)
        raise RuntimeError(
            f"batch {n_seq}: llama.cpp gave each sequence "
            f"{llama_cpp.llama_n_ctx_seq(ctx)} positions, {per_seq} needed")
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    try:
        # The first run pays for page faults on the mapped weights and for
        # allocating compute buffers.
        run_once(ctx, batch, prompt, n_seq, min(args.steps, 8), n_vocab)
        runs = [run_once(ctx, batch, prompt, n_seq, args.steps, n_vocab)
                for _ in range(args.runs)]
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)

    if args.show:
        text = "".join(piece(vocab, t) for t in runs[0][3])
        print(f"batch {n_seq}, sequence 0: {runs[0][3]}\n{text!r}",
              file=sys.stderr)

    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    loop_s = statistics.median(r[2] for r in runs)
    tokens = n_seq * args.steps
    return {
        "engine": "llama.cpp",
        "model": args.model.name,
        "threads": args.threads,
        "batch": n_seq,
        "prompt_tokens": n_prompt,
        "steps": args.steps,
        "runs": args.runs,
        "prefill_ms": round(prefill_s * 1e3, 2),
        "decode_tokens_per_s": round(tokens / decode_s, 1),
        "loop_tokens_per_s": round(tokens / loop_s, 1),
        "decode_ms_per_step": round(decode_s * 1e3 / args.steps, 3),
    }


def main():
    args = parse_args()
    if not args.model.is_file():
        sys.exit(f"llama_cpp_decode: no model at {args.model}; "
                 "run `make model`")

    log = quiet_llama_log(args.verbose)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(
        str(args.model).encode(), llama_cpp.llama_model_default_params())
    if not model:
        sys.exit(f"llama_cpp_decode: llama.cpp could not load {args.model}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        prompt = tokenize(vocab, args.prompt)
        if not prompt:
            sys.exit("llama_cpp_decode: the prompt has no tokens")
        for n_seq in args.batch:
            print(json.dumps(bench(model, vocab, args, prompt, n_seq)),
                  flush=True)
    except RuntimeError as e:
        sys.exit(f"llama_cpp_decode: {e}")
    finally:
        llama_cpp.llama_model_free(model)
        llama_cpp.llama_backend_free()
    del log


if __name__ == "__main__":
    main()
