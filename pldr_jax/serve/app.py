"""The HTTP server: an OpenAI-compatible FastAPI app over an `Engine`.

Endpoints: ``POST /v1/completions`` (`protocol`; server-sent events with ``stream``),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text: `metrics`), and vLLM's
tokenizer endpoints ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize`` (what
lm-evaluation-harness's API models call with ``tokenizer_backend=remote``).

Bad input (malformed JSON, unknown fields, prompts that do not fit the context, bad ``max_tokens``
or sampling values) is answered 400 with an OpenAI-style error body; a full engine queue 429 with a
``Retry-After`` header; requests after shutdown began 503.  A client that disconnects (mid-stream or
while waiting) cancels its engine requests, which frees their slots.  The engine runs in its own
thread (`Engine.start`, on the app's startup); the app's shutdown drains it (`Engine.stop`, bounded
by ``drain_timeout``).

**Tokenizer.**  The model is prompted without BOS (`decode.text`); documents follow an EOS, so
``/tokenizer_info`` names the EOS piece as ``bos_token`` too (GPT-2's convention), and lm-eval's
prefix token (an empty context, rolling windows) is the EOS, as ``pldr-jax eval harness``'s.
``/tokenize`` maps the special pieces ([END], [START], ...) written in the text to their ids (as a
Hugging Face tokenizer does) and encodes the text between them with sentencepiece.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import uuid

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .engine import Engine, EngineStopped, Output, QueueFull, Request
from .metrics import ServeMetrics
from .protocol import (CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body, logprobs_body)

__all__ = ["create_app"]


def _error(message: str, status: int = 400, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code=status), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        if not loc and e.get("type") in ("model_attributes_type", "dict_type"):
            return "the request body must be a JSON object"
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        else:
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request"


class _Specials:
    """Text <-> ids with the tokenizer's special pieces written as text."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        ids = {tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id, tokenizer.unk_id}
        self.pieces = {tokenizer.id_to_piece(i): i for i in ids if i is not None and i >= 0}
        self.pattern = re.compile("(" + "|".join(re.escape(p) for p in sorted(self.pieces, key=len, reverse=True))
                                  + ")") if self.pieces else None

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for part in (self.pattern.split(text) if self.pattern else [text]):
            if part in self.pieces:
                out.append(self.pieces[part])
            elif part:
                out += list(self.tok.encode(part, add_eos=False))
        return out


