"""`train.host_memory`: the huge-page malloc environment, the console re-exec, and its effect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pldr_jax.train.host_memory import HUGE_PAGE_TUNABLE, huge_page_env, huge_pages_active

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")


def test_huge_page_env_adds_the_tunable_once_and_keeps_others():
    env = huge_page_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["PATH"] == "/bin"
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGE_TUNABLE}"
    assert huge_pages_active(env) and not huge_pages_active({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert huge_page_env(env) == env                                  # idempotent
    assert huge_page_env({})["GLIBC_TUNABLES"] == HUGE_PAGE_TUNABLE
    assert "GLIBC_TUNABLES" not in huge_page_env({"PLDR_JAX_NO_HUGE_PAGES": "1"})


@LINUX
def test_console_reexec_sets_the_tunable_unless_opted_out():
    code = ("from pldr_jax.train.host_memory import reexec_with_huge_pages as r; "
            "r(['-c', 'import os; print(\"child\", os.environ.get(\"GLIBC_TUNABLES\"))']); print('not re-executed')")
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PLDR_JAX_NO_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["child", HUGE_PAGE_TUNABLE], out
    out = subprocess.run([sys.executable, "-c", code], env={**base, "PLDR_JAX_NO_HUGE_PAGES": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "not re-executed", out


@LINUX
def test_huge_pages_cut_the_page_faults_of_fresh_buffers():
    """A jitted call whose 64 MiB output is allocated afresh each time: glibc's default maps 16384
    pages of 4 KiB per call, the tunable a few dozen huge pages."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are disabled on this machine")
    code = r"""
import resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0)
x = jnp.ones(16 * 1024 * 1024, jnp.float32)
f(x).block_until_ready(); f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    faults = {}
    for name, env in (("default", plain), ("huge", huge_page_env(plain))):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        faults[name] = int(r.stdout.split()[-1])
    if faults["default"] < 8000:
        pytest.skip(f"glibc's default did not fault per call here: {faults}")
    assert faults["huge"] <= faults["default"] // 10, faults
