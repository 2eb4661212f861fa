"""Reference state-dict names <-> the pldr_jax parameter pytree; `.pth`/`.npz` checkpoints; G lists.

Names are those of the authors' PyTorch code (and of their Hugging Face format)::

    decoder.embedding.weight                                  embed.embedding            [V, D]
    decoder.layernorm1.{weight,bias}                          embed_norm.{scale,bias}    [D]
    decoder.dec_layers.{l}.mha1.{wq,wk,wv,dense}.{weight,bias} layers.{wq,..}.{kernel,bias}[l]
    decoder.dec_layers.{l}.mha1.plgatt_layer.{Wlst,blst,pwlst,alst,balst}
                                                              layers.plga.{W,b,P,a,ba}[l] [H, dk, dk]
    decoder.dec_layers.{l}.mha1.layernorm1.*                  layers.metric_norm[l]      [dk]
    decoder.dec_layers.{l}.mha1.reslayerAs.{r}.denseAs.{j}.gluw{1,2,3}.*
                                                              layers.metric_res.w{1,2,3}[l, r, j]
    decoder.dec_layers.{l}.mha1.reslayerAs.{r}.layernormA.*   layers.metric_res.norm[l, r]
    decoder.dec_layers.{l}.ffn.gluw{1,2,3}.*                  layers.ffn.w{1,2,3}[l]
    decoder.dec_layers.{l}.layernorm{1,2}.*                   layers.norm{1,2}[l]
    final_layer.{weight,bias}                                 final.{kernel,bias}

Linear `weight` [out, in] is the transposed JAX `kernel` [in, out]; LayerNorm `weight` is `scale`.
Parameters come back as host numpy arrays in `cfg.param_dtype` (device_put them with your shardings).
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

from ..config import PLDRConfig
from ..params import abstract_params
from .safetensors_io import read_safetensors
from .torch_pickle import load_torch_state_dict, save_torch_state_dict

__all__ = ["state_dict_to_params", "params_to_state_dict", "expected_state_dict_shapes",
           "load_state_dict_file", "load_torch_checkpoint", "save_torch_checkpoint", "load_g_lm_list"]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class _Entry(NamedTuple):
    """One state-dict key: where it lives in params and how it is laid out there."""
    key: str
    path: tuple[str, ...]      # path of the leaf in the params tree (layers leaves: stacked layout)
    layer: int | None          # decoder layer index (None for non-layer leaves)
    index: tuple[int, ...]     # further leading indices inside the (per-layer) leaf, e.g. (r, j)
    transpose: bool            # torch weight [out, in] = kernel[..., in, out].T


def _linear_entries(prefix: str, path: tuple[str, ...], layer, index=()) -> list[_Entry]:
    return [_Entry(f"{prefix}.weight", (*path, "kernel"), layer, index, True),
            _Entry(f"{prefix}.bias", (*path, "bias"), layer, index, False)]


def _norm_entries(prefix: str, path: tuple[str, ...], layer, index=()) -> list[_Entry]:
    return [_Entry(f"{prefix}.weight", (*path, "scale"), layer, index, False),
            _Entry(f"{prefix}.bias", (*path, "bias"), layer, index, False)]


def _entries(cfg: PLDRConfig) -> list[_Entry]:
    """Every state-dict key of `cfg`, in the reference's order."""
    out = [_Entry("decoder.embedding.weight", ("embed", "embedding"), None, (), False)]
    for l in range(cfg.num_layers):
        p = f"decoder.dec_layers.{l}"
        for n in ("wq", "wk", "wv"):
            out += _linear_entries(f"{p}.mha1.{n}", ("layers", n), l)
        if cfg.learned_g:
            for tk, pk in (("Wlst", "W"), ("blst", "b"), ("pwlst", "P"), ("alst", "a"), ("balst", "ba")):
                out.append(_Entry(f"{p}.mha1.plgatt_layer.{tk}", ("layers", "plga", pk), l, (), False))
        out += _linear_entries(f"{p}.mha1.dense", ("layers", "dense"), l)
        if cfg.learned_g:
            for r in range(cfg.num_reslayerA):
                for j in range(cfg.num_denseA):
                    for g in (1, 2, 3):
                        out += _linear_entries(f"{p}.mha1.reslayerAs.{r}.denseAs.{j}.gluw{g}",
                                               ("layers", "metric_res", f"w{g}"), l, (r, j))
                out += _norm_entries(f"{p}.mha1.reslayerAs.{r}.layernormA",
                                     ("layers", "metric_res", "norm"), l, (r,))
            out += _norm_entries(f"{p}.mha1.layernorm1", ("layers", "metric_norm"), l)
        for g in (1, 2, 3):
            out += _linear_entries(f"{p}.ffn.gluw{g}", ("layers", "ffn", f"w{g}"), l)
        out += _norm_entries(f"{p}.layernorm1", ("layers", "norm1"), l)
        out += _norm_entries(f"{p}.layernorm2", ("layers", "norm2"), l)
    out += _norm_entries("decoder.layernorm1", ("embed_norm",), None)
    out += _linear_entries("final_layer", ("final",), None)
    return out


