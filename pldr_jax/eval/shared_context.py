"""Packing the continuations of one context into one row, so that they share the context's pass.

Where the scoring mode makes a context's hidden states independent of what follows it -- mode
``"cached"`` (G_LM from the context alone, then causal attention with that fixed G), or any mode with
a fixed G_LM (a given ``g_lm``, predefined-G models) -- the requests that share a context (a
multiple-choice item's K choices) are scored in one *packed row*: the context once, then every
continuation's input tokens, each at the positions it would have right after the context::

    tokens:     c0 c1 .. c(n-1) | a0 a1 a2 | b0     | ...      (a, b: continuations minus their last token)
    positions:  0  1  .. n-1    | n  n+1 n+2 | n    | ...
    segment:    1  1  .. 1      | 2  2  2  | 3      | ...      (0 = padding)

A token attends to the context tokens at positions <= its own and to the earlier tokens of its own
segment (`packed_mask`); the metric tensor A sums over the context tokens only (segment 1).  Layer by
layer, the context's queries -- hence A and G_LM -- are then those of the context alone, and every
continuation token sees exactly the keys it sees in its own unshared pass: every score equals the
unshared one up to float32 rounding, for one pass over the context per item instead of two
(G pass + scoring pass) per choice.  The first continuation token of every choice is scored from the
context's last position, shared by all of them.

Mode ``"full"`` (the default, the paper's lm-eval setting) is not shareable: A sums over every
token of context + continuation, so each choice changes the context's own hidden states; each
request there is its own row (`multiple_choice.score_units`).

This module is plain Python (no JAX): it builds the rows; `multiple_choice` scores them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

__all__ = ["PackedRow", "shareable", "pack_requests"]


def shareable(mode: str, fixed_g: bool) -> bool:
    """Whether requests sharing a context may share its pass exactly: mode "cached", or a fixed G_LM
    (then every mode scores with causal attention and that G)."""
    return mode == "cached" or fixed_g


@dataclasses.dataclass
class PackedRow:
    """One row: tokens, RoPE positions and segment ids (1 = context, 2.. = one continuation each), all
    of one length <= max_seq_len; scored: (row index whose output predicts the target, target id,
    request index) per scored token."""
    tokens: list
    positions: list
    segments: list
    scored: list


def pack_requests(requests: Sequence[tuple[list, list]], max_len: int) -> list[PackedRow]:
    """Requests (context ids [n >= 1], continuation ids [m >= 1], with n + m - 1 <= max_len: the
    row input of the unshared pass) -> packed rows, one per distinct context (more when its
    continuations do not fit in max_len tokens; the context is then repeated).  Requests with equal
    context ids share a row; the order of rows follows each context's first request."""
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        groups.setdefault(tuple(ctx), []).append(i)
    rows: list[PackedRow] = []
    for ctx, members in groups.items():
        n = len(ctx)
        row = None
        for i in members:
            cont = list(requests[i][1])
            m = len(cont)
            if n + m - 1 > max_len:
                raise ValueError(f"request {i}: context {n} + continuation {m} - 1 tokens exceed {max_len}")
            if row is None or len(row.tokens) + m - 1 > max_len:
                row = PackedRow(list(ctx), list(range(n)), [1] * n, [])
                rows.append(row)
            seg = max(row.segments) + 1
            start = len(row.tokens)
            row.tokens += cont[:-1]
            row.positions += list(range(n, n + m - 1))
            row.segments += [seg] * (m - 1)
            row.scored.append((n - 1, cont[0], i))
            row.scored += [(start + j - 1, cont[j], i) for j in range(1, m)]
    return rows
