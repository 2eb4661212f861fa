"""Data: tokenizer (golden ids), embedded corpus, document sources, grain batch pipeline."""

from __future__ import annotations

import json
import pickle
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pldr_jax.data import (BuiltinSource, HFDatasetSource, JsonlSource, ListSource, ParquetSource,
                           TextFileSource, TokenizedCorpus, Tokenizer, default_corpus_documents,
                           default_corpus_size, make_dataset, make_rows, make_source, split_documents,
                           tokenize_documents)
from pldr_jax.data.pipeline import PretrainDataset

from .conftest import REF

PAPER_MODEL = REF / "refinedweb-tokenizer-model-pldrllm-kvg-cache-paper.model"


@pytest.fixture(scope="module")
def paper_tok():
    if not PAPER_MODEL.exists():
        pytest.skip(f"{PAPER_MODEL} not available")
    return Tokenizer.load(PAPER_MODEL)


@pytest.fixture(scope="module")
def corpus_docs():
    return default_corpus_documents()


@pytest.fixture(scope="module")
def small_tok(corpus_docs):
    """Unigram tokenizer, vocab 512 (byte fallback on), trained on the embedded corpus."""
    return Tokenizer.train(corpus_docs, None, 512, num_threads=1)


# --------------------------------------------------------------------------- tokenizer: golden
def test_paper_tokenizer_golden(paper_tok):
    info = json.loads((REF / "tokenizer_info.json").read_text())
    assert paper_tok.vocab_size == info["vocab_size"] == 32000
    assert (paper_tok.pad_id, paper_tok.unk_id, paper_tok.bos_id, paper_tok.eos_id) == (0, 1, 2, 3)
    for i, piece in info["special_pieces"].items():
        assert paper_tok.id_to_piece(int(i)) == piece
    text = "Write a letter requesting that people use language models responsibly."
    assert paper_tok.encode(text, add_eos=True) == [6159, 270, 1943, 17057, 279, 372, 404, 1554, 2192, 28095,
                                                    262, 3]
    for s in info["samples"]:
        ids = paper_tok.encode(s["text"], add_eos=True)
        assert ids == s["ids"], s["text"]
        assert [paper_tok.id_to_piece(i) for i in ids] == s["pieces"]
        assert paper_tok.encode(s["text"]) == s["ids"][:-1]  # prompts: no EOS
        assert paper_tok.decode(ids) == s["decoded"]
    assert paper_tok.encode("", add_eos=True) == [3]
    assert paper_tok.encode_batch([text, ""], add_eos=True) == [paper_tok.encode(text, add_eos=True), [3]]


def test_paper_tokenizer_decode_and_pickle(paper_tok):
    ids = paper_tok.encode("Write a letter", add_eos=True)
    assert paper_tok.decode(ids + [0, 0]) == "Write a letter"
    assert paper_tok.decode([0, 6159, 3, 270, 1943]) == "Write"  # pad dropped, stops at EOS
    assert paper_tok.decode(np.array(ids, np.int32)) == "Write a letter"
    with pytest.raises(ValueError, match="out of range"):
        paper_tok.decode([32000])
    tok2 = pickle.loads(pickle.dumps(paper_tok))
    assert tok2.encode("Write a letter") == ids[:-1]
    with pytest.raises(TypeError, match="str"):
        paper_tok.encode(b"bytes")  # type: ignore[arg-type]


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        Tokenizer.load(bad)


# --------------------------------------------------------------------------- tokenizer: training
def test_train_small_tokenizer_roundtrip(small_tok, tmp_path):
    tok = small_tok
    assert tok.vocab_size == 512
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(7)] == ["[PAD]", "[UNK]", "[START]", "[END]", "[SEP]", "[CLS]",
                                                      "<0x00>"]
    for text in ["The for statement is used to iterate over the elements of a sequence.",
                 "numbers 12345, unicode café 東京 and symbols {}[]<>"]:
        ids = tok.encode(text, add_eos=True)
        assert ids[-1] == tok.eos_id and tok.unk_id not in ids
        assert tok.decode(ids) == text
    assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["▁", "2", "0", "2", "4"]  # split_digits
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok.model" and (tmp_path / "tok.vocab").exists()
    assert Tokenizer.load(path).model_proto == tok.model_proto
    d = tmp_path / "dir"
    d.mkdir()
    assert tok.save(d) == d / "tokenizer.model"
    assert Tokenizer.load(d).vocab_size == 512


