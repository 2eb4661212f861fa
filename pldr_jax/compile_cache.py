"""The persistent JAX compilation cache of the command line tools.

A second ``pldr-jax generate`` on the same model and shapes reads its compiled programs from disk
instead of compiling them again.  The cache lives in ``$XDG_CACHE_HOME/pldr_jax/jax_cache``
(``~/.cache/pldr_jax/jax_cache`` without XDG_CACHE_HOME).  The environment variable
``PLDR_JAX_COMPILE_CACHE`` overrides the directory, or turns the cache off with ``0``/``off``/
``false``/``none``; a command's ``--no-compile-cache`` flag turns it off too.

Every program is cached, however small or quick to compile (a decode loop compiles in seconds on
CPU, under JAX's default 1 s / size thresholds for some buckets).  The directory is created private
(mode 0700): JAX treats the cache as trusted code.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from . import settings

__all__ = ["ENV_VAR", "default_cache_dir", "resolve_cache_dir", "enable_compile_cache"]

ENV_VAR = settings.COMPILE_CACHE_ENV


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pldr_jax/jax_cache``, else ``~/.cache/pldr_jax/jax_cache``."""
    return settings.cache_home() / "pldr_jax" / "jax_cache"


def resolve_cache_dir(path: str | os.PathLike | None = None, *, enabled: bool = True) -> Path | None:
    """The cache directory to use, or None when off: `enabled` False, else `path`, else
    ``$PLDR_JAX_COMPILE_CACHE`` (an off word disables), else `default_cache_dir`."""
    if not enabled:
        return None
    if path is not None:
        return Path(path).expanduser()
    env = settings.compile_cache_setting()
    if env is not None:
        return None if env.strip().lower() in settings.OFF_WORDS or not env.strip() else Path(env).expanduser()
    return default_cache_dir()


def enable_compile_cache(path: str | os.PathLike | None = None, *, enabled: bool = True) -> Path | None:
    """Point JAX's persistent compilation cache at `resolve_cache_dir(path, enabled=enabled)` with
    no size or compile-time threshold; returns the directory (None: left off, or not creatable: a
    warning).  Call it before the
    first compilation of the process (JAX reads the setting when it first compiles)."""
    import jax
    cache = resolve_cache_dir(path, enabled=enabled)
    if cache is None:
        return None
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:   # e.g. a read-only home: run without the cache rather than fail
        warnings.warn(f"compilation cache off: cannot create {cache} ({e}); set {ENV_VAR} to a writable "
                      f"directory, or to 'off'", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return cache
