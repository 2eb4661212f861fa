"""The task heads (`pldr_jax.heads`) as a Flax NNX module over the same functions.

`PLDRTaskModel(cfg, head_cfg, rngs=nnx.Rngs(0))` holds the decoder's Params (the per-layer layout of
`pldr_jax.nnx.PLDRLLM`, without the LM output head) and the head's (`model.head.kernel`, `.bias`),
each with its logical sharding axes as metadata.  `model(tokens)` is `heads.head_logits` on those
params, `model.loss(tokens, labels)` is `heads.head_loss` on its outputs: differentiate it with
`nnx.value_and_grad` and step an `nnx.Optimizer`.

    model = PLDRTaskModel.from_params(cfg, head_cfg, params, head)   # e.g. from io.hf.load_hf_head
    params, head = model.to_params()                                # stacked layout, head dict
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx

from .config import PLDRConfig
from .heads import HeadConfig, head_logical_axes, head_logits, head_loss, init_head
from .nnx import ParamTree
from .params import init_params, logical_axes, stack_layers, unstack_layers

__all__ = ["PLDRTaskModel"]

_DECODER = ("embed", "embed_norm")


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


class PLDRTaskModel(nnx.Module):
    """A PLDR-LLM decoder with a task head (sequence / token classification, extractive QA).

    Pass rngs= (fresh decoder as `init_params`, fresh head as `heads.init_head`) or params= and
    head= (existing weights; params' "final", if present, is dropped).
    """

    def __init__(self, cfg: PLDRConfig, head_cfg: HeadConfig, *, rngs: nnx.Rngs | None = None,
                 params: Mapping[str, Any] | None = None, head: Mapping[str, Any] | None = None):
        if not isinstance(cfg, PLDRConfig) or not isinstance(head_cfg, HeadConfig):
            raise TypeError("PLDRTaskModel(cfg: PLDRConfig, head_cfg: HeadConfig, ...)")
        if (rngs is None) == (params is None) or (params is None) != (head is None):
            raise ValueError("pass rngs= (fresh initialisation) or both params= and head= (existing weights)")
        self.cfg, self.head_cfg = cfg, head_cfg
        if params is None:
            params = init_params(cfg, rngs.params())
            head = init_head(cfg, head_cfg, rngs.params())
        per = unstack_layers({k: v for k, v in params.items() if k != "final"})
        if len(per["layers"]) != cfg.num_layers:
            raise ValueError(f"params have {len(per['layers'])} layers, cfg.num_layers={cfg.num_layers}")
        axes = logical_axes(cfg)
        layer_axes = jax.tree_util.tree_map(lambda a: a[1:], axes["layers"], is_leaf=_is_axes)
        for name in _DECODER:
            setattr(self, name, ParamTree(per[name], axes[name]))
        self.layers = nnx.List([ParamTree(lp, layer_axes) for lp in per["layers"]])
        self.head = ParamTree(head, head_logical_axes(head_cfg))

    @classmethod
    def from_params(cls, cfg: PLDRConfig, head_cfg: HeadConfig, params: Mapping[str, Any],
                    head: Mapping[str, Any]) -> "PLDRTaskModel":
        return cls(cfg, head_cfg, params=params, head=head)

    def decoder_params(self) -> dict:
        """The decoder's functional params, per-layer layout, no "final"."""
        return {"embed": self.embed.to_dict(), "embed_norm": self.embed_norm.to_dict(),
                "layers": tuple(lp.to_dict() for lp in self.layers)}

    def to_params(self) -> tuple[dict, dict]:
        """(decoder params in the stacked layout, head params)."""
        return stack_layers(self.decoder_params()), self.head.to_dict()

    def __call__(self, tokens: jax.Array, g_lm: jax.Array | None = None):
        """tokens [B, L] int -> the head's outputs (`heads.apply_head`)."""
        return head_logits(self.cfg, self.head_cfg, self.decoder_params(), self.head.to_dict(), tokens, g_lm)

    def loss(self, tokens: jax.Array, labels, g_lm: jax.Array | None = None, *,
             example_mask: jax.Array | None = None) -> jax.Array:
        """Hugging Face's loss of the head for these labels (`heads.head_loss`)."""
        return head_loss(self.head_cfg, self(tokens, g_lm), labels, example_mask=example_mask)[0]
