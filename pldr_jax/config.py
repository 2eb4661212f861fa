"""PLDRConfig: the frozen, hashable description of one PLDR-LLM.

A config is a static argument of every jitted function in the package, so it must be hashable and
immutable.  Construct it directly, from a preset (`PLDRConfig.preset("v51-110m")`) or from the
reference's hyper-parameter dict (`PLDRConfig.from_reference_hparams(d)`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

G_TYPES = (None, "identity", "random", "external")
DTYPES = ("float32", "bfloat16", "float16")
INITS = ("reference", "corrected")


def reject_unknown_fields(cls, d: Mapping[str, Any]) -> None:
    """ValueError naming the keys of `d` that are not fields of the dataclass `cls`."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")


@dataclasses.dataclass(frozen=True)
class PLDRConfig:
    """Hyper-parameters of a PLDR-LLM (v510 family).

    Attributes:
      num_layers: decoder layers.
      d_model: model width D; must equal num_heads * head_dim.
      num_heads: attention heads H.
      dff: hidden width of the feed-forward SwiGLU.
      vocab_size: vocabulary V (id 0 is padding).
      max_seq_len: longest sequence (prompt + generated) the model accepts.
      head_dim: dk; None derives d_model // num_heads.
      A_dff: hidden width of the metric learner's GLUs.
      num_reslayerA: residual units of the metric learner.
      num_denseA: GLUs per residual unit.
      rope_theta: RoPE base.
      reference_rope: True = interleaved pairs (2i, 2i+1) as the reference (v51); False = NeoX
        rotate-half pairs (i, i + dk/2) as v52 HF checkpoints.
      custom_G_type: None = learned G_LM (v510); "identity" / "random" / "external" = predefined
        constant G_LM (v510G: no metric learner and no PLGA weights).
      layer_norm_eps: epsilon of every LayerNorm.
      dtype: compute dtype of the matmul-heavy path ("float32" or "bfloat16").  The deductive path
        (A -> A_LM -> A_P -> G_LM), softmax and loss always run in float32.
      param_dtype: storage dtype of parameters (master weights).
      init: "reference" reproduces the authors' initialisers including the `wv` slip;
        "corrected" also gives `wv` xavier-uniform weights and zero biases.
    """

    num_layers: int
    d_model: int
    num_heads: int
    dff: int
    vocab_size: int
    max_seq_len: int
    head_dim: int | None = None
    A_dff: int = 170
    num_reslayerA: int = 8
    num_denseA: int = 2
    rope_theta: float = 10000.0
    reference_rope: bool = True
    custom_G_type: str | None = None
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    init: str = "reference"

    def __post_init__(self):
        if self.head_dim is None and isinstance(self.d_model, int) and isinstance(self.num_heads, int) \
                and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        positive = ["num_layers", "d_model", "num_heads", "dff", "vocab_size", "max_seq_len", "head_dim"]
        if self.learned_g:
            positive += ["A_dff", "num_reslayerA", "num_denseA"]
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"PLDRConfig.{name} must be a positive int, got {v!r}")
        for name in ("num_reslayerA", "num_denseA", "A_dff"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"PLDRConfig.{name} must be a non-negative int, got {v!r}")
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"PLDRConfig.d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim * self.num_heads != self.d_model:
            raise ValueError(
                f"PLDRConfig.head_dim ({self.head_dim}) * num_heads ({self.num_heads}) must equal "
                f"d_model ({self.d_model})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"PLDRConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.vocab_size < 4:
            raise ValueError(f"PLDRConfig.vocab_size must be >= 4 (pad, unk, bos, eos), got {self.vocab_size}")
        if self.custom_G_type not in G_TYPES:
            raise ValueError(f"PLDRConfig.custom_G_type must be one of {G_TYPES}, got {self.custom_G_type!r}")
        if not isinstance(self.rope_theta, (int, float)) or not math.isfinite(self.rope_theta) \
                or self.rope_theta <= 1:
            raise ValueError(f"PLDRConfig.rope_theta must be a finite number > 1, got {self.rope_theta!r}")
        if not isinstance(self.reference_rope, bool):
            raise ValueError(f"PLDRConfig.reference_rope must be a bool, got {self.reference_rope!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not 0 < self.layer_norm_eps < 1:
            raise ValueError(f"PLDRConfig.layer_norm_eps must be in (0, 1), got {self.layer_norm_eps!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"PLDRConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.init not in INITS:
            raise ValueError(f"PLDRConfig.init must be one of {INITS}, got {self.init!r}")

    # ------------------------------------------------------------------ derived
    @property
    def learned_g(self) -> bool:
        """True when G_LM is derived by the model (v510); False for predefined-G models (v510G)."""
        return self.custom_G_type is None

    @property
    def dk(self) -> int:
        return self.head_dim

    def replace(self, **changes: Any) -> "PLDRConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PLDRConfig":
        """Build from `to_dict()` output; unknown keys raise ValueError naming them."""
        reject_unknown_fields(cls, d)
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"PLDRConfig lacks required fields: {missing}")
        return cls(**dict(d))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "PLDRConfig":
        """From a JSON file: `to_json()` output, a training run's ``run_config.json`` (its "model"
        entry) or the reference's hyper-parameter json (keys ``input_vocab_size`` / ``hyperparameters``).

        Errors name the file: FileNotFoundError if it is absent, ValueError if it is not UTF-8 JSON
        holding an object, or if a field is unknown, missing or out of range.
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: path={str(p)!r}")
        try:
            d = json.loads(p.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"config file {str(p)!r} is not valid UTF-8 JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config file {str(p)!r} must hold a JSON object, got {type(d).__name__}")
        if isinstance(d.get("model"), dict):
            d = d["model"]
        try:
            if "input_vocab_size" in d or isinstance(d.get("hyperparameters"), dict):
                return cls.from_reference_hparams(d, **overrides)
            return cls.from_dict({**d, **overrides})
        except (ValueError, TypeError) as e:
            raise ValueError(f"config file {str(p)!r}: {e}") from None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_reference_hparams(cls, hp: Mapping[str, Any], **overrides: Any) -> "PLDRConfig":
        """From the reference's hyper-parameter dict (`num_layers, d_model, num_heads, dff, A_dff,
        num_reslayerA, num_denseA, input_vocab_size, max_seq_len[, custom_G_type]`).

        A dict with a nested "hyperparameters" entry (the reference json files) is accepted too.
        """
        if "hyperparameters" in hp and isinstance(hp["hyperparameters"], Mapping):
            hp = hp["hyperparameters"]
        required = ["num_layers", "d_model", "num_heads", "dff", "input_vocab_size", "max_seq_len"]
        missing = [k for k in required if k not in hp]
        if missing:
            raise ValueError(f"reference hparams lack required keys: {missing}")
        g_type = hp.get("custom_G_type", None)
        if g_type is None and "Gcachelst" in hp and hp.get("Gcachelst"):
            g_type = "external"
        kw = dict(
            num_layers=hp["num_layers"], d_model=hp["d_model"], num_heads=hp["num_heads"],
            dff=hp["dff"], vocab_size=hp["input_vocab_size"], max_seq_len=hp["max_seq_len"],
            custom_G_type=g_type,
        )
        if g_type is None:
            for k in ("A_dff", "num_reslayerA", "num_denseA"):
                if k not in hp:
                    raise ValueError(f"reference hparams for a learned-G model lack {k!r}")
                kw[k] = hp[k]
        else:
            kw.update(A_dff=0, num_reslayerA=0, num_denseA=0)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "PLDRConfig":
        """A named preset (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        kw = dict(PRESETS[name])
        kw.update(overrides)
        return cls(**kw)


def paper_dff(d_model: int) -> int:
    """The paper's FFN width, floor(D * 4 * 2/3)."""
    return int(d_model * 4 * 2 / 3)


_PAPER = dict(num_layers=5, d_model=896, num_heads=14, dff=2389, vocab_size=32000, max_seq_len=1024,
              A_dff=170, num_reslayerA=8, num_denseA=2)
_NO_LEARNER = dict(A_dff=0, num_reslayerA=0, num_denseA=0)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's PLDR-LLM v51 110M (learned G_LM): 109,689,362 parameters.
    "v51-110m": dict(_PAPER),
    # The same with DAG regularisation in training (identical parameters; the loss differs).
    "v51-dag-110m": dict(_PAPER),
    # v51G 106M: predefined G_LM (identity by default), 105,606,482 parameters.
    "v51g-106m": dict(_PAPER, custom_G_type="identity", **_NO_LEARNER),
    # Scale-up presets of the same family for planning pods: head_dim 64, FFN width paper_dff(D), the
    # 110M preset's metric learner (A_dff 170, 8 residual units of 2 GLUs); parameters counted in
    # tests/test_backend.py by jax.eval_shape.
    "v51-1b": dict(_PAPER, num_layers=18, d_model=2048, num_heads=32, dff=paper_dff(2048), max_seq_len=2048),
    "v51-8b": dict(_PAPER, num_layers=38, d_model=4096, num_heads=64, dff=paper_dff(4096), max_seq_len=2048),
    # Small configs for tests, notebooks and the CPU main job.
    "tiny": dict(num_layers=2, d_model=32, num_heads=4, dff=85, vocab_size=101, max_seq_len=64,
                 A_dff=16, num_reslayerA=2, num_denseA=2),
    "tiny-g": dict(num_layers=2, d_model=32, num_heads=4, dff=85, vocab_size=101, max_seq_len=64,
                   custom_G_type="identity", **_NO_LEARNER),
    "small": dict(num_layers=4, d_model=256, num_heads=8, dff=paper_dff(256), vocab_size=4000,
                  max_seq_len=256, A_dff=64, num_reslayerA=2, num_denseA=2),
    "small-g": dict(num_layers=4, d_model=256, num_heads=8, dff=paper_dff(256), vocab_size=4000,
                    max_seq_len=256, custom_G_type="identity", **_NO_LEARNER),
}
