"""`pldr-jax convert` and `pldr_jax.io.load_model/save_model/detect_format`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from pldr_jax import PLDRConfig, forward
from pldr_jax.cli import main
from pldr_jax.io import detect_format, load_g_lm_list, load_hf, load_hf_meta, load_model, save_model
from pldr_jax.io.cli import compare_params
from pldr_jax.params import abstract_params, unstack_layers

from .conftest import REF

TOKENIZER = REF / "refinedweb-tokenizer-model-pldrllm-kvg-cache-paper.model"

CFG_LEARNED = PLDRConfig.preset("tiny")
# predefined G held outside the state dict, bfloat16 master weights, NeoX RoPE: the hard case
CFG_G = PLDRConfig.preset("tiny-g", custom_G_type="external", param_dtype="bfloat16", reference_rope=False)


def need(*paths: Path):
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"reference data missing: {missing}")


def random_params(cfg: PLDRConfig, seed: int = 0):
    """Random params, every leaf distinct (biases and norms included), small enough to stay finite."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (0.3 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype), abstract_params(cfg))


def random_g(cfg: PLDRConfig, seed: int = 1):
    return np.random.default_rng(seed).standard_normal(
        (cfg.num_layers, cfg.num_heads, cfg.dk, cfg.dk), np.float32)


def cli(*args) -> int:
    return main(["convert", *map(str, args)])


def assert_same(cfg, params, cfg2, params2):
    assert cfg2 == cfg
    assert compare_params(cfg, params, cfg2, params2) == []


# --------------------------------------------------------------------------- CLI, every direction
@pytest.mark.parametrize("cfg", [CFG_LEARNED, CFG_G], ids=["learned", "external-g-bf16"])
def test_cli_every_direction(tmp_path, capsys, cfg):
    params = random_params(cfg)
    g = None if cfg.learned_g else random_g(cfg)
    src = tmp_path / "src.pth"
    written = save_model(cfg, params, src, "pth", g_lm=g)
    assert {p.name for p in written} == {"src.pth", "src.json"} | (set() if g is None else {"src_G_LM.npz"})
    chain = [(src, tmp_path / "hf1", "hf"),            # pth -> hf
             (tmp_path / "hf1", tmp_path / "a.pth", "pth"),  # hf -> pth
             (tmp_path / "hf1", tmp_path / "b.npz", "npz"),  # hf -> npz
             (tmp_path / "b.npz", tmp_path / "hf2", "hf"),   # npz -> hf
             (tmp_path / "a.pth", tmp_path / "c.npz", "npz")]  # pth -> npz
    for s, d, to in chain:
        assert cli(s, d, "--to", to, "--check") == 0, (s, d)
        out = capsys.readouterr().out
        assert "check: params bit-exact" in out and "max |logit diff| = 0.000e+00" in out
        assert f"wrote {d} ({to})" in out
    for final in (tmp_path / "hf2", tmp_path / "c.npz"):
        cfg2, params2, g2 = load_model(final)
        assert_same(cfg, params, cfg2, params2)
        if g is None:
            assert g2 is None
        else:
            np.testing.assert_array_equal(g2, g)
    assert detect_format(tmp_path / "hf2") == "hf"
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["dtype"] == cfg.param_dtype


def test_cli_tokenizer_and_token_ids_carried(tmp_path, capsys):
    need(TOKENIZER)
    cfg, params = CFG_LEARNED, random_params(CFG_LEARNED, 3)
    save_model(cfg, params, tmp_path / "hf0", "hf", tokenizer_model=TOKENIZER, eos_token_id=7)
    assert cli(tmp_path / "hf0", tmp_path / "hf1") == 0          # --to inferred: hf
    meta = load_hf_meta(tmp_path / "hf1")
    assert meta.eos_token_id == 7 and meta.tokenizer.read_bytes() == TOKENIZER.read_bytes()
    assert cli(tmp_path / "hf1", tmp_path / "x.npz") == 0          # --to inferred: npz
    assert "not carried" in capsys.readouterr().out
    assert cli(tmp_path / "x.npz", tmp_path / "hf2", "--tokenizer", TOKENIZER) == 0
    assert load_hf_meta(tmp_path / "hf2").tokenizer is not None


