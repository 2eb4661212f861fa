"""The fine-tuning run: a task head (or the LM itself, SFT) trained on encoded data, with pretraining's
machinery.

`run_finetune` builds a `train.setup.TrainRun` for the job and runs it through the pretraining
loop's parts: the mesh (`train.sharding.make_mesh`, ``Recipe.mesh``) and the one rule table for
params, head, optimiser state, batch and activations (`finetune.step`); `train.steploop.run_steps`
(the step loop: non-finite updates skipped as in pretraining, periodic validation, checkpoint
cadence); `train.reporting.Reporter` (the progress bar, metrics.jsonl ``train`` rows of loss / lr /
grad norm / tokens/s, ``eval`` rows of the task's validation metrics prefixed ``val_``, TensorBoard
when installed, a ``resume`` row: `read_metrics` gives one history); `train.saving.CheckpointCadence`
(orbax, asynchronous) and `train.resume.decide_resume` (the newest good checkpoint, restored onto the
current mesh, corrupt ones quarantined); `reporting.plot_run` (``loss_curve.png``: train and
validation loss, the task's main metric on a second axis); `reporting.run_summary` (the closing lines).

The data order is a seeded permutation per epoch and the batch of step s is a function of s, so a
run killed after checkpoint k and started again continues from k with the same batches: the same
final weights as an uninterrupted run.  The checkpointed state is a `train.state.TrainState` whose
params are the trained tree of `finetune.step` (an SFT run's is the LM's: `pldr-jax generate WORKDIR`
loads it); the checkpoint's config holds the job (task, labels, recipe, data digest, model), and a
resume with other arguments is refused before anything is read.  The end exports WORKDIR/hf (the
authors' Hugging Face format, head included).

``Recipe.fixed_g``: every layer's G_LM is computed once from the starting model -- the G-cache that
decoding keeps for a prompt (`g_sources.transferred_g` of the first training sequence, unpadded) --
and used as a constant operator in every step and evaluation; the metric learner is frozen (it gets
no gradient; `finetune.step.frozen_mask`).  The G is written to WORKDIR/fixed_g.npy.
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
import numpy as np

from ..config import PLDRConfig
from ..heads import HeadConfig
from ..train.checkpoint import read_config
from ..train.config import TrainConfig
from ..train.faults import NonFiniteMonitor, estimate_checkpoint_bytes, preflight_checkpoint_dir
from ..train.loop import train_result
from ..train.reporting import Reporter, plot_run, run_summary
from ..train.resume import checkpoint_steps, decide_resume
from ..train.saving import CheckpointCadence
from ..train.setup import TrainRun, resolve_backend
from ..train.sharding import check_batch_size, make_mesh, replicated, shard_batch
from ..train.steploop import run_steps
from . import metrics as M
from . import step as S
from .data import Encoded
from .step import sft_loss, sft_targets

__all__ = ["Recipe", "sft_targets", "sft_loss", "fixed_g_lm", "run_finetune", "FinetuneEval"]

#: Recipe fields that do not change the trained weights (free to differ on a resume)
RUN_ONLY = ("max_steps", "eval_every", "save_every", "mesh", "log_every", "progress", "plot", "tensorboard")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The authors' fine-tuning recipe as defaults: lr 7e-5, 20 warm-up steps, clipping 1.0
    (global norm, as the Hugging Face Trainer), 2 epochs, cosine to 1 % of lr.  freeze_decoder:
    train the head only; fixed_g: G_LM held fixed (see the module docstring).  mesh: (data, fsdp,
    tensor) as pretraining's --mesh; nonfinite: pretraining's policy ("skip" | "stop" | "off")."""
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
    fixed_g: bool = False
    nonfinite: str = "skip"
    max_steps: int = 0           # stop after this many steps (0: the epochs' count); for tests / kills
    mesh: tuple = (-1, 1, 1)
    log_every: int = 10
    progress: bool = True
    plot: bool = True
    tensorboard: bool = True


