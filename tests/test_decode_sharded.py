"""Sharded decoding on 8 simulated CPU devices (a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``): rows over the data axis, heads over the
tensor axis, the cache placed by its logical axes; the ids equal one device's in all four modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import ref_path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from tests.conftest import load_reference_model
    import pldr_jax
    from pldr_jax.decode import MODES
    from pldr_jax.train.sharding import make_mesh
    assert jax.device_count() == 8
    cfg, params = load_reference_model("tiny_v510")
    mesh = make_mesh(data=4, fsdp=1, tensor=2)
    prompts = [[70, 48, 9, 8, 68, 61, 1], [5, 17, 99], [12, 40, 33, 7, 7, 81, 2, 64, 90, 11], [4, 4, 4, 4, 9]]
    one, sharded = pldr_jax.Sampler(cfg, params), pldr_jax.Sampler(cfg, params, mesh=mesh)
    res = {}
    for mode, (kv, g) in MODES.items():
        kw = dict(max_new_tokens=12, kv_cache=kv, g_cache=g, top_k=1, eos_id=None, return_logits=True)
        a, b = one(prompts, **kw), sharded(prompts, **kw)
        k0 = b.cache.k[0] if b.cache.k is not None else None
        res[mode] = {"same_ids": a.tokens == b.tokens,
                     "max_logit_diff": float(np.abs(a.logits - b.logits).max()),
                     "k_spec": None if k0 is None else str(k0.sharding.spec),
                     "g_spec": str(b.cache.G_LM[0].sharding.spec),
                     "k_devices": None if k0 is None else len(k0.sharding.device_set)}
    w = sharded.weights(4)[1]["layers"][0]
    res["wqkv_spec"] = str(w["wqkv"].kernel_t.sharding.spec)
    streamed = [[] for _ in prompts]
    for step in sharded.stream(prompts, max_new_tokens=12, top_k=1, eos_id=None):
        for r in np.flatnonzero(step.active):
            streamed[r].append(int(step.tokens[r]))
    res["stream_same"] = streamed == one(prompts, max_new_tokens=12, top_k=1, eos_id=None).tokens
    from pldr_jax.decode import prepare_params       # weights packed for unsharded CPU decoding
    packed = prepare_params(cfg, params, 4)[1]
    from pldr_jax.decode.layouts import PackedLinear
    res["packed_one_device"] = isinstance(packed["layers"][0]["wqkv"], PackedLinear)
    try:
        pldr_jax.Sampler(cfg, packed, mesh=mesh)(prompts, max_new_tokens=2)
        res["packed_refused"] = ""
    except ValueError as e:
        res["packed_refused"] = str(e)
    print(json.dumps(res))
""")


def test_sharded_decoding_equals_one_device():
    ref_path("tiny_v510_params.npz")
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                                      ).strip(), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True, text=True, env=env,
                       timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for mode in ("kv_g", "kv", "g", "none"):
        r = res[mode]
        assert r["same_ids"], (mode, r)
        assert r["max_logit_diff"] < (2e-4 if mode == "none" else 2e-5), (mode, r)
        assert "data" in r["g_spec"] and "tensor" in r["g_spec"], r        # rows and heads split
        if r["k_spec"] is not None:
            assert r["k_spec"] == "P('data', 'tensor')" and r["k_devices"] == 8, r
    assert "tensor" in res["wqkv_spec"]
    assert res["stream_same"]
    # float32 weights prepared on one CPU device are packed for the native matmul; a mesh refuses them
    from pldr_jax.decode.weights import packs_weights
    assert res["packed_one_device"] == packs_weights("float32")
    if res["packed_one_device"]:
        assert "pack=False" in res["packed_refused"], res["packed_refused"]
