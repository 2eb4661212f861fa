"""The native XLA:CPU decode kernel (`pldr_jax.kernels`): same terms as the jax.lax path, in place,
masked slots never read, its build / fallback, and the decode step that uses it.

The jax.lax path it replaces: the per-row scatter ``buf.at[rows, :, pos].set(...)`` then
`plga_attention` over the written heads-first buffers.  float32 tolerance: 2e-6 on O(1) outputs
(the two sum the same float32 terms in different orders; the jax.lax path's own merged vs two-axis
products differ by the same ~1e-7 per term); bfloat16: equal after the final rounding to
bfloat16 except where an exp differing in its last float32 bit flips a bfloat16 rounding (one
bfloat16 ulp of the output, 2^-7 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import backend
from pldr_jax.decode.layouts import PackedLinear, TransposedLinear
from pldr_jax.kernels import build
from pldr_jax.kernels.decode_attention import decode_attention_available, decode_attention_update
from pldr_jax.ops.attention import plga_attention

needs_kernel = pytest.mark.skipif(not decode_attention_available(),
                                  reason=f"native kernel unavailable: {build.load('decode_attention').reason}")


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


def test_switch_off_and_failed_build_fall_back(monkeypatch, tmp_path):
    real_compiler = build._compiler()
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    assert backend.choices("cpu").decode_attention == "xla"
    assert not backend.uses_native_decode_attention(backend.choices("cpu"), "float32", sharded=False)
    monkeypatch.setattr(build, "_loaded", {})
    st = build.load("decode_attention")
    assert not st.available and build.ENV_SWITCH in st.reason
    monkeypatch.delenv(build.ENV_SWITCH)
    assert backend.choices("cpu").decode_attention == "native"
    assert backend.choices("tpu").decode_attention == "xla"
    assert not backend.uses_native_decode_attention(backend.choices("cpu"), "float32", sharded=True)
    # no compiler
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_compiler", lambda: None)
    st = build.load("decode_attention")
    assert not st.available and "compiler" in st.reason
    # a source that does not compile: a warning naming the failure, then the jax.lax path
    if real_compiler is None:
        return
    monkeypatch.undo()
    monkeypatch.setattr(build, "_loaded", {})
    bad = tmp_path / "src"
    bad.mkdir()
    (bad / "decode_attention.cc").write_text("this is not C++\n")
    monkeypatch.setattr(build, "_SRC_DIR", bad)
    monkeypatch.setenv(build.ENV_DIR, str(tmp_path / "libs"))
    with pytest.warns(UserWarning, match="unavailable, using the jax.lax path"):
        st = build.load("decode_attention")
    assert not st.available and "failed" in st.reason
    assert not list((tmp_path / "libs").glob("*.tmp"))         # no half-written library left behind


@needs_kernel
def test_build_is_cached_by_source_and_host(monkeypatch, tmp_path):
    """A second load of the same source finds the library instead of compiling it again; the
    library lives in PLDR_JAX_KERNEL_DIR."""
    monkeypatch.setenv(build.ENV_DIR, str(tmp_path))
    first = build._build("decode_attention", build._compiler())
    mtime = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.name.startswith("libpldr_decode_attention_")
    assert build._build("decode_attention", build._compiler()) == first and first.stat().st_mtime_ns == mtime


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




needs_packed = pytest.mark.skipif(not build.enabled() or build._compiler() is None,
                                  reason="native kernels off or no C++ compiler")


@needs_packed
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


@needs_packed
def test_packed_matmul_rejects_mismatched_shapes():
    from pldr_jax.kernels import pack_kernel, packed_matmul
    W = jnp.ones((8, 20), jnp.float32)
    with pytest.raises(ValueError, match="do not match"):
        packed_matmul(jnp.ones((2, 9), jnp.float32), pack_kernel(W), jnp.ones(20, jnp.float32))
    with pytest.raises(ValueError, match="do not match"):
        packed_matmul(jnp.ones((2, 8), jnp.float32), pack_kernel(W), jnp.ones(40, jnp.float32))
    with pytest.raises(ValueError, match="handles"):
        packed_matmul(jnp.ones((2, 8), jnp.int32), pack_kernel(W), jnp.ones(20, jnp.float32))


@needs_packed
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
