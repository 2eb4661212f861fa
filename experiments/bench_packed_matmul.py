"""The decode weights' products: XLA:CPU's dot against the native packed-panel matmul, same process.

For each row count M it times `bench_decode.matmul_floor_fn` (a jitted `fori_loop` of one decode
step's weight products: every layer's fused q/k/v, output projection, fused w1/w2 and w3, then the
vocabulary head, chained) over the preset's random-init weights prepared twice by
`decode.prepare_params` in the dtype asked for: packed in 16-output panels (`pldr_jax.kernels.
packed_matmul`, what a float32 decode uses on CPU) and, with pack=False, as XLA:CPU is given them
without the kernel.  Runs alternate (xla, packed, xla, ...); each figure is the minimum ms per step
over the rounds, and ratio = xla / packed.  It also prints each form's largest error against a
float64 product of the first layer's fused w1/w2 at that M.

    python experiments/bench_packed_matmul.py                        # v51-110m, M = 1, 8, 16, 32, 64
    python experiments/bench_packed_matmul.py --dtypes bfloat16 --rows 8,16,32
    python experiments/bench_packed_matmul.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def run(preset: str, rows: list[int], dtype: str, rounds: int, steps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pldr_jax
    from pldr_jax.decode import prepare_params
    from pldr_jax.kernels import packed_matmul_available
    from pldr_jax.kernels.packed_matmul import unpack_kernel
    from pldr_jax.ops.layers import linear

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_decode import matmul_floor_fn

    if not packed_matmul_available():
        raise SystemExit("the native packed matmul is unavailable here (PLDR_JAX_CPU_KERNELS=0 or no C++ compiler)")
    cfg = pldr_jax.PLDRConfig.preset(preset, dtype=dtype, param_dtype=dtype)
    params = jax.jit(pldr_jax.init_params, static_argnums=0)(cfg, jax.random.key(0))
    run_cfg, packed = prepare_params(cfg, params, 1, bf16_min_batch=0, pack=True)
    plain = prepare_params(cfg, params, 1, bf16_min_batch=0, pack=False)[1]
    w12 = {name: p["layers"][0]["ffn"]["w12"] for name, p in (("xla", plain), ("packed", packed))}
    bias = w12["packed"].bias                                                 # a decode.layouts.PackedLinear
    kernel = unpack_kernel(w12["packed"].kernel_p, bias.shape[0])             # [D, 2F]
    r = np.random.default_rng(0)
    out = []
    for M in rows:
        floors = {"xla": matmul_floor_fn(run_cfg, plain, M, steps), "packed": matmul_floor_fn(run_cfg, packed, M, steps)}
        best = {k: float("inf") for k in floors}
        for _ in range(rounds):
            for name, one_run in floors.items():
                best[name] = min(best[name], one_run())
        x = jnp.asarray(r.normal(size=(M, cfg.d_model)), run_cfg.dtype)
        exact = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
        err = {name: float(np.abs(np.asarray(linear(w, x), np.float64) - exact).max()) for name, w in w12.items()}
        out.append({"rows": M, "dtype": dtype, "xla_ms": best["xla"], "packed_ms": best["packed"],
                    "ratio": best["xla"] / best["packed"], "max_err_xla": err["xla"], "max_err_packed": err["packed"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v51-110m")
    ap.add_argument("--rows", default="1,8,16,32,64", help="comma list of row counts M")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="decode steps per timed run")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 2 steps")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rounds, steps = (2, 2) if args.quick else (args.rounds, args.steps)
    rows = [int(m) for m in args.rows.split(",")]
    results = [res for d in args.dtypes.split(",") for res in run(args.preset, rows, d, rounds, steps)]
    if args.json:
        print(json.dumps({"preset": args.preset, "rounds": rounds, "steps": steps, "results": results}))
    else:
        for res in results:
            print(f"{args.preset} {res['dtype']:9s} M={res['rows']:4d}: xla {res['xla_ms']:8.2f} ms/step  "
                  f"packed {res['packed_ms']:8.2f} ms/step  xla/packed {res['ratio']:5.2f}  "
                  f"max err vs float64: xla {res['max_err_xla']:.2e} packed {res['max_err_packed']:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
