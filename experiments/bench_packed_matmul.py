"""The decode weights' products: XLA:CPU's dot against the native packed-panel matmul, same process.

For each row count M it times two jitted `fori_loop`s of one decode step's weight products (every
layer's fused q/k/v, output projection, fused w1/w2 and w3, then the vocabulary head, random weights
of the preset's shapes, chained so each product depends on the previous one): one through
`ops.layers.linear` with the [out, in] weights XLA:CPU is given without the kernel
(`decode.prepare_params(pack=False)`), one with the same weights packed in 16-output panels
(`pldr_jax.kernels.packed_matmul`, what a float32 decode uses on CPU).  Runs alternate (xla, packed,
xla, ...); each figure is the minimum ms per step over the rounds, and ratio = xla / packed.  It
also prints each form's largest error against a float64 product of one layer's fused w1/w2 at that M.

    python experiments/bench_packed_matmul.py                        # v51-110m, M = 1, 8, 16, 32, 64
    python experiments/bench_packed_matmul.py --dtypes bfloat16 --rows 8,16,32
    python experiments/bench_packed_matmul.py --json
"""

from __future__ import annotations

import argparse
import json
import time


def run(preset: str, rows: list[int], dtype: str, rounds: int, steps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pldr_jax
    from pldr_jax.kernels import pack_kernel, packed_matmul_available
    from pldr_jax.ops.layers import linear

    if not packed_matmul_available():
        raise SystemExit("the native packed matmul is unavailable here (PLDR_JAX_CPU_KERNELS=0 or no C++ compiler)")
    cfg = pldr_jax.PLDRConfig.preset(preset)
    D, F, V = cfg.d_model, cfg.dff, cfg.vocab_size
    shapes = [(D, 3 * D), (D, D), (D, 2 * F), (F, D)] * cfg.num_layers + [(D, V)]     # [in, out]
    dt = jnp.dtype(dtype)
    r = np.random.default_rng(0)
    kernels = [jnp.asarray(r.normal(size=s) / np.sqrt(s[0]), dt) for s in shapes]
    biases = [jnp.asarray(r.normal(size=s[1]) * 0.1, dt) for s in shapes]
    plain = [{"kernel_t": k.T, "bias": b} for k, b in zip(kernels, biases)]
    packed = [{"kernel_p": pack_kernel(k), "bias": b} for k, b in zip(kernels, biases)]

    def step_fn(layout):
        def run_chain(ws, x):
            def body(_, x):
                h = x
                for w, (k_in, _) in zip(ws, shapes):
                    h = linear(w, h[:, :k_in] if h.shape[1] >= k_in else jnp.pad(h, ((0, 0), (0, k_in - h.shape[1]))))
                return x + h[:, :1] * jnp.asarray(1e-30, x.dtype)
            return jax.lax.fori_loop(0, steps, body, x)
        return jax.jit(run_chain), layout

    forms = {"xla": step_fn(plain), "packed": step_fn(packed)}
    out = []
    for M in rows:
        x = jnp.asarray(r.normal(size=(M, D)), dt)
        for fn, ws in forms.values():
            jax.block_until_ready(fn(ws, x))
        best = {k: float("inf") for k in forms}
        for _ in range(rounds):
            for name, (fn, ws) in forms.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(ws, x))
                best[name] = min(best[name], (time.perf_counter() - t0) / steps * 1e3)
        w12 = 2                          # shapes[2]: the first layer's fused w1/w2, [D, 2F]
        xe = jnp.asarray(r.normal(size=(M, D)), dt)
        exact = np.asarray(xe, np.float64) @ np.asarray(kernels[w12], np.float64) + np.asarray(biases[w12], np.float64)
        err = {name: float(np.abs(np.asarray(linear(ws[w12], xe), np.float64) - exact).max())
               for name, (_, ws) in forms.items()}
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
