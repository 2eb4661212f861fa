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
