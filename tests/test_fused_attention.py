"""`pldr_jax.kernels.fused_attention`: power-law graph attention as SDPA on q' = q G_LM, through
the platforms' fused kernels, equal to the current path (`ops.attention.plga_attention`) in values
and gradients -- cuDNN's formulation (key counts, causal) and XLA's SDPA through
`jax.nn.dot_product_attention`'s XLA implementation, Pallas splash attention in interpret mode --
and compiled for the real targets ahead of time (a GPU with the CUDA plugin, a TPU with libtpu)."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import targets
from pldr_jax.kernels.fused_attention import fused_attention, key_valid_of, power_law_query, splash_block
from pldr_jax.ops.attention import causal_padding_mask, plga_attention

B, L, H, DK = 2, 256, 2, 64
FORMS = [("xla_sdpa", {}), ("xla_sdpa", {"padding": "lengths"}), ("splash", {"interpret": True})]
IDS = ["xla_sdpa", "cudnn_form", "splash_interpret"]

needs_cuda = pytest.mark.skipif(not targets.cuda_plugin_installed(),
                                reason='CUDA plugin not installed (pip install -e ".[cuda]")')
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu not installed (pip install "jax[tpu]==<jax version>")')


def _inputs(dtype, g_kind, lengths=(L, 200)):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(kk, (B, L, H, DK)).astype(dtype) for kk in ks[:3])
    g = {"learned": jnp.eye(DK)[None, None] + 0.2 * jax.random.normal(ks[3], (B, H, DK, DK)),
         "given": jnp.eye(DK)[None, None] + 0.2 * jax.random.normal(ks[3], (1, H, DK, DK)),
         "identity": None}[g_kind]
    valid = jnp.arange(L)[None] < jnp.asarray(lengths)[:, None]          # right padding, as the data
    return q, k, v, g, valid


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _loss_grads(fn, q, k, v, g):
    """Gradients of a fixed random projection of the attention output wrt q, k, v (and G_LM)."""
    w = jax.random.normal(jax.random.PRNGKey(7), (B, L, H, DK))
    args = (q, k, v) if g is None else (q, k, v, g)
    f = lambda *a: jnp.sum(fn(*a[:3], a[3] if g is not None else None).astype(jnp.float32) * w)
    return jax.grad(f, argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("g_kind", ["learned", "given", "identity"])
@pytest.mark.parametrize("impl,kw", FORMS, ids=IDS)
def test_float32_values_and_gradients_equal_plga_attention(impl, kw, g_kind):
    q, k, v, g, valid = _inputs(jnp.float32, g_kind)
    mask = causal_padding_mask(valid, L)
    ref = plga_attention(q, k, v, g, mask)
    out = fused_attention(q, k, v, g, key_valid_of(mask), impl, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rel(out, ref) < 1e-5
    want = _loss_grads(lambda q, k, v, g: plga_attention(q, k, v, g, mask), q, k, v, g)
    got = _loss_grads(lambda q, k, v, g: fused_attention(q, k, v, g, valid, impl, **kw), q, k, v, g)
    for name, a, b in zip("qkvg", got, want):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


@pytest.mark.parametrize("impl,kw", FORMS, ids=IDS)
def test_bfloat16_equal_at_bfloat16_rounding(impl, kw):
    """bfloat16 inputs: the fused forms and the current path differ by bfloat16 rounding only (the
    same float32 logits and softmax; probabilities rounded at a different point); both are as far
    from the float32 result as bfloat16 allows."""
    q, k, v, g, valid = _inputs(jnp.bfloat16, "learned")
    mask = causal_padding_mask(valid, L)
    ref = plga_attention(q, k, v, g, mask)
    out = fused_attention(q, k, v, g, valid, impl, **kw)
    assert out.dtype == jnp.bfloat16
    eps = float(jnp.finfo(jnp.bfloat16).eps)                       # 2^-7
    exact = plga_attention(*(t.astype(jnp.float32) for t in (q, k, v)), g, mask)
    assert _rel(out, ref) < 2 * eps and _rel(out, exact) < 2 * eps and _rel(ref, exact) < 2 * eps
    want = _loss_grads(lambda q, k, v, g: plga_attention(q, k, v, g, mask), q, k, v, g)
    got = _loss_grads(lambda q, k, v, g: fused_attention(q, k, v, g, valid, impl, **kw), q, k, v, g)
    for name, a, b in zip("qkvg", got, want):
        assert _rel(a, b) < 4 * eps, (name, _rel(a, b))


@pytest.mark.parametrize("impl,kw", FORMS, ids=IDS)
def test_a_row_without_valid_keys_attends_to_its_first_key(impl, kw):
    """An all-pad row (no valid key): finite, each query attends to the row's first key (its value);
    the other row is unaffected."""
    q, k, v, g, valid = _inputs(jnp.float32, "learned", lengths=(L, 0))
    out = fused_attention(q, k, v, g, valid, impl, **kw)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out[1], jnp.broadcast_to(v[1, :1], (L, H, DK)), rtol=1e-6, atol=1e-6)
    ref = plga_attention(q, k, v, g, causal_padding_mask(valid, L))
    assert _rel(out[0], ref[0]) < 1e-5


def test_power_law_query_is_the_per_head_product_and_key_valid_the_last_row():
    q, _, _, g, valid = _inputs(jnp.float32, "learned")
    want = np.einsum("blhd,bhde->blhe", np.asarray(q, np.float64), np.asarray(g, np.float64))
    np.testing.assert_allclose(power_law_query(q, g), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(key_valid_of(causal_padding_mask(valid, L)), valid)
    assert [splash_block(n) for n in (1024, 768, 384, 100)] == [512, 256, 128, 0]


def test_bad_arguments_are_one_line_errors():
    q, k, v, g, valid = _inputs(jnp.float32, "learned")
    with pytest.raises(ValueError, match="one of"):
        fused_attention(q, k, v, g, valid, "flash")
    with pytest.raises(ValueError, match="multiple of 128"):
        fused_attention(q[:, :100], k[:, :100], v[:, :100], g, valid[:, :100], "splash", interpret=True)
    with pytest.raises(ValueError, match="causal self-attention mask"):
        key_valid_of(jnp.ones((B, 1, 1, L), bool))


@needs_cuda
def test_cudnn_compiles_for_an_h100_forward_and_backward():
    """The cuDNN form compiles ahead of time for one H100 (no GPU here): the forward and backward
    passes are cuDNN flash-attention custom calls, no [L, L] buffer."""
    from pldr_jax.targets import topology_devices
    dev = topology_devices("h100:1x1")[0]
    q, k, v, g, valid = _inputs(jnp.bfloat16, "learned")
    sh = jax.sharding.SingleDeviceSharding(dev)
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    f = jax.jit(jax.grad(lambda q, k, v, g, valid: jnp.sum(
        fused_attention(q, k, v, g, valid, "cudnn").astype(jnp.float32)), argnums=(0, 1, 2, 3)))
    hlo = f.lower(*(spec(x) for x in (q, k, v, g, valid))).compile().as_text()
    assert "__cudnn$fmhaSoftmax" in hlo and "__cudnn$fmhaSoftmaxBackward" in hlo, "no cuDNN attention"
    assert f"[{B},{H},{L},{L}]" not in hlo and f"{L},{L}]" not in hlo


@needs_libtpu
def test_splash_compiles_for_v5e_sharded_over_batch_and_heads():
    """Splash attention inside shard_map compiles for v5e:2x2 with the batch over fsdp and the heads
    over tensor: a Mosaic kernel on each chip's shard, no all-gather / all-to-all of activations."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from pldr_jax.targets import topology_devices
    devs = np.array(topology_devices("v5e:2x2")).reshape(1, 2, 2)
    mesh = Mesh(devs, ("data", "fsdp", "tensor"))
    q, k, v, g, valid = _inputs(jnp.bfloat16, "learned")
    act = NamedSharding(mesh, P("fsdp", None, "tensor", None))
    spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    def loss(q, k, v, g, valid):
        return jnp.sum(fused_attention(q, k, v, g, valid, "splash").astype(jnp.float32))

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = f.lower(spec(q, act), spec(k, act), spec(v, act),
                          spec(g, NamedSharding(mesh, P("fsdp", "tensor"))), spec(valid, NamedSharding(mesh, P("fsdp"))))
    hlo = lowered.compile().as_text()
    assert "tpu_custom_call" in hlo
    assert "all-to-all" not in hlo and not any("all-gather" in ln and f"{L}" in ln for ln in hlo.splitlines())


