"""`pldr_jax.hlo_traffic.hbm_traffic` on a hand-written TPU-style HLO module: on-chip (S(1)) values
are free, asynchronous copies / slices move their destination once, a dynamic-update-slice is in
place, a gather reads its rows, not its table."""

from __future__ import annotations

import pytest

from pldr_jax.hlo_traffic import hbm_traffic

HLO = """HloModule step, is_scheduled=true

%gather_body (p0: bf16[1000,64], p1: s32[8]) -> bf16[8,64] {
  %p0 = bf16[1000,64]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = s32[8]{0} parameter(1)
  ROOT %g = bf16[8,64]{1,0:T(8,128)(2,1)S(1)} gather(%p0, %p1), offset_dims={1}
}

%dus_body (q0: f32[4,128], q1: f32[1,128], q2: s32[]) -> f32[4,128] {
  %q0 = f32[4,128]{1,0} parameter(0)
  %q1 = f32[1,128]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %d = f32[4,128]{1,0} dynamic-update-slice(%q0, %q1, %q2, %z)
}

ENTRY %main (a: bf16[1000,64], b: s32[8], c: f32[4,128], u: f32[1,128], i: s32[], w: f32[256,256]) -> f32[4,128] {
  %a = bf16[1000,64]{1,0:T(8,128)(2,1)} parameter(0)
  %b = s32[8]{0} parameter(1)
  %c = f32[4,128]{1,0} parameter(2)
  %u = f32[1,128]{1,0} parameter(3)
  %i = s32[] parameter(4)
  %w = f32[256,256]{1,0} parameter(5)
  %rows = bf16[8,64]{1,0:T(8,128)(2,1)S(1)} fusion(%a, %b), kind=kLoop, calls=%gather_body
  %cs = (f32[256,256]{1,0:S(1)}, f32[256,256]{1,0}, u32[]{:S(2)}) copy-start(%w)
  %cd = f32[256,256]{1,0:S(1)} copy-done(%cs)
  %ss = ((f32[256,256]{1,0}), f32[128,256]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:128], [0:256]}
  %sd = f32[128,256]{1,0:S(1)} slice-done(%ss)
  %back = (f32[128,256]{1,0}, f32[128,256]{1,0:S(1)}, u32[]{:S(2)}) copy-start(%sd)
  %on_chip = f32[256,256]{1,0:S(1)} add(%cd, %cd)
  %upd = f32[4,128]{1,0} fusion(%c, %u, %i), kind=kLoop, calls=%dus_body
  ROOT %dus = f32[4,128]{1,0} dynamic-update-slice(%upd, %u, %i, %i)
}
"""


def test_counts_hbm_only():
    r = hbm_traffic(HLO)
    gather = 8 * 64 * 2 + 8 * 4                  # the 8 gathered rows + the indices (the table is not read)
    prefetch = 256 * 256 * 4                      # copy-start: HBM -> on chip, read once
    sliced = 128 * 256 * 4                        # slice-start: half of w read
    write_back = 128 * 256 * 4                    # copy-start: on chip -> HBM, written once
    update, index = 128 * 4, 4                    # in place: the fusion's update reads u and i, the plain
    assert r["read"] == gather + prefetch + sliced + (update + index) + update   # one its update only
    assert r["write"] == write_back + 2 * update
    assert r["total"] == r["read"] + r["write"]
    assert r["by_opcode"]["add"] == 0             # on-chip arithmetic moves nothing


def test_no_entry_is_an_error():
    with pytest.raises(ValueError, match="ENTRY"):
        hbm_traffic("HloModule m\n")


