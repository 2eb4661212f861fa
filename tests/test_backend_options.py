"""Backend choices as a value (`pldr_jax.backend.choices(platform, options)`): options validated and
parsed, part of the compile-cache keys, and the accelerator choices run on CPU -- the whole train
step and the decode loop -- giving the CPU path's losses and greedy ids.  Plus the one sharding rule
table: a user's rules reach the parameters, the activations and the decode cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType

import pldr_jax
from pldr_jax import backend
from pldr_jax.decode import init_cache
from pldr_jax.decode.cache import cache_partition_specs
from pldr_jax.decode.loop import compiled_counts
from pldr_jax.decode.step import MODES
from pldr_jax.partitioning import activation_sharding
from pldr_jax.train import StepOptions, create_train_state, make_optimizer, make_train_step
from pldr_jax.train.sharding import param_partition_specs

FAST_COMPILE = {"xla_backend_optimization_level": 0}
PROMPTS = [[70, 48, 9, 8, 68, 61, 1], [5, 17, 99], [12, 40, 33, 7, 7, 81, 2, 64, 90, 11]]


def _accelerator_on_cpu(cfg, batch: int, block: int):
    """The TPU/GPU choices on CPU, with blocks small enough for a tiny model to use them."""
    return backend.choices("cpu", backend.accelerator_options(
        attention_block=block, head_chunk_bytes=batch * block * cfg.vocab_size * 4, decode_kv_chunk=4))


def test_options_are_validated_and_parsed():
    with pytest.raises(ValueError, match="valid options: .*attention_block"):
        backend.choices("cpu", {"atention_block": 256})
    with pytest.raises(ValueError, match="remat"):
        backend.choices("cpu", {"remat": "some"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        backend.parse_backend_options(["attention_block"])
    with pytest.raises(ValueError, match="unknown backend option"):
        backend.parse_backend_options(["bogus=1"])
    opts = backend.parse_backend_options(["attention_block=256", "decode-shared-kv-slot=true", "kv_cache_dtype=none",
                                          "decode_transposed=float32,bfloat16", "kernels=xla"])
    assert opts == {"attention_block": 256, "decode_shared_kv_slot": True, "kv_cache_dtype": None,
                    "decode_transposed": ("float32", "bfloat16"), "kernels": "xla"}
    ch = backend.choices("cpu", opts)
    assert ch.platform == "cpu" and ch.attention_block == 256 and ch.decode_shared_kv_slot and ch.kernels == "xla"
    acc = backend.choices("cpu", backend.accelerator_options())
    tpu = backend.choices("tpu")
    # the TPU's settings, but the layer's own query blocks for attention (splash lowers on TPUs only)
    assert {f: getattr(acc, f) for f in backend.OPTION_NAMES} == {**{f: getattr(tpu, f) for f in backend.OPTION_NAMES},
                                                                  "attention_impl": "blocks"}
    assert tpu.attention_impl == "splash"
    with pytest.raises(ValueError, match="BackendChoices"):
        pldr_jax.Sampler(pldr_jax.PLDRConfig.preset("tiny"), {}, backend="tpu")


def _train(cfg, ch, steps=3, batch=4, seq=16):
    tx = optax.sgd(0.1)         # (Adam would turn last-bit gradient differences of near-zero gradients into
    #                              whole-step updates: the losses would differ by the optimiser, not the step)
    state = create_train_state(cfg, tx, 0)
    step = make_train_step(cfg, tx, opts=StepOptions(), donate=False, compiler_options=FAST_COMPILE, backend=ch)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        toks = rng.integers(1, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
        toks[0, seq - 3:] = 0                                          # some padding
        state, m = step(state, {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])})
        losses.append(float(m["loss"]))
    return step, losses


def test_accelerator_choices_train_step_on_cpu_gives_the_cpu_losses():
    cfg = pldr_jax.PLDRConfig.preset("tiny")
    acc = _accelerator_on_cpu(cfg, batch=4, block=4)
    cpu_step, cpu = _train(cfg, backend.choices("cpu"))
    acc_step, got = _train(cfg, acc)
    o = acc_step.opts                       # scan, full remat, query blocks, chunked head, XLA matmuls
    assert (o.unroll_layers, o.remat, o.kernels, o.attention_block) == (False, "full", "xla", 4)
    assert 0 < o.head_chunk_bytes < 4 * 16 * cfg.vocab_size * 4 and acc_step.backend is acc
    assert cpu_step.opts.unroll_layers and cpu_step.opts.remat == "none"
    np.testing.assert_allclose(got, cpu, rtol=1e-5)


def test_accelerator_choices_decode_on_cpu_gives_the_cpu_ids(tiny_v510):
    cfg, params = tiny_v510
    acc = _accelerator_on_cpu(cfg, batch=len(PROMPTS), block=4)
    cpu_s, acc_s = pldr_jax.Sampler(cfg, params), pldr_jax.Sampler(cfg, params, backend=acc)
    assert jax.tree_util.tree_structure(acc_s.weights(3)[1]) == jax.tree_util.tree_structure(
        pldr_jax.decode.prepare_params(cfg, params, 3, transpose=False, pack=False)[1])   # plain weights
    for mode, (kv, g) in MODES.items():
        kw = dict(max_new_tokens=6, kv_cache=kv, g_cache=g, top_k=1, eos_id=None)
        step = acc_s._request(PROMPTS, **kw).spec.step
        if kv:                              # one shared slot, live chunks, two batch axes, no native kernel
            assert step.shared_slot and step.kv_chunk == 4 and not step.merged_heads and not step.native_kv
        assert acc_s(PROMPTS, **kw).tokens == cpu_s(PROMPTS, **kw).tokens, mode


def test_an_option_changes_the_compiled_program(tiny_v510):
    cfg, params = tiny_v510
    kw = dict(max_new_tokens=5, top_k=1, eos_id=None)
    base = pldr_jax.Sampler(cfg, params)(PROMPTS, **kw)
    before = compiled_counts()["loop"]
    chunked = pldr_jax.Sampler(cfg, params, backend_options={"decode_kv_chunk": 4})
    assert chunked._request(PROMPTS, **kw).spec.step.kv_chunk == 4
    assert chunked(PROMPTS, **kw).tokens == base.tokens
    assert compiled_counts()["loop"] == before + 1                       # a second compile, not a cache hit
    chunked(PROMPTS, **kw)
    assert compiled_counts()["loop"] == before + 1
    # the train step: the options are its own compile key (a new function per value), and change the program
    tcfg = pldr_jax.PLDRConfig.preset("tiny")
    tx = make_optimizer(3e-2, 0, 20, 0.1)
    state = create_train_state(tcfg, tx, 0)
    batch = {"inputs": jnp.ones((2, 16), jnp.int32), "targets": jnp.ones((2, 16), jnp.int32)}
    text = {b: make_train_step(tcfg, tx, donate=False, backend=backend.choices("cpu", {"attention_block": b}))
            .lower(state, batch).as_text() for b in (0, 4)}
    assert text[0] != text[4]


def test_user_rules_apply_to_parameters_activations_and_cache():
    cfg = pldr_jax.PLDRConfig.preset("tiny")
    mesh = AbstractMesh((1, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = {"heads": None, "attn_heads": None, "mlp": None, "vocab": None}     # nothing over "tensor"
    uses_tensor = lambda specs: any("tensor" in str(s) for s in jax.tree_util.tree_leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    assert uses_tensor(param_partition_specs(cfg, mesh)) and not uses_tensor(param_partition_specs(cfg, mesh, rules))
    cache = init_cache(cfg, 2, 16)
    assert uses_tensor(cache_partition_specs(cache, None, mesh))
    assert not uses_tensor(cache_partition_specs(cache, rules, mesh))
    params = pldr_jax.init_params(cfg, jax.random.key(0))
    toks = jnp.ones((2, 8), jnp.int32)
    constraints = {}
    for name, r in (("default", None), ("user", rules)):
        with activation_sharding(mesh, r):
            jaxpr = str(jax.make_jaxpr(lambda p, t: pldr_jax.forward(cfg, p, t).logits)(params, toks))
        constraints[name] = [ln.split("spec=", 1)[1] for ln in jaxpr.splitlines() if "spec=" in ln]
    assert any("'tensor'" in ln for ln in constraints["default"])
    assert constraints["user"] and not any("'tensor'" in ln for ln in constraints["user"])


def test_prefill_with_the_accelerator_fused_attention_gives_the_query_blocks_ids_and_logits(tiny_v510):
    """The decode plan's prompt pass takes the training step's attention choice (`strategies`): with
    the accelerator choices and XLA's SDPA (the fused kernels' formulation, on CPU) the prefill runs
    `FusedAttention` over the keys' validity, and the greedy ids and every step's logits equal the
    query blocks' (`attention_impl` "blocks") and the CPU path's ids; the decode steps keep their KV attention."""
    from pldr_jax.kernels.fused_attention import FusedAttention
    from pldr_jax.layer import SequenceAttention
    cfg, params = tiny_v510
    blocks = _accelerator_on_cpu(cfg, batch=len(PROMPTS), block=4)
    fused = backend.with_options(blocks, {"attention_impl": "xla_sdpa"})
    kw = dict(max_new_tokens=5, top_k=1, eos_id=None, return_logits=True)
    runs = {}
    for name, ch in (("blocks", blocks), ("fused", fused)):
        s = pldr_jax.Sampler(cfg, params, backend=ch)
        step = s._request(PROMPTS, **kw).spec.step
        assert step.shared_slot and step.kv_chunk == 4          # the decode steps: live-slot KV attention
        runs[name] = (step.prefill_attention, s(PROMPTS, **kw))
    assert runs["fused"][0] == FusedAttention(block=4, implementation="xla_sdpa")
    assert runs["blocks"][0] == SequenceAttention(block=4)
    assert pldr_jax.Sampler(cfg, params)._request(PROMPTS, **kw).spec.step.prefill_attention == SequenceAttention()
    a, b = runs["blocks"][1], runs["fused"][1]
    assert b.tokens == a.tokens == pldr_jax.Sampler(cfg, params)(PROMPTS, **kw).tokens
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-5, atol=1e-5)