def test_train_tiny_vocab_deterministic_and_files(corpus_docs, tmp_path):
    docs = corpus_docs[:40]
    a = Tokenizer.train(docs, tmp_path / "a", 256)  # byte_fallback auto-off below 512
    b = Tokenizer.train(docs, None, 256)
    assert a.vocab_size == 256 and a.model_proto == b.model_proto
    assert (tmp_path / "a.model").exists()
    assert a.decode(a.encode("The while statement", add_eos=True)) == "The while statement"
    f = tmp_path / "train.txt"
    f.write_text("\n".join(docs), encoding="utf-8")
    c = Tokenizer.train(f, None, 300)
    assert c.vocab_size == 300


def test_train_errors(corpus_docs):
    with pytest.raises(ValueError, match="byte_fallback"):
        Tokenizer.train(corpus_docs[:5], None, 256, byte_fallback=True)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["a tiny corpus", "of two lines"], None, 2000, byte_fallback=False, hard_vocab_limit=True)
    # paper setting hard_vocab_limit=False: a smaller vocabulary instead of an error
    assert Tokenizer.train(["a tiny corpus", "of two lines"], None, 2000, byte_fallback=False).vocab_size < 2000
    with pytest.raises(ValueError, match="no non-empty text"):
        Tokenizer.train(["", "  "], None, 300)
    with pytest.raises(FileNotFoundError):
        Tokenizer.train("missing_file.txt", None, 300)


# --------------------------------------------------------------------------- corpus
def test_default_corpus(corpus_docs):
    size = default_corpus_size(corpus_docs)
    assert size.documents == len(corpus_docs) >= 200
    assert size.characters > 500_000
    assert all(isinstance(d, str) and d.strip() for d in corpus_docs)
    from pydoc_data.topics import topics
    assert corpus_docs[:len(topics)] == [topics[k].strip() for k in sorted(topics)]
    assert list(BuiltinSource())[:3] == corpus_docs[:3]