LOOP_HLO = """HloModule chunks, is_scheduled=true

%slice_inner (s0: bf16[64,128], s1: s32[]) -> bf16[16,128] {
  %s0 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %s1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = bf16[16,128]{1,0:T(8,128)(2,1)} dynamic-slice(%s0, %s1, %z), dynamic_slice_sizes={16,128}
}

%chunk_dot (f0: bf16[64,128], f1: s32[], f2: bf16[128]) -> f32[16] {
  %f0 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %f1 = s32[] parameter(1)
  %f2 = bf16[128]{0:S(1)} parameter(2)
  %chunk = bf16[16,128]{1,0:T(8,128)(2,1)} fusion(%f0, %f1), kind=kLoop, calls=%slice_inner
  ROOT %d = f32[16]{0:S(1)} dot(%chunk, %f2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (t: (s32[], s32[], bf16[64,128], bf16[128], f32[16])) -> (s32[], s32[], bf16[64,128], bf16[128], f32[16]) {
  %t = (s32[], s32[], bf16[64,128]{1,0:T(8,128)(2,1)}, bf16[128]{0:S(1)}, f32[16]{0:S(1)}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] get-tuple-element(%t), index=1
  %buf = bf16[64,128]{1,0:T(8,128)(2,1)} get-tuple-element(%t), index=2
  %q = bf16[128]{0:S(1)} get-tuple-element(%t), index=3
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %out = f32[16]{0:S(1)} fusion(%buf, %i, %q), kind=kOutput, calls=%chunk_dot
  ROOT %r = (s32[], s32[], bf16[64,128]{1,0:T(8,128)(2,1)}, bf16[128]{0:S(1)}, f32[16]{0:S(1)}) tuple(%next, %n, %buf, %q, %out)
}

%cond (c: (s32[], s32[], bf16[64,128], bf16[128], f32[16])) -> pred[] {
  %c = (s32[], s32[], bf16[64,128]{1,0:T(8,128)(2,1)}, bf16[128]{0:S(1)}, f32[16]{0:S(1)}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %cn = s32[] get-tuple-element(%c), index=1
  ROOT %lt = pred[] compare(s32[] %ci, s32[] %cn), direction=LT
}

ENTRY %main (a: bf16[64,128], q: bf16[128], n: s32[]) -> f32[16] {
  %a = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %q = bf16[128]{0:S(1)} parameter(1)
  %n = s32[] parameter(2)
  %zero = s32[] constant(0)
  %acc = f32[16]{0:S(1)} constant({...})
  %init = (s32[], s32[], bf16[64,128]{1,0:T(8,128)(2,1)}, bf16[128]{0:S(1)}, f32[16]{0:S(1)}) tuple(%zero, %n, %a, %q, %acc)
  %w = (s32[], s32[], bf16[64,128]{1,0:T(8,128)(2,1)}, bf16[128]{0:S(1)}, f32[16]{0:S(1)}) while(%init), condition=%cond, body=%body
  ROOT %res = f32[16]{0:S(1)} get-tuple-element(%w), index=4
}
"""


def test_while_body_counts_per_trip_and_reads_its_chunk():
    """A loop over 16-row chunks of a 64-row HBM buffer (the decode attention over the live
    KV-cache): each trip reads one chunk through the nested fusion's dynamic-slice, not the buffer;
    a runtime trip count needs unknown_trip; a known or counted trip count is used as it is."""
    chunk = 16 * 128 * 2
    per_trip = chunk + 4 + 8                      # the chunk + the offset i; the counter's add reads i, 1
    r = hbm_traffic(LOOP_HLO, unknown_trip=2.5)
    assert r["loops"] == 1 and r["unknown_trip"] == 1
    assert r["read"] == pytest.approx(2.5 * per_trip) and r["write"] == pytest.approx(2.5 * 4)
    with pytest.raises(ValueError, match="runtime trip count"):
        hbm_traffic(LOOP_HLO)
    known = LOOP_HLO.replace("condition=%cond, body=%body",
                             'condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}')
    r = hbm_traffic(known)
    assert r["unknown_trip"] == 0 and r["read"] == 4 * per_trip
    counted = LOOP_HLO.replace("%ci = s32[] get-tuple-element(%c), index=0",
                               "%ci = s32[] get-tuple-element(%c), index=0\n  %cn7 = s32[] constant(3)").replace(
        "compare(s32[] %ci, s32[] %cn)", "compare(s32[] %ci, s32[] %cn7)")
    assert hbm_traffic(counted)["read"] == 3 * per_trip