def test_cli_errors(tmp_path, capsys):
    cfg, params = CFG_LEARNED, random_params(CFG_LEARNED)
    save_model(cfg, params, tmp_path / "m.npz", "npz")
    # DST exists
    assert cli(tmp_path / "m.npz", tmp_path / "m2.npz") == 0
    assert cli(tmp_path / "m.npz", tmp_path / "m2.npz") == 2
    assert "--force" in capsys.readouterr().err
    assert cli(tmp_path / "m.npz", tmp_path / "m2.npz", "--force") == 0
    # suffix does not fit --to, tokenizer for a state dict, --step on a non-orbax source
    assert cli(tmp_path / "m.npz", tmp_path / "m3.npz", "--to", "pth") == 2
    assert ".pth" in capsys.readouterr().err
    assert cli(tmp_path / "m.npz", tmp_path / "m4.pth", "--tokenizer", tmp_path / "m.json") == 2
    assert cli(tmp_path / "m.npz", tmp_path / "hf", "--step", "3") == 2
    assert "orbax" in capsys.readouterr().err
    # a failing check exits 1 (negative tolerance cannot be met)
    assert cli(tmp_path / "m.npz", tmp_path / "m5.pth", "--check", "--tol", "-1") == 1
    assert "FAIL" in capsys.readouterr().out
    # a predefined-G state dict with no G list cannot go to HF
    cg = CFG_G
    with pytest.warns(UserWarning, match="will need a G list"):
        save_model(cg, random_params(cg), tmp_path / "g.pth", "pth", write_config=False)
    (tmp_path / "g.json").write_text(cg.to_json())
    assert cli(tmp_path / "g.pth", tmp_path / "ghf") == 2
    assert "--g-lm" in capsys.readouterr().err
    gfile = tmp_path / "glist.npz"
    np.savez(gfile, **{f"layer{i}_G_LM": x[None] for i, x in enumerate(random_g(cg))})
    assert cli(tmp_path / "g.pth", tmp_path / "ghf", "--g-lm", gfile, "--check") == 0
    np.testing.assert_array_equal(load_hf(tmp_path / "ghf")[2], load_g_lm_list(gfile, cg))


def test_help_mentions_every_format(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("--to", "--config", "--g-lm", "--tokenizer", "--step", "--check", "--tol", "orbax", ".npz"):
        assert word in out


# --------------------------------------------------------------------------- golden
def test_golden_pth_to_hf_via_cli(tmp_path, capsys):
    need(REF / "tiny_v510.pth", REF / "tiny_v510.json", REF / "tiny_v510_outputs.npz")
    assert cli(REF / "tiny_v510.pth", tmp_path / "hf", "--to", "hf", "--check") == 0  # config beside: tiny_v510.json
    cfg, params, g = load_model(tmp_path / "hf")
    assert g is None
    ref = np.load(REF / "tiny_v510_outputs.npz")
    logits = np.asarray(forward(cfg, params, ref["input_ids"], g).logits)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-5, rtol=0)
    # and back to the reference layout: byte-identical tensors to the original state dict
    assert cli(tmp_path / "hf", tmp_path / "back.pth", "--check") == 0
    gold = np.load(REF / "tiny_v510_params.npz") if (REF / "tiny_v510_params.npz").exists() else None
    if gold is not None:
        from pldr_jax.io import load_state_dict_file
        sd = load_state_dict_file(tmp_path / "back.pth")
        assert list(sd) == list(gold.files)
        for k in sd:
            np.testing.assert_array_equal(sd[k], gold[k])


def test_golden_predefined_g(tmp_path):
    need(REF / "tiny_v510G_identity.pth", REF / "tiny_v510G_identity_outputs.npz")
    ref_out = REF / "tiny_v510G_identity_outputs.npz"   # holds layer{i}_G_LM too
    assert cli(REF / "tiny_v510G_identity.pth", tmp_path / "hf", "--g-lm", ref_out, "--check") == 0
    cfg, params, g = load_model(tmp_path / "hf")
    ref = np.load(ref_out)
    logits = np.asarray(forward(cfg, params, ref["input_ids"], g).logits)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- load_model / detect_format
