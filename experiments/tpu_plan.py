"""TPU pod and GPU plan: `pldr-jax compile` (pldr_jax.aot) over models x topologies x meshes, on this host.

For each of v51-110m, v51-1b, v51-8b (learned G) and the same model with a predefined identity G_LM
(plain attention through G = I, no metric learner: the price of the power-law path is the ratio of
the two), each TPU topology and mesh: does the training step fit (else, with --max-batch, the largest global
batch that does), per-chip GB, roofline step time, MFU and tokens/s/chip (bf16, global batch = 8
sequences of 1024 tokens per batch shard).  The MFU is `pldr_jax.aot`'s roofline estimate: model
FLOPs over peak x the estimated step (executed FLOPs with the remat recomputation, HBM bytes, ICI
bytes, whichever takes longest), an upper bound.  Writes one
JSON per row to experiments/results/tpu/ and prints a Markdown table (for experiments/README.md).
Needs libtpu (TPU rows) or the CUDA plugin (GPU rows: h100:1x1, h100:1x8, a100:1x8; `pip install -e
".[cuda]"`).  Each compile is CPU-heavy (minutes for the larger models): filter with --models,
--topologies.  --seq-len longer than the model's max_seq_len raises it to the row's length (RoPE as
the model has it); --attention-impl blocks compiles the query-block attention (the rows before fused
attention).

    JAX_PLATFORMS=cpu python experiments/tpu_plan.py [--models v51-110m] [--topologies v5e:2x2] [--anchor]
        [--fsdp-only] [--no-identity] [--max-batch] [--seq-len 1024] [--attention-impl blocks]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "tpu"
MODELS = ("v51-110m", "v51-1b", "v51-8b")
TOPOLOGIES = {"v5e:2x2": 4, "v5e:4x4": 16, "v5e:16x16": 256, "v5p:2x2x1": 4, "v5p:4x4x4": 64, "v6e:2x2": 4,
              "h100:1x1": 1, "h100:1x8": 8, "a100:1x8": 8}
IDENTITY = {"custom_G_type": "identity", "A_dff": 0, "num_reslayerA": 0, "num_denseA": 0}


def meshes(chips: int, fsdp_only: bool = False) -> list[tuple[int, int, int]]:
    """FSDP over every chip; with 16+ chips also FSDP x tensor 4 (unless fsdp_only)."""
    out = [(1, chips, 1)]
    if chips >= 16 and not fsdp_only:
        out.append((1, chips // 4, 4))
    return out


def run_row(model: str, identity: bool, topology: str, mesh, seq_len: int, per_shard: int,
            max_batch: bool = False, attention_impl: str | None = None) -> dict:
    """One row; with max_batch, a row that does not fit also gets "max_batch": the largest global
    batch that does (`pldr_jax.aot.max_batch`, bisecting below the row's batch; 0 = not even one
    sequence per batch shard) and "max_batch_report" (that compile's report)."""
    from pldr_jax.aot import compile_report, max_batch as search
    batch = per_shard * mesh[0] * mesh[1]
    from pldr_jax.config import PLDRConfig
    ov = dict(IDENTITY if identity else {})
    if seq_len > PLDRConfig.preset(model).max_seq_len:
        ov["max_seq_len"] = seq_len
    kw = dict(topology=topology, preset=model, overrides=ov or None, mesh=mesh, seq_len=seq_len, dtype="bfloat16",
              recipe="paper", attention_impl=attention_impl)
    try:
        rep = compile_report(batch=batch, **kw)
        if max_batch and not rep.get("fits"):
            best, best_rep = search(batch=batch, **kw)
            rep["max_batch"] = best
            if best_rep is not None:
                rep["max_batch_report"] = best_rep
    except Exception as e:  # a row that cannot compile is reported, not fatal
        rep = {"topology": topology, "preset": model, "mesh": list(mesh), "error": str(e).splitlines()[0][:300],
               "fits": False, "global_batch": batch}
    rep["identity_g"] = identity
    rep.setdefault("seq_len", seq_len)
    return rep


def anchor(topology: str = "v5e:2x2") -> dict:
    """../shared/tpu/fsdp_anchor.py with its defaults (the 110M shape, plain attention), its collectives
    counted by `pldr_jax.aot.collectives_per_step` like every other row (its own counter prints an
    async collective once per fusion the TPU compiler spreads it over)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "tpu" / "fsdp_anchor.py"
    code = ("import importlib.util, sys; from pldr_jax.aot import collectives_per_step; "
            f"spec = importlib.util.spec_from_file_location('fsdp_anchor', {str(path)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "m.collectives = lambda hlo: collectives_per_step(hlo)[0]; "
            f"sys.argv = ['fsdp_anchor.py', '--topology', {topology!r}, '--json']; m.main()")
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # this process holds libtpu's lock already
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| model | G | topology | mesh | batch | seq | attention | fits | GB/chip | temp GB | HBM GB/step | "
            "coll. GB/step | est. step s | est. MFU | tok/s/chip | compile s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "per_chip_bytes" not in r:
            why = "no" + (f" (largest batch that fits: {r['max_batch']})" if "max_batch" in r else "")
            lines.append(f"| {r['preset']} | {'I' if r.get('identity_g') else 'learned'} | {r['topology']} | "
                         f"{','.join(map(str, r['mesh']))} | {r.get('global_batch', '')} | {r.get('seq_len', '')} | "
                         f"{r.get('attention_impl') or ''} | {why} | | | | | | | | {r.get('compile_s', '')} |")
            continue
        pc = r["per_chip_bytes"]
        lines.append(f"| {r['preset']} | {'I' if r.get('identity_g') else 'learned'} | {r['topology']} | "
                     f"{','.join(map(str, r['mesh']))} | {r['global_batch']} | {r['seq_len']} | "
                     f"{r.get('attention_impl') or ''} | {'yes' if r['fits'] else 'no'} | "
                     f"{pc['total'] / 1e9:.2f} | {pc['temporaries'] / 1e9:.2f} | "
                     f"{r.get('hbm_traffic_per_chip', {}).get('total', 0) / 1e9:.1f} | {r['collective_bytes'] / 1e9:.2f} | "
                     f"{r['est_step_s']:.3f} | {r['est_mfu'] * 100:.0f}% | {r['est_tokens_per_s_per_chip']:,.0f} | "
                     f"{r['compile_s']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--per-shard", type=int, default=8, help="sequences per batch shard (data x fsdp)")
    ap.add_argument("--no-identity", action="store_true", help="skip the identity-G rows")
    ap.add_argument("--anchor", action="store_true", help="also run ../shared/tpu/fsdp_anchor.py (v5e:2x2)")
    ap.add_argument("--fsdp-only", action="store_true", help="only the all-FSDP mesh per topology")
    ap.add_argument("--max-batch", action="store_true",
                    help="for a row that does not fit, also search the largest global batch that does")
    ap.add_argument("--attention-impl", default=None,
                    help="the training step's attention (default: the platform's fused one; blocks = query blocks)")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in a.models.split(","):
        for topo in a.topologies.split(","):
            for mesh in meshes(TOPOLOGIES[topo], a.fsdp_only):
                for identity in ((False,) if a.no_identity else (False, True)):
                    r = run_row(model, identity, topo, mesh, a.seq_len, a.per_shard, a.max_batch, a.attention_impl)
                    name = (f"{model}{'-identity' if identity else ''}_{topo.replace(':', '-')}_{'x'.join(map(str, mesh))}"
                            + (f"_L{a.seq_len}" if a.seq_len != 1024 else "")
                            + (f"_{a.attention_impl}" if a.attention_impl else ""))
                    (OUT / f"{name}.json").write_text(json.dumps(r, indent=1))
                    rows.append(r)
                    print(table([r]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    if a.anchor:
        an = anchor()
        (OUT / "fsdp_anchor_v5e-2x2.json").write_text(json.dumps(an, indent=1))
        print(f"\nanchor (plain FSDP transformer, 110M shape, v5e:2x2, batch {an['global_batch']} x {an['seq_len']}): "
              f"temporaries {an['per_chip_bytes']['temporaries'] / 1e9:.2f} GB/chip, collectives "
              f"{an['collective_bytes'] / 1e9:.2f} GB/step, compile {an['compile_s']} s")


if __name__ == "__main__":
    main()
