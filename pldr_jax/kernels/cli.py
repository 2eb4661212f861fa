"""`pldr-jax kernels build`: build (or reuse) the native XLA:CPU kernels ahead of time, visibly.

    pldr-jax kernels build              # prints the directory, the compiler, and per kernel built / reused
    pldr-jax kernels build --force      # compile again even when the manifest matches

The same rules as a first-use build (`pldr_jax.kernels.build`): a private build directory, a
manifest binding each library to its source, flags, compiler and jaxlib, old builds removed.  Exit
status 0 when every kernel is built or reused, or when there is nothing to build (the switch off, no
C++ compiler: pldr_jax then uses the `jax.lax` path); 1 when a build failed; 2 when the directory
or a file in it is refused (owner / permissions).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

__all__ = ["add_parser", "run", "build_and_report"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("kernels", help="the native XLA:CPU kernels (C++): build them ahead of time",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="kernels_command", required=True)
    b = sub.add_parser("build", help="build or reuse every native kernel; print where and with which compiler")
    b.add_argument("--force", action="store_true", help="compile again even when the manifest matches")
    b.add_argument("--dir", type=Path, default=None,
                   help="build directory (default: $PLDR_JAX_KERNEL_DIR, else $XDG_CACHE_HOME/pldr_jax/kernels)")
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return build_and_report(force=args.force, out_dir=args.dir)


def build_and_report(*, force: bool = False, out_dir: Path | None = None, platform: str = "cpu",
                     stream=None) -> int:
    """Build or reuse every kernel into `out_dir` (default: the settings' directory), printing the
    directory, the compiler and one line per kernel to `stream` (default stdout); returns the exit
    status (see the module docstring).  `platform` other than "cpu": nothing to build (the kernels
    are XLA:CPU's), one line says so."""
    from . import build
    out = stream or sys.stdout
    say = lambda s: print(s, file=out, flush=True)   # noqa: E731
    if platform != "cpu":
        say(f"native CPU kernels: not needed on {platform}")
        return 0
    if not build.enabled():
        say(f"native CPU kernels: off ({build.ENV_SWITCH}); nothing to build, pldr_jax uses the jax.lax path")
        return 0
    cc = build.compiler()
    if cc is None:
        say("native CPU kernels: no C++ compiler ($CXX, c++, g++, clang++) on PATH; nothing built, "
            "pldr_jax uses the jax.lax path")
        return 0
    try:
        d = build.prepare_dir(out_dir)
    except build.UnsafeKernelDir as e:
        print(f"pldr-jax kernels build: error: {e}", file=sys.stderr)
        return 2
    mode = stat.S_IMODE(os.stat(d).st_mode)
    say(f"native CPU kernels: {d} (mode {mode:04o}, manifest {build.MANIFEST})")
    version = build.compiler_version(cc).splitlines()
    say(f"compiler: {cc} ({version[0] if version else 'version unknown'})")
    status = 0
    for name in build.KERNELS:
        try:
            r = build.build(name, cc=cc, out_dir=d, force=force)
        except build.UnsafeKernelDir as e:
            print(f"pldr-jax kernels build: error: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            print(f"pldr-jax kernels build: {name}: build failed: {e}", file=sys.stderr)
            status = 1
            continue
        what = f"built ({r.seconds:.1f} s)" if r.built else "reused"
        say(f"  {name:18s}{what:16s}{r.library.name}" + (f"  (rebuilt: {r.note})" if r.note else ""))
    return status
