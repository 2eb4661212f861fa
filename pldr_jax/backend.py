"""Every backend-specific choice of pldr_jax, as one value (`BackendChoices`).

The model's maths is backend-neutral: matmuls are plain ``jax.lax.dot_general`` accumulating in
float32 (``preferred_element_type``), differentiated by JAX and scheduled by XLA.  A few choices
were measured to be faster on XLA:CPU (the 2-core machine pldr_jax is developed on) and would hurt,
or block, elsewhere.  `choices(platform, options)` makes them for a platform, `options` overriding
any field; the value is resolved once where work starts (`decode.Sampler`, `train.step.make_train_step`,
`aot.compile_report`), passed down, and part of the compiled programs' cache keys.  The numbers
behind each default are in experiments/README.md, "Backend choices: the measurements behind them".

* ``kernels``: "cpu" = `ops.layers.dense` / `ops.cross_entropy`'s hand-written backward passes
  (XLA:CPU's fast gradient forms); "xla" = plain `dot_general` and JAX autodiff (forward-mode
  autodiff works).  `model.forward` defaults to "xla", the training step to the backend's.
* ``unroll_layers``: a Python loop over the layers (CPU: faster steps) or `lax.scan` (accelerators:
  compile time flat in depth).
* ``bf16_min_batch``: a bfloat16 model decodes in float32 below this batch (CPU: XLA:CPU's 16-bit
  matrix-vector products are slow, and the packed float32 matmul outruns them up to 16 rows;
  accelerators: 0, never).
* ``decode_transposed``: the decode dtypes whose weights are stored as [out, in] (CPU: float32, for
  its matrix-vector products; its bfloat16 matmuls want [in, out]).
* ``decode_matmul``: "packed" = float32 decode weights in 16-output panels multiplied by a native
  kernel (`pldr_jax.kernels.packed_matmul`; CPU, unless the native kernels are off; not sharded, not
  bfloat16), else "xla".
* ``kv_cache_dtype``: the dtype of a 16-bit model's KV-cache buffers (CPU: "float32", as XLA:CPU
  converts a whole bfloat16 buffer around every scatter and batched dot; None elsewhere = the
  compute dtype).
* ``decode_merged_heads``: the decode attention's products over one merged [B * H] batch axis (CPU:
  XLA:CPU runs two batch axes as many small products) or over [B, H] (accelerators: a head-sharded
  cache stays sharded).
* ``decode_shared_kv_slot``: a decode step writes every row's key/value at one shared slot (one
  in-place ``dynamic_update_slice``; accelerators, where a per-row scatter rewrites whole buffers)
  or at each row's own position by a scatter (CPU, which updates in place).
* ``decode_kv_chunk``: the decode attention reads only the live cache slots, this many per loop
  iteration (accelerators: 256; the chunk's slice fuses into the products) or the whole buffer
  (CPU: 0; XLA:CPU copies each chunk out).
* ``decode_attention``: "native" = a one-token step's per-row KV write and attention as one C++
  kernel (`pldr_jax.kernels.decode_attention_update`; CPU, unless the native kernels are off; used
  where `uses_native_decode_attention` says), else "xla".
* ``decode_embed_f32``: a 16-bit decode keeps its embedding table in float32 and looks rows up
  before the cast (CPU: XLA:CPU converts a whole bfloat16 table for a gather).
* ``head_chunk_bytes``: the training loss's head + cross-entropy over sequence chunks of at most this
  many bytes of float32 logits per device (accelerators: 256 MiB; CPU: 0 = whole).  A chunk's
  logits and their gradient are the step's largest buffers: 1 GiB chunks made the head the peak of
  the v51 110M step at 4 x 8192 on one H100 (experiments/README.md, "Fused attention on
  accelerators").
* ``attention_block``: the training step's attention this many queries at a time
  (`layer.attention_in_query_blocks`; accelerators: 256, memory linear in the sequence length;
  CPU: 0 = all at once).
* ``attention_impl``: how the full-sequence attention of the training step and of the decode
  prefill runs (`pldr_jax.kernels.fused_attention`, chosen by `strategies.attention_strategy`;
  decode steps keep their KV-cache attention): "blocks" =
  ``attention_block`` queries at a time by the layer's own attention (CPU, and the fallback where a
  fused kernel does not apply), "cudnn" = cuDNN's fused attention on q' = q G_LM (GPUs), "splash" =
  Pallas splash attention (TPUs): no [B * H, block, L] logits through HBM; also "xla_sdpa" and
  "splash_interpret" (any platform: the formulation, and the kernel in interpret mode, for tests).
* ``remat``: the training step's default rematerialisation ("none" on CPU, "full" on accelerators,
  where memory, not FLOPs, bounds the batch).

Not a field: the `pldr-jax` console script re-executes itself with a glibc huge-page tunable
(`train.host_memory`) only for an XLA:CPU process (`huge_pages_wanted`).

Override: `choices(platform, {field: value})`, `parse_backend_options(["KEY=VALUE", ...])` for a
command line (``--backend-option``), `Sampler(backend_options=...)`, `make_train_step(backend=...)`;
`choices("cpu", accelerator_options())` runs the accelerator choices on CPU (tests).  The
environment is read in `pldr_jax.settings` (``PLDR_JAX_KERNELS`` = "cpu" | "xla" forces the kernels;
``PLDR_JAX_CPU_KERNELS=0`` turns the native kernels off; `settings.backend_options_from_env`);
`StepOptions` fields override per step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from typing import Any, Iterable, Mapping

from . import settings

__all__ = ["KERNELS", "KERNELS_ENV", "OPTION_NAMES", "BackendChoices", "choices", "with_options",
           "check_options", "parse_backend_options", "accelerator_options", "backend_for", "platform_of", "default_kernels",
           "check_kernels", "huge_pages_wanted", "uses_native_decode_attention"]

KERNELS = ("xla", "cpu")
KERNELS_ENV = settings.KERNELS_ENV


@dataclasses.dataclass(frozen=True)
class BackendChoices:
    """The backend-specific settings for one platform (see the module docstring)."""
    platform: str
    kernels: str
    unroll_layers: bool
    bf16_min_batch: int
    decode_transposed: tuple[str, ...]
    kv_cache_dtype: str | None
    decode_embed_f32: bool
    remat: str
    head_chunk_bytes: int
    attention_block: int
    decode_merged_heads: bool = True
    decode_shared_kv_slot: bool = False
    decode_kv_chunk: int = 0
    decode_attention: str = "xla"
    decode_matmul: str = "xla"
    attention_impl: str = "blocks"


def _kernels_override() -> str | None:
    return settings.kernels_override()


def choices(platform: str | None = None, options: Mapping[str, Any] | None = None) -> BackendChoices:
    """The settings for `platform` ("cpu", "tpu", "gpu", "cuda", "rocm"; None = `jax.default_backend()`),
    with `options` ({field: value}, see `with_options`) overriding any field.  The kernels follow
    ``PLDR_JAX_KERNELS`` when it is set.  Resolve it once where work starts and pass the value down."""
    if platform is None:
        import jax
        platform = jax.default_backend()
    platform = platform.lower()
    cpu = platform == "cpu"
    kernels = _kernels_override() or ("cpu" if cpu else "xla")
    native = cpu and _native_kernels_enabled()
    base = BackendChoices(platform=platform, kernels=kernels, unroll_layers=cpu,
                          bf16_min_batch=(16 if native else 8) if cpu else 0,
                          decode_transposed=("float32",) if cpu else (), kv_cache_dtype="float32" if cpu else None,
                          decode_embed_f32=cpu,
                          remat="none" if cpu else "full",
                          head_chunk_bytes=0 if cpu else 2 ** 28, attention_block=0 if cpu else 256,
                          decode_merged_heads=cpu, decode_shared_kv_slot=not cpu,
                          decode_kv_chunk=0 if cpu else 256,
                          decode_attention="native" if native else "xla",
                          decode_matmul="packed" if native else "xla",
                          attention_impl=_ATTENTION_IMPL.get(platform, "blocks"))
    return with_options(base, options) if options else base


#: the fused attention per accelerator platform (`BackendChoices.attention_impl`)
_ATTENTION_IMPL = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}


#: option name -> the values it takes (None: any int >= 0, or a bool / tuple / str by the field's type)
_CHOICES_OF = {"kernels": KERNELS, "remat": ("none", "dots", "full"), "decode_attention": ("xla", "native"),
               "decode_matmul": ("xla", "packed"),
               "attention_impl": ("blocks", "cudnn", "splash", "xla_sdpa", "splash_interpret"), "kv_cache_dtype": (None, "float32", "bfloat16", "float16")}
_INT_FIELDS = ("bf16_min_batch", "head_chunk_bytes", "attention_block", "decode_kv_chunk")
_BOOL_FIELDS = ("unroll_layers", "decode_embed_f32", "decode_merged_heads", "decode_shared_kv_slot")
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(BackendChoices) if f.name != "platform")


def _parse_value(name: str, value: Any) -> Any:
    """`value` for the option `name`, parsed from a string where it is one (CLI), and checked."""
    if name in _BOOL_FIELDS:
        if isinstance(value, str):
            low = value.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(f"backend option {name}={value!r}: expected true or false")
            value = low in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            raise ValueError(f"backend option {name}={value!r}: expected a bool")
        return value
    if name in _INT_FIELDS:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"backend option {name}={value!r}: expected an int >= 0") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"backend option {name}={value!r}: expected an int >= 0")
        return value
    if name == "decode_transposed":
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"backend option {name}={value!r}: expected dtype names (comma-separated)")
        return tuple(value)
    if isinstance(value, str) and value.strip().lower() == "none" and None in _CHOICES_OF[name]:
        value = None
    elif isinstance(value, str):
        value = value.strip().lower()
    if name == "kernels":
        return check_kernels(value)
    if value not in _CHOICES_OF[name]:
        raise ValueError(f"backend option {name}={value!r}: expected one of {_CHOICES_OF[name]}")
    return value


def with_options(ch: BackendChoices, options: Mapping[str, Any]) -> BackendChoices:
    """`ch` with `options` ({field: value}; values may be strings, as from a command line) replacing
    its fields; ValueError naming the valid options for an unknown one, or naming a bad value."""
    _check_names(options)
    return dataclasses.replace(ch, **{k: _parse_value(k, v) for k, v in options.items()})


def check_options(options) -> dict[str, Any]:
    """{field: value} (a mapping or (key, value) pairs), each value parsed and checked as
    `with_options` does; ValueError naming an unknown key (and the valid ones) or a bad value."""
    items = dict(options)
    _check_names(items)
    return {k: _parse_value(k, v) for k, v in items.items()}


def _check_names(options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown backend option(s) {unknown}; valid options: {', '.join(OPTION_NAMES)}")


def parse_backend_options(items: Iterable[str] | None) -> dict[str, Any]:
    """["KEY=VALUE", ...] (the repeatable ``--backend-option``) -> {key: parsed value}; ValueError for
    an item without "=", an unknown key or a bad value."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"backend option {item!r}: expected KEY=VALUE (e.g. attention_block=256); "
                             f"valid keys: {', '.join(OPTION_NAMES)}")
        out[key] = value
    _check_names(out)
    return {k: _parse_value(k, v) for k, v in out.items()}


