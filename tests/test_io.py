"""Checkpoint I/O: safe .pth reading/writing, state-dict mapping, Hugging Face folders, G lists."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import shutil
import struct
import zipfile
from pathlib import Path

import chex
import jax
import ml_dtypes
import numpy as np
import pytest

from pldr_jax import PLDRConfig
from pldr_jax.io import (UnsafePickleError, expected_state_dict_shapes, load_g_lm_list, load_hf,
                         load_hf_meta, load_state_dict_file, load_torch_checkpoint, load_torch_file,
                         load_torch_state_dict, params_to_state_dict, save_hf, save_torch_checkpoint,
                         save_torch_file, save_torch_state_dict, state_dict_to_params)
from pldr_jax.io.hf import G_BUFFER, G_STATUS_BUFFER
from pldr_jax.params import abstract_params, stack_layers, unstack_layers

from .conftest import REF

HF_REF = REF / "hf" / "hf_v51_ref_rope"
PAPER_G = REF / "predefined_G_LM_cache_list_PLDRv51_110M_1_5layer_14head_64x64_paper.npz"


def need(*paths: Path):
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"reference data missing: {missing}")


def ref_cfg(name: str) -> PLDRConfig:
    need(REF / f"{name}.json")
    return PLDRConfig.from_reference_hparams(json.loads((REF / f"{name}.json").read_text()))


def assert_params_equal(a, b):
    chex.assert_trees_all_equal(a, b)
    chex.assert_trees_all_equal_dtypes(a, b)


def tiny_random_params(cfg: PLDRConfig, seed: int = 0):
    """Random params (every leaf distinct, biases and norms included) as device arrays."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jax.device_put(rng.standard_normal(s.shape, np.float32).astype(s.dtype)),
        abstract_params(cfg))


# --------------------------------------------------------------------------- .pth reading
@pytest.mark.parametrize("name", ["tiny_v510", "tiny_v510G_identity"])
def test_pth_equals_golden_npz(name):
    need(REF / f"{name}.pth", REF / f"{name}_params.npz")
    sd = load_torch_state_dict(REF / f"{name}.pth")
    gold = np.load(REF / f"{name}_params.npz")
    assert list(sd) == list(json.loads((REF / f"{name}.json").read_text())["state_dict"])
    assert set(sd) == set(gold.files)
    for k in gold.files:
        assert sd[k].dtype == gold[k].dtype and sd[k].shape == gold[k].shape, k
        np.testing.assert_array_equal(sd[k], gold[k], err_msg=k)
    obj = load_torch_file(REF / f"{name}.pth")
    assert obj["loss"] is None and obj["optimizer_state_dict"] is None


@pytest.mark.parametrize("name", ["tiny_v510", "tiny_v510G_identity"])
def test_load_torch_checkpoint_params(name):
    cfg = ref_cfg(name)
    if name.endswith("identity"):
        assert cfg.custom_G_type == "external"  # Gcachelst in the hparams
        cfg = cfg.replace(custom_G_type="identity")
    need(REF / f"{name}.pth", REF / f"{name}_params.npz")
    params = load_torch_checkpoint(REF / f"{name}.pth", cfg)
    assert_params_equal(params, load_torch_checkpoint(REF / f"{name}_params.npz", cfg))
    chex.assert_trees_all_equal_shapes(params, abstract_params(cfg))
    sd = params_to_state_dict(cfg, params)
    gold = np.load(REF / f"{name}_params.npz")
    for k in gold.files:
        np.testing.assert_array_equal(sd[k], gold[k], err_msg=k)
    # the JAX kernel is the transposed torch weight
    np.testing.assert_array_equal(params["layers"]["wq"]["kernel"][1],
                                  gold["decoder.dec_layers.1.mha1.wq.weight"].T)
    if cfg.learned_g:
        np.testing.assert_array_equal(params["layers"]["metric_res"]["w3"]["kernel"][1, 1, 0],
                                      gold["decoder.dec_layers.1.mha1.reslayerAs.1.denseAs.0.gluw3.weight"].T)
        np.testing.assert_array_equal(params["layers"]["plga"]["P"][0],
                                      gold["decoder.dec_layers.0.mha1.plgatt_layer.pwlst"])


