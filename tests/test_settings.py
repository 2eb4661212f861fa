"""`pldr_jax.settings`: the one module that reads the environment, and what it maps it to."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pldr_jax
from pldr_jax import backend, compile_cache, settings

PKG = Path(pldr_jax.__file__).resolve().parent
_ENV_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def _env_reads(tree: ast.AST) -> list[int]:
    """Line numbers where a module touches the process environment: ``os.environ`` / ``os.getenv``
    (also through ``import os as x``) or ``from os import environ / getenv``."""
    os_names = {"os"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names |= {a.asname or a.name for a in node.names if a.name == "os"}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os" and any(a.name in _ENV_NAMES for a in node.names):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Attribute) and node.attr in _ENV_NAMES and isinstance(node.value, ast.Name)
              and node.value.id in os_names):
            lines.append(node.lineno)
    return lines


def test_the_environment_is_read_only_in_settings_and_cli_modules():
    offenders, readers = [], []
    for path in sorted(PKG.rglob("*.py")):
        lines = _env_reads(ast.parse(path.read_text(), str(path)))
        if not lines:
            continue
        rel = path.relative_to(PKG.parent)
        if path.stem == "settings" or "cli" in path.stem:
            readers.append(str(rel))
        else:
            offenders.append(f"{rel}:{lines}")
    assert not offenders, f"read the environment outside pldr_jax/settings.py and the cli modules: {offenders}"
    assert "pldr_jax/settings.py" in readers


def test_the_scan_finds_every_form_of_an_environment_read():
    for src in ("import os\nos.environ['X']", "import os\nos.getenv('X')", "import os as o\no.environ.get('X')",
                "from os import environ", "from os import getenv as g"):
        assert _env_reads(ast.parse(src)), src
    assert not _env_reads(ast.parse("import os\nos.path.join('a')\nenviron = {}"))


def test_backend_options_from_env():
    assert settings.backend_options_from_env("cpu", {}) == {}
    assert settings.backend_options_from_env("cpu", {"PLDR_JAX_KERNELS": " XLA "}) == {"kernels": "xla"}
    off = {"PLDR_JAX_CPU_KERNELS": "off"}
    assert settings.backend_options_from_env("cpu", off) == {"decode_attention": "xla", "decode_matmul": "xla",
                                                             "bf16_min_batch": 8}
    assert settings.backend_options_from_env("tpu", off) == {"decode_attention": "xla", "decode_matmul": "xla"}
    assert settings.backend_options_from_env(None, {**off, "PLDR_JAX_KERNELS": "cpu"}) == {
        "kernels": "cpu", "decode_attention": "xla", "decode_matmul": "xla"}
    for word in ("1", "on", "yes", ""):
        assert settings.native_kernels_enabled({"PLDR_JAX_CPU_KERNELS": word})
    with pytest.raises(ValueError, match="PLDR_JAX_KERNELS='fast': expected one of"):
        settings.backend_options_from_env("cpu", {"PLDR_JAX_KERNELS": "fast"})


def test_the_off_switch_matches_what_backend_choices_does(monkeypatch):
    """The mapping gives exactly the fields `backend.choices` changes when the switch is off."""
    monkeypatch.delenv(settings.CPU_KERNELS_ENV, raising=False)
    monkeypatch.delenv(settings.KERNELS_ENV, raising=False)
    on = backend.choices("cpu")
    monkeypatch.setenv(settings.CPU_KERNELS_ENV, "0")
    off = backend.choices("cpu")
    changed = {f: getattr(off, f) for f in on.__dataclass_fields__ if getattr(on, f) != getattr(off, f)}
    assert changed == settings.backend_options_from_env("cpu")
    monkeypatch.setenv(settings.KERNELS_ENV, "xla")
    assert backend.choices("cpu").kernels == "xla" == settings.backend_options_from_env("cpu")["kernels"]


def test_directories(monkeypatch, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert settings.cache_home(env) == tmp_path
    assert settings.kernel_dir(env) == tmp_path / "pldr_jax" / "kernels"
    assert settings.kernel_dir({**env, "PLDR_JAX_KERNEL_DIR": "~/k"}) == Path("~/k").expanduser()
    assert settings.cache_home({}) == Path("~").expanduser() / ".cache"
    assert settings.cxx({"CXX": " clang++ "}) == "clang++" and settings.cxx({"CXX": ""}) is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(settings.COMPILE_CACHE_ENV, raising=False)
    assert compile_cache.resolve_cache_dir() == tmp_path / "pldr_jax" / "jax_cache"
    monkeypatch.setenv(settings.COMPILE_CACHE_ENV, "Off")
    assert compile_cache.resolve_cache_dir() is None
    monkeypatch.setenv(settings.COMPILE_CACHE_ENV, str(tmp_path / "cc"))
    assert compile_cache.resolve_cache_dir() == tmp_path / "cc"


def test_every_variable_is_documented_in_the_readme():
    readme = (PKG.parent / "README.md").read_text()
    missing = [v for v in settings.VARIABLES if f"`{v}`" not in readme]
    assert not missing, f"README.md does not document {missing}"
