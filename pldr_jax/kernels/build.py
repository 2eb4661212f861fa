"""Building, checking and registering pldr_jax's native XLA:CPU kernels (C++ `jax.ffi` custom calls).

A kernel's C++ source ships with the package (``pldr_jax/kernels/*.cc``) and is compiled on the host
that runs it (``-O3 -march=native``: the host's vector units, AVX-512 / AVX2 / NEON) against the XLA
FFI headers of the installed jaxlib (`jax.ffi.include_dir`).  Nothing is downloaded.

When: ``pldr-jax kernels build`` builds them ahead of time, printing the directory, the compiler and
per kernel whether it was built or reused (CI and ``pldr-jax train --main-job`` run it); otherwise
the first use in a process builds a missing kernel and says so on stderr in one line.

Where: one directory per user (`pldr_jax.settings.kernel_dir`: ``$PLDR_JAX_KERNEL_DIR``, else
``$XDG_CACHE_HOME/pldr_jax/kernels``, else ``~/.cache/pldr_jax/kernels``), created with mode 0700.

What is loaded, and only then:

* the directory is owned by the current user and not group- or world-writable;
* the library is a regular file owned by the current user and not group- or world-writable;
* ``manifest.json`` in the directory (same rules) binds the kernel to its build key -- the sha256 of
  its source, the compiler flags, the compiler's version, the jaxlib version and the host's CPU
  flags -- and to the sha256 of the library file, and both match.

A directory or file that breaks an ownership / permission rule is refused with one message naming it
and what to do; the kernel then falls back to the `jax.lax` path with one warning.  A library whose
hash does not match the manifest is rebuilt.  A new build of a kernel removes that kernel's older
libraries.  Builds are written to a temporary file and renamed into place under a lock file, so
processes building at once never load a half-written library.

Off switch: ``PLDR_JAX_CPU_KERNELS=0`` (`pldr_jax.settings.native_kernels_enabled`).  Without a C++
compiler, with the switch off, or when a build fails, `load` returns a `KernelStatus` whose
``available`` is False and whose ``reason`` says why (one warning per process and reason); callers
then use the plain `jax.lax` path (`pldr_jax.backend` ``decode_attention`` / ``decode_matmul``).
What `load` remembers within a process is keyed by the settings that decide it (the switch, the
directory, the compiler), so a changed setting is seen at the next call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from .. import settings

__all__ = ["ENV_SWITCH", "ENV_DIR", "KERNELS", "MANIFEST", "KernelStatus", "BuildResult", "UnsafeKernelDir",
           "kernel_dir", "enabled", "compiler", "compiler_version", "prepare_dir", "build", "load"]

ENV_SWITCH = settings.CPU_KERNELS_ENV
ENV_DIR = settings.KERNEL_DIR_ENV
MANIFEST = "manifest.json"
_LOCK = ".lock"
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")
_SRC_DIR = Path(__file__).resolve().parent
_COMPILERS = ("c++", "g++", "clang++")

#: kernel name -> (source file, {FFI target name: exported handler symbol})
KERNELS = {"decode_attention": ("decode_attention.cc", {"pldr_decode_attention": "PldrDecodeAttention"}),
           "packed_matmul": ("packed_matmul.cc", {"pldr_packed_matmul": "PldrPackedMatmul"})}


class UnsafeKernelDir(RuntimeError):
    """The build directory or a file in it may have been written by someone else: not loaded."""


@dataclasses.dataclass(frozen=True)
class KernelStatus:
    """Whether a native kernel is registered with XLA:CPU in this process, and if not, why."""
    name: str
    available: bool
    reason: str = ""
    library: str = ""


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """One kernel's library after `build`: built now or reused (``note``: why it was rebuilt)."""
    name: str
    library: Path
    built: bool
    seconds: float = 0.0
    note: str = ""


def enabled(env=None) -> bool:
    """False when ``PLDR_JAX_CPU_KERNELS`` turns the native kernels off."""
    return settings.native_kernels_enabled(env)


def kernel_dir() -> Path:
    """The build directory (`pldr_jax.settings.kernel_dir`)."""
    return settings.kernel_dir()


