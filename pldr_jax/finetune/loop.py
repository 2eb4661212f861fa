"""The fine-tuning run: a task head (or the LM itself, SFT) trained on encoded data.

Built on the project's pieces: `model.forward` / `heads` for the objective, `train.optimizer.
make_optimizer` (global-norm clipping 1.0, AdamW, linear warm-up then cosine to `min_lr_ratio` x lr)
and `train.checkpoint.CheckpointManager` (orbax).  The checkpointed state is {"params", "head",
"opt_state"}; the data order is a seeded permutation per epoch, so a run killed after checkpoint
k and started again continues from k with the same batches: the same final weights as an
uninterrupted run.  An SFT run's checkpoints hold the full LM params under "params" and the
model config under "model", so `pldr-jax generate WORKDIR` loads them.

Each step appends {"step", "loss", "lr"} to WORKDIR/metrics.jsonl, each evaluation {"step",
"valid": {...}}; the end exports WORKDIR/hf (the authors' Hugging Face format, head included).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PLDRConfig
from ..heads import HeadConfig, apply_head, head_loss
from ..losses import masked_loss
from ..model import forward
from ..train.checkpoint import CheckpointManager
from ..train.optimizer import lr_schedule, make_optimizer
from . import metrics as M
from .data import Encoded

__all__ = ["Recipe", "sft_targets", "sft_loss", "run_finetune", "evaluate"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The authors' fine-tuning recipe as defaults: lr 7e-5, 20 warm-up steps, clipping 1.0
    (global norm, as the Hugging Face Trainer), 2 epochs, cosine to 1 % of lr."""
    learning_rate: float = 7e-5
    warmup_steps: int = 20
    clip_norm: float = 1.0
    epochs: float = 2.0
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.0
    batch_size: int = 8
    seed: int = 0
    eval_every: int = 0          # 0: at the end of each epoch
    save_every: int = 50
    freeze_decoder: bool = False
    max_steps: int = 0           # stop after this many steps (0: the epochs' count); for tests / kills


