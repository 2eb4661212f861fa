"""Training dynamics of the deductive outputs over a 2000-step run of a small learned-G PLDR-LLM.

Trains (``pldr-jax train`` in-process) a 2-layer model (d_model 128, 4 heads of 32, one residual
metric-learner layer of 2 GLU units, A_dff 32) on the embedded corpus with a 2000-piece tokenizer,
batch 16 x 64 tokens, lr 2e-3 (warm-up 100, cosine), with ``--dynamics-every 50``; then prints the
table of the dynamics records (every ``--every`` steps) beside the train / validation loss, the
probe's cost, and writes the 4-panel plot (loss, order parameter, G_LM drift, decimals).

    python experiments/train_dynamics.py [--steps 2000] [--workdir runs/dynamics] [--summarise-only]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

ARGS = ["--set", "num_layers=2", "--set", "d_model=128", "--set", "num_heads=4", "--set", "dff=341", "--set",
        "A_dff=32", "--set", "num_reslayerA=1", "--set", "num_denseA=2", "--set", "vocab_size=2000", "--set",
        "max_seq_len=64", "--vocab-size", "2000", "--data", "builtin", "--seq-len", "64", "--batch-size", "16",
        "--lr", "2e-3", "--warmup-steps", "100", "--log-every", "25", "--eval-every", "250", "--eval-batches", "8",
        "--save-every", "500", "--dynamics-every", "50", "--no-progress"]


def summarise(workdir: Path, every: int) -> dict:
    from pldr_jax.train import read_metrics
    recs = read_metrics(workdir / "metrics.jsonl")
    tr = {r["step"]: r for r in recs if r.get("kind") == "train"}
    ev = {r["step"]: r for r in recs if r.get("kind") == "eval"}
    dyn = [r for r in recs if r.get("kind") == "dynamics"]
    rows = []
    for d in dyn:
        if d["step"] % every and d is not dyn[-1] and d is not dyn[0]:
            continue
        t = tr.get(d["step"], {})
        rows.append({"step": d["step"], "loss": t.get("loss"), "val_loss": ev.get(d["step"], {}).get("val_loss"),
                     **{k: d[k] for k in ("order_parameter", "order_parameter_mean", "g_drift", "det_decimals_median",
                                          "logdet_decimals_median", "logdet_decimals_min", "logdet")}})
    probe_s = sorted(d["probe_s"] for d in dyn[1:])  # the first includes compiling the probe
    steps_s = sorted(r["step_s"] for r in tr.values() if math.isfinite(r.get("step_s", math.nan)))
    cost = {"probes": len(dyn), "probe_s_median": probe_s[len(probe_s) // 2] if probe_s else None,
            "step_s_median": steps_s[len(steps_s) // 2] if steps_s else None,
            "first_probe_s": dyn[0]["probe_s"] if dyn else None}
    if cost["probe_s_median"] and cost["step_s_median"]:
        cost["overhead_at_every_50"] = cost["probe_s_median"] / (50 * cost["step_s_median"])
    return {"rows": rows, "cost": cost}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--workdir", default="runs/dynamics")
    ap.add_argument("--every", type=int, default=250, help="table rows every this many steps")
    ap.add_argument("--summarise-only", action="store_true", help="only read an existing run's metrics.jsonl")
    ap.add_argument("--plot-out", default=None, help="copy dynamics.png here")
    a = ap.parse_args(argv)
    wd = Path(a.workdir)
    if not a.summarise_only:
        from pldr_jax.cli import main as cli
        rc = cli(["train", *ARGS, "--steps", str(a.steps), "--workdir", str(wd), "--overwrite"])
        if rc:
            return rc
    out = summarise(wd, a.every)
    cols = list(out["rows"][0]) if out["rows"] else []
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in out["rows"]:
        print("| " + " | ".join("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                                for v in r.values()) + " |")
    print(json.dumps(out["cost"]))
    if a.plot_out and (wd / "dynamics.png").exists():
        shutil.copyfile(wd / "dynamics.png", a.plot_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