def accelerator_options(**overrides: Any) -> dict[str, Any]:
    """The accelerator (TPU / GPU) settings as options: ``choices("cpu", accelerator_options())`` runs
    the accelerator code paths on CPU (scanned layers, full remat, query blocks, a chunked head,
    one shared KV slot, attention over the live KV chunks, two-axis head products, XLA matmuls), for
    testing them where no accelerator is.  `overrides`: fields to change as well (e.g. small
    ``attention_block`` / ``head_chunk_bytes`` / ``decode_kv_chunk`` for a tiny model, so the blocked
    forms run)."""
    acc = choices("tpu")
    opts = {name: getattr(acc, name) for name in OPTION_NAMES}
    opts["attention_impl"] = "blocks"     # the TPU's splash kernel lowers on TPUs only (override: "splash_interpret")
    opts.update(overrides)
    return opts


def backend_for(backend: BackendChoices | None = None, platform: str | None = None,
                options: Mapping[str, Any] | None = None) -> BackendChoices:
    """`backend` as given (options then applied on it), else `choices(platform, options)`: the one
    resolution an entry point (`Sampler`, the train step, `aot`) makes."""
    if backend is None:
        return choices(platform, options)
    if not isinstance(backend, BackendChoices):
        raise ValueError(f"backend must be a pldr_jax.backend.BackendChoices (from backend.choices()), "
                         f"got {type(backend).__name__}")
    return with_options(backend, options) if options else backend