def sft_targets(tokens: jax.Array, response_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(inputs [B, L-1], targets [B, L-1]) of next-token SFT: the target of position t is
    tokens[t + 1] where response_mask[t + 1], else 0 (masked: prompt and padding targets)."""
    return tokens[:, :-1], jnp.where(response_mask[:, 1:], tokens[:, 1:], 0)


def sft_loss(cfg: PLDRConfig, params, tokens: jax.Array, response_mask: jax.Array, g_lm=None):
    """(mean next-token cross-entropy over response targets only, their count)."""
    inputs, targets = sft_targets(tokens, response_mask)
    logits = forward(cfg, params, inputs, g_lm).logits
    return masked_loss(logits, targets, pad_id=0)[0], jnp.sum(targets != 0)


def _objective(cfg, hcfg, task):
    def loss_fn(trainable, frozen, tokens, labels, example_mask, g_lm):
        params = {**frozen.get("params", {}), **trainable.get("params", {})}
        if task == "sft":
            return sft_loss(cfg, params, tokens, labels, g_lm)[0]
        hidden = forward(cfg, params, tokens, g_lm).hidden
        out = apply_head(hcfg, trainable["head"], hidden, tokens)
        return head_loss(hcfg, out, labels, example_mask=example_mask)[0]
    return loss_fn


def _batches(n: int, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def _take(data: Encoded, idx: np.ndarray, batch_size: int):
    """A fixed-shape batch: rows idx, then dummy rows (example_mask 0) up to batch_size."""
    pad = batch_size - len(idx)
    full = np.concatenate([idx, np.zeros(pad, idx.dtype)]) if pad else idx
    mask = np.arange(batch_size) < len(idx)
    sel = lambda a: np.asarray(a)[full]
    labels = tuple(sel(x) for x in data.labels) if isinstance(data.labels, tuple) else sel(data.labels)
    if not isinstance(labels, tuple) and labels.dtype == bool:   # SFT: dummy rows have no response
        labels = labels & mask[:, None]
    return sel(data.tokens), labels, mask


def evaluate(cfg: PLDRConfig, hcfg: HeadConfig | None, task: str, params, head, data: Encoded, labels: tuple,
             problem_type: str | None, batch_size: int, g_lm=None, decode=None) -> dict:
    """Validation metrics of `task` on encoded data (see `metrics`); decode: ids -> text (QA)."""
    fwd = jax.jit(lambda p, h, t: apply_head(hcfg, h, forward(cfg, p, t, g_lm).hidden, t)) if task != "sft" \
        else jax.jit(lambda p, t, m: sft_loss(cfg, p, t, m, g_lm))
    outs, ce_sum, n_tok = [], 0.0, 0.0
    for i in range(0, len(data), batch_size):
        idx = np.arange(i, min(i + batch_size, len(data)))
        tokens, lab, mask = _take(data, idx, batch_size)
        if task == "sft":
            loss, n = fwd(params, jnp.asarray(tokens), jnp.asarray(lab))
            ce_sum += float(loss) * float(n)
            n_tok += float(n)
            continue
        out = fwd(params, head, jnp.asarray(tokens))
        out = tuple(np.asarray(o)[:len(idx)] for o in out) if isinstance(out, tuple) else np.asarray(out)[:len(idx)]
        outs.append(out)
    if task == "sft":
        loss = ce_sum / max(n_tok, 1.0)
        return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "tokens": int(n_tok)}
    if task == "qa":
        start = np.concatenate([o[0] for o in outs])
        end = np.concatenate([o[1] for o in outs])
        return M.squad_em_f1(_qa_predictions(start, end, data, decode), [m["answers"] for m in data.meta])
    logits = np.concatenate(outs)
    if task == "token-cls":
        pred_seqs, gold_seqs = [], []
        for i, m in enumerate(data.meta):
            ids = logits[i].argmax(-1)
            pred_seqs.append([labels[int(ids[s])] for s in m["starts"]])
            gold_seqs.append(m["tags"])
        return M.entity_prf(pred_seqs, gold_seqs) | {"token_accuracy": float(np.mean(
            [p == g for ps, gs in zip(pred_seqs, gold_seqs) for p, g in zip(ps, gs)]))}
    if problem_type == "regression":
        return M.regression(logits, data.labels)
    if problem_type == "multi_label_classification":
        return M.multi_label(logits, data.labels)
    return M.classification(logits.argmax(-1), data.labels)


def _qa_predictions(start: np.ndarray, end: np.ndarray, data: Encoded, decode, max_answer: int = 30) -> list[str]:
    """The best span (start <= end < start + max_answer) inside each context, decoded to text."""
    preds = []
    for i, m in enumerate(data.meta):
        toks = data.tokens[i]
        c0, c1 = m["context_start"], int(np.sum(toks != 0)) - 1    # context tokens, EOS excluded
        best, span = -np.inf, (c0, c0)
        for s in range(c0, c1):
            e_hi = min(c1, s + max_answer)
            if e_hi <= s:
                continue
            e = s + int(np.argmax(end[i, s:e_hi]))
            if start[i, s] + end[i, e] > best:
                best, span = start[i, s] + end[i, e], (s, e)
        preds.append(decode(toks[span[0]:span[1] + 1].tolist()))
    return preds


def run_finetune(*, workdir: Path, cfg: PLDRConfig, task: str, params: dict, head: dict | None,
                 hcfg: HeadConfig | None, train: Encoded, valid: Encoded | None, labels: tuple,
                 problem_type: str | None, recipe: Recipe, run_config: dict, tokenizer_file: Path | None,
                 g_lm=None, decode=None, log=print) -> dict:
    """Train, checkpoint, evaluate, export.  Returns {"step", "valid": metrics, "export": path}."""
    workdir = Path(workdir)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total = max(1, int(round(recipe.epochs * steps_per_epoch)))
    if recipe.max_steps:
        total = min(total, recipe.max_steps)
    plan_total = max(1, int(round(recipe.epochs * steps_per_epoch)))
    warm = min(recipe.warmup_steps, plan_total)
    tx = make_optimizer(recipe.learning_rate, warm, plan_total, alpha=recipe.min_lr_ratio,
                        weight_decay=recipe.weight_decay, clip_value=None, clip_norm=recipe.clip_norm,
                        b2=0.999, eps=1e-8)
    schedule = lr_schedule(recipe.learning_rate, warm, plan_total, recipe.min_lr_ratio)
    if task == "sft":
        trainable, frozen = {"params": params}, {}
    elif recipe.freeze_decoder:
        trainable, frozen = {"head": head}, {"params": params}
    else:
        trainable, frozen = {"params": params, "head": head}, {}
    trainable = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), trainable)
    frozen = jax.tree_util.tree_map(jnp.asarray, frozen)
    opt_state = tx.init(trainable)
    loss_fn = _objective(cfg, hcfg, task)

    @jax.jit
    def train_step(trainable, opt_state, tokens, labels, example_mask):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens, labels, example_mask, g_lm)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return jax.tree_util.tree_map(lambda p, u: p + u, trainable, updates), opt_state, loss

    ckpt_dir = workdir / "checkpoints"
    conf = {**run_config, "model": cfg.to_dict(), "total_steps": total}
    if tokenizer_file is not None:
        conf["tokenizer"] = str(Path(workdir / "tokenizer.model").absolute())
    step = 0
    with CheckpointManager(ckpt_dir, max_to_keep=2, async_save=False) as mngr:
        latest = mngr.latest_step()
        state = {"params": trainable.get("params", {}), "head": trainable.get("head", {}), "opt_state": opt_state}
        if latest is not None:
            stored = mngr.restore_config(latest)
            for k in ("task", "model", "labels", "problem_type", "recipe", "train_digest"):
                if json.dumps(stored.get(k), sort_keys=True) != json.dumps(_jsonable(conf.get(k)), sort_keys=True):
                    raise ValueError(f"{workdir} holds a fine-tuning run with a different {k} (step {latest}); "
                                     f"resume it with the same arguments or pick a new --workdir")
            state, _ = mngr.restore(state, latest)
            step = latest
            log(f"resumed from step {step} of {total}")
        trainable = {k: state[k] for k in ("params", "head") if k in trainable}
        opt_state = state["opt_state"]
        if tokenizer_file is not None and not (workdir / "tokenizer.model").is_file():
            shutil.copyfile(tokenizer_file, workdir / "tokenizer.model")
        mfile = open(workdir / "metrics.jsonl", "a")
        eval_every = recipe.eval_every or steps_per_epoch
        last_valid: dict = {}

        def do_eval():
            if valid is None:
                return {}
            p = {**frozen.get("params", {}), **trainable.get("params", {})}
            res = evaluate(cfg, hcfg, task, p, trainable.get("head") or frozen.get("head"), valid, labels,
                           problem_type, recipe.batch_size, g_lm, decode)
            mfile.write(json.dumps({"step": step, "valid": res}) + "\n")
            mfile.flush()
            log(f"step {step}: valid " + ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)))
            return res

        t0 = time.time()
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            idx = _batches(len(train), recipe.batch_size, epoch, recipe.seed)[pos]
            tokens, lab, mask = _take(train, idx, recipe.batch_size)
            lab = tuple(jnp.asarray(x) for x in lab) if isinstance(lab, tuple) else jnp.asarray(lab)
            trainable, opt_state, loss = train_step(trainable, opt_state, jnp.asarray(tokens), lab, jnp.asarray(mask))
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {step}; lower --lr (last good "
                                         f"checkpoint: {mngr.latest_step()})")
            mfile.write(json.dumps({"step": step + 1, "loss": loss, "lr": float(schedule(step))}) + "\n")
            step += 1
            if step % 10 == 0 or step == total:
                log(f"step {step}/{total} loss {loss:.4f} ({time.time() - t0:.1f}s)")
            if step % eval_every == 0 and step < total:
                last_valid = do_eval()
            if step % recipe.save_every == 0 or step == total:
                mngr.save(step, {"params": trainable.get("params", {}), "head": trainable.get("head", {}),
                                 "opt_state": opt_state}, config=conf, force=True)
        last_valid = do_eval()
        mfile.close()
    params_out = {**frozen.get("params", {}), **trainable.get("params", {})}
    head_out = trainable.get("head") or frozen.get("head")
    export = _export(workdir / "hf", cfg, params_out, head_out, hcfg, g_lm, tokenizer_file)
    return {"step": step, "valid": last_valid, "export": str(export)}


def _export(folder: Path, cfg, params, head, hcfg, g_lm, tokenizer_file):
    from ..io.hf import save_hf
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_hf(cfg, jax.device_get(params), tmp, g_lm=g_lm, tokenizer_model=tokenizer_file,
            head_cfg=hcfg if hcfg is not None else None, head=jax.device_get(head) if hcfg is not None else None)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def _jsonable(x: Any):
    return json.loads(json.dumps(x, default=str))