class _Handover:
    """Outputs from the engine thread to the event loop's queues: one loop wake-up for all the
    outputs that arrive before it runs (an engine step hands over one per live request)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list = []

    def put(self, loop, q, out) -> None:
        with self._lock:
            self._pending.append((q, out))
            first = len(self._pending) == 1
        if first:
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for q, out in items:
            q.put_nowait(out)


def create_app(engine: Engine, *, model_name: str = "pldr-llm", drain_timeout: float = 30.0,
               start_engine: bool = True) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name` (see the module docstring)."""
    tok = engine.tokenizer
    specials = _Specials(tok) if tok is not None else None
    metrics = ServeMetrics(engine)
    handover = _Handover()
    state = {"accepting": True}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        yield
        state["accepting"] = False
        await asyncio.to_thread(engine.stop, drain_timeout)

    app = FastAPI(title="pldr_jax", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, exc):
        metrics.errors.labels(code="400").inc()
        return _error(_validation_message(exc))

    # ------------------------------------------------------------------ info
    @app.get("/health")
    async def health():
        if not state["accepting"]:
            return _error("shutting down", 503, "service_unavailable")
        return {"status": "ok", "live_slots": engine.live_slots, "queue_depth": engine.queue_depth}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "pldr_jax", "max_model_len": engine.max_len}]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # ------------------------------------------------------------------ tokenizer
    def _need_tokenizer():
        if tok is None:
            return _error("this server has no tokenizer: send token ids", 400)
        return None

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        if (err := _need_tokenizer()) is not None:
            return err
        eos = tok.id_to_piece(tok.eos_id)
        return {"tokenizer_class": "SentencePieceTokenizer", "eos_token": eos, "bos_token": eos,
                "pad_token": tok.id_to_piece(tok.pad_id), "unk_token": tok.id_to_piece(tok.unk_id),
                "add_bos_token": False, "add_eos_token": False, "vocab_size": tok.vocab_size,
                "model_max_length": engine.max_len, "chat_template": None}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (err := _need_tokenizer()) is not None:
            return err
        ids = specials.encode(body.prompt)
        out = {"count": len(ids), "max_model_len": engine.max_len, "tokens": ids, "token_strs": None}
        if body.return_token_strs:
            out["token_strs"] = [tok.id_to_piece(i) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if (err := _need_tokenizer()) is not None:
            return err
        bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            return _error(f"token ids outside [0, {tok.vocab_size}): {bad[:5]}")
        return {"prompt": tok.decode(body.tokens)}

    # ------------------------------------------------------------------ completions
    def _prompts(body: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        p = body.prompt
        if isinstance(p, str):
            p = [p]
        if not p:
            raise ValueError("prompt is empty: give a string, token ids or a list of either")
        if all(isinstance(t, int) for t in p):
            p = [p]
        out = []
        for item in p:
            if isinstance(item, str):
                if tok is None:
                    raise ValueError("text prompts need a tokenizer; this server has none: send token ids")
                ids = specials.encode(item)
                out.append((item, ids if ids else [tok.eos_id]))
            else:
                if not item:
                    raise ValueError("a prompt of token ids is empty")
                out.append((None, list(item)))
        return out

    def _engine_requests(body: CompletionRequest, prompts) -> list[Request]:
        temperature = 1.0 if body.temperature is None else body.temperature
        top_k = body.top_k or 0
        top_k = 0 if top_k == -1 else top_k
        if temperature == 0.0:
            temperature, top_k = 1.0, 1
        if body.best_of not in (None, body.n):
            raise ValueError("best_of must equal n (or be left out)")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        reqs = []
        for _, ids in prompts:
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                r = Request(prompt=ids, max_tokens=16 if body.max_tokens is None else body.max_tokens,
                            temperature=temperature, top_k=top_k, top_p=1.0 if body.top_p is None else body.top_p,
                            seed=seed, stop=tuple(stop), logprobs=body.logprobs is not None,
                            prompt_logprobs=body.echo and body.logprobs is not None, ignore_eos=body.ignore_eos)
                engine.validate(r)
                reqs.append(r)
        return reqs

    def _submit(reqs: list[Request], loop, queues) -> None:
        def sink(r, q):
            def on_output(out):
                metrics.observe(r, out)
                handover.put(loop, q, out)
            return on_output

        for r, q in zip(reqs, queues):
            r.on_output = sink(r, q)
        done = []
        try:
            for r in reqs:
                engine.submit(r)
                done.append(r)
        except BaseException:
            for r in done:
                r.cancel()
            raise

    def _echo_text(text, ids):
        if text is not None:
            return text
        return tok.decode(ids) if tok is not None else ""

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        metrics.requests.inc()
        if not state["accepting"]:
            return _error("the server is shutting down", 503, "service_unavailable")
        try:
            prompts = _prompts(body)
            reqs = _engine_requests(body, prompts)
        except ValueError as e:
            metrics.errors.labels(code="400").inc()
            return _error(str(e))
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in reqs]
        try:
            _submit(reqs, loop, queues)
        except QueueFull as e:
            metrics.errors.labels(code="429").inc()
            return _error(str(e), 429, "rate_limit_error", headers={"Retry-After": "1"})
        except EngineStopped as e:
            return _error(str(e), 503, "service_unavailable")
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        n_prompt = sum(len(ids) for _, ids in prompts)
        k = body.logprobs
        head = lambda i: prompts[i // body.n]

        def usage():
            gen = sum(len(r.tokens) for r in reqs)
            return {"prompt_tokens": n_prompt, "completion_tokens": gen, "total_tokens": n_prompt + gen}

        if body.stream:
            return StreamingResponse(_stream(body, reqs, queues, rid, created, head, k, usage),
                                     media_type="text/event-stream")
        try:
            choices = []
            for i, (r, q) in enumerate(zip(reqs, queues)):
                outs = []
                while True:
                    out: Output = await q.get()
                    outs.append(out)
                    if out.finished:
                        break
                choices.append(_choice(i, r, outs, head(i), body.echo, k))
        finally:
            for r in reqs:
                r.cancel()              # a no-op for finished requests; frees the slots of a dropped client
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage()}

    def _choice(i, r, outs, prompt, echo, k):
        text_in, ids = prompt
        text = "".join(o.text for o in outs)
        lp = None
        if k is not None:
            entries = [e for o in outs if o.logprobs for e in o.logprobs]
            toks = list(r.tokens)
            if echo:
                first = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
                lp = logprobs_body(tok, ids + toks, (first or [None] * len(ids)) + entries, k)
            else:
                lp = logprobs_body(tok, toks, entries, k)
        if echo:
            text = _echo_text(text_in, ids) + text
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": _reason(outs[-1].finish_reason)}

    async def _stream(body, reqs, queues, rid, created, head, k, usage):
        def chunk(choices, **extra):
            return "data: " + json.dumps({"id": rid, "object": "text_completion", "created": created,
                                          "model": model_name, "choices": choices, **extra}) + "\n\n"
        try:
            pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
            first = [True] * len(reqs)
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    out: Output = fut.result()
                    text, toks = out.text, list(out.tokens)
                    lp = None
                    if first[i] and body.echo:
                        text_in, ids = head(i)
                        text = _echo_text(text_in, ids) + text
                        if k is not None:
                            lp = logprobs_body(tok, ids + toks, (out.prompt_logprobs or [None] * len(ids))
                                               + (out.logprobs or []), k)
                    elif k is not None:
                        lp = logprobs_body(tok, toks, out.logprobs or [], k)
                    first[i] = False
                    yield chunk([{"index": i, "text": text, "logprobs": lp,
                                  "finish_reason": _reason(out.finish_reason) if out.finished else None}])
                    if not out.finished:
                        pending[asyncio.ensure_future(queues[i].get())] = i
            yield chunk([], usage=usage())
            yield "data: [DONE]\n\n"
        finally:
            for fut in list(locals().get("pending", {})):
                fut.cancel()
            for r in reqs:
                r.cancel()

    return app


def _reason(reason: str | None) -> str | None:
    return "length" if reason == "cancelled" else reason
