"""pldr-jax finetune on a 4-device mesh equals the 1-device run, with the params really split.

The 4-device run happens in a subprocess with ``--xla_force_host_platform_device_count=4`` (the
pytest process keeps its single CPU device) on a (data=2, fsdp=2, tensor=1) mesh: the batch over 4
shards, the decoder's and the head's model width over "fsdp" (`partitioning.RULES`).  The same
sequence-classification job runs on one device here.  Tolerance: the per-step train losses and the
validation loss within 1e-5 relative (float32 sums in another order on split batches and weights;
3 AdamW steps).

Run as a script (``python tests/test_finetune_sharded.py LM WORKDIR OUT.json``) it is that
subprocess's worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ARGS = ["--task", "seq-cls", "--train", "embedded", "--batch-size", "8", "--max-length", "24", "--lr", "2e-3",
        "--epochs", "1", "--max-steps", "3", "--log-every", "1", "--save-every", "100", "--no-progress",
        "--no-plot", "--no-tensorboard"]


def _losses(workdir: Path) -> tuple[list, list]:
    from pldr_jax.train.reporting import read_metrics
    h = read_metrics(workdir / "metrics.jsonl")
    return ([r["loss"] for r in h if r["kind"] == "train"], [r["val_loss"] for r in h if r["kind"] == "eval"])


def test_four_devices_match_one_device(tmp_path):
    import jax
    from pldr_jax import PLDRConfig, init_params
    from pldr_jax.cli import main
    from pldr_jax.data.tokenizer import Tokenizer
    from pldr_jax.finetune.tasks import embedded_records
    from pldr_jax.io.hf import save_hf
    Tokenizer.train([r["text"] for r in embedded_records("seq-cls")], tmp_path / "tok", 200, num_threads=1)
    cfg = PLDRConfig.preset("tiny", vocab_size=200, max_seq_len=32)
    lm = save_hf(cfg, jax.device_get(init_params(cfg, jax.random.key(0))), tmp_path / "hf",
                 tokenizer_model=tmp_path / "tok.model")
    out = tmp_path / "four.json"
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_force_host_platform_device_count=4").strip(),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, __file__, str(lm), str(tmp_path / "four"), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert main(["finetune", str(lm), *ARGS, "--workdir", str(tmp_path / "one"), "--mesh", "1,1,1"]) == 0
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    z = json.loads(out.read_text())
    train1, valid1 = _losses(tmp_path / "one")
    train4, valid4 = _losses(tmp_path / "four")
    assert len(train1) == 3 and len(valid1) == 1
    import numpy as np
    np.testing.assert_allclose(train4, train1, rtol=1e-5)
    np.testing.assert_allclose(valid4, valid1, rtol=1e-5)
    assert z["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    # the params were split: d_model (32) over fsdp, the head's kernel [32, 4 labels] too
    assert z["specs"]["['head']['kernel']"] == "P('fsdp',)" and z["shards"]["['head']['kernel']"] == [16, 4]
    assert "fsdp" in z["specs"]["['layers']['ffn']['w1']['kernel']"]
    assert z["shards"]["['embed']['embedding']"] == [200, 16]
    # the optimiser's moments follow their params
    assert z["mu_spec"] == z["specs"]["['head']['kernel']"]


def _worker(lm: str, workdir: str, out: str) -> None:
    import jax
    import optax
    from pldr_jax.cli import build_parser
    from pldr_jax.finetune.cli import prepare
    from pldr_jax.finetune.loop import run_finetune
    from pldr_jax.train.sharding import describe_shardings
    assert jax.device_count() == 4
    args = build_parser().parse_args(["finetune", lm, *ARGS, "--workdir", workdir, "--mesh", "2,2,1"])
    res = run_finetune(workdir=Path(workdir), log=lambda *a: None, **prepare(args))
    params = res["state"].params
    shards = {jax.tree_util.keystr(k): list(v.addressable_shards[0].data.shape)
              for k, v in jax.tree_util.tree_leaves_with_path(params)}
    adam = [s for s in jax.tree_util.tree_leaves(res["state"].opt_state,
                                                 is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    Path(out).write_text(json.dumps({
        "specs": describe_shardings(params), "shards": shards,
        "mu_spec": str(adam.mu["head"]["kernel"].sharding.spec),
        "mesh": json.loads((Path(workdir) / "run_config.json").read_text())["mesh"]}))


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
