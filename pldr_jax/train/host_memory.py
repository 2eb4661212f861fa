"""Host allocator setting for CPU runs: back large buffers with transparent huge pages.

XLA:CPU allocates a step's temporaries and large outputs afresh on every call; glibc maps such
blocks with `mmap` and unmaps them on free, so every step page-faults its whole working set back in,
4 KiB at a time.  With glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) malloc asks for
transparent huge pages on those maps, and the faults almost vanish (measured, with the `mallopt`
alternative that fragmented the heap: experiments/README.md "Training step, v51 110M").

glibc reads tunables once, at process start, so the setting is an environment variable:
`pldr-jax` re-executes itself once with it (`reexec_with_huge_pages`, skipped when the variable
``PLDR_JAX_NO_HUGE_PAGES=1`` is set, off Linux, or when the process will not run XLA:CPU:
`pldr_jax.backend.huge_pages_wanted`), and `huge_page_env` gives the environment for
subprocesses (the benchmarks use it).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

from .. import settings

__all__ = ["HUGE_PAGE_TUNABLE", "huge_page_env", "huge_pages_active", "reexec_with_huge_pages"]

HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
_OPT_OUT = settings.NO_HUGE_PAGES_ENV


def huge_pages_active(env: Mapping[str, str] | None = None) -> bool:
    """True when `env` (default: this process's) carries the huge-page tunable."""
    env = settings.environment() if env is None else env
    return HUGE_PAGE_TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def huge_page_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: this process's) with the huge-page tunable added to GLIBC_TUNABLES
    (other tunables kept); unchanged when present or opted out."""
    out = dict(settings.environment() if env is None else env)
    if huge_pages_active(out) or settings.huge_pages_opted_out(out):
        return out
    out["GLIBC_TUNABLES"] = ":".join(t for t in (out.get("GLIBC_TUNABLES", ""), HUGE_PAGE_TUNABLE) if t)
    return out


def reexec_with_huge_pages(argv: Sequence[str]) -> None:
    """Replace this process by ``python <argv...>`` with the huge-page tunable set, unless it is set
    already, opted out (PLDR_JAX_NO_HUGE_PAGES=1) or not on Linux.  Returns only when it does not
    re-execute.  Call it first thing in a console entry point, never in library code.  A process
    that will run on an accelerator (`backend.huge_pages_wanted` is False) is not re-executed."""
    from ..backend import huge_pages_wanted
    if huge_pages_active() or settings.huge_pages_opted_out() or not huge_pages_wanted():
        return
    env = huge_page_env()
    env[_OPT_OUT] = "1"            # never twice, even if glibc drops the tunable
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
