"""Prepared token directories (`pldr-jax data prepare`, ``tokens:DIR``) and streaming raw text.

* prepare -> read gives exactly the in-memory pipeline's batches (pack / pad / nopad, same seed);
* 2 processes (shard_index/shard_count) see disjoint rows covering every row once per epoch, and the
  same global batches as 1 process; a saved position continues at exactly the next batch, also on
  another process count;
* refusals before any training work: another tokenizer, a shard missing or truncated, an unfinished
  preparation, a vocabulary that does not fit the dtype;
* an interrupted prepare resumes (skipping the finished documents) to the same shards;
* streaming: the checkpointed position restores exactly, per-process shares are disjoint, a state
  is refused on another process;
* the training loop on ``tokens:DIR`` and ``stream:SPEC``: 2N steps straight == N + resume + N.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pldr_jax.data import (PreparedDataError, PreparedTokens, StreamingDataset, Tokenizer, default_corpus_documents,
                           make_dataset, prepare_tokens)
from pldr_jax.data.shards import INDEX, PROGRESS, token_dtype

QUIET = dict(progress=False, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def docs():
    return default_corpus_documents()[:80]


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory):
    return Tokenizer.train(docs, tmp_path_factory.mktemp("tok") / "tok", 128)


@pytest.fixture(scope="module")
def prepared(docs, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "d"
    return prepare_tokens(docs, tok, out, shard_tokens=5000, chunk_chars=20_000, **QUIET)


@pytest.fixture(scope="module")
def numbered():
    """Documents whose rows (and document prefixes) are all different."""
    return [" ".join(f"n{i * 60 + j}" for j in range(60)) for i in range(30)]


def _rows(batch):
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], 1)


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x["inputs"], y["inputs"]) and
                                    np.array_equal(x["targets"], y["targets"]) for x, y in zip(a, b))


def test_prepare_then_read_equals_the_in_memory_pipeline(prepared, docs, tok):
    st = prepared
    assert st.num_shards > 3 and st.dtype == np.uint16 and st.num_documents == len(docs)
    assert (st.path / "tokenizer.model").read_bytes() == tok.model_proto
    for d in (0, 17, len(docs) - 1):
        assert st.document(d).tolist() == tok.encode(docs[d], add_eos=True)
    for mode in ("pack", "pad", "nopad"):
        kw = dict(mode=mode, seed=3, split="all", num_epochs=2)
        mem = make_dataset(tok, docs, 24, 4, **kw)
        disk = make_dataset(None, f"tokens:{st.path}", 24, 4, **kw)
        assert disk.tokens_per_epoch == mem.tokens_per_epoch and len(disk) == len(mem)
        assert _same(list(mem), list(disk)), mode
    # the validation split of a prepared directory is its last documents (contiguous)
    tr = make_dataset(tok, st, 24, 4, validation_fraction=0.1, num_epochs=1, shuffle=False)
    va = make_dataset(tok, st, 24, 4, split="validation", validation_fraction=0.1)
    tail = np.concatenate([st.document(d) for d in range(len(docs) - 8, len(docs))])
    got = np.concatenate([_rows(b) for b in va]).reshape(-1)
    np.testing.assert_array_equal(got[:len(tail) // 25 * 25], tail[:len(tail) // 25 * 25])
    head = np.concatenate([_rows(b) for b in tr]).reshape(-1)
    np.testing.assert_array_equal(head, st.read(0, len(head)))  # train: the documents before the tail
    assert len(head) <= st.document_bounds(len(docs) - 8)[0]


def test_two_processes_disjoint_rows_covering_every_row_once_per_epoch(numbered, tok, tmp_path):
    st = prepare_tokens(numbered, tok, tmp_path / "n", shard_tokens=2000, **QUIET)
    one = list(make_dataset(None, st, 16, 6, seed=5, split="all", num_epochs=1))
    halves = [list(make_dataset(None, st, 16, 3, seed=5, split="all", num_epochs=1, shard_index=i, shard_count=2))
              for i in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(one) > 10
    for k, g in enumerate(one):  # the same global batches, whatever the process count
        np.testing.assert_array_equal(np.concatenate([_rows(halves[0][k]), _rows(halves[1][k])]), _rows(g))
    # one epoch with the partial last global batch kept (pad rows): every row exactly once
    n_rows = st.num_tokens // 17
    shards = [list(make_dataset(None, st, 16, 3, seed=5, split="all", num_epochs=1, shard_index=i, shard_count=2,
                                drop_remainder=False)) for i in (0, 1)]
    seen = [Counter(tuple(r) for b in sh for r in _rows(b).tolist() if any(r)) for sh in shards]
    all_rows = Counter(tuple(st.read(i * 17, (i + 1) * 17).tolist()) for i in range(n_rows))
    assert max(all_rows.values()) == 1 and n_rows > 100
    assert not set(seen[0]) & set(seen[1])  # disjoint
    assert seen[0] + seen[1] == all_rows  # together: every row, once


def test_resume_continues_at_exactly_the_next_batch(prepared):
    st = prepared
    kw = dict(seed=7, split="all")
    it = iter(make_dataset(None, st, 16, 4, **kw))
    n_epoch = make_dataset(None, st, 16, 4, **kw).batches_per_epoch
    for _ in range(n_epoch + 3):  # across an epoch boundary
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(4)]
    again = iter(make_dataset(None, PreparedTokens(st.path), 16, 4, **kw))  # a fresh process: reopened directory
    again.set_state(state)
    assert _same([next(again) for _ in range(4)], want)
    halves = [iter(make_dataset(None, st, 16, 2, shard_index=i, shard_count=2, **kw)) for i in (0, 1)]
    for h in halves:  # re-sharded onto 2 processes: the halves of the same next global batch
        h.set_state(state)
    np.testing.assert_array_equal(np.concatenate([_rows(next(h)) for h in halves]), _rows(want[0]))


def test_refusals_before_training(prepared, docs, tok, tmp_path):
    import shutil
    other = Tokenizer.train(docs[:40], None, 100)
    with pytest.raises(PreparedDataError, match="tokenizer mismatch"):
        PreparedTokens(prepared.path, other)
    with pytest.raises(PreparedDataError, match="tokenizer mismatch"):
        make_dataset(other, f"tokens:{prepared.path}", 16, 4)
    d = tmp_path / "copy"
    shutil.copytree(prepared.path, d)
    PreparedTokens(d, tok)  # intact
    shard = d / "shard-00002.tokens.npy"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-10])
    with pytest.raises(PreparedDataError, match="shard 2 .*truncated"):
        PreparedTokens(d)
    shard.unlink()
    with pytest.raises(PreparedDataError, match="shard 2 .*missing"):
        PreparedTokens(d)
    shard.write_bytes(raw)
    idx = json.loads((d / INDEX).read_text())
    (d / INDEX).write_text(json.dumps({**idx, "vocab_size": 70_000}))
    with pytest.raises(PreparedDataError, match="does not fit the token dtype uint16"):
        PreparedTokens(d)
    with pytest.raises(PreparedDataError, match="does not fit"):
        token_dtype(70_000, "uint16")
    assert token_dtype(70_000) == np.uint32 and token_dtype(65_536) == np.uint16
    (d / INDEX).rename(d / PROGRESS)
    with pytest.raises(PreparedDataError, match="unfinished preparation"):
        PreparedTokens(d)
    with pytest.raises(FileNotFoundError, match="not found"):
        PreparedTokens(tmp_path / "nowhere")
    # the training loop refuses before building a model
    from pldr_jax.train.loop import TrainConfig, prepare_datasets, prepare_tokenizer
    tc = TrainConfig(data=f"tokens:{prepared.path}", seq_len=16, batch_size=4, progress=False)
    assert prepare_tokenizer(tc).model_proto == tok.model_proto  # the directory's own tokenizer by default
    with pytest.raises(PreparedDataError, match="tokenizer mismatch"):
        prepare_datasets(tc, other)
    with pytest.raises(ValueError, match="needs --tokenizer"):
        prepare_tokenizer(TrainConfig(data="stream:builtin", workdir=str(tmp_path / "w")))


def test_interrupted_prepare_resumes_to_the_same_shards(prepared, docs, tok, tmp_path):
    out = tmp_path / "p"

    class Stop(Exception):
        pass

    def stop_after_two(entry):
        if entry["tokens"].startswith("shard-00001"):
            raise Stop
    with pytest.raises(Stop):
        prepare_tokens(docs, tok, out, shard_tokens=5000, chunk_chars=20_000, on_shard=stop_after_two, **QUIET)
    assert (out / PROGRESS).is_file() and not (out / INDEX).exists()
    with pytest.raises(PreparedDataError, match="unfinished"):
        PreparedTokens(out)
    (out / "shard-00002.tokens.npy.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves
    logs = []
    st = prepare_tokens(docs, tok, out, shard_tokens=5000, chunk_chars=20_000, progress=False, log=logs.append)
    done = json.loads((prepared.path / INDEX).read_text())
    assert [s["sha256"] for s in st.index["shards"]] == [s["sha256"] for s in done["shards"]]
    assert any("resuming after 2 finished shards" in m for m in logs)
    assert not (out / PROGRESS).exists() and not list(out.glob("*.tmp"))
    with pytest.raises(PreparedDataError, match="differs"):
        prepare_tokens(docs, tok, out, shard_tokens=999, **QUIET)


def test_cli_prepare_info_verify(docs, tok, tmp_path, capsys):
    from pldr_jax.cli import main
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs[:20]))
    out = tmp_path / "out"
    assert main(["data", "prepare", "--data", f"jsonl:{src}:text", "--tokenizer", tok.path, "--out", str(out),
                 "--shard-tokens", "3000", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_documents"] == 20 and info["source"] == f"jsonl:{src}:text"
    assert main(["data", "verify", str(out), "--tokenizer", tok.path]) == 0
    (out / "shard-00000.tokens.npy").write_bytes(b"\x93NUMPY garbage")
    assert main(["data", "verify", str(out)]) == 2


# --------------------------------------------------------------------------- streaming
def test_streaming_position_restores_exactly_and_shares_are_disjoint(docs, numbered, tok, tmp_path):
    kw = dict(seq_len=16, batch_size=4, shuffle_window=8, chunk_docs=8, seed=1)
    for mode in ("pack", "pad"):  # (a state JSON round trip turns grain's packing tuples into lists)
        it = iter(StreamingDataset(docs, tok, mode=mode, **kw))
        for _ in range(25):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        want = [next(it) for _ in range(5)]
        again = iter(StreamingDataset(docs, tok, mode=mode, **kw))
        again.set_state(state)
        assert _same([next(again) for _ in range(5)], want), mode
    # unshuffled packing equals the in-memory pack rows
    rows = np.concatenate([_rows(b) for b in StreamingDataset(docs, tok, seq_len=16, batch_size=4, shuffle_window=0,
                                                              num_epochs=1)])
    mem = make_dataset(tok, docs, 16, 4, split="all", shuffle=False, num_epochs=1).rows
    np.testing.assert_array_equal(rows[:len(mem)], mem)
    assert len(rows) <= len(mem) + 1  # grain's packing pads the partial last row of a finite stream
    # per-process shares: record level (one list), file level (a directory of files)
    for spec in (numbered, _jsonl_dir(numbered, tmp_path)):
        shares = [StreamingDataset(spec, tok, seq_len=16, batch_size=1, mode="pad", shuffle_window=0, num_epochs=1,
                                   shard_index=i, shard_count=2) for i in (0, 1)]
        seen = [{tuple(_rows(b)[0]) for b in s} for s in shares]
        allr = {tuple(_rows(b)[0]) for b in StreamingDataset(spec, tok, seq_len=16, batch_size=1, mode="pad",
                                                             shuffle_window=0, num_epochs=1)}
        assert not seen[0] & seen[1] and seen[0] | seen[1] == allr
    datasets = pytest.importorskip("datasets")  # optional: a Hugging Face IterableDataset, split by its shards
    hf = datasets.Dataset.from_dict({"text": numbered}).to_iterable_dataset(num_shards=4)
    shares = [StreamingDataset(hf, tok, seq_len=16, batch_size=1, mode="pad", shuffle_window=0, num_epochs=1,
                               shard_index=i, shard_count=2) for i in (0, 1)]
    seen = [{tuple(_rows(b)[0]) for b in s} for s in shares]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == allr
    s0 = iter(StreamingDataset(docs, tok, shard_index=0, shard_count=2, **kw))
    next(s0)
    s1 = iter(StreamingDataset(docs, tok, shard_index=1, shard_count=2, **kw))
    with pytest.raises(ValueError, match="cannot be re-sharded"):
        s1.set_state(s0.get_state())
    with pytest.raises(ValueError, match="different streaming pipeline"):
        iter(StreamingDataset(docs, tok, **{**kw, "seed": 2})).set_state(state)


def _jsonl_dir(docs, tmp_path) -> str:
    d = tmp_path / "jsonl"
    d.mkdir()
    for f in range(4):
        (d / f"part{f}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs[f::4]))
    return f"jsonl:{d}:text"


# --------------------------------------------------------------------------- the training loop
@pytest.mark.parametrize("kind", ["tokens", "stream"])
def test_training_on_prepared_and_streamed_data_resumes_exactly(kind, prepared, docs, tok, tmp_path):
    import pldr_jax
    from pldr_jax.train.loop import TrainConfig, train
    spec = f"tokens:{prepared.path}" if kind == "tokens" else "stream:" + _jsonl_dir(docs, tmp_path)
    cfg = pldr_jax.PLDRConfig(num_layers=1, d_model=32, num_heads=4, dff=48, vocab_size=tok.vocab_size,
                              max_seq_len=32, A_dff=8, num_reslayerA=1, num_denseA=1)
    tc = TrainConfig(data=spec, tokenizer=tok.path, steps=4, total_steps=10, seq_len=16, batch_size=8,
                     learning_rate=1e-2, warmup_steps=1, log_every=1, eval_every=0, eval_batches=2, save_every=1,
                     keep_checkpoints=2, validation_fraction=0.1, progress=False, plot=False, tensorboard=False)
    kw = dict(compiler_options={"xla_backend_optimization_level": 0}, log=lambda *a, **k: None)
    straight = train(cfg, tc.replace(workdir=str(tmp_path / "s")), **kw)
    first = train(cfg, tc.replace(workdir=str(tmp_path / "r"), steps=2), **kw)
    second = train(cfg, tc.replace(workdir=str(tmp_path / "r"), resume=True), **kw)
    assert len(straight.losses) == 4 and all(np.isfinite(straight.losses))
    assert first.losses + second.losses == straight.losses  # bitwise: the next batch exactly
    assert straight.evals and np.isfinite(straight.evals[-1]["val_loss"])


def test_bench_data_script_output(tmp_path):
    """experiments/bench_data.py at a tiny size: the issue's JSON shape, one entry per path and size,
    and its temporary directory removed."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, str(root / "experiments" / "bench_data.py"), "--sizes", "1", "2",
                        "--batches", "3", "--seq-len", "32", "--batch", "2", "--workers", "1", "--tmp", str(tmp_path),
                        "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert [(r["path"], r["corpus_mb"]) for r in out["results"]] == [("prepared", 1), ("streaming", 1),
                                                                      ("prepared", 2), ("streaming", 2)]
    for r in out["results"]:
        assert set(r) == {"path", "corpus_mb", "tokens_per_s", "first_batch_s", "peak_rss_mb"}
        assert r["tokens_per_s"] > 0 and r["first_batch_s"] > 0 and r["peak_rss_mb"] > 50
    assert not list(tmp_path.iterdir())