def recipe_record(recipe: Recipe) -> dict:
    """The recipe fields that decide the trained weights (compared on a resume)."""
    return {k: v for k, v in dataclasses.asdict(recipe).items() if k not in RUN_ONLY}


def fixed_g_lm(cfg: PLDRConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    """The G-cache of the starting model for one sequence (its pad tokens dropped): G_LM
    [num_layers, H, dk, dk], exactly what the prefill of decoding caches for that prompt."""
    from ..g_sources import transferred_g
    if not cfg.learned_g:
        raise ValueError(f"--fixed-g needs a learned-G model; this one's G_LM is already predefined "
                         f"(custom_G_type={cfg.custom_G_type!r})")
    row = np.asarray(tokens)
    row = row[: int(np.sum(row != 0))]
    decoder = {k: v for k, v in params.items() if k not in ("head", "final")}
    return np.asarray(jax.device_get(transferred_g(cfg, decoder, row[None], pad_aware=False)))


def _batch(task: str, data: Encoded, idx: np.ndarray, batch_size: int) -> dict:
    """A fixed-shape batch of rows idx, then dummy rows ("mask" 0) up to batch_size."""
    pad = batch_size - len(idx)
    full = np.concatenate([idx, np.zeros(pad, idx.dtype)]) if pad else idx
    mask = np.arange(batch_size) < len(idx)
    sel = lambda a: np.asarray(a)[full]
    out = {"inputs": sel(data.tokens), "mask": mask.astype(np.float32)}
    if task == "qa":
        out["start"], out["end"] = (sel(x) for x in data.labels)
    elif task == "sft":     # dummy rows have no response
        out["labels"] = sel(data.labels) & mask[:, None]
    else:
        out["labels"] = sel(data.labels)
    return out


def _train_batches(task: str, data: Encoded, batch_size: int, seed: int, start: int, total: int):
    """The batches of steps start+1 .. total: epoch e's seeded permutation, in order."""
    spe = math.ceil(len(data) / batch_size)
    perm_epoch, perm = None, None
    for step in range(start, total):
        epoch, pos = divmod(step, spe)
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, np.random.default_rng([seed, epoch]).permutation(len(data))
        yield _batch(task, data, perm[pos * batch_size:(pos + 1) * batch_size], batch_size)


class FinetuneEval:
    """The step loop's periodic task (`train.evaluation.PeriodicTask`): the task's validation
    metrics (`metrics`) and loss every ``eval_every`` steps and after the last, as ``eval`` rows."""

    def __init__(self, run, reporter, task: str, hcfg, valid: Encoded | None, labels: tuple,
                 problem_type: str | None, decode=None):
        self._run, self.reporter = run, reporter
        self.task, self.hcfg, self.valid, self.labels = task, hcfg, valid, labels
        self.problem_type, self.decode = problem_type, decode
        self.last: dict = {}

    def due(self, step: int, last: bool) -> bool:
        every = self._run.tcfg.eval_every
        return bool(every) and step % every == 0 and not last

    def run(self, step: int) -> None:
        if self.valid is None:
            return
        res = evaluate(self._run, self.task, self.valid, self.labels, self.problem_type, self.decode)
        self.last = res
        self.reporter.eval_result({"kind": "eval", "step": step, **{f"val_{k}": v for k, v in res.items()}})

    def final(self, step: int) -> None:
        self.run(step)


def evaluate(run, task: str, data: Encoded, labels: tuple, problem_type: str | None, decode=None) -> dict:
    """Validation metrics of `task` on encoded data with the run's current params (see `metrics`;
    "loss": the task's loss); decode: ids -> text (QA)."""
    bs = run.tcfg.batch_size
    outs, loss_sum, count = [], 0.0, 0.0
    for i in range(0, len(data), bs):
        idx = np.arange(i, min(i + bs, len(data)))
        r = jax.device_get(run.steps.eval_step(run.state.params, shard_batch(_batch(task, data, idx, bs), run.mesh),
                                               run.g_dev))
        loss_sum += float(r["loss_sum"])
        count += float(r["count"])
        if task != "sft":
            o = r["outputs"]
            outs.append(tuple(np.asarray(x)[:len(idx)] for x in o) if isinstance(o, tuple) else np.asarray(o)[:len(idx)])
    loss = loss_sum / max(count, 1.0)
    if task == "sft":
        return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "tokens": int(count)}
    if task == "qa":
        start = np.concatenate([o[0] for o in outs])
        end = np.concatenate([o[1] for o in outs])
        return {"loss": loss, **M.squad_em_f1(_qa_predictions(start, end, data, decode),
                                              [m["answers"] for m in data.meta])}
    logits = np.concatenate(outs)
    if task == "token-cls":
        pred_seqs, gold_seqs = [], []
        for i, m in enumerate(data.meta):
            ids = logits[i].argmax(-1)
            pred_seqs.append([labels[int(ids[s])] for s in m["starts"]])
            gold_seqs.append(m["tags"])
        return {"loss": loss, **M.entity_prf(pred_seqs, gold_seqs), "token_accuracy": float(np.mean(
            [p == g for ps, gs in zip(pred_seqs, gold_seqs) for p, g in zip(ps, gs)]))}
    if problem_type == "regression":
        return {"loss": loss, **M.regression(logits, data.labels)}
    if problem_type == "multi_label_classification":
        return {"loss": loss, **M.multi_label(logits, data.labels)}
    return {"loss": loss, **M.classification(logits.argmax(-1), data.labels)}