def test_expected_shapes_match_reference_json():
    for name in ("tiny_v510", "tiny_v510G_identity"):
        cfg = ref_cfg(name)
        want = {k: tuple(v[0]) for k, v in json.loads((REF / f"{name}.json").read_text())["state_dict"].items()}
        assert expected_state_dict_shapes(cfg) == want


# --------------------------------------------------------------------------- round trips
CONFIGS = {
    "tiny": PLDRConfig.preset("tiny"),
    "tiny-g": PLDRConfig.preset("tiny-g"),
    "tiny-bf16": PLDRConfig.preset("tiny", param_dtype="bfloat16", dtype="bfloat16", reference_rope=False,
                                   rope_theta=500000.0, num_reslayerA=3, num_denseA=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("suffix", [".pth", ".npz"])
def test_checkpoint_round_trip(tmp_path, name, suffix):
    cfg = CONFIGS[name]
    params = tiny_random_params(cfg)
    path = save_torch_checkpoint(tmp_path / f"model{suffix}", cfg, params)
    back = load_torch_checkpoint(path, cfg)
    assert_params_equal(back, params)
    assert_params_equal(load_torch_checkpoint(path, cfg, stacked=False), unstack_layers(params))


def test_per_layer_params_export_equals_stacked(tmp_path):
    cfg = CONFIGS["tiny"]
    params = tiny_random_params(cfg, 3)
    a = params_to_state_dict(cfg, params)
    b = params_to_state_dict(cfg, unstack_layers(params))
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert_params_equal(stack_layers(state_dict_to_params(cfg, a, stacked=False)), state_dict_to_params(cfg, a))


def test_written_pth_layout_and_globals(tmp_path):
    """The writer emits the reference layout with only tensor-rebuild globals (weights_only-safe)."""
    cfg = CONFIGS["tiny-bf16"]
    path = save_torch_checkpoint(tmp_path / "m.pth", cfg, tiny_random_params(cfg), extra={"loss": 1.25})
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert names[0] == "m/data.pkl" and "m/byteorder" in names and "m/version" in names
        pkl = zf.read("m/data.pkl")
        for info in zf.infolist():  # storages are 64-byte aligned, as torch writes them (mmap-able)
            if "/data/" in info.filename:
                zf.fp.seek(info.header_offset + 26)
                n, m = struct.unpack("<HH", zf.fp.read(4))
                assert (info.header_offset + 30 + n + m) % 64 == 0
    globals_used = {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}
    assert globals_used == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch BFloat16Storage"}
    obj = load_torch_file(path)
    assert list(obj) == ["model_state_dict", "optimizer_state_dict", "loss", "accuracy"]
    assert obj["loss"] == 1.25 and obj["accuracy"] is None


def test_torch_load_reads_written_file(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = CONFIGS["tiny"]
    params = tiny_random_params(cfg)
    path = save_torch_checkpoint(tmp_path / "m.pth", cfg, params)
    obj = torch.load(path, weights_only=True)
    sd = params_to_state_dict(cfg, params)
    assert list(obj["model_state_dict"]) == list(sd)
    for k, v in obj["model_state_dict"].items():
        np.testing.assert_array_equal(v.numpy(), sd[k])


def test_writer_handles_views_scalars_and_dtypes(tmp_path):
    base = np.arange(48, dtype=np.float32).reshape(6, 8)
    sd = {"t": base.T, "s": base[1:5, ::3], "bf": base[:2].astype(ml_dtypes.bfloat16),
          "h": np.ones(3, np.float16), "i": np.arange(4), "b": np.array([True, False]),
          "scalar": np.array(2.5, np.float64), "empty": np.zeros((0, 3), np.float32),
          "i8": np.array([-1, 2], np.int8), "u8": np.array([7], np.uint8), "i32": np.array([5], np.int32)}
    path = save_torch_state_dict(tmp_path / "x.pth", sd, extra={"step": 2 ** 40, "tags": ["a", (1, None)]})
    back = load_torch_state_dict(path)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    obj = load_torch_file(path)
    assert obj["step"] == 2 ** 40 and obj["tags"] == ["a", (1, None)]
    # a bare state dict (HF pytorch_model.bin layout) reads the same
    save_torch_file(tmp_path / "bare.bin", dict(sd))
    assert list(load_torch_state_dict(tmp_path / "bare.bin")) == list(sd)


def _legacy_file(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A torch legacy (non-zip) save, built by hand: 5 pickles then the raw storages."""
    from pldr_jax.io.torch_pickle import _PickleWriter
    w = _PickleWriter()
    pkl = w.dump(arrays)
    with open(path, "wb") as f:
        f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True,
                              "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
        f.write(pkl)
        f.write(pickle.dumps([k for k, _ in w.storages], protocol=2))
        for _, a in w.storages:
            f.write(struct.pack("<q", a.size))
            f.write(a.tobytes())


def test_legacy_format(tmp_path):
    sd = {"w": np.arange(12, dtype=np.float32).reshape(3, 4).T, "b": np.arange(3).astype(ml_dtypes.bfloat16)}
    _legacy_file(tmp_path / "old.pth", sd)
    back = load_torch_state_dict(tmp_path / "old.pth")
    for k, v in sd.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)


# --------------------------------------------------------------------------- safety
class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious_zip(path: Path, payload_obj, protocol: int) -> None:
    data = pickle.dumps({"model_state_dict": {"w": payload_obj}}, protocol=protocol)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/version", b"3\n")


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec"])
def test_malicious_pickle_is_refused(tmp_path, kind, protocol):
    marker = tmp_path / "PWNED"
    code = f"open({str(marker)!r}, 'w').write('x')"
    payload = {"os.system": _Payload(os.system, f"touch '{marker}'"),
               "builtins.eval": _Payload(eval, code),
               "builtins.exec": _Payload(exec, code)}[kind]
    path = tmp_path / "evil.pth"
    _malicious_zip(path, payload, protocol)
    with pytest.raises(UnsafePickleError, match=r"(system|eval|exec)"):
        load_torch_file(path)
    with pytest.raises(UnsafePickleError):
        load_torch_checkpoint(path, CONFIGS["tiny"])
    # legacy (non-zip) container too
    legacy = tmp_path / "evil_legacy.pth"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
                       + pickle.dumps({}, protocol=2) + pickle.dumps(payload, protocol=protocol))
    with pytest.raises(UnsafePickleError):
        load_torch_file(legacy)
    assert not marker.exists()


def test_malicious_payload_is_live_control(tmp_path):
    """Control: the same eval payload does run under plain pickle, so the refusal above matters."""
    marker = tmp_path / "PWNED"
    data = pickle.dumps(_Payload(eval, f"open({str(marker)!r}, 'w').write('x')"), protocol=2)
    pickle.loads(data)
    assert marker.exists()


def _zip_with_pickle(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        for k, v in (storages or {}).items():
            zf.writestr(f"archive/data/{k}", v)
    return path


def test_pickle_cannot_tamper_with_loader_objects(tmp_path):
    """BUILD on an allow-listed global (e.g. to change torch.FloatStorage's dtype) is refused."""
    for target in (b"ctorch\nFloatStorage\n", b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nfloat32\n"):
        pkl = b"\x80\x02" + target + b"}X\x05\x00\x00\x00dtypeK\x01sb."
        with pytest.raises(UnsafePickleError, match="refused"):
            load_torch_file(_zip_with_pickle(tmp_path / "tamper.pth", pkl))
    sd = load_torch_state_dict(REF / "tiny_v510.pth") if (REF / "tiny_v510.pth").exists() else None
    if sd is not None:  # later loads are unaffected
        assert sd["decoder.embedding.weight"].dtype == np.float32


def test_out_of_bounds_strides_are_rejected(tmp_path):
    """A tensor whose size/stride would read past its storage raises instead of reading memory."""
    from pldr_jax.io.torch_pickle import _PickleWriter
    w = _PickleWriter()
    w.w(b"\x80\x02}(")
    w.save("w")
    w.global_("torch._utils", "_rebuild_tensor_v2")
    w.w(b"((")
    w.save("storage")
    w.global_("torch", "FloatStorage")
    for v in ("0", "cpu", 4):
        w.save(v)
    w.w(b"tQ")
    w.save_int(0)
    w.save_tuple((4, 4))
    w.save_tuple((4, 1))
    w.w(b"\x89")
    w.global_("collections", "OrderedDict")
    w.w(b")RtRu.")
    path = _zip_with_pickle(tmp_path / "oob.pth", w.out.getvalue(), {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(ValueError, match="reads past its storage"):
        load_torch_file(path)


def test_corrupt_and_missing_files(tmp_path):
    cfg = CONFIGS["tiny"]
    with pytest.raises(FileNotFoundError):
        load_torch_checkpoint(tmp_path / "nope.pth", cfg)
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_torch_checkpoint(tmp_path / "garbage.pth", cfg)
    good = save_torch_checkpoint(tmp_path / "good.pth", cfg, tiny_random_params(cfg))
    (tmp_path / "trunc.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError):
        load_torch_checkpoint(tmp_path / "trunc.pth", cfg)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="bad.npz"):
        load_torch_checkpoint(tmp_path / "bad.npz", cfg)
    with pytest.raises(ValueError, match="suffix"):
        load_state_dict_file(good.rename(tmp_path / "good.weird"))
    with pytest.raises(FileNotFoundError):
        load_hf(tmp_path / "no_folder")


# --------------------------------------------------------------------------- mismatch errors
def test_mismatch_error_lists_every_key():
    cfg = CONFIGS["tiny"]
    sd = params_to_state_dict(cfg, tiny_random_params(cfg))
    del sd["decoder.dec_layers.1.mha1.plgatt_layer.alst"]
    del sd["final_layer.bias"]
    sd["decoder.dec_layers.2.ffn.gluw1.weight"] = np.zeros((85, 32), np.float32)
    sd["decoder.dec_layers.0.mha1.wq.weight"] = np.zeros((32, 16), np.float32)
    sd["decoder.dec_layers.0.mha1.reslayerAs.1.denseAs.0.gluw1.weight"] = np.zeros((8, 16), np.float32)
    with pytest.raises(ValueError) as ei:
        state_dict_to_params(cfg, sd)
    msg = str(ei.value)
    for s in ("missing keys (2)", "decoder.dec_layers.1.mha1.plgatt_layer.alst", "final_layer.bias",
              "unexpected keys (1)", "decoder.dec_layers.2.ffn.gluw1.weight", "shape mismatches (2)",
              "decoder.dec_layers.0.mha1.wq.weight: expected (32, 32), got (32, 16)",
              "reslayerAs.1.denseAs.0.gluw1.weight: expected (16, 8), got (8, 16)"):
        assert s in msg, (s, msg)


def test_wrong_config_for_checkpoint_names_keys():
    cfg = ref_cfg("tiny_v510")
    need(REF / "tiny_v510.pth")
    with pytest.raises(ValueError, match="unexpected keys .*plgatt_layer"):
        load_torch_checkpoint(REF / "tiny_v510.pth", cfg.replace(custom_G_type="identity"))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_torch_checkpoint(REF / "tiny_v510.pth", cfg.replace(dff=64))


def test_export_rejects_wrong_params():
    cfg = CONFIGS["tiny"]
    params = tiny_random_params(cfg)
    with pytest.raises(ValueError, match="layers"):
        params_to_state_dict(cfg.replace(num_layers=3), unstack_layers(params))
    with pytest.raises(ValueError, match="plga"):
        params_to_state_dict(cfg, {**params, "layers": {k: v for k, v in params["layers"].items() if k != "plga"}})


# --------------------------------------------------------------------------- Hugging Face
def test_load_reference_hf_folder():
    need(HF_REF / "config.json", REF / "hf" / "hf_v51_ref_rope.json")
    cfg, params, g = load_hf(HF_REF)
    assert g is None
    assert cfg == PLDRConfig(num_layers=2, d_model=48, num_heads=3, dff=128, vocab_size=97, max_seq_len=64,
                             head_dim=16, A_dff=20, num_reslayerA=2, num_denseA=2, rope_theta=10000.0,
                             reference_rope=True, custom_G_type=None, layer_norm_eps=1e-6)
    listing = json.loads((REF / "hf" / "hf_v51_ref_rope.json").read_text())
    want = {t["key"]: tuple(t["shape"]) for t in listing["safetensors_tensors"]}
    sd = params_to_state_dict(cfg, params)
    assert {k: v.shape for k, v in sd.items()} == want
    assert params["layers"]["metric_res"]["w1"]["kernel"].shape == (2, 2, 2, 16, 20)
    assert params["layers"]["plga"]["W"].shape == (2, 3, 16, 16)
    meta = load_hf_meta(HF_REF)
    assert (meta.pad_token_id, meta.bos_token_id, meta.eos_token_id) == (0, 2, 3)
    assert meta.torch_dtype == "float32" and meta.tokenizer is None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_round_trip(tmp_path, name):
    cfg = CONFIGS[name]
    params = tiny_random_params(cfg, 7)
    g = None
    if not cfg.learned_g:
        g = np.random.default_rng(5).standard_normal((cfg.num_layers, cfg.num_heads, cfg.dk, cfg.dk), np.float32)
    tok = REF / "refinedweb-tokenizer-model-pldrllm-kvg-cache-paper.model"
    folder = save_hf(cfg, params, tmp_path / "hf", g_lm=g, tokenizer_model=tok if tok.exists() else None,
                     eos_token_id=5)
    cfg2, params2, g2 = load_hf(folder)
    assert cfg2 == cfg and hash(cfg2) == hash(cfg)
    assert_params_equal(params2, params)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "pldrllm" and config["architectures"] == ["PldrllmForCausalLM"]
    assert load_hf_meta(folder).eos_token_id == 5
    if tok.exists():
        assert (folder / "tokenizer.model").read_bytes() == tok.read_bytes()
        assert load_hf_meta(folder).tokenizer == folder / "tokenizer.model"
    from safetensors.numpy import load_file
    raw = load_file(str(folder / "model.safetensors"))
    if cfg.learned_g:
        assert g2 is None and G_BUFFER not in raw
    else:
        assert g2.dtype == np.float32
        np.testing.assert_array_equal(g2, g)
        buf = raw[G_BUFFER]
        assert buf.shape == (cfg.num_layers, 3, 1, cfg.num_heads, cfg.dk, cfg.dk)
        assert not buf[:, :2].any() and raw[G_STATUS_BUFFER].all()


def test_hf_identity_default_and_errors(tmp_path):
    cfg = CONFIGS["tiny-g"]
    params = tiny_random_params(cfg)
    _, _, g = load_hf(save_hf(cfg, params, tmp_path / "a"))
    np.testing.assert_array_equal(g, np.broadcast_to(np.eye(cfg.dk, dtype=np.float32), g.shape))
    with pytest.raises(ValueError, match="g_lm"):
        save_hf(cfg.replace(custom_G_type="random"), params, tmp_path / "b")
    with pytest.raises(ValueError, match="g_lm has shape"):
        save_hf(cfg, params, tmp_path / "c", g_lm=np.zeros((2, 4, 8, 7)))
    with pytest.raises(ValueError, match="predefined-G"):
        save_hf(CONFIGS["tiny"], tiny_random_params(CONFIGS["tiny"]), tmp_path / "d", g_lm=g)


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("attention_bias", False),
                                         ("glu_bias", False), ("final_bias", False),
                                         ("tie_word_embeddings", True),
                                         ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                         ("model_type", "llama"), ("dtype", "int8")])
def test_hf_unsupported_config(tmp_path, field, value):
    cfg = CONFIGS["tiny"]
    folder = save_hf(cfg, tiny_random_params(cfg), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field):
        load_hf(folder)


def test_hf_sharded_and_bin(tmp_path):
    from safetensors.numpy import load_file, save_file
    cfg = CONFIGS["tiny-g"]
    params = tiny_random_params(cfg, 11)
    folder = save_hf(cfg, params, tmp_path / "hf")
    _, _, g = load_hf(folder)
    raw = load_file(str(folder / "model.safetensors"))
    keys = sorted(raw)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(folder / "config.json", sharded / "config.json")
    for fname, ks in shards.items():
        save_file({k: raw[k] for k in ks}, str(sharded / fname))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    cfg2, p2, g2 = load_hf(sharded)
    assert cfg2 == cfg
    assert_params_equal(p2, params)
    np.testing.assert_array_equal(g2, g)
    binf = tmp_path / "bin"
    binf.mkdir()
    shutil.copy(folder / "config.json", binf / "config.json")
    save_torch_file(binf / "pytorch_model.bin", dict(raw))
    cfg3, p3, g3 = load_hf(binf)
    assert cfg3 == cfg
    assert_params_equal(p3, params)
    np.testing.assert_array_equal(g3, g)
    (binf / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_hf(binf)


def test_hf_weights_config_mismatch(tmp_path):
    cfg = CONFIGS["tiny"]
    folder = save_hf(cfg, tiny_random_params(cfg), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ffn.gluw1.weight: expected"):
        load_hf(folder)


# --------------------------------------------------------------------------- G lists
def test_paper_g_list():
    need(PAPER_G)
    cfg = PLDRConfig.preset("v51g-106m")
    g = load_g_lm_list(PAPER_G, cfg)
    assert g.shape == (5, 14, 64, 64) and g.dtype == np.float32
    assert load_g_lm_list(PAPER_G, num_layers=5).shape == (5, 14, 64, 64)
    raw = np.load(PAPER_G)
    np.testing.assert_array_equal(g[3], raw["layer3_G_LM"][0])
    with pytest.raises(ValueError, match="expected 4"):
        load_g_lm_list(PAPER_G, 4)
    with pytest.raises(ValueError, match="H=4"):
        load_g_lm_list(PAPER_G, cfg=PLDRConfig.preset("tiny-g", num_layers=5))


def test_gcache_init_list_and_formats(tmp_path):
    f = REF / "Gcachelst_init_mismatched_identity_NAB1_ablation.npz"
    need(f)
    g = load_g_lm_list(f, cfg=PLDRConfig.preset("v51g-106m"))
    np.testing.assert_array_equal(g, np.broadcast_to(np.eye(64, dtype=np.float32), g.shape))
    np.savez(tmp_path / "g3.npz", layer0_G_LM=np.ones((4, 8, 8)), layer1_G_LM=np.zeros((4, 8, 8)))
    assert load_g_lm_list(tmp_path / "g3.npz", PLDRConfig.preset("tiny-g")).shape == (2, 4, 8, 8)
    np.savez(tmp_path / "gap.npz", layer0_G_LM=np.ones((4, 8, 8)), layer2_G_LM=np.ones((4, 8, 8)))
    with pytest.raises(ValueError, match="numbered"):
        load_g_lm_list(tmp_path / "gap.npz")
    np.savez(tmp_path / "none.npz", x=np.ones(3))
    with pytest.raises(ValueError, match="G_LM"):
        load_g_lm_list(tmp_path / "none.npz")
    with pytest.raises(FileNotFoundError):
        load_g_lm_list(tmp_path / "absent.npz")


# --------------------------------------------------------------------------- end to end with the model
def test_hf_reference_logits():
    need(HF_REF / "config.json", REF / "hf" / "hf_v51_ref_rope_outputs.npz")
    from pldr_jax import forward
    cfg, params, g = load_hf(HF_REF)
    ref = np.load(REF / "hf" / "hf_v51_ref_rope_outputs.npz")
    out = forward(cfg, params, np.asarray(ref["input_ids"]), g)
    np.testing.assert_allclose(np.asarray(out.logits), ref["logits"], atol=2e-4, rtol=0)


def test_tiny_pth_to_hf_forward(tmp_path):
    need(REF / "tiny_v510.pth", REF / "tiny_v510_outputs.npz")
    from pldr_jax import forward
    cfg = ref_cfg("tiny_v510")
    folder = save_hf(cfg, load_torch_checkpoint(REF / "tiny_v510.pth", cfg), tmp_path / "hf")
    cfg2, params, g = load_hf(folder)
    ref = np.load(REF / "tiny_v510_outputs.npz")
    out = forward(cfg2, params, ref["input_ids"], g)
    np.testing.assert_allclose(np.asarray(out.logits), ref["logits"], atol=1e-5, rtol=0)


def test_tiny_identity_g_pth_to_hf_forward(tmp_path):
    need(REF / "tiny_v510G_identity.pth", REF / "tiny_v510G_identity_outputs.npz")
    from pldr_jax import forward
    cfg = ref_cfg("tiny_v510G_identity").replace(custom_G_type="external")
    ref = np.load(REF / "tiny_v510G_identity_outputs.npz")
    g_ref = np.stack([ref[f"layer{i}_G_LM"][0] for i in range(cfg.num_layers)])
    folder = save_hf(cfg, load_torch_checkpoint(REF / "tiny_v510G_identity.pth", cfg), tmp_path / "hf", g_lm=g_ref)
    cfg2, params, g = load_hf(folder)
    np.testing.assert_array_equal(g, g_ref)
    out = forward(cfg2, params, ref["input_ids"], g)
    np.testing.assert_allclose(np.asarray(out.logits), ref["logits"], atol=1e-5, rtol=0)
