"""Fine-tuning the embedded tasks from a pretrained model vs from a random init, same budget.

    python experiments/finetune.py [--source runs/main-job] [--tasks seq-cls,token-cls,qa,sft]
                                   [--epochs 4] [--lr 1e-3] [--out runs/finetune]
                                   [--variants pretrained,random,fixed-g,freeze-decoder]

For each task, `pldr-jax finetune SOURCE --task T --train embedded` runs once per variant with the
same arguments: "pretrained" (SOURCE's weights), "random" (`--random-init`: SOURCE's architecture
and tokenizer, fresh weights), "fixed-g" (`--fixed-g`: SOURCE's weights, each layer's G_LM held at
the starting model's G-cache) and "freeze-decoder" (`--freeze-decoder`: the head alone); default
the first two.  Prints one markdown table (the validation metrics of each, and the majority-class
accuracy for seq-cls) and writes it with the raw results to OUT/results.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import sys
import time
from pathlib import Path


#: variant -> its extra `pldr-jax finetune` flags
VARIANTS = {"pretrained": [], "random": ["--random-init"], "fixed-g": ["--fixed-g"],
            "freeze-decoder": ["--freeze-decoder"]}


def run_one(source: str, task: str, workdir: Path, extra: list[str]) -> dict:
    from pldr_jax.cli import main
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        rc = main(["finetune", source, "--task", task, "--train", "embedded", "--workdir", str(workdir),
                   "--json", "--no-progress", *extra])
    if rc != 0:
        raise SystemExit(f"finetune {task} failed (exit {rc})")
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    res["seconds"] = round(time.time() - t0, 1)
    return res


def majority(task: str, valid_fraction: float, seed: int) -> float | None:
    if task != "seq-cls":
        return None
    from pldr_jax.finetune.data import split_valid
    from pldr_jax.finetune.tasks import embedded_records
    _, valid = split_valid(embedded_records(task), valid_fraction, seed)
    return collections.Counter(r["label"] for r in valid).most_common(1)[0][1] / len(valid)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="runs/main-job")
    ap.add_argument("--tasks", default="seq-cls,token-cls,qa,sft")
    ap.add_argument("--epochs", default="4")
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--batch-size", default="16")
    ap.add_argument("--max-length", default="64")
    ap.add_argument("--out", default="runs/finetune")
    ap.add_argument("--variants", default="pretrained,random", help=f"comma-separated, of {', '.join(VARIANTS)}")
    a = ap.parse_args(argv)
    out = Path(a.out)
    extra = ["--epochs", a.epochs, "--lr", a.lr, "--batch-size", a.batch_size, "--max-length", a.max_length]
    rows, raw = [], {}
    for task in a.tasks.split(","):
        for init in a.variants.split(","):
            if init not in VARIANTS:
                raise SystemExit(f"unknown variant {init!r}; choose from {', '.join(VARIANTS)}")
            flags = VARIANTS[init]
            wd = out / f"{task}-{init}"
            res = run_one(a.source, task, wd, extra + flags)
            raw[f"{task}/{init}"] = res
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in res["valid"].items() if isinstance(v, float))
            rows.append(f"| {task} | {init} | {res['step']} | {metrics} | {res['seconds']} |")
        m = majority(task, 0.2, 0)
        if m is not None:
            rows.append(f"| {task} | majority class | - | accuracy {m:.3f} | - |")
    table = "\n".join(["| task | init | steps | validation | seconds |", "|---|---|---|---|---|", *rows])
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"argv": sys.argv[1:], "results": raw, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
