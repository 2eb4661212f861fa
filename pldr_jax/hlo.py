"""Reading a compiled XLA program's HLO text (``compiled.as_text()``): its computations, their
instructions, array bytes, loop trip counts and collectives.

Shared by `pldr_jax.hlo_traffic` (HBM bytes a program moves) and `pldr_jax.aot` (collectives per
step); TPU and GPU HLO alike (on-chip values: an ``S(n)`` memory space in the layout).
"""

from __future__ import annotations

import collections
import re

__all__ = ["ITEM_BYTES", "COLLECTIVES", "arrays", "array_bytes", "computations", "instructions", "while_trip",
           "collectives_per_step"]

#: bytes per element of every HLO element type
ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
              "u32": 4, "f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_ARRAY = re.compile(r"\b(" + "|".join(sorted(ITEM_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\(\d+\)")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_COND = re.compile(r"condition=%?([\w.\-]+)")
_S32_CONST = re.compile(r"s32\[\]\S*\s+constant\((\d+)\)")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_COLL = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CHANNEL = re.compile(r"channel_id=(\d+)")
_LAYOUT = re.compile(r"\{[^}]*\}")


def arrays(type_text: str) -> list[tuple[int, bool]]:
    """(bytes, on_chip) of every array in an HLO type (a tuple type lists several)."""
    out = []
    for dt, dims, layout in _ARRAY.findall(type_text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        out.append((n * ITEM_BYTES[dt], bool(_ON_CHIP.search(layout or ""))))
    return out


def array_bytes(type_text: str) -> int:
    """The bytes of every array in an HLO type, wherever they live."""
    return sum(b for b, _ in arrays(type_text))


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """({computation name: its instruction lines}, the entry computation's name).  ValueError when
    the text has no ENTRY computation."""
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in hlo_text.splitlines():
        if cur is None:
            m = _COMP.match(line)
            if m:
                cur = m.group(2)
                comps[cur] = []
                if m.group(1):
                    entry = cur
        elif line.startswith("}"):
            cur = None
        else:
            comps[cur].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def instructions(lines: list[str]) -> list[tuple[str, str, str, list[str], str]]:
    """(name, result type, opcode, operand names, whole line) of every instruction in `lines`."""
    out = []
    for line in lines:
        m = _INSTR.match(line)
        if m:
            args = m.group(4).split("), ")[0]
            out.append((m.group(1), m.group(2), m.group(3), re.findall(r"%([\w.\-]+)", args), line))
    return out


def while_trip(line: str, comps: dict[str, list[str]]) -> int | None:
    """The trip count of the ``while`` instruction on `line`: the compiler's known_trip_count, else
    a counted loop's (`lax.scan` / `fori_loop` with a static bound: i from 0, i < N) read from its
    condition computation in `comps` ({name: instruction lines}: one s32 constant N compared with
    direction=LT); None when neither says (a runtime trip count)."""
    known = _TRIP.search(line)
    if known:
        return int(known.group(1))
    cond = _COND.search(line)
    lines = comps.get(cond.group(1), []) if cond else []
    consts = {int(c) for ln in lines for c in _S32_CONST.findall(ln)}
    if len(consts) == 1 and any("compare(" in ln and "direction=LT" in ln for ln in lines):
        return consts.pop()
    return None


def _results(type_text: str) -> str:
    """The results of a collective's HLO type: an asynchronous start on GPU has the type
    ((operands...), (results...)): its second group; any other type as it is."""
    t = type_text.strip()
    if not t.startswith("(("):
        return t
    depth = 0
    for i, ch in enumerate(t[1:], 1):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return t[i + 1:]
    return t


def collectives_per_step(hlo_text: str, unknown_trip: int = 1) -> tuple[dict, int]:
    """({op: {"count", "bytes", "max_bytes"}}, unknown_trip_loops) of a compiled HLO module, per
    execution of its entry computation: every computation's collectives are multiplied by how many
    times it runs (a while body / condition by the loop's trip count: `while_trip`; a loop without
    one -- the decode loop's early-exit while -- counts `unknown_trip` times and is reported in
    unknown_trip_loops).  Async collectives count at their start.  Bytes: each collective's result
    shapes (not its operands, which a GPU's asynchronous start also lists) (as ../shared/tpu/fsdp_anchor.py counts them), per chip."""
    comps, entry = computations(hlo_text)
    calls: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
    unknown = 0
    for c, lines in comps.items():
        for line in lines:
            trip = 1
            if " while(" in line:
                known = while_trip(line, comps)
                if known is not None:
                    trip = known
                else:
                    unknown += 1
                    trip = unknown_trip
            for kind, callee in _CALLS.findall(line):
                if callee in comps:
                    calls[c].append((callee, trip if kind in ("body", "condition") else 1))
            for group in _BRANCHES.findall(line):
                for callee in group.split(","):
                    callee = callee.strip().lstrip("%")
                    if callee in comps:
                        calls[c].append((callee, 1))
    mult: dict[str, int] = collections.Counter()

    def visit(c, m, depth=0):
        mult[c] += m
        if depth < 64:
            for callee, f in calls[c]:
                visit(callee, m * f, depth + 1)

    visit(entry, 1)
    # One collective can be printed many times: the TPU compiler spreads an async collective over
    # several "async_collective_fusion" computations (each shows the op with its full result shape,
    # same channel_id).  Such copies are one transfer: ops are keyed by (kind, channel_id, shape) and
    # counted once, as often as the computation that runs them most often.
    ops: dict = {}
    for c, lines in comps.items():
        if not mult[c]:
            continue
        for i, line in enumerate(lines):
            m = _COLL.search(line)
            if m:
                chan = _CHANNEL.search(line)
                shape = _LAYOUT.sub("", m.group(1))
                key = (m.group(2), chan.group(1), shape) if chan else (m.group(2), c, i)
                b, n = ops.get(key, (array_bytes(_results(m.group(1))), 0))
                ops[key] = (b, max(n, mult[c]))
    out = {}
    for (kind, *_), (b, n) in ops.items():
        o = out.setdefault(kind, {"count": 0, "bytes": 0, "max_bytes": 0})
        o["count"] += n
        o["bytes"] += b * n
        o["max_bytes"] = max(o["max_bytes"], b)
    return {k: out[k] for k in COLLECTIVES if k in out}, unknown
