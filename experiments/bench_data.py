"""Data-pipeline benchmark: prepared token directories vs streaming raw text, 50 / 200 / 800 MB.

Builds synthetic corpora of ``--sizes`` MB of text (documents of 1-8 paragraphs drawn at random
from the embedded corpus, recombined; JSONL files of 25 MB in a temporary directory, deleted
after: the 200 MB corpus is the first 8 files of the 800 MB one), then for each size and path

* ``prepared``: ``pldr-jax data prepare`` (``--workers`` processes; its time is reported on
  stderr, not in the results), then ``--data tokens:DIR`` batches (pack, global shuffle);
* ``streaming``: ``--data stream:jsonl:DIR:text`` batches (tokenized in the pipeline, pack,
  window shuffle of 1024 rows);

measures, in a fresh subprocess per run (so each peak RSS is that run's own): ``first_batch_s``
(building the pipeline -- opening and validating the directory, or starting the stream -- until
the first ``[batch, seq_len]`` batch), ``tokens_per_s`` over the next ``--batches`` batches, and
``peak_rss_mb`` (the subprocess's own peak resident set, ``VmHWM``, imports and the mapped shard
pages it touched included).  The
tokenizer is the paper's 32k sentencepiece model when ../shared/reference has it, else one of
8000 pieces trained on the embedded corpus.

``--formats`` also compares the storage formats on the smallest corpus: random packed rows read
from the ``.npy`` shards (with ``pread``, as training does, and through a memory map) vs ArrayRecord
with one record per document (rows packed
on the fly, as here) and with one record per pre-packed row (seq_len fixed at prepare time).

    python experiments/bench_data.py --json                 # {"results": [{"path", "corpus_mb", ...}]}
    python experiments/bench_data.py --sizes 5 20 --json    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAPER_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / \
    "refinedweb-tokenizer-model-pldrllm-kvg-cache-paper.model"
FILE_MB = 25
KEYS = ("tokens_per_s", "first_batch_s", "peak_rss_mb")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- corpus
def build_pool(root: Path, sizes: list[int], seed: int = 0) -> list[tuple[Path, int]]:
    """JSONL files of at most FILE_MB MB of text each, cut so that every size in ``sizes`` is the
    text of a prefix of them: [(path, cumulative MB at its end), ...]."""
    from pldr_jax.data import default_corpus_documents
    paras = [p.strip() for d in default_corpus_documents() for p in d.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    cuts = sorted(set(sizes) | set(range(FILE_MB, max(sizes), FILE_MB)))
    files, written = [], 0
    for i, cut in enumerate(cuts):
        path = root / f"part-{i:04d}.jsonl"
        lines = []
        while written < cut * 1_000_000:
            text = "\n\n".join(rng.choices(paras, k=rng.randint(1, 8)))
            lines.append(json.dumps({"text": text}))
            written += len(text)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files.append((path, cut))
    return files


def corpus_dir(root: Path, pool: list[tuple[Path, int]], mb: int) -> Path:
    """A directory of hard links to the pool files that make up the first ``mb`` MB."""
    d = root / f"corpus-{mb}mb"
    d.mkdir()
    for p, end in pool:
        if end > mb:
            break
        os.link(p, d / p.name)
    return d


def tokenizer_path(root: Path) -> str:
    if PAPER_TOKENIZER.exists():
        return str(PAPER_TOKENIZER)
    from pldr_jax.data import Tokenizer, default_corpus_documents
    return str(Tokenizer.train(default_corpus_documents(), root / "tok", 8000).path)


# --------------------------------------------------------------------------- one measured run
def child(path: str, data: str, tok: str, seq_len: int, batch: int, n_batches: int) -> dict:
    t0 = time.perf_counter()
    from pldr_jax.data import Tokenizer, make_dataset
    from pldr_jax.data.streaming import StreamingDataset
    t_import = time.perf_counter()
    rss_import_kb = _vm_kb("VmRSS")
    if path == "prepared":
        it = iter(make_dataset(None, data, seq_len, batch, seed=0, split="all"))
    else:
        it = iter(StreamingDataset(data, Tokenizer.load(tok), seq_len=seq_len, batch_size=batch, seed=0))
    first = next(it)
    t1 = time.perf_counter()
    n = 0
    for _ in range(n_batches):
        b = next(it)
        n += b["inputs"].size
    t2 = time.perf_counter()
    assert first["inputs"].shape == (batch, seq_len)
    return {"first_batch_s": t1 - t_import, "tokens_per_s": n / (t2 - t1), "import_s": t_import - t0,
            "peak_rss_mb": _vm_kb("VmHWM") / 1024, "rss_after_import_mb": rss_import_kb / 1024}


def _vm_kb(field: str) -> int:
    """A /proc/self/status field in kB.  VmHWM (peak RSS) belongs to the address space, which exec
    replaces: unlike ``getrusage().ru_maxrss`` (kept across exec on Linux, so a child would report
    its parent's peak), it is this process's own."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux


def measure(path: str, data: str, tok: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([path, data, tok, args.seq_len, args.batch, args.batches])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"{path} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- storage formats
def compare_formats(prep_dir: Path, seq_len: int, n_rows: int = 4000) -> dict:
    """Random packed rows per second: memory-mapped .npy vs ArrayRecord (documents / pre-packed rows)."""
    import numpy as np
    from array_record.python.array_record_module import ArrayRecordWriter
    import grain
    from pldr_jax.data.shards import PreparedTokens
    st = PreparedTokens(prep_dir)
    W = seq_len + 1
    R = st.num_tokens // W
    rng = np.random.default_rng(0)
    rows = rng.integers(0, R, n_rows)
    out = {}
    t = time.perf_counter()
    for r in rows:
        st.read(int(r) * W, int(r) * W + W)
    out["npy_pread_rows_per_s"] = n_rows / (time.perf_counter() - t)
    mm = st.shard_tokens(0)
    t = time.perf_counter()
    for r in rows % (len(mm) // W):
        np.asarray(mm[int(r) * W:int(r) * W + W], np.int32)
    out["npy_memmap_rows_per_s"] = n_rows / (time.perf_counter() - t)
    tmp = Path(tempfile.mkdtemp(dir=prep_dir.parent))
    try:
        doc_path, row_path = str(tmp / "docs.array_record"), str(tmp / "rows.array_record")
        w = ArrayRecordWriter(doc_path, "group_size:1")
        doc_ends = []
        pos = 0
        for d in range(st.num_documents):
            toks = np.asarray(st.document(d), np.uint16)
            w.write(toks.tobytes())
            pos += len(toks)
            doc_ends.append(pos)
        w.close()
        w = ArrayRecordWriter(row_path, "group_size:1")
        for r in range(R):
            w.write(np.asarray(st.read(r * W, r * W + W), np.uint16).tobytes())
        w.close()
        doc_ends = np.asarray(doc_ends)
        docs = grain.sources.ArrayRecordDataSource([doc_path])
        t = time.perf_counter()
        for r in rows:
            a, b = int(r) * W, int(r) * W + W
            d0 = int(np.searchsorted(doc_ends, a, side="right"))
            d1 = int(np.searchsorted(doc_ends, b - 1, side="right"))
            parts = [np.frombuffer(x, np.uint16) for x in docs.__getitems__(list(range(d0, d1 + 1)))]
            start = a - (int(doc_ends[d0 - 1]) if d0 else 0)
            np.concatenate(parts)[start:start + W]
        out["array_record_documents_rows_per_s"] = n_rows / (time.perf_counter() - t)
        prerows = grain.sources.ArrayRecordDataSource([row_path])
        t = time.perf_counter()
        for r in rows:
            np.frombuffer(prerows[int(r)], np.uint16).astype(np.int32)
        out["array_record_prepacked_rows_per_s"] = n_rows / (time.perf_counter() - t)
        out["bytes"] = {"npy": sum(f.stat().st_size for f in prep_dir.glob("shard-*")),
                        "array_record_documents": os.path.getsize(doc_path),
                        "array_record_prepacked": os.path.getsize(row_path)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 800], help="corpus sizes, MB of text")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=256, help="timed batches per run")
    ap.add_argument("--workers", type=int, default=2, help="prepare's tokenizer processes")
    ap.add_argument("--paths", nargs="+", default=["prepared", "streaming"], choices=["prepared", "streaming"])
    ap.add_argument("--formats", action="store_true", help="also compare .npy vs ArrayRecord on the smallest corpus")
    ap.add_argument("--tmp", default=None, help="parent of the temporary directory (default: the system's)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return 0
    from pldr_jax.data.prepare import prepare_tokens
    root = Path(tempfile.mkdtemp(prefix="pldr_bench_data_", dir=args.tmp))
    results, extra = [], {"prepare": [], "formats": None}
    try:
        t = time.perf_counter()
        (root / "pool").mkdir()
        pool = build_pool(root / "pool", args.sizes)
        log(f"corpus pool: {max(args.sizes)} MB in {len(pool)} files, {time.perf_counter() - t:.1f} s")
        tok = tokenizer_path(root)
        for mb in sorted(args.sizes):
            src = corpus_dir(root, pool, mb)
            if "prepared" in args.paths:
                out = root / f"prepared-{mb}mb"
                t = time.perf_counter()
                st = prepare_tokens(f"jsonl:{src}:text", tok, out, workers=args.workers, progress=False, log=log)
                dt = time.perf_counter() - t
                extra["prepare"].append({"corpus_mb": mb, "seconds": dt, "tokens": st.num_tokens,
                                         "tokens_per_s": st.num_tokens / dt, "shards": st.num_shards})
                r = measure("prepared", f"tokens:{out}", tok, args)
                results.append({"path": "prepared", "corpus_mb": mb, **{k: r[k] for k in KEYS}})
                log(f"prepared  {mb:4d} MB: {r}")
                if args.formats and mb == min(args.sizes):
                    extra["formats"] = compare_formats(out, args.seq_len)
                    log(f"formats: {extra['formats']}")
                if mb != max(args.sizes):
                    shutil.rmtree(out)
            if "streaming" in args.paths:
                r = measure("streaming", f"jsonl:{src}:text", tok, args)
                results.append({"path": "streaming", "corpus_mb": mb, **{k: r[k] for k in KEYS}})
                log(f"streaming {mb:4d} MB: {r}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    log("prepare: " + json.dumps(extra["prepare"]))
    if args.json:
        print(json.dumps({"results": results}))
    else:
        print(f"{'path':10s} {'MB':>5s} {'tokens/s':>12s} {'first batch s':>14s} {'peak RSS MB':>12s}")
        for r in results:
            print(f"{r['path']:10s} {r['corpus_mb']:5d} {r['tokens_per_s']:12,.0f} {r['first_batch_s']:14.3f} "
                  f"{r['peak_rss_mb']:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
