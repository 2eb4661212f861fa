"""The engine's generate step lowered ahead of time for any mesh (``pldr-jax compile --what serve``).

`lower_generate_step` lowers `slots.generate_step` (a block of decode steps of every slot with
per-slot sampling) on abstract values: the decode weights and the slots' cache placed as
`decode.sharding` places them (slots over the data axes, heads / FFN width / vocabulary over
"tensor"), the per-slot values over the slot axis.  Nothing is allocated; a mesh of TPU devices of
a topology (`aot.topology_devices`) compiles it for TPUs from any host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["lower_generate_step", "SERVE_STEPS"]

#: generate steps per call compiled by ``pldr-jax compile --what serve`` (`Engine`'s default)
SERVE_STEPS = 32


def lower_generate_step(cfg, slots: int, max_len: int, mesh, *, steps: int = SERVE_STEPS, mode: str = "kv_g"):
    """`slots.generate_step` for `slots` slots of `max_len` positions, blocks of up to `steps` steps,
    lowered for `mesh` (returns the ``jax.stages.Lowered``)."""
    from jax.sharding import NamedSharding

    from ..backend import choices, platform_of
    from ..decode.cache import cache_logical_axes
    from ..decode.loop import LoopSpec, prefill_cache
    from ..decode.sampling import make_sampler
    from ..decode.sharding import decode_param_axes, decode_rules
    from ..decode.step import MODES, StepSpec
    from ..decode.weights import prepare_params
    from ..model import normalize_g_lm
    from ..params import abstract_params
    from ..train.sharding import logical_to_spec
    from .slots import SlotParams, empty_slots, generate_step

    kv, g = MODES[mode]
    params = jax.eval_shape(lambda p: prepare_params(cfg, p, slots, bf16_min_batch=0, transpose=False, pack=False,
                                                       embed_f32=False)[1], abstract_params(cfg))
    g_all = normalize_g_lm(cfg, None)
    backend = choices(platform_of(mesh))
    step = StepSpec(cfg=cfg, kv_cache=kv, g_cache=g or g_all is not None, given_g=g_all is not None,
                    shared_slot=False, merged_heads=backend.decode_merged_heads,
                    kv_chunk=backend.decode_kv_chunk if kv else 0)
    spec = LoopSpec(step=step, shared_g=False, sampler_kind=make_sampler(1.0, 1, 1.0).kind)
    one = jax.eval_shape(lambda p: prefill_cache(spec, p, jnp.zeros((1, 16), jnp.int32), jnp.ones((1,), jnp.int32),
                                                 g_all, max_len, stack_deductive=False)[0], params)
    cache = jax.eval_shape(lambda: empty_slots(one, slots, g_all is not None))
    rules = decode_rules(mesh)
    is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
    place = lambda axes, tree: jax.tree_util.tree_map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)), axes, tree,
        is_leaf=is_names)
    row = lambda x: NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, rules))
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)
    B = slots
    p = SlotParams(live=sds((B,), jnp.bool_), count=sds((B,), jnp.int32), key=sds((B, 2), jnp.uint32),
                   temperature=sds((B,), jnp.float32), top_k=sds((B,), jnp.int32), top_p=sds((B,), jnp.float32))
    tokens, limit, eos = sds((B,), jnp.int32), sds((B,), jnp.int32), sds((B,), jnp.int32)
    scalar = NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = (params, cache, tokens, p, limit, eos, sds((), jnp.int32), sds((), jnp.bool_))
    shardings = (place(decode_param_axes(params), params), place(cache_logical_axes(cache), cache), row(tokens),
                 jax.tree_util.tree_map(row, p), row(limit), row(eos), scalar, scalar)
    f = jax.jit(lambda *a: generate_step(step, *a, with_logprobs=False, steps=steps),
                in_shardings=shardings, donate_argnums=(1, 2))
    return f.lower(*args)