def compiler() -> str | None:
    """The C++ compiler's full path: ``$CXX``, else the first of c++, g++, clang++ on PATH; None if none."""
    for cc in (settings.cxx(), *_COMPILERS):
        if cc and (path := shutil.which(cc)):
            return path
    return None


_compiler = compiler          # the name the tests patch to simulate a host without a compiler


@functools.lru_cache(maxsize=8)
def compiler_version(cc: str) -> str:
    """``cc --version`` (all of it: it goes into the build key)."""
    return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()


@functools.lru_cache(maxsize=1)
def _host_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build_key(name: str, cc: str) -> dict:
    """What a library is bound to: the sha256 over its source, flags, compiler version, jaxlib
    version and host CPU flags, and those parts (for the manifest)."""
    import jaxlib
    src = (_SRC_DIR / KERNELS[name][0]).read_bytes()
    version = compiler_version(cc)
    parts = [src, " ".join(_FLAGS).encode(), version.encode(), jaxlib.__version__.encode(), _host_flags().encode()]
    return {"key": hashlib.sha256(b"\0".join(parts)).hexdigest(), "source_sha256": hashlib.sha256(src).hexdigest(),
            "flags": list(_FLAGS), "compiler": cc, "compiler_version": version.splitlines()[0] if version else "",
            "jaxlib": jaxlib.__version__}


def _library_name(name: str, key: str) -> str:
    return f"libpldr_{name}_{key[:16]}.so"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_WHAT_TO_DO = f"delete it, or set {ENV_DIR} to a directory of your own"


def _check_owned(path: Path, st: os.stat_result, what: str) -> None:
    """Raise UnsafeKernelDir unless `st` (of `path`) is owned by this user and not group/world-writable."""
    uid = os.getuid()
    if st.st_uid != uid:
        raise UnsafeKernelDir(f"refusing native kernels from {path}: the {what} is owned by uid {st.st_uid}, "
                              f"not by this user (uid {uid}); {_WHAT_TO_DO}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        fix = f"chmod go-w {path}" if what == "directory" else f"delete it ({_WHAT_TO_DO})"
        raise UnsafeKernelDir(f"refusing native kernels from {path}: the {what} is group- or world-writable "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}), so another user could have written it; {fix}")


def _check_file(path: Path, what: str) -> bool:
    """False when `path` does not exist; raises UnsafeKernelDir unless a safe regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeKernelDir(f"refusing native kernels from {path}: the {what} is not a regular file "
                              f"(a link or a special file); {_WHAT_TO_DO}")
    _check_owned(path, st, what)
    return True


def prepare_dir(path: Path | None = None) -> Path:
    """The build directory (default `kernel_dir`), created with mode 0700 when missing; raises
    UnsafeKernelDir when it is not a directory of this user's that only this user can write."""
    d = Path(path) if path is not None else kernel_dir()
    d = d.expanduser().absolute()
    if not d.exists():
        d.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
            os.chmod(d, 0o700)
    st = os.stat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeKernelDir(f"refusing native kernels from {d}: not a directory; {_WHAT_TO_DO}")
    _check_owned(d, st, "directory")
    return d


@contextlib.contextmanager
def _locked(d: Path):
    """An exclusive lock on the build directory (other processes building into it wait)."""
    fd = os.open(d / _LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:      # pragma: no cover - not POSIX
            pass
        yield
    finally:
        os.close(fd)             # closing releases the lock


def _read_manifest(d: Path) -> dict:
    path = d / MANIFEST
    if not _check_file(path, "manifest"):
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}                # unreadable: every kernel is rebuilt and the manifest rewritten
    return data.get("kernels", {}) if isinstance(data, dict) else {}


def _write_manifest(d: Path, kernels: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=MANIFEST + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "kernels": kernels}, f, indent=1, sort_keys=True)
        os.replace(tmp, d / MANIFEST)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(name: str, cc: str, lib: Path) -> None:
    import jax
    fd, tmp = tempfile.mkstemp(prefix=lib.name + ".", suffix=".tmp", dir=lib.parent)
    os.close(fd)
    try:
        cmd = [cc, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SRC_DIR / KERNELS[name][0]), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
        os.chmod(tmp, 0o700)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _prune(d: Path, name: str, keep: str) -> None:
    """Remove kernel `name`'s other libraries (and leftover temporary files) owned by this user."""
    for p in d.glob(f"libpldr_{name}_*"):
        if p.name == keep:
            continue
        with contextlib.suppress(OSError):
            if os.lstat(p).st_uid == os.getuid():
                p.unlink()


