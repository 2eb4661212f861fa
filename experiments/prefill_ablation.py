"""The prefill beside its matmul floor, with parts of it put back as they were or removed, in one process.

Each variant is the decoder's prefill (`decode.step.prefill`, v51 110M random-init weights prepared
as for decoding, batch x prompt_len tokens, a KV buffer of 2 x prompt_len) jitted on its own, with
one module function swapped while it is traced; every variant and the floor
(`bench_decode.prefill_floor_ms`: the same prepared weights' products at the prefill's shapes, the
metric learner's GLU products included, nothing else) are timed round by round, interleaved, so
the load of a shared machine falls on all of them alike.  Reported per variant: the fastest and
the median round (ms), the fastest over the floor's fastest, and the difference to ``prefill``.

* ``prefill``: as a `Sampler` call runs it (no stacked deductive outputs, `step.prefill`
  ``stack_deductive=False``);
* ``before``: the two changes of issue 13's prefill work undone (each layer's q / k rotation
  computes its RoPE cos / sin in the graph; the prompt's deductive outputs returned stacked
  [L, B, H, dk, dk]) -- the prefill of 7d7988f;
* ``in_graph_rope`` / ``stacked``: one of the two undone;
* ``exp_log_power``: A_LM ** P as exp(P log A_LM) instead of ``jnp.power`` (a cheaper form measured
  and not adopted: within float32 rounding, not bit-identical, no gain in the whole prefill);
* removed, timing only (the values differ): ``kv_unpadded`` (keys / values returned as computed,
  [B, P, H, dk], no transposed padded buffers), ``no_deduce`` (A -> A_LM -> A_P -> G_LM replaced
  by G_LM = A), ``no_rope``, ``no_attention`` (the attention output replaced by q).

    python experiments/prefill_ablation.py --batch 8 --rounds 9
    python experiments/prefill_ablation.py --batch 1 --rounds 15 --json
    python experiments/prefill_ablation.py --quick          # tiny preset, batch 2, 8 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

VARIANTS = ("prefill", "before", "in_graph_rope", "stacked", "exp_log_power", "kv_unpadded", "no_deduce", "no_rope",
            "no_attention")


def _exp_log_derive_g(p_plga, A):
    """`ops.deductive.derive_g` with A_LM ** P as exp(P log A_LM) (A_LM > 0)."""
    import jax.numpy as jnp

    from pldr_jax.ops.deductive import iswiglu
    f = lambda k: p_plga[k].astype(jnp.float32)
    A = A.astype(jnp.float32)
    A_LM = iswiglu(jnp.einsum("hij,bhjk->bhik", f("W"), A) + f("b")) + 1e-9
    A_P = jnp.exp(f("P") * jnp.log(A_LM))
    return A_LM, A_P, jnp.einsum("hij,bhjk->bhik", f("a"), A_P) + f("ba")


def _build(name: str, run_cfg, max_len: int, kv_dtype):
    """The jitted prefill of variant `name`, traced (on its first call) with its swaps in place:
    returns a function that applies the swaps around each call's tracing."""
    import jax

    from pldr_jax import layer
    from pldr_jax.decode import step

    import jax.numpy as jnp

    from pldr_jax.ops.rope import rope_tables
    in_graph = lambda P, dk, theta: rope_tables(jnp.arange(P, dtype=jnp.int32), dk, theta)   # traced, not constants
    swaps = {
        "before": {(step, "prompt_rope_tables"): in_graph},
        "in_graph_rope": {(step, "prompt_rope_tables"): in_graph},
        "exp_log_power": {(layer, "derive_g"): _exp_log_derive_g},
        "kv_unpadded": {(step, "_kv_buffer"): lambda t, S, dt: t},
        "no_deduce": {(layer, "derive_g"): lambda p, A: (A, A, A)},
        "no_rope": {(layer, "apply_rope"): lambda x, *a, **k: x},
        "no_attention": {(layer, "plga_attention"): lambda q, k, v, g, m, **kw: q},
    }.get(name, {})
    stack = name in ("before", "stacked")
    fn = jax.jit(lambda p, t, l: step.prefill(run_cfg, p, t, l, None, max_len, kv_dtype, stack_deductive=stack))

    def call(*args):
        saved = {k: getattr(*k) for k in swaps}
        for (mod, attr), f in swaps.items():
            setattr(mod, attr, f)
        try:
            return fn(*args)
        finally:
            for (mod, attr), f in saved.items():
                setattr(mod, attr, f)
    return call


def run(batch: int, dtype: str, preset: str, prompt_len: int, rounds: int, variants) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pldr_jax
    from pldr_jax.backend import choices
    from pldr_jax.decode import prepare_params

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_decode import prefill_floor_ms

    cfg = pldr_jax.PLDRConfig.preset(preset, dtype=dtype, param_dtype=dtype)
    params = jax.jit(pldr_jax.init_params, static_argnums=0)(cfg, jax.random.key(0))
    run_cfg, rp = prepare_params(cfg, params, batch)
    del params
    tokens = jnp.asarray(np.random.default_rng(1).integers(4, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    kv_dtype = choices().kv_cache_dtype
    fns = {n: _build(n, run_cfg, 2 * prompt_len, kv_dtype) for n in variants}
    for f in fns.values():
        jax.block_until_ready(f(rp, tokens, lengths))                       # compile + warm up
    times = {n: [] for n in fns}
    floor = []
    for r in range(rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(rp, tokens, lengths))
            times[n].append(1e3 * (time.perf_counter() - t0))
        floor.append(prefill_floor_ms(run_cfg, rp, batch, prompt_len, reps=1))
    fl = min(floor)
    base = times.get("prefill")
    rows = []
    med = statistics.median
    for n, t in times.items():
        rows.append({"variant": n, "min_ms": min(t), "median_ms": med(t), "over_floor": min(t) / fl,
                     "minus_prefill_ms": None if base is None else min(t) - min(base),
                     "median_minus_prefill_ms": None if base is None else med(t) - med(base)})
    return {"batch": batch, "dtype": dtype, "compute_dtype": run_cfg.dtype, "preset": preset, "prompt_len": prompt_len,
            "rounds": rounds, "floor_min_ms": fl, "floor_median_ms": statistics.median(floor), "variants": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--preset", default="v51-110m")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    ap.add_argument("--quick", action="store_true", help="tiny preset, batch 2, 8-token prompts, 2 rounds")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.prompt_len, args.rounds = "tiny", 2, 8, 2
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    res = run(args.batch, args.dtype, args.preset, args.prompt_len, args.rounds, variants)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['preset']} batch {res['batch']} x {res['prompt_len']} {res['dtype']} [{res['compute_dtype']}]: "
          f"floor {res['floor_min_ms']:.1f} ms (median {res['floor_median_ms']:.1f}), {res['rounds']} rounds")
    for r in res["variants"]:
        d = "" if r["minus_prefill_ms"] is None else (f"  vs prefill {r['minus_prefill_ms']:+7.1f} ms "
                                                      f"(median {r['median_minus_prefill_ms']:+7.1f})")
        print(f"  {r['variant']:14s} {r['min_ms']:8.1f} ms (median {r['median_ms']:8.1f})  "
              f"{r['over_floor']:.3f}x floor{d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
