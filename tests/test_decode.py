"""Decoding: the four cache modes against the reference's generations, ragged batches, compile counts,
EOS, streaming, sampling reproducibility, text and CLI.

Golden data: ../shared/reference/tiny_v510_generate.npz (greedy, 20 tokens, four modes),
tiny_v510_Ginit_identity.npz (the same weights with a given identity G), tiny_v510G_identity_outputs.npz
(v510G).  Ids must match exactly, per-step logits within 2e-4.

Compilation is the dominant cost here, so the tests share static configurations: every call of
`_gen` below uses return_logits=True and return_deductive=True, max_new_tokens <= 32 and prompts
<= 16 tokens, so B=1 runs of one mode compile once for the whole file.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pldr_jax
import pldr_jax.io
from pldr_jax import backend
from pldr_jax.decode import GenerateOutput, decode_dtype, generate, init_cache, prepare_params
from pldr_jax.decode.weights import packs_weights
from pldr_jax.decode.cache import cache_logical_axes, cache_partition_specs
from pldr_jax.decode.loop import compiled_counts
from pldr_jax.decode.request import normalize_prompts
from pldr_jax.decode.stream import stream_generate

from .conftest import ref_path


MODES = {"kv_g": ("kvT_gT", True, True), "kv": ("kvT_gF", True, False), "g": ("kvF_gT", False, True),
         "none": ("kvF_gF", False, False)}
PROMPT = [70, 48, 9, 8, 68, 61, 1]
RAGGED = [PROMPT, [5, 17, 99], [12, 40, 33, 7, 7, 81, 2, 64, 90, 11, 45, 23]]


def _gen(cfg, params, prompts, mode="kv_g", **kw):
    kv, g = MODES[mode][1:]
    kw.setdefault("max_new_tokens", 20)
    kw.setdefault("top_k", 1)
    kw.setdefault("eos_id", None)
    return generate(cfg, params, prompts, kv_cache=kv, g_cache=g, return_logits=True, return_deductive=True, **kw)


@pytest.fixture(scope="module")
def tiny(tiny_v510):
    cfg, params = tiny_v510
    return cfg, prepare_params(cfg, params, 1)[1]


@pytest.fixture(scope="module")
def golden():
    return np.load(ref_path("tiny_v510_generate.npz"))


# --------------------------------------------------------------------------- golden generations
@pytest.mark.parametrize("mode", list(MODES))
def test_four_modes_match_reference(tiny, golden, mode):
    cfg, params = tiny
    tag = MODES[mode][0]
    out = _gen(cfg, params, [golden["prompt_ids"].tolist()], mode)
    assert isinstance(out, GenerateOutput) and out.mode == mode
    assert out.tokens[0] == golden[f"{tag}_ids"].tolist()
    np.testing.assert_allclose(out.logits[0], golden[f"{tag}_step_logits"], atol=2e-4, rtol=0)
    for i in range(cfg.num_layers):
        for name in ("A_LM", "G_LM"):
            want = golden[f"{tag}_layer{i}_step_{name}"][:, 0]          # [steps, H, dk, dk]
            got = out.deductive[name][:, i, 0]
            np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)
    if mode != "none":   # the cached modes keep the prompt's G: constant over steps
        g = out.deductive["G_LM"]
        np.testing.assert_allclose(g, np.broadcast_to(g[:1], g.shape), atol=1e-5)


@pytest.mark.parametrize("mode", list(MODES))
def test_given_identity_g_matches_reference(tiny, mode):
    cfg, params = tiny
    ref = np.load(ref_path("tiny_v510_Ginit_identity.npz"))
    tag = MODES[mode][0]
    eye = np.broadcast_to(np.eye(cfg.head_dim, dtype=np.float32), (cfg.num_layers, cfg.num_heads) + (cfg.head_dim,) * 2)
    out = _gen(cfg, params, [ref["prompt_ids"].tolist()], mode, g_lm=eye)
    assert out.tokens[0] == ref[f"{tag}_ids"].tolist()
    np.testing.assert_allclose(out.logits[0], ref[f"{tag}_step_logits"], atol=2e-4, rtol=0)
    np.testing.assert_allclose(out.deductive["G_LM"][:, :, 0], np.broadcast_to(eye, (20,) + eye.shape))


@pytest.mark.parametrize("kv", [True, False])
def test_v510g_identity_generation(tiny_v510g, kv):
    cfg, params = tiny_v510g
    ref = np.load(ref_path("tiny_v510G_identity_outputs.npz"))
    tag = "kvT" if kv else "kvF"
    out = _gen(cfg, params, [ref["gen_prompt_ids"].tolist()], "kv_g" if kv else "g")
    assert out.tokens[0] == ref[f"gen_{tag}_ids"].tolist()
    np.testing.assert_allclose(out.logits[0], ref[f"gen_{tag}_step_logits"], atol=2e-4, rtol=0)


# --------------------------------------------------------------------------- ragged batches
@pytest.mark.parametrize("mode", list(MODES))
def test_ragged_batch_equals_alone(tiny, mode):
    cfg, params = tiny
    batch = _gen(cfg, params, RAGGED, mode)
    assert batch.prompt_lengths.tolist() == [len(p) for p in RAGGED]
    for b, p in enumerate(RAGGED):
        alone = _gen(cfg, params, [p], mode)
        assert batch.tokens[b] == alone.tokens[0], f"row {b}"
        # "none" re-derives A and G from the sequence each step: batch-shape rounding is amplified
        np.testing.assert_allclose(batch.logits[b], alone.logits[0], atol=2e-4 if mode == "none" else 2e-5,
                                   rtol=0)
        np.testing.assert_allclose(batch.prompt_deductive["G_LM"][:, b], alone.prompt_deductive["G_LM"][:, 0],
                                   atol=2e-5)


def test_shared_g_uses_first_rows_g(tiny):
    cfg, params = tiny
    own = _gen(cfg, params, RAGGED, "kv_g")
    shared = _gen(cfg, params, RAGGED, "kv_g", shared_g=True)
    assert shared.tokens[0] == own.tokens[0]
    np.testing.assert_allclose(shared.logits[0], own.logits[0], atol=1e-6)
    # prefill uses each row's own G (cache_first_G); afterwards row 1 decodes with row 0's G
    np.testing.assert_allclose(shared.logits[1, 0], own.logits[1, 0], atol=1e-6)
    for i in range(cfg.num_layers):
        assert shared.cache.G_LM[i].shape[0] == 1
        np.testing.assert_allclose(shared.cache.G_LM[i][0], own.prompt_deductive["G_LM"][i, 0], atol=1e-6)
    np.testing.assert_allclose(shared.deductive["G_LM"][1:, :, 2], shared.deductive["G_LM"][1:, :, 0])
    assert not np.allclose(shared.logits[1, 1:], own.logits[1, 1:], atol=1e-4)


# --------------------------------------------------------------------------- compilation
def test_no_recompile_within_bucket(tiny):
    """Different max_new_tokens, prompt contents and lengths within one bucket, sampling values and
    seeds: at most one compilation of prefill and of the decode loop (zero when an earlier test
    already compiled this static configuration), and none after the first call."""
    cfg, params = tiny
    sizes = lambda: (compiled_counts()["prefill"], compiled_counts()["loop"])
    # prompts <= 16 tokens and 17..32 new tokens: one length bucket (P = 16, N = 32, S = 64)
    calls = [(RAGGED, 20, 0.8, 0), ([[5, 6, 7], [8, 9, 10, 11, 12], [1] * 16], 25, 1.0, 1),
             ([[13, 14, 15, 16, 17, 18, 19], [20], [99, 98]], 32, 0.5, 2),
             ([[4, 4], [50] * 11, [3, 2, 1]], 17, 0.9, 3)]
    before = sizes()
    for i, (prompts, n, temp, seed) in enumerate(calls):
        out = _gen(cfg, params, prompts, "kv_g", max_new_tokens=n, temperature=temp, top_k=20, top_p=0.95,
                   seed=seed)
        assert [len(t) for t in out.tokens] == [n] * 3
        if i == 0:
            first = sizes()
            assert all(0 <= a - b <= 1 for a, b in zip(first, before))
    assert sizes() == first


# --------------------------------------------------------------------------- sampling and stopping
def test_sampling_reproducible_from_seed(tiny):
    cfg, params = tiny
    kw = dict(temperature=0.8, top_k=20, top_p=0.95)
    a = _gen(cfg, params, RAGGED, "kv_g", seed=11, **kw)
    b = _gen(cfg, params, RAGGED, "kv_g", seed=11, **kw)
    c = _gen(cfg, params, RAGGED, "kv_g", seed=12, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    greedy = _gen(cfg, params, RAGGED, "kv_g")
    assert a.tokens != greedy.tokens


def test_top_k_1_equals_greedy(tiny, golden):
    cfg, params = tiny
    out = _gen(cfg, params, [PROMPT], "kv_g", top_k=1, temperature=0.3, top_p=0.5, seed=5)
    assert out.tokens[0] == golden["kvT_gT_ids"].tolist()
    assert (out.logits[0].argmax(-1) == np.array(out.tokens[0])).all()


def test_eos_stops_rows_and_masks_the_rest(tiny, golden):
    cfg, params = tiny
    assert golden["kvT_gT_ids"].tolist()[:4] == [84, 50, 46, 88]
    out = _gen(cfg, params, [PROMPT], "kv_g", eos_id=46)
    assert out.tokens[0] == [84, 50, 46]
    assert out.num_generated.tolist() == [3] and out.steps == 3
    assert (out.ids[0, 3:] == 0).all()
    # ragged: each row stops at its own EOS; the loop ends early when every row is done
    full = _gen(cfg, params, RAGGED, "kv_g")
    eos = full.tokens[1][4]
    out = _gen(cfg, params, RAGGED, "kv_g", eos_id=eos)
    for b in range(len(RAGGED)):
        row = full.tokens[b]
        want = row[:row.index(eos) + 1] if eos in row else row
        assert out.tokens[b] == want
        assert (out.ids[b, len(want):] == 0).all()


def test_max_seq_len_error_and_stop(tiny):
    cfg, params = tiny                    # max_seq_len 64
    prompt = list(range(1, 61))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(cfg, params, [prompt], max_new_tokens=10)
    out = generate(cfg, params, [prompt, [5, 6]], max_new_tokens=10, top_k=1, eos_id=None, stop_at_max_seq_len=True)
    assert [len(t) for t in out.tokens] == [4, 10]


def test_input_validation(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(cfg, params, [PROMPT], max_new_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        generate(cfg, params, [PROMPT, []], max_new_tokens=2)
    with pytest.raises(ValueError, match="pad id 0"):
        generate(cfg, params, [[5, 0, 6]], max_new_tokens=2)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(cfg, params, [[5, 600]], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        generate(cfg, params, [PROMPT], max_new_tokens=2, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(cfg, params, [PROMPT], max_new_tokens=2, top_p=1.2)
    with pytest.raises(ValueError, match="eos_id"):
        generate(cfg, params, [PROMPT], max_new_tokens=2, eos_id=-3)
    with pytest.raises(ValueError, match="g_lm"):
        generate(cfg, params, [PROMPT], max_new_tokens=2, g_lm=np.zeros((3, 4, 8, 8), np.float32))
    assert normalize_prompts(cfg, np.array([[5, 6, 0, 0], [7, 0, 0, 0]])) == [[5, 6], [7]]
    assert normalize_prompts(cfg, [5, 6]) == [[5, 6]]


# --------------------------------------------------------------------------- streaming
def test_stream_equals_generate(tiny):
    cfg, params = tiny
    eos = _gen(cfg, params, RAGGED, "kv_g").tokens[1][4]
    ref = generate(cfg, params, RAGGED, max_new_tokens=20, top_k=1, eos_id=eos)
    got = [[] for _ in RAGGED]
    steps = 0
    for step in stream_generate(cfg, params, RAGGED, max_new_tokens=20, top_k=1, eos_id=eos):
        steps += 1
        for b in range(len(RAGGED)):
            if step.active[b]:
                got[b].append(int(step.tokens[b]))
    assert got == ref.tokens
    assert steps == ref.steps


# --------------------------------------------------------------------------- cache pytree
def test_init_cache_shapes_and_axes(tiny):
    cfg, _ = tiny
    c = init_cache(cfg, 3, 32)
    assert len(c.k) == cfg.num_layers and c.k[0].shape == (3, cfg.num_heads, 32, cfg.head_dim)
    assert c.G_LM[0].shape == (3, cfg.num_heads, cfg.head_dim, cfg.head_dim) and c.lengths.shape == (3,)
    c1 = init_cache(cfg, 3, 32, kv=False, g_batch=1)
    assert c1.k is None and c1.G_LM[0].shape[0] == 1
    axes = cache_logical_axes(c)
    assert axes.k[0] == ("batch", "attn_heads", "kv_len", "dk")
    assert cache_logical_axes(c1).G_LM[0] == (None, "attn_heads", "dk", "dk_out")
    specs = cache_partition_specs(c, {"batch": "data", "attn_heads": "model"})
    assert specs.k[0] == jax.sharding.PartitionSpec("data", "model", None, None)
    assert jax.tree_util.tree_structure(jax.tree_util.tree_map(jnp.zeros_like, c)) == jax.tree_util.tree_structure(c)
    with pytest.raises(ValueError, match="max_len"):
        init_cache(cfg, 1, cfg.max_seq_len + 1)


def test_dtype_policy(tiny):
    cfg, params = tiny
    bf = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    mb = backend.choices().bf16_min_batch             # 16 on CPU with the packed float32 matmul
    assert decode_dtype(bf, 1) == "float32" and decode_dtype(bf, mb - 1) == "float32"
    assert decode_dtype(bf, mb) == "bfloat16" and decode_dtype(bf, 8, bf16_min_batch=8) == "bfloat16"
    assert decode_dtype(bf, 1, bf16_min_batch=0) == "bfloat16" and decode_dtype(cfg, 1) == "float32"
    from pldr_jax.decode.layouts import PackedLinear
    kernel = lambda w: w["kernel"] if isinstance(w, dict) else getattr(w, "kernel_p", getattr(w, "kernel_t", None))
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    rc, rp = prepare_params(bf, p16, 2)
    assert rc.dtype == "float32" and kernel(rp["layers"][0]["wqkv"]).dtype == jnp.float32
    assert isinstance(rp["layers"][0]["wqkv"], PackedLinear) == packs_weights("float32")   # packed where the platform wants it
    rc, rp = prepare_params(cfg.replace(dtype="bfloat16"), params, mb)
    w12 = rp["layers"][0]["ffn"]["w12"]      # [out, in] only where the platform wants it (backend)
    assert rc.dtype == "bfloat16" and kernel(w12).dtype == jnp.bfloat16
    assert rp["layers"][0]["plga"]["W"].dtype == jnp.float32        # deductive weights stay float32
    rc, rp = prepare_params(cfg, params, 1)
    assert kernel(rp["layers"][0]["wqkv"]) is kernel(params["layers"][0]["wqkv"])   # no copy
    # the fused decode layout gives the same forward pass as the reference layout
    raw = pldr_jax.io.state_dict_to_params(cfg, dict(np.load(ref_path("tiny_v510_params.npz"))))
    toks = jnp.array([PROMPT + [0] * 3])
    np.testing.assert_allclose(pldr_jax.forward(cfg, params, toks).logits, pldr_jax.forward(cfg, raw, toks).logits,
                               atol=1e-4)


# --------------------------------------------------------------------------- text and CLI
class _CharTokenizer:
    """A stand-in sentencepiece-like tokenizer for the 101-token toy vocabulary."""
    eos_id, pad_id = 3, 0

    def encode(self, text, add_eos=False):
        ids = [10 + (ord(c) % 90) for c in text]
        return ids + [3] if add_eos else ids

    def decode(self, ids):
        return "".join(chr(ord("a") + (i - 10) % 26) for i in ids)


def test_generate_text(tiny):
    from pldr_jax.decode.text import generate_text, stream_text
    cfg, params = tiny
    tok = _CharTokenizer()
    texts = ["hello", "a longer prompt", "xyz"]
    out = generate_text(cfg, params, tok, texts, max_new_tokens=20, top_k=1)
    ids = generate(cfg, params, [tok.encode(t) for t in texts], max_new_tokens=20, top_k=1, eos_id=3)
    assert out.prompt_ids == [tok.encode(t) for t in texts]
    assert list(out) == [tok.decode([t for t in row if t != 3]) for row in ids.tokens]
    full = generate_text(cfg, params, tok, texts, max_new_tokens=20, top_k=1, include_prompt=True)
    assert full[1] == tok.decode(tok.encode(texts[1])) + out[1]
    assert "".join(stream_text(cfg, params, tok, "hello", max_new_tokens=20, top_k=1)) == out[0]


def test_real_tokenizer_encoding_matches_reference():
    from pldr_jax.data.tokenizer import Tokenizer
    from pldr_jax.decode.text import encode_prompts
    tok = Tokenizer.load(ref_path("refinedweb-tokenizer-model-pldrllm-kvg-cache-paper.model"))
    text = "Write a letter requesting that people use language models responsibly."
    want = [6159, 270, 1943, 17057, 279, 372, 404, 1554, 2192, 28095, 262, 3][:-1]   # EOS dropped
    assert encode_prompts(tok, [text]) == [want]
    assert encode_prompts(tok, [""]) == [[3]]                                      # reference oddity 10


def test_cli_generate_json(tiny, tmp_path, capsys):
    import shutil

    from pldr_jax.cli import main
    cfg, params = tiny
    ck = tmp_path / "tiny_v510.pth"               # the config sidecar tiny_v510.json is found beside it
    shutil.copy(ref_path("tiny_v510.pth"), ck)
    shutil.copy(ref_path("tiny_v510.json"), tmp_path / "tiny_v510.json")
    out_npz = tmp_path / "ded.npz"
    args = [a for p in RAGGED for a in ("--ids", " ".join(map(str, p)))]
    rc = main(["generate", str(ck), *args, "--greedy", "--max-new-tokens", "20", "--eos-id", "3", "--json",
               "--save-deductive", str(out_npz), "--no-compile-cache"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    want = generate(cfg, params, RAGGED, max_new_tokens=20, top_k=1, eos_id=3)
    assert [r["ids"] for r in res["results"]] == want.tokens and res["mode"] == "kv_g"
    z = np.load(out_npz)
    assert z["layer0_G_LM"].shape == (3, cfg.num_heads, cfg.head_dim, cfg.head_dim)
    np.testing.assert_allclose(z["layer1_G_LM"], np.asarray(want.prompt_deductive["G_LM"][1]), atol=1e-6)
    assert z["prompt_lengths"].tolist() == [len(p) for p in RAGGED]
    assert main(["generate", str(ck), "--prompt", "hi", "--no-compile-cache"]) == 2      # no tokenizer: a clear error
    assert "tokenizer" in capsys.readouterr().err
    assert main(["generate", str(ck), "--ids", "5 6", "--max-new-tokens", "100", "--no-compile-cache"]) == 2
    assert "max_seq_len" in capsys.readouterr().err
    assert main(["generate", str(ck), "--ids", "5 6", "--backend-option", "decode_kv_chnk=4", "--no-compile-cache"]) == 2
    assert "valid options" in capsys.readouterr().err                                   # unknown backend option
    rc = main(["generate", str(ck), *args, "--greedy", "--max-new-tokens", "20", "--eos-id", "3", "--json",
               "--backend-option", "decode_kv_chunk=4", "--backend-option", "decode_attention=xla",
               "--no-compile-cache"])
    assert rc == 0 and [r["ids"] for r in json.loads(capsys.readouterr().out)["results"]] == want.tokens


# --------------------------------------------------------------------------- Sampler
def test_sampler_prepares_weights_once_and_equals_generate(tiny_v510, monkeypatch):
    import pldr_jax.decode.sampler as sampler_mod
    cfg, raw = tiny_v510                      # stacked, unprepared params
    want = _gen(cfg, raw, RAGGED, "kv_g")
    calls = []
    real = sampler_mod.prepare_params
    monkeypatch.setattr(sampler_mod, "prepare_params", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    sampler = pldr_jax.Sampler(cfg, raw)
    a = sampler(RAGGED, max_new_tokens=20, top_k=1, eos_id=None, return_logits=True, return_deductive=True)
    b = sampler([PROMPT], max_new_tokens=20, top_k=1, eos_id=None, return_logits=True, return_deductive=True)
    assert len(calls) == 1                    # one decode dtype: prepared once, on the first call
    assert sampler.weights(3) is sampler.weights(1)
    assert a.tokens == want.tokens and b.tokens[0] == want.tokens[0]
    np.testing.assert_array_equal(a.logits, want.logits)
    assert set(a.timings) == {"prefill_s", "decode_s", "compile_s"} and a.timings["compile_s"] >= 0
    got = [[] for _ in RAGGED]
    for step in sampler.stream(RAGGED, max_new_tokens=20, top_k=1, eos_id=None):
        for r in np.flatnonzero(step.active):
            got[r].append(int(step.tokens[r]))
    assert got == want.tokens and len(calls) == 1
    bf = cfg.replace(dtype="bfloat16")        # a 16-bit config: one layout per decode dtype, each made once
    s16 = pldr_jax.Sampler(bf, raw)
    mb = backend.choices().bf16_min_batch
    assert s16.weights(1)[0].dtype == "float32" and s16.weights(mb)[0].dtype == "bfloat16"
    assert s16.weights(mb - 1) is s16.weights(1) and s16.weights(32) is s16.weights(mb)
    with pytest.raises(ValueError, match="mesh"):
        pldr_jax.Sampler(cfg, raw, mesh="data")


def test_cli_persistent_compile_cache(tmp_path):
    """Two `pldr-jax generate` processes on one cache directory: the second finds every program in
    the cache (no XLA compilation) and reports its compile time apart from the decode rate."""
    import os
    import subprocess
    import sys
    ck = ref_path("tiny_v510.pth")
    ref_path("tiny_v510.json")
    env = dict(os.environ, PLDR_JAX_COMPILE_CACHE=str(tmp_path / "off-by-flag-not-used"))
    cmd = [sys.executable, "-c", "import sys; from pldr_jax.cli import main; sys.exit(main(sys.argv[1:]))",
           "generate", str(ck), "--ids", "70 48 9 8", "--greedy", "--max-new-tokens", "4", "--json",
           "--compile-cache", str(tmp_path / "cache")]
    runs = []
    for _ in range(2):
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        runs.append(json.loads(p.stdout))
    first, second = runs
    assert first["results"][0]["ids"] == second["results"][0]["ids"]
    assert first["compile_cache_dir"] == str(tmp_path / "cache") and any((tmp_path / "cache").iterdir())
    assert first["compile_cache_hits"] == 0 and first["compiles"] > 0
    assert second["compile_cache_hits"] == second["compiles"] > 0        # nothing compiled again
    assert second["compile_s"] < first["compile_s"]
    assert first["tokens_per_s"] > 0 and first["run_s"] + first["compile_s"] == pytest.approx(first["seconds"])
    p = subprocess.run(cmd[:-2] + ["--no-compile-cache"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and json.loads(p.stdout)["compile_cache_dir"] is None
    assert not (tmp_path / "off-by-flag-not-used").exists()


def test_compile_watch_counts_a_compile_nested_in_a_trace_once():
    """A function compiled while another is traced (as the decode step's constant RoPE tables are)
    has its stages inside the outer trace: `CompileWatch.seconds` is the union of the stages'
    intervals, never more than the call's wall time (a sum counted the nested stages twice)."""
    import time
    from pldr_jax.decode.compile_time import CompileWatch
    x0 = np.arange(5, dtype=np.float32)

    def outer(x):
        inner = jax.jit(lambda t: jnp.cos(t) * 3.0 + jnp.sin(t))
        table = np.asarray(inner.lower(x0).compile()(x0))       # compiled during outer's trace
        return x * 2.0 + table

    t0 = time.perf_counter()
    with CompileWatch() as watch:
        jax.block_until_ready(jax.jit(outer)(jnp.ones(5, jnp.float32)))
    wall = time.perf_counter() - t0
    summed = watch.trace_s + watch.lower_s + watch.backend_s
    assert watch.compiles >= 2
    assert 0 < watch.seconds <= wall
    assert watch.seconds < summed            # the inner stages lie inside the outer trace
    assert watch.seconds >= max(watch.trace_s, watch.backend_s)


def test_compile_cache_directory_resolution(monkeypatch, tmp_path):
    from pldr_jax.compile_cache import ENV_VAR, default_cache_dir, resolve_cache_dir
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pldr_jax" / "jax_cache" == resolve_cache_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "pldr_jax" / "jax_cache"
    assert resolve_cache_dir(tmp_path / "mine") == tmp_path / "mine"
    assert resolve_cache_dir(tmp_path / "mine", enabled=False) is None
    for off in ("0", "off", "False", ""):
        monkeypatch.setenv(ENV_VAR, off)
        assert resolve_cache_dir() is None
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"


def test_decode_embedding_table_and_lookup_order(tiny, monkeypatch):
    """`backend.decode_embed_f32` (CPU): a bfloat16 decode keeps a float32 embedding table and looks
    rows up before the cast (`embed(..., lookup_first=True)`: the same rows); the compiled decode
    loop holds no float32 copy of a bfloat16 table, and the tokens and logits equal those of a
    bfloat16 table."""

    from pldr_jax import backend
    from pldr_jax.decode import loop as decode_loop
    from pldr_jax.decode import weights
    from pldr_jax.model import embed
    cfg, params = tiny
    bf = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    bparams = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, params)
    tokens = jnp.array([[5, 0, 100], [7, 7, 3]], jnp.int32)
    wide = dict(bparams, embed={"embedding": bparams["embed"]["embedding"].astype(jnp.float32)})
    np.testing.assert_array_equal(np.asarray(embed(bf, wide, tokens, lookup_first=True), np.float32),
                                  np.asarray(embed(bf, bparams, tokens), np.float32))
    assert backend.choices("cpu").decode_embed_f32 and not backend.choices("tpu").decode_embed_f32
    prompts = RAGGED * 6                          # 18 rows: decodes in bfloat16 (bf16_min_batch 16)
    kw = dict(max_new_tokens=10, kv_cache=True, g_cache=True, top_k=1, eos_id=None)
    outs, table_copy = {}, {}
    for f32_table in (True, False):
        choice = backend.choices(options={"decode_embed_f32": f32_table})
        run_cfg, run_params = weights.prepare_params(bf, bparams, len(prompts), backend=choice)
        assert run_cfg.dtype == "bfloat16"
        assert run_params["embed"]["embedding"].dtype == (jnp.float32 if f32_table else jnp.bfloat16)
        sampler = pldr_jax.Sampler(bf, run_params)
        outs[f32_table] = sampler(prompts, return_logits=True, **kw)
        req = sampler._request(prompts, **kw)
        cache, logits0, _ = sampler._prefill(req)
        hlo = decode_loop._loop_jit.lower(req.spec, req.params, cache, logits0, None, req.key, req.inputs,
                                          n_out=req.n_out).compile().as_text()
        table_copy[f32_table] = any(f"[{cfg.vocab_size},{cfg.d_model}]" in ln and (" convert(" in ln or "fusion(" in ln)
                                    for ln in hlo.splitlines())
    for explicit in (True, False):                # the platform's choice overridden (AOT compiles for TPU)
        want = jnp.float32 if explicit else jnp.bfloat16
        assert weights.prepare_params(bf, bparams, 18, embed_f32=explicit)[1]["embed"]["embedding"].dtype == want
    assert outs[True].compute_dtype == "bfloat16"
    assert outs[True].tokens == outs[False].tokens
    np.testing.assert_array_equal(outs[True].logits, outs[False].logits)
    assert not table_copy[True]                   # no whole-table conversion with the float32 table


