"""Training-step benchmark: the paper's v51 110M model, batch 4 x 256 tokens, float32 and bfloat16.

One step = forward + masked cross-entropy + backward + clip by value 1.0 + AdamW + LR schedule,
the same work as the reference's PyTorch step in ../shared/reference/torch_cpu_baseline.json
(4.31 s per step, 238 tokens/s on this 2-core CPU).  Each dtype runs in its own subprocess (so
`peak_rss_mb` is that run's own), compiles, runs `--warmup` untimed steps (the first touches fresh
memory) and reports the median of `--steps` timed steps.

The machine is shared and its speed drifts, so every run also times a float32 matmul of the
output head's shape (1024 x 896 x 32000) right before the steps: `matmul_gflops` is what the CPU
delivered then, and `flops_per_step / step_s` over it (`efficiency`) is the load-independent figure.

    python experiments/bench_train.py                 # human-readable
    python experiments/bench_train.py --json          # one JSON object: {"results": [...], ...}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from pldr_jax.train.host_memory import huge_page_env, huge_pages_active

REFERENCE = {"step_s": 4.311, "tokens_per_s": 237.5, "source": "../shared/reference/torch_cpu_baseline.json"}


def step_flops(cfg, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of one training step (forward x 3), the attention and metric learner included."""
    T, D, F, H, dk, V = batch * seq_len, cfg.d_model, cfg.dff, cfg.num_heads, cfg.head_dim, cfg.vocab_size
    per_layer = 2 * T * D * D * 4 + 2 * T * D * F * 3                 # q, k, v, dense; FFN
    per_layer += 2 * 2 * batch * H * seq_len * seq_len * dk           # scores, E @ v
    per_layer += 2 * T * H * dk * dk * 2                             # A = q^T q; q @ G
    if cfg.learned_g:
        rows = batch * H * dk
        per_layer += cfg.num_reslayerA * cfg.num_denseA * 3 * 2 * rows * dk * cfg.A_dff
        per_layer += 2 * 2 * batch * H * dk ** 3                     # W @ A, a @ A_P
    fwd = cfg.num_layers * per_layer + 2 * T * D * V
    return 3.0 * fwd


def matmul_gflops(reps: int = 3) -> float:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((1024, 896), jnp.float32)
    b = jnp.ones((896, 32000), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * 1024 * 896 * 32000 / min(ts) / 1e9


def run_one(preset: str, dtype: str, batch: int, seq_len: int, steps: int, warmup: int, remat: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pldr_jax
    from pldr_jax.train import StepOptions, create_train_state, lr_schedule, make_optimizer, make_train_step
    cfg = pldr_jax.PLDRConfig.preset(preset, dtype=dtype)
    tx = make_optimizer(1e-3, 2000, 250_000, 0.1, 0.1, 1.0)   # the reference recipe
    state = jax.jit(lambda: create_train_state(cfg, tx, 0))()
    step = make_train_step(cfg, tx, lr_schedule(1e-3, 2000, 250_000, 0.1), opts=StepOptions(remat=remat))
    toks = np.random.default_rng(0).integers(4, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    batch_arrays = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}
    t0 = time.perf_counter()
    state, m = step(state, batch_arrays)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    gflops = matmul_gflops()      # before the warm-up steps: the timed steps then follow them directly
    for _ in range(warmup):
        state, m = step(state, batch_arrays)
        jax.block_until_ready(m)
    times, losses = [], []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, batch_arrays)
        losses.append(float(m["loss"]))   # fetching the loss waits for the step
        times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps
    step_s = statistics.median(times)
    flops = step_flops(cfg, batch, seq_len)
    return {"dtype": dtype, "batch": batch, "seq_len": seq_len, "step_s": round(step_s, 4),
            "tokens_per_s": round(batch * seq_len / step_s, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "all_step_s": [round(t, 4) for t in times], "compile_and_first_step_s": round(compile_s, 2),
            "losses": [round(x, 5) for x in losses], "matmul_gflops": round(gflops, 1),
            "flops_per_step": flops, "efficiency": round(flops / step_s / 1e9 / gflops, 3),
            "speedup_vs_reference": round(REFERENCE["step_s"] / step_s, 2),
            "params": pldr_jax.count_params(cfg), "remat": remat, "huge_page_malloc": huge_pages_active(),
            "page_faults_per_step": round(faults)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v51-110m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--no-huge-pages", action="store_true",
                    help="run the steps with glibc's default malloc (by default the step processes get "
                         "glibc.malloc.hugetlb=1, as `pldr-jax` sets it; see pldr_jax/train/host_memory.py)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:  # one dtype in this process
        r = run_one(args.preset, args.child, args.batch, args.seq_len, args.steps, args.warmup, args.remat)
        print("RESULT " + json.dumps(r), flush=True)
        return 0

    results = []
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", dtype, "--preset", args.preset,
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--remat"] if args.remat else [])
        env = dict(os.environ) if args.no_huge_pages else huge_page_env()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
            return 1
        r = json.loads(lines[-1][len("RESULT "):])
        results.append(r)
        if not args.json:
            print(f"{dtype:9s} batch {r['batch']} x {r['seq_len']}: {r['step_s']:.3f} s/step, "
                  f"{r['tokens_per_s']:.0f} tokens/s ({r['speedup_vs_reference']:.2f}x the PyTorch reference), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB; CPU matmul {r['matmul_gflops']:.0f} GFLOP/s at the time, "
                  f"efficiency {r['efficiency']:.2f}", flush=True)
    out = {"benchmark": "train_step", "preset": args.preset, "reference": REFERENCE, "results": results,
           "machine": {"cpu_count": os.cpu_count()}}
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
