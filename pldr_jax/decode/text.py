"""Text in, text out: `generate_text` with the sentencepiece tokenizer (`pldr_jax.data.tokenizer`).

Prompts are encoded as the reference's ``generate_text`` does: no BOS and no EOS (the reference
encodes with an EOS and drops it; a prompt that encodes to nothing keeps the EOS alone, as the
reference keeps a single-token encoding).  Generation stops at the tokenizer's EOS id (3 for the
paper's tokenizer); the EOS is not part of the returned text.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np

from .generate import GenerateOutput, generate

__all__ = ["generate_text", "stream_text", "TextOutput", "encode_prompts", "as_tokenizer"]


@dataclasses.dataclass
class TextOutput:
    """texts: completions (one per prompt; prompt + completion with include_prompt=True).
    prompt_ids: the encoded prompts.  output: the underlying `GenerateOutput`."""
    texts: list
    prompt_ids: list
    output: GenerateOutput

    def __iter__(self):
        return iter(self.texts)

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return self.texts[i]


def as_tokenizer(tokenizer):
    """A Tokenizer instance, or a path to a sentencepiece .model file."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from ..data.tokenizer import Tokenizer
        return Tokenizer.load(tokenizer)
    for attr in ("encode", "decode"):
        if not callable(getattr(tokenizer, attr, None)):
            raise ValueError(f"tokenizer must be a pldr_jax Tokenizer or a .model path; {type(tokenizer).__name__} "
                             f"has no {attr}()")
    return tokenizer


def _eos_of(tok) -> int:
    eos = getattr(tok, "eos_id", 3)
    eos = eos() if callable(eos) else eos
    return 3 if eos is None or eos < 0 else int(eos)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Encode prompts like the reference: no BOS, no EOS; an empty encoding becomes [eos]."""
    out = []
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"prompts must be strings, got {type(p).__name__}")
        ids = list(tokenizer.encode(p, add_eos=False))
        out.append(ids if ids else [_eos_of(tokenizer)])
    return out


def _decode_new(tokenizer, ids, eos):
    ids = list(ids)
    if ids and ids[-1] == eos:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def generate_text(cfg, params, tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
                  include_prompt: bool = False, eos_id: int | None | str = "tokenizer", **kwargs):
    """Generate completions for one prompt (str -> str) or a list of prompts (-> `TextOutput`,
    which iterates and indexes like a list of completions).

    tokenizer: a `pldr_jax.data.tokenizer.Tokenizer` or a path to a sentencepiece .model.
    include_prompt: return prompt + completion decoded together (the reference's output).
    eos_id: default the tokenizer's EOS; None disables the EOS stop.  Other keyword arguments go to
    `generate`: options (a `DecodeOptions`) and its fields (kv_cache, g_cache, temperature, top_k,
    top_p, seed, g_lm, shared_g, ...), mesh, backend, backend_options.
    """
    tok = as_tokenizer(tokenizer)
    single = isinstance(prompts, str)
    plist = [prompts] if single else list(prompts)
    if not plist:
        raise ValueError("prompts must be a string or a non-empty list of strings")
    eos = _eos_of(tok) if eos_id == "tokenizer" else eos_id
    ids = encode_prompts(tok, plist)
    out = generate(cfg, params, ids, max_new_tokens=max_new_tokens, eos_id=eos, **kwargs)
    strip = _eos_of(tok) if eos is None else eos
    if include_prompt:
        texts = [_decode_new(tok, list(p) + list(t), strip) for p, t in zip(ids, out.tokens)]
    else:
        texts = [_decode_new(tok, t, strip) for t in out.tokens]
    if single:
        return texts[0]
    return TextOutput(texts=texts, prompt_ids=ids, output=out)


def stream_text(cfg, params, tokenizer, prompt: str, *, max_new_tokens: int = 64,
                eos_id: int | None | str = "tokenizer", **kwargs) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece (text deltas) as tokens are generated."""
    from .stream import stream_generate
    tok = as_tokenizer(tokenizer)
    eos = _eos_of(tok) if eos_id == "tokenizer" else eos_id
    ids = encode_prompts(tok, [prompt])
    new: list[int] = []
    shown = ""
    for step in stream_generate(cfg, params, ids, max_new_tokens=max_new_tokens, eos_id=eos, **kwargs):
        if not bool(np.asarray(step.active)[0]):
            break
        t = int(step.tokens[0])
        if eos is not None and t == eos:
            break
        new.append(t)
        text = tok.decode(new)
        # hold back an incomplete byte-fallback character; emit only clean extensions
        if not text.endswith("\ufffd") and text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tok.decode(new)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]
