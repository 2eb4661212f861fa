"""The run's inputs: tokenizer, training / validation data, the predefined G_LM, the batch iterator.

`prepare_inputs(run, ...)` fills these into a `setup.TrainRun`; `prepare_tokenizer`,
`prepare_datasets` and `make_g_lm` are usable on their own (tests, notebooks, `aot`).
Only process 0 writes files (the trained tokenizer, the run's copy of it, ``g_lm.npy``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Sequence

import jax
import numpy as np

from ..config import PLDRConfig
from . import multihost
from .config import TrainConfig
from .sharding import replicated

__all__ = ["prepare_tokenizer", "prepare_datasets", "make_g_lm", "batch_iterator", "prepare_inputs"]


def prepare_tokenizer(tcfg: TrainConfig, workdir: Path | None = None, documents: Sequence[str] | None = None):
    """The run's tokenizer: `tcfg.tokenizer` if given, else ``workdir/tokenizer.model`` if present
    (resume), else one trained with `tcfg.vocab_size` pieces on the data (process 0 trains and
    saves; the others load it after a barrier).  ``tokens:DIR`` data: the tokenizer the directory
    was prepared with (``DIR/tokenizer.model``) unless `tcfg.tokenizer` is given (then its hash
    must match: checked in `prepare_datasets`).  ``stream:SPEC`` data needs `tcfg.tokenizer` (a
    streamed corpus is never loaded whole to train one)."""
    from ..data import Tokenizer, make_source
    from ..data.shards import TOKENIZER
    if tcfg.tokenizer:
        return Tokenizer.load(tcfg.tokenizer)
    data = tcfg.data if documents is None else None
    if isinstance(data, str) and data.startswith("tokens:"):
        from ..data.shards import PreparedTokens
        return Tokenizer.load(PreparedTokens(data[len("tokens:"):]).path / TOKENIZER)  # refuses a bad directory
    workdir = Path(tcfg.workdir if workdir is None else workdir)
    path = workdir / "tokenizer.model"
    if path.exists() and not tcfg.overwrite:
        return Tokenizer.load(path)
    if isinstance(data, str) and data.startswith("stream:"):
        raise ValueError(f"--data {data} needs --tokenizer MODEL: a streamed corpus is never loaded whole to train "
                         "a tokenizer on (train one on a sample, or prepare the data with pldr-jax data prepare)")
    if jax.process_index() == 0:
        docs = documents if documents is not None else list(make_source(tcfg.data))
        workdir.mkdir(parents=True, exist_ok=True)
        Tokenizer.train(docs, workdir / "tokenizer", tcfg.vocab_size, seed=tcfg.data_seed)
    multihost.barrier("pldr_tokenizer", tcfg.sync_timeout_s)
    return Tokenizer.load(path)


def prepare_datasets(tcfg: TrainConfig, tokenizer, documents=None):
    """(train dataset, validation dataset or None) for this process's shard.

    `tcfg.data`: a source spec (tokenized here, in memory: the embedded corpus, small files),
    ``tokens:DIR`` (a prepared directory: rows read in place and built on the fly, refused before any
    training work when incomplete, damaged or made with another tokenizer) or ``stream:SPEC``
    (raw text tokenized inside the grain pipeline; see `pldr_jax.data.streaming`)."""
    from ..data import make_dataset, make_source, tokenize_documents
    pc, pi = jax.process_count(), jax.process_index()
    if tcfg.batch_size % pc:
        raise ValueError(f"batch_size ({tcfg.batch_size}) must be divisible by the {pc} processes")
    local_bs = tcfg.batch_size // pc
    data = tcfg.data if documents is None else None
    if isinstance(data, str) and data.startswith("tokens:"):
        from ..data.shards import PreparedTokens
        store = PreparedTokens(data[len("tokens:"):], tokenizer)
        common = dict(seq_len=tcfg.seq_len, mode=tcfg.data_mode, shard_index=pi, shard_count=pc,
                      validation_fraction=tcfg.validation_fraction)
        train_ds = make_dataset(None, store, batch_size=local_bs, seed=tcfg.data_seed, split="train", **common)
        val_ds = (make_dataset(None, store, batch_size=local_bs, split="validation", **common)
                  if tcfg.validation_fraction > 0 else None)
        return train_ds, val_ds
    if isinstance(data, str) and data.startswith("stream:"):
        from ..data.streaming import StreamingDataset
        common = dict(seq_len=tcfg.seq_len, batch_size=local_bs, mode=tcfg.data_mode, seed=tcfg.data_seed,
                      shard_index=pi, shard_count=pc, validation_fraction=tcfg.validation_fraction)
        spec = data[len("stream:"):]
        train_ds = StreamingDataset(spec, tokenizer, split="train", **common)
        val_ds = None
        if tcfg.validation_fraction > 0:
            if tcfg.eval_batches is None:
                raise ValueError("--data stream:... validates on a repeating stream: set eval_batches (--eval-batches)")
            val_ds = StreamingDataset(spec, tokenizer, split="validation", shuffle_window=0, **common)
        return train_ds, val_ds
    src = documents if documents is not None else make_source(tcfg.data)
    corpus = tokenize_documents(tokenizer, src)
    common = dict(seq_len=tcfg.seq_len, mode=tcfg.data_mode, shard_index=pi, shard_count=pc,
                  validation_fraction=tcfg.validation_fraction, split_seed=tcfg.data_seed)
    train_ds = make_dataset(None, corpus, batch_size=local_bs, seed=tcfg.data_seed, split="train", **common)
    val_ds = None
    if tcfg.validation_fraction > 0:
        val_ds = make_dataset(None, corpus, batch_size=local_bs, split="validation", **common)
    return train_ds, val_ds


def make_g_lm(cfg: PLDRConfig, tcfg: TrainConfig):
    """The constant G_LM [num_layers, H, dk, dk] of a predefined-G model (None for learned G)."""
    if cfg.learned_g:
        if tcfg.g_source not in (None, "learned"):
            raise ValueError(f"g_source={tcfg.g_source!r} needs a predefined-G model config (custom_G_type set); "
                             "a learned-G model derives G_LM itself")
        return None
    from ..g_sources import make_g
    spec = tcfg.g_source
    if spec is None:
        spec = {"identity": "identity", "random": "uniform"}.get(cfg.custom_G_type)
        if spec is None:
            raise ValueError("custom_G_type='external' needs g_source='external:<file.npz>'")
    g = make_g(cfg, spec, jax.random.key(tcfg.seed + 1))
    if g is None:
        raise ValueError(f"g_source={spec!r} gives no G_LM; a predefined-G model needs one")
    return np.asarray(g, np.float32)


def batch_iterator(source):
    """An iterator of host-local batches and whether it is checkpointable."""
    if hasattr(source, "iterator"):  # PretrainDataset
        return source.iterator(0), True
    it = iter(source)
    return it, hasattr(it, "get_state") and hasattr(it, "set_state")


def prepare_inputs(run, train_data: Iterable | None = None, val_data: Iterable | None = None, tokenizer=None,
                   documents: Sequence[str] | None = None) -> None:
    """Fill `run` (a `setup.TrainRun`) with the tokenizer (and its copy ``workdir/tokenizer.model``),
    the training batch iterator (at its start: `resume.restore_position` moves it), the validation data and the G_LM of a predefined-G model (``g_lm.npy``,
    and replicated on the mesh).  Arguments as in `loop.train`."""
    tcfg, model_cfg, workdir = run.tcfg, run.model_cfg, run.workdir
    if train_data is None:
        if tokenizer is None:
            tokenizer = prepare_tokenizer(tcfg, workdir, documents)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                             f"{model_cfg.vocab_size}; set vocab_size >= {tokenizer.vocab_size}")
        train_data, auto_val = prepare_datasets(tcfg, tokenizer, documents)
        val_data = auto_val if val_data is None else val_data
    tok_path = getattr(tokenizer, "path", None) if tokenizer is not None else None
    if tok_path is not None:
        tok_path = Path(tok_path).absolute()
        own = workdir / "tokenizer.model"
        if tok_path != own and run.main:  # keep the run folder self-contained
            shutil.copyfile(tok_path, own)
        tok_path = str(own)
    run.tokenizer, run.tok_path, run.val_data = tokenizer, tok_path, val_data
    run.batches, run.checkpointable_data = batch_iterator(train_data)

    g_lm = make_g_lm(model_cfg, tcfg)
    g_path = None
    if g_lm is not None and run.main:
        g_path = workdir / "g_lm.npy"
        np.save(g_path, g_lm)
    run.g_lm, run.g_path = g_lm, g_path
    run.g_dev = None if g_lm is None else jax.device_put(g_lm, replicated(run.mesh))
