"""The OpenAI completions protocol: the request body (validated: unknown fields and bad values are
errors), the engine requests it becomes, and the response / stream-chunk bodies.

Follows OpenAI's legacy ``/v1/completions`` (and vLLM's extensions ``top_k``, ``seed``): a prompt
is text, token ids, or a list of either; ``temperature`` 0 means greedy (``top_k`` 1, as
`decode.sampling`); ``ignore_eos``; ``logprobs`` (0..5) gives each token's log p and the most likely tokens, with
``echo`` also the prompt's (the first prompt token has none), which is how lm-evaluation-harness's
``local-completions`` scores log-likelihoods.  ``n`` completions per prompt are n engine requests
(seeds ``seed``, ``seed + 1``, ...).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CompletionRequest", "StreamOptions", "TokenizeRequest", "DetokenizeRequest", "MAX_LOGPROBS",
           "MAX_N", "error_body", "token_text", "logprobs_body"]

MAX_LOGPROBS = 5
MAX_N = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = True


class CompletionRequest(BaseModel):
    """POST /v1/completions body (unknown fields are refused: HTTP 400)."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(1.0, ge=0.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(0, ge=-1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = None
    presence_penalty: float | None = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float | None = Field(0.0, ge=0.0, le=0.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    suffix: Literal[""] | None = None
    user: str | None = None
    ignore_eos: bool = False            # vLLM's extension: generate max_tokens tokens whatever comes


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize body (the text form)."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """vLLM's POST /detokenize body."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: int = 400) -> dict:
    """An OpenAI-style error body."""
    return {"object": "error", "error": {"message": message, "type": kind, "param": param, "code": code}}


def token_text(tokenizer, tok: int) -> str:
    """A token's text in logprobs: its sentencepiece piece, word boundary as a space."""
    if tokenizer is None:
        return str(int(tok))
    return tokenizer.id_to_piece(int(tok)).replace("\u2581", " ")


def logprobs_body(tokenizer, tokens, entries, k: int, offset0: int = 0) -> dict:
    """The legacy completions ``logprobs`` object of tokens (ids) with entries (None or
    (log p, {top id: log p})): the k most likely plus the token itself in each ``top_logprobs``."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset0
    for tok, e in zip(tokens, entries):
        s = token_text(tokenizer, tok)
        out["tokens"].append(s)
        out["text_offset"].append(pos)
        pos += len(s)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        lp, top = e
        best = dict(sorted(top.items(), key=lambda kv: -kv[1])[:k])
        best.setdefault(int(tok), lp)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({token_text(tokenizer, i): v for i, v in best.items()})
    return out
