"""Length buckets: the static buffer lengths a decode call compiles for.

Prompt, cache and output lengths are rounded up to powers of two (>= `MIN_BUCKET`), so nearby prompt
lengths and token counts share one compilation of the prefill and of the decode loop.
"""

from __future__ import annotations

import numbers

from ..config import PLDRConfig

__all__ = ["MIN_BUCKET", "bucket_length", "plan_lengths"]

MIN_BUCKET = 16


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum)."""
    m = max(int(n), int(minimum), 1)
    return 1 << (m - 1).bit_length()


def plan_lengths(cfg: PLDRConfig, max_prompt: int, max_new_tokens: int, *, max_len: int | None = None,
                 stop_at_max_seq_len: bool = False) -> tuple[int, int, int]:
    """(P, S, N): padded prompt length, cache/sequence buffer length, output buffer length.

    P = bucket(longest prompt), N = bucket(max_new_tokens), S = bucket(P + N), all capped at
    max_seq_len (or S = `max_len` when given).  Buckets are powers of two (>= 16), so nearby prompt
    lengths and token counts share one compilation.
    """
    if max_prompt > cfg.max_seq_len:
        raise ValueError(f"a prompt has {max_prompt} tokens, more than the model's max_seq_len="
                         f"{cfg.max_seq_len}")
    if not stop_at_max_seq_len and max_prompt + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"the longest prompt ({max_prompt} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{max_prompt + max_new_tokens} exceeds the model's max_seq_len={cfg.max_seq_len}; lower "
            f"max_new_tokens to <= {cfg.max_seq_len - max_prompt} or pass stop_at_max_seq_len=True to stop "
            f"each row when it reaches max_seq_len")
    P = min(bucket_length(max_prompt), cfg.max_seq_len)
    N = bucket_length(max_new_tokens)
    if max_len is None:
        S = min(bucket_length(P + N), cfg.max_seq_len)
    else:
        if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len <= 0:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        S = int(max_len)
        if S > cfg.max_seq_len:
            raise ValueError(f"max_len={S} exceeds the model's max_seq_len={cfg.max_seq_len}")
        if S < max_prompt + (1 if stop_at_max_seq_len else max_new_tokens):
            raise ValueError(f"max_len={S} cannot hold the longest prompt ({max_prompt} tokens) + "
                             f"max_new_tokens ({max_new_tokens})")
        P = min(P, S)
    return P, S, N
