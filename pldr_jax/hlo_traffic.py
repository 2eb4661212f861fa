"""Off-chip memory traffic of a compiled accelerator program, read from its optimised HLO text
(`pldr_jax.hlo` reads it).

XLA's ``cost_analysis()["bytes accessed"]`` adds up the operands and results of every instruction
whatever memory they live in.  On a TPU most of a decode step's instructions read and write
on-chip memory (VMEM: the compiler prefetches whole KV buffers and weights into it, then every
fusion reads them there), so that figure counts a buffer several times and says little about the
HBM bandwidth a step needs.  The compiled HLO marks every on-chip value in its layout
(``{...S(1)}``, ``S(2)``, ...); `hbm_traffic` counts only what crosses HBM:

* an instruction reads each operand that lives in HBM and writes its result if it lives in HBM;
* an asynchronous copy or slice (``copy-start``: a (destination, source, context) tuple;
  ``slice-start``: ((source), destination, context)) moves its destination's bytes (read from HBM
  when its source is there, written to HBM when its destination is);
* a ``dynamic-update-slice`` (alone or at a fusion's root) is in place: it reads and writes the
  update only;
* a fusion operand used inside the fusion only by ``slice`` / ``dynamic-slice`` / ``gather`` (or
  passed to a nested fusion that only slices it) is read for those results' bytes only (an
  embedding lookup reads its rows, not the table; a loop iteration reads its chunk of a buffer);
* ``parameter``, ``tuple``, ``get-tuple-element``, ``bitcast``, ``constant`` and the ``*-done``
  halves of asynchronous pairs move nothing.

* a ``while`` moves nothing itself (its carried values stay where they live); its body counts as
  often as the loop runs: the compiler's ``known_trip_count``, else a counted loop's bound read
  from its condition (`while_trip`), else ``unknown_trip`` times (a loop whose trip count is a
  runtime value: the decode step's attention over the live KV-cache slots, `pldr_jax.aot` passes
  the mean number of chunks); its condition is left out (scalars).

Other called computations (conditionals, calls) are not walked.  The result is an estimate of the
same kind as XLA's cost model (it ignores caching of re-read HBM values and any padding in tiles).
"""

from __future__ import annotations

import re

from .hlo import array_bytes, arrays, computations, instructions, while_trip

__all__ = ["hbm_traffic", "while_trip"]

_FREE = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "copy-done", "slice-done",
         "after-all", "partition-id", "replica-id", "opt-barrier"}
_SLICERS = {"slice", "dynamic-slice", "gather"}
_BODY = re.compile(r"body=%?([\w.\-]+)")


def _hbm(arrs) -> int:
    return sum(b for b, on_chip in arrs if not on_chip)


_CALLED = re.compile(r"calls=%([\w.\-]+)")


def _called_reads(line: str, comps: dict[str, list[str]], memo: dict):
    """`_fusion_reads` of the fused computation the fusion on `line` calls (None if it is not in
    `comps`, or while it is being read: no recursion through a cycle), memoised in `memo`."""
    called = _CALLED.search(line)
    if not called or called.group(1) not in comps:
        return None
    key = called.group(1)
    if key not in memo:
        memo[key] = None
        memo[key] = _fusion_reads(comps[key], comps, memo)
    return memo[key]


