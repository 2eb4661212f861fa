"""MFU as the training loop reports it, checked against an independent measurement (CPU).

1. `pldr_jax.train.train` runs the v51 110M preset for a few steps (batch x seq_len tokens, a
   tokenizer trained on the embedded corpus) and logs ``mfu`` per step in metrics.jsonl: the
   analytic model FLOPs (`pldr_jax.aot.model_flops`) per second of step time over the measured
   float32 matmul rate (`pldr_jax.train.throughput.measured_matmul_flops`).
2. Independently: the same train step compiled here, XLA's own FLOP count of it
   (``cost_analysis()["flops"]``), its steps timed here; achieved FLOP/s over the same measured
   matmul rate.

The two ratios should agree within 10 % (XLA counts element-wise work as well: 1.06-1.09x the
analytic matmul count on small models, tests/test_throughput.py).  The machine is shared, so the
matmul rate is measured again right before the independent timing, and both ratios are printed.

    python experiments/mfu_check.py [--steps 6 --batch 2 --seq-len 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="v51-110m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import pldr_jax
    from pldr_jax.data import Tokenizer, default_corpus_documents
    from pldr_jax.train.loop import TrainConfig, read_metrics, train
    from pldr_jax.train.sharding import init_train_state, make_mesh, shard_batch
    from pldr_jax.train.step import make_train_step
    from pldr_jax.train.throughput import measured_matmul_flops, train_step_flops

    cfg = pldr_jax.PLDRConfig.preset(a.preset)
    work = Path(tempfile.mkdtemp(prefix="mfu_check_"))
    docs = default_corpus_documents()
    tok = Tokenizer.train(docs, work / "tok", 2000)
    tc = TrainConfig(workdir=str(work / "run"), steps=a.steps, seq_len=a.seq_len, batch_size=a.batch,
                     warmup_steps=1, log_every=1, eval_every=0, save_every=0, validation_fraction=0.0,
                     progress=False, plot=False, tensorboard=False, unroll_layers=True, remat=False)
    res = train(cfg, tc, tokenizer=tok, documents=docs, log=lambda *x, **k: None)
    recs = [r for r in read_metrics(work / "run" / "metrics.jsonl") if r.get("kind") == "train"][1:]
    loop_mfu = statistics.median(r["mfu"] for r in recs)
    loop_step_s = statistics.median(r["step_s"] for r in recs)
    run_cfg = json.loads((work / "run" / "run_config.json").read_text())["throughput"]

    # independent: XLA's FLOP count of the compiled step, timed here
    tx, schedule = tc.optimizer()
    mesh = make_mesh(1, 1, 1)
    step = make_train_step(cfg, tx, schedule, opts=tc.step_options(), mesh=mesh)
    state = init_train_state(cfg, tx, mesh, 0)
    batch = {"inputs": np.asarray(np.random.default_rng(0).integers(1, 2000, (a.batch, a.seq_len)), np.int32)}
    batch["targets"] = np.roll(batch["inputs"], -1, axis=1)
    batch = shard_batch(batch, mesh)
    compiled = step.lower(state, batch, None).compile()
    cost = compiled.cost_analysis()
    xla_flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    state, m = compiled(state, batch, None)
    jax.block_until_ready(m)
    measured_matmul_flops.cache_clear()
    rate = measured_matmul_flops("float32")
    times = []
    for _ in range(max(a.steps - 1, 2)):
        t0 = time.perf_counter()
        state, m = compiled(state, batch, None)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    indep = xla_flops / step_s / rate
    out = {"preset": a.preset, "batch": a.batch, "seq_len": a.seq_len, "steps": a.steps,
           "analytic_flops_per_step": train_step_flops(cfg, a.batch, a.seq_len), "xla_flops_per_step": xla_flops,
           "loop_peak_flops": run_cfg["peak_flops_per_device"], "matmul_rate_now": rate,
           "loop_step_s": loop_step_s, "independent_step_s": step_s, "loop_mfu": loop_mfu,
           "independent_mfu": indep, "ratio": loop_mfu / indep, "end_step": res.end_step}
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:26s} {v:.4g}" if isinstance(v, float) else f"{k:26s} {v}")
        print(f"loop MFU / independent MFU = {out['ratio']:.3f} (within 10%: {abs(out['ratio'] - 1) <= 0.10})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
