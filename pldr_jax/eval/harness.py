"""An lm-evaluation-harness model adapter for pldr_jax models.

``PLDRLM`` implements lm-eval's ``LM`` interface:

* ``loglikelihood(requests)``: ``args = (context, continuation)`` -> ``[(logprob, is_greedy)]``;
* ``loglikelihood_rolling(requests)``: ``args = (text,)`` -> ``[logprob]`` of the whole text given
  the EOS prefix, in max_seq_len windows (every token predicted once, the last window with full
  context);
* ``generate_until(requests)``: ``args = (context, gen_kwargs)`` with ``until`` (str or list),
  ``max_gen_toks``, ``do_sample``, ``temperature``, ``top_k``, ``top_p`` -> ``[str]``.

Requests are lm-eval ``Instance`` objects or anything with an ``.args`` tuple, or plain tuples.
Strings are tokenized with the model's sentencepiece tokenizer (lm-eval's context/continuation
split); token-id lists are accepted in place of strings too (then no tokenizer is needed, and
``generate_until`` returns the ids as a space-separated string).

When ``lm_eval`` is importable the class subclasses ``lm_eval.api.model.LM`` and is registered as
``"pldr_jax"``, so ``lm_eval --model pldr_jax --model_args pretrained=<ckpt>,tokenizer=<tok.model>``
works once ``pldr_jax.eval.harness`` is imported (e.g. ``python -c "import pldr_jax.eval.harness,
lm_eval.__main__ as m; m.cli_evaluate()" ...``) or from Python::

    import lm_eval
    from pldr_jax.eval.harness import PLDRLM
    lm = PLDRLM(pretrained="ckpt", tokenizer="tok.model", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy", "hellaswag", "piqa"])

The scoring mode (``mode="full"``, default: one pass over context + continuation, as the authors'
HF model under lm-eval; ``"cached"``; ``"causal"``) is explained in ``pldr_jax.eval.multiple_choice``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .multiple_choice import EOS_ID, MODES, encode_pair, loglikelihood_tokens, make_encoder
from .perplexity import doc_loglikelihoods

__all__ = ["PLDRLM", "HAS_LM_EVAL"]

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


class PLDRLM(_Base):
    """lm-eval ``LM`` adapter around ``(cfg, params)`` of a pldr_jax model.

    Build from memory (``PLDRLM(cfg, params, tokenizer)``) or from files
    (``PLDRLM(pretrained=path, tokenizer="tok.model")``; ``pretrained`` also takes
    ``"preset:<name>[:seed]"``).  g_lm / g_source: a fixed G_LM (array, or a ``make_g`` spec string);
    predefined-G checkpoints use their own.  mode: "full" | "cached" | "causal".  batch_size: rows
    per forward pass.  max_gen_toks: default new-token limit of ``generate_until``.
    """

    def __init__(self, cfg=None, params=None, tokenizer=None, *, pretrained: str | None = None, config=None,
                 g_lm=None, g_source: str | None = None, batch_size: int | str = 8, max_gen_toks: int = 256,
                 mode: str = "full", seed: int = 0, **unused):
        super().__init__()
        from ..g_sources import load_model_spec, make_g

        if cfg is None or params is None:
            if pretrained is None:
                raise ValueError("PLDRLM needs (cfg, params) or pretrained=<checkpoint path>")
            cfg, params, g_loaded = load_model_spec(pretrained, config)
            g_lm = g_loaded if g_lm is None else g_lm
        if g_source:
            import jax
            g_lm = make_g(cfg, g_source, jax.random.key(int(seed)))
        if isinstance(tokenizer, str):
            from ..data import Tokenizer
            tokenizer = Tokenizer.load(tokenizer)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(batch_size, str):
            batch_size = 8 if batch_size.startswith("auto") else int(batch_size)
        self.cfg, self.params, self.g_lm = cfg, params, g_lm
        self.tokenizer = tokenizer
        self._encode = make_encoder(tokenizer) if tokenizer is not None else None
        self._batch_size = int(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self.mode = mode
        self.seed = int(seed)

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

    # ---------------------------------------------------------------- tokenization
    def tok_encode(self, text: str) -> list[int]:
        if self._encode is None:
            raise ValueError("text requests need a tokenizer (PLDRLM(..., tokenizer=...)); or pass token-id lists")
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

    # ---------------------------------------------------------------- the LM interface
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``[(log p(continuation | context), is_greedy)]`` per request (empty context -> EOS prefix)."""
        args = [_args(r) for r in requests]
        pairs = [self._pair(a[0], a[1]) for a in args]
        res = loglikelihood_tokens(self.cfg, self.params, pairs, mode=self.mode, g_lm=self.g_lm,
                                   batch_size=self._batch_size, prefix_id=self.prefix_token_id)
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
                                         prefix_id=self.prefix_token_id)
            for i, s in zip(nonempty, sums):
                out[i] = float(s)
        for a, r in zip(args, out):
            self.cache_hook.add_partial("loglikelihood_rolling", a, r)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, generated with the KV- and G-cache decoder
        (``pldr_jax.decode.generate``; greedy unless ``do_sample``), stopped at EOS, at
        ``max_gen_toks`` or at the first ``until`` string (which is cut off)."""
        args = [_args(r) for r in requests]
        out: list[str] = []
        for a in args:
            ctx = a[0]
            kw = dict(a[1]) if len(a) > 1 and a[1] else {}
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self._max_gen_toks))
            ids = [int(t) for t in ctx] if _is_ids(ctx) else self.tok_encode(ctx)
            if not ids:
                ids = [self.prefix_token_id]
            max_new = max(1, min(max_new, self.cfg.max_seq_len - 1))
            ids = ids[-(self.cfg.max_seq_len - max_new):]
            new = self._generate(ids, max_new, kw)
            if new and new[-1] == self.eot_token_id:
                new = new[:-1]
            text = self.tok_decode(new)
            for s in until:
                if s and s in text:
                    text = text[: text.index(s)]
            self.cache_hook.add_partial("generate_until", a, text)
            out.append(text)
        return out

    def _generate(self, ids: list[int], max_new: int, kw: dict) -> list[int]:
        do_sample = bool(kw.get("do_sample", False))
        temperature = float(kw.get("temperature", 1.0) or 0.0)
        greedy = not do_sample or temperature == 0.0
        try:
            from ..decode import generate
        except ImportError:
            generate = None
        if generate is None:  # pragma: no cover - fallback while the decoder is absent
            from ..analysis.invariance import greedy_generate
            if not greedy:
                raise ValueError("sampling needs pldr_jax.decode")
            return greedy_generate(self.cfg, self.params, [ids], max_new, g_lm=self.g_lm, eos_id=self.eot_token_id)[0]
        samp = dict(top_k=1) if greedy else dict(temperature=temperature, top_k=int(kw.get("top_k", 0) or 0),
                                                   top_p=float(kw.get("top_p", 1.0) or 1.0))
        res = generate(self.cfg, self.params, [ids], max_new_tokens=max_new, kv_cache=True, g_cache=True,
                       eos_id=self.eot_token_id, g_lm=self.g_lm, seed=self.seed, **samp)
        return [int(t) for t in res.tokens[0]]


if HAS_LM_EVAL:  # pragma: no cover - depends on the environment
    try:
        from lm_eval.api.registry import register_model
        register_model("pldr_jax")(PLDRLM)
    except Exception:  # already registered (module re-import) or an incompatible registry
        pass
