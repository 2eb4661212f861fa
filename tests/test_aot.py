"""`pldr_jax.aot` / `pldr-jax compile`: the real training step and decode loop compiled ahead of time
for a TPU topology (v5e:2x2) or NVIDIA GPUs (h100 / a100) on this CPU-only host.  Needs the libtpu
wheel (the test extra installs it: ``pip install -e .[test]``) or the CUDA plugin
(``pip install -e .[cuda]``); skipped with the reason when it is absent."""

from __future__ import annotations

import importlib.util
import json
import re

import jax
import pytest

from pldr_jax import targets
from pldr_jax import aot

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu not installed (pip install "jax[tpu]==<jax version>")')
needs_cuda = pytest.mark.skipif(not targets.cuda_plugin_installed(),
                                reason='CUDA plugin not installed (pip install -e ".[cuda]")')

# a tiny model whose weights are large enough that TPU tile padding does not dominate (and a small
# metric learner and few heads: their [heads, dk, dk] weights are replicated by the default rules), and whose
# sequence length (48) is no weight dimension: an activation-sized collective has a 48 / 96 / 384
SMALL = dict(d_model=512, num_heads=8, dff=1024, vocab_size=512, A_dff=16, num_reslayerA=1, num_denseA=1)
B, S = 8, 48


@pytest.fixture(scope="module")
def train_report():
    return aot.compile_report(topology="v5e:2x2", preset="tiny", overrides=SMALL, mesh=(1, 4, 1), batch=B,
                              seq_len=S, remat="none", keep_hlo=True)


@needs_libtpu
def test_fsdp_train_step_shards_the_state_and_keeps_activations_local(train_report):
    import pldr_jax
    from pldr_jax.train.config import TrainConfig
    from pldr_jax.train.state import create_train_state
    r = train_report
    assert r["chips"] == 4 and r["mesh"] == [1, 4, 1] and r["fits"] and r["what"] == "train"
    cfg = pldr_jax.PLDRConfig.preset("tiny", **SMALL)
    tx, _ = TrainConfig().optimizer()
    state = jax.eval_shape(lambda: create_train_state(cfg, tx, 0))
    full = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
    ratio = r["per_chip_bytes"]["arguments"] / full
    assert 0.2 < ratio < 0.35, ratio            # ~ a quarter: params and AdamW moments split over fsdp=4
    assert "all-to-all" not in r["collectives"]
    assert r["collectives"]["all-gather"]["count"] > 0          # FSDP gathers the weights
    assert r["est_step_s"] > 0 and 0 < r["est_mfu"] <= 1 and r["compile_s"] > 0


