"""The decoding cache: KV-cache, prompt-time metric tensor and G-cache in one explicit pytree.

Per layer (tuples with one array per layer, so a decode step reads each layer's buffers without
slicing a stacked array):

* ``k``, ``v``: rotated keys and values ``[B, H, S, dk]`` (heads first: attention reads each
  row's heads as ``[B * H, S, dk]`` without a transposed copy) in a fixed-size buffer of S
  positions, in the compute dtype or the platform's wider cache dtype (`pldr_jax.backend`
  ``kv_cache_dtype``; the values are the compute dtype's either way); None when decoding without a
  KV-cache;
* ``A``: the prompt-time metric tensor ``[B|1, H, dk, dk]`` float32 (learned-G models; the
  reference keeps it in its KV-cache and re-derives G from it in the KV-only mode);
* ``A_LM``, ``G_LM``: the G-cache ``[B|1, H, dk, dk]`` float32 (the deductive outputs of the
  prompt; with a given/predefined G only ``G_LM`` is set).  The batch axis is 1 when one G is
  shared by every row (``shared_g=True`` or a single given G).

Plus ``tokens`` ``[B, S]`` int32 (prompt and fed tokens, right-padded with 0) and ``lengths`` ``[B]``
int32 (valid positions per row: row b's next token goes to position ``lengths[b]``).

**KV slots.** The prefill writes row b's prompt keys/values at slots ``0 .. prompt_lengths[b] - 1``.
On accelerators (`pldr_jax.backend` ``decode_shared_kv_slot``; on CPU each row's token goes to its
own position, by an in-place scatter) a decode step then writes every row's new key/value at *one
shared slot* ``kv_next`` (a scalar:
``max(prompt_lengths)`` after the prefill, +1 per step), not at the row's own position: one
in-place ``dynamic_update_slice`` instead of a per-row scatter, which TPUs run by re-laying out the
whole buffer twice per step (experiments/README.md, "TPU decode bytes").  The row's RoPE position
is still its own (keys are rotated before they are cached), and the attention mask admits row b's
prompt slots and the decode slots ``max(prompt_lengths) .. kv_next``, so the keys attended over are
exactly the row's tokens; the slots between a shorter prompt's end and ``max(prompt_lengths)`` are
masked out.  The prefill always sets ``prompt_lengths`` / ``kv_next``; a step with per-row slots
(`step.StepSpec.shared_slot` False: CPU, or a buffer that cannot hold ``max(prompt_lengths)`` + the
longest row's token count) leaves them as they are.

`cache_logical_axes` names every axis ("batch", "kv_len", "attn_heads", "dk", "dk_out") so the one
rule table (`pldr_jax.partitioning.RULES`) shards the cache over batch and heads, like the
parameters (`pldr_jax.params.logical_axes`) and the activations.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ..config import PLDRConfig
from ..partitioning import logical_to_spec, merged_rules

__all__ = ["Cache", "init_cache", "cache_logical_axes", "cache_partition_specs"]


@flax.struct.dataclass
class Cache:
    """KV-cache + G-cache of a batch being decoded (see the module docstring for shapes)."""
    k: tuple | None
    v: tuple | None
    A: tuple | None
    A_LM: tuple | None
    G_LM: tuple | None
    tokens: jax.Array
    lengths: jax.Array
    prompt_lengths: jax.Array | None = None   # [B] int32, the prompts' lengths (shared KV slots)
    kv_next: jax.Array | None = None          # [] int32, the next shared KV slot

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_layers(self) -> int:
        for f in (self.k, self.G_LM, self.A):
            if f is not None:
                return len(f)
        return 0

    def deductive(self) -> dict[str, jax.Array]:
        """The cached deductive outputs stacked over layers: {"A", "A_LM", "G_LM"} (those present),
        each [num_layers, B|1, H, dk, dk]."""
        out = {}
        for name in ("A", "A_LM", "G_LM"):
            v = getattr(self, name)
            if v is not None:
                out[name] = jnp.stack(v)
        return out


def init_cache(cfg: PLDRConfig, batch: int, max_len: int, dtype=None, *, kv: bool = True,
               metric: bool | None = None, g_batch: int | None = None) -> Cache:
    """An empty cache for `batch` rows of up to `max_len` positions.

    dtype: of the key/value buffers (default: ``cfg.dtype``).  kv: allocate the KV buffers (False
    for the no-KV-cache modes, which re-run the whole sequence).  metric: allocate A and A_LM
    (default: learned-G configs).  g_batch: batch axis of A/A_LM/G_LM (1 = one G shared by every
    row; default `batch`).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    dtype = jnp.dtype(dtype or cfg.dtype)
    L, H, dk = cfg.num_layers, cfg.num_heads, cfg.head_dim
    gb = batch if g_batch is None else g_batch
    metric = cfg.learned_g if metric is None else metric
    z_kv = lambda: tuple(jnp.zeros((batch, H, max_len, dk), dtype) for _ in range(L))
    z_g = lambda: tuple(jnp.zeros((gb, H, dk, dk), jnp.float32) for _ in range(L))
    return Cache(k=z_kv() if kv else None, v=z_kv() if kv else None,
                 A=z_g() if metric else None, A_LM=z_g() if metric else None, G_LM=z_g(),
                 tokens=jnp.zeros((batch, max_len), jnp.int32), lengths=jnp.zeros((batch,), jnp.int32))


def _axes(arr, names):
    # a size-1 batch axis (a shared G) is replicated, not sharded
    return tuple(None if (n == "batch" and arr.shape[i] == 1) else n for i, n in enumerate(names))


def cache_logical_axes(cache: Cache) -> Cache:
    """A Cache of the same structure whose leaves are tuples of logical axis names."""
    kv = ("batch", "attn_heads", "kv_len", "dk")
    g = ("batch", "attn_heads", "dk", "dk_out")
    per = lambda t, names: None if t is None else tuple(_axes(a, names) for a in t)
    return Cache(k=per(cache.k, kv), v=per(cache.v, kv), A=per(cache.A, g), A_LM=per(cache.A_LM, g),
                 G_LM=per(cache.G_LM, g), tokens=_axes(cache.tokens, ("batch", "kv_len")),
                 lengths=_axes(cache.lengths, ("batch",)),
                 prompt_lengths=None if cache.prompt_lengths is None else _axes(cache.prompt_lengths, ("batch",)),
                 kv_next=None if cache.kv_next is None else ())


def cache_partition_specs(cache: Cache, rules: Mapping[str, Any] | None = None, mesh=None) -> Cache:
    """PartitionSpecs for `cache` by `partitioning.logical_to_spec`: `rules` (entries replacing those
    of the one table `partitioning.RULES`, e.g. ``{"batch": "data", "attn_heads": "model"}``; None =
    the table), with `mesh` its divisibility fallback."""
    axes = cache_logical_axes(cache)
    table = merged_rules(rules)
    is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
    def spec(names, x):      # one entry per dimension
        s = tuple(logical_to_spec(names, getattr(x, "shape", None), mesh, table))
        return PartitionSpec(*s, *([None] * (len(names) - len(s))))

    return jax.tree_util.tree_map(spec, axes, cache, is_leaf=is_names)
