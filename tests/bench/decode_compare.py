#!/usr/bin/env python3
"""Decode tokens/s of Switchyard's executor against llama.cpp, in one run
on one machine, and the ratios the executor is held to:

- batch 1: executor / llama.cpp, at each thread count (target >= 1);
- batch 8 / batch 1 of the executor, in total tokens/s (target >= 4);
- resident memory / (model file + KV cache) (target < 1.5).

Runs `cargo bench -p switchyard-executor --bench decode` and
`tests/bench/llama_cpp_decode.py` (with .venv-llama's interpreter, which
`make bench-llama-venv` builds) with the same prompt, steps and threads.
Usage: decode_compare.py [--threads 1 2] [--batch 1 8] [--steps 128]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LLAMA_PYTHON = ROOT / ".venv-llama" / "bin" / "python"


def lines_of(cmd):
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=128)
    args = p.parse_args()
    if not LLAMA_PYTHON.exists():
        sys.exit("decode_compare: .venv-llama is missing; run "
                 "`make bench-llama-venv` first")

    batches = ",".join(map(str, args.batch))
    results = {}
    for threads in args.threads:
        ours = lines_of(["cargo", "bench", "--quiet", "-p",
                         "switchyard-executor", "--bench", "decode", "--",
                         "--threads", str(threads), "--batch", batches,
                         "--steps", str(args.steps)])
        theirs = lines_of([str(LLAMA_PYTHON), "tests/bench/llama_cpp_decode.py",
                           "--threads", str(threads), "--steps",
                           str(args.steps), "--batch", *map(str, args.batch)])
        for r in ours + theirs:
            results[(r["engine"], threads, r["batch"])] = r

    print(f"\ndecode tokens/s (total over the batch), {args.steps} greedy steps")
    print(f"{'threads':>7} {'batch':>5} {'switchyard':>11} {'llama.cpp':>10} "
          f"{'ratio':>6}")
    for threads in args.threads:
        for batch in args.batch:
            ours = results[("switchyard", threads, batch)]["decode_tokens_per_s"]
            theirs = results[("llama.cpp", threads, batch)]["decode_tokens_per_s"]
            print(f"{threads:>7} {batch:>5} {ours:>11.1f} {theirs:>10.1f} "
                  f"{ours / theirs:>6.2f}")

    lo, hi = min(args.batch), max(args.batch)
    print(f"\nexecutor scaling, batch {hi} / batch {lo} (target >= 4 at 8/1):")
    for threads in args.threads:
        a = results[("switchyard", threads, lo)]["decode_tokens_per_s"]
        b = results[("switchyard", threads, hi)]["decode_tokens_per_s"]
        print(f"  {threads} thread(s): {b / a:.2f}")

    print("\nexecutor memory, resident / (model file + KV cache) "
          "(target < 1.5):")
    for threads in args.threads:
        for batch in args.batch:
            r = results[("switchyard", threads, batch)]
            budget = r["model_file_bytes"] + r["kv_cache_bytes"]
            print(f"  {threads} thread(s), batch {batch}: "
                  f"{r['rss_bytes'] / 2**20:.0f} MiB / {budget / 2**20:.0f} MiB"
                  f" = {r['rss_bytes'] / budget:.2f}")


if __name__ == "__main__":
    main()
