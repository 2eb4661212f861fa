"""Data: sentencepiece tokenizer, embedded corpus, document sources, the grain batch pipeline, prepared
token directories (``pldr-jax data prepare``, ``tokens:DIR``) and streaming raw text (``stream:SPEC``)."""

from .corpus import STDLIB_MODULES, CorpusSize, default_corpus_documents, default_corpus_size
from .pipeline import (MODES, PipelineIterator, PretrainDataset, TokenizedCorpus, make_dataset, make_rows,
                       split_documents, tokenize_documents)
from .prepare import prepare_tokens
from .shards import PreparedDataError, PreparedTokens
from .streaming import StreamingDataset
from .sources import (BuiltinSource, DocumentSource, HFDatasetSource, JsonlSource, ListSource, ParquetSource,
                      SourceStats, TextFileSource, iter_documents, make_source)
from .tokenizer import PAPER_TRAINER_SETTINGS, Tokenizer

__all__ = ["Tokenizer", "PAPER_TRAINER_SETTINGS", "STDLIB_MODULES", "CorpusSize", "default_corpus_documents",
           "default_corpus_size", "SourceStats", "DocumentSource", "ListSource", "BuiltinSource",
           "TextFileSource", "JsonlSource", "ParquetSource", "HFDatasetSource", "make_source", "iter_documents",
           "TokenizedCorpus", "tokenize_documents", "split_documents", "make_rows", "PretrainDataset",
           "PipelineIterator", "make_dataset", "MODES", "prepare_tokens", "PreparedTokens", "PreparedDataError",
           "StreamingDataset"]