def test_detect_format(tmp_path):
    cfg, params = CFG_LEARNED, random_params(CFG_LEARNED)
    save_model(cfg, params, tmp_path / "hf", "hf")
    save_model(cfg, params, tmp_path / "m.pth", "pth")
    save_model(cfg, params, tmp_path / "m.npz", "npz")
    assert detect_format(tmp_path / "hf") == "hf"
    assert detect_format(tmp_path / "hf" / "config.json") == "hf"
    assert detect_format(tmp_path / "hf" / "model.safetensors") == "hf"
    assert detect_format(tmp_path / "m.pth") == "torch"
    assert detect_format(tmp_path / "m.npz") == "npz"
    # unknown suffixes are sniffed
    shutil.copy(tmp_path / "m.pth", tmp_path / "weights.data")
    shutil.copy(tmp_path / "m.npz", tmp_path / "arrays.data")
    assert detect_format(tmp_path / "weights.data") == "torch"
    assert detect_format(tmp_path / "arrays.data") == "npz"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        detect_format(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "absent.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unrecognised checkpoint folder"):
        detect_format(tmp_path / "empty")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llama"):
        load_model(tmp_path / "llama")


def test_load_model_config_sources(tmp_path):
    cfg, params = CFG_LEARNED, random_params(CFG_LEARNED, 5)
    save_model(cfg, params, tmp_path / "m.npz", "npz", write_config=False)
    with pytest.raises(ValueError, match="--config") as e:
        load_model(tmp_path / "m.npz")
    assert "preset" in str(e.value)
    # PLDRConfig, preset name, PLDRConfig JSON, HF config.json, reference hparams JSON
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    save_model(cfg, params, tmp_path / "hf", "hf")
    sources = [cfg, "tiny", tmp_path / "cfg.json", str(tmp_path / "hf" / "config.json")]
    if (REF / "tiny_v510.json").exists():
        sources.append(REF / "tiny_v510.json")
    for src in sources:
        cfg2, params2, g2 = load_model(tmp_path / "m.npz", src)
        assert_same(cfg, params, cfg2, params2)
        assert g2 is None
    # found beside the file: config.json in the folder, then <stem>.json (which wins)
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "config.json")
    assert load_model(tmp_path / "m.npz")[0] == cfg
    (tmp_path / "m.json").write_text(cfg.replace(init="corrected").to_json())
    assert load_model(tmp_path / "m.npz")[0].init == "corrected"
    with pytest.raises(ValueError, match="neither a preset"):
        load_model(tmp_path / "m.npz", "no-such-preset")
    (tmp_path / "bad.json").write_text(json.dumps({"layers": 3}))
    with pytest.raises(ValueError, match="not a recognised config"):
        load_model(tmp_path / "m.npz", tmp_path / "bad.json")


