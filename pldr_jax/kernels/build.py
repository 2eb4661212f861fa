"""Building and registering pldr_jax's native XLA:CPU kernels (C++ `jax.ffi` custom calls).

A kernel's C++ source ships with the package (``pldr_jax/kernels/*.cc``) and is compiled on first
use, on the host that runs it (``-O3 -march=native``: the host's vector units, AVX-512 / AVX2 /
NEON), against the XLA FFI headers of the installed jaxlib (`jax.ffi.include_dir`), into a cache
directory: ``$PLDR_JAX_KERNEL_DIR``, else ``$XDG_CACHE_HOME/pldr_jax/kernels`` (``~/.cache/...``).
The library's name carries a hash of the source, the compiler's version, the flags, the jaxlib
version and the host's CPU flags, so a changed source, toolchain, jaxlib or host (a shared home
on a cluster) builds its own copy; a build is written to a temporary file and renamed into place,
so processes building at once never load a half-written library.  Nothing is downloaded.

Off switch: ``PLDR_JAX_CPU_KERNELS=0`` (or off / false / no / none).  Without a C++ compiler, with
the switch off, or when a build fails, `load` returns a `KernelStatus` whose ``available`` is False
and whose ``reason`` says why (one warning per process for a failed build); callers then use the
plain `jax.lax` path (`pldr_jax.backend` ``decode_attention``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["ENV_SWITCH", "ENV_DIR", "KernelStatus", "kernel_dir", "load", "enabled"]

ENV_SWITCH = "PLDR_JAX_CPU_KERNELS"
ENV_DIR = "PLDR_JAX_KERNEL_DIR"
_OFF = {"0", "off", "false", "no", "none"}
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")
_SRC_DIR = Path(__file__).resolve().parent

#: kernel name -> (source file, {FFI target name: exported handler symbol})
KERNELS = {"decode_attention": ("decode_attention.cc", {"pldr_decode_attention": "PldrDecodeAttention"}),
           "packed_matmul": ("packed_matmul.cc", {"pldr_packed_matmul": "PldrPackedMatmul"})}


@dataclasses.dataclass(frozen=True)
class KernelStatus:
    """Whether a native kernel is registered with XLA:CPU in this process, and if not, why."""
    name: str
    available: bool
    reason: str = ""
    library: str = ""


_lock = threading.Lock()
_loaded: dict[str, KernelStatus] = {}


def enabled(env=None) -> bool:
    """False when ``PLDR_JAX_CPU_KERNELS`` turns the native kernels off."""
    env = os.environ if env is None else env
    return env.get(ENV_SWITCH, "").strip().lower() not in _OFF


def kernel_dir() -> Path:
    """``$PLDR_JAX_KERNEL_DIR``, else ``$XDG_CACHE_HOME/pldr_jax/kernels`` (``~/.cache`` without it)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pldr_jax" / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cc and shutil.which(cc):
            return cc
    return None


def _host_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build(name: str, cc: str) -> Path:
    import jax
    import jaxlib
    src_file, _ = KERNELS[name]
    src = (_SRC_DIR / src_file).read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(_FLAGS).encode(),
                                     jaxlib.__version__.encode(), _host_flags().encode()])).hexdigest()[:16]
    out_dir = kernel_dir()
    lib = out_dir / f"libpldr_{name}_{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=lib.name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cc, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SRC_DIR / src_file), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load(name: str) -> KernelStatus:
    """Build (once per source / toolchain / host, cached on disk) and register kernel `name` with
    XLA:CPU (once per process).  Never raises: a failure is a status with its reason."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name not in KERNELS:
            raise ValueError(f"unknown native kernel {name!r}; known: {sorted(KERNELS)}")
        if not enabled():
            status = KernelStatus(name, False, f"turned off by {ENV_SWITCH}")
        elif (cc := _compiler()) is None:
            status = KernelStatus(name, False, "no C++ compiler (c++, g++, clang++ or $CXX) on PATH")
        else:
            try:
                import ctypes

                import jax
                lib = _build(name, cc)
                dll = ctypes.cdll.LoadLibrary(str(lib))
                for target, symbol in KERNELS[name][1].items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(dll, symbol)), platform="cpu")
                status = KernelStatus(name, True, library=str(lib))
            except Exception as e:   # noqa: BLE001 -- any build / load failure: fall back, say why
                status = KernelStatus(name, False, f"build or load failed: {e}")
                warnings.warn(f"pldr_jax native CPU kernel {name!r} unavailable, using the jax.lax path "
                              f"instead: {e}", stacklevel=2)
        _loaded[name] = status
        return status
