"""The decode step's KV-cache write and attention forms give the same logits.

* shared KV slot (every row writes a step's key/value at one slot, attention reads the cache before
  the write plus the step's own key: `decode.cache` "KV slots") vs each row's own position;
* attention over one merged [B * H] batch axis (CPU) vs two [B, H] axes (accelerators,
  `backend.decode_merged_heads`);
* attention over the live slots only, a few at a time with an online softmax (accelerators,
  `backend.decode_kv_chunk`) vs the whole buffer.

Ragged prompts, learned G (kv_g: the prompt's G; kv: G re-derived from the cached A), greedy feed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax.backend import choices
from pldr_jax.decode import prepare_params
from pldr_jax.decode.step import StepSpec, decode_step, prefill
from pldr_jax.ops.attention import plga_attention

PROMPTS = [[70, 48, 9, 8, 68, 61, 1], [5, 17, 99], [12, 40, 33, 7, 7, 81, 2, 64, 90, 11, 45, 23]]


def _run(cfg, params, spec: StepSpec, steps: int = 6):
    B, P, S = len(PROMPTS), 16, 32
    tokens = np.zeros((B, P), np.int32)
    for b, p in enumerate(PROMPTS):
        tokens[b, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
    cache, logits, _ = prefill(cfg, params, jnp.asarray(tokens), lengths, None, S)
    step = jax.jit(decode_step, static_argnums=0)
    out = [logits]
    active = jnp.ones((B,), bool)
    for _ in range(steps):
        logits, cache, _ = step(spec, params, cache, jnp.argmax(out[-1], -1).astype(jnp.int32), active)
        out.append(logits)
    return np.stack([np.asarray(x) for x in out]), cache


@pytest.fixture(scope="module")
def tiny(tiny_v510):
    cfg, params = tiny_v510
    return cfg, prepare_params(cfg, params, 1)[1]


@pytest.mark.parametrize("g_cache", [True, False], ids=["kv_g", "kv"])
def test_shared_slot_and_head_axes_match_per_row_slots(tiny, g_cache):
    cfg, params = tiny
    spec = lambda **kw: StepSpec(cfg=cfg, kv_cache=True, g_cache=g_cache, given_g=False, **kw)
    want, per_row = _run(cfg, params, spec(shared_slot=False))
    caches = []
    for kw in ({"shared_slot": True}, {"shared_slot": True, "merged_heads": False},
               {"shared_slot": False, "merged_heads": False},
               {"shared_slot": True, "merged_heads": False, "kv_chunk": 5},
               {"shared_slot": True, "kv_chunk": 8}, {"shared_slot": False, "kv_chunk": 8},
               {"shared_slot": False, "kv_chunk": 3}):
        got, cache = _run(cfg, params, spec(**kw))
        caches.append(cache)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=str(kw))
        assert (got.argmax(-1) == want.argmax(-1)).all(), kw
    cache = caches[0]
    # shared slots: the 6 decoded keys sit after the longest prompt (slots 12..17) in every row; with
    # per-row slots the 3-token prompt's row has them right after its prompt (3..8)
    assert int(cache.kv_next) == 12 + 6
    for layer in range(cfg.num_layers):
        np.testing.assert_allclose(np.asarray(cache.k[layer][1, :, 12:18]), np.asarray(per_row.k[layer][1, :, 3:9]),
                                   rtol=0, atol=2e-5)
        np.testing.assert_allclose(np.asarray(cache.v[layer][2, :, 12:18]), np.asarray(per_row.v[layer][2, :, 12:18]),
                                   rtol=0, atol=2e-5)


def test_head_axes_attention_equals_merged_with_own_token():
    kq, kk, kv, kg, kn = jax.random.split(jax.random.key(3), 5)
    B, H, S, dk = 3, 4, 10, 8
    q = jax.random.normal(kq, (B, 1, H, dk))
    k, v = jax.random.normal(kk, (B, H, S, dk)), jax.random.normal(kv, (B, H, S, dk))
    g = jax.random.normal(kg, (B, H, dk, dk))
    new = tuple(jax.random.normal(x, (B, 1, H, dk)) for x in jax.random.split(kn))
    mask = (jnp.arange(S)[None, :] < jnp.array([[4], [7], [10]]))[:, None, None, :]
    merged = plga_attention(q, k, v, g, mask, heads_first=True, new_kv=new)
    per_head = plga_attention(q, k, v, g, mask, heads_first=True, new_kv=new, merged_heads=False)
    np.testing.assert_allclose(per_head, merged, rtol=0, atol=1e-5)
    # the own token attended over equals writing it into a free slot of the buffer
    k2 = jnp.concatenate([k, jnp.swapaxes(new[0], 1, 2)], 2)
    v2 = jnp.concatenate([v, jnp.swapaxes(new[1], 1, 2)], 2)
    m2 = jnp.concatenate([mask, jnp.ones((B, 1, 1, 1), bool)], -1)
    np.testing.assert_allclose(merged, plga_attention(q, k2, v2, g, m2, heads_first=True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 4, 9])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_live_chunks_equal_whole_buffer(chunk, dtype):
    """Attention over the slots below live_len, `chunk` at a time (the last chunk's start clamped to
    S - chunk, overlapping the one before), equals the whole-buffer softmax; a slot at or beyond
    live_len never contributes, even unmasked and holding huge values."""
    kq, kk, kv, kg, kn = jax.random.split(jax.random.key(5), 5)
    B, H, S, dk, live = 3, 2, 10, 8, 7
    dt = jnp.dtype(dtype)
    q = jax.random.normal(kq, (B, 1, H, dk)).astype(dt)
    k, v = jax.random.normal(kk, (B, H, S, dk)), jax.random.normal(kv, (B, H, S, dk))
    k, v = (t.at[:, :, live:].set(1e4) for t in (k, v))                     # garbage beyond live_len
    g = jax.random.normal(kg, (B, H, dk, dk)) * 0.3
    new = tuple(jax.random.normal(x, (B, 1, H, dk)).astype(dt) for x in jax.random.split(kn))
    # row 0: prompt of 2 (slots 2..4 prompt padding), decoded slots 5, 6; row 1: every slot; row 2: none
    valid = jnp.array([[1, 1, 0, 0, 0, 1, 1], [1] * 7, [0] * 7], bool)
    mask = jnp.pad(valid, ((0, 0), (0, S - live)))[:, None, None, :]
    want = plga_attention(q, k, v, g, mask, heads_first=True, new_kv=new)
    got = plga_attention(q, k, v, g, mask, heads_first=True, new_kv=new, live_len=jnp.int32(live), kv_chunk=chunk)
    assert got.dtype == want.dtype
    tol = 1e-6 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=tol)
    # the own token already written into the buffer (per-row slots, no new_kv): slot live - 1
    k1, v1 = (t.at[:, :, live - 1].set(jnp.swapaxes(n, 1, 2)[:, :, 0]) for t, n in zip((k, v), new))
    own = mask.at[..., live - 1].set(True)
    want1 = plga_attention(q, k1, v1, g, own, heads_first=True)
    got1 = plga_attention(q, k1, v1, g, own, heads_first=True, live_len=jnp.int32(live), kv_chunk=chunk)
    np.testing.assert_allclose(np.asarray(got1, np.float32), np.asarray(want1, np.float32), rtol=0, atol=tol)
    unmasked = jnp.ones((B, 1, 1, S), bool)     # the slots beyond live_len are left out by live_len alone
    got2 = plga_attention(q, k, v, g, unmasked, heads_first=True, new_kv=new, live_len=jnp.int32(live), kv_chunk=chunk)
    want2 = plga_attention(q, k[:, :, :live], v[:, :, :live], g, unmasked[..., :live], heads_first=True, new_kv=new)
    np.testing.assert_allclose(np.asarray(got2, np.float32), np.asarray(want2, np.float32), rtol=0, atol=tol)


def test_backend_decode_head_axes():
    assert choices("cpu").decode_merged_heads and not choices("tpu").decode_merged_heads
    assert choices("cpu").decode_kv_chunk == 0 and choices("tpu").decode_kv_chunk > 0
