"""SentencePiece tokenizer with the PLDR-LLM paper's conventions.

Ids: 0 ``[PAD]``, 1 ``[UNK]``, 2 ``[START]`` (bos), 3 ``[END]`` (eos); the paper's model adds the user
pieces ``[SEP]`` (4) and ``[CLS]`` (5) and byte-fallback pieces from 6. The reference encodes with
**no BOS**: prompts without EOS, training documents with EOS appended (``encode(text, add_eos=True)``).
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

__all__ = ["Tokenizer", "PAPER_TRAINER_SETTINGS"]

#: Trainer settings of the paper's tokenizer (read from its model proto's ``trainer_spec``).
PAPER_TRAINER_SETTINGS: dict = dict(
    model_type="unigram",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    pad_id=0, unk_id=1, bos_id=2, eos_id=3,
    pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[START]", eos_piece="[END]",
    user_defined_symbols=["[SEP]", "[CLS]"],
    hard_vocab_limit=False,
    max_sentence_length=125760,
    input_sentence_size=5_000_000,
    shuffle_input_sentence=True,
)

# Byte-fallback needs 256 pieces; below this vocabulary size `byte_fallback=None` turns it off.
_BYTE_FALLBACK_MIN_VOCAB = 512


class Tokenizer:
    """Wrapper around ``sentencepiece.SentencePieceProcessor`` (picklable: keeps the model bytes).

    Build with :meth:`load` (a ``.model`` file), :meth:`from_bytes` or :meth:`train`.
    """

    def __init__(self, model_proto: bytes, path: str | None = None):
        if not isinstance(model_proto, (bytes, bytearray)) or not model_proto:
            raise ValueError("model_proto must be the non-empty serialized sentencepiece model (bytes)")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(bytes(model_proto))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
            where = f" {path!r}" if path else ""
            raise ValueError(f"not a valid sentencepiece model{where}: {e}") from None
        self._proto = bytes(model_proto)
        self._sp = sp
        self.path = path

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a sentencepiece ``.model`` file. FileNotFoundError if missing, ValueError if invalid."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer model file not found: path={str(p)!r}")
        if p.is_dir():
            cands = sorted(p.glob("*.model"))
            if len(cands) != 1:
                raise ValueError(f"path={str(p)!r} is a directory with {len(cands)} *.model files; "
                                 "pass the .model file itself")
            p = cands[0]
        return cls(p.read_bytes(), path=str(p))

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> "Tokenizer":
        """Tokenizer from a serialized sentencepiece model proto."""
        return cls(model_proto)

    @classmethod
    def train(cls, texts_or_files, model_prefix_or_dir: str | os.PathLike | None, vocab_size: int, *,
              byte_fallback: bool | None = None, hard_vocab_limit: bool = False,
              character_coverage: float = 0.9995, num_threads: int = 1, seed: int = 0,
              user_defined_symbols: Sequence[str] = ("[SEP]", "[CLS]"), **trainer_kwargs) -> "Tokenizer":
        """Train a unigram tokenizer with the paper's settings (see ``PAPER_TRAINER_SETTINGS``).

        texts_or_files: an iterable of ``str`` documents (each split into lines for training), or
            a ``pathlib.Path`` / list of ``Path`` objects naming text files (one sentence per line).
            A plain ``str`` is treated as a file path only if it is the whole argument.
        model_prefix_or_dir: writes ``<prefix>.model``/``.vocab``; an existing directory (or a path
            ending in '/') gets ``tokenizer.model``; ``None`` trains in memory only.
        vocab_size: requested size. With ``hard_vocab_limit=False`` (paper) a small corpus may give a
            smaller vocabulary; check ``.vocab_size``. With ``True`` a too-large value is a ValueError.
        byte_fallback: paper uses True; ``None`` = True iff vocab_size >= 512 (the 256 byte pieces
            would otherwise crowd out the vocabulary).
        seed: sentencepiece's global random seed (sentence sampling); training is deterministic for a
            fixed seed, input and ``num_threads``.
        trainer_kwargs: any other ``SentencePieceTrainer`` option, overriding the paper's.
        """
        if not isinstance(vocab_size, int) or vocab_size < 8:
            raise ValueError(f"vocab_size must be an int >= 8, got {vocab_size!r}")
        if byte_fallback is None:
            byte_fallback = vocab_size >= _BYTE_FALLBACK_MIN_VOCAB
        n_special = 4 + len(user_defined_symbols)
        if byte_fallback and vocab_size <= n_special + 256:
            raise ValueError(f"vocab_size={vocab_size} is too small for byte_fallback=True (needs more than "
                             f"{n_special} special + 256 byte pieces); pass byte_fallback=False")

        settings = dict(PAPER_TRAINER_SETTINGS)
        settings.update(vocab_size=vocab_size, byte_fallback=byte_fallback, hard_vocab_limit=hard_vocab_limit,
                        character_coverage=character_coverage, num_threads=num_threads,
                        user_defined_symbols=list(user_defined_symbols))
        settings.setdefault("minloglevel", 2)  # silence sentencepiece's INFO log unless asked for
        settings.update(trainer_kwargs)

        files = _as_files(texts_or_files)
        if files is not None:
            settings["input"] = ",".join(files)
        else:
            lines = list(_iter_lines(texts_or_files))
            if not lines:
                raise ValueError("texts_or_files yielded no non-empty text to train the tokenizer on")
            settings["sentence_iterator"] = iter(lines)

        buf = io.BytesIO()
        settings["model_writer"] = buf
        spm.set_random_generator_seed(int(seed))
        try:
            spm.SentencePieceTrainer.train(**settings)
        except RuntimeError as e:
            msg = str(e)
            hint = ""
            if "Vocabulary size" in msg or "vocab_size" in msg:
                hint = (f" (vocab_size={vocab_size} does not fit this corpus; pick a different vocab_size, "
                        "or hard_vocab_limit=False to accept a smaller vocabulary)")
            raise ValueError(f"sentencepiece training failed: {msg}{hint}") from None
        tok = cls(buf.getvalue())
        if model_prefix_or_dir is not None:
            tok.save(model_prefix_or_dir)
        return tok

    def save(self, model_prefix_or_dir: str | os.PathLike) -> Path:
        """Write ``<prefix>.model`` and ``<prefix>.vocab`` (dir → ``dir/tokenizer.*``); returns the .model path."""
        s = os.fspath(model_prefix_or_dir)
        p = Path(s)
        if p.is_dir() or s.endswith(("/", os.sep)):
            p.mkdir(parents=True, exist_ok=True)
            p = p / "tokenizer"
        elif p.suffix == ".model":
            p = p.with_suffix("")
        p.parent.mkdir(parents=True, exist_ok=True)
        model = p.with_name(p.name + ".model")
        model.write_bytes(self._proto)
        vocab = "".join(f"{self._sp.IdToPiece(i)}\t{self._sp.GetScore(i)}\n" for i in range(self.vocab_size))
        p.with_name(p.name + ".vocab").write_text(vocab, encoding="utf-8")
        self.path = str(model)
        return model

    # ---------------------------------------------------------------- properties
    @property
    def model_proto(self) -> bytes:
        """Serialized sentencepiece model."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_eos: bool = False, add_bos: bool = False) -> list[int]:
        """``text`` → list of ids (no BOS by default, as the reference). ``add_eos`` appends eos_id."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return list(self._sp.encode(text, add_bos=add_bos, add_eos=add_eos))

    def encode_batch(self, texts: Sequence[str], add_eos: bool = False, add_bos: bool = False,
                     num_threads: int = 1) -> list[list[int]]:
        """List of str → list of id lists (sentencepiece's batched encoder, ``num_threads`` threads)."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
        if not texts:
            return []
        return [list(x) for x in self._sp.encode(texts, add_bos=add_bos, add_eos=add_eos,
                                                 num_threads=num_threads)]

    def encode_flat(self, texts: Sequence[str], add_eos: bool = True, num_threads: int = 1,
                    dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
        """Documents → (tokens ``dtype`` [n], lengths int64 [len(texts)]): all ids back to back, as
        :meth:`encode_batch` gives them (EOS appended by default), without a Python list per document."""
        ids = self._sp.encode(list(texts), add_eos=add_eos, num_threads=num_threads) if texts else []
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum())), lengths

    def decode(self, ids: Iterable[int]) -> str:
        """Ids → text, stopping at the first eos_id and dropping pad ids (and bos)."""
        out: list[int] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            out.append(i)
        return self._sp.decode(out)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        """Decode each row (see :meth:`decode`)."""
        return [self.decode(row) for row in batch]

    def id_to_piece(self, i: int) -> str:
        """Piece string of id ``i``."""
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
        return self._sp.IdToPiece(i)

    def piece_to_id(self, piece: str) -> int:
        """Id of ``piece`` (unk_id if unknown)."""
        return int(self._sp.PieceToId(piece))

    # ---------------------------------------------------------------- pickling / repr
    def __getstate__(self):
        return {"proto": self._proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["proto"], path=state["path"])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, unk={self.unk_id}, "
                f"bos={self.bos_id}, eos={self.eos_id}, path={self.path!r})")


def _as_files(arg) -> list[str] | None:
    """List of file paths if ``arg`` names files (Path, str path, list of Paths), else None."""
    if isinstance(arg, (str, os.PathLike)):
        if isinstance(arg, str) and not os.path.isfile(arg):
            if "\n" in arg or not os.path.splitext(arg)[1]:
                raise ValueError("texts_or_files is a single str that is not an existing file; pass a list "
                                 "of documents (list[str]) to train on text")
            raise FileNotFoundError(f"texts_or_files: training file not found: {arg!r}")
        paths = [os.fspath(arg)]
    elif isinstance(arg, (list, tuple)) and arg and all(isinstance(a, os.PathLike) for a in arg):
        paths = [os.fspath(a) for a in arg]
    else:
        return None
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"texts_or_files: training file not found: {p!r}")
    return paths


def _iter_lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of every document (sentencepiece trains on sentences/lines)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts_or_files[{i}] must be str, got {type(t).__name__}")
        for line in t.splitlines():
            line = line.strip()
            if line:
                yield line
