"""A run directory is self-contained and relocatable; an older one still loads and resumes.

tests/data/old_run is a `pldr-jax train` run directory written by commit 586d482 of this repository
(the pipeline fingerprint before the global-batch data positions, absolute paths in its run config):

    git worktree add /work/wt/old28 586d482 && cd /work/wt/old28
    JAX_PLATFORMS=cpu python -m pldr_jax.cli train --preset tiny --seq-len 32 --batch-size 4 --steps 4 \\
        --save-every 0 --eval-every 0 --eval-batches 1 --log-every 1 --keep 1 --workdir /tmp/runs28/old_run \\
        --no-progress --no-plot --sync-checkpoints          # then its tensorboard/ folder removed

Its run config records its tokenizer as ``/tmp/runs28/old_run/tokenizer.model``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

OLD_RUN = Path(__file__).parent / "data" / "old_run"
OLD_TOKENIZER = "/tmp/runs28/old_run/tokenizer.model"


def _place_run(dest: Path) -> Path:
    """A copy of the old run at `dest` whose configs record its tokenizer by `dest`'s absolute path
    (what a run written at `dest` by an older version holds)."""
    shutil.copytree(OLD_RUN, dest)
    for f in [dest / "run_config.json", *dest.glob("checkpoints/*/config/metadata")]:
        f.write_text(f.read_text().replace(OLD_TOKENIZER, str(dest / "tokenizer.model")))
    return dest


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A tokenizer that encodes differently from the run's own."""
    from pldr_jax.data import Tokenizer, default_corpus_documents
    d = tmp_path_factory.mktemp("othertok")
    return Tokenizer.train(default_corpus_documents()[:40], d / "other", 150)


def _encodes_like(tok, ref, text="The for statement returns a value"):
    return list(tok.encode(text)) == list(ref.encode(text))


def test_copied_run_uses_its_own_tokenizer(tmp_path, other_tokenizer):
    from pldr_jax.data import Tokenizer
    from pldr_jax.io.run_tokenizer import find_tokenizer_file, resolve_tokenizer
    orig = _place_run(tmp_path / "orig")
    own = Tokenizer.load(orig / "tokenizer.model")
    assert not _encodes_like(own, other_tokenizer)  # the test can fail
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    shutil.copyfile(other_tokenizer.path, copy / "tokenizer.model")  # the copy's tokenizer replaced
    for where in (copy, copy / "checkpoints", copy / "checkpoints" / "4"):
        assert find_tokenizer_file(where) == copy / "tokenizer.model", where
    assert _encodes_like(resolve_tokenizer(copy), other_tokenizer)
    assert _encodes_like(resolve_tokenizer(orig), own)


def test_moved_run_with_another_tokenizer_in_its_old_place(tmp_path, other_tokenizer):
    from pldr_jax.data import Tokenizer
    from pldr_jax.io.run_tokenizer import resolve_tokenizer
    orig = _place_run(tmp_path / "orig")
    own = Tokenizer.load(orig / "tokenizer.model")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(orig, moved)
    orig.mkdir()  # a new run took the old place, with another tokenizer
    shutil.copyfile(other_tokenizer.path, orig / "tokenizer.model")
    assert _encodes_like(resolve_tokenizer(moved), own)
    (moved / "tokenizer.model").unlink()  # no copy of its own: what its config recorded is all there is
    assert _encodes_like(resolve_tokenizer(moved), other_tokenizer)


def test_explicit_tokenizer_overrides_with_a_warning(tmp_path, other_tokenizer):
    from pldr_jax.io.run_tokenizer import resolve_tokenizer
    run = _place_run(tmp_path / "run")
    said = []
    tok = resolve_tokenizer(run, other_tokenizer.path, warn=said.append)
    assert _encodes_like(tok, other_tokenizer)
    assert len(said) == 1 and str(run / "tokenizer.model") in said[0] and other_tokenizer.path in said[0]
    said.clear()
    same = tmp_path / "same.model"
    shutil.copyfile(run / "tokenizer.model", same)
    resolve_tokenizer(run, same, warn=said.append)
    assert said == []
