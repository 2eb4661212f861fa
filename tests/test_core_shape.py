"""The shape of the package (issue 26): a core that imports no execution machinery, decoding and NNX
that import nothing from training, a decoder layer of at most 8 parameters, and a `linear` that
dispatches weight layouts by type, not by sniffing dict keys."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pldr_jax
from pldr_jax import layer
from pldr_jax.ops import layers as ops_layers

PKG = Path(pldr_jax.__file__).parent
CORE = ("config", "params", "ops", "layer", "model")
EXECUTION = ("kernels", "decode", "train", "io")


def _module(p: Path) -> list[str]:
    parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(p: Path):
    """Every module (and imported name) `p` imports, absolute ("pldr_jax.x.y"), at any depth."""
    me = _module(p)
    base = me if p.name == "__init__.py" else me[:-1]
    for node in ast.walk(ast.parse(p.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = base[: len(base) - (node.level - 1)]
                full = ".".join(up + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            yield full
            yield from (f"{full}.{a.name}" for a in node.names)


def _offenders(prefixes, banned):
    out = []
    for p in sorted(PKG.rglob("*.py")):
        m = ".".join(_module(p))
        if not any(m == f"pldr_jax.{c}" or m.startswith(f"pldr_jax.{c}.") for c in prefixes):
            continue
        for imp in set(_imports(p)):
            if any(imp == f"pldr_jax.{b}" or imp.startswith(f"pldr_jax.{b}.") for b in banned):
                out.append(f"{m} imports {imp}")
    return sorted(out)


def test_core_imports_no_execution_machinery():
    assert _offenders(CORE, EXECUTION) == []


def test_decode_and_nnx_import_nothing_from_train():
    assert _offenders(("decode", "nnx"), ("train",)) == []


def test_the_checks_can_fail():
    """The import walk sees relative imports at any depth (the layer's own import of ops)."""
    assert "pldr_jax.ops.attention.plga_attention" in set(_imports(PKG / "layer.py"))
    assert _offenders(("layer",), ("ops",)) != []


def test_decoder_layer_has_at_most_8_parameters():
    assert len(inspect.signature(layer.decoder_layer).parameters) <= 8


def test_linear_does_not_sniff_weight_keys():
    """`linear` reads only the stored layout's own keys; other layouts are `LinearLayout` values."""
    src = inspect.getsource(ops_layers.linear)
    tree = ast.parse(src)
    keys = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value.startswith("kernel")}
    assert keys <= {"kernel"}, keys
    membership = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)
                  and any(isinstance(op, (ast.In, ast.NotIn)) for op in n.ops)]
    assert not membership, "linear tests dict membership"