def test_load_model_mismatch_and_g_errors(tmp_path):
    cfg, params = CFG_LEARNED, random_params(CFG_LEARNED)
    save_model(cfg, params, tmp_path / "m.pth", "pth")
    with pytest.raises(ValueError, match="missing keys") as e:
        load_model(tmp_path / "m.pth", cfg.replace(num_layers=3))
    assert "decoder.dec_layers.2.mha1.wq.weight" in str(e.value) and "m.pth" in str(e.value)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_model(tmp_path / "m.pth", cfg.replace(dff=64))
    with pytest.raises(ValueError, match="only used by predefined-G"):
        load_model(tmp_path / "m.pth", g_lm_path=tmp_path / "whatever.npz")
    with pytest.raises(ValueError, match="step=2"):
        load_model(tmp_path / "m.pth", step=2)
    # a config given for a self-describing folder must match its architecture ...
    save_model(cfg, params, tmp_path / "hf", "hf")
    with pytest.raises(ValueError, match="dff: stored 85, given 64"):
        load_model(tmp_path / "hf", cfg.replace(dff=64))
    # ... while dtype fields win (params cast)
    cfg_bf, p_bf, _ = load_model(tmp_path / "hf", cfg.replace(param_dtype="bfloat16"))
    assert cfg_bf.param_dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree_util.tree_leaves(p_bf))
    # save_model errors
    with pytest.raises(ValueError, match="unknown output format"):
        save_model(cfg, params, tmp_path / "x", "onnx")
    with pytest.raises(ValueError, match="predefined-G"):
        save_model(cfg, params, tmp_path / "x.npz", "npz", g_lm=random_g(cfg))
    with pytest.raises(ValueError, match="ending in"):
        save_model(cfg, params, tmp_path / "x.safetensors", "pth")
    # identity config: identity G synthesised, no G sidecar written
    ci = PLDRConfig.preset("tiny-g")
    written = save_model(ci, random_params(ci), tmp_path / "i.npz", "npz",
                         g_lm=np.broadcast_to(np.eye(ci.dk, dtype=np.float32), (2, 4, 8, 8)))
    assert [p.name for p in written] == ["i.npz", "i.json"]
    _, _, gi = load_model(tmp_path / "i.npz")
    np.testing.assert_array_equal(gi, np.broadcast_to(np.eye(ci.dk, dtype=np.float32), gi.shape))


def test_per_layer_params_export(tmp_path):
    cfg, params = CFG_LEARNED, random_params(CFG_LEARNED, 9)
    save_model(cfg, unstack_layers(params), tmp_path / "hf", "hf")
    assert_same(cfg, params, *load_model(tmp_path / "hf")[:2])


# --------------------------------------------------------------------------- sharded export
SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    assert "jax" not in sys.modules
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from pldr_jax import PLDRConfig
    from pldr_jax.io import load_model, save_model
    from pldr_jax.io.cli import compare_params
    from pldr_jax.params import abstract_params, unstack_layers
    assert jax.device_count() == 4, jax.devices()
    out = sys.argv[1]
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def spec(shape):
        for ax, n in enumerate(shape):
            if n % 4 == 0:
                return P(*([None] * ax + ["d"]))
        return P()

    gets = []
    real_get = jax.device_get
    def counting_get(x):
        assert isinstance(x, jax.Array), type(x)   # one leaf at a time, never a tree
        gets.append(x.shape)
        return real_get(x)

    for name, cfg in [("learned", PLDRConfig.preset("tiny")),
                      ("g", PLDRConfig.preset("tiny-g", custom_G_type="random", param_dtype="bfloat16"))]:
        rng = np.random.default_rng(0)
        host = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32).astype(s.dtype),
                                      abstract_params(cfg))
        sharded = jax.tree_util.tree_map(
            lambda x: jax.device_put(x, NamedSharding(mesh, spec(x.shape))), host)
        leaves = jax.tree_util.tree_leaves(sharded)
        assert sum(not x.sharding.is_fully_replicated for x in leaves) >= len(leaves) // 2
        g = None if cfg.learned_g else jax.device_put(
            rng.standard_normal((2, 4, 8, 8), np.float32), NamedSharding(mesh, P(None, "d")))
        for tree, tag in ((sharded, "stacked"), (unstack_layers(sharded), "per-layer")):
            for fmt, dst in (("hf", f"{out}/{name}-{tag}-hf"), ("npz", f"{out}/{name}-{tag}.npz"),
                             ("pth", f"{out}/{name}-{tag}.pth")):
                gets.clear()
                jax.device_get = counting_get
                try:
                    save_model(cfg, tree, dst, fmt, g_lm=g)
                finally:
                    jax.device_get = real_get
                assert gets, "no leaf was gathered"
                cfg2, params2, g2 = load_model(dst)
                assert cfg2 == cfg
                assert compare_params(cfg, host, cfg2, params2) == [], (name, tag, fmt)
                if g is not None:
                    np.testing.assert_array_equal(g2, np.asarray(g))
    print("SHARDED-OK")
