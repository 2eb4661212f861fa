"""Speed of two commits in the same run: decode (`bench_decode.py --one`) and the training step
(`bench_train.py --child`) of a base commit and of this working tree, interleaved, as same-run ratios.

The base commit is exported with `git archive` into a private temporary directory (nothing in the
repository is touched) and each measurement is a fresh process run with that tree first on
`PYTHONPATH`, so each side imports its own `pldr_jax` and runs its own copy of the benchmark.
The sides alternate ABBA-style (base first in even rounds, head first in odd ones) and the rounds loop
outermost, so a drift of the machine's speed and any first-process effect cancel; a configuration's
ratio is the **median over rounds of head / base** (tokens/s), with min / max.  Both sides take the
same arguments, so the two benchmark scripts must share their `--one` / `--child` interface
(they have since 3ac3cb1).

    python experiments/compare_commits.py --base 3ac3cb1 [--rounds 3] [--what decode,train] [--json]

A ratio within the spread of its rounds (min..max straddling 1.0) is "unchanged within noise".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DECODE_CONFIGS = "1,kv_g,float32;8,kv_g,float32;8,kv,bfloat16"
TRAIN_CONFIGS = "float32"


def export_tree(ref: str, dest: str) -> str:
    """`git archive REF` unpacked into dest; the commit id it resolved to.  ValueError for an unknown ref."""
    p = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", f"{ref}^{{commit}}"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise ValueError(f"--base {ref!r} is not a commit of this repository (git rev-parse: "
                         f"{p.stderr.strip()}); give a commit id, tag or branch")
    sha = p.stdout.strip()
    os.makedirs(dest, mode=0o700)
    archive = subprocess.Popen(["git", "-C", ROOT, "archive", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {sha} failed")
    return sha


def command(tree: str, what: str, config: str, args) -> list[str]:
    """The benchmark command of one configuration, run from `tree`."""
    if what == "decode":
        return [sys.executable, os.path.join(tree, "experiments", "bench_decode.py"), "--one", config,
                "--reps", str(args.reps), "--prompt-len", str(args.prompt_len),
                "--new-tokens", str(args.new_tokens), "--preset", args.preset,
                "--max-tries", str(args.max_tries), "--max-others", str(args.max_others)]
    return [sys.executable, os.path.join(tree, "experiments", "bench_train.py"), "--child", config,
            "--preset", args.preset, "--batch", str(args.train_batch), "--seq-len", str(args.train_seq_len),
            "--steps", str(args.train_steps), "--warmup", "1"]


def run_side(tree: str, what: str, config: str, args) -> dict:
    """One fresh process of one side: its result dict (tokens_per_s among the fields)."""
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(command(tree, what, config, args), capture_output=True, text=True, cwd=tree, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"{what} {config} failed in {tree} (exit {p.returncode}); its stderr is above")
    last = lines[-1]
    return json.loads(last[len("RESULT "):] if last.startswith("RESULT ") else last)


def side_order(round_index: int) -> tuple[str, str]:
    """ABBA: base first in even rounds, head first in odd ones."""
    return ("base", "head") if round_index % 2 == 0 else ("head", "base")


def summarise(rounds: list[dict]) -> dict:
    """Median / min / max over rounds of head / base tokens/s, and each side's median tokens/s."""
    ratios = [r["head"]["tokens_per_s"] / r["base"]["tokens_per_s"] for r in rounds]
    return {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "base_tokens_per_s": statistics.median(r["base"]["tokens_per_s"] for r in rounds),
            "head_tokens_per_s": statistics.median(r["head"]["tokens_per_s"] for r in rounds),
            "ratios": ratios, "within_noise": min(ratios) <= 1.0 <= max(ratios)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit to compare this working tree against")
    ap.add_argument("--what", default="decode,train", help="comma list of decode,train")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-configs", default=DECODE_CONFIGS, help='";"-separated "batch,mode,dtype"')
    ap.add_argument("--train-dtypes", default=TRAIN_CONFIGS, help="comma list of dtypes")
    ap.add_argument("--preset", default="v51-110m")
    ap.add_argument("--reps", type=int, default=3, help="decode: timed runs per process")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-tries", type=int, default=6)
    ap.add_argument("--max-others", type=float, default=0.15)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq-len", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    whats = [w.strip() for w in args.what.split(",") if w.strip()]
    for w in whats:
        if w not in ("decode", "train"):
            ap.error(f"--what {w!r}: choose from decode, train")
    configs = [("decode", c.strip()) for c in args.decode_configs.split(";") if c.strip() and "decode" in whats]
    configs += [("train", d.strip()) for d in args.train_dtypes.split(",") if d.strip() and "train" in whats]

    with tempfile.TemporaryDirectory(prefix="pldr_compare_") as tmp:
        try:
            base_sha = export_tree(args.base, os.path.join(tmp, "base"))
        except ValueError as e:
            print(f"compare_commits: {e}", file=sys.stderr)
            return 2
        trees = {"base": os.path.join(tmp, "base"), "head": ROOT}
        rows = {c: [] for c in configs}
        for i in range(args.rounds):
            for what, config in configs:
                got = {side: run_side(trees[side], what, config, args) for side in side_order(i)}
                rows[(what, config)].append(got)
                if not args.json:
                    print(f"round {i} {what} {config}: base {got['base']['tokens_per_s']:.1f} tok/s, "
                          f"head {got['head']['tokens_per_s']:.1f} tok/s", flush=True)
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    out = {"base": base_sha, "head": head + ("+dirty" if dirty else ""), "rounds": args.rounds,
           "results": [dict(what=w, config=c, **summarise(rows[(w, c)])) for w, c in configs]}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"head {out['head'][:12]} vs base {base_sha[:12]}, {args.rounds} rounds (head / base tokens/s):")
        for r in out["results"]:
            print(f"  {r['what']:6s} {r['config']:18s} {r['ratio_median']:.3f} ({r['ratio_min']:.3f}-"
                  f"{r['ratio_max']:.3f})  base {r['base_tokens_per_s']:.1f}  head {r['head_tokens_per_s']:.1f}"
                  + ("  within noise" if r["within_noise"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
