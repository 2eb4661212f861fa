"""One entry point for every checkpoint format: `load_model`, `save_model`, `detect_format`.

Formats (`detect_format`):

* ``"hf"``: the authors' Hugging Face folder (`config.json` with `model_type: "pldrllm"` and
  `model.safetensors` / shards / `pytorch_model.bin`); self-describing.
* ``"torch"``: a reference state dict `.pth`/`.pt`/`.bin`/`.ckpt` (read with the restricted
  unpickler, never executing pickled code), or a bare `.safetensors` state dict.
* ``"npz"``: a reference state dict saved with `np.savez` (one array per state-dict name).
* ``"orbax"``: a training run of `pldr_jax.train` (its workdir, its `checkpoints/` CheckpointManager
  directory, or one `<step>/` folder): params, optimizer state, step, rng, data-iterator state and
  the config saved together; only the params are restored here (`orbax_params.restore_params`:
  no optimiser state is built or read, the stored training config is not parsed),
  plus the run's predefined G_LM (`g_lm.npy`) and tokenizer when it recorded them.

A bare state dict ("torch"/"npz") carries no config.  `load_model` takes it from its `config`
argument (a `PLDRConfig`, a preset name, or a JSON file: `PLDRConfig.to_json()`, the reference's
hyper-parameter JSON such as `tiny_v510.json`, or a pldrllm `config.json`), or else finds it beside
the file as `<stem>.json` or `config.json`.  `save_model` writes that `<stem>.json` sidecar (and,
for predefined-G models, a `<stem>_G_LM.npz` G list in the reference's `layer{i}_G_LM` layout, since
the reference keeps G out of its state dict), so every export loads back with no extra argument.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..config import PRESETS, PLDRConfig
from .hf import hf_config_to_pldr, load_hf, save_hf
from .orbax_params import checkpoint_steps, read_run_config, restore_params
from .safetensors_io import read_safetensors
from .state_dict import (_TORCH_SUFFIXES, _open_npz, load_g_lm_list, save_torch_checkpoint,
                         state_dict_to_params)
from .torch_pickle import load_torch_state_dict

__all__ = ["load_model", "save_model", "detect_format", "resolve_config", "source_tokenizer", "save_g_lm_list",
           "FORMATS", "G_SIDECAR_SUFFIX"]

FORMATS = ("hf", "torch", "npz", "orbax")
SAVE_FORMATS = ("hf", "pth", "npz")
G_SIDECAR_SUFFIX = "_G_LM.npz"
# Fields that do not change the parameter layout (compared loosely when a config is given for a
# self-describing checkpoint).
_NON_ARCH_FIELDS = ("dtype", "param_dtype", "init")

_CONFIG_HINT = ("pass one: load_model(path, config=...) with a PLDRConfig, a preset name "
                f"({', '.join(sorted(PRESETS))}) or a JSON file (PLDRConfig.to_json(), the reference's "
                "hyper-parameter JSON, or a pldrllm config.json); on the command line: --config CFG; "
                "or put it beside the checkpoint as <stem>.json or config.json")


# --------------------------------------------------------------------------- format detection
def _is_orbax_dir(path: Path) -> bool:
    """An orbax CheckpointManager directory (step sub-folders), one of its step folders, or a
    `pldr-jax train` workdir (holding `checkpoints/`)."""
    if (path / "checkpoints").is_dir() and _is_manager_root(path / "checkpoints"):
        return True
    return _is_manager_root(path) or _has_orbax_markers(path)


def _is_manager_root(path: Path) -> bool:
    return any(child.is_dir() and child.name.isdigit() and _has_orbax_markers(child) for child in path.iterdir())


_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "_sharding")


def _has_orbax_markers(folder: Path) -> bool:
    """An orbax checkpoint folder: marker files in it or in one of its item sub-folders."""
    if any((folder / m).exists() for m in _ORBAX_MARKERS):
        return True
    return any(c.is_dir() and any((c / m).exists() for m in _ORBAX_MARKERS) for c in folder.iterdir())


def _sniff_file(path: Path) -> str | None:
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            if any(n.endswith("data.pkl") for n in names):
                return "torch"
            if names and all(n.endswith(".npy") for n in names):
                return "npz"
            return None
        with open(path, "rb") as f:
            head = f.read(2)
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # legacy torch.save pickle
            return "torch"
    except OSError:
        return None
    return None


def detect_format(path: str | os.PathLike) -> str:
    """"hf" | "torch" | "npz" | "orbax" for a checkpoint path (see the module docstring).

    A `config.json` or `model.safetensors` inside a pldrllm folder counts as that folder ("hf").
    Raises FileNotFoundError for a missing path and ValueError for anything unrecognised.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            try:
                d = json.loads(cfg_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{cfg_file}: invalid JSON: {e}") from e
            mt = d.get("model_type") if isinstance(d, dict) else None
            if mt == "pldrllm":
                return "hf"
            if mt is not None:
                raise ValueError(f"{path}: a Hugging Face folder of model_type {mt!r}; only 'pldrllm' "
                                 f"folders are supported")
        if _is_orbax_dir(path):
            return "orbax"
        if cfg_file.is_file():
            raise ValueError(f"{path}: config.json has no model_type 'pldrllm' and the folder is not an "
                             f"orbax training checkpoint")
        raise ValueError(f"{path}: unrecognised checkpoint folder: neither a Hugging Face pldrllm folder "
                         f"(config.json with model_type 'pldrllm') nor an orbax training directory")
    suffix = path.suffix.lower()
    if path.name == "config.json" or suffix == ".safetensors" and (path.parent / "config.json").is_file():
        return detect_format(path.parent)
    if suffix == ".npz":
        return "npz"
    if suffix in _TORCH_SUFFIXES or suffix == ".safetensors":
        return "torch"
    sniffed = _sniff_file(path)
    if sniffed:
        return sniffed
    raise ValueError(f"{path}: unknown checkpoint format (suffix {suffix!r}); supported: a Hugging Face "
                     f"pldrllm folder, an orbax training directory, or a state dict "
                     f"{list(_TORCH_SUFFIXES) + ['.npz', '.safetensors']}")


def _hf_folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


# --------------------------------------------------------------------------- configs
def _config_from_json_dict(d: Any, where: str) -> PLDRConfig:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object describing a config")
    if d.get("model_type") == "pldrllm":
        return hf_config_to_pldr(d, where=where)
    if "hyperparameters" in d or "input_vocab_size" in d:
        try:
            return PLDRConfig.from_reference_hparams(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: not a valid reference hyper-parameter JSON: {e}") from e
    if "config" in d and isinstance(d["config"], dict) and "num_layers" in d["config"]:
        d = d["config"]  # a wrapper such as {"config": PLDRConfig.to_dict(), ...}
    try:
        return PLDRConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: not a recognised config JSON (PLDRConfig.to_json(), reference "
                         f"hyper-parameters, or a pldrllm config.json): {e}") from e


def _config_from_file(path: Path) -> PLDRConfig:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    return _config_from_json_dict(d, str(path))


def resolve_config(config: PLDRConfig | str | os.PathLike | Mapping | None) -> PLDRConfig | None:
    """A PLDRConfig from a PLDRConfig, a preset name, a JSON file path or a dict (None stays None)."""
    if config is None or isinstance(config, PLDRConfig):
        return config
    if isinstance(config, Mapping):
        return _config_from_json_dict(dict(config), "config dict")
    if isinstance(config, str) and config in PRESETS:
        return PLDRConfig.preset(config)
    path = Path(config)
    if path.is_file():
        return _config_from_file(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _config_from_file(path / "config.json")
    raise ValueError(f"config {str(config)!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an "
                     f"existing JSON file")


def _config_beside(path: Path) -> PLDRConfig | None:
    for cand in (path.with_suffix(".json"), path.parent / "config.json"):
        if cand.is_file() and cand != path:
            return _config_from_file(cand)
    return None


def _reconcile(stored: PLDRConfig, given: PLDRConfig | None, where: str, params):
    """A config given for a self-describing checkpoint must have the stored architecture; its
    dtype/init fields win (params are cast to a different param_dtype)."""
    if given is None or given == stored:
        return stored, params
    diff = [f"{k}: stored {getattr(stored, k)!r}, given {getattr(given, k)!r}"
            for k in stored.to_dict() if k not in _NON_ARCH_FIELDS and getattr(stored, k) != getattr(given, k)]
    if diff:
        raise ValueError(f"{where}: the given config does not match the checkpoint's own config:\n  "
                         + "\n  ".join(diff))
    if given.param_dtype != stored.param_dtype:
        import jax
        import jax.numpy as jnp
        dt = jnp.dtype(given.param_dtype)
        params = jax.tree_util.tree_map(lambda x: x.astype(dt), params)
    return given, params


# --------------------------------------------------------------------------- G lists
def _g_sidecar(path: Path) -> Path:
    return path.with_name(path.stem + G_SIDECAR_SUFFIX)


def _is_identity_g(g) -> bool:
    g = np.asarray(g)
    return g.shape[-1] == g.shape[-2] and np.array_equal(g, np.broadcast_to(np.eye(g.shape[-1], dtype=g.dtype),
                                                                             g.shape))


def save_g_lm_list(path: str | os.PathLike, g_lm) -> Path:
    """Write G_LM [layers, H, dk, dk] (or [layers, 1, H, dk, dk]) as the reference's list layout:
    `layer{i}_G_LM` arrays [1, H, dk, dk] float32 (read back with `load_g_lm_list`)."""
    g = np.asarray(g_lm, np.float32)
    if g.ndim == 5 and g.shape[1] == 1:
        g = g[:, 0]
    if g.ndim != 4:
        raise ValueError(f"g_lm has shape {g.shape}; expected [layers, H, dk, dk]")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{f"layer{i}_G_LM": g[i][None] for i in range(g.shape[0])})
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- orbax
def _orbax_root(path: Path, step: int | None) -> tuple[Path, int | None]:
    """(CheckpointManager root, step) for a train workdir, a checkpoints dir or one step folder."""
    if (path / "checkpoints").is_dir() and _is_manager_root(path / "checkpoints"):
        return path / "checkpoints", step
    if _is_manager_root(path):
        return path, step
    if path.name.isdigit() and _is_manager_root(path.parent):
        if step is not None and step != int(path.name):
            raise ValueError(f"{path} is the folder of step {int(path.name)}, but step={step} was asked for")
        return path.parent, int(path.name)
    raise ValueError(f"{path}: not an orbax CheckpointManager directory (no <step>/ folders)")


def _run_file(root: Path, stored: str | None, default_name: str) -> Path | None:
    """A file of the run whose CheckpointManager directory is `root`: the run folder's own copy
    (``<workdir>/<default_name>``) wins, so a copied or moved run uses its own files; else the path
    recorded in the run config (relative to the run folder; an absolute one, written by older
    versions, only when the run folder has no copy of its own)."""
    own = root.parent / default_name
    if own.is_file():
        return own
    if stored:
        p = Path(stored)
        if not p.is_absolute():
            p = root.parent / p
        if p.is_file():
            return p
    return None


def _load_orbax(path: Path, step: int | None):
    """(cfg, params, g_lm, tokenizer path) of a `pldr-jax train` checkpoint (params only)."""
    root, step = _orbax_root(path, step)
    try:
        cfg, params, conf = restore_params(root, step)
    except FileNotFoundError:  # no such step / no checkpoint: already one clear line
        raise
    except Exception as e:  # noqa: BLE001 -- a damaged checkpoint: one line, not orbax's traceback
        raise ValueError(_unreadable_message(root, step, e)) from None
    g_lm = None
    if not cfg.learned_g:
        g_file = _run_file(root, conf.get("g_lm"), "g_lm.npy")
        if g_file is not None:
            g_lm = np.load(g_file, allow_pickle=False).astype(np.float32)
            want = (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
            if g_lm.shape != want:
                raise ValueError(f"{g_file}: G_LM of the run has shape {g_lm.shape}, expected {want}")
    tok = _run_file(root, conf.get("tokenizer"), "tokenizer.model")
    return cfg, params, g_lm, tok


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost error (TensorStore's names the file and the bad range)."""
    seen = set()
    while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _unreadable_message(root: Path, step: int | None, error: BaseException) -> str:
    """One line: which checkpoint cannot be read, why, and the newest earlier step that loads."""
    steps = checkpoint_steps(root)
    bad = step if step is not None else (steps[-1] if steps else None)
    older = None
    for s in reversed([s for s in steps if bad is None or s < bad]):
        try:
            restore_params(root, s)
        except Exception:  # noqa: BLE001 -- damaged too: try the one before
            continue
        older = s
        break
    hint = (f"step {older} loads: pass --step {older}" if older is not None
            else "no earlier checkpoint of this run loads")
    return (f"checkpoint {root / str(bad)} cannot be read (corrupt or truncated?): {_root_cause(error)}; "
            f"{hint}")


def source_tokenizer(path: str | os.PathLike, step: int | None = None) -> Path | None:
    """The sentencepiece model that belongs to a checkpoint, if any: `tokenizer.model` of an HF
    folder, or the tokenizer recorded by (or saved in the workdir of) a training run."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        tok = _hf_folder(path) / "tokenizer.model"
        return tok if tok.is_file() else None
    if fmt == "orbax":
        root, step = _orbax_root(path, step)
        own = _run_file(root, None, "tokenizer.model")
        return own if own is not None else _run_file(root, read_run_config(root, step).get("tokenizer"),
                                                     "tokenizer.model")
    return None


# --------------------------------------------------------------------------- load
def load_model(path: str | os.PathLike, config: PLDRConfig | str | os.PathLike | None = None, *,
               step: int | None = None, g_lm_path: str | os.PathLike | None = None):
    """Load any supported checkpoint -> (cfg, params, g_lm).

    path: a Hugging Face pldrllm folder, a reference state dict (`.pth`/`.pt`/`.bin`/`.ckpt`/`.npz`,
      or a bare `.safetensors`), or an orbax training directory (`pldr_jax.train`).
    config: for a bare state dict, its config (PLDRConfig, preset name, or JSON file path; see the
      module docstring); default: `<stem>.json` or `config.json` beside the file.  For the
      self-describing formats (hf, orbax) a given config must match the stored architecture; its
      dtype/param_dtype/init then win.
    step: orbax only: the training step to restore (default: the latest).
    g_lm_path: a predefined-G list (`layer{i}_G_LM` arrays, e.g. the reference's
      `predefined_G_LM_cache_list_*.npz`) for predefined-G configs; it overrides a G stored in an
      HF folder or a training run.  Default: the folder's / run's own G (`decoder.past_G_values`,
      `g_lm.npy`); for a bare state dict `<stem>_G_LM.npz` beside it, if present.

    Returns params as stored (host numpy arrays for hf/torch/npz; device arrays for orbax), in
    the stacked layout.  g_lm: None for learned-G models (and for a predefined-G
    state dict with no G list found: pass g_lm_path), else float32 [layers, H, dk, dk].
    """
    path = Path(path)
    fmt = detect_format(path)
    if step is not None and fmt != "orbax":
        raise ValueError(f"step={step} applies only to orbax training directories; {path} is {fmt!r}")
    given = resolve_config(config)
    g_lm = None
    if fmt == "hf":
        folder = _hf_folder(path)
        cfg, params, g_lm = load_hf(folder)
        cfg, params = _reconcile(cfg, given, str(folder), params)
    elif fmt == "orbax":
        cfg, params, g_lm, _ = _load_orbax(path, step)
        cfg, params = _reconcile(cfg, given, str(path), params)
    else:
        cfg = given if given is not None else _config_beside(path)
        if cfg is None:
            raise ValueError(f"{path}: a bare state dict has no config; {_CONFIG_HINT}")
        if fmt == "npz":
            sd = _open_npz(path)
            prefix = "model_state_dict/"
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
        elif path.suffix.lower() == ".safetensors":
            sd = read_safetensors(path)
        else:
            sd = load_torch_state_dict(path)
        try:
            params = state_dict_to_params(cfg, sd)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if g_lm_path is None and not cfg.learned_g and _g_sidecar(path).is_file():
            g_lm_path = _g_sidecar(path)
    if g_lm_path is not None:
        if cfg.learned_g:
            raise ValueError(f"a G_LM list ({g_lm_path}) is only used by predefined-G models "
                             f"(custom_G_type set); this config derives its own G_LM (custom_G_type=None). "
                             f"For a G override at inference pass g_lm to forward instead")
        g_lm = load_g_lm_list(g_lm_path, cfg)
    elif g_lm is None and cfg.custom_G_type == "identity":
        g_lm = np.broadcast_to(np.eye(cfg.head_dim, dtype=np.float32),
                               (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)).copy()
    return cfg, params, g_lm


# --------------------------------------------------------------------------- save
def _normalise_fmt(fmt: str) -> str:
    f = fmt.lower()
    f = {"torch": "pth", "pt": "pth", "bin": "pth", "safetensors": "hf"}.get(f, f)
    if f not in SAVE_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose from {list(SAVE_FORMATS)}")
    return f


def save_model(cfg: PLDRConfig, params: Mapping, path: str | os.PathLike, fmt: str, g_lm=None,
               tokenizer_model: str | os.PathLike | None = None, *, write_config: bool = True,
               **hf_kwargs: Any) -> list[Path]:
    """Write params in `fmt` and return the written files.

    fmt "hf": a pldrllm folder at `path` (config.json, model.safetensors, tokenizer.model when
      given; G in the `decoder.past_G_values` buffer for predefined-G configs).  hf_kwargs:
      pad_token_id / bos_token_id / eos_token_id.
    fmt "pth" (`.pth`/`.pt`/`.bin`/`.ckpt`) or "npz" (`.npz`): the reference state-dict layout,
      plus (write_config) a `<stem>.json` sidecar holding `cfg.to_json()` and, for a predefined-G
      model (unless an "identity" config with the identity G), a `<stem>_G_LM.npz` list; a
      tokenizer is not stored.

    Params may be host arrays or jax arrays sharded over devices: they are gathered to the host one
    leaf at a time (`params_to_state_dict`).
    """
    fmt = _normalise_fmt(fmt)
    path = Path(path)
    if fmt == "hf":
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is not a folder; a Hugging Face export is a folder")
        if cfg.learned_g and g_lm is not None:
            raise ValueError("g_lm is only stored for predefined-G configs (custom_G_type set); a "
                             "learned-G model derives its own G_LM")
        folder = save_hf(cfg, params, path, g_lm=g_lm, tokenizer_model=tokenizer_model, **hf_kwargs)
        return sorted(p for p in folder.iterdir() if p.is_file())
    if hf_kwargs:
        raise ValueError(f"{sorted(hf_kwargs)} only apply to Hugging Face exports")
    suffix = path.suffix.lower()
    ok = _TORCH_SUFFIXES if fmt == "pth" else (".npz",)
    if suffix not in ok:
        raise ValueError(f"{path}: a {fmt} export needs a file name ending in one of {list(ok)}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a file name")
    if cfg.learned_g and g_lm is not None:
        raise ValueError("g_lm is only stored for predefined-G configs (custom_G_type set)")
    if not cfg.learned_g and g_lm is None and cfg.custom_G_type != "identity":
        warnings.warn(f"custom_G_type={cfg.custom_G_type!r} but no g_lm given: the reference state dict "
                      f"does not hold G_LM, so {path} will need a G list (g_lm_path / --g-lm) to run",
                      stacklevel=2)
    if tokenizer_model is not None:
        warnings.warn("the reference state-dict format stores no tokenizer; tokenizer_model ignored",
                      stacklevel=2)
    written = [save_torch_checkpoint(path, cfg, params)]
    if write_config:
        side = path.with_suffix(".json")
        tmp = side.with_name(side.name + ".tmp")
        tmp.write_text(cfg.to_json() + "\n")
        os.replace(tmp, side)
        written.append(side)
        gside = _g_sidecar(path)
        if g_lm is not None and not (cfg.custom_G_type == "identity" and _is_identity_g(np.asarray(g_lm))):
            written.append(save_g_lm_list(gside, g_lm))
        elif gside.is_file():
            gside.unlink()  # a stale G list from an earlier export would be picked up on load
    return written

