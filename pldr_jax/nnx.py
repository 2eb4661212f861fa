"""PLDR-LLM as a Flax NNX module, over the same functional core.

`PLDRLLM(cfg, rngs=nnx.Rngs(0))` holds one `nnx.Param` per array of `pldr_jax.params` (the
per-layer layout: `model.layers[i]` is layer i, its leaves without the leading [num_layers] axis).
Every Param carries its logical sharding axes as metadata (`param.out_sharding`, the names of
`params.logical_axes`: "embed", "heads", "mlp", ...).  Metadata only: a Param is never sharded
eagerly (`eager_sharding=False`, so building a model needs no mesh); `partition_specs(model, mesh)`
maps the names to PartitionSpecs with the one rule table (`pldr_jax.partitioning.RULES`, its
divisibility fallback included), one per Param, for placing the state on a mesh.

The maths is not here: `__call__` builds the functional params tree from the Params and calls
`pldr_jax.model.forward` (the Python loop over per-layer params), so the NNX model computes exactly
what the functional model computes.

Conversion, exact both ways::

    model = PLDRLLM.from_params(cfg, params)          # params: stacked or per-layer layout
    params = model.to_params()                         # stacked layout (the training / checkpoint layout)
    state_to_params(nnx.state(model, nnx.Param))       # the same, from an nnx.State
    nnx.update(model, params_to_state(params))         # load functional params into a model

Training: `model.loss(inputs, targets)` is the train step's objective (`losses.loss_terms` and
`losses.objective`, the same code);
with `nnx.value_and_grad` and `nnx.Optimizer(model, make_optimizer(...), wrt=nnx.Param)` a step
gives `make_train_step`'s losses (tests/test_nnx.py).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .backend import choices
from .config import PLDRConfig
from .losses import LossOptions, loss_terms, objective
from .model import ForwardOutput, forward
from .params import init_params, logical_axes, stack_layers, unstack_layers
from .partitioning import logical_to_spec, merged_rules

__all__ = ["PLDRLLM", "LossOptions", "ParamTree", "params_to_state", "state_to_params", "partition_specs"]


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


class ParamTree(nnx.Module):
    """A nested group of `nnx.Param`s mirroring one dict of the functional params tree
    (attribute name = dict key; leaves are Params with `out_sharding` = logical axis names)."""

    def __init__(self, values: Mapping[str, Any], axes: Mapping[str, Any]):
        for name, v in values.items():
            if name not in axes:
                raise ValueError(f"parameter {name!r} has no logical axes (expected one of {sorted(axes)})")
            a = axes[name]
            if isinstance(v, Mapping):
                setattr(self, name, ParamTree(v, a))
            else:
                if not _is_axes(a) or len(a) != jnp.ndim(v):
                    raise ValueError(f"parameter {name!r} of shape {jnp.shape(v)} does not match its "
                                     f"logical axes {a!r}")
                setattr(self, name, nnx.Param(jnp.asarray(v), out_sharding=a, eager_sharding=False))

    def to_dict(self) -> dict:
        """The plain {name: array | dict} tree (arrays are the Params' current values)."""
        out = {}
        for name, v in vars(self).items():
            if isinstance(v, ParamTree):
                out[name] = v.to_dict()
            elif isinstance(v, nnx.Param):
                out[name] = v[...]
        return out


class PLDRLLM(nnx.Module):
    """PLDR-LLM with per-layer `nnx.Param`s.

    `PLDRLLM(cfg, rngs=nnx.Rngs(seed))` initialises with `init_params(cfg, rngs.params())` (the
    reference's initialisers); `PLDRLLM.from_params(cfg, params)` wraps existing params.
    Attributes: `embed`, `embed_norm`, `final` (ParamTrees) and `layers` (nnx.List of one ParamTree
    per decoder layer).  `model(tokens)` -> `ForwardOutput` exactly as `forward(cfg, params, tokens)`.
    """

    def __init__(self, cfg: PLDRConfig, *, rngs: nnx.Rngs | None = None, params: Mapping[str, Any] | None = None):
        if not isinstance(cfg, PLDRConfig):
            raise TypeError(f"cfg must be a PLDRConfig, got {type(cfg).__name__}")
        if (rngs is None) == (params is None):
            raise ValueError("pass exactly one of rngs= (fresh initialisation) or params= (existing weights)")
        self.cfg = cfg
        if params is None:
            params = init_params(cfg, rngs.params())
        per = unstack_layers(dict(params))
        if len(per["layers"]) != cfg.num_layers:
            raise ValueError(f"params have {len(per['layers'])} layers, cfg.num_layers={cfg.num_layers}")
        axes = logical_axes(cfg)
        layer_axes = jax.tree_util.tree_map(lambda a: a[1:], axes["layers"], is_leaf=_is_axes)
        for name in ("embed", "embed_norm", "final"):
            setattr(self, name, ParamTree(per[name], axes[name]))
        self.layers = nnx.List([ParamTree(lp, layer_axes) for lp in per["layers"]])
        extra = set(per) - {"embed", "embed_norm", "final", "layers"}
        if extra:
            raise ValueError(f"unknown top-level params {sorted(extra)} (fused params cannot be wrapped: "
                             f"pass the stored, unfused layout)")

    @classmethod
    def from_params(cls, cfg: PLDRConfig, params: Mapping[str, Any]) -> "PLDRLLM":
        """Wrap functional params (stacked or per-layer layout; arrays are used as they are)."""
        return cls(cfg, params=params)

    def per_layer_params(self) -> dict:
        """The functional params in the per-layer layout ("layers" is a tuple of layer dicts)."""
        return {"embed": self.embed.to_dict(), "embed_norm": self.embed_norm.to_dict(),
                "layers": tuple(lp.to_dict() for lp in self.layers), "final": self.final.to_dict()}

    def to_params(self) -> dict:
        """The functional params in the stacked layout (what `train`, checkpoints and `io` use)."""
        return stack_layers(self.per_layer_params())

    def __call__(self, tokens: jax.Array, g_lm: jax.Array | None = None, *,
                 pad_aware_A: bool = False, collect: bool = False) -> ForwardOutput:
        """tokens [B, L] int (0 = pad) -> `ForwardOutput` (logits [B, L, V] float32, ...), the result
        of `pldr_jax.forward(cfg, params, tokens, g_lm, ...)` on this model's params."""
        return forward(self.cfg, self.per_layer_params(), tokens, g_lm, pad_aware_A=pad_aware_A, collect=collect)

    def loss(self, inputs: jax.Array, targets: jax.Array, g_lm: jax.Array | None = None, *,
             opts: LossOptions | None = None) -> tuple[jax.Array, dict]:
        """The training objective of `train.step.make_train_step` (one micro-batch): (total, terms).

        inputs, targets [B, L] int32 (0 = pad).  total = mean CE over the real targets (+ the DAG
        terms weighted by `opts.dag_coeffs`); terms = `losses.loss_terms` (sums: "ce_sum",
        "correct", "count", and with DAG "dag_A" / "dag_P" / "dag_G").  opts: `losses.LossOptions`
        (or a `train.step.StepOptions`); None = the default platform's (`pldr_jax.backend`), as the
        train step.  Computed by `loss_terms` itself (fused projections, output head fused with the
        cross-entropy): differentiate it with `nnx.value_and_grad(lambda m: m.loss(x, y)[0])` and
        step an `nnx.Optimizer`.
        """
        if opts is None:
            b = choices()
            opts = LossOptions(remat=b.remat, unroll_layers=b.unroll_layers, kernels=b.kernels,
                               head_chunk_bytes=b.head_chunk_bytes)
        elif not isinstance(opts, LossOptions):
            opts = opts.loss_options()
        terms = loss_terms(self.cfg, self.per_layer_params(), inputs, targets, g_lm, opts)
        return objective(terms, jnp.maximum(terms["count"], 1.0), opts.dag_coeffs), terms


# --------------------------------------------------------------------------- state <-> params
def state_to_params(state: nnx.State) -> dict:
    """`nnx.state(model, nnx.Param)` of a `PLDRLLM` -> functional params (stacked layout)."""
    pure = nnx.to_pure_dict(state)
    layers = pure["layers"]
    per = {**{k: pure[k] for k in ("embed", "embed_norm", "final")},
           "layers": tuple(layers[i] for i in sorted(layers, key=int))}
    return stack_layers(per)


def params_to_state(params: Mapping[str, Any]) -> nnx.State:
    """Functional params (stacked or per-layer) -> an `nnx.State` with a `PLDRLLM`'s structure, for
    `nnx.update(model, state)` (the model must have the same config)."""
    per = unstack_layers(dict(params))
    pure = {k: per[k] for k in ("embed", "embed_norm", "final")}
    pure["layers"] = {i: lp for i, lp in enumerate(per["layers"])}
    return nnx.State(pure)


def partition_specs(model: PLDRLLM, mesh: jax.sharding.Mesh | None = None,
                    rules: Mapping[str, Any] | None = None) -> nnx.State:
    """PartitionSpecs of the model's Params from their logical axes with the one rule table
    (`partitioning.logical_to_spec`; `rules`: entries replacing those of `partitioning.RULES`; same
    divisibility fallback as the functional params).  A State of PartitionSpecs with the structure
    of `nnx.state(model, nnx.Param)`."""
    table = merged_rules(rules)

    def spec(p):
        return logical_to_spec(p.out_sharding, p[...].shape, mesh, table)

    return jax.tree_util.tree_map(spec, nnx.state(model, nnx.Param),
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))
