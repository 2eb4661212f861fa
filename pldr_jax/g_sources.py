"""Sources of the energy-curvature tensor G_LM as swappable pure functions.

Every source returns one G_LM per layer, a float32 array ``[num_layers, H, dk, dk]``, which is what
``forward(cfg, params, tokens, g_lm=...)`` accepts (it broadcasts over the batch).  The same array
serves both uses of the paper's ablations:

* **training from scratch with a constant G (v510G)**: a config with ``custom_G_type`` set
  (``"identity"``, ``"random"``, ``"external"``) has no metric learner and no PLGA weights; pass the
  array as ``g_lm`` to every forward pass (it is a constant, not a parameter);
* **inference on a learned model (v510 with a given G-cache, v510Gi)**: ``forward(cfg_learned,
  params, tokens, g_lm=g)`` skips the metric learner and the deductive derivation in every layer.

Sources:

========================  ===========================================================================
``learned``               ``None``: the model derives G_LM itself (v510).
``identity_g``            the identity in every layer and head (= an SDPA LLM).
``random_normal_g``       ``mean + scale * N(0, 1)``.
``random_uniform_g``      ``U[low, high)``, default ``[0, 1)`` -- this is what the paper's
                          "RANDOM_NORMAL" predefined-G files actually contain (see the reference
                          README), so use it to reproduce the paper's "random" ablation.
``transferred_g``         the G-cache of a trained (learned-G) model for a given prompt.
``external_g``            an ``.npz`` with ``layer{i}_G_LM`` keys (the paper's predefined-G lists).
========================  ===========================================================================

``make_g(cfg, spec, key)`` dispatches over string specs (``"identity"``, ``"random_normal:0.02"``,
``"uniform"``, ``"external:/path.npz"``, ``"transfer:<checkpoint>"``, ``"learned"``), and
``sweep_forward`` runs one forward pass for a whole stack of G sources as one ``jax.vmap`` call.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import PLDRConfig
from .model import ForwardOutput, forward

__all__ = ["identity_g", "random_normal_g", "random_uniform_g", "transferred_g", "external_g",
           "default_g", "make_g", "parse_g_spec", "sweep_forward", "stack_g", "drop_deep_net",
           "load_model_spec", "G_SPEC_HELP"]

G_SPEC_HELP = ("G_LM source: 'learned' (model derives it), 'identity', 'random_normal[:scale[:mean]]', "
               "'uniform[:low:high]', 'external:<file.npz>', 'transfer:<checkpoint>' (G-cache of a "
               "learned model for the prompt)")


def _shape(cfg: PLDRConfig) -> tuple[int, int, int, int]:
    return (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)


def _check_g(cfg: PLDRConfig, g, where: str) -> jax.Array:
    g = jnp.asarray(g, jnp.float32)
    if g.ndim == 5 and g.shape[1] == 1:  # [layers, 1, H, dk, dk]
        g = g[:, 0]
    if tuple(g.shape) != _shape(cfg):
        raise ValueError(f"{where}: G_LM has shape {tuple(g.shape)}; expected [num_layers, H, dk, dk] = "
                         f"{_shape(cfg)}")
    return g


# --------------------------------------------------------------------------- simple sources
def identity_g(cfg: PLDRConfig) -> jax.Array:
    """Identity G_LM in every layer and head, [num_layers, H, dk, dk] float32 (v510G = SDPA)."""
    return jnp.broadcast_to(jnp.eye(cfg.head_dim, dtype=jnp.float32), _shape(cfg))


def random_normal_g(cfg: PLDRConfig, key: jax.Array, scale: float = 1.0, mean: float = 0.0) -> jax.Array:
    """``mean + scale * N(0, 1)`` i.i.d. entries, [num_layers, H, dk, dk] float32."""
    return jnp.float32(mean) + jnp.float32(scale) * jax.random.normal(key, _shape(cfg), jnp.float32)


def random_uniform_g(cfg: PLDRConfig, key: jax.Array, low: float = 0.0, high: float = 1.0) -> jax.Array:
    """``U[low, high)`` i.i.d. entries, [num_layers, H, dk, dk] float32.

    The default ``[0, 1)`` matches the paper's "RANDOM_NORMAL" predefined-G files, whose values
    are in fact uniform on [0, 1) (mean 0.5, std 1/sqrt(12)).
    """
    return jax.random.uniform(key, _shape(cfg), jnp.float32, low, high)


def transferred_g(cfg_src: PLDRConfig, params_src: dict, prompt_tokens, pad_aware: bool = True,
                  reduce: str = "first") -> jax.Array:
    """The G-cache of a learned-G model for a prompt: the G_LM its prefill derives, per layer.

    This is exactly what the reference's G-cache holds after the prompt step (and what the paper
    transfers into v510G / keeps for v510Gi).

    prompt_tokens: one prompt ``[L]`` or a batch ``[B, L]`` of int ids (0 = right padding).
    pad_aware: mask padding out of the metric tensor A, so a padded row gives the G of the same
      prompt alone (irrelevant for an unpadded prompt).
    reduce: how to turn the batch of G-caches into one G per layer:
      ``"first"`` (default) the first row's G-cache -- exact, the G a decoder would cache for that
      prompt; ``"mean"`` the element-wise mean over the batch (a G that is no single prompt's
      cache); ``"none"`` keep the batch: ``[num_layers, B, H, dk, dk]`` (a per-row G-cache that
      ``forward`` also accepts).
    Returns float32 ``[num_layers, H, dk, dk]`` (or ``[num_layers, B, H, dk, dk]`` for "none").
    """
    if not cfg_src.learned_g:
        raise ValueError(f"transferred_g needs a learned-G source model (custom_G_type=None), got "
                         f"custom_G_type={cfg_src.custom_G_type!r}; its G is already predefined")
    toks = jnp.asarray(prompt_tokens)
    if toks.ndim == 1:
        toks = toks[None]
    if toks.ndim != 2 or toks.shape[1] == 0:
        raise ValueError(f"prompt_tokens must be [L] or [B, L] with L >= 1, got shape {tuple(toks.shape)}")
    toks = toks.astype(jnp.int32)
    if not bool(jnp.all(jnp.any(toks != 0, axis=1))):
        raise ValueError("every prompt row needs at least one non-pad (non-zero) token")
    g = forward(cfg_src, params_src, toks, pad_aware_A=pad_aware).deductive["G_LM"]  # [layers, B, H, dk, dk]
    if reduce == "first":
        return g[:, 0]
    if reduce == "mean":
        return jnp.mean(g, axis=1)
    if reduce == "none":
        return g
    raise ValueError(f"reduce must be 'first', 'mean' or 'none', got {reduce!r}")


def external_g(path: str | os.PathLike, cfg: PLDRConfig | None = None) -> jax.Array:
    """G_LM from a file: an ``.npz`` with ``layer{i}_G_LM`` keys (each ``[1, H, dk, dk]`` or
    ``[H, dk, dk]``, e.g. ``../shared/reference/predefined_G_LM_*.npz``), or an ``.npy`` /
    single-array ``.npz`` holding ``[num_layers, H, dk, dk]``.

    The layer-list format is read by ``pldr_jax.io.load_g_lm_list``.  With ``cfg`` the number of layers, heads
    and dk are validated (ValueError naming the mismatch).  Returns float32 ``[layers, H, dk, dk]``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"G_LM file not found: {p}")
    if p.suffix == ".npy":
        g = np.load(p, allow_pickle=False)
        return _check_g(cfg, g, str(p)) if cfg is not None else jnp.asarray(g, jnp.float32)
    with np.load(p, allow_pickle=False) as z:
        keys = list(z.keys())
        if len(keys) == 1 and not re.fullmatch(r"layer\d+_G_LM", keys[0]):
            g = z[keys[0]]
            return _check_g(cfg, g, str(p)) if cfg is not None else jnp.asarray(g, jnp.float32)
    from .io import load_g_lm_list
    g = load_g_lm_list(p, cfg=cfg)
    return _check_g(cfg, g, str(p)) if cfg is not None else jnp.asarray(g, jnp.float32)


