"""Every backend-specific choice of pldr_jax, in one place.

The model's maths is backend-neutral: matmuls are plain ``jax.lax.dot_general`` accumulating in
float32 (``preferred_element_type``), differentiated by JAX and scheduled by XLA.  A few choices
were measured to be faster on XLA:CPU (the 2-core machine pldr_jax is developed on) and would hurt,
or block, elsewhere; they are made here, from the platform the computation runs on, and nowhere
else:

* ``kernels``: "cpu" = `ops.layers.dense` / `ops.cross_entropy`'s hand-written backward passes
  (a `custom_vjp` whose two gradient matmuls are ordered by an optimization barrier, weight
  gradients over a forced transposed copy, the head's bias gradient as a ones-vector matmul);
  "xla" = plain `dot_general` and JAX autodiff (forward-mode autodiff works: `jax.jvp`,
  `jax.linearize`, `jax.hessian`).  `model.forward` defaults to "xla" (the analysis path; its
  forward values are the same either way), the training step to `choices(platform).kernels`.
* ``unroll_layers``: a Python loop over the layers (CPU: ~15% faster steps) or `lax.scan`
  (accelerators: compile time flat in depth).
* ``bf16_min_batch``: a bfloat16 model decodes in float32 below this batch (CPU: 16 with the packed
  float32 matmul (``decode_matmul``), which at 8 rows outruns XLA:CPU's bfloat16 products (v51 110M
  weight products per step: 9.4 vs 11.9 ms; at 16 rows 14.3 vs 14.6, at 32 25.4 vs 22.4), else 8:
  its 16-bit matrix-vector path is slow; accelerators: 0, never).
* ``decode_transposed``: the decode dtypes whose weights are stored as [out, in] (CPU: float32,
  for its matrix-vector products; XLA:CPU's bfloat16 matmuls (YNNPACK) want [in, out] and would
  copy [out, in] weights back at the start of every call).
* ``decode_matmul``: "packed" = a float32 decode stores every weight matrix in 16-output panels
  (`decode.prepare_params`, `pldr_jax.kernels.pack_kernel`) and multiplies by them with a C++
  kernel (`pldr_jax.kernels.packed_matmul`, built on first use like ``decode_attention``): each panel
  one contiguous stream read once per call, where XLA:CPU's float32 products of 8-32 rows run far
  below the bandwidth the weights' bytes allow (v51 110M weight products per step: batch 8 23.8 ->
  9.4 ms, batch 32 40.4 -> 25.4 ms, batch 1 9.8 -> 9.1 ms, 512 rows the same;
  `experiments/bench_packed_matmul.py`).  CPU: "packed"
  unless ``PLDR_JAX_CPU_KERNELS=0``; not for a sharded decode (`decode.Sampler` with a mesh of
  several devices) nor bfloat16 (XLA:CPU's bfloat16 products are faster from 16 rows).  "xla"
  elsewhere.
* ``kv_cache_dtype``: the dtype of a 16-bit model's KV-cache buffers ("float32" on CPU: XLA:CPU
  runs a bfloat16 scatter and batched dot by converting the whole buffer to float32 and back every
  step (v51 110M batch 32: 132 -> 61-70 ms per step); the bfloat16 values held in float32 give the same
  products; None elsewhere = the compute dtype).
* ``decode_merged_heads``: the decode step's attention over the heads-first KV-cache runs as matmuls
  over one merged [B * H] batch axis (CPU: XLA:CPU runs two batch axes as many small products) or
  over two batch axes [B, H] (accelerators: with the heads over a tensor axis, GSPMD all-gathered the
  heads of every layer's KV buffer each step when they were merged with the rows; v51 110M on
  v5e:2x2, mesh 2,1,2: 10 gathers of [16, 14, 1024, 64] per step, HBM traffic 2.3x -> 1.5x what a
  step must read without them; experiments/README.md "TPU decode bytes").
* ``decode_shared_kv_slot``: the decode step writes every row's new key/value at one shared slot
  (one in-place ``dynamic_update_slice``) and attends over the cache before the write plus the
  step's own key (`decode.cache` "KV slots"; accelerators: a TPU runs the per-row scatter by
  re-laying out and writing back each whole buffer every step, v51 110M on v5e:2x2: HBM traffic
  1.98x -> 1.23x what a step must read) or at each row's own position by a scatter (CPU: XLA:CPU
  updates in place with the scatter, but copied every buffer twice per step around the shared
  slot's update while attention read the old buffer: batch 32 step 212 -> 275 ms under load).
* ``decode_kv_chunk``: over a KV buffer longer than this, the decode step's attention reads only
  the live cache slots (below the next free slot), this many per iteration of a loop with an online
  softmax (`ops.attention.plga_attention` live_len / kv_chunk), instead of the whole buffer; a
  buffer of at most one chunk is read whole, as before.  Accelerators: 256 (v51 110M on v5e:2x2,
  1024-slot buffers half full at the start: HBM traffic per step 1.30x -> 1.07x what a step must
  read; the chunk's dynamic slice fuses into the products, read straight from HBM).  CPU: 0, the
  whole buffer (XLA:CPU copies each chunk out before its products: batch 8, 600 of 1024 slots live,
  chunks of 256: 30.0 ms per step against 16.6 ms for the whole buffer, same process;
  experiments/README.md "Decode attention over the live KV-cache").
* ``decode_attention``: "native" = a one-token decode step's per-row KV-cache write and its attention
  over the cache run as one C++ kernel (`pldr_jax.kernels.decode_attention_update`, built on first use
  for the host, `pldr_jax.kernels.build`): the buffers updated in place, masked (dead) slots never
  read, 16-bit buffers read as they are, the (row, head) pairs over XLA's thread pool; "xla" = the
  `jax.lax` path.  CPU: "native" unless ``PLDR_JAX_CPU_KERNELS=0``; used where `uses_native_decode_attention`
  says (unsharded, float32 / bfloat16, the kernel built; else the `jax.lax` path).  With it a 16-bit
  model's KV-cache is kept in its own dtype (``kv_cache_dtype`` is the `jax.lax` path's).
  Accelerators: "xla".
* ``decode_embed_f32``: a 16-bit model decoding in 16 bits keeps its embedding table in float32
  (`decode.prepare_params`; the same values) and looks rows up before the cast (`model.embed`
  ``lookup_first``): XLA:CPU runs a bfloat16 gather by converting the whole 32000 x 896 table to
  float32 first -- hoisted out of the decode loop, but once per call and per prefill (~0.9 ms of
  thread time per step at batch 32 on a loaded machine); elsewhere False.
* ``huge_pages``: the `pldr-jax` console script re-executes itself with a glibc huge-page tunable
  (`train.host_memory`; only for an XLA:CPU process).
* ``head_chunk_bytes``: the training loss computes the output head + cross-entropy over sequence
  chunks of at most this many bytes of float32 logits, whole batch (accelerators: 1 GiB, a few
  chunks: each chunk's head-weight gradient is all-reduced on its own; CPU: 0 = whole).
* ``attention_block``: the training step computes attention this many queries at a time
  (`layer.attention_in_query_blocks`; accelerators: 256, so a layer holds [B * H, 256, L] float32
  logits instead of [B * H, L, L]: v51-8b, 8 rows of 1024 per chip, 2.1 GB per such buffer; CPU: 0 =
  all at once, as before).
* ``remat``: the default rematerialisation policy of the training step ("none" on CPU, "full" on
  accelerators, where memory, not FLOPs, bounds the batch: v51 110M bf16 on v5e:2x2, batch 32 x
  1024, needs 1.7 GB of temporaries per chip with "full", 5.4 GB with "dots").

Override: the environment variable ``PLDR_JAX_KERNELS`` = "cpu" | "xla" forces the kernels (e.g.
to run the accelerator maths on CPU); `choices(platform)` takes the platform explicitly (AOT
compilation for a TPU topology asks for "tpu"); `StepOptions` fields override per step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any, Iterable, Mapping

__all__ = ["KERNELS", "KERNELS_ENV", "OPTION_NAMES", "BackendChoices", "choices", "with_options",
           "parse_backend_options", "accelerator_options", "backend_for", "platform_of", "default_kernels",
           "check_kernels", "huge_pages_wanted", "uses_native_decode_attention"]

KERNELS = ("xla", "cpu")
KERNELS_ENV = "PLDR_JAX_KERNELS"


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


def _kernels_override() -> str | None:
    v = os.environ.get(KERNELS_ENV, "").strip().lower()
    if not v:
        return None
    if v not in KERNELS:
        raise ValueError(f"{KERNELS_ENV}={v!r}: expected one of {KERNELS}")
    return v


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
                          head_chunk_bytes=0 if cpu else 2 ** 30, attention_block=0 if cpu else 256,
                          decode_merged_heads=cpu, decode_shared_kv_slot=not cpu,
                          decode_kv_chunk=0 if cpu else 256,
                          decode_attention="native" if native else "xla",
                          decode_matmul="packed" if native else "xla")
    return with_options(base, options) if options else base


#: option name -> the values it takes (None: any int >= 0, or a bool / tuple / str by the field's type)
_CHOICES_OF = {"kernels": KERNELS, "remat": ("none", "dots", "full"), "decode_attention": ("xla", "native"),
               "decode_matmul": ("xla", "packed"), "kv_cache_dtype": (None, "float32", "bfloat16", "float16")}
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
    if value not in _CHOICES_OF[name]:
        raise ValueError(f"backend option {name}={value!r}: expected one of {_CHOICES_OF[name]}")
    return value


def with_options(ch: BackendChoices, options: Mapping[str, Any]) -> BackendChoices:
    """`ch` with `options` ({field: value}; values may be strings, as from a command line) replacing
    its fields; ValueError naming the valid options for an unknown one, or naming a bad value."""
    _check_names(options)
    return dataclasses.replace(ch, **{k: _parse_value(k, v) for k, v in options.items()})


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
    from .kernels.build import enabled
    return enabled()


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
    env = os.environ if env is None else env
    if not sys.platform.startswith("linux"):
        return False
    plats = env.get("JAX_PLATFORMS", "").strip().lower()
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
