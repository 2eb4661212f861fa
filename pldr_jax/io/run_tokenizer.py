"""The tokenizer that belongs to a model: one discovery rule for every command and class.

`resolve_tokenizer(model, tokenizer)` is what `pldr-jax generate`, `pldr-jax eval mc / perplexity /
harness` and the lm-eval adapter (`pldr_jax.eval.harness.PLDRLM`) use, so a run directory works
the same everywhere without ``--tokenizer``:

1. ``tokenizer`` given (a `pldr_jax.data.Tokenizer`, any object with ``encode``/``decode``, or a
   path to a sentencepiece ``.model`` / a folder holding exactly one): that one (the override; a
   warning names both files when a path differs from the model's own tokenizer);
2. ``model`` a Hugging Face pldrllm folder: its ``tokenizer.model``; a ``pldr-jax train`` run (its
   workdir, ``checkpoints/`` or a step folder): the workdir's own ``tokenizer.model`` (so a copied
   or moved run uses its own), else the tokenizer its run config recorded (relative to the run
   folder) (`pldr_jax.io.loading.source_tokenizer`);
3. any other existing path: ``tokenizer.model`` beside it, else the only ``*.model`` beside it
   (a folder: inside it; a file: in its folder);
4. nothing found (``preset:...`` specs, no candidate): None -- token-id inputs still work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["find_tokenizer_file", "resolve_tokenizer"]


def find_tokenizer_file(model: str | os.PathLike | None) -> Path | None:
    """The sentencepiece ``.model`` file that belongs to ``model`` (rules 2-3 above), or None."""
    if model is None or (isinstance(model, str) and model.startswith("preset:")):
        return None
    path = Path(model)
    if not path.exists():
        return None
    from .loading import detect_format, source_tokenizer
    try:
        fmt = detect_format(path)
    except ValueError:
        fmt = None
    if fmt in ("hf", "orbax"):
        found = source_tokenizer(path)
        if found is not None:
            return Path(found)
        if fmt == "orbax" and path.name.isdigit():  # a step folder: <workdir>/checkpoints/<step>
            path = path.parent
    folder = path if path.is_dir() else path.parent
    for cand in (folder, folder.parent) if folder.name == "checkpoints" else (folder,):
        if (cand / "tokenizer.model").is_file():
            return cand / "tokenizer.model"
        models = sorted(cand.glob("*.model"))
        if len(models) == 1:
            return models[0]
    return None


def _same_file_contents(a: Path, b: Path) -> bool:
    try:
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def resolve_tokenizer(model: str | os.PathLike | None = None, tokenizer=None, *, warn=_warn):
    """The tokenizer to use with ``model``: ``tokenizer`` if given (object or path), else the one
    found by `find_tokenizer_file` (loaded as a `pldr_jax.data.Tokenizer`), else None.

    A ``tokenizer`` path whose file differs from the model's own tokenizer is still used (an
    explicit choice wins), after ``warn`` (default: one ``warning:`` line on stderr) names both."""
    from ..data.tokenizer import Tokenizer
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
        own = find_tokenizer_file(model)
        given = Path(getattr(tok, "path", None) or tokenizer)
        if own is not None and given.is_file() and not _same_file_contents(own, given):
            warn(f"--tokenizer {given} differs from the model's own tokenizer {own}; using {given} "
                 "(leave --tokenizer out to use the model's own)")
        return tok
    found = find_tokenizer_file(model)
    return None if found is None else Tokenizer.load(found)
