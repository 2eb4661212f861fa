"""Sharding: mesh validation, the logical-axis rule table, sharded init and 1 vs 8 devices.

The 8-device run happens in a subprocess with ``--xla_force_host_platform_device_count=8`` (the
pytest process keeps its single CPU device) on a (data=2, fsdp=2, tensor=2) mesh, so the batch,
FSDP and tensor axes are all exercised.  It must give the same losses and parameters as the same
code on one device, N = 3 AdamW steps from the same seed and batches.  Tolerances: initial
parameters bitwise equal (threefry is partitionable); losses within 1e-5 relative; parameters
within 1e-5 relative globally (norm of the difference / norm of the parameters) and, per tensor,
within 1e-3 x (its largest magnitude + the summed learning rate): sharded reductions sum in a
different order, and Adam's normalisation amplifies the float32 rounding of near-zero gradient
elements (zero-initialised biases move by ~lr per step whatever their gradient's size).

Run as a script (``python tests/test_sharding.py OUT.npz``) it is that subprocess's worker.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

STEPS = 3
LR_SUM = 0.0 + 1e-2 + 1e-2  # schedule (1e-2, warm-up 1, 10 steps): lr_0 = 0, lr_1 = 1e-2, lr_2 < 1e-2
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def micro_cfg():
    import pldr_jax
    return pldr_jax.PLDRConfig(num_layers=1, d_model=32, num_heads=4, dff=48, vocab_size=64, max_seq_len=32,
                               A_dff=8, num_reslayerA=1, num_denseA=1)


def batches(n, B=8, L=12, V=64, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        toks = rng.integers(1, V, (B, L + 1)).astype(np.int32)
        toks[1, -4:] = 0
        out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:]})
    return out


def run_steps(mesh_shape, steps=STEPS, grad_accum=1):
    """Initialise sharded, run `steps` AdamW steps; return (losses, init params, final params, specs)."""
    import jax
    from pldr_jax.train import (StepOptions, init_train_state, make_mesh, make_optimizer, make_train_step,
                                lr_schedule, shard_batch)
    from pldr_jax.train.sharding import describe_shardings
    cfg = micro_cfg()
    mesh = make_mesh(*mesh_shape)
    tx = make_optimizer(1e-2, 1, 10, 0.1)
    state = init_train_state(cfg, tx, mesh, seed=11, compiler_options=FAST_COMPILE)
    p_init = jax.tree_util.tree_map(np.asarray, jax.device_get(state.params))
    specs = describe_shardings(state.params)
    shard_shapes = {jax.tree_util.keystr(kp): tuple(x.addressable_shards[0].data.shape)
                    for kp, x in jax.tree_util.tree_leaves_with_path(state.params)}
    step = make_train_step(cfg, tx, lr_schedule(1e-2, 1, 10, 0.1), opts=StepOptions(grad_accum=grad_accum),
                           mesh=mesh, compiler_options=FAST_COMPILE)
    losses = []
    for b in batches(steps):
        state, m = step(state, shard_batch(b, mesh))
        losses.append(float(m["loss"]))
    return losses, p_init, jax.device_get(state.params), specs, shard_shapes


def _flat(tree):
    import jax
    return {jax.tree_util.keystr(kp): np.asarray(v) for kp, v in jax.tree_util.tree_leaves_with_path(tree)}


def _worker(out):
    import jax
    assert len(jax.devices()) == 8, jax.devices()
    losses, p_init, p_final, specs, shard_shapes = run_steps((2, 2, 2))
    losses_acc, _, p_acc, _, _ = run_steps((2, 2, 2), grad_accum=2)
    np.savez(out, losses=np.array(losses), losses_acc=np.array(losses_acc),
             **{"init" + k: v for k, v in _flat(p_init).items()},
             **{"final" + k: v for k, v in _flat(p_final).items()},
             **{"acc" + k: v for k, v in _flat(p_acc).items()},
             **{"spec" + k: np.array(v) for k, v in specs.items()},
             **{"shard" + k: np.array(v) for k, v in shard_shapes.items()})


# --------------------------------------------------------------------------- tests
def test_make_mesh_validation():
    import jax
    import pytest
    from pldr_jax.train import make_mesh
    from pldr_jax.train.sharding import parse_mesh_shape
    n = len(jax.devices())
    m = make_mesh()
    assert dict(m.shape) == {"data": n, "fsdp": 1, "tensor": 1}
    assert all(str(t) == "AxisType.Auto" or "Auto" in str(t) for t in m.axis_types)
    with pytest.raises(ValueError, match="devices"):
        make_mesh(n + 1, 1, 1)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(-1, -1, 1)
    with pytest.raises(ValueError):
        make_mesh(0, 1, 1)
    assert parse_mesh_shape("2,4") == (2, 4, 1) and parse_mesh_shape("-1,1,1") == (-1, 1, 1)
    with pytest.raises(ValueError):
        parse_mesh_shape("a,b")


def test_rule_table_covers_every_parameter_and_falls_back_when_indivisible():
    import pytest
    from jax.sharding import PartitionSpec as P
    import pldr_jax
    from pldr_jax.train.sharding import DEFAULT_RULES, logical_to_spec, param_partition_specs
    for name in ("v51-110m", "v51g-106m", "tiny"):
        specs = param_partition_specs(pldr_jax.PLDRConfig.preset(name))  # no mesh: rules only
        assert specs["layers"]["ffn"]["w1"]["kernel"] == P(None, "fsdp", "tensor")
    used = set()
    import jax
    for names in jax.tree_util.tree_leaves(pldr_jax.logical_axes(pldr_jax.PLDRConfig.preset("tiny")),
                                           is_leaf=lambda t: isinstance(t, tuple)):
        used.update(names)
    assert used <= set(DEFAULT_RULES)
    with pytest.raises(ValueError, match="no sharding rule"):
        logical_to_spec(("nonexistent",))

    class FakeMesh:  # logical_to_spec only reads .shape
        shape = {"data": 2, "fsdp": 4, "tensor": 3}
    # 14 heads on a tensor axis of 3: replicated; 896 / 4 on fsdp: sharded; no axis used twice
    assert logical_to_spec(("attn_heads", "dk", "dk_out"), (14, 64, 64), FakeMesh) == P()
    assert logical_to_spec(("embed", "mlp"), (896, 2389), FakeMesh) == P("fsdp")
    assert logical_to_spec(("batch", None), (8, 5), FakeMesh) == P(("data", "fsdp"))
    assert logical_to_spec(("batch", None), (6, 5), FakeMesh) == P("data")
    rules = {**DEFAULT_RULES, "mlp": "fsdp"}
    assert logical_to_spec(("embed", "mlp"), (896, 2400), FakeMesh, rules) == P("fsdp")


def test_eight_devices_match_one_device(tmp_path):
    out = tmp_path / "eight.npz"
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_force_host_platform_device_count=8").strip(),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    z = np.load(out)

    losses1, p_init1, p_final1, _, _ = run_steps((1, 1, 1))  # this process: one device
    init1, final1 = _flat(p_init1), _flat(p_final1)
    for k, v in init1.items():  # sharded init: the same numbers as on one device
        np.testing.assert_array_equal(z["init" + k], v, err_msg=k)
    np.testing.assert_allclose(z["losses"], losses1, rtol=1e-5)
    np.testing.assert_allclose(z["losses_acc"], losses1, rtol=1e-5)  # grad accumulation, sharded
    for prefix in ("final", "acc"):
        num = sum(float(np.sum((z[prefix + k].astype(np.float64) - v) ** 2)) for k, v in final1.items())
        den = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in final1.values())
        assert (num / den) ** 0.5 <= 1e-5, prefix
        for k, v in final1.items():
            err = float(np.abs(z[prefix + k] - v).max())
            assert err <= 1e-3 * (float(np.abs(v).max()) + LR_SUM), (prefix, k, err)
    # parameters were really split: FSDP over d_model, tensor over heads / FFN width / vocabulary
    assert str(z["spec['layers']['ffn']['w1']['kernel']"]) == "P(None, 'fsdp', 'tensor')"
    assert tuple(z["shard['layers']['ffn']['w1']['kernel']"]) == (1, 16, 24)   # [1, 32, 48] / (fsdp 2, tensor 2)
    assert tuple(z["shard['embed']['embedding']"]) == (32, 16)                   # [64, 32] / (tensor, fsdp)
    assert tuple(z["shard['layers']['plga']['W']"]) == (1, 2, 8, 8)               # 4 heads / tensor 2


if __name__ == "__main__":
    _worker(sys.argv[1])