@needs_libtpu
def test_no_activation_sized_all_reduce_or_all_to_all(train_report):
    """No all-reduce / all-to-all result has a sequence or token dimension (the activations stay
    sharded over the batch; only weight-shaped gradients are reduced)."""
    act_dims = {S, B * S, B * S // 4}
    for line in train_report["hlo"].splitlines():
        m = re.search(r"=\s*(.+?)\s+(all-reduce|all-to-all)(-start)?\(", line)
        if m:
            dims = {int(d) for _, ds in re.findall(r"(f32|bf16|s32)\[([0-9,]*)\]", m.group(1))
                    for d in ds.split(",") if d}
            assert not dims & act_dims, line[:200]


@needs_libtpu
def test_tensor_axis_splits_attention_on_whole_heads():
    """Mesh data 1, fsdp 2, tensor 2 (8 heads of 64): each chip projects q, k, v for its 4 whole heads
    of its 4 rows ([4, S, 4 * 64]) and computes attention for exactly those ([4 rows x 4 heads, S, S]
    logits; all 8 heads would be 32), with no all-to-all (fused projection weights split on their
    output axis, or heads merged with the batch axis, are resharded by all-to-all / all-gather)."""
    H = SMALL["num_heads"]
    r = aot.compile_report(topology="v5e:2x2", preset="tiny", overrides=dict(SMALL, num_layers=1), mesh=(1, 2, 2),
                           batch=B, seq_len=S, remat="none", keep_hlo=True)
    assert r["mesh"] == [1, 2, 2] and "all-to-all" not in r["collectives"]
    shapes = [tuple(int(d) for d in ds.split(",") if d) for ds in re.findall(r"(?:f32|bf16)\[([0-9,]*)\]", r["hlo"])]
    logits = [s for s in shapes if len(s) >= 3 and s[-2:] == (S, S)]
    assert logits and {s[-3] for s in logits} == {(B // 2) * (H // 2)}, sorted(set(logits))
    proj = re.findall(r"= (?:f32|bf16)\[([0-9,]*)\]\S* convolution\(", r["hlo"])
    assert proj.count(f"{B // 2},{S},{SMALL['d_model'] // 2}") >= 3, sorted(set(proj))   # q, k and v


def test_collectives_per_step_counts_an_async_collective_spread_over_fusions_once():
    """The TPU compiler prints one async all-gather in every "async_collective_fusion" it spans (same
    channel_id, same result): one transfer.  Distinct collectives (other channel or shape) still count."""
    hlo = """HloModule m

%async_collective_fusion.1 (p: bf16[2,8]) -> (bf16[2,8], bf16[8,8]) {
  %all-gather.1 = bf16[8,8]{1,0:T(8,128)} all-gather(bf16[2,8]{1,0} %p), channel_id=7, dimensions={0}
}

%async_collective_fusion.2 (p: bf16[2,8]) -> (bf16[2,8], bf16[8,8]) {
  %all-gather.2 = bf16[8,8]{1,0:T(8,128)S(1)} all-gather(bf16[2,8]{1,0} %p), channel_id=7, dimensions={0}
  %all-gather.3 = bf16[8,4]{1,0} all-gather(bf16[2,4]{1,0} %q), channel_id=9, dimensions={0}
}

ENTRY %main (a: bf16[2,8]) -> bf16[8,8] {
  %f1 = (bf16[2,8], bf16[8,8]) fusion(bf16[2,8] %a), kind=kCustom, calls=%async_collective_fusion.1
  %f2 = (bf16[2,8], bf16[8,8]) fusion(bf16[2,8] %a), kind=kCustom, calls=%async_collective_fusion.2
  %cp = bf16[16]{0} collective-permute(bf16[16]{0} %z), channel_id=1, source_target_pairs={{0,1}}
  %cp2 = bf16[32]{0} collective-permute(bf16[32]{0} %z), channel_id=1, source_target_pairs={{0,1}}
}
"""
    coll, _ = aot.collectives_per_step(hlo)
    assert coll["all-gather"] == {"count": 2, "bytes": 128 + 64, "max_bytes": 128}
    assert coll["collective-permute"] == {"count": 2, "bytes": 32 + 64, "max_bytes": 64}


def test_collectives_per_step_multiplies_loop_bodies():
    hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[8]{0} all-gather(f32[2]{0} %x), dimensions={0}
  %ar = f32[4]{0} all-reduce-start(f32[4]{0} %y), to_apply=%add
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  %s = f32[] add(f32[] %a, f32[] %b)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %p = bf16[16]{0} collective-permute(bf16[16]{0} %z), source_target_pairs={{0,1}}
}
"""
    coll, unknown = aot.collectives_per_step(hlo)
    assert unknown == 0
    assert coll["all-gather"] == {"count": 5, "bytes": 5 * 32, "max_bytes": 32}
    assert coll["all-reduce"] == {"count": 5, "bytes": 5 * 16, "max_bytes": 16}
    assert coll["collective-permute"] == {"count": 1, "bytes": 32, "max_bytes": 32}
    no_trip = hlo.replace(', backend_config={"known_trip_count":{"n":"5"}}', "")
    coll, unknown = aot.collectives_per_step(no_trip, unknown_trip=3)
    assert unknown == 1 and coll["all-gather"]["count"] == 3
    # a counted loop's trip count read from its condition (i < 7), as TPU HLO leaves scans
    counted = no_trip.replace("%c = pred[] compare(s32[] %i, s32[] %n), direction=LT",
                              "%n = s32[] constant(7)\n  %c = pred[] compare(s32[] %i, s32[] %n), direction=LT")
    coll, unknown = aot.collectives_per_step(counted)
    assert unknown == 0 and coll["all-gather"]["count"] == 7


@needs_libtpu
def test_cli_train_and_decode_json(capsys):
    from pldr_jax.cli import main
    base = ["compile", "--topology", "v5e:2x2", "--preset", "tiny", "--mesh", "1,4,1", "--batch", "8",
            "--seq-len", "64", "--json"]
    assert main(base + ["--what", "decode"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {"what", "topology", "chips", "device_kind", "preset", "params", "dtype", "mesh", "global_batch", "seq_len",
            "per_chip_bytes", "hbm_bytes", "fits", "flops_per_chip", "bytes_accessed_per_chip", "collectives",
            "collective_bytes", "est_step_s", "est_mfu", "est_tokens_per_s_per_chip", "compile_s"}
    assert keys <= set(r) and r["what"] == "decode" and r["fits"]
    assert set(r["per_chip_bytes"]) >= {"arguments", "temporaries", "outputs", "total"}
    st = r["decode_step"]        # one loop iteration compiled alone, against what it must read
    assert st["bytes_accessed"] > 0 and st["ratio_mean"] == st["bytes_accessed"] / st["must_read_mean"]
    assert st["must_read"]["weights"] > 0 and st["must_read"]["kv_live_mean"] < st["must_read"]["kv_buffer"]
    hbm = st["hbm"]              # HBM only: at least the weights and the KV buffers, less than XLA's count
    assert hbm["total"] == hbm["read"] + hbm["write"] and hbm["total"] <= st["bytes_accessed"]
    assert hbm["read"] >= st["must_read"]["weights"] and st["hbm_ratio_mean"] == hbm["total"] / st["must_read_mean"]
    assert hbm["total_last"] > 0 and hbm["attention_chunks"]["last"] >= hbm["attention_chunks"]["mean"] >= 1


def test_missing_libtpu_is_one_line_naming_the_install(monkeypatch, capsys):
    from pldr_jax.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert main(["compile", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "jax[tpu]' in err


@needs_cuda
def test_gpu_train_step_with_fsdp_over_two_h100s():
    """The bf16 training step for two H100s (FSDP 2), compiled here: per-GPU memory, the analytic FLOPs
    (XLA has no cost analysis on GPU), HBM traffic read off the HLO, FSDP's collectives, and cuDNN's
    fused attention in the step (forward and backward)."""
    r = aot.compile_report(topology="h100:1x2", preset="tiny", overrides=dict(dtype="bfloat16", max_seq_len=128),
                           mesh=(1, 2, 1), batch=4, seq_len=128, keep_hlo=True)
    assert r["chips"] == 2 and r["device_kind"] == "NVIDIA H100 80GB HBM3" and r["chip"]["platform"] == "gpu"
    assert r["fits"] and r["per_chip_bytes"]["total"] > 0 and r["attention_impl"] == "cudnn"
    cfg = __import__("pldr_jax").PLDRConfig.preset("tiny", dtype="bfloat16", max_seq_len=128)
    assert r["flops_per_chip"] == aot.model_flops(cfg, 4, 128) / 2 and r["xla_flops_per_chip"] == 0
    assert r["bytes_accessed_source"] == "hlo_traffic" and r["bytes_accessed_per_chip"] == r["hbm_traffic_per_chip"]["total"] > 0
    assert r["collectives"]["all-gather"]["count"] > 0 and r["collectives"]["reduce-scatter"]["count"] > 0
    assert "all-to-all" not in r["collectives"] and 0 < r["est_mfu"] <= 1
    assert "__cudnn$fmhaSoftmax" in r["hlo"] and "__cudnn$fmhaSoftmaxBackward" in r["hlo"]


@needs_cuda
def test_gpu_decode_loop_cli_json(capsys):
    from pldr_jax.cli import main
    assert main(["compile", "--topology", "a100:1x1", "--preset", "tiny", "--batch", "2", "--seq-len", "32",
                 "--what", "decode", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["what"] == "decode" and r["device_kind"] == "NVIDIA A100-SXM4-80GB" and r["fits"]
    assert r["hbm_bytes"] == aot.CHIPS["a100"].hbm_bytes and r["decode_step"]["bytes_accessed"] > 0


def test_missing_cuda_plugin_is_one_line_naming_the_install(monkeypatch, capsys):
    from pldr_jax.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "cuda" in name else real(name, *a))
    assert main(["compile", "--topology", "h100:1x8", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "jax-cuda12-plugin[with-cuda]" in err and ".[cuda]" in err


def test_gpu_topology_names():
    from pldr_jax.targets import gpu_topology, target_config
    assert gpu_topology("h100:1x8") == (1, 8) and gpu_topology("a100:2x4") == (2, 4)
    with pytest.raises(ValueError, match="hosts"):
        gpu_topology("h100:8")
    assert "NVIDIA H100 80GB HBM3" in target_config(aot.CHIPS["h100"])
    # every chip is a TPU or a GPU; the GPUs' XLA target configs ship with the package, except H200's
    # (its figures serve the training loop's MFU, not compilation)
    assert {c.platform for c in aot.CHIPS.values()} == {"tpu", "gpu"}
    assert all(c.platform == "gpu" for c in aot.CHIPS.values() if c.target_config)
    assert {c.name for c in aot.CHIPS.values() if c.platform == "gpu" and not c.target_config} == {"h200"}


def test_unknown_topology_generation():
    with pytest.raises(ValueError, match="known generations"):
        aot.chip_of("v2:2x2")


@pytest.mark.parametrize("limit", [1, 4, 12, 40, 1000])
def test_largest_fitting_batch_search(limit):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= limit

    got = aot.largest_fitting(fits, 4, 8)
    assert got == (limit // 4) * 4
    assert all(b % 4 == 0 for b in tried) and len(tried) < 20


# the decode plan's prompt pass with the platform's fused attention: a bf16 model, prompts of 128 tokens
# (seq_len 256: 128 prompt + 128 new; splash takes multiples of 128), one layer
_PREFILL = dict(SMALL, num_layers=1, dtype="bfloat16", max_seq_len=256)


@needs_cuda
def test_gpu_decode_prefill_runs_cudnn_fused_attention():
    r = aot.compile_report(topology="h100:1x1", preset="tiny", overrides=_PREFILL, batch=2, seq_len=256,
                           what="decode", keep_hlo=True)
    assert r["fits"] and "__cudnn$fmhaSoftmax" in r["hlo"], "the prefill is not cuDNN's fused attention"
    assert "[2,8,128,128]" not in r["hlo"]              # no [B, H, P, P] logits


@needs_libtpu
def test_tpu_decode_prefill_runs_splash_on_each_chips_rows():
    """v5e:2x2, the rows over fsdp 4: the prompt pass is the splash kernel (a Mosaic custom call) on
    each chip's row, with no all-to-all and no [B, H, P, P] logits."""
    r = aot.compile_report(topology="v5e:2x2", preset="tiny", overrides=_PREFILL, mesh=(1, 4, 1), batch=4,
                           seq_len=256, what="decode", keep_hlo=True)
    hlo = r["hlo"]
    assert r["fits"] and "tpu_custom_call" in hlo and "splash" in hlo, "the prefill is not the splash kernel"
    assert "all-to-all" not in r["collectives"] and ",128,128]" not in hlo
