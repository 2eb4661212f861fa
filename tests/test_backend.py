"""Backend-specific choices (`pldr_jax.backend`) and the backend-neutral maths they select between:
forward-mode autodiff through `model.forward` on the default path, and the CPU kernels equal to it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pldr_jax
from pldr_jax import backend
from pldr_jax.model import forward


@pytest.fixture(scope="module")
def tiny():
    cfg = pldr_jax.PLDRConfig.preset("tiny")
    params = pldr_jax.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 12)), jnp.int32)
    return cfg, params, tokens


def _loss(cfg, tokens):
    def f(p):
        lp = jax.nn.log_softmax(forward(cfg, p, tokens).logits)
        return -jnp.mean(jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1))
    return f


def _direction(params, seed=1):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) * 0.1
                                               for k, x in zip(keys, leaves)])


def _along(params, v, e):
    return jax.tree_util.tree_map(lambda a, b: a + e * b, params, v)


def test_jvp_and_linearize_through_forward_match_finite_differences(tiny):
    cfg, params, tokens = tiny
    f = _loss(cfg, tokens)
    v = _direction(params)
    e = 1e-2
    fd = (f(_along(params, v, e)) - f(_along(params, v, -e))) / (2 * e)
    y, dy = jax.jvp(f, (params,), (v,))
    np.testing.assert_allclose(float(dy), float(fd), rtol=2e-2, atol=1e-4)
    y2, lin = jax.linearize(f, params)
    np.testing.assert_allclose(float(lin(v)), float(dy), rtol=1e-5, atol=1e-6)
    assert float(y2) == pytest.approx(float(y), rel=1e-6)
    # the reverse mode agrees with the forward mode
    g = jax.grad(f)(params)
    gv = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(v)))
    np.testing.assert_allclose(float(gv), float(dy), rtol=1e-4, atol=1e-6)


def test_hessian_through_forward_matches_finite_differences_of_the_gradient(tiny):
    """jax.hessian (forward over reverse) of the loss in the output head's bias [V], against central
    differences of the gradient along one direction."""
    cfg, params, tokens = tiny
    f = _loss(cfg, tokens)

    def of_bias(b):
        return f({**params, "final": {**params["final"], "bias": b}})

    b0 = params["final"]["bias"]
    H = jax.hessian(of_bias)(b0)
    assert H.shape == (cfg.vocab_size, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(H), np.asarray(H).T, atol=1e-6)
    u = jax.random.normal(jax.random.PRNGKey(3), b0.shape)
    e = 1e-2
    g = jax.grad(of_bias)
    fd = (g(b0 + e * u) - g(b0 - e * u)) / (2 * e)
    np.testing.assert_allclose(np.asarray(H @ u), np.asarray(fd), rtol=2e-2, atol=2e-5)


def test_cpu_kernels_block_forward_mode_but_agree_in_value_and_gradient(tiny):
    """The CPU kernels (custom_vjp) give the same loss and gradients as the plain path; only the
    plain path supports forward mode."""
    cfg, params, tokens = tiny

    def loss(p, kernels):
        lp = jax.nn.log_softmax(forward(cfg, p, tokens, kernels=kernels).logits)
        return -jnp.mean(jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1))

    (lx, gx), (lc, gc) = (jax.value_and_grad(loss)(params, k) for k in ("xla", "cpu"))
    np.testing.assert_allclose(float(lc), float(lx), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(gc), jax.tree_util.tree_leaves(gx)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda p: loss(p, "cpu"), (params,), (params,))


@pytest.mark.parametrize("max_chunk_bytes", [None, 1])
def test_head_cross_entropy_plain_and_chunked_equal_the_cpu_kernel(max_chunk_bytes):
    from pldr_jax.ops.cross_entropy import head_cross_entropy
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 37)) * 0.3, jnp.float32)
    b = jnp.asarray(rng.normal(size=(37,)) * 0.1, jnp.float32)
    t = jnp.asarray(rng.integers(0, 37, (2, 8)), jnp.int32)

    def total(kernels, chunk):
        return lambda x, w, b: jnp.sum(head_cross_entropy(x, w, b, t, kernels=kernels, max_chunk_bytes=chunk)[0])

    ref_v, ref_g = jax.value_and_grad(total("cpu", None), argnums=(0, 1, 2))(x, w, b)
    v, g = jax.value_and_grad(total("xla", max_chunk_bytes), argnums=(0, 1, 2))(x, w, b)
    np.testing.assert_allclose(float(v), float(ref_v), rtol=1e-5)
    for a, r in zip(g, ref_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5)
    nll, correct = head_cross_entropy(x, w, b, t, max_chunk_bytes=max_chunk_bytes)
    assert nll.shape == correct.shape == (2, 8)


def test_chunked_head_never_holds_the_whole_logits():
    """With a chunk limit, the compiled loss + gradient has no [tokens, V] float32 buffer."""
    from pldr_jax.ops.cross_entropy import head_cross_entropy
    B, S, D, V = 2, 64, 8, 512
    x = jax.ShapeDtypeStruct((B, S, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    b = jax.ShapeDtypeStruct((V,), jnp.float32)
    t = jax.ShapeDtypeStruct((B, S), jnp.int32)

    def g(limit):
        f = lambda x, w, b, t: jnp.sum(head_cross_entropy(x, w, b, t, max_chunk_bytes=limit)[0])
        return jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(x, w, b, t).compile().as_text()

    assert f"f32[{B * S},{V}]" in g(None)
    chunked = g(B * 8 * V * 4)
    assert f"f32[{B * S},{V}]" not in chunked and f"f32[{B},{S},{V}]" not in chunked


def test_attention_in_query_blocks_same_values_and_gradients(tiny):
    """`forward(attn_block=4)` (attention 4 queries at a time, a rematerialised lax.map) gives the
    logits and the remat-ed gradients of attention over all 12 queries at once, padding included."""
    cfg, params, tokens = tiny
    tokens = tokens.at[1, 9:].set(0)
    a, b = forward(cfg, params, tokens), forward(cfg, params, tokens, attn_block=4)
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-5, atol=1e-5)
    loss = lambda blk: jax.grad(lambda p: jnp.sum(forward(cfg, p, tokens, remat="full", attn_block=blk).logits ** 2))
    ga, gb = loss(0)(params), loss(4)(params)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-4 * float(jnp.abs(x).max()) + 1e-7)


def test_choices_by_platform_and_override(monkeypatch):
    monkeypatch.delenv(backend.KERNELS_ENV, raising=False)
    cpu, tpu = backend.choices("cpu"), backend.choices("tpu")
    native = backend._native_kernels_enabled()
    assert (cpu.kernels, cpu.unroll_layers, cpu.decode_transposed) == ("cpu", True, ("float32",))
    # the packed float32 matmul outruns XLA:CPU's bfloat16 products below 16 rows: bfloat16 from 16
    assert cpu.bf16_min_batch == (16 if native else 8) and cpu.decode_matmul == ("packed" if native else "xla")
    assert tpu.decode_matmul == "xla"
    assert (tpu.kernels, tpu.unroll_layers, tpu.bf16_min_batch, tpu.decode_transposed) == ("xla", False, 0, ())
    assert (cpu.kv_cache_dtype, tpu.kv_cache_dtype) == ("float32", None)
    assert cpu.decode_embed_f32 and not tpu.decode_embed_f32      # float32 decode embedding table on CPU
    assert tpu.remat == "full" and cpu.remat == "none" and tpu.head_chunk_bytes > 0 == cpu.head_chunk_bytes
    assert tpu.attention_block > 0 == cpu.attention_block       # CPU: attention over all queries at once
    monkeypatch.setenv(backend.KERNELS_ENV, "xla")
    assert backend.choices("cpu").kernels == "xla"
    monkeypatch.setenv(backend.KERNELS_ENV, "bogus")
    with pytest.raises(ValueError, match="PLDR_JAX_KERNELS"):
        backend.choices("cpu")


def test_step_options_resolve_per_platform():
    from pldr_jax.train import StepOptions
    o = StepOptions()
    assert (o.remat, o.unroll_layers, o.kernels) == (None, None, None)
    assert o.resolved("cpu").unroll_layers and o.resolved("cpu").kernels in backend.KERNELS
    t = StepOptions(remat="full").resolved("tpu")
    assert (t.remat, t.unroll_layers) == ("full", False)
    with pytest.raises(ValueError, match="remat"):
        StepOptions(remat="some")
    with pytest.raises(ValueError, match="kernels"):
        StepOptions(kernels="fast")


def test_huge_pages_only_for_a_cpu_process():
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("the glibc tunable is Linux-only")
    assert backend.huge_pages_wanted({"JAX_PLATFORMS": "cpu"})
    assert not backend.huge_pages_wanted({"JAX_PLATFORMS": "tpu"})
    assert not backend.huge_pages_wanted({"JAX_PLATFORMS": "cuda,cpu"})


def test_decode_dtype_follows_the_platform(monkeypatch):
    from pldr_jax.decode.weights import decode_dtype
    cfg = pldr_jax.PLDRConfig.preset("tiny", dtype="bfloat16")
    assert decode_dtype(cfg, 1) == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    assert decode_dtype(cfg, 1, bf16_min_batch=0) == "bfloat16"


@pytest.mark.parametrize("name, n, layers, d_model", [("v51-1b", 1_058_903_156, 18, 2048),
                                                      ("v51-8b", 7_984_456_184, 38, 4096)])
def test_scale_up_presets_parameter_counts(name, n, layers, d_model):
    """The planning presets keep the family's shape rules (head_dim 64, paper FFN width, the 110M
    metric learner); parameter counts by jax.eval_shape (nothing allocated)."""
    from pldr_jax.config import paper_dff
    from pldr_jax.params import abstract_params
    cfg = pldr_jax.PLDRConfig.preset(name)
    small = pldr_jax.PLDRConfig.preset("v51-110m")
    assert (cfg.num_layers, cfg.d_model, cfg.head_dim, cfg.dff) == (layers, d_model, 64, paper_dff(d_model))
    assert (cfg.A_dff, cfg.num_reslayerA, cfg.num_denseA) == (small.A_dff, small.num_reslayerA, small.num_denseA)
    shapes = jax.eval_shape(lambda: abstract_params(cfg))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == n
