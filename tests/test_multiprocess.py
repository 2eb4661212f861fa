"""Two-process training on localhost (jax.distributed, CPU collectives over gloo).

Two worker processes (one CPU device each) run the training loop on a (data 1, fsdp 2, tensor 1)
mesh: parameters and optimiser state are split across the processes, each process feeds its half
of every global batch, and both take part in the orbax checkpoints.  The result must agree with
the same loop in one process on one device fed the whole batches: losses within 1e-5 relative,
parameters within 1e-4 relative globally (norm of the difference / norm of the parameters;
measured 1.7e-5) and per tensor within 1e-3 x (max |p| + summed lr) for weight matrices, 1e-2 x
for biases and norm parameters: the FSDP reductions sum across processes in another order, and
Adam's normalisation turns the rounding of the near-cancelling gradients of zero-initialised
biases (measured 2.4e-3 for the metric learner's GLU biases) into parameter differences.
Every subprocess has a hard timeout.

Run as a script (``python tests/test_multiprocess.py PID PORT WORKDIR OUT``) it is one worker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

try:
    from .process_faults import finish_processes
except ImportError:  # run as a worker script
    from process_faults import finish_processes

STEPS = 3
GLOBAL_BATCH = 8
FAST_COMPILE = {"xla_backend_optimization_level": 0}
LR_SUM = 2e-2


def micro_cfg():
    import pldr_jax
    return pldr_jax.PLDRConfig(num_layers=1, d_model=32, num_heads=4, dff=48, vocab_size=64, max_seq_len=32,
                               A_dff=8, num_reslayerA=1, num_denseA=1)


def train_config(workdir, mesh):
    from pldr_jax.train.loop import TrainConfig
    return TrainConfig(workdir=str(workdir), steps=STEPS, total_steps=10, seq_len=12, batch_size=GLOBAL_BATCH,
                       learning_rate=1e-2, warmup_steps=1, log_every=1, eval_every=0, save_every=2,
                       keep_checkpoints=2, progress=False, plot=False, tensorboard=False, mesh=mesh)


class ArrayBatches:
    """Deterministic global batches; yields rows [lo, hi) of each (this process's part).
    Checkpointable: get_state / set_state with a JSON dict."""

    def __init__(self, lo=0, hi=GLOBAL_BATCH, n=16, L=12, V=64, seed=0):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(1, V, (n, GLOBAL_BATCH, L + 1)).astype(np.int32)
        self.data[:, 1, -4:] = 0
        self.lo, self.hi, self.i = lo, hi, 0

    def __iter__(self):
        return self

    def __next__(self):
        rows = self.data[self.i, self.lo:self.hi]
        self.i += 1
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = int(state["i"])


def _flat(tree):
    import jax
    return {jax.tree_util.keystr(kp): np.asarray(v) for kp, v in jax.tree_util.tree_leaves_with_path(tree)}


def _worker(pid: int, port: int, workdir: str, out: str):
    from pldr_jax.train.loop import init_distributed, train
    init_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout_s=120)
    import jax
    from jax.experimental import multihost_utils
    assert jax.process_count() == 2 and len(jax.devices()) == 2
    half = GLOBAL_BATCH // 2
    r = train(micro_cfg(), train_config(workdir, (1, 2, 1)), train_data=ArrayBatches(pid * half, (pid + 1) * half),
              val_data=[], compiler_options=FAST_COMPILE, log=lambda *a, **k: None)
    leaf = r.state.params["layers"]["ffn"]["w1"]["kernel"]
    local_shape = tuple(leaf.addressable_shards[0].data.shape)
    params = multihost_utils.process_allgather(r.state.params, tiled=True)
    if pid == 0:
        np.savez(out, losses=np.array(r.losses), local_shape=np.array(local_shape),
                 **{"final" + k: v for k, v in _flat(params).items()})
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    from pldr_jax.train.loop import train
    out = tmp_path / "mp.npz"
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs = [subprocess.Popen([sys.executable, __file__, str(pid), str(port), str(tmp_path / "mp"), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in (0, 1)]
    finish_processes(procs, timeout=240)
    z = np.load(out)
    assert tuple(z["local_shape"]) == (1, 16, 48)  # w1 [1, 32, 48] split over fsdp = the 2 processes

    # both processes wrote their data-iterator state into the checkpoints
    step_dir = tmp_path / "mp" / "checkpoints" / str(STEPS)
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= {p.name for p in (step_dir / "data").iterdir()}

    one = train(micro_cfg(), train_config(tmp_path / "one", (1, 1, 1)), train_data=ArrayBatches(), val_data=[],
                compiler_options=FAST_COMPILE, log=lambda *a, **k: None)
    np.testing.assert_allclose(z["losses"], one.losses, rtol=1e-5)
    final1 = _flat(one.state.params)
    num = sum(float(np.sum((z["final" + k].astype(np.float64) - v) ** 2)) for k, v in final1.items())
    den = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in final1.values())
    assert (num / den) ** 0.5 <= 1e-4
    for k, v in final1.items():
        rel = 1e-3 if _is_weight(k) else 1e-2
        assert float(np.abs(z["final" + k] - v).max()) <= rel * (float(np.abs(v).max()) + LR_SUM), k


def _is_weight(path: str) -> bool:
    """Weight matrices (kernels, embedding, PLGA W / P / a) vs biases and norm parameters."""
    return any(t in path for t in ("'kernel'", "'embedding'", "['W']", "['P']", "['a']"))


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
