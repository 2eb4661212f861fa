"""The native XLA:CPU kernels (`pldr_jax.kernels`): the decode kernel's terms equal the jax.lax
path's, in place, masked slots never read; the packed matmul; the build's safety rules (a private
directory, owner / permission checks, the manifest's hashes, reuse, pruning), its fallback, and the
decode step that uses them.

Where a C++ compiler is found (or ``CI=true``) and the kernels are not switched off, the kernels
must build: a failed build fails these tests, it does not skip them.  The build-rule tests use a
stand-in compiler (a script that writes a file and counts its runs), so they run on any host.

The jax.lax path it replaces: the per-row scatter ``buf.at[rows, :, pos].set(...)`` then
`plga_attention` over the written heads-first buffers.  float32 tolerance: 2e-6 on O(1) outputs
(the two sum the same float32 terms in different orders; the jax.lax path's own merged vs two-axis
products differ by the same ~1e-7 per term); bfloat16: equal after the final rounding to
bfloat16 except where an exp differing in its last float32 bit flips a bfloat16 rounding (one
bfloat16 ulp of the output, 2^-7 relative).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import backend
from pldr_jax.decode.layouts import PackedLinear, TransposedLinear
from pldr_jax.kernels import build
from pldr_jax.kernels.decode_attention import decode_attention_available, decode_attention_update
from pldr_jax.ops.attention import plga_attention

#: the kernels must build here: switched on, and a compiler found (or CI, which has one)
EXPECT_KERNELS = build.enabled() and (build.compiler() is not None or os.environ.get("CI") == "true")
needs_kernel = pytest.mark.skipif(not EXPECT_KERNELS, reason="native kernels switched off, or no C++ compiler")


def _xla(q, g, kn, vn, pos, kb, vb, mask):
    rows = jnp.arange(q.shape[0])
    kb = kb.at[rows, :, pos].set(kn[:, 0].astype(kb.dtype))
    vb = vb.at[rows, :, pos].set(vn[:, 0].astype(vb.dtype))
    return plga_attention(q, kb, vb, g, mask, heads_first=True), kb, vb


def _case(seed, B, H, S, dk, cdt, kdt, shared_g=False):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(B, 1, H, dk)), cdt)
    kn, vn = (jnp.asarray(r.normal(size=(B, 1, H, dk)), cdt) for _ in range(2))
    kb, vb = (jnp.asarray(r.normal(size=(B, H, S, dk)), cdt).astype(kdt) for _ in range(2))
    g = jnp.asarray(r.normal(size=(1 if shared_g else B, H, dk, dk)) / np.sqrt(dk), jnp.float32)
    lens = r.integers(1, S + 1, size=B)
    lens[0] = S                                   # one full row
    pos = jnp.asarray(lens - 1, jnp.int32)
    valid = np.arange(S)[None] < lens[:, None]
    valid[-1, : lens[-1] // 2] = False             # a left-padded row (masked slots before its tokens)
    return q, g, kn, vn, pos, kb, vb, jnp.asarray(valid)[:, None, None, :]


@needs_kernel
@pytest.mark.parametrize("dk", [64, 24], ids=["dk64_vector_path", "dk24_scalar_path"])
@pytest.mark.parametrize("cdt,kdt", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
                                     (jnp.bfloat16, jnp.bfloat16)], ids=["f32", "bf16_f32cache", "bf16"])
@pytest.mark.parametrize("shared_g", [False, True], ids=["per_row_g", "shared_g"])
def test_kernel_equals_scatter_then_plga(dk, cdt, kdt, shared_g):
    args = _case(1, 5, 3, 21, dk, cdt, kdt, shared_g)
    want = jax.jit(_xla)(*args)
    got = jax.jit(decode_attention_update)(*args)
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype == cdt
    for w, g in zip(want[1:], got[1:]):                       # the buffers: exactly the scatter's
        assert g.dtype == w.dtype and np.array_equal(np.asarray(g), np.asarray(w))
    w, g = np.asarray(want[0], np.float32), np.asarray(got[0], np.float32)
    if cdt == jnp.float32:
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-6)
    else:
        np.testing.assert_allclose(g, w, rtol=2 ** -7, atol=2 ** -7)
        assert np.mean(g == w) > 0.95


@needs_kernel
def test_masked_slots_are_never_read_and_out_of_range_slots_not_written():
    q, g, kn, vn, pos, kb, vb, mask = _case(2, 4, 2, 16, 64, jnp.float32, jnp.float32)
    m = np.asarray(mask[:, 0, 0])
    poison = lambda buf: jnp.where(jnp.asarray(m)[:, None, :, None], buf, jnp.nan)
    clean = decode_attention_update(q, g, kn, vn, pos, jnp.where(jnp.asarray(m)[:, None, :, None], kb, 0),
                                    jnp.where(jnp.asarray(m)[:, None, :, None], vb, 0), mask)
    dirty = decode_attention_update(q, g, kn, vn, pos, poison(kb), poison(vb), mask)
    assert np.all(np.isfinite(np.asarray(dirty[0])))
    np.testing.assert_array_equal(np.asarray(dirty[0]), np.asarray(clean[0]))
    # a slot outside [0, S) writes nothing (the scatter's out-of-bounds update is dropped too)
    far = jnp.asarray([16, -1, 3, 200], jnp.int32)
    _, k2, v2 = decode_attention_update(q, g, kn, vn, far, kb, vb, mask.at[:, :, :, 3].set(True))
    k2, kb_np = np.asarray(k2), np.asarray(kb)
    np.testing.assert_array_equal(np.delete(k2, 2, axis=0), np.delete(kb_np, 2, axis=0))
    np.testing.assert_array_equal(k2[2, :, 3], np.asarray(kn)[2, 0])


@needs_kernel
def test_thread_counts_give_identical_results():
    args = _case(3, 7, 5, 33, 64, jnp.float32, jnp.float32)
    outs = [np.asarray(jax.jit(lambda *a, t=t: decode_attention_update(*a, threads=t))(*args)[0]) for t in (1, 2, 3)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@needs_kernel
def test_buffers_updated_in_place_inside_a_loop():
    """In a jitted loop carrying the buffers, the compiled program has no copy of a KV buffer per
    step (the custom call's outputs alias its inputs)."""
    q, g, kn, vn, pos, kb, vb, mask = _case(4, 2, 2, 8, 64, jnp.float32, jnp.float32)

    def loop(kb, vb):
        def body(i, c):
            kb, vb, acc = c
            o, kb, vb = decode_attention_update(q, g, kn, vn, jnp.minimum(pos + i, 7), kb, vb, mask)
            return kb, vb, acc + o
        return jax.lax.fori_loop(0, 3, body, (kb, vb, jnp.zeros_like(q)))

    hlo = jax.jit(loop, donate_argnums=(0, 1)).lower(kb, vb).compile().as_text()
    body = [ln for ln in hlo.splitlines() if " copy(" in ln and "f32[2,2,8,64]" in ln.split("copy(")[0]]
    assert not body, body


def test_bad_arguments_name_the_problem():
    q = jnp.zeros((2, 2, 3, 64))
    buf = jnp.zeros((2, 3, 8, 64))
    g = jnp.zeros((2, 3, 64, 64))
    pos = jnp.zeros((2,), jnp.int32)
    mask = jnp.ones((2, 8), bool)
    if not decode_attention_available():
        with pytest.raises(RuntimeError, match="unavailable"):
            decode_attention_update(q[:, :1], g, q[:, :1], q[:, :1], pos, buf, buf, mask)
        return
    with pytest.raises(ValueError, match="one-token"):
        decode_attention_update(q, g, q, q, pos, buf, buf, mask)
    with pytest.raises(ValueError, match="handles"):
        decode_attention_update(q[:, :1].astype(jnp.float16), g, q[:, :1], q[:, :1], pos, buf, buf, mask)
    with pytest.raises(ValueError, match="do not match"):
        decode_attention_update(q[:, :1], g, q[:, :1], q[:, :1], pos, buf, buf[:, :2], mask)
    with pytest.raises(ValueError, match="g_lm"):
        decode_attention_update(q[:, :1], g[:, :2], q[:, :1], q[:, :1], pos, buf, buf, mask)


@needs_kernel
@pytest.mark.parametrize("name", sorted(build.KERNELS))
def test_kernels_build_where_a_compiler_is(name):
    """With a compiler (or in CI) every kernel builds, verifies and registers; a failure fails here."""
    st = build.load(name)
    assert st.available, st.reason
    lib = Path(st.library)
    assert lib.parent == build.kernel_dir().expanduser().absolute() and stat.S_IMODE(os.stat(lib.parent).st_mode) & 0o022 == 0
    entry = build._read_manifest(lib.parent)[name]
    assert entry["library"] == lib.name and entry["library_sha256"] == build._sha256(lib)


@needs_kernel
def test_switching_off_stops_choosing_a_registered_kernel_not_using_it(monkeypatch):
    """Weights packed while the kernels were on still multiply after the switch is turned off; the
    backend no longer chooses the kernels."""
    assert build.load("packed_matmul").available
    monkeypatch.setenv(build.ENV_SWITCH, "off")
    assert build.load("packed_matmul").available
    assert backend.choices("cpu").decode_matmul == "xla" == backend.choices("cpu").decode_attention


FAKE_CC = """#!/bin/sh
# a stand-in C++ compiler: --version, else writes a distinct file to the -o path and counts its runs
if [ "$1" = "--version" ]; then echo "fakecc 1.0"; exit 0; fi
echo run >> "$(dirname "$0")/runs"
[ -n "$FAKE_CC_FAIL" ] && { echo "error: this is not C++" >&2; exit 1; }
while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
printf 'library %s' "$(od -An -N8 -tx8 /dev/urandom)" > "$out"
"""


@pytest.fixture
def fake_cc(tmp_path, monkeypatch):
    """A stand-in compiler as $CXX, a fresh build directory as $PLDR_JAX_KERNEL_DIR, and a process
    with nothing registered: (compiler path, build directory, number of compiler runs so far)."""
    cc = tmp_path / "bin" / "fakecc"
    cc.parent.mkdir()
    cc.write_text(FAKE_CC)
    cc.chmod(0o755)
    d = tmp_path / "kernels"
    monkeypatch.setenv("CXX", str(cc))
    monkeypatch.setenv(build.ENV_DIR, str(d))
    monkeypatch.delenv(build.ENV_SWITCH, raising=False)
    monkeypatch.delenv("FAKE_CC_FAIL", raising=False)
    monkeypatch.setattr(build, "_registered", {})
    monkeypatch.setattr(build, "_failed", {})
    monkeypatch.setattr(build, "_warned", set())
    runs = lambda: len((cc.parent / "runs").read_text().split()) if (cc.parent / "runs").exists() else 0
    return str(cc), d, runs


def _library(name, cc, d):
    return d / build._library_name(name, build._build_key(name, cc)["key"])


def _give_to_another_user(path, monkeypatch):
    """Make `path` owned by uid 65534: really (as root), else as `build` sees it."""
    if os.getuid() == 0:
        os.chown(path, 65534, 65534)
        return
    real = os.lstat
    other = lambda p, *a, **k: (os.stat_result((*real(p)[:4], 65534, *real(p)[5:])) if str(p) == str(path)
                                else real(p, *a, **k))
    monkeypatch.setattr(build.os, "lstat", other)


def test_build_dir_is_private_and_a_second_build_reuses_the_first(fake_cc):
    cc, d, runs = fake_cc
    old = os.umask(0)
    try:
        first = build.build("packed_matmul", cc=cc)
    finally:
        os.umask(old)
    assert first.built and runs() == 1 and first.library.parent == d
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700                   # created private despite umask 0
    again = build.build("packed_matmul", cc=cc)
    assert not again.built and again.library == first.library and runs() == 1   # no second compiler run
    entry = build._read_manifest(d)["packed_matmul"]
    assert entry["library"] == first.library.name and entry["library_sha256"] == build._sha256(first.library)
    assert entry["key"] == build._build_key("packed_matmul", cc)["key"] and entry["compiler_version"] == "fakecc 1.0"
    assert build.build("packed_matmul", cc=cc, force=True).built and runs() == 2


def test_changed_source_builds_anew_and_prunes_the_old_library(fake_cc, tmp_path, monkeypatch):
    cc, d, runs = fake_cc
    old = build.build("packed_matmul", cc=cc).library
    other = build.build("decode_attention", cc=cc).library
    src = tmp_path / "src"
    src.mkdir()
    (src / "packed_matmul.cc").write_text(build._SRC_DIR.joinpath("packed_matmul.cc").read_text() + "// changed\n")
    monkeypatch.setattr(build, "_SRC_DIR", src)
    new = build.build("packed_matmul", cc=cc)
    assert new.built and new.library != old and not old.exists() and other.exists()   # only its own old build
    assert build._read_manifest(d)["packed_matmul"]["library"] == new.library.name
    assert sorted(p.name for p in d.glob("libpldr_*")) == sorted([new.library.name, other.name])


def test_a_tampered_library_is_rebuilt(fake_cc, capsys):
    cc, d, runs = fake_cc
    lib = build.build("packed_matmul", cc=cc).library
    with open(lib, "ab") as f:
        f.write(b"\x90")                                   # changed after the build: hash mismatch
    r = build.build("packed_matmul", cc=cc)
    assert r.built and "hash" in r.note and runs() == 2
    assert "does not match the sha256" in capsys.readouterr().err
    assert build._sha256(lib) == build._read_manifest(d)["packed_matmul"]["library_sha256"]


def test_a_planted_library_of_another_user_is_refused(fake_cc, monkeypatch):
    """A library at the name the build would use, owned by someone else: never loaded (nor
    overwritten); `load` says why, warns once and the jax.lax path is used."""
    cc, d, runs = fake_cc
    build.prepare_dir()
    lib = _library("packed_matmul", cc, d)
    lib.write_bytes(b"planted")
    _give_to_another_user(lib, monkeypatch)
    with pytest.raises(build.UnsafeKernelDir, match="refusing native kernels from .*: the library is owned by uid 65534"):
        build.build("packed_matmul", cc=cc)
    with pytest.warns(UserWarning, match="unavailable, using the jax.lax path instead: refusing") as w:
        st = build.load("packed_matmul")
        assert build.load("packed_matmul") == st                          # remembered: one warning
    assert len([x for x in w if "jax.lax path" in str(x.message)]) == 1
    assert not st.available and "owned by uid 65534" in st.reason and str(lib) in st.reason
    assert runs() == 0 and lib.read_bytes() == b"planted"


def test_a_manifest_of_another_user_is_refused(fake_cc, monkeypatch):
    cc, d, runs = fake_cc
    build.build("packed_matmul", cc=cc)
    _give_to_another_user(d / build.MANIFEST, monkeypatch)
    with pytest.raises(build.UnsafeKernelDir, match="the manifest is owned by uid 65534"):
        build.build("packed_matmul", cc=cc)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_a_group_or_world_writable_build_dir_is_refused(fake_cc, mode):
    cc, d, runs = fake_cc
    d.mkdir(mode=0o700)
    os.chmod(d, mode)
    with pytest.raises(build.UnsafeKernelDir, match=f"group- or world-writable \\(mode {mode:04o}\\).*chmod go-w"):
        build.build("packed_matmul", cc=cc)
    with pytest.warns(UserWarning, match="using the jax.lax path instead: refusing native kernels from"):
        st = build.load("packed_matmul")
    assert not st.available and "world-writable" in st.reason and runs() == 0


def test_a_build_dir_of_another_user_is_refused(fake_cc, monkeypatch):
    cc, d, runs = fake_cc
    d.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(d, 65534, 65534)
    else:
        real = os.stat
        monkeypatch.setattr(build.os, "stat", lambda p, *a, **k: os.stat_result(
            (*real(p)[:4], 65534, *real(p)[5:])) if str(p) == str(d) else real(p, *a, **k))
    with pytest.raises(build.UnsafeKernelDir, match="the directory is owned by uid 65534"):
        build.prepare_dir()


def test_switch_off_no_compiler_and_failed_build_fall_back(fake_cc, monkeypatch):
    """What `load` remembers is keyed by the settings: the switch turned off and on again, a
    compiler removed, a failing build -- each answered afresh, each failure warned once."""
    cc, d, runs = fake_cc
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    st = build.load("decode_attention")
    assert not st.available and build.ENV_SWITCH in st.reason
    assert backend.choices("cpu").decode_attention == "xla"
    assert not backend.uses_native_decode_attention(backend.choices("cpu"), "float32", sharded=False)
    monkeypatch.delenv(build.ENV_SWITCH)
    assert backend.choices("cpu").decode_attention == "native"
    assert backend.choices("tpu").decode_attention == "xla"
    assert not backend.uses_native_decode_attention(backend.choices("cpu"), "float32", sharded=True)
    # no compiler: one warning, the jax.lax path
    monkeypatch.setattr(build, "_compiler", lambda: None)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler") as w:
        st = build.load("decode_attention")
        build.load("packed_matmul")
    assert not st.available and "compiler" in st.reason and len([x for x in w if "jax.lax path" in str(x.message)]) == 1
    # a source that does not compile: a warning naming the failure, then the jax.lax path
    monkeypatch.setattr(build, "_compiler", lambda: cc)
    monkeypatch.setenv("FAKE_CC_FAIL", "1")
    with pytest.warns(UserWarning, match="(?s)unavailable, using the jax.lax path.*this is not C"):
        st = build.load("decode_attention")
    assert not st.available and "failed" in st.reason and runs() == 1
    assert build.load("decode_attention") == st and runs() == 1           # not retried in this process
    assert not list(d.glob("*.tmp")) and not list(d.glob("libpldr_*"))    # nothing half-written left


def test_cli_prints_where_and_which_compiler_then_reuses(fake_cc, capsys):
    from pldr_jax.cli import main
    cc, d, runs = fake_cc
    assert main(["kernels", "build"]) == 0
    out = capsys.readouterr().out
    assert f"native CPU kernels: {d} (mode 0700" in out and f"compiler: {cc} (fakecc 1.0)" in out
    assert out.count("built (") == len(build.KERNELS) and runs() == len(build.KERNELS)
    assert main(["kernels", "build"]) == 0
    assert capsys.readouterr().out.count("reused") == len(build.KERNELS) and runs() == len(build.KERNELS)
    os.chmod(d, 0o777)
    assert main(["kernels", "build"]) == 2
    assert "error: refusing native kernels from" in capsys.readouterr().err


@needs_kernel
@pytest.mark.parametrize("dtype,mode", [("float32", "kv_g"), ("float32", "kv"), ("bfloat16", "kv_g")])
def test_generate_native_equals_jax_lax_path(tiny_v510, monkeypatch, dtype, mode):
    """Whole generations, ragged batch of 8 (a bfloat16 model decoding in bfloat16: bf16_min_batch 8):
    the same ids and logits with the native kernels and with the jax.lax path.  float32 also runs
    the native attention over unpacked weights: the attention alone changes the logits by < 2e-5;
    the packed matmul (`backend.decode_matmul`, float32 only) groups every product's sum differently,
    < 1e-4 after two layers and six steps."""
    import pldr_jax
    from pldr_jax.decode import prepare_params
    from pldr_jax.decode.step import MODES
    cfg, params = tiny_v510
    cfg = cfg.replace(dtype=dtype)
    prompts = [[70, 48, 9, 8, 68, 61, 1], [5, 17, 99], [12, 40, 33, 7, 7, 81, 2, 64, 90, 11], [3],
               [70, 48], [9, 9, 9, 9, 9], [100, 7, 55, 23, 1, 1], [44, 2, 8]]
    kv, gc = MODES[mode]
    kw = dict(max_new_tokens=6, kv_cache=kv, g_cache=gc, top_k=1)
    outs = {}
    for native, pack in ((True, None), (True, False), (False, None)):
        monkeypatch.setenv(build.ENV_SWITCH, "1" if native else "0")
        weights = params if pack is None else prepare_params(cfg, params, len(prompts), pack=pack, bf16_min_batch=8)[1]
        sampler = pldr_jax.Sampler(cfg, weights, bf16_min_batch=8)
        req = sampler._request(prompts, **kw)
        assert req.spec.step.native_kv == native and req.spec.step.cfg.dtype == dtype
        assert req.spec.step.kv_dtype == (None if native or dtype == "float32" else "float32")
        packed = isinstance(req.params["layers"][0]["wqkv"], PackedLinear)
        assert packed == (native and pack is None and dtype == "float32")
        outs[native, pack] = sampler(prompts, eos_id=None, return_logits=True, **kw)
    logits = {k: np.asarray(o.logits) for k, o in outs.items()}
    for k in outs:
        np.testing.assert_array_equal(outs[k].ids, outs[False, None].ids)
    tol = 2e-5 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(logits[True, False], logits[False, None], rtol=0, atol=tol)
    np.testing.assert_allclose(logits[True, None], logits[False, None], rtol=0, atol=1e-4 if dtype == "float32" else tol)




@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("M,K,N", [(1, 96, 64), (3, 37, 21), (8, 200, 100), (13, 300, 48), (33, 130, 17)])
def test_packed_matmul_matches_the_dot(dtype, M, K, N):
    """`packed_matmul` against a float64 product and XLA's dot (`ops.layers.linear`'s decode layout):
    within float32 rounding (bfloat16: the same rounding steps as the dot, the bias added in bfloat16);
    rows past 8 (several passes over a panel), N not a multiple of 16, one or several k chunks; the
    values are the same for 1, 2 and 3 threads (each output one sum in a fixed order)."""
    from pldr_jax.kernels import pack_kernel, packed_matmul, packed_matmul_available
    from pldr_jax.kernels.packed_matmul import unpack_kernel
    from pldr_jax.ops.layers import linear
    assert packed_matmul_available()
    r = np.random.default_rng(M * 1000 + K)
    dt = jnp.dtype(dtype)
    W = jnp.asarray(r.normal(size=(K, N)) / np.sqrt(K), dt)
    b = jnp.asarray(r.normal(size=N), dt)
    x = jnp.asarray(r.normal(size=(2, M, K)), dt)                  # leading axes are flattened
    panels = pack_kernel(W)
    assert panels.shape == (-(-N // 16), K, 16) and (unpack_kernel(panels, N) == W).all()
    y = jax.jit(packed_matmul)(x, panels, b)
    assert y.shape == (2, M, N) and y.dtype == dt
    assert (jax.jit(lambda x: linear(PackedLinear(kernel_p=panels, bias=b), x))(x) == y).all()
    exact = np.asarray(x, np.float64) @ np.asarray(W, np.float64) + np.asarray(b, np.float64)
    dot = np.asarray(linear(TransposedLinear(kernel_t=W.T, bias=b), x), np.float64)
    err, dot_err = np.abs(np.asarray(y, np.float64) - exact).max(), np.abs(dot - exact).max()
    if dtype == "float32":
        assert err < 4e-6 and err <= 2 * dot_err + 1e-6, (err, dot_err)
    else:                      # rounded to bfloat16 twice (the sum, then with the bias), as the dot
        assert np.abs(np.asarray(y, np.float64) - dot).max() <= 2 ** -7 * np.abs(dot).max()
    for t in (1, 2, 3):
        assert (jax.jit(lambda x, t=t: packed_matmul(x, panels, b, threads=t))(x) == y).all()


@needs_kernel
def test_packed_matmul_rejects_mismatched_shapes():
    from pldr_jax.kernels import pack_kernel, packed_matmul
    W = jnp.ones((8, 20), jnp.float32)
    with pytest.raises(ValueError, match="do not match"):
        packed_matmul(jnp.ones((2, 9), jnp.float32), pack_kernel(W), jnp.ones(20, jnp.float32))
    with pytest.raises(ValueError, match="do not match"):
        packed_matmul(jnp.ones((2, 8), jnp.float32), pack_kernel(W), jnp.ones(40, jnp.float32))
    with pytest.raises(ValueError, match="handles"):
        packed_matmul(jnp.ones((2, 8), jnp.int32), pack_kernel(W), jnp.ones(20, jnp.float32))


@needs_kernel
def test_float32_decode_weights_are_packed_once_and_decode_like_unpacked(tiny_v510):
    """On CPU a float32 decode stores its matmul kernels packed (`backend.decode_matmul`), re-preparing
    prepared weights copies nothing, the forward pass over them matches the unpacked layout, and a
    sharded Sampler (a mesh of several devices) leaves them unpacked."""
    import pldr_jax
    from pldr_jax.decode import prepare_params
    from pldr_jax.decode.weights import packs_weights
    cfg, params = tiny_v510
    assert backend.choices("cpu").decode_matmul == "packed" and packs_weights("float32")
    assert not packs_weights("bfloat16") and not packs_weights("float32", sharded=True)
    _, packed = prepare_params(cfg, params, 4)
    _, plain = prepare_params(cfg, params, 4, pack=False)
    lp = packed["layers"][0]
    assert all(isinstance(w, PackedLinear) for w in (lp["wqkv"], lp["ffn"]["w3"], packed["final"]))
    assert isinstance(plain["layers"][0]["wqkv"], TransposedLinear)
    again = prepare_params(cfg, packed, 4)[1]
    assert again["layers"][0]["wqkv"].kernel_p is lp["wqkv"].kernel_p             # no copy
    toks = jnp.array([[70, 48, 9, 8, 68, 61, 1, 0], [5, 17, 99, 3, 3, 3, 3, 3]])
    np.testing.assert_allclose(pldr_jax.forward(cfg, packed, toks).logits, pldr_jax.forward(cfg, plain, toks).logits,
                               rtol=0, atol=2e-5)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    assert isinstance(pldr_jax.Sampler(cfg, params, mesh=mesh).weights(4)[1]["layers"][0]["wqkv"], PackedLinear)