def _fusion_reads(body: list[str], comps: dict[str, list[str]],
                  memo: dict) -> tuple[dict[int, int | None], int | None]:
    """For a fused computation: {parameter index: bytes read when only sliced / gathered, else None},
    and the update's bytes when its root is a dynamic-update-slice (None otherwise).  A parameter
    passed on to a nested fusion (`comps`: the module's computations; `memo`: see `_called_reads`)
    counts as sliced when the nested fusion only slices it."""
    instrs = instructions(body)
    types = {name: typ for name, typ, *_ in instrs}
    params, users = {}, {}
    for name, typ, op, operands, line in instrs:
        if op == "parameter":
            params[name] = int(re.search(r"parameter\((\d+)\)", line).group(1))
        for position, o in enumerate(operands):
            users.setdefault(o, []).append((op, typ, position, line))

    def sliced_bytes(op, typ, position, line) -> int | None:
        if op in _SLICERS:
            return array_bytes(typ) if position == 0 else None
        nested = _called_reads(line, comps, memo) if op == "fusion" else None
        return nested[0].get(position) if nested else None

    reads = {}
    for name, index in params.items():       # sliced / gathered from (operand 0; not the indices)
        parts = [sliced_bytes(*u) for u in users.get(name, [])]
        reads[index] = sum(parts) if parts and all(p is not None for p in parts) else None
    dus = None
    for name, typ, op, operands, line in instrs:
        if "ROOT" in line.split("=")[0] and op == "dynamic-update-slice" and len(operands) > 1:
            dus = array_bytes(types.get(operands[1], ""))
    return reads, dus


def hbm_traffic(hlo_text: str, unknown_trip: float | None = None) -> dict:
    """Estimated HBM bytes one run of a compiled program moves (see the module docstring).

    hlo_text: ``compiled.as_text()`` of an accelerator executable.  unknown_trip: how many times a
    ``while`` whose trip count is a runtime value runs (may be fractional: a mean); None = such a
    loop is an error.  Returns {"read", "write", "total"} bytes, "by_opcode" {opcode: bytes} and
    "loops" (how many ``while`` instructions were walked, "unknown_trip" of them at unknown_trip).
    """
    comps, entry = computations(hlo_text)
    fused = {}
    totals = {"read": 0.0, "write": 0.0, "loops": 0, "unknown_trip": 0}
    by_op: dict[str, float] = {}

    def walk(comp: str, times: float, depth: int = 0) -> None:
        types: dict[str, str] = {}
        for name, typ, op, operands, line in instructions(comps[comp]):
            types[name] = typ
            if op == "while":
                body = _BODY.search(line)
                trip = while_trip(line, comps)
                totals["loops"] += 1
                if trip is None:
                    if unknown_trip is None:
                        raise ValueError(f"while loop %{name} in {comp} has a runtime trip count: pass "
                                         "unknown_trip (how many times it runs)")
                    totals["unknown_trip"] += 1
                    trip = unknown_trip
                if body and body.group(1) in comps and depth < 16:
                    walk(body.group(1), times * trip, depth + 1)
                continue
            if op in _FREE:
                continue
            if op in ("copy-start", "slice-start"):
                arrs = arrays(typ)          # copy-start: (destination, source, context);
                if len(arrs) < 2:            # slice-start: ((source), destination, context)
                    continue
                src, dst = (arrs[1], arrs[0]) if op == "copy-start" else (arrs[0], arrs[1])
                moved = dst[0]
                r, w = (0 if src[1] else moved), (0 if dst[1] else moved)
            elif op == "dynamic-update-slice" and len(operands) > 1:
                upd = array_bytes(types.get(operands[1], ""))
                r, w = upd, upd
            else:
                reads, dus = (_called_reads(line, comps, fused) if op == "fusion" else None) or ({}, None)
                r = 0
                for i, o in enumerate(operands):
                    arrs = arrays(types.get(o, ""))
                    if dus is not None and i == 0:
                        continue                             # the buffer updated in place
                    part = reads.get(i)
                    r += _hbm(arrs) if part is None else (0 if all(c for _, c in arrs) else part)
                w = _hbm(arrays(typ))
                if dus is not None:
                    w = min(w, dus)
            totals["read"] += r * times
            totals["write"] += w * times
            by_op[op] = by_op.get(op, 0) + (r + w) * times

    walk(entry, 1.0)
    read, write = totals["read"], totals["write"]
    return {"read": read, "write": write, "total": read + write,
            "by_opcode": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "loops": totals["loops"], "unknown_trip": totals["unknown_trip"]}
