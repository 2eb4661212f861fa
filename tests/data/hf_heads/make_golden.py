"""Make the golden task-head folders of tests/data/hf_heads with the authors' Hugging Face port.

Their code (`configuration_pldrllm.py`, `modeling_pldrllm.py` of huggingface/transformers at commit
a28acc8ba959627a847f61feb770b465fd5c6f1a, `src/transformers/models/pldrllm/`) is not in this
repository: put the two files in a package folder `pldrllm/` (relative imports `from ...x` made
`from transformers.x`, plus an `__init__.py` importing both) under PORT and run, in an environment
with `torch==2.13.0` (CPU) and `transformers==4.56.1`::

    python tests/data/hf_heads/make_golden.py --port PORT --out tests/data/hf_heads

For every head it builds a tiny model with the port's own initialisation (seeded), gives the
head's bias (where it has one) seeded random values, saves the folder with `save_pretrained`, and
writes `NAME_outputs.npz`: the inputs, the labels, the port's last decoder hidden state
(`last_hidden`), logits and loss (float32, eval mode, eager attention, `use_cache=False`).

`--run FOLDER --inputs X.npz --save Y.npz` loads any pldrllm folder with the port (the class named
by its `architectures`) and saves its logits for `input_ids` / `attention_mask` of X.npz: the
check that a folder written by `pldr_jax.io.hf.save_hf` loads in the authors' port
(tests/test_heads.py runs it when PLDR_HF_PYTHON / PLDR_HF_PORT are set).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            head_dim=16, A_dff=12, num_reslayerA=2, num_denseA=2, max_position_embeddings=32,
            pad_token_id=0, bos_token_id=2, eos_token_id=3)

CASES = {
    # name: (architecture, config extras, seed)
    "seqcls_single": ("PldrllmForSequenceClassification",
                      dict(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                           label2id={"neg": 0, "neu": 1, "pos": 2}), 1),
    "seqcls_multi": ("PldrllmForSequenceClassification",
                     dict(num_labels=4, problem_type="multi_label_classification"), 2),
    "seqcls_regression": ("PldrllmForSequenceClassification", dict(num_labels=1), 3),
    "tokencls": ("PldrllmForTokenClassification",
                 dict(num_labels=5, reference_rope=False,
                      id2label={0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"},
                      label2id={"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3, "I-LOC": 4}), 4),
    "qa": ("PldrllmForQuestionAnswering", dict(), 5),
}


def register(port: Path):
    sys.path.insert(0, str(port))
    mod = importlib.import_module("pldrllm")
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                              AutoModelForSequenceClassification, AutoModelForTokenClassification)
    AutoConfig.register("pldrllm", mod.PldrllmConfig)
    AutoModelForCausalLM.register(mod.PldrllmConfig, mod.PldrllmForCausalLM)
    AutoModelForSequenceClassification.register(mod.PldrllmConfig, mod.PldrllmForSequenceClassification)
    AutoModelForTokenClassification.register(mod.PldrllmConfig, mod.PldrllmForTokenClassification)
    AutoModelForQuestionAnswering.register(mod.PldrllmConfig, mod.PldrllmForQuestionAnswering)
    return mod


def inputs(seed: int, vocab: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(3, 12)).astype(np.int64)
    lengths = [12, 9, 5]                      # right padding with pad id 0
    for r, n in enumerate(lengths):
        ids[r, n:] = 0
    return ids, (ids != 0).astype(np.int64), lengths, rng


def run_model(model, arch: str, ids, mask, labels=None):
    import torch
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    if arch != "PldrllmForQuestionAnswering":
        kw["use_cache"] = False
    if labels:
        kw.update({k: torch.tensor(v) for k, v in labels.items()})
    with torch.no_grad():
        out = model(**kw)
    res = {"last_hidden": out.hidden_states[-1].numpy()}
    if arch == "PldrllmForQuestionAnswering":
        res["start_logits"] = out.start_logits.numpy()
        res["end_logits"] = out.end_logits.numpy()
    else:
        res["logits"] = out.logits.numpy()
    if out.loss is not None:
        res["loss"] = np.asarray(out.loss.numpy(), np.float32)
    return res


def make(port: Path, out: Path) -> None:
    import torch
    mod = register(port)
    out.mkdir(parents=True, exist_ok=True)
    for name, (arch, extra, seed) in CASES.items():
        torch.manual_seed(seed)
        cfg = mod.PldrllmConfig(**TINY, **extra)
        cfg.architectures = [arch]
        model = getattr(mod, arch)(cfg)
        head = model.qa_outputs if arch == "PldrllmForQuestionAnswering" else model.score
        with torch.no_grad():
            if head.bias is not None:
                head.bias.copy_(0.5 * torch.randn_like(head.bias))
        model.eval()
        model.config._attn_implementation = "eager"
        ids, mask, lengths, rng = inputs(seed, TINY["vocab_size"])
        labels = {}
        if name == "seqcls_single":
            labels["labels"] = np.array([2, 0, 1], np.int64)
        elif name == "seqcls_multi":
            labels["labels"] = rng.integers(0, 2, size=(3, 4)).astype(np.float32)
        elif name == "seqcls_regression":
            labels["labels"] = rng.normal(size=(3,)).astype(np.float32)
        elif name == "tokencls":
            lab = rng.integers(0, 5, size=ids.shape).astype(np.int64)
            lab[mask == 0] = -100
            labels["labels"] = lab
        elif name == "qa":
            # row 2's end lies past the sequence: the port clamps it to seq_len and ignores it
            labels["start_positions"] = np.array([3, 1, 2], np.int64)
            labels["end_positions"] = np.array([6, 4, 40], np.int64)
        res = run_model(model, arch, ids, mask, labels)
        model.save_pretrained(out / name, safe_serialization=True)
        np.savez(out / f"{name}_outputs.npz", input_ids=ids, attention_mask=mask, **labels, **res)
        print(name, {k: v.shape for k, v in res.items()})


def run_folder(port: Path, folder: Path, inputs_npz: Path, save: Path) -> None:
    mod = register(port)
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    model = getattr(mod, arch).from_pretrained(folder, attn_implementation="eager")
    model.eval()
    d = np.load(inputs_npz)
    np.savez(save, **run_model(model, arch, d["input_ids"], d["attention_mask"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", required=True, type=Path, help="folder holding the `pldrllm` package")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--run", type=Path, help="a pldrllm folder to run (instead of making the golden set)")
    ap.add_argument("--inputs", type=Path)
    ap.add_argument("--save", type=Path)
    a = ap.parse_args(argv)
    if a.run:
        if not (a.inputs and a.save):
            ap.error("--run needs --inputs and --save")
        run_folder(a.port, a.run, a.inputs, a.save)
    else:
        make(a.port, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
