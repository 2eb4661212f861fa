"""An lm-evaluation-harness model adapter for pldr_jax models.

``PLDRLM`` implements lm-eval's ``LM`` interface:

* ``loglikelihood(requests)``: ``args = (context, continuation)`` -> ``[(logprob, is_greedy)]``;
* ``loglikelihood_rolling(requests)``: ``args = (text,)`` -> ``[logprob]`` of the whole text given
  the EOS prefix, in max_seq_len windows (every token predicted once, the last window with full
  context);
* ``generate_until(requests)``: ``args = (context, gen_kwargs)`` with ``until`` (str or list),
  ``max_gen_toks``, ``do_sample``, ``temperature``, ``top_k``, ``top_p`` -> ``[str]``.  Requests
  sharing their generation parameters (all but ``until``) are decoded together, ``batch_size``
  ragged prompts per call of `pldr_jax.decode.generate` (each row decodes as it would alone);
  ``until`` cuts each continuation afterwards.

Requests are lm-eval ``Instance`` objects or anything with an ``.args`` tuple, or plain tuples.
Strings are tokenized with the model's sentencepiece tokenizer (lm-eval's context/continuation
split); token-id lists are accepted in place of strings too (then no tokenizer is needed, and
``generate_until`` returns the ids as a space-separated string).  The tokenizer defaults to the
checkpoint's own (`pldr_jax.io.run_tokenizer.resolve_tokenizer`: a run's or HF folder's
``tokenizer.model``); ``tokenizer=`` overrides it.  Progress bars (tqdm) honour lm-eval's
``disable_tqdm``.

When ``lm_eval`` is importable the class subclasses ``lm_eval.api.model.LM`` and is registered as
``"pldr_jax"`` on import of this module (after lm-eval's own models, which stay available).  The
command ``pldr-jax eval harness RUN --tasks ...`` (`pldr_jax.eval.lm_eval_cli`) runs lm-eval's CLI
with it; from Python::

    import lm_eval
    from pldr_jax.eval.harness import PLDRLM
    lm = PLDRLM(pretrained="runs/pldr", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy", "hellaswag", "piqa"])

batch_size: rows per forward pass / generate call; default: taken from the training run
(`pldr_jax.eval.batch_size.run_batch_size`), else 8; ``"auto"`` (or ``"auto:N"``): the largest
batch whose scoring pass fits a memory budget (``memory_budget_gb``, default 90% of the
accelerator's memory or half the host's available memory), measured from the compiled pass
(`pldr_jax.eval.batch_size.auto_batch_size`).

The scoring mode (``mode="full"``, default: one pass over context + continuation, as the authors'
HF model under lm-eval; ``"cached"``; ``"causal"``) is explained in ``pldr_jax.eval.multiple_choice``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from .batch_size import DEFAULT_BATCH_SIZE, auto_batch_size, parse_batch_size, run_batch_size
from .multiple_choice import EOS_ID, MODES, encode_pair, loglikelihood_tokens, make_encoder
from .perplexity import doc_loglikelihoods

__all__ = ["PLDRLM", "HAS_LM_EVAL", "model_args", "check_model_args"]

try:  # pragma: no cover - depends on the environment
    from lm_eval.api.model import LM as _Base
    HAS_LM_EVAL = True
except Exception:  # ImportError, or a broken optional install
    HAS_LM_EVAL = False

    class _Base:  # the parts of lm_eval.api.model.LM that the adapter relies on
        """Stand-in for ``lm_eval.api.model.LM`` when lm-eval is not installed."""

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.cache_hook = _NoCache()

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

        def set_cache_hook(self, cache_hook) -> None:
            self.cache_hook = cache_hook

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            args = _parse_arg_string(arg_string)
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**args, **extra)

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**arg_dict, **extra)


class _NoCache:
    def add_partial(self, attr, req, res) -> None:
        pass


def _parse_arg_string(s: str) -> dict:
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (s or "").split(","))):
        if "=" not in part:
            raise ValueError(f"model_args entry {part!r} is not key=value")
        k, v = part.split("=", 1)
        low = v.lower()
        if low in ("true", "false"):
            val: Any = low == "true"
        elif low in ("none", "null"):
            val = None
        else:
            try:
                val = int(v)
            except ValueError:
                try:
                    val = float(v)
                except ValueError:
                    val = v
        out[k.strip()] = val
    return out


def _args(req) -> tuple:
    a = getattr(req, "args", req)
    if not isinstance(a, (tuple, list)):
        raise ValueError(f"request must be an Instance (with .args) or a tuple, got {type(req).__name__}")
    return tuple(a)


def _is_ids(x) -> bool:
    return isinstance(x, (list, tuple, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in x)


def model_args() -> list[str]:
    """The keyword arguments `PLDRLM` takes (what ``--model_args`` may set)."""
    import inspect
    return [n for n, p in inspect.signature(PLDRLM.__init__).parameters.items()
            if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]


def check_model_args(names) -> None:
    """ValueError naming any of `names` that `PLDRLM` does not take, with the valid ones."""
    bad = sorted(set(names) - set(model_args()))
    if bad:
        raise ValueError(f"unknown pldr_jax model argument(s) {', '.join(bad)} (--model_args); valid: "
                         f"{', '.join(model_args())}")


class PLDRLM(_Base):
    """lm-eval ``LM`` adapter around ``(cfg, params)`` of a pldr_jax model.

    Build from memory (``PLDRLM(cfg, params, tokenizer)``) or from files
    (``PLDRLM(pretrained=path)``; ``pretrained`` also takes ``"preset:<name>[:seed]"``).
    tokenizer: a Tokenizer or a ``.model`` path; default: the checkpoint's own (see the module
    docstring).  g_lm / g_source: a fixed G_LM (array, or a ``make_g`` spec string);
    predefined-G checkpoints use their own.  mode: "full" | "cached" | "causal".  batch_size: rows
    per forward pass / generate call, ``"auto"`` or None (the run's, else 8); max_batch_size and
    memory_budget_gb bound ``"auto"``.  max_gen_toks: default new-token limit of ``generate_until``.
    step: a training directory's checkpoint step (default: the latest).  device: accepted because
    lm-eval passes its ``--device``; JAX places the model itself.  Any other keyword (a misspelt
    ``--model_args`` key) is refused with the list of valid ones (`check_model_args`).
    """

    def __init__(self, cfg=None, params=None, tokenizer=None, *, pretrained: str | None = None, config=None,
                 g_lm=None, g_source: str | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, memory_budget_gb: float | None = None,
                 max_gen_toks: int = 256, mode: str = "full", seed: int = 0, step: int | None = None,
                 device: str | None = None, **unknown):
        check_model_args(unknown)
        super().__init__()
        from ..g_sources import load_model_spec, make_g
        from ..io.run_tokenizer import resolve_tokenizer

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if cfg is None or params is None:
            if pretrained is None:
                raise ValueError("PLDRLM needs (cfg, params) or pretrained=<checkpoint path>")
            cfg, params, g_loaded = load_model_spec(str(pretrained), config,
                                                    step=None if step is None else int(step))
            g_lm = g_loaded if g_lm is None else g_lm
        if g_source:
            import jax
            g_lm = make_g(cfg, g_source, jax.random.key(int(seed)))
        tokenizer = resolve_tokenizer(pretrained, tokenizer)
        self.cfg, self.params, self.g_lm = cfg, params, g_lm
        self.tokenizer = tokenizer
        self._encode = make_encoder(tokenizer) if tokenizer is not None else None
        self.mode = mode
        self.seed = int(seed)
        self._max_gen_toks = int(max_gen_toks)
        bs = DEFAULT_BATCH_SIZE if batch_size is None else parse_batch_size(batch_size)
        if batch_size is None and pretrained is not None:
            bs = run_batch_size(pretrained, cfg.max_seq_len) or DEFAULT_BATCH_SIZE
        if bs == "auto":
            budget = None if memory_budget_gb is None else int(float(memory_budget_gb) * 2 ** 30)
            bs = auto_batch_size(cfg, params, mode=mode, g_lm=g_lm, budget_bytes=budget,
                                 max_batch_size=int(max_batch_size or 512))
            self.batch_sizes = {"auto": int(bs)}   # lm-eval prints these beside "batch_size: auto"
        self._batch_size = int(bs)
        self._decode_params = None

    # ---------------------------------------------------------------- properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def prefix_token_id(self) -> int:
        return EOS_ID

    @property
    def max_length(self) -> int:
        return self.cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", None) or "pldr_jax-ids")

    def get_model_info(self) -> dict:
        """Recorded by lm-eval in the results' "config"."""
        return {"model_mode": self.mode, "model_batch_size": self._batch_size, "max_seq_len": self.cfg.max_seq_len,
                "tokenizer": self.tokenizer_name}

    # ---------------------------------------------------------------- tokenization
    def tok_encode(self, text: str) -> list[int]:
        if self._encode is None:
            raise ValueError("text requests need a tokenizer: none was found beside the checkpoint; pass "
                             "tokenizer=<file.model> (or token-id lists)")
        return self._encode(text)

    def tok_decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(int(t)) for t in ids)
        return self.tokenizer.decode([int(t) for t in ids])

    def _pair(self, context, continuation) -> tuple[list[int], list[int]]:
        if _is_ids(context) and _is_ids(continuation):
            return [int(t) for t in context], [int(t) for t in continuation]
        if isinstance(context, str) and isinstance(continuation, str):
            if context == "":
                return [], self.tok_encode(continuation)
            return encode_pair(self.tok_encode, context, continuation)
        raise ValueError("loglikelihood args must be (str, str) or (ids, ids)")

    @staticmethod
    def _progress(desc: str, disable_tqdm: bool):
        """A tqdm factory ``(total=...) -> bar`` for the scorers (no bar when disabled)."""
        from tqdm.auto import tqdm
        return functools.partial(tqdm, desc=desc, unit="row", disable=bool(disable_tqdm), leave=False)

    # ---------------------------------------------------------------- the LM interface
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``[(log p(continuation | context), is_greedy)]`` per request (empty context -> EOS prefix)."""
        args = [_args(r) for r in requests]
        pairs = [self._pair(a[0], a[1]) for a in args]
        res = loglikelihood_tokens(self.cfg, self.params, pairs, mode=self.mode, g_lm=self.g_lm,
                                   batch_size=self._batch_size, prefix_id=self.prefix_token_id,
                                   progress=self._progress("loglikelihood", disable_tqdm))
        for a, r in zip(args, res):
            self.cache_hook.add_partial("loglikelihood", a, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text (``args = (text,)``), conditioned on the EOS prefix."""
        args = [_args(r) for r in requests]
        docs = [[int(t) for t in a[0]] if _is_ids(a[0]) else self.tok_encode(a[0]) for a in args]
        out = [0.0] * len(docs)
        nonempty = [i for i, d in enumerate(docs) if d]
        if nonempty:
            sums, _ = doc_loglikelihoods(self.cfg, self.params, [docs[i] for i in nonempty], mode=self.mode,
                                         g_lm=self.g_lm, batch_size=self._batch_size,
                                         prefix_id=self.prefix_token_id,
                                         progress=self._progress("loglikelihood_rolling", disable_tqdm))
            for i, s in zip(nonempty, sums):
                out[i] = float(s)
        for a, r in zip(args, out):
            self.cache_hook.add_partial("loglikelihood_rolling", a, r)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, generated with the KV- and G-cache decoder
        (`pldr_jax.decode.generate`; greedy unless ``do_sample``), stopped at EOS, at
        ``max_gen_toks`` or at the first ``until`` string (which is cut off).

        Requests with equal generation parameters (``max_gen_toks``, sampling) form a group;
        each group is decoded longest prompt first, up to ``batch_size`` ragged prompts of one
        length bucket per call (the batch padded to a power of two with one-token filler prompts,
        so few shapes compile).
        A row decodes as it would alone, so the results do not depend on the batching."""
        from tqdm.auto import tqdm

        args = [_args(r) for r in requests]
        jobs = [self._gen_job(a) for a in args]
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job["key"], []).append(i)
        new_ids: list[list[int] | None] = [None] * len(jobs)
        bar = tqdm(total=len(jobs), desc="generate_until", unit="req", disable=bool(disable_tqdm), leave=False)
        calls = 0
        for key, idx in groups.items():
            for chunk in self._gen_chunks(idx, jobs):
                outs = self._generate([jobs[i]["ids"] for i in chunk], key, self.seed + calls)
                calls += 1
                for i, o in zip(chunk, outs):
                    new_ids[i] = o
                bar.update(len(chunk))
        bar.close()
        out: list[str] = []
        for a, job, new in zip(args, jobs, new_ids):
            if new and new[-1] == self.eot_token_id:
                new = new[:-1]
            text = self.tok_decode(new)
            for s in job["until"]:
                if s and s in text:
                    text = text[: text.index(s)]
            self.cache_hook.add_partial("generate_until", a, text)
            out.append(text)
        return out

    def _gen_chunks(self, idx: list[int], jobs: list[dict]) -> list[list[int]]:
        """Requests of one group in decode calls: longest prompt first, at most ``batch_size`` per
        call, and never two prompt-length buckets in one call (a short prompt padded to a long
        one's bucket would decode over the longer cache)."""
        from ..decode.buckets import bucket_length

        idx = sorted(idx, key=lambda i: -len(jobs[i]["ids"]))
        chunks: list[list[int]] = []
        for i in idx:
            b = bucket_length(len(jobs[i]["ids"]))
            last = chunks[-1] if chunks else None
            if last and len(last) < self._batch_size and bucket_length(len(jobs[last[0]]["ids"])) == b:
                last.append(i)
            else:
                chunks.append([i])
        return chunks

    def _gen_job(self, a: tuple) -> dict:
        """One generate_until request -> {"ids": prompt ids (left-truncated to fit), "until": [str],
        "key": (max_new, greedy, temperature, top_k, top_p)}."""
        ctx = a[0]
        kw = dict(a[1]) if len(a) > 1 and a[1] else {}
        until = kw.get("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.get("max_gen_toks", self._max_gen_toks))
        max_new = max(1, min(max_new, self.cfg.max_seq_len - 1))
        ids = [int(t) for t in ctx] if _is_ids(ctx) else self.tok_encode(ctx)
        if not ids:
            ids = [self.prefix_token_id]
        ids = ids[-(self.cfg.max_seq_len - max_new):]
        temperature = float(kw.get("temperature", 1.0) or 0.0)
        greedy = not bool(kw.get("do_sample", False)) or temperature == 0.0
        key = (max_new, True, 1.0, 1, 1.0) if greedy else (
            max_new, False, temperature, int(kw.get("top_k", 0) or 0), float(kw.get("top_p", 1.0) or 1.0))
        return {"ids": ids, "until": until, "key": key}

    def _generate(self, prompts: list[list[int]], key: tuple, seed: int) -> list[list[int]]:
        """New ids of each prompt (one `generate` call; the batch padded to a power of two)."""
        from ..decode import generate, prepare_params

        max_new, _greedy, temperature, top_k, top_p = key
        n = len(prompts)
        rows = min(self._batch_size, 1 << (n - 1).bit_length())
        filler = [[self.prefix_token_id]] * (rows - n)
        if self._decode_params is None:  # the configured dtype at every batch size: batching changes nothing
            self._decode_params = prepare_params(self.cfg, self.params, 1, bf16_min_batch=0)[1]
        res = generate(self.cfg, self._decode_params, prompts + filler, max_new_tokens=max_new, kv_cache=True,
                       g_cache=True, eos_id=self.eot_token_id, g_lm=self.g_lm, seed=seed, temperature=temperature,
                       top_k=top_k, top_p=top_p, bf16_min_batch=0)
        return [[int(t) for t in res.tokens[b]] for b in range(n)]


def _register() -> bool:
    """Register `PLDRLM` as lm-eval's ``"pldr_jax"`` model, after lm-eval's own models (lm-eval
    loads those only into an empty registry, so registering first would hide them)."""
    if not HAS_LM_EVAL:
        return False
    try:  # pragma: no cover - depends on the environment
        import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's built-in models)
        from lm_eval.api.registry import model_registry
    except Exception:
        return False
    try:
        model_registry.register("pldr_jax")(PLDRLM)
    except ValueError:  # "pldr_jax" is taken already (by the class of an earlier import of this module)
        pass
    return True


REGISTERED = _register()