#: the metric drawn beside the loss in loss_curve.png
PLOT_METRIC = {"seq-cls": "accuracy", "token-cls": "f1", "qa": "f1", "sft": "perplexity"}


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
                 g_lm=None, decode=None, log=print, devices=None, rules=None) -> dict:
    """Train, checkpoint, evaluate, export (see the module docstring).  devices: the mesh's devices
    (default all); rules: entries replacing those of the sharding rule table.  Returns {"step",
    "valid": metrics, "export": path, "summary": the closing lines, "paths", "state": the final
    sharded TrainState}."""
    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    ckpt_dir = workdir / "checkpoints"
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    plan_total = max(1, int(round(recipe.epochs * steps_per_epoch)))
    total = min(plan_total, recipe.max_steps) if recipe.max_steps else plan_total
    warm = min(recipe.warmup_steps, plan_total)
    tcfg = TrainConfig(workdir=str(workdir), steps=total, seed=recipe.seed, resume=bool(checkpoint_steps(ckpt_dir)),
                       batch_size=recipe.batch_size, seq_len=int(train.tokens.shape[1]),
                       learning_rate=recipe.learning_rate, warmup_steps=warm, total_steps=plan_total,
                       alpha=recipe.min_lr_ratio, weight_decay=recipe.weight_decay, clip_value=None,
                       clip_norm=recipe.clip_norm, mesh=tuple(recipe.mesh), log_every=recipe.log_every,
                       eval_every=recipe.eval_every or steps_per_epoch, eval_batches=None,
                       save_every=recipe.save_every, keep_checkpoints=2, progress=recipe.progress,
                       plot=recipe.plot, tensorboard=recipe.tensorboard, nonfinite=recipe.nonfinite)
    mesh = make_mesh(*tcfg.mesh, devices=devices)
    check_batch_size(tcfg.batch_size, mesh)

    if recipe.fixed_g:
        g_lm = fixed_g_lm(cfg, params, train.tokens[0])
    tree = dict(params) if task == "sft" else {**{k: v for k, v in params.items() if k != "final"}, "head": head}
    frozen = S.frozen_mask(tree, freeze_decoder=recipe.freeze_decoder and task != "sft", fixed_g=recipe.fixed_g)
    tx, schedule = S.finetune_optimizer(recipe.learning_rate, warm, plan_total, recipe.min_lr_ratio,
                                        recipe.weight_decay, recipe.clip_norm, frozen)
    tree = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)
    p_sh = S.param_shardings(cfg, hcfg, tree, mesh, rules)
    example = _batch(task, train, np.arange(min(recipe.batch_size, len(train))), recipe.batch_size)
    steps = S.make_steps(cfg, hcfg, task, tx, schedule, tree, p_sh, mesh, example, frozen,
                         nonfinite_guard=tcfg.fault_policy().guard, rules=rules)
    abstract = S.abstract_state(tx, tree, p_sh, mesh)

    conf = {**run_config, "model": cfg.to_dict(), "total_steps": total, "mesh": dict(mesh.shape)}
    if tokenizer_file is not None:
        conf["tokenizer"] = str(workdir / "tokenizer.model")
    if recipe.fixed_g:
        conf["g_lm"] = "fixed_g.npy"
    if tcfg.resume:     # the same job, checked before any array is read
        stored = read_config(ckpt_dir, checkpoint_steps(ckpt_dir)[-1])
        for k in ("task", "model", "labels", "problem_type", "recipe", "train_digest"):
            if json.dumps(stored.get(k), sort_keys=True) != json.dumps(_jsonable(conf.get(k)), sort_keys=True):
                raise ValueError(f"{workdir} holds a fine-tuning run with a different {k} (step "
                                 f"{checkpoint_steps(ckpt_dir)[-1]}); resume it with the same arguments or pick "
                                 f"a new --workdir")
    else:
        preflight_checkpoint_dir(ckpt_dir, estimate_checkpoint_bytes(abstract))
    run = TrainRun(model_cfg=cfg, tcfg=tcfg, workdir=workdir, ckpt_dir=ckpt_dir, mesh=mesh,
                   backend=resolve_backend(tcfg, mesh), steps=steps, abstract=abstract,
                   monitor=NonFiniteMonitor(tcfg.fault_policy(), log=log), log=log, main=jax.process_index() == 0,
                   t_start=t_start)
    run.config_record = conf
    run.resume_point = decide_resume(run)
    if run.resume_point is not None:
        run.state = run.resume_point.state
        log(f"resumed from step {int(run.state.step)} of {total}")
    else:
        run.state = S.init_state(tx, tree, p_sh, mesh, recipe.seed)
    run.start_step = run.step = int(run.state.step)
    run.g_lm = g_lm
    run.g_dev = None if g_lm is None else jax.device_put(np.asarray(g_lm, np.float32), replicated(mesh))
    run.batches = _train_batches(task, train, recipe.batch_size, recipe.seed, run.start_step, total)
    if run.main:
        if tokenizer_file is not None and not (workdir / "tokenizer.model").is_file():
            shutil.copyfile(tokenizer_file, workdir / "tokenizer.model")
        if recipe.fixed_g:
            np.save(workdir / "fixed_g.npy", np.asarray(g_lm))
            run.g_path = workdir / "fixed_g.npy"
        (workdir / "run_config.json").write_text(json.dumps(_jsonable(conf), indent=2))
    if tokenizer_file is not None:
        run.tok_path = str(workdir / "tokenizer.model")
    reporter = Reporter(run)
    ev = FinetuneEval(run, reporter, task, hcfg, valid, labels, problem_type, decode)
    run_steps(run, reporter, CheckpointCadence(run), periodic=[ev])
    plot = plot_run(run, metric=PLOT_METRIC[task], title=f"fine-tuning {task} ({cfg.num_layers} layers, "
                    f"d_model {cfg.d_model})", ylabel="loss")
    res = train_result(run, reporter, plot)
    summary = run_summary(res)
    out = jax.device_get(run.state.params)
    params_out = {k: v for k, v in out.items() if k != "head"}
    export = _export(workdir / "hf", cfg, params_out, out.get("head"), hcfg,
                     None if recipe.fixed_g else g_lm, tokenizer_file)
    return {"step": run.step, "valid": ev.last, "export": str(export), "summary": summary, "paths": res.paths,
            "state": run.state}


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