def default_g(cfg: PLDRConfig, key: jax.Array | None = None, path: str | os.PathLike | None = None):
    """The G a config's ``custom_G_type`` asks for: None (learned) -> None, "identity" -> identity,
    "random" -> ``random_uniform_g`` (the paper's "random" files are uniform [0, 1)), "external" ->
    ``external_g(path)`` (path required)."""
    t = cfg.custom_G_type
    if t is None:
        return None
    if t == "identity":
        return identity_g(cfg)
    if t == "random":
        return random_uniform_g(cfg, jax.random.key(0) if key is None else key)
    if path is None:
        raise ValueError("custom_G_type='external' needs a path to a G_LM file (.npz with layer{i}_G_LM keys)")
    return external_g(path, cfg)


# --------------------------------------------------------------------------- models from a spec
def load_model_spec(spec: str, config: PLDRConfig | str | None = None, step: int | None = None):
    """Load ``(cfg, params, g_lm)`` from a model spec.

    ``"preset:<name>[:<seed>]"`` initialises a random model of a preset (tests, quick experiments;
    g_lm = ``default_g`` of the preset); anything else is a path for ``pldr_jax.io.load_model``
    (reference state dict, Hugging Face folder or training directory).  ``config`` (a PLDRConfig,
    preset name or JSON file) and ``step`` (a training directory's checkpoint) are passed on to it.
    """
    if isinstance(spec, str) and spec.startswith("preset:"):
        from .params import init_params
        parts = spec.split(":")
        name = parts[1]
        seed = int(parts[2]) if len(parts) > 2 and parts[2] else 0
        if step is not None:
            raise ValueError(f"a step ({step}) applies to training directories, not to {spec!r}")
        cfg = config if isinstance(config, PLDRConfig) else PLDRConfig.preset(name)
        params = init_params(cfg, jax.random.key(seed))
        return cfg, params, default_g(cfg, jax.random.key(seed + 1))
    try:
        from .io import load_model
    except ImportError as e:
        raise ValueError(f"cannot load {spec!r}: pldr_jax.io.load_model is not available ({e})") from None
    cfg, params, g_lm = load_model(spec, config=config, step=step)
    params = jax.tree_util.tree_map(jnp.asarray, params)  # host arrays -> device once, not per call
    return cfg, params, (None if g_lm is None else jnp.asarray(g_lm, jnp.float32))


