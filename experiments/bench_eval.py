"""Scoring benchmark: log-likelihood requests per second, batched vs one request at a time.

Multiple-choice-like requests (context 16..96 tokens, continuation 1..8 tokens, random ids) on a
random-init preset.  "one at a time" is one `loglikelihood_tokens` call per request with batch_size=1
(what the authors' lm-eval wrapper does); "batched" is one call for all requests (length-bucketed
batches, one compilation per bucket).  Both are warmed up first (compilation excluded), timed in the
same process, and their scores compared (they must be equal up to float32 rounding of different
batch shapes).

    python experiments/bench_eval.py                     # small preset, 64 requests, mode full
    python experiments/bench_eval.py --requests 64 --modes full,cached --json
    python experiments/bench_eval.py --quick             # tiny preset, 16 requests
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def make_requests(cfg, n: int, seed: int = 0, ctx=(16, 96), cont=(1, 8)):
    import numpy as np
    rng = np.random.default_rng(seed)
    hi = min(ctx[1], cfg.max_seq_len - cont[1])
    out = []
    for _ in range(n):
        c = rng.integers(4, cfg.vocab_size, rng.integers(min(ctx[0], hi), hi + 1)).tolist()
        t = rng.integers(4, cfg.vocab_size, rng.integers(cont[0], cont[1] + 1)).tolist()
        out.append((c, t))
    return out


def run(preset: str, n: int, modes, batch_size: int, reps: int) -> list[dict]:
    import jax
    import numpy as np

    import pldr_jax
    from pldr_jax.eval.multiple_choice import loglikelihood_tokens

    cfg = pldr_jax.PLDRConfig.preset(preset)
    params = jax.jit(pldr_jax.init_params, static_argnums=0)(cfg, jax.random.key(0))
    reqs = make_requests(cfg, n)
    rows = []
    for mode in modes:
        one = lambda: [loglikelihood_tokens(cfg, params, [r], mode=mode, batch_size=1)[0] for r in reqs]
        batched = lambda: loglikelihood_tokens(cfg, params, reqs, mode=mode, batch_size=batch_size)
        t0 = time.perf_counter()
        a, b = one(), batched()                       # warm-up: every bucket compiled
        warm_s = time.perf_counter() - t0
        t_one, t_bat = [], []
        for _ in range(reps):                         # interleaved, so drift hits both alike
            t0 = time.perf_counter()
            a = one()
            t_one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = batched()
            t_bat.append(time.perf_counter() - t0)
        la, lb = np.array([x[0] for x in a]), np.array([x[0] for x in b])
        one_s, bat_s = statistics.median(t_one), statistics.median(t_bat)
        rows.append({"preset": preset, "mode": mode, "requests": n, "batch_size": batch_size,
                     "one_at_a_time_req_per_s": n / one_s, "batched_req_per_s": n / bat_s,
                     "speedup": one_s / bat_s, "one_at_a_time_s": one_s, "batched_s": bat_s,
                     "warmup_s": warm_s, "max_abs_score_diff": float(np.abs(la - lb).max()),
                     "max_rel_score_diff": float((np.abs(la - lb) / np.maximum(np.abs(la), 1e-9)).max()),
                     "same_is_greedy": [x[1] for x in a] == [x[1] for x in b]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="model preset (default small; tiny with --quick)")
    ap.add_argument("--requests", type=int, default=None, help="number of requests (default 64; 16 with --quick)")
    ap.add_argument("--modes", default="full", help="comma list of full,cached,causal")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    preset = args.preset or ("tiny" if args.quick else "small")
    n = args.requests or (16 if args.quick else 64)
    rows = run(preset, n, args.modes.split(","), args.batch_size, 1 if args.quick else args.reps)
    if args.json:
        print(json.dumps({"results": rows}))
        return 0
    for r in rows:
        print(f"{r['preset']} {r['mode']:6s} {r['requests']} requests: one at a time {r['one_at_a_time_req_per_s']:7.1f} "
              f"req/s, batched (batch {r['batch_size']}) {r['batched_req_per_s']:7.1f} req/s = {r['speedup']:.1f}x; "
              f"max |score diff| {r['max_abs_score_diff']:.2e}, same is_greedy: {r['same_is_greedy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
