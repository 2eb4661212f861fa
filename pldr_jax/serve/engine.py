"""The serving engine: continuous batching over a fixed number of decode slots, usable without HTTP.

    engine = Engine(cfg, params, slots=8, tokenizer=tok)
    engine.start()                                     # the scheduler thread
    req = engine.submit(Request(prompt=[70, 48, 9], max_tokens=32, top_k=1))
    for out in req.outputs():                          # one `Output` per new token, then the last
        ...
    engine.stop()

Or driven by hand (tests, benchmarks): ``engine.submit(...)`` then ``engine.step()`` until idle.

Each `step` (1) admits waiting requests into free slots: their prompts are prefilled together
(`decode.loop.prefill_cache`; rows and prompt length padded to powers of two: one compilation per
(rows, length) bucket; each row as it would alone), each first token sampled from the prompt's logits and its cache written into the slot
(`slots.admit`), while the other slots keep their state; (2) runs ``steps_per_sync`` generate steps of
every slot in one jitted call (`slots.generate_step`: `decode.step.decode_step` + per-slot sampling;
a slot stops at its EOS or max_tokens on the device); (3) hands each live
request its token and frees the slots whose requests ended: EOS, a stop string, ``max_tokens`` or
cancellation (`Request.cancel`).  A request's tokens equal `decode.Sampler`'s for its prompt alone
with the same seed (`slots`: per-row sampling keys), whatever else is in the batch.

The step specification (cache mode, KV dtype, attention form) is the one `decode.request.make_request`
builds for a batch of ``slots`` rows on this platform, with per-row KV slots; the weights are the
`decode.Sampler`'s for that batch (`Sampler.weights`: prepared once, sharded over ``mesh`` when
given).  ``mode``: "kv_g" (KV- and G-cache), "kv" (G re-derived from the cached A each step), "g" and
"none" (the whole buffer re-run each step: correct, slow).  ``shared_g``: every request decodes with
the first admitted request's G (the authors' ``cache_first_G``; each prompt's own prefill still uses
its own G, as `Sampler` with ``shared_g``).  A given G (predefined-G models, ``g_lm``) is shared too.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ..config import PLDRConfig
from ..decode.buckets import bucket_length
from ..decode.loop import prefill_cache
from ..decode.request import make_request, normalize_prompts
from ..decode.sampler import Sampler
from ..decode.sampling import validate_sampling
from ..decode.sharding import prefill_scope
from ..decode.step import MODES
from ..model import normalize_g_lm
from .detok import TextStream
from .scoring import prompt_logprobs
from .slots import SlotParams, admit, empty_slots, generate_step

__all__ = ["Engine", "Request", "Output", "QueueFull", "EngineStopped"]


class QueueFull(RuntimeError):
    """The engine's waiting queue is full (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine no longer accepts requests (it is draining or stopped)."""


