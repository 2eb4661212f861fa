"""Scoring benchmark: log-likelihood requests per second, batched vs one request at a time.

Workloads (random ids, random-init preset):

* ``mc`` (default): multiple choice, ``--requests`` / ``--choices`` items (default 16 x 4 = 64
  requests), each item one context of 16..96 tokens shared by its choices of 1..8 tokens;
* ``independent``: every request its own context (16..96 tokens) and continuation (1..8).

Per mode, the same requests scored four ways, warmed up first (compilation excluded), timed
interleaved in one process (median of ``--reps``):

* ``one``: one `loglikelihood_tokens` call per request, batch_size 1, ``share_context=False``
  (what the authors' lm-eval wrapper does; mode "cached" = the two-pass G-cache scorer);
* ``one_packed``: the same, ``share_context=True`` (mode "cached": one packed pass per request
  instead of two; mode "full" never packs, so this is ``one`` again and is skipped);
* ``batched_unshared``: one call for all requests, batch ``--batch-size``, ``share_context=False``;
* ``batched``: one call, ``share_context=True`` (the default): requests sharing a context share
  one pass where the mode allows it exactly (mode "cached"; never mode "full").

Speed-ups are against ``one``; ``max_abs_score_diff`` compares each way's scores with ``one``'s.

    python experiments/bench_eval.py                                  # small, mc, modes full,cached
    python experiments/bench_eval.py --workload independent --json
    python experiments/bench_eval.py --quick                          # tiny preset, 4 x 4 requests
    python experiments/bench_eval.py --profile                        # mode full: time vs matmul floor
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def make_requests(cfg, n: int, seed: int = 0, ctx=(16, 96), cont=(1, 8), choices: int = 1):
    """n // choices contexts (n when choices == 1), each with `choices` continuations."""
    import numpy as np
    rng = np.random.default_rng(seed)
    hi = min(ctx[1], cfg.max_seq_len - cont[1])
    out = []
    for _ in range(max(1, n // choices)):
        c = rng.integers(4, cfg.vocab_size, rng.integers(min(ctx[0], hi), hi + 1)).tolist()
        for _ in range(choices):
            out.append((c, rng.integers(4, cfg.vocab_size, rng.integers(cont[0], cont[1] + 1)).tolist()))
    return out


def run(preset: str, n: int, modes, batch_size: int, reps: int, workload: str = "mc", choices: int = 4) -> list[dict]:
    import jax
    import numpy as np

    import pldr_jax
    from pldr_jax.eval.multiple_choice import loglikelihood_tokens

    cfg = pldr_jax.PLDRConfig.preset(preset)
    params = jax.jit(pldr_jax.init_params, static_argnums=0)(cfg, jax.random.key(0))
    k = choices if workload == "mc" else 1
    reqs = make_requests(cfg, n, choices=k)
    rows = []
    for mode in modes:
        ways = {
            "one": lambda: [loglikelihood_tokens(cfg, params, [r], mode=mode, batch_size=1, share_context=False)[0]
                            for r in reqs],
            "one_packed": lambda: [loglikelihood_tokens(cfg, params, [r], mode=mode, batch_size=1)[0] for r in reqs],
            "batched_unshared": lambda: loglikelihood_tokens(cfg, params, reqs, mode=mode, batch_size=batch_size,
                                                             share_context=False),
            "batched": lambda: loglikelihood_tokens(cfg, params, reqs, mode=mode, batch_size=batch_size),
        }
        if mode == "full":
            del ways["one_packed"]
        t0 = time.perf_counter()
        res = {w: f() for w, f in ways.items()}                   # warm-up: every bucket compiled
        warm_s = time.perf_counter() - t0
        times = {w: [] for w in ways}
        for _ in range(reps):                                      # interleaved: drift hits every way alike
            for w, f in ways.items():
                t0 = time.perf_counter()
                res[w] = f()
                times[w].append(time.perf_counter() - t0)
        base = np.array([x[0] for x in res["one"]])
        row = {"preset": preset, "workload": workload, "choices": k, "mode": mode, "requests": len(reqs),
               "batch_size": batch_size, "warmup_s": warm_s}
        for w in ways:
            s = statistics.median(times[w])
            sc = np.array([x[0] for x in res[w]])
            row[w] = {"s": s, "req_per_s": len(reqs) / s, "speedup": statistics.median(times["one"]) / s,
                      "max_abs_score_diff": float(np.abs(sc - base).max()),
                      "max_rel_score_diff": float((np.abs(sc - base) / np.maximum(np.abs(base), 1e-9)).max()),
                      "same_is_greedy": [x[1] for x in res[w]] == [x[1] for x in res["one"]]}
        rows.append(row)
    return rows


def profile(preset: str, shapes=((1, 64), (32, 64)), reps: int = 7) -> list[dict]:
    """Where a mode-"full" scoring call's time goes, per [B, L] shape, one process: the compiled
    `_score_full` (8 scored positions per row) with stacked layers (`lax.scan`, as loaded) and
    unstacked (a Python loop), with a given G_LM (no metric learner, no A), and the floor: a jitted
    chain of the same weights' q/k/v, out, w1/w2, w3 matmuls on B * L rows, nothing else.  FLOPs from
    XLA's cost analysis of the unstacked program (a `lax.scan` body is counted once, not per layer)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pldr_jax
    from pldr_jax.eval.multiple_choice import _score_full
    from pldr_jax.params import unstack_layers

    cfg = pldr_jax.PLDRConfig.preset(preset)
    params = jax.jit(pldr_jax.init_params, static_argnums=0)(cfg, jax.random.key(0))
    unstacked = unstack_layers(params)
    g = jnp.broadcast_to(jnp.eye(cfg.head_dim), (cfg.num_layers, 1, cfg.num_heads, cfg.head_dim, cfg.head_dim))

    def chain(x):
        for lp in unstacked["layers"]:
            y = sum(x @ lp[n]["kernel"] for n in ("wq", "wk", "wv"))
            y = y @ lp["dense"]["kernel"]
            h = (y @ lp["ffn"]["w1"]["kernel"]) * (y @ lp["ffn"]["w2"]["kernel"])
            x = h @ lp["ffn"]["w3"]["kernel"]
        return x
    chain = jax.jit(chain)

    from bench_decode import _median_ms          # experiments/: the same timing as the decode floors

    def median_ms(f, *a):
        return _median_ms(f, a, reps)

    out = []
    for B, L in shapes:
        rng = np.random.default_rng(0)
        inp = jnp.asarray(rng.integers(4, cfg.vocab_size, (B, L)), jnp.int32)
        pos = jnp.asarray(np.tile(np.arange(L - 8, L), (B, 1)), jnp.int32)
        tgt = jnp.asarray(rng.integers(4, cfg.vocab_size, (B, 8)), jnp.int32)
        x = jnp.asarray(rng.standard_normal((B * L, cfg.d_model)), jnp.float32)
        cost = _score_full.lower(cfg, unstacked, inp, pos, tgt, None).compile().cost_analysis()
        flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
        ms = {"stacked": median_ms(lambda *a: _score_full(cfg, params, *a, None), inp, pos, tgt),
              "unstacked": median_ms(lambda *a: _score_full(cfg, unstacked, *a, None), inp, pos, tgt),
              "given_g": median_ms(lambda *a: _score_full(cfg, params, *a, g), inp, pos, tgt),
              "matmul_floor": median_ms(chain, x)}
        out.append({"preset": preset, "B": B, "L": L, "gflop": flops / 1e9,
                    "ms_per_row": {k: v / B for k, v in ms.items()},
                    "gflop_per_s": {k: flops / 1e9 / (v / 1e3) for k, v in ms.items() if k != "matmul_floor"},
                    "stacked_over_floor": ms["stacked"] / ms["matmul_floor"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="model preset (default small; tiny with --quick)")
    ap.add_argument("--requests", type=int, default=None, help="number of requests (default 64; 16 with --quick)")
    ap.add_argument("--workload", choices=("mc", "independent"), default="mc")
    ap.add_argument("--choices", type=int, default=4, help="choices per item of the mc workload")
    ap.add_argument("--modes", default="full,cached", help="comma list of full,cached,causal")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", action="store_true", help="where a mode-full call's time goes (`profile`)")
    args = ap.parse_args(argv)
    if args.profile:
        prof = profile(args.preset or "small")
        if args.json:
            print(json.dumps({"profile": prof}))
            return 0
        for r in prof:
            ms = r["ms_per_row"]
            print(f"{r['preset']} [{r['B']}, {r['L']}]: {r['gflop'] / r['B']:.3f} GFLOP/row; ms/row: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
                  + f"; stacked {r['gflop_per_s']['stacked']:.0f} GFLOP/s, {r['stacked_over_floor']:.2f}x the matmul floor")
        return 0
    preset = args.preset or ("tiny" if args.quick else "small")
    n = args.requests or (16 if args.quick else 64)
    rows = run(preset, n, args.modes.split(","), args.batch_size, 1 if args.quick else args.reps,
               args.workload, args.choices)
    if args.json:
        print(json.dumps({"results": rows}))
        return 0
    for r in rows:
        print(f"{r['preset']} {r['workload']} ({r['choices']} per context) {r['mode']:6s} {r['requests']} requests:")
        for w in ("one", "one_packed", "batched_unshared", "batched"):
            if w in r:
                x = r[w]
                print(f"  {w:17s} {x['req_per_s']:8.1f} req/s {x['speedup']:5.2f}x  max |score diff| "
                      f"{x['max_abs_score_diff']:.2e}  same is_greedy: {x['same_is_greedy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