# --------------------------------------------------------------------------- dispatcher
def parse_g_spec(spec: str) -> tuple[str, list[str]]:
    """``"kind:arg1:arg2"`` -> (canonical kind, args).  Paths keep their colons (external/transfer)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"G spec must be a non-empty string; {G_SPEC_HELP}")
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    aliases = {"learned": "learned", "none": "learned", "identity": "identity", "eye": "identity",
               "random_normal": "random_normal", "normal": "random_normal", "randn": "random_normal",
               "uniform": "uniform", "random_uniform": "uniform", "rand": "uniform",
               "external": "external", "file": "external", "transfer": "transfer",
               "transferred": "transfer"}
    if kind not in aliases:
        raise ValueError(f"unknown G spec {spec!r}; {G_SPEC_HELP}")
    kind = aliases[kind]
    if kind in ("external", "transfer"):
        if not rest:
            raise ValueError(f"G spec {spec!r} needs a path: '{kind}:<path>'")
        return kind, [rest]
    args = [a for a in rest.split(":")] if rest else []
    return kind, args


def _floats(spec: str, args: list[str], n_max: int) -> list[float]:
    if len(args) > n_max:
        raise ValueError(f"G spec {spec!r} takes at most {n_max} numeric arguments")
    try:
        return [float(a) for a in args]
    except ValueError:
        raise ValueError(f"G spec {spec!r}: arguments must be numbers") from None


def make_g(cfg: PLDRConfig, spec, key: jax.Array | None = None, *, prompt_tokens=None,
           loader: Callable | None = None, reduce: str = "first"):
    """G_LM ``[num_layers, H, dk, dk]`` float32 for a source spec (or None for "learned").

    spec: ``"learned"`` | ``"identity"`` | ``"random_normal[:scale[:mean]]"`` (default scale 1,
      mean 0) | ``"uniform[:low:high]"`` (default [0, 1)) | ``"external:<file>"`` |
      ``"transfer:<checkpoint>"`` (needs ``prompt_tokens``; the checkpoint is loaded with
      ``loader(path) -> (cfg, params, g_lm)``, default ``load_model_spec``, and its prefill G-cache on
      the prompt is returned, see ``transferred_g``) | an array (validated and returned).
    key: PRNG key for the random sources (default ``jax.random.key(0)``).
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        return _check_g(cfg, spec, "make_g")
    kind, args = parse_g_spec(spec)
    key = jax.random.key(0) if key is None else key
    if kind == "learned":
        if not cfg.learned_g:
            raise ValueError(f"G spec 'learned' needs a learned-G config; custom_G_type={cfg.custom_G_type!r}")
        return None
    if kind == "identity":
        if args:
            raise ValueError(f"G spec {spec!r}: 'identity' takes no arguments")
        return identity_g(cfg)
    if kind == "random_normal":
        v = _floats(spec, args, 2)
        return random_normal_g(cfg, key, *(v or [1.0]))
    if kind == "uniform":
        v = _floats(spec, args, 2)
        if len(v) == 1:
            raise ValueError(f"G spec {spec!r}: give both bounds, 'uniform:<low>:<high>'")
        if v and not v[0] < v[1]:
            raise ValueError(f"G spec {spec!r}: low must be < high")
        return random_uniform_g(cfg, key, *v)
    if kind == "external":
        return external_g(args[0], cfg)
    # transfer
    if prompt_tokens is None:
        raise ValueError(f"G spec {spec!r}: a transferred G needs prompt_tokens (the prompt whose G-cache "
                         f"is transferred)")
    cfg_src, params_src, _ = (loader or load_model_spec)(args[0])
    if (cfg_src.num_layers, cfg_src.num_heads, cfg_src.head_dim) != (cfg.num_layers, cfg.num_heads, cfg.head_dim):
        raise ValueError(f"G spec {spec!r}: source model has (layers, H, dk) = "
                         f"{(cfg_src.num_layers, cfg_src.num_heads, cfg_src.head_dim)}, target needs "
                         f"{(cfg.num_layers, cfg.num_heads, cfg.head_dim)}")
    return transferred_g(cfg_src, params_src, prompt_tokens, reduce=reduce)