@dataclasses.dataclass
class Output:
    """What a request produced in one engine step (or at its end).

    tokens: the new token ids (one, or none at the end).  text: the text that became final
    (`detok.TextStream`).  logprobs: per new token (log p, {top id: log p}) when asked.
    finished: the request ended; finish_reason "stop" (EOS or a stop string), "length"
    (max_tokens or the cache length) or "cancelled".  prompt_logprobs: on the first output of a request
    that asked for them: per prompt token (None for the first, else (log p, {top id: log p})).
    """
    tokens: list
    text: str = ""
    logprobs: list | None = None
    finished: bool = False
    finish_reason: str | None = None
    prompt_logprobs: list | None = None


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One completion.  prompt: token ids.  max_tokens >= 0 (0: no generation, e.g. prompt
    log-probabilities only).  temperature > 0, top_k >= 0 (1 = greedy), top_p in (0, 1]; seed: the
    PRNG seed (`decode.Sampler`'s ``seed``; None: a random one).  stop: stop strings.  logprobs:
    report each new token's log p and the most likely tokens; prompt_logprobs: the prompt's too
    (`scoring`).  ignore_eos: do not end at the engine's EOS id.  on_output: called from the engine
    thread with every `Output` (default: a queue read by `outputs`)."""
    prompt: list
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple = ()
    logprobs: bool = False
    prompt_logprobs: bool = False
    ignore_eos: bool = False
    on_output: Callable[[Output], None] | None = None
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    # filled by the engine
    arrival: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    tokens: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    _cancel: bool = False
    _queue: Any = None
    _text: Any = None

    def cancel(self) -> None:
        """End the request at the engine's next step (its slot is freed; finish_reason "cancelled")."""
        self._cancel = True

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def outputs(self, timeout: float | None = None) -> Iterator[Output]:
        """The request's `Output`s as the engine produces them (without `on_output`), until the last."""
        while True:
            out = self._queue.get(timeout=timeout)
            yield out
            if out.finished:
                return

    @property
    def text(self) -> str:
        return self._text.text if self._text is not None else ""


class Engine:
    """Continuous batching over `slots` decode slots (see the module docstring).

    cfg, params: the model.  slots: rows of the batch.  max_len: the cache length S (prompt + new
    tokens of a request; default the model's max_seq_len).  mode: a `decode.step.MODES` name.
    shared_g: see the module docstring.  g_lm: a fixed G_LM (predefined-G models default to theirs).
    tokenizer: for stop strings and text (``decode(ids)``; None: ids only).  eos_id: a request ends
    after it (None: never).  max_queue: waiting requests beyond the slots before `submit` raises
    `QueueFull`.  steps_per_sync: generate steps per device call (`slots.generate_step`: a slot
    stops inside the block at its EOS or max_tokens; stop strings, cancellations and admissions
    wait for the block's end).  mesh / rules / bf16_min_batch: as `decode.Sampler`.  log: called with one line
    per compiled program (prefill bucket, generate step).
    """

    def __init__(self, cfg: PLDRConfig, params, *, slots: int = 8, max_len: int | None = None, mode: str = "kv_g",
                 shared_g: bool = False, g_lm=None, tokenizer=None, eos_id: int | None = 3, max_queue: int = 256,
                 steps_per_sync: int = 4, mesh=None, rules=None, bf16_min_batch: int | None = None,
                 log: Callable[[str], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        for name, v in (("slots", slots), ("steps_per_sync", steps_per_sync)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.steps_per_sync = steps_per_sync
        S = cfg.max_seq_len if max_len is None else int(max_len)
        if not 2 <= S <= cfg.max_seq_len:
            raise ValueError(f"max_len must be in [2, max_seq_len={cfg.max_seq_len}], got {max_len!r}")
        self.cfg, self.slots, self.max_len, self.mode = cfg, slots, S, mode
        self.tokenizer, self.eos_id, self.max_queue = tokenizer, eos_id, int(max_queue)
        self.log = log or (lambda line: None)
        self._raw_params = params
        self._g = normalize_g_lm(cfg, g_lm)                 # None or [L, 1|B, H, dk, dk]
        if self._g is not None and self._g.shape[1] != 1:
            raise ValueError("the engine takes one G_LM for every request: [num_layers, (1,) H, dk, dk]")
        self.sampler = Sampler(cfg, params, mesh=mesh, rules=rules, bf16_min_batch=bf16_min_batch)
        kv, g = MODES[mode]
        req = make_request(cfg, self.sampler.weights, [[1]] * slots, max_new_tokens=1, kv_cache=kv, g_cache=g,
                           temperature=1.0, top_k=1, top_p=1.0, seed=0, eos_id=None, g_lm=self._g,
                           shared_g=shared_g, stop_at_max_seq_len=False, max_len=S, return_logits=False,
                           return_deductive=False, backend=self.sampler.backend, sharded=self.sampler.sharded)
        self.loop_spec = dataclasses.replace(req.spec, step=dataclasses.replace(req.spec.step, shared_slot=False))
        self.spec = self.loop_spec.step
        self.params = req.params
        self.shared_g = bool(shared_g) or self._g is not None
        self._g_taken = False
        one = jax.eval_shape(lambda: prefill_cache(self.loop_spec, self.params, jnp.zeros((1, 16), jnp.int32),
                                                   jnp.ones((1,), jnp.int32), self._g, S,
                                                   stack_deductive=False)[0])
        self.cache = empty_slots(one, slots, self.shared_g)
        if mesh is not None:
            from ..decode.sharding import shard_cache
            self.cache = shard_cache(self.cache, mesh, self.sampler.rules)
        self.tokens = jnp.zeros((slots,), jnp.int32)
        # host copies of the per-slot values
        self._slot_req: list[Request | None] = [None] * slots
        self._count = np.zeros(slots, np.int32)
        self._key = np.zeros((slots, 2), np.uint32)
        self._temp = np.ones(slots, np.float32)
        self._top_k = np.ones(slots, np.int32)
        self._top_p = np.ones(slots, np.float32)
        self._limit = np.zeros(slots, np.int32)
        self._eos = np.full(slots, -1, np.int32)
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._stop_thread = False
        self._compiled: set = set()
        self.steps = 0
        self.generated = 0


    # ------------------------------------------------------------------ requests
    def validate(self, r: Request) -> Request:
        """Check a request; ValueError naming the problem (the HTTP layer answers 400)."""
        r.prompt = normalize_prompts(self.cfg, [list(r.prompt)] if len(r.prompt) else [[]])[0]
        n = len(r.prompt)
        if isinstance(r.max_tokens, bool) or not isinstance(r.max_tokens, (int, np.integer)) or r.max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {r.max_tokens!r}")
        if n + r.max_tokens > self.max_len:
            raise ValueError(f"the prompt ({n} tokens) + max_tokens ({r.max_tokens}) = {n + r.max_tokens} exceeds "
                             f"the server's context length {self.max_len}; lower max_tokens to <= "
                             f"{max(self.max_len - n, 0)} or shorten the prompt")
        r.temperature, r.top_k, r.top_p = validate_sampling(r.temperature, r.top_k, r.top_p)
        if r.seed is None:
            r.seed = int(np.random.default_rng().integers(0, 2 ** 31 - 1))
        elif isinstance(r.seed, bool) or not isinstance(r.seed, (int, np.integer)) or not -2 ** 63 <= r.seed < 2 ** 63:
            raise ValueError(f"seed must be a 64-bit int, got {r.seed!r}")
        if isinstance(r.stop, str):
            r.stop = (r.stop,)
        if not all(isinstance(s, str) for s in r.stop):
            raise ValueError("stop must be a string or a list of strings")
        if r.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")
        return r

    def submit(self, r: Request) -> Request:
        """Queue a request (validated here: ValueError); `QueueFull` past ``max_queue`` waiting,
        `EngineStopped` once draining."""
        self.validate(r)
        r.arrival = time.perf_counter()
        r._text = TextStream(self.tokenizer, r.stop)
        if r.on_output is None:
            r._queue = queue.Queue()
            r.on_output = r._queue.put
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the server is shutting down and accepts no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the queue's bound); retry later")
            self._waiting.append(r)
            self._lock.notify_all()
        return r

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def live_slots(self) -> int:
        return sum(r is not None for r in self._slot_req)

    @property
    def idle(self) -> bool:
        return not self._waiting and self.live_slots == 0

    # ------------------------------------------------------------------ compilation log
    def _note_compile(self, what, t0) -> None:
        if what not in self._compiled:
            self._compiled.add(what)
            self.log(f"compiled {what[0]}" + (f" bucket {what[1]}" if len(what) > 1 else "")
                     + f": first call {time.perf_counter() - t0:.2f} s (compilation included)")

    def buckets(self) -> tuple[list[int], list[int]]:
        """The admission prefill's (row buckets, prompt-length buckets): powers of two up to the
        slots, and from 16 up to the bucket of max_len - 1."""
        rows, b = [], 1
        while b < self.slots:
            rows.append(b)
            b *= 2
        lengths, b = [], bucket_length(1)
        while b < self.max_len - 1:
            lengths.append(b)
            b *= 2
        return rows + [self.slots], sorted(set(lengths + [min(bucket_length(self.max_len - 1), self.max_len)]))

    def warmup(self, rows=None, lengths=None) -> None:
        """Compile the admission prefill of every (rows, prompt length) bucket (`buckets`) and the
        generate step with and without log-probabilities, before any request (each logged once)."""
        all_rows, all_lengths = self.buckets()
        for n in rows or all_rows:
            for P in lengths or all_lengths:
                reqs = [self.submit(Request(prompt=[1] * min(P, self.max_len - 1), max_tokens=1, top_k=1, seed=0))
                        for _ in range(n)]
                while not all(r.finished for r in reqs):
                    self.step()
        for lp in (False, True):
            r = self.submit(Request(prompt=[1], max_tokens=2, top_k=1, seed=0, logprobs=lp))
            while not r.finished:
                self.step()

    # ------------------------------------------------------------------ the step
    def _slot_params(self, rows):
        return SlotParams(live=np.array([r is not None for r in rows]), count=self._count, key=self._key,
                          temperature=self._temp, top_k=self._top_k, top_p=self._top_p)

    def _emit(self, r: Request, out: Output) -> None:
        try:
            r.on_output(out)
        except Exception:       # a consumer that went away must not stop the engine
            r._cancel = True

    def _finish(self, r: Request, reason: str, out: Output | None = None) -> None:
        r.finish_reason = reason
        r.finish_time = time.perf_counter()
        out = out or Output(tokens=[])
        out.text += r._text.finish() if reason != "cancelled" else ""
        out.finished, out.finish_reason = True, reason
        self._emit(r, out)

    def _token(self, r: Request, tok: int, lp) -> Output:
        """Book-keep one new token of r; returns its Output (finished when r ends with it)."""
        if r.first_token_time is None:
            r.first_token_time = time.perf_counter()
        r.tokens.append(tok)
        self.generated += 1
        eos = self.eos_id is not None and tok == self.eos_id and not r.ignore_eos
        text = "" if eos else r._text.add(tok)
        out = Output(tokens=[tok], text=text, logprobs=[lp] if lp is not None else None)
        if eos or r._text.stopped:
            out.finished, out.finish_reason = True, "stop"
        elif len(r.tokens) >= r.max_tokens:
            out.finished, out.finish_reason = True, "length"
        return out

    @staticmethod
    def _lp(lps, b):
        """(log p, {top id: log p}) of row b of a `slots.token_logprobs` result."""
        lp, ids, top = lps
        return float(lp[b]), {int(i): float(v) for i, v in zip(ids[b], top[b])}

    def _admit(self, reqs: list, free: list) -> None:
        """Prefill reqs together (rows padded to a power of two, at most the slots; prompts to the
        longest one's bucket), sample their first tokens and put them into the free slots (those
        that do not end at once)."""
        firsts = {}
        for r in reqs:
            first = Output(tokens=[])
            if r.prompt_logprobs:
                lp, ids, top = prompt_logprobs(self.cfg, self._raw_params, r.prompt, self._g)
                first.prompt_logprobs = [None] + [(float(lp[i]), {int(a): float(b) for a, b in zip(ids[i], top[i])})
                                                  for i in range(len(lp))]
            if r.max_tokens == 0:
                self._finish(r, "length", first)
            else:
                firsts[r.id] = first
        reqs = [r for r in reqs if r.id in firsts]
        if not reqs:
            return
        n = len(reqs)
        B = min(bucket_length(n, 1), self.slots)
        P = min(bucket_length(max(len(r.prompt) for r in reqs)), self.max_len)
        tokens = np.zeros((B, P), np.int32)
        tokens[:, 0] = 1                                  # filler rows: one token, dropped at admission
        lengths = np.ones(B, np.int32)
        keys = np.zeros((B, 2), np.uint32)
        temp, top_k, top_p = np.ones(B, np.float32), np.ones(B, np.int32), np.ones(B, np.float32)
        slots = np.full(B, self.slots, np.int32)
        for i, r in enumerate(reqs):
            tokens[i, :len(r.prompt)] = r.prompt
            lengths[i] = len(r.prompt)
            keys[i] = np.asarray(jax.random.key_data(jax.random.key(r.seed)), np.uint32)
            temp[i], top_k[i], top_p[i], slots[i] = r.temperature, r.top_k, r.top_p, free[i]
        t0 = time.perf_counter()
        with prefill_scope(self.spec.prefill_attention, self.sampler.mesh, self.sampler.rules):
            new, logits0, _ = prefill_cache(self.loop_spec, self.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                            self._g, self.max_len, stack_deductive=False)
        p = SlotParams(live=np.ones(B, bool), count=np.zeros(B, np.int32), key=keys, temperature=temp,
                       top_k=top_k, top_p=top_p)
        take_g = self.shared_g and not self._g_taken
        want_lp = any(r.logprobs for r in reqs)
        self.cache, self.tokens, tok, lps = admit(self.cache, self.tokens, new, logits0, p, slots,
                                                  shared_g=self.shared_g, take_g=take_g, with_logprobs=want_lp)
        self._g_taken = self._g_taken or take_g
        tok, lps = jax.device_get((tok, lps))
        self._note_compile(("prefill", f"{B} x {P}"), t0)
        for i, r in enumerate(reqs):
            out = self._token(r, int(tok[i]), self._lp(lps, i) if r.logprobs else None)
            out.prompt_logprobs = firsts[r.id].prompt_logprobs
            if out.finished:
                self._finish(r, out.finish_reason, out)
                continue
            self._emit(r, out)
            b = free[i]
            self._slot_req[b] = r
            self._count[b] = 1
            self._key[b] = keys[i]
            self._temp[b], self._top_k[b], self._top_p[b] = r.temperature, r.top_k, r.top_p
            self._limit[b] = r.max_tokens
            self._eos[b] = -1 if self.eos_id is None or r.ignore_eos else self.eos_id

    def _free(self, slot: int) -> None:
        self._slot_req[slot] = None
        self._count[slot] = 0

    def step(self) -> int:
        """One engine iteration (admissions, one generate step, book-keeping); returns the number
        of live slots after it."""
        # cancellations of running requests
        for b, r in enumerate(self._slot_req):
            if r is not None and r._cancel:
                self._free(b)
                self._finish(r, "cancelled")
        # admissions: as many waiting requests as there are free slots, prefilled together
        free = [b for b, r in enumerate(self._slot_req) if r is None]
        batch = []
        with self._lock:
            while self._waiting and len(batch) < len(free):
                r = self._waiting.popleft()
                if r._cancel:
                    self._finish(r, "cancelled")
                else:
                    batch.append(r)
        if batch:
            self._admit(batch, free)
        rows = list(self._slot_req)
        if not any(r is not None for r in rows):
            return 0
        want_lp = any(r is not None and r.logprobs for r in rows)
        t0 = time.perf_counter()
        self.cache, self.tokens, new, live, lps = generate_step(
            self.spec, self.params, self.cache, self.tokens, self._slot_params(rows), self._limit, self._eos,
            with_logprobs=want_lp, steps=self.steps_per_sync)
        new, live, lps = jax.device_get((new, live, lps))
        self._note_compile(("generate step" + (" with logprobs" if want_lp else ""),), t0)
        self.steps += self.steps_per_sync
        for b, r in enumerate(rows):
            if r is None:
                continue
            self._count[b] += int(live[:, b].sum())
            out = Output(tokens=[], logprobs=[] if r.logprobs else None)
            for j in np.flatnonzero(live[:, b]):        # the slot's tokens of this block, in order
                o = self._token(r, int(new[j, b]), self._lp([x[j] for x in lps], b) if r.logprobs else None)
                out.tokens += o.tokens
                out.text += o.text
                if r.logprobs:
                    out.logprobs += o.logprobs
                if o.finished:          # EOS or the limit (the device stopped the slot too), a stop string
                    out.finished, out.finish_reason = True, o.finish_reason
                    break
            if out.finished:
                self._free(b)
                self._finish(r, out.finish_reason, out)
            elif out.tokens:
                self._emit(r, out)
        return self.live_slots

    def run_until_idle(self) -> None:
        """Step until no request is waiting or running (without the scheduler thread)."""
        while not self.idle:
            self.step()

    # ------------------------------------------------------------------ the scheduler thread
    def start(self) -> "Engine":
        """Run `step` in a background thread whenever there is work."""
        if self._thread is None:
            self._stop_thread = False
            self._thread = threading.Thread(target=self._run, name="pldr-serve-engine", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            with self._lock:
                while self.idle and not self._stop_thread:
                    self._lock.wait(timeout=0.5)
                if self._stop_thread and self.idle:
                    return
            self.step()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting requests, let the waiting and running ones finish (at most `timeout`
        seconds; then the rest are cancelled); True when everything finished in time."""
        with self._lock:
            self._accepting = False
            self._lock.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.idle:
            if deadline is not None and time.monotonic() > deadline:
                with self._lock:
                    for r in list(self._waiting) + [r for r in self._slot_req if r is not None]:
                        r.cancel()
                break
            if self._thread is None:
                self.step()
            else:
                time.sleep(0.01)
        return self.idle

    def stop(self, timeout: float | None = None) -> bool:
        """`drain`, then end the scheduler thread."""
        done = self.drain(timeout)
        with self._lock:
            self._stop_thread = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return done
