"""Data mixtures (`pldr_jax.data.mixture`): grain's weighted mixing, deterministic, exact on resume."""

from __future__ import annotations

import numpy as np
import pytest

from pldr_jax.data.mixture import MixtureDataset, make_mixture, parse_mixture, source_names
from pldr_jax.data.pipeline import TokenizedCorpus

L = 8


def _rows(lo, n, pad_every=0):
    r = (np.arange(n * (L + 1)).reshape(n, L + 1) % 50 + lo).astype(np.int32)
    if pad_every:
        r[::pad_every, -3:] = 0
    return r


def _mix(seed=0, shard_index=0, shard_count=1, batch=4, weights=(3.0, 1.0)):
    return MixtureDataset([_rows(100, 37, pad_every=5), _rows(200, 11)], ["a", "b"], ["a", "b"], list(weights),
                          seq_len=L, batch_size=batch, seed=seed, shard_index=shard_index, shard_count=shard_count)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_parse_and_names():
    assert parse_mixture(["builtin@0.7", "jsonl:x.jsonl:text@0.3", "tokens:D"]) == (
        ("builtin", 0.7), ("jsonl:x.jsonl:text", 0.3), ("tokens:D", 1.0))
    for bad in ("builtin@x", "builtin@0", "stream:hf:foo@1"):
        with pytest.raises(ValueError):
            parse_mixture([bad])
    assert source_names(["builtin", "jsonl:data/web.jsonl:text", "tokens:prep/books/", "hf:org/wiki:text",
                         "builtin"]) == ["0_builtin", "web", "books", "wiki", "4_builtin"]


def test_weights_determinism_and_per_source_tokens():
    it = _mix().iterator()
    batches = _take(it, 20)
    first = np.concatenate([b["inputs"][:, 0] for b in batches])
    from_a = np.mean(first < 200)
    assert from_a == pytest.approx(0.75, abs=0.02)  # 3:1 weights
    again = _take(_mix().iterator(), 20)
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(batches, again))
    other = _take(_mix(seed=1).iterator(), 20)
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(batches, other))
    # per-source non-pad target counts
    tg = np.concatenate([b["targets"] for b in batches])
    src_a = tg[:, 0] < 200
    assert it.source_tokens == {"a": int(np.count_nonzero(tg[src_a])), "b": int(np.count_nonzero(tg[~src_a]))}
    assert set(batches[0]) == {"inputs", "targets"}


def test_resume_is_exact_and_shards_make_the_global_batch():
    it = _mix().iterator()
    _take(it, 7)
    state = it.get_state()
    rest = _take(it, 5)
    it2 = _mix().iterator()
    it2.set_state(state)
    assert it2.source_tokens == state["source_tokens"]
    for x, y in zip(rest, _take(it2, 5)):
        assert np.array_equal(x["inputs"], y["inputs"])
    assert it2.source_tokens == it.source_tokens
    with pytest.raises(ValueError, match="different data mixture"):
        _mix(weights=(1.0, 1.0)).iterator().set_state(state)
    # two processes' halves = the one-process global batch
    whole = _take(_mix(batch=4).iterator(), 6)
    halves = [_take(_mix(batch=2, shard_index=i, shard_count=2).iterator(), 6) for i in (0, 1)]
    for k in range(6):
        assert np.array_equal(whole[k]["inputs"], np.concatenate([halves[0][k]["inputs"], halves[1][k]["inputs"]]))


def test_make_mixture_with_validation():
    rng = np.random.default_rng(0)
    corpora = []
    for lo in (3, 30):
        docs = [rng.integers(lo, lo + 20, int(rng.integers(5, 30))).astype(np.int32) for _ in range(40)]
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
        corpora.append(TokenizedCorpus(np.concatenate(docs), offsets))
    train, val = make_mixture(None, [(corpora[0], 1.0), (corpora[1], 1.0)], seq_len=L, batch_size=2,
                              validation_fraction=0.2, names=["low", "high"])
    b = next(iter(train))
    assert b["inputs"].shape == (2, L)
    vb = list(val.iterator())
    assert 0 < len(vb) and all(v["inputs"].shape == (2, L) for v in vb)


def test_cli_flags_make_the_train_config(capsys):
    """Repeated --data SPEC@WEIGHT and the operations flags, through `pldr-jax train --print-config`."""
    import json
    from pldr_jax.cli import main
    assert main(["train", "--preset", "tiny", "--data", "builtin@3", "--data", "jsonl:x.jsonl:text@1",
                 "--max-runtime", "1h30m", "--profile-steps", "2:3", "--dynamics-every", "5", "--eval-tasks",
                 "arc_easy,piqa", "--eval-tasks", "t.yaml", "--no-tensorboard", "--print-config"]) == 0
    t = json.loads(capsys.readouterr().out)["train"]
    assert t["data_mixture"] == [["builtin", 3.0], ["jsonl:x.jsonl:text", 1.0]]
    assert t["max_runtime_s"] == 5400.0 and t["profile_steps"] == [2, 3] and t["dynamics_every"] == 5
    assert t["eval_tasks"] == ["arc_easy", "piqa", "t.yaml"] and t["tensorboard"] is False
    assert main(["train", "--preset", "tiny", "--data", "builtin", "--print-config"]) == 0
    t = json.loads(capsys.readouterr().out)["train"]
    assert t["data"] == "builtin" and t["data_mixture"] == []
    assert main(["train", "--preset", "tiny", "--data", "builtin@x", "--print-config"]) == 2
    assert "the weight after '@' must be a number" in capsys.readouterr().err