def stack_g(gs: Sequence) -> jax.Array:
    """Stack G sources of equal shape into ``[S, num_layers, ..., dk, dk]`` for ``sweep_forward``."""
    gs = [jnp.asarray(g, jnp.float32) for g in gs]
    if not gs:
        raise ValueError("stack_g needs at least one G")
    if len({tuple(g.shape) for g in gs}) != 1:
        raise ValueError(f"G sources have different shapes: {[tuple(g.shape) for g in gs]}")
    return jnp.stack(gs)


# --------------------------------------------------------------------------- batched sweep
@functools.partial(jax.jit, static_argnames=("cfg", "pad_aware_A"))
def sweep_forward(cfg: PLDRConfig, params: dict, tokens: jax.Array, g_stack: jax.Array, *,
                  pad_aware_A: bool = False) -> ForwardOutput:
    """Forward pass of the same model and tokens under S G sources, as one batched computation.

    g_stack: ``[S, num_layers, H, dk, dk]`` (or ``[S, num_layers, B|1, H, dk, dk]``).  Returns a
    ``ForwardOutput`` whose fields carry a leading ``[S]`` axis: logits ``[S, B, L, V]``,
    deductive ``{"G_LM": [S, num_layers, B|1, H, dk, dk]}``.  Works for learned-G configs (the
    given G replaces the derived one, as a G-cache) and predefined-G configs alike.
    """
    if g_stack.ndim not in (5, 6):
        raise ValueError(f"g_stack must be [S, num_layers, (B|1,) H, dk, dk], got shape {tuple(g_stack.shape)}")
    return jax.vmap(lambda g: forward(cfg, params, tokens, g, pad_aware_A=pad_aware_A))(g_stack)


# --------------------------------------------------------------------------- v510G from v510
def drop_deep_net(cfg: PLDRConfig, params: dict, g_type: str = "external") -> tuple[PLDRConfig, dict]:
    """A learned-G model's config and params without the metric learner and PLGA weights.

    The result is a predefined-G model (v510G with ``custom_G_type=g_type``) that runs with any
    given G, e.g. ``transferred_g`` of the original model: the paper's v510Gi (a trained model's
    weights with its G-cache, the deep net that derives G dropped).
    """
    if g_type not in ("identity", "random", "external"):
        raise ValueError(f"g_type must be 'identity', 'random' or 'external', got {g_type!r}")
    cfg_g = cfg.replace(custom_G_type=g_type, A_dff=0, num_reslayerA=0, num_denseA=0)
    drop = ("metric_norm", "metric_res", "plga")
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        new_layers: Any = tuple({k: v for k, v in lp.items() if k not in drop} for lp in layers)
    else:
        new_layers = {k: v for k, v in layers.items() if k not in drop}
    return cfg_g, {**params, "layers": new_layers}
