"""lm-eval `generate_until` speed: batched (`PLDRLM(batch_size=B)`) vs one request at a time.

N requests with ragged random prompts (lengths spread over [min_prompt, max_prompt]), greedy,
``max_gen_toks`` new tokens each, no ``until`` hit (random ids): the work lm-eval hands the adapter
for a generation task.  Each batch size is warmed up once (compilations), then timed ``--reps``
times (median); the ratio one-at-a-time / batched is measured in the same run.  Every batch size
must return exactly the one-at-a-time strings (checked).

    python experiments/bench_generate_until.py                 # preset:small, 32 requests, B = 1, 8, 32
    python experiments/bench_generate_until.py --quick         # preset:tiny, 8 short requests, B = 1, 4
    python experiments/bench_generate_until.py --model runs/small
    python experiments/bench_generate_until.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(model: str, n_requests: int, batches: list[int], min_prompt: int, max_prompt: int, max_gen_toks: int,
        reps: int, seed: int = 0) -> dict:
    import jax
    import numpy as np

    from pldr_jax.eval.harness import PLDRLM
    from pldr_jax.g_sources import load_model_spec

    cfg, params, _ = load_model_spec(model)
    rng = np.random.default_rng(seed)
    lens = np.linspace(min_prompt, max_prompt, n_requests).astype(int)
    rng.shuffle(lens)
    reqs = [([int(t) for t in rng.integers(4, cfg.vocab_size, n)], {"until": ["never"], "max_gen_toks": max_gen_toks})
            for n in lens]
    rows, ref = [], None
    for b in batches:
        lm = PLDRLM(cfg, params, batch_size=b)
        t0 = time.perf_counter()
        out = lm.generate_until(reqs, disable_tqdm=True)          # warm-up: compiles this batch's shapes
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = lm.generate_until(reqs, disable_tqdm=True)
            times.append(time.perf_counter() - t0)
        ref = out if ref is None else ref
        new_tokens = sum(len(s.split()) for s in out)
        med = statistics.median(times)
        rows.append({"batch_size": b, "median_s": med, "first_call_s": first, "new_tokens": new_tokens,
                     "tokens_per_s": new_tokens / med, "same_as_first": out == ref})
    base = rows[0]["median_s"]
    for r in rows:
        r["speedup_vs_first"] = base / r["median_s"]
    return {"model": model, "requests": n_requests, "prompt_lengths": [int(min_prompt), int(max_prompt)],
            "max_gen_toks": max_gen_toks, "reps": reps, "backend": jax.default_backend(), "results": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="preset:small", help="'preset:<name>[:seed]' (random init) or a checkpoint")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32", help="batch sizes, the first is the baseline")
    ap.add_argument("--min-prompt", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=96)
    ap.add_argument("--max-gen-toks", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="8 requests of 4-14 tokens, 6 new tokens, batches 1,4, "
                                                         "1 rep (model: preset:tiny unless --model is given)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.requests, a.batches, a.min_prompt, a.max_prompt, a.max_gen_toks, a.reps = 8, "1,4", 4, 14, 6, 1
        a.model = "preset:tiny" if a.model == ap.get_default("model") else a.model
    res = run(a.model, a.requests, [int(b) for b in a.batches.split(",")], a.min_prompt, a.max_prompt,
              a.max_gen_toks, a.reps)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"generate_until, {res['model']}, {res['requests']} requests, prompts "
              f"{res['prompt_lengths'][0]}-{res['prompt_lengths'][1]} tokens, {res['max_gen_toks']} new tokens, "
              f"greedy, {res['backend']}")
        print("| batch_size | median s | first call s | tok/s | speed-up vs batch 1 | same strings |")
        print("|---|---|---|---|---|---|")
        for r in res["results"]:
            print(f"| {r['batch_size']} | {r['median_s']:.3f} | {r['first_call_s']:.2f} | {r['tokens_per_s']:.1f} | "
                  f"{r['speedup_vs_first']:.2f}x | {r['same_as_first']} |")
    return 0 if all(r["same_as_first"] for r in res["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