def test_default_corpus_ignores_process_state(corpus_docs, tmp_path, monkeypatch):
    """The corpus (and with it every data fingerprint of a builtin-data run) is the same whatever the
    process imported, replaced in `sys.modules` or put on `sys.path` before: a stdlib module shadowed
    by a file on the path, and one replaced by a module object without a spec, change nothing."""
    import types
    colorsys_doc = next(d for d in corpus_docs if d.startswith("Conversion functions between RGB"))
    (tmp_path / "colorsys.py").write_text('"""A shadow of colorsys."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    monkeypatch.setitem(sys.modules, "shlex", types.ModuleType("shlex"))  # no __spec__
    docs = default_corpus_documents()
    assert colorsys_doc in docs and "A shadow of colorsys." not in docs
    assert docs == corpus_docs


# --------------------------------------------------------------------------- sources
def test_text_sources(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first doc\n\nsecond para\nline two\n", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("markdown doc", encoding="utf-8")
    (tmp_path / "sub" / "c.py").write_text("print('ignored')", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    src = TextFileSource(tmp_path)
    assert list(src) == ["first doc\n\nsecond para\nline two\n", "markdown doc"]
    assert (src.stats.documents, src.stats.empty, src.stats.files) == (2, 1, 3)
    para = make_source(f"paragraphs:{tmp_path / 'a.txt'}")
    assert list(para) == ["first doc", "second para\nline two"]
    assert list(make_source(tmp_path / "sub" / "b.md")) == ["markdown doc"]
    assert list(TextFileSource(tmp_path, glob="*.py")) == ["print('ignored')"]
    assert list(make_source(["x", "y"])) == ["x", "y"]


def test_jsonl_and_parquet_sources(tmp_path):
    rows = [{"text": "doc one", "id": 1}, {"text": "doc two", "id": 2}, {"text": "", "id": 3}]
    jf = tmp_path / "d.jsonl"
    jf.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    src = make_source(f"jsonl:{jf}:text")
    assert list(src) == ["doc one", "doc two"] and src.stats.empty == 1
    assert list(make_source(jf)) == ["doc one", "doc two"]
    with pytest.raises(KeyError, match="field='body'"):
        list(JsonlSource(jf, field="body"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="invalid JSON at .*bad.jsonl:2"):
        list(JsonlSource(bad))

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["p one", None, "p two"], "n": [1, 2, 3]}), pf)
    src = make_source(f"parquet:{pf}:content")
    assert list(src) == ["p one", "p two"] and src.stats.empty == 1
    assert list(ParquetSource(tmp_path, column="content")) == ["p one", "p two"]  # directory of *.parquet
    with pytest.raises(KeyError, match="column='text' not in parquet"):
        list(make_source(pf))
    bf = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok bytes", b"bad \xff byte"], pa.binary())}), bf)
    src = ParquetSource(bf)
    assert list(src) == ["ok bytes", "bad \ufffd byte"] and src.stats.replaced == 1


def test_non_utf8_policies(tmp_path):
    (tmp_path / "good.txt").write_bytes("caf\u00e9".encode())
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    src = TextFileSource(tmp_path)
    assert sorted(src) == ["café", "caf\ufffd latin-1"] and src.stats.replaced == 1
    src = TextFileSource(tmp_path, errors="skip")
    assert list(src) == ["café"] and src.stats.skipped == 1
    with pytest.raises(ValueError, match="invalid UTF-8 in .*bad.txt"):
        list(TextFileSource(tmp_path, errors="strict"))
    with pytest.raises(ValueError, match="errors must be one of"):
        TextFileSource(tmp_path, errors="ignore")
    jf = tmp_path / "x.jsonl"
    jf.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff"}\n')
    src = JsonlSource(jf, errors="skip")
    assert list(src) == ["fine"] and src.stats.skipped == 1


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        make_source(str(tmp_path / "missing_dir"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make_source(f"jsonl:{tmp_path / 'nope.jsonl'}:text")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files matching"):
        TextFileSource(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="yielded no documents"):
        list(TextFileSource(tmp_path / "blank.txt"))
    with pytest.raises(TypeError, match="spec must be"):
        make_source(42)
    monkeypatch.setitem(sys.modules, "datasets", None)  # simulate `datasets` not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        HFDatasetSource(tmp_path)


def test_hf_dataset_like_object():
    class FakeDataset:  # the subset of datasets.Dataset that HFDatasetSource uses
        column_names = ["text", "meta"]

        def __iter__(self):
            return iter([{"text": "hf one", "meta": 0}, {"text": "hf two", "meta": 1}])

    assert list(make_source(FakeDataset())) == ["hf one", "hf two"]
    with pytest.raises(KeyError, match="field='body'"):
        HFDatasetSource(FakeDataset(), field="body")
    assert list(HFDatasetSource({"train": FakeDataset()}, split="train")) == ["hf one", "hf two"]


# --------------------------------------------------------------------------- pipeline
def _synthetic_corpus(lengths, seed=0) -> TokenizedCorpus:
    """Documents of the given lengths (EOS=3 included), tokens drawn from [4, 100)."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(4, 100, n - 1), 3).astype(np.int32) for n in lengths]
    return TokenizedCorpus(np.concatenate(docs), np.concatenate([[0], np.cumsum(lengths)]))


def _batches(ds_or_it, n=None):
    it = iter(ds_or_it)
    out = []
    for i, b in enumerate(it):
        if n is not None and i >= n:
            break
        out.append(b)
    return out


def test_tokenize_documents_and_pack(small_tok):
    docs = ["The quick brown fox.", "Jumps over the lazy dog.", "", "A third document here."]
    corpus = tokenize_documents(small_tok, docs)
    assert corpus.num_documents == 4
    for d, text in enumerate(docs):
        assert corpus.document(d).tolist() == small_tok.encode(text, add_eos=True)
    seq_len = 5
    ds = PretrainDataset(corpus, seq_len=seq_len, batch_size=2, shuffle=False, num_epochs=1)
    batches = _batches(ds)
    assert len(batches) == ds.batches_per_epoch == len(ds) == (corpus.num_tokens // (seq_len + 1)) // 2
    rows = []
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (2, seq_len)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])  # targets = inputs shifted
        rows.append(np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1))
    stream = np.concatenate(rows).reshape(-1)
    np.testing.assert_array_equal(stream, corpus.tokens[:len(stream)])  # batches reproduce the stream


def test_pad_and_nopad_modes():
    corpus = _synthetic_corpus([3, 9, 6, 12])
    rows = make_rows(corpus, 5, "pad")
    assert rows.shape == (4, 6) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows[0], np.r_[corpus.document(0), [0, 0, 0]])
    np.testing.assert_array_equal(rows[1], corpus.document(1)[:6])
    np.testing.assert_array_equal(rows[2], corpus.document(2))
    rows = make_rows(corpus, 5, "nopad")
    assert rows.shape == (3, 6)  # the 3-token document is dropped
    np.testing.assert_array_equal(rows, np.stack([corpus.document(d)[:6] for d in (1, 2, 3)]))
    packed = make_rows(corpus, 5, "pack")
    assert packed.shape == (30 // 6, 6)
    ds = PretrainDataset(corpus, seq_len=5, batch_size=3, mode="pad", shuffle=False, num_epochs=1,
                         drop_remainder=False)
    b = _batches(ds)
    assert len(b) == 2 and b[1]["inputs"].shape == (3, 5)
    assert not b[1]["targets"][1:].any()  # partial batch padded with all-pad rows
    with pytest.raises(ValueError, match="mode must be one of"):
        make_rows(corpus, 5, "packed")
    with pytest.raises(ValueError, match="seq_len"):
        make_rows(corpus, 0)


def test_shuffle_reproducible_and_epochs():
    corpus = _synthetic_corpus([7] * 40)
    kw = dict(seq_len=6, batch_size=4, num_epochs=2)
    a = _batches(PretrainDataset(corpus, seed=1, **kw))
    b = _batches(PretrainDataset(corpus, seed=1, **kw))
    c = _batches(PretrainDataset(corpus, seed=2, **kw))
    assert len(a) == 20
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))
    rows = np.concatenate([x["inputs"] for x in a])
    ep1, ep2 = rows[:40], rows[40:]
    assert not np.array_equal(ep1, ep2)  # reshuffled each epoch
    key = lambda r: sorted(map(tuple, r.tolist()))  # noqa: E731
    assert key(ep1) == key(ep2) == key(make_rows(corpus, 6)[:, :-1])  # each epoch = every row once
    inf = PretrainDataset(corpus, seed=1, seq_len=6, batch_size=4)  # num_epochs=None repeats forever
    assert len(_batches(inf, 50)) == 50


def _full_rows(batch):
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], 1)


def test_shards_split_the_same_global_batches_whatever_their_count():
    """Shard i of n yields rows [i*B, (i+1)*B) of each global batch; the global batches (and so a
    resumed run's data order) do not depend on n; within an epoch the shards are disjoint and cover
    every row of the full global batches once."""
    corpus = _synthetic_corpus(list(range(2, 40)))
    n_rows = len(make_rows(corpus, 4))
    one = _batches(PretrainDataset(corpus, seq_len=4, batch_size=6, seed=5, num_epochs=1))
    for count in (2, 3):
        shards = [_batches(PretrainDataset(corpus, seq_len=4, batch_size=6 // count, seed=5, shard_index=i,
                                           shard_count=count, num_epochs=1)) for i in range(count)]
        assert all(len(sh) == len(one) == n_rows // 6 for sh in shards)
        for k, g in enumerate(one):
            np.testing.assert_array_equal(np.concatenate([_full_rows(sh[k]) for sh in shards]), _full_rows(g))
    seen = Counter(tuple(r) for b in one for r in _full_rows(b).tolist())
    assert sum(seen.values()) == (n_rows // 6) * 6 and not seen - Counter(map(tuple, make_rows(corpus, 4).tolist()))
    with pytest.raises(ValueError, match="shard_index"):
        PretrainDataset(corpus, seq_len=4, batch_size=2, shard_index=3, shard_count=3)
    # a state saved on one shard count restores on another: same next global batch
    it = iter(PretrainDataset(corpus, seq_len=4, batch_size=6, seed=5))
    for _ in range(7):
        next(it)
    state = it.get_state()
    halves = [iter(PretrainDataset(corpus, seq_len=4, batch_size=3, seed=5, shard_index=i, shard_count=2))
              for i in (0, 1)]
    for h in halves:
        h.set_state(state)
    np.testing.assert_array_equal(np.concatenate([_full_rows(next(h)) for h in halves]), _full_rows(next(it)))
    # validation shards pad a partial last global batch with all-pad rows
    val = [_batches(PretrainDataset(corpus, seq_len=4, batch_size=4, shuffle=False, num_epochs=1,
                                    drop_remainder=False, shard_index=i, shard_count=2)) for i in (0, 1)]
    got = np.concatenate([_full_rows(b) for k in range(len(val[0])) for b in (val[0][k], val[1][k])])
    np.testing.assert_array_equal(got[:n_rows], make_rows(corpus, 4))
    assert not got[n_rows:].any() and len(got) == -(-n_rows // 8) * 8


def test_checkpoint_restore_iterator(tmp_path):
    corpus = _synthetic_corpus([11] * 30)
    kw = dict(seq_len=8, batch_size=3, seed=7, num_epochs=None)
    it = iter(PretrainDataset(corpus, **kw))
    for _ in range(17):  # crosses an epoch boundary (33 rows / 3 = 11 batches per epoch)
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    assert state["next_index"] == 17 == it.step
    expected = [next(it) for _ in range(6)]
    it2 = iter(PretrainDataset(corpus, **kw))  # a fresh pipeline (e.g. after a restart)
    it2.set_state(state)
    got = [next(it2) for _ in range(6)]
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e["inputs"], g["inputs"])
        np.testing.assert_array_equal(e["targets"], g["targets"])
    it3 = PretrainDataset(corpus, **kw).iterator(start_step=17)
    np.testing.assert_array_equal(next(it3)["inputs"], expected[0]["inputs"])
    with pytest.raises(ValueError, match="saved for other inputs"):
        iter(PretrainDataset(corpus, **{**kw, "seed": 8})).set_state(state)
    # grain's orbax checkpoint handler accepts the iterator
    grain = pytest.importorskip("grain")
    epath = pytest.importorskip("etils.epath")
    handler = grain.checkpoint.CheckpointHandler()
    it4 = iter(PretrainDataset(corpus, **kw))
    handler.save(epath.Path(tmp_path), item=it)
    handler.restore(epath.Path(tmp_path), item=it4)
    np.testing.assert_array_equal(next(it4)["inputs"], next(it)["inputs"])


def test_make_dataset_end_to_end_and_validation_split(small_tok, corpus_docs):
    src = ListSource(corpus_docs[:60])
    train = make_dataset(small_tok, src, 32, 4, seed=3, validation_fraction=0.2, num_epochs=1)
    val = make_dataset(small_tok, src, 32, 4, split="validation", validation_fraction=0.2)
    full = make_dataset(small_tok, src, 32, 4, split="all", num_epochs=1)
    assert train.corpus.num_documents + val.corpus.num_documents == full.corpus.num_documents == 60
    assert val.num_epochs == 1 and not val.shuffle and len(val) == val.batches_per_epoch
    tr_idx, va_idx = split_documents(60, 0.2, 0)
    assert len(va_idx) == 12 and not set(tr_idx) & set(va_idx)
    full_docs = {tuple(full.corpus.document(d)) for d in range(60)}
    val_docs = {tuple(val.corpus.document(d)) for d in range(val.corpus.num_documents)}
    train_docs = {tuple(train.corpus.document(d)) for d in range(train.corpus.num_documents)}
    assert val_docs <= full_docs and train_docs <= full_docs and not val_docs & train_docs
    b = next(iter(train))
    assert b["inputs"].shape == (4, 32) and b["inputs"].max() < small_tok.vocab_size
    assert small_tok.eos_id in np.concatenate([x["targets"] for x in _batches(val)])
    with pytest.raises(ValueError, match="validation_fraction"):
        make_dataset(small_tok, src, 32, 4, split="validation")
    with pytest.raises(ValueError, match="seq_len"):
        make_dataset(None, full.corpus, 10**6, 4)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(None, full.corpus, 32, 10**6)
    with pytest.raises(ValueError, match="tokenizer is required"):
        make_dataset(None, src, 32, 4)


def test_tokenized_corpus_save_select(tmp_path):
    corpus = _synthetic_corpus([4, 2, 5])
    p = corpus.save(tmp_path / "c.npz")
    back = TokenizedCorpus.load(p)
    np.testing.assert_array_equal(back.tokens, corpus.tokens)
    sub = corpus.select([2, 0])
    assert sub.document(0).tolist() == corpus.document(2).tolist()
    assert sub.document(1).tolist() == corpus.document(0).tolist()
    assert corpus.fingerprint() != sub.fingerprint()
    with pytest.raises(FileNotFoundError):
        TokenizedCorpus.load(tmp_path / "none.npz")