def _get(tree: Mapping, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _leaf_shape_in_sd(leaf_shape: tuple[int, ...], e: _Entry) -> tuple[int, ...]:
    lead = (1 if e.layer is not None else 0) + len(e.index)
    shape = tuple(leaf_shape[lead:])
    return (*shape[:-2], shape[-1], shape[-2]) if e.transpose else shape


def expected_state_dict_shapes(cfg: PLDRConfig) -> dict[str, tuple[int, ...]]:
    """{state-dict key: PyTorch shape} for `cfg` (from `abstract_params`, no memory used)."""
    abstract = abstract_params(cfg)
    return {e.key: _leaf_shape_in_sd(tuple(_get(abstract, e.path).shape), e) for e in _entries(cfg)}


def _check_keys(cfg: PLDRConfig, sd: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> None:
    expected = expected_state_dict_shapes(cfg)
    got = {k: tuple(np.shape(v)) for k, v in sd.items() if k not in ignore}
    missing = [k for k in expected if k not in got]
    unexpected = sorted(k for k in got if k not in expected)
    wrong = [f"{k}: expected {expected[k]}, got {got[k]}" for k in expected
             if k in got and got[k] != expected[k]]
    if missing or unexpected or wrong:
        lines = [f"state dict does not match the config ({_cfg_summary(cfg)}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if wrong:
            lines.append(f"  shape mismatches ({len(wrong)}):\n    " + "\n    ".join(wrong))
        raise ValueError("\n".join(lines))


def _cfg_summary(cfg: PLDRConfig) -> str:
    s = (f"num_layers={cfg.num_layers}, d_model={cfg.d_model}, num_heads={cfg.num_heads}, "
         f"dff={cfg.dff}, vocab_size={cfg.vocab_size}")
    if cfg.learned_g:
        s += f", A_dff={cfg.A_dff}, num_reslayerA={cfg.num_reslayerA}, num_denseA={cfg.num_denseA}"
    else:
        s += f", custom_G_type={cfg.custom_G_type!r}"
    return s


def state_dict_to_params(cfg: PLDRConfig, sd: Mapping[str, np.ndarray], *, stacked: bool = True,
                         ignore: tuple[str, ...] = ()) -> dict:
    """Reference state dict -> params tree (host numpy arrays in `cfg.param_dtype`).

    Missing keys, unexpected keys and shape mismatches raise one ValueError listing them all.
    `ignore`: keys to skip (e.g. buffers).  stacked=False returns the per-layer tuple layout.
    """
    _check_keys(cfg, sd, ignore)
    abstract = abstract_params(cfg)
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    by_path: dict[tuple[str, ...], list[_Entry]] = {}
    for e in _entries(cfg):
        by_path.setdefault(e.path, []).append(e)

    def build(path):
        leaf = _get(abstract, path)
        arr = np.empty(leaf.shape, dtype)
        for e in by_path[path]:
            v = np.asarray(sd[e.key])
            if e.transpose:
                v = np.swapaxes(v, -1, -2)
            idx = ((e.layer,) if e.layer is not None else ()) + e.index
            arr[idx] = v.astype(dtype, copy=False)
        return arr

    params = jax.tree_util.tree_map_with_path(
        lambda kp, _: build(tuple(k.key for k in kp)), abstract)
    if not stacked:
        params = {**params, "layers": tuple(
            jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"]) for i in range(cfg.num_layers))}
    return params


def _leaf_getter(params: Mapping, cfg: PLDRConfig):
    """(path, layer) -> host numpy array of that leaf (stacked: whole leaf; per-layer: one layer)."""
    layers = params["layers"]
    per_layer = isinstance(layers, (tuple, list))
    if per_layer and len(layers) != cfg.num_layers:
        raise ValueError(f"params have {len(layers)} layers, config has num_layers={cfg.num_layers}")

    def get(path, layer):
        try:
            if path[0] == "layers" and per_layer:
                return _get(layers[layer], path[1:]), True
            return _get(params, path), False
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"params lack leaf {'/'.join(path)} needed by the config "
                             f"({_cfg_summary(cfg)})") from e
    return get


def params_to_state_dict(cfg: PLDRConfig, params: Mapping) -> dict[str, np.ndarray]:
    """Params tree (stacked or per-layer tuple, host or sharded device arrays) -> reference state
    dict of C-contiguous numpy arrays in the params' dtype, in the reference key order.

    Each leaf is gathered to the host once (`np.asarray(jax.device_get(leaf))`), one at a time.
    """
    get = _leaf_getter(params, cfg)
    abstract = abstract_params(cfg)
    entries = _entries(cfg)
    groups: dict[tuple, list[_Entry]] = {}
    for e in entries:
        _, is_layer_slice = get(e.path, e.layer)
        groups.setdefault((e.path, e.layer if is_layer_slice else None), []).append(e)
    out: dict[str, np.ndarray] = {}
    for (path, layer), group in groups.items():
        leaf, is_layer_slice = get(path, group[0].layer)
        host = np.asarray(jax.device_get(leaf))
        want = tuple(_get(abstract, path).shape)[1 if is_layer_slice else 0:]
        if host.shape != want:
            where = "/".join(path) + (f" (layer {layer})" if is_layer_slice else "")
            raise ValueError(f"params leaf {where} has shape {host.shape}, expected {want} for the "
                             f"config ({_cfg_summary(cfg)})")
        for e in group:
            idx = ((e.layer,) if e.layer is not None and not is_layer_slice else ()) + e.index
            v = host[idx] if idx else host
            if e.transpose:
                v = np.swapaxes(v, -1, -2)
            out[e.key] = np.ascontiguousarray(v)
        del host
    return {e.key: out[e.key] for e in entries}


# --------------------------------------------------------------------------- files
def _open_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file: {type(e).__name__}: {e}") from e


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat state dict from `.pth`/`.pt`/`.bin` (safe unpickling), `.npz` or `.safetensors`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; for a Hugging Face folder use pldr_jax.io.load_hf")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        sd = _open_npz(path)
        prefix = "model_state_dict/"
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
        return sd
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in _TORCH_SUFFIXES:
        return load_torch_state_dict(path)
    raise ValueError(f"{path}: unknown checkpoint suffix {suffix!r}; expected one of "
                     f"{list(_TORCH_SUFFIXES) + ['.npz', '.safetensors']}")


def load_torch_checkpoint(path: str | os.PathLike, cfg: PLDRConfig, *, stacked: bool = True) -> dict:
    """A reference checkpoint (`.pth` with or without the {'model_state_dict': ...} wrapper,
    `.npz` or `.safetensors` state dict) -> params tree for `cfg` (see `state_dict_to_params`)."""
    return state_dict_to_params(cfg, load_state_dict_file(path), stacked=stacked)


def save_torch_checkpoint(path: str | os.PathLike, cfg: PLDRConfig, params: Mapping,
                          extra: Mapping[str, Any] | None = None) -> Path:
    """Write params as a reference checkpoint, format by suffix.

    `.pth`/`.pt`/`.bin`: torch.save zip `{'model_state_dict', 'optimizer_state_dict': None,
    'loss': None, 'accuracy': None}` (+ `extra`), loadable by `torch.load(weights_only=True)`.
    `.npz`: the bare state dict (bfloat16 leaves are stored as float32, exactly).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    sd = params_to_state_dict(cfg, params)
    if suffix in _TORCH_SUFFIXES:
        return save_torch_state_dict(path, sd, extra)
    if suffix == ".npz":
        if extra:
            raise ValueError("extra entries are only supported for torch (.pth) checkpoints")
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.astype(np.float32) if v.dtype.kind == "V" or v.dtype.name == "bfloat16" else v)
              for k, v in sd.items()}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **sd)
        os.replace(tmp, path)
        return path
    raise ValueError(f"{path}: unknown checkpoint suffix {suffix!r}; use .pth, .pt, .bin or .npz "
                     f"(Hugging Face folders: pldr_jax.io.save_hf)")


def load_g_lm_list(path: str | os.PathLike, num_layers: int | PLDRConfig | None = None, *,
                   cfg: PLDRConfig | None = None) -> np.ndarray:
    """Predefined G_LM list (`layer{i}_G_LM` keys, each [1, H, dk, dk] or [H, dk, dk]) ->
    float32 [layers, H, dk, dk].  `layer{i}_A_LM` keys (Gcachelst_init files) are ignored.

    num_layers (or cfg, also accepted positionally) is checked against the file; cfg also checks
    H and dk.
    """
    if isinstance(num_layers, PLDRConfig):
        cfg, num_layers = num_layers, None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"G_LM list not found: {path}")
    z = _open_npz(path)
    idx = sorted(int(m.group(1)) for k in z if (m := re.fullmatch(r"layer(\d+)_G_LM", k)))
    if not idx:
        raise ValueError(f"{path}: no 'layer{{i}}_G_LM' arrays (keys: {sorted(z)[:10]})")
    if idx != list(range(len(idx))):
        raise ValueError(f"{path}: G_LM layers are not numbered 0..n-1: {idx}")
    gs = []
    for i in idx:
        g = np.asarray(z[f"layer{i}_G_LM"])
        if g.ndim == 4 and g.shape[0] == 1:
            g = g[0]
        if g.ndim != 3 or g.shape[-1] != g.shape[-2]:
            raise ValueError(f"{path}: layer{i}_G_LM has shape {z[f'layer{i}_G_LM'].shape}; "
                             f"expected [1, H, dk, dk] or [H, dk, dk]")
        gs.append(g)
    shapes = {g.shape for g in gs}
    if len(shapes) != 1:
        raise ValueError(f"{path}: layers have different G_LM shapes {sorted(shapes)}")
    out = np.stack(gs).astype(np.float32)
    n_want = cfg.num_layers if cfg is not None else num_layers
    if n_want is not None and out.shape[0] != n_want:
        raise ValueError(f"{path}: has G_LM for {out.shape[0]} layers, expected {n_want}")
    if cfg is not None and out.shape[1:] != (cfg.num_heads, cfg.head_dim, cfg.head_dim):
        raise ValueError(f"{path}: G_LM per layer has shape {out.shape[1:]}, expected "
                         f"(H={cfg.num_heads}, dk={cfg.head_dim}, dk={cfg.head_dim})")
    return out