def _native_kernels_enabled() -> bool:
    return settings.native_kernels_enabled()


def uses_native_decode_attention(ch: BackendChoices, compute_dtype, *, sharded: bool) -> bool:
    """Whether a decode step with a KV-cache and per-row slots uses the native kernel (`ch`'s
    ``decode_attention`` is "native", the decode is not sharded over several devices, the compute
    dtype is float32 or bfloat16, and the kernel builds on this host: the first call builds it, a
    failure warns once and answers False)."""
    if ch.decode_attention != "native" or sharded:
        return False
    import numpy as np

    from .kernels.decode_attention import KERNEL_DTYPES, decode_attention_available
    return np.dtype(compute_dtype).name in KERNEL_DTYPES and decode_attention_available()


def platform_of(mesh=None) -> str:
    """The platform a computation over `mesh` runs on (its devices'; None = `jax.default_backend()`)."""
    if mesh is not None:
        return str(next(iter(mesh.devices.flat)).platform).lower()
    import jax
    return jax.default_backend()


def default_kernels(mesh=None) -> str:
    """`choices(...).kernels` for the platform of `mesh` (None = the default backend)."""
    return choices(platform_of(mesh)).kernels


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return kernels


def huge_pages_wanted(env=None) -> bool:
    """Whether this process will run XLA:CPU (so the huge-page re-exec helps), decided without
    starting JAX: Linux, and either JAX_PLATFORMS names cpu first or no accelerator plugin (libtpu,
    CUDA / ROCm plugins) is installed."""
    if not sys.platform.startswith("linux"):
        return False
    plats = settings.jax_platforms(env)
    if plats:
        return plats.split(",")[0] == "cpu"
    for mod in ("libtpu", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13", "jax_plugins.xla_rocm7",
                "jax_cuda12_plugin", "jax_cuda13_plugin"):
        try:
            if importlib.util.find_spec(mod) is not None:
                return False
        except (ImportError, ValueError):
            continue
    return True