""")


def test_sharded_export_gathers_leaf_by_leaf(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "SHARDED-OK" in r.stdout, r.stdout + r.stderr


# --------------------------------------------------------------------------- orbax (pretraining checkpoints)
def _write_run(workdir: Path, cfg: PLDRConfig, steps=(1, 2), g=None, tokenizer=None):
    """A `pldr-jax train`-style run: a TrainState per step in `steps` saved with
    train.checkpoint's CheckpointManager (device arrays; params random per step, optimizer state
    of the reference optimiser's structure), g_lm.npy and the run config the training loop records.
    Built without compiling anything (XLA compiles of the init/update take many seconds on CPU)."""
    from pldr_jax.train.checkpoint import CheckpointManager
    from pldr_jax.train.optimizer import make_optimizer
    from pldr_jax.train.state import TrainState
    tx = make_optimizer(1e-2, 0, 10)
    workdir.mkdir(parents=True)
    g_path = None
    if g is not None:
        g_path = workdir / "g_lm.npy"
        np.save(g_path, g)
    record = {"model": cfg.to_dict(), "train": {}, "tokenizer": str(tokenizer) if tokenizer else None,
              "g_lm": str(g_path) if g_path else None}
    saved = {}
    with CheckpointManager(workdir / "checkpoints", async_save=False, max_to_keep=None) as m:
        for s in steps:
            params = random_params(cfg, seed=100 + s)
            opt_rng = np.random.default_rng(s)
            opt_state = jax.tree_util.tree_map(
                lambda a: opt_rng.standard_normal(a.shape).astype(a.dtype), jax.eval_shape(tx.init, params))
            state = jax.device_put(TrainState(step=np.int32(s), params=params, opt_state=opt_state,
                                              rng=np.array([0, s], np.uint32)))
            m.save(s, state, config=record)
            saved[s] = params
    return saved


def test_orbax_to_hf_and_npz(tmp_path, capsys):
    cfg = CFG_LEARNED
    tok = tmp_path / "sp.model"
    tok.write_bytes(b"not really a sentencepiece model")  # only copied
    saved = _write_run(tmp_path / "run", cfg, tokenizer=tok)
    assert detect_format(tmp_path / "run") == "orbax"
    assert detect_format(tmp_path / "run" / "checkpoints") == "orbax"
    assert detect_format(tmp_path / "run" / "checkpoints" / "1") == "orbax"
    # the workdir -> HF folder (latest step), tokenizer carried over from the run
    assert cli(tmp_path / "run", tmp_path / "hf", "--check") == 0
    out = capsys.readouterr().out
    assert "params bit-exact" in out and "max |logit diff| = 0.000e+00" in out
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tok.read_bytes()
    cfg2, params2, _ = load_model(tmp_path / "hf")
    assert_same(cfg, saved[2], cfg2, params2)
    # an earlier step: by --step on the checkpoints folder, or by its own folder
    assert cli(tmp_path / "run" / "checkpoints", tmp_path / "s1.npz", "--step", "1", "--check") == 0
    assert cli(tmp_path / "run" / "checkpoints" / "1", tmp_path / "s1b.pth", "--check") == 0
    for f in ("s1.npz", "s1b.pth"):
        assert_same(cfg, saved[1], *load_model(tmp_path / f)[:2])
    assert compare_params(cfg, saved[1], cfg, saved[2]) != []
    with pytest.raises(FileNotFoundError, match="step 5"):
        load_model(tmp_path / "run", step=5)
    with pytest.raises(ValueError, match="step 1"):
        load_model(tmp_path / "run" / "checkpoints" / "1", step=2)


def test_orbax_predefined_g_run(tmp_path):
    cfg = PLDRConfig.preset("tiny-g", custom_G_type="random")
    g = np.random.default_rng(2).random((cfg.num_layers, cfg.num_heads, cfg.dk, cfg.dk)).astype(np.float32)
    saved = _write_run(tmp_path / "run", cfg, steps=(3,), g=g)
    assert cli(tmp_path / "run", tmp_path / "hf", "--check") == 0
    cfg2, params2, g2 = load_model(tmp_path / "hf")
    assert_same(cfg, saved[3], cfg2, params2)
    np.testing.assert_array_equal(g2, g)
