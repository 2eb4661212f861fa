"""Every environment variable pldr_jax reads, in one module.

The library reads the process environment here and nowhere else (the command-line modules, whose
names contain ``cli``, may too); other modules call these functions, which read the environment
afresh on each call, so a variable changed in a notebook takes effect at the next call.

========================= =========================================================================
Variable                  Meaning
========================= =========================================================================
PLDR_JAX_KERNELS          "cpu" | "xla": force the training kernels (`backend.BackendChoices.kernels`)
PLDR_JAX_CPU_KERNELS      0 / off / false / no / none: no native C++ CPU kernels (`pldr_jax.kernels`)
PLDR_JAX_KERNEL_DIR       the native kernels' build directory (default: `cache_home()/pldr_jax/kernels`)
CXX                       the C++ compiler tried first for the native kernels (then c++, g++, clang++)
XDG_CACHE_HOME            the cache root (default ``~/.cache``)
PLDR_JAX_COMPILE_CACHE    the persistent JAX compilation cache directory, or an off word
JAX_PLATFORMS             read (never set) to tell whether a process will run XLA:CPU
PLDR_JAX_NO_HUGE_PAGES    1: the ``pldr-jax`` console script does not re-execute itself with huge pages
GLIBC_TUNABLES            read to tell whether the huge-page malloc tunable is active
========================= =========================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

__all__ = ["KERNELS_ENV", "CPU_KERNELS_ENV", "KERNEL_DIR_ENV", "CXX_ENV", "COMPILE_CACHE_ENV",
           "NO_HUGE_PAGES_ENV", "OFF_WORDS", "VARIABLES", "environment", "kernels_override",
           "native_kernels_enabled", "backend_options_from_env", "cache_home", "kernel_dir",
           "cxx", "compile_cache_setting", "jax_platforms", "huge_pages_opted_out"]

KERNELS_ENV = "PLDR_JAX_KERNELS"
CPU_KERNELS_ENV = "PLDR_JAX_CPU_KERNELS"
KERNEL_DIR_ENV = "PLDR_JAX_KERNEL_DIR"
CXX_ENV = "CXX"
COMPILE_CACHE_ENV = "PLDR_JAX_COMPILE_CACHE"
NO_HUGE_PAGES_ENV = "PLDR_JAX_NO_HUGE_PAGES"
#: the words that turn a switch off (case-insensitive)
OFF_WORDS = frozenset({"0", "off", "false", "no", "none"})
#: every variable read here (the README's table lists the same)
VARIABLES = (KERNELS_ENV, CPU_KERNELS_ENV, KERNEL_DIR_ENV, CXX_ENV, "XDG_CACHE_HOME", COMPILE_CACHE_ENV,
             "JAX_PLATFORMS", NO_HUGE_PAGES_ENV, "GLIBC_TUNABLES")

_KERNELS = ("xla", "cpu")


def environment() -> Mapping[str, str]:
    """This process's environment (the live mapping: read it, copy it for a subprocess)."""
    return os.environ


def _get(name: str, env: Mapping[str, str] | None) -> str:
    return (environment() if env is None else env).get(name, "")


def kernels_override(env: Mapping[str, str] | None = None) -> str | None:
    """``PLDR_JAX_KERNELS``: "cpu" or "xla", None when unset; another value is a ValueError."""
    v = _get(KERNELS_ENV, env).strip().lower()
    if not v:
        return None
    if v not in _KERNELS:
        raise ValueError(f"{KERNELS_ENV}={v!r}: expected one of {_KERNELS} (or unset it)")
    return v


def native_kernels_enabled(env: Mapping[str, str] | None = None) -> bool:
    """False when ``PLDR_JAX_CPU_KERNELS`` is an off word (0 / off / false / no / none)."""
    return _get(CPU_KERNELS_ENV, env).strip().lower() not in OFF_WORDS


def backend_options_from_env(platform: str | None = None, env: Mapping[str, str] | None = None) -> dict:
    """The environment's overrides of `pldr_jax.backend.BackendChoices` fields, as {field: value}.

    ``PLDR_JAX_KERNELS=xla`` -> {"kernels": "xla"}; ``PLDR_JAX_CPU_KERNELS=0`` -> the native kernels'
    fields on their `jax.lax` values, {"decode_attention": "xla", "decode_matmul": "xla"}, and for
    `platform` "cpu" also {"bf16_min_batch": 8} (XLA:CPU's bfloat16 products win from 8 rows
    without the packed float32 matmul; accelerators keep theirs).  Empty when neither is set."""
    opts: dict = {}
    kernels = kernels_override(env)
    if kernels is not None:
        opts["kernels"] = kernels
    if not native_kernels_enabled(env):
        opts.update(decode_attention="xla", decode_matmul="xla")
        if platform is not None and platform.lower() == "cpu":
            opts["bf16_min_batch"] = 8
    return opts


def cache_home(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME``, else ``~/.cache``."""
    base = _get("XDG_CACHE_HOME", env)
    return Path(base) if base else Path(os.path.expanduser("~")) / ".cache"


def kernel_dir(env: Mapping[str, str] | None = None) -> Path:
    """The native kernels' build directory: ``$PLDR_JAX_KERNEL_DIR``, else
    ``cache_home()/pldr_jax/kernels``."""
    d = _get(KERNEL_DIR_ENV, env)
    return Path(d).expanduser() if d else cache_home(env) / "pldr_jax" / "kernels"


def cxx(env: Mapping[str, str] | None = None) -> str | None:
    """``$CXX`` (the C++ compiler to try first), None when unset or empty."""
    return _get(CXX_ENV, env).strip() or None


def compile_cache_setting(env: Mapping[str, str] | None = None) -> str | None:
    """``$PLDR_JAX_COMPILE_CACHE`` as set (a directory or an off word), None when unset."""
    return (environment() if env is None else env).get(COMPILE_CACHE_ENV)


def jax_platforms(env: Mapping[str, str] | None = None) -> str:
    """``$JAX_PLATFORMS``, lower-cased ("" when unset)."""
    return _get("JAX_PLATFORMS", env).strip().lower()


def huge_pages_opted_out(env: Mapping[str, str] | None = None) -> bool:
    """``PLDR_JAX_NO_HUGE_PAGES=1``: no huge-page re-execution."""
    return _get(NO_HUGE_PAGES_ENV, env) == "1"