def test_wide_kv_cache_for_16bit_models(tiny, monkeypatch):
    """On the jax.lax decode path a bfloat16 model decoding in bfloat16 keeps its keys/values in the
    platform's KV-cache dtype (`backend.kv_cache_dtype`: float32 on CPU), heads first [B, H, S, dk]:
    the same tokens and (up to float32 accumulation order) the same logits as bfloat16 buffers,
    ragged rows, one compilation per bucket.  The native CPU kernel (`backend.decode_attention`)
    keeps bfloat16 buffers: the same tokens again."""

    from pldr_jax import backend
    from pldr_jax.kernels import build
    from pldr_jax.kernels.decode_attention import decode_attention_available
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    cfg, params = tiny
    bf = cfg.replace(dtype="bfloat16")
    prompts = RAGGED * 6                          # 18 rows: decodes in bfloat16 (bf16_min_batch 16)
    kw = dict(max_new_tokens=12, kv_cache=True, g_cache=True, top_k=1, eos_id=None, return_logits=True)
    sampler = pldr_jax.Sampler(bf, params)
    before = compiled_counts()["loop"]
    wide = sampler(prompts, **kw)
    assert wide.compute_dtype == "bfloat16"
    want = backend.choices().kv_cache_dtype or "bfloat16"
    assert wide.cache.k[0].dtype == jnp.dtype(want)
    assert wide.cache.k[0].shape == (len(prompts), cfg.num_heads, wide.cache.max_len, cfg.head_dim)
    again = sampler([p[::-1] for p in prompts], **kw)            # same bucket: no new compilation
    assert compiled_counts()["loop"] - before <= 1 and again.compute_dtype == "bfloat16"
    narrow = pldr_jax.Sampler(bf, params, backend_options={"kv_cache_dtype": None})(prompts, **kw)
    assert narrow.cache.k[0].dtype == jnp.bfloat16
    assert wide.tokens == narrow.tokens
    np.testing.assert_allclose(wide.logits, narrow.logits, atol=2e-2, rtol=2e-2)
    monkeypatch.undo()
    if decode_attention_available():
        native = pldr_jax.Sampler(bf, params)(prompts, **kw)
        assert native.cache.k[0].dtype == jnp.bfloat16 and native.tokens == wide.tokens
        np.testing.assert_allclose(native.logits, narrow.logits, atol=2e-2, rtol=2e-2)