@pytest.mark.parametrize("impl,preset", [("splash_interpret", "tiny"), ("xla_sdpa", "tiny-g")])
def test_training_loss_and_gradients_with_the_accelerator_attention(impl, preset):
    """The training step's loss terms and gradients with a fused attention (`StepOptions.attention_impl`)
    equal the query-block path's, learned and predefined G_LM, with right-padded and all-pad rows
    (finite: an all-pad row's keys are not attended over nothing)."""
    from pldr_jax.config import PLDRConfig
    from pldr_jax.params import init_params
    from pldr_jax.train.step import StepOptions, loss_terms
    cfg = PLDRConfig.preset(preset, max_seq_len=128)
    params = init_params(cfg, jax.random.PRNGKey(1))
    tok = jax.random.randint(jax.random.PRNGKey(2), (3, 129), 1, cfg.vocab_size)
    tok = tok.at[1, 90:].set(0).at[2].set(0)                          # right-padded and all-pad rows
    g = None if cfg.learned_g else jnp.broadcast_to(jnp.eye(cfg.head_dim), (cfg.num_layers, 1, cfg.num_heads,
                                                                             cfg.head_dim, cfg.head_dim))
    loss = lambda impl: lambda p: (lambda t: t["ce_sum"] / t["count"])(loss_terms(
        cfg, p, tok[:, :-1], tok[:, 1:], g, StepOptions(attention_impl=impl, attention_block=32, kernels="xla",
                                                        remat="full", unroll_layers=False)))
    blocks_of_32 = "length=4"                   # the query blocks' lax.map over 128 / 32 blocks
    assert blocks_of_32 in str(jax.make_jaxpr(loss("blocks"))(params))
    assert blocks_of_32 not in str(jax.make_jaxpr(loss(impl))(params))
    (want, gw), (got, gg) = (jax.value_and_grad(loss(i))(params) for i in ("blocks", impl))
    assert np.isfinite(float(got)) and abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
    for a, b in zip(jax.tree_util.tree_leaves(gg), jax.tree_util.tree_leaves(gw)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_attention_impl_is_a_backend_choice_and_validated():
    from pldr_jax.backend import choices
    from pldr_jax.kernels.fused_attention import FusedAttention, fused_strategy
    from pldr_jax.layer import SequenceAttention
    from pldr_jax.train.step import StepOptions
    assert [choices(p).attention_impl for p in ("cpu", "gpu", "tpu")] == ["blocks", "cudnn", "splash"]
    assert StepOptions().resolved("gpu").attention_impl == "cudnn"
    assert StepOptions(attention_impl="blocks").resolved("tpu").attention_impl == "blocks"
    assert fused_strategy("blocks") is None
    assert fused_strategy("splash_interpret", 4) == FusedAttention(block=4, implementation="splash", interpret=True)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        StepOptions(attention_impl="flash")
    # where a kernel does not apply (splash: 100 is no multiple of 128; cuDNN: float32) the query blocks run
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 100, 2, 8), jnp.float32)
    own, _ = SequenceAttention(block=4)(q, q, q, None)
    for impl in ("splash", "cudnn"):
        att, kv = FusedAttention(block=4, implementation=impl)(q, q, q, None)
        assert (att == own).all() and kv[0] is q


