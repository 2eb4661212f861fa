"""lm-evaluation-harness tasks while training (``--eval-tasks``), on the in-memory parameters.

`TaskEvaluator` runs `lm_eval.simple_evaluate` with the project's adapter
(`pldr_jax.eval.harness.PLDRLM`, built on the training state's parameters -- no checkpoint is
written or read) and returns one metrics.jsonl record ``{"kind": "lm_eval", "step", "lm_eval_s",
<task>: {<metric>: value}}`` (standard errors left out).  Tasks are names known to lm-eval, the
project's shipped groups (`pldr_jax.eval.lm_eval_cli.TASKS_DIR`) or paths of local task YAML files
(their folders go on the include path).  The task index is built once per evaluator (lm-eval's
whole built-in index only when a name is not found among the local ones).  Every process runs the
evaluation (the forward passes over sharded parameters are collective); process 0 logs it.  Its
time is reported as ``lm_eval_s``, apart from training time.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["TaskEvaluator"]


class TaskEvaluator:
    """Evaluate lm-eval `tasks` on (cfg, params) (see the module docstring).

    tokenizer: the run's Tokenizer; limit: examples per task (None = all); batch_size: rows per
    forward pass; g_lm: a predefined-G model's G_LM.
    """

    def __init__(self, tasks: Sequence[str], tokenizer, *, limit: int | None = None, batch_size: int = 8,
                 g_lm=None):
        try:
            import lm_eval  # noqa: F401
        except ImportError as e:
            raise ValueError("--eval-tasks needs lm-evaluation-harness: pip install \"pldr-jax[eval]\"") from e
        from ..eval.lm_eval_cli import TASKS_DIR
        if not tasks:
            raise ValueError("TaskEvaluator needs at least one task")
        include = [str(TASKS_DIR)]
        self.tasks: list[str] = []
        for t in tasks:
            p = Path(t)
            if p.suffix in (".yaml", ".yml"):
                if not p.is_file():
                    raise FileNotFoundError(f"--eval-tasks {t}: no such task file")
                import yaml
                name = (yaml.safe_load(p.read_text()) or {}).get("task")
                if not isinstance(name, str):
                    raise ValueError(f"--eval-tasks {t}: the YAML file has no 'task:' name")
                include.append(str(p.parent.absolute()))
                self.tasks.append(name)
            else:
                self.tasks.append(t)
        self.include = list(dict.fromkeys(include))
        self.tokenizer, self.limit, self.batch_size, self.g_lm = tokenizer, limit, int(batch_size), g_lm
        self._tm = None

    def _task_manager(self):
        if self._tm is None:
            from lm_eval.tasks import TaskManager
            tm = TaskManager(include_defaults=False, include_path=self.include)
            if any(t not in tm.task_index for t in self.tasks):
                tm = TaskManager(include_defaults=True, include_path=self.include)
            missing = [t for t in self.tasks if t not in tm.task_index]
            if missing:
                raise ValueError(f"--eval-tasks: unknown task(s) {missing}: give lm-eval task names or paths of task "
                                 "YAML files")
            self._tm = tm
        return self._tm

    def __call__(self, cfg, params, step: int) -> dict[str, Any]:
        import lm_eval
        from ..eval.harness import PLDRLM
        t0 = time.perf_counter()
        lm = PLDRLM(cfg, params, self.tokenizer, g_lm=self.g_lm, batch_size=self.batch_size)
        quiet = logging.getLogger("lm_eval")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=list(self.tasks), task_manager=self._task_manager(),
                                          limit=self.limit, log_samples=False, verbosity="ERROR")
        finally:
            quiet.setLevel(level)
        rec: dict[str, Any] = {"kind": "lm_eval", "step": int(step)}
        for task, metrics in (out or {}).get("results", {}).items():
            vals = {}
            for k, v in metrics.items():
                name = k.split(",")[0]
                if "stderr" in name or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if math.isfinite(v):
                    vals[name] = float(v)
            if vals:
                rec[task] = vals
        rec["lm_eval_s"] = time.perf_counter() - t0
        return rec
