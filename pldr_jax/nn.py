"""Flax linen wrapper: PLDR-LLM as a `flax.linen.Module` for users composing linen models.

The module owns one parameter collection entry, "pldr", holding the plain params pytree of
`pldr_jax.params` (so checkpoints, sharding rules and converters apply unchanged), and calls the
pure `pldr_jax.forward`.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from .config import PLDRConfig
from .model import ForwardOutput, forward
from .params import init_params


class PLDRModule(nn.Module):
    """`PLDRModule(cfg).init(key, tokens)` -> {"params": {"pldr": params}}; `apply(vars, tokens)`
    -> ForwardOutput (logits [B, L, V], deductive outputs [layers, B, H, dk, dk])."""

    cfg: PLDRConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, g_lm: jax.Array | None = None, *,
                 pad_aware_A: bool = False) -> ForwardOutput:
        params = self.param("pldr", lambda key: init_params(self.cfg, key))
        return forward(self.cfg, params, tokens, g_lm, pad_aware_A=pad_aware_A)
