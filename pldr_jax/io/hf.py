"""The authors' Hugging Face format (`model_type: "pldrllm"`, `PldrllmForCausalLM`).

A folder holds `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`,
or `pytorch_model.bin[.index.json]`, read with the restricted unpickler).  Tensor names equal the
reference state-dict names (see `state_dict.py`).  Predefined-G models (`custom_G_type` not null)
have no metric-learner/PLGA weights and carry G in the buffer `decoder.past_G_values`
[layers, 3, 1, H, dk, dk] (slots: A, A_LM, G_LM) plus `decoder.past_G_values_status` [layers] bool.

Task-head folders (`PldrllmForSequenceClassification` / `...ForTokenClassification` /
`...ForQuestionAnswering`, `pldr_jax.heads`) hold the decoder without `final_layer` plus the head
(`score.weight` [n, D], `score.bias` for token classification, `qa_outputs.{weight,bias}` [2, D]) and
`id2label` / `label2id` / `problem_type` in config.json: `load_hf_head` / `save_hf(..., head=)`.

Interleaved RoPE (`reference_rope: true`) in the authors' code is a table of
`max_position_embeddings` rows; `PLDRConfig.max_seq_len` carries that limit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PLDRConfig
from ..heads import HEAD_NAMES, TASK_OF_ARCHITECTURE, HeadConfig
from .safetensors_io import read_safetensors
from .state_dict import params_to_state_dict, state_dict_to_params
from .torch_pickle import load_torch_state_dict

__all__ = ["HFMeta", "load_hf", "load_hf_head", "load_hf_meta", "save_hf", "hf_config_to_pldr",
           "hf_head_config", "pldr_to_hf_config", "read_hf_state_dict"]

G_BUFFER = "decoder.past_G_values"
G_STATUS_BUFFER = "decoder.past_G_values_status"
_CONFIG = "config.json"
_PLDR_JAX_KEY = "pldr_jax"  # our own extra config fields (compute dtype, init), ignored by transformers

# PldrllmConfig.__init__ defaults (transformers' pldrllm), used for fields a config.json omits.
HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=896, intermediate_size=2389, num_hidden_layers=5,
    num_attention_heads=14, hidden_act="silu", max_position_embeddings=1024, initializer_range=0.02,
    layer_norm_eps=1e-6, use_cache=True, output_pldr_attentions=False, pad_token_id=0, bos_token_id=2,
    eos_token_id=3, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
    attention_bias=True, glu_bias=True, final_bias=True, reference_rope=True, attention_dropout=0.0,
    head_dim=64, num_reslayerA=8, num_denseA=2, A_dff=170, custom_G_type=None, cache_first_G=False,
)
_HF_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
              "half": "float16"}


@dataclasses.dataclass(frozen=True)
class HFMeta:
    """What a pldrllm config.json says beyond the PLDRConfig.

    pad/bos/eos_token_id: special token ids; torch_dtype: the stored dtype string; tokenizer: path
    of `tokenizer.model` in the folder (None if absent); config: the raw config.json dict.
    """
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    torch_dtype: str
    tokenizer: Path | None
    config: dict


# --------------------------------------------------------------------------- config mapping
def _read_config(folder: Path) -> dict:
    path = folder / _CONFIG
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face folder not found: {folder}")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {_CONFIG}; not a Hugging Face model folder")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def _hf_dtype(d: Mapping[str, Any], where: str) -> str:
    raw = d.get("dtype", None)
    if raw is None:
        raw = d.get("torch_dtype", None)
    if raw is None or raw == "auto":
        return "float32"
    name = str(raw).removeprefix("torch.")
    if name not in _HF_DTYPES:
        raise ValueError(f"{where}: unsupported dtype {raw!r}; supported: {sorted(_HF_DTYPES)}")
    return _HF_DTYPES[name]


def hf_config_to_pldr(d: Mapping[str, Any], *, dtype: str | None = None, param_dtype: str | None = None,
                      where: str = _CONFIG) -> PLDRConfig:
    """A pldrllm config.json dict -> PLDRConfig (missing fields take transformers' defaults).

    param_dtype defaults to the config's `dtype`/`torch_dtype`; the compute dtype to float32 (or
    the value `save_hf` recorded).  Unsupported variants raise ValueError naming the field.
    """
    mt = d.get("model_type", "pldrllm")
    if mt != "pldrllm":
        raise ValueError(f"{where}: model_type is {mt!r}, expected 'pldrllm'")
    g = {k: d.get(k, v) for k, v in HF_DEFAULTS.items()}
    unsupported = []
    if g["hidden_act"] != "silu":
        unsupported.append(f"hidden_act={g['hidden_act']!r} (only 'silu')")
    for k in ("attention_bias", "glu_bias", "final_bias"):
        if g[k] is not True:
            unsupported.append(f"{k}={g[k]!r} (only true: the reference layers all have biases)")
    if g["tie_word_embeddings"]:
        unsupported.append("tie_word_embeddings=true (only false)")
    if g["rope_scaling"] is not None:
        unsupported.append(f"rope_scaling={g['rope_scaling']!r} (only null)")
    if unsupported:
        raise ValueError(f"{where}: unsupported pldrllm variant (not implemented in pldr_jax): "
                         + "; ".join(unsupported))
    H, dk = g["num_attention_heads"], g["head_dim"]
    hidden = g["hidden_size"] if g["hidden_size"] is not None else H * dk
    inter = g["intermediate_size"] if g["intermediate_size"] is not None else int(np.floor(hidden * 4 * 2 / 3))
    ours = d.get(_PLDR_JAX_KEY) or {}
    try:
        return PLDRConfig(
            num_layers=g["num_hidden_layers"], d_model=hidden, num_heads=H, dff=inter,
            vocab_size=g["vocab_size"], max_seq_len=g["max_position_embeddings"], head_dim=dk,
            A_dff=g["A_dff"], num_reslayerA=g["num_reslayerA"], num_denseA=g["num_denseA"],
            rope_theta=float(g["rope_theta"]), reference_rope=g["reference_rope"],
            custom_G_type=g["custom_G_type"], layer_norm_eps=float(g["layer_norm_eps"]),
            dtype=dtype or ours.get("dtype", "float32"),
            param_dtype=param_dtype or _hf_dtype(d, where),
            init=ours.get("init", "reference"),
        )
    except ValueError as e:
        raise ValueError(f"{where}: config does not describe a valid PLDR-LLM: {e}") from e


def pldr_to_hf_config(cfg: PLDRConfig, *, pad_token_id: int | None = 0, bos_token_id: int = 2,
                      eos_token_id: int = 3, head: HeadConfig | None = None) -> dict:
    """PLDRConfig -> pldrllm config.json dict (read back by `hf_config_to_pldr` to an equal cfg);
    with `head`, the task head's architecture, id2label / label2id and problem_type
    (`hf_head_config` reads them back)."""
    d = {
        "architectures": [head.architecture if head is not None else "PldrllmForCausalLM"],
        "model_type": "pldrllm",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.dff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps,
        "use_cache": True,
        "output_pldr_attentions": False,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": False,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": None,
        "attention_bias": True,
        "glu_bias": True,
        "final_bias": True,
        "reference_rope": cfg.reference_rope,
        "attention_dropout": 0.0,
        "num_reslayerA": cfg.num_reslayerA,
        "num_denseA": cfg.num_denseA,
        "A_dff": cfg.A_dff,
        "custom_G_type": cfg.custom_G_type,
        "cache_first_G": False,
        "dtype": cfg.param_dtype,
        _PLDR_JAX_KEY: {"dtype": cfg.dtype, "init": cfg.init},
    }
    if head is not None:
        id2label = head.id2label()
        d["id2label"] = {str(i): name for i, name in id2label.items()}
        d["label2id"] = {name: i for i, name in id2label.items()}
        if head.problem_type is not None:
            d["problem_type"] = head.problem_type
    return d


def hf_head_config(d: Mapping[str, Any], where: str = _CONFIG) -> HeadConfig | None:
    """The task head a pldrllm config.json describes (its `architectures`), or None for
    `PldrllmForCausalLM` / `PldrllmModel` / no architectures.  num_labels = len(id2label) (else
    `num_labels`, else 2: transformers' default); label names from id2label."""
    archs = d.get("architectures") or ["PldrllmForCausalLM"]
    if not isinstance(archs, list) or len(archs) != 1:
        raise ValueError(f"{where}: architectures must list one class, got {archs!r}")
    arch = archs[0]
    if arch in ("PldrllmForCausalLM", "PldrllmModel"):
        return None
    if arch not in TASK_OF_ARCHITECTURE:
        raise ValueError(f"{where}: unknown architecture {arch!r}; pldr_jax reads PldrllmForCausalLM, "
                         + ", ".join(sorted(TASK_OF_ARCHITECTURE)))
    task = TASK_OF_ARCHITECTURE[arch]
    id2label = d.get("id2label")
    labels: tuple[str, ...] = ()
    if id2label:
        try:
            ids = sorted(int(k) for k in id2label)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: id2label keys must be integers, got {sorted(id2label)}") from e
        if ids != list(range(len(ids))):
            raise ValueError(f"{where}: id2label keys must be 0..{len(ids) - 1}, got {ids}")
        labels = tuple(str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in ids)
        num_labels = len(labels)
    else:
        num_labels = int(d.get("num_labels", 2))
    if task == "qa":
        num_labels, labels = 2, ()
    try:
        return HeadConfig(task=task, num_labels=num_labels,
                          problem_type=d.get("problem_type") if task == "seq-cls" else None,
                          pad_token_id=d.get("pad_token_id", HF_DEFAULTS["pad_token_id"]), labels=labels)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


# --------------------------------------------------------------------------- weights
def _read_index(index: Path, reader) -> dict[str, np.ndarray]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: malformed shard index (needs a 'weight_map'): {e}") from e
    sd: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise ValueError(f"{index}: shard name {shard!r} must be a plain file name")
        part = reader(index.parent / shard)
        sd.update({k: v for k, v in part.items() if k in weight_map})
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise ValueError(f"{index}: tensors listed in the index but absent from the shards: {missing[:10]}")
    return sd


def read_hf_state_dict(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The raw tensors of a Hugging Face folder (buffers included), from safetensors or .bin."""
    folder = Path(folder)
    candidates = [
        ("model.safetensors", read_safetensors),
        ("model.safetensors.index.json", lambda p: _read_index(p, read_safetensors)),
        ("pytorch_model.bin", load_torch_state_dict),
        ("pytorch_model.bin.index.json", lambda p: _read_index(p, load_torch_state_dict)),
    ]
    for name, reader in candidates:
        if (folder / name).is_file():
            return reader(folder / name)
    raise FileNotFoundError(f"{folder}: no weights found; expected one of "
                            f"{[n for n, _ in candidates]}")


def _g_from_buffer(cfg: PLDRConfig, sd: Mapping[str, np.ndarray], where: str) -> np.ndarray:
    L, H, dk = cfg.num_layers, cfg.num_heads, cfg.head_dim
    if G_BUFFER not in sd:
        if cfg.custom_G_type in ("identity", "external"):
            if cfg.custom_G_type == "external":
                warnings.warn(f"{where}: custom_G_type='external' but no {G_BUFFER} stored; using the "
                              f"identity G_LM (the authors' default)", stacklevel=3)
            return np.broadcast_to(np.eye(dk, dtype=np.float32), (L, H, dk, dk)).copy()
        raise ValueError(f"{where}: custom_G_type={cfg.custom_G_type!r} but the weights have no "
                         f"{G_BUFFER} buffer holding G_LM")
    buf = np.asarray(sd[G_BUFFER])
    if buf.ndim != 6 or buf.shape[0] != L or buf.shape[1] != 3 or buf.shape[3:] != (H, dk, dk):
        raise ValueError(f"{where}: {G_BUFFER} has shape {buf.shape}; expected "
                         f"[layers={L}, 3, 1, H={H}, dk={dk}, dk={dk}]")
    if buf.shape[2] != 1:
        raise ValueError(f"{where}: {G_BUFFER} has batch size {buf.shape[2]}; a predefined G must have 1")
    return buf[:, 2, 0].astype(np.float32)


def load_hf_meta(folder: str | os.PathLike) -> HFMeta:
    """Token ids, stored dtype and tokenizer path of a pldrllm folder (config.json only)."""
    folder = Path(folder)
    d = _read_config(folder)
    tok = folder / "tokenizer.model"
    return HFMeta(pad_token_id=d.get("pad_token_id", HF_DEFAULTS["pad_token_id"]),
                  bos_token_id=d.get("bos_token_id", HF_DEFAULTS["bos_token_id"]),
                  eos_token_id=d.get("eos_token_id", HF_DEFAULTS["eos_token_id"]),
                  torch_dtype=_hf_dtype(d, str(folder / _CONFIG)),
                  tokenizer=tok if tok.is_file() else None, config=d)


def _head_state_dict(hcfg: HeadConfig, sd: Mapping[str, np.ndarray], D: int, where: str) -> dict:
    name = HEAD_NAMES[hcfg.task]
    keys = [f"{name}.weight"] + ([f"{name}.bias"] if hcfg.has_bias else [])
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"{where}: a {hcfg.architecture} folder needs {keys}; missing {missing}")
    w = np.asarray(sd[f"{name}.weight"])
    if w.shape != (hcfg.num_labels, D):
        raise ValueError(f"{where}: {name}.weight has shape {w.shape}; expected [num_labels="
                         f"{hcfg.num_labels}, hidden={D}] (config.json id2label / num_labels)")
    head = {"kernel": np.ascontiguousarray(w.T)}
    if hcfg.has_bias:
        head["bias"] = np.asarray(sd[f"{name}.bias"])
    return head


def load_hf_head(folder: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
                 stacked: bool = True):
    """Load any pldrllm folder -> (cfg, params, g_lm, head_cfg, head).

    Causal-LM folders: head_cfg = head = None and params as `load_hf`.  Task-head folders
    (`pldr_jax.heads`): params are the decoder without "final", head = {"kernel": [D, n],
    "bias": [n]} (no bias for sequence classification) in cfg.param_dtype, head_cfg from config.json.
    """
    folder = Path(folder)
    d = _read_config(folder)
    where = str(folder / _CONFIG)
    cfg = hf_config_to_pldr(d, dtype=dtype, param_dtype=param_dtype, where=where)
    hcfg = hf_head_config(d, where)
    sd = dict(read_hf_state_dict(folder))
    buffers = (G_BUFFER, G_STATUS_BUFFER)
    g_lm = None if cfg.learned_g else _g_from_buffer(cfg, sd, str(folder))
    head = None
    if hcfg is not None:
        pdt = np.dtype(jnp.dtype(cfg.param_dtype))
        head = {k: v.astype(pdt) for k, v in _head_state_dict(hcfg, sd, cfg.d_model, str(folder)).items()}
        for k in [k for k in sd if k.startswith(HEAD_NAMES[hcfg.task] + ".")]:
            del sd[k]
        if "final_layer.weight" in sd or "final_layer.bias" in sd:
            raise ValueError(f"{folder}: a {hcfg.architecture} folder has no final_layer, but this one does")
        # the decoder alone: a placeholder output head lets the state-dict mapping run, then goes
        sd["final_layer.weight"] = np.zeros((cfg.vocab_size, cfg.d_model), np.float32)
        sd["final_layer.bias"] = np.zeros((cfg.vocab_size,), np.float32)
    try:
        params = state_dict_to_params(cfg, sd, stacked=stacked, ignore=buffers)
    except ValueError as e:
        raise ValueError(f"{folder}: weights do not match config.json: {e}") from e
    if hcfg is not None:
        del params["final"]
    return cfg, params, g_lm, hcfg, head


def load_hf(folder: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
            stacked: bool = True) -> tuple[PLDRConfig, dict, np.ndarray | None]:
    """Load a pldrllm Hugging Face folder -> (cfg, params, g_lm).

    g_lm: None for learned-G models, else float32 [layers, H, dk, dk] (slot 2 of the
    `decoder.past_G_values` buffer).  params: host numpy arrays in cfg.param_dtype (default: the
    folder's dtype); compute dtype float32 unless `dtype` says otherwise.  Token ids etc.:
    `load_hf_meta(folder)`.  A task-head folder (no LM head) raises: read it with `load_hf_head`.
    """
    folder = Path(folder)
    hcfg = hf_head_config(_read_config(folder), str(folder / _CONFIG))
    if hcfg is not None:
        raise ValueError(f"{folder} is a {hcfg.architecture} folder (a task head, no language-model "
                         f"head): load it with pldr_jax.io.hf.load_hf_head")
    cfg, params, g_lm, _, _ = load_hf_head(folder, dtype=dtype, param_dtype=param_dtype, stacked=stacked)
    return cfg, params, g_lm


def save_hf(cfg: PLDRConfig, params: Mapping, folder: str | os.PathLike, g_lm=None,
            tokenizer_model: str | os.PathLike | None = None, *, pad_token_id: int | None = 0,
            bos_token_id: int = 2, eos_token_id: int = 3, head_cfg: HeadConfig | None = None,
            head: Mapping | None = None) -> Path:
    """Write a pldrllm folder (config.json, model.safetensors, optional tokenizer.model).

    Predefined-G configs also store `decoder.past_G_values` [layers, 3, 1, H, dk, dk] float32
    (A and A_LM slots zero, slot 2 = g_lm [layers, H, dk, dk] or [layers, 1, H, dk, dk];
    an "identity" config defaults to the identity) and `decoder.past_G_values_status` (all true).
    With `head_cfg` and `head` (`pldr_jax.heads`): a task-head folder (its architecture, the head's
    weights under the port's names, no final_layer; params' "final", if any, is not written).
    Returns the folder path.
    """
    from safetensors.numpy import save_file
    folder = Path(folder)
    L, H, dk = cfg.num_layers, cfg.num_heads, cfg.head_dim
    if (head_cfg is None) != (head is None):
        raise ValueError("save_hf needs both head_cfg and head for a task-head folder (or neither)")
    if head_cfg is not None:
        head_sd = _head_to_state_dict(head_cfg, head, cfg.d_model)
        if "final" not in params:   # placeholder for the mapping, dropped below
            params = {**params, "final": {"kernel": np.zeros((cfg.d_model, cfg.vocab_size), np.float32),
                                          "bias": np.zeros((cfg.vocab_size,), np.float32)}}
    sd = params_to_state_dict(cfg, params)
    if head_cfg is not None:
        del sd["final_layer.weight"], sd["final_layer.bias"]
        sd.update(head_sd)
    if cfg.learned_g:
        if g_lm is not None:
            raise ValueError("g_lm is only stored for predefined-G configs (custom_G_type set); "
                             "a learned-G model derives its G_LM")
    else:
        if g_lm is None:
            if cfg.custom_G_type != "identity":
                raise ValueError(f"save_hf needs g_lm [layers={L}, H={H}, dk={dk}, dk={dk}] for "
                                 f"custom_G_type={cfg.custom_G_type!r}")
            g = np.broadcast_to(np.eye(dk, dtype=np.float32), (L, H, dk, dk))
        else:
            g = np.asarray(g_lm)
            if g.ndim == 5 and g.shape[1] == 1:
                g = g[:, 0]
            if g.shape != (L, H, dk, dk):
                raise ValueError(f"g_lm has shape {np.shape(g_lm)}; expected [layers={L}, H={H}, "
                                 f"dk={dk}, dk={dk}] (or with a size-1 batch axis)")
        buf = np.zeros((L, 3, 1, H, dk, dk), np.float32)
        buf[:, 2, 0] = g.astype(np.float32)
        sd[G_BUFFER] = buf
        sd[G_STATUS_BUFFER] = np.ones((L,), np.bool_)
    tok = None
    if tokenizer_model is not None:
        tok = Path(tokenizer_model)
        if not tok.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {tok}")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = pldr_to_hf_config(cfg, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                               eos_token_id=eos_token_id, head=head_cfg)
    with open(folder / _CONFIG, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    if tok is not None and tok.resolve() != (folder / "tokenizer.model").resolve():
        shutil.copyfile(tok, folder / "tokenizer.model")
    return folder


def _head_to_state_dict(hcfg: HeadConfig, head: Mapping, D: int) -> dict[str, np.ndarray]:
    name = HEAD_NAMES[hcfg.task]
    k = np.asarray(jax.device_get(head["kernel"]))
    if k.shape != (D, hcfg.num_labels):
        raise ValueError(f"head kernel has shape {k.shape}; expected [hidden={D}, num_labels={hcfg.num_labels}]")
    sd = {f"{name}.weight": np.ascontiguousarray(k.T)}
    if hcfg.has_bias:
        sd[f"{name}.bias"] = np.ascontiguousarray(np.asarray(jax.device_get(head["bias"])))
    elif "bias" in head:
        raise ValueError(f"a {hcfg.architecture} head has no bias (the port's score is bias-free)")
    return sd