def build(name: str, *, cc: str | None = None, out_dir: Path | None = None, force: bool = False,
          announce: bool = False) -> BuildResult:
    """Kernel `name`'s library in the build directory: reused when the manifest binds it to this
    source / flags / compiler / jaxlib / host and its hash matches, else compiled (`force`: always).
    `announce`: say on stderr, in one line, that it compiles and where.  Raises UnsafeKernelDir (a
    directory or file another user could have written), RuntimeError (no compiler, a failed build)."""
    if name not in KERNELS:
        raise ValueError(f"unknown native kernel {name!r}; known: {sorted(KERNELS)}")
    cc = cc or compiler()
    if cc is None:
        raise RuntimeError(f"no C++ compiler ($CXX, {', '.join(_COMPILERS)}) on PATH")
    d = prepare_dir(out_dir)
    info = _build_key(name, cc)
    lib = d / _library_name(name, info["key"])
    with _locked(d):
        manifest = _read_manifest(d)
        entry = manifest.get(name, {})
        note = ""
        if _check_file(lib, "library") and not force and entry.get("key") == info["key"] \
                and entry.get("library") == lib.name:
            if _sha256(lib) == entry.get("library_sha256"):
                return BuildResult(name, lib, built=False)
            note = "its hash did not match the manifest"
            print(f"pldr_jax: {lib} does not match the sha256 in {d / MANIFEST}; rebuilding it",
                  file=sys.stderr, flush=True)
        if announce:
            print(f"pldr_jax: building native CPU kernel {name!r} into {d} with {cc} (once per source, compiler "
                  f"and host; `pldr-jax kernels build` does it ahead of time)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        _compile(name, cc, lib)
        seconds = time.perf_counter() - t0
        manifest[name] = {**info, "library": lib.name, "library_sha256": _sha256(lib),
                          "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_manifest(d, manifest)
        _prune(d, name, lib.name)
    return BuildResult(name, lib, built=True, seconds=seconds, note=note)


_lock = threading.Lock()
_registered: dict[str, KernelStatus] = {}       # registered with XLA in this process (cannot be undone)
_failed: dict[tuple, KernelStatus] = {}         # (name, directory, compiler) -> why it is unavailable
_warned: set[str] = set()


def _unavailable(name: str, reason: str) -> KernelStatus:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"pldr_jax native CPU kernel {name!r} unavailable, using the jax.lax path instead: {reason}",
                      stacklevel=3)
    return KernelStatus(name, False, reason)


def load(name: str) -> KernelStatus:
    """Build if needed (`build`, announced), verify and register kernel `name` with XLA:CPU (once per
    process).  Never raises for a failure: it is a status with its reason, warned once.  The off
    switch stops a build and a registration; a kernel registered before it was turned off stays
    usable (`pldr_jax.backend` no longer chooses it)."""
    if name not in KERNELS:
        raise ValueError(f"unknown native kernel {name!r}; known: {sorted(KERNELS)}")
    with _lock:
        if name in _registered:      # usable (e.g. by weights packed for it) even if switched off since
            return _registered[name]
        if not enabled():
            return KernelStatus(name, False, f"turned off by {ENV_SWITCH}")
        cc = _compiler()
        key = (name, str(kernel_dir()), cc)
        if key in _failed:
            return _failed[key]
        if cc is None:
            status = _unavailable(name, f"no C++ compiler ($CXX, {', '.join(_COMPILERS)}) on PATH")
        else:
            try:
                import ctypes

                import jax
                lib = build(name, cc=cc, announce=True).library
                dll = ctypes.cdll.LoadLibrary(str(lib))
                for target, symbol in KERNELS[name][1].items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(dll, symbol)), platform="cpu")
                _registered[name] = status = KernelStatus(name, True, library=str(lib))
                return status
            except UnsafeKernelDir as e:
                status = _unavailable(name, str(e))
            except Exception as e:   # noqa: BLE001 -- any build / load failure: fall back, say why
                status = _unavailable(name, f"build or load failed: {e}")
        _failed[key] = status
        return status
