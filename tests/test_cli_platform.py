"""`pldr-jax` on a machine without accelerators prints nothing about them, whatever plugins are
installed (the test extra installs libtpu), and keeps them where there is one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _has_accelerator() -> bool:
    from pldr_jax import cli
    import glob
    return any(glob.glob(p) for p in cli._ACCELERATOR_DEVICES) or cli._pci_tpu_chips() > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu installed (the test extra)")
def test_cpu_only_machine_with_libtpu_prints_no_tpu_lines(tmp_path):
    if _has_accelerator():
        pytest.skip("this machine has an accelerator")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "pldr_jax.cli", "generate", "preset:tiny", "--ids", "5 6 7",
                        "--max-new-tokens", "2", "--no-compile-cache"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    noisy = [ln for ln in r.stderr.splitlines() if "tpu" in ln.lower() or "cuinit" in ln.lower()]
    assert noisy == [], "\n".join(noisy[:10])
    assert "ids:" in r.stdout


def test_accelerator_or_user_choice_is_left_alone(monkeypatch, tmp_path):
    from pldr_jax import cli
    assert cli.use_cpu_without_accelerator({"JAX_PLATFORMS": "cuda"}) is False
    assert cli.use_cpu_without_accelerator({"TPU_ACCELERATOR_TYPE": "v5litepod-4"}) is False
    dev = tmp_path / "accel0"
    dev.write_text("")
    monkeypatch.setattr(cli, "_ACCELERATOR_DEVICES", (str(tmp_path / "accel*"),))
    env: dict = {}
    assert cli.use_cpu_without_accelerator(env) is False and env == {}
    monkeypatch.setattr(cli, "_ACCELERATOR_DEVICES", ())
    monkeypatch.setattr(cli, "_pci_tpu_chips", lambda: 4)
    assert cli.use_cpu_without_accelerator(env) is False and env == {}
    monkeypatch.setattr(cli, "_pci_tpu_chips", lambda: 0)
    import jax
    jax.devices()  # this process has started JAX: too late to choose, nothing changed
    assert cli.use_cpu_without_accelerator(env) is False and env == {}