@pytest.mark.slow
def test_accelerator_check_runs_on_cpu_with_the_accelerator_choices(tmp_path):
    """experiments/accelerator_check.py at tiny size: golden forward and four-mode decode, a few
    training steps with a TPU's choices (scan, full remat, splash attention in interpret mode)
    against the CPU choices, speed; one JSON whose checks pass."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "check.json"
    r = subprocess.run([sys.executable, str(root / "experiments" / "accelerator_check.py"), "--train-steps", "3",
                        "--bench-batch", "2", "--bench-seq-len", "32", "--repeats", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["platform"] == "cpu" and set(rep["golden_decode"]) == {"kv_g", "kv", "g", "none"}
    assert rep["train"]["options"]["attention_impl"] == "splash_interpret" and rep["train"]["options"]["remat"] == "full"
    assert len(rep["train"]["losses"]) == 3 and rep["speed"]["train_tokens_per_s"] > 0 and rep["speed"]["decode_s"] > 0


def test_forward_refuses_a_fused_attention_with_a_packed_mask():
    from pldr_jax.config import PLDRConfig
    from pldr_jax.kernels.fused_attention import FusedAttention
    from pldr_jax.model import forward
    from pldr_jax.params import init_params
    cfg = PLDRConfig.preset("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tok = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="causal-padding mask only"):
        forward(cfg, params, tok, attn_mask=jnp.ones((1, 1, 8, 8), bool), attention=FusedAttention(implementation="xla_sdpa"))
