"""Fine-tuning the embedded tasks from a pretrained model vs from a random init, same budget.

    python experiments/finetune.py [--source runs/main-job] [--tasks seq-cls,token-cls,qa,sft]
                                   [--epochs 4] [--lr 1e-3] [--out runs/finetune]
                                   [--variants pretrained,random,fixed-g,freeze-decoder]

For each task, `pldr-jax finetune SOURCE --task T --train embedded` runs once per variant with the
same arguments: "pretrained" (SOURCE's weights), "random" (`--random-init`: SOURCE's architecture
and tokenizer, fresh weights), "fixed-g" (`--fixed-g`: SOURCE's weights, each layer's G_LM held at
the starting model's G-cache) and "freeze-decoder" (`--freeze-decoder`: the head alone); default
the first two.  Prints one markdown table (the validation metrics of each, and the majority-class
accuracy for seq-cls) and writes it with the raw results to OUT/results.json; with "fixed-g" also
how far the fixed G's forward is from the normal one at step 0 (`g_invariance`).
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


def g_invariance(source: str, task: str, extra: list[str]) -> str:
    """At step 0, how far the --fixed-g forward is from the normal one on the validation rows: the
    relative difference of the hidden state the head reads (seq-cls: the last token) and of each
    row's own G_LM from the fixed G (per layer, medians over rows)."""
    import jax.numpy as jnp
    from pldr_jax import forward
    from pldr_jax.cli import build_parser
    from pldr_jax.finetune.cli import prepare
    from pldr_jax.finetune.loop import fixed_g_lm
    from pldr_jax.heads import last_token_index
    args = build_parser().parse_args(["finetune", source, "--task", task, "--train", "embedded", "--workdir",
                                      "unused", *extra])
    job = prepare(args)
    cfg, params = job["cfg"], job["params"]
    g = jnp.asarray(fixed_g_lm(cfg, params, job["train"].tokens[0]))
    toks = jnp.asarray(job["valid"].tokens)
    normal, fixed = forward(cfg, params, toks), forward(cfg, params, toks, g)
    if task == "seq-cls":
        idx = last_token_index(toks, 0)[:, None, None]
        a, b = (jnp.take_along_axis(o.hidden, idx, 1)[:, 0] for o in (normal, fixed))
    else:
        a, b = normal.hidden.reshape(toks.shape[0], -1), fixed.hidden.reshape(toks.shape[0], -1)
    rel_h = jnp.linalg.norm(a - b, axis=-1) / jnp.linalg.norm(a, axis=-1)
    G = normal.deductive["G_LM"]                                  # [layers, B, H, dk, dk]
    flat = lambda x: x.reshape(G.shape[0], G.shape[1], -1)
    rel_g = jnp.linalg.norm(flat(G - g[:, None]), axis=-1) / jnp.linalg.norm(flat(G), axis=-1)
    return (f"{task} step 0, {toks.shape[0]} validation rows: hidden state read by the head, fixed G vs derived G: "
            f"relative difference median {float(jnp.median(rel_h)):.4f}, max {float(rel_h.max()):.4f}; "
            f"each row's G_LM vs the fixed G, per layer (median): "
            + ", ".join(f"{float(x):.3f}" for x in jnp.median(rel_g, axis=1)))


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
    rows, raw, notes = [], {}, []
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
        if "fixed-g" in a.variants.split(","):
            line = g_invariance(a.source, task, ["--max-length", a.max_length])
            raw[f"{task}/g_invariance"] = line
            notes.append(line)
        m = majority(task, 0.2, 0)
        if m is not None:
            rows.append(f"| {task} | majority class | - | accuracy {m:.3f} | - |")
    table = "\n".join(["| task | variant | steps | validation | seconds |", "|---|---|---|---|---|", *rows])
    print(table)
    for line in notes:
        print(line)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"argv": sys.argv[1:], "results": raw, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
