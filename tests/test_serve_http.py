"""`pldr-jax serve`'s HTTP app with real clients (the `openai` package, httpx, lm-evaluation-harness's
``local-completions``): completions equal `pldr-jax generate` / `Sampler` alone, streamed = not
streamed, 32 concurrent mixed-length requests, lm-eval scores equal `pldr-jax eval harness`'s, a 400
or 429 per bad input (the server keeps serving), a dropped stream frees its slot, the metrics and
tokenizer endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

for _k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # nothing downloads
    os.environ.setdefault(_k, "1")

from pldr_jax.decode import Sampler  # noqa: E402
from pldr_jax.serve import Engine  # noqa: E402
from pldr_jax.serve.app import create_app  # noqa: E402

TEXTS = ["The cat sat on the", "Water is", "The sun rises in the east and the moon", "A dog likes to",
         "In the beginning the model", "x"]


def make_model_folder(folder):
    """A Hugging Face pldrllm folder: a random one-layer model over a 128-piece sentencepiece
    tokenizer trained on the bundled corpus (config.json, model.safetensors, tokenizer.model)."""
    import jax

    import pldr_jax
    from pldr_jax.data import default_corpus_documents
    from pldr_jax.data.tokenizer import Tokenizer
    from pldr_jax.io.hf import save_hf
    from pldr_jax.params import init_params

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tok").mkdir()
    tok = Tokenizer.train(default_corpus_documents()[:60], folder / "tok", 128)
    cfg = pldr_jax.PLDRConfig(num_layers=1, d_model=32, num_heads=4, dff=48, vocab_size=tok.vocab_size,
                              max_seq_len=128, A_dff=8, num_reslayerA=1, num_denseA=1)
    save_hf(cfg, init_params(cfg, jax.random.key(0)), folder, tokenizer_model=folder / "tok" / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def model(model_dir):
    from pldr_jax.decode.cli import _load
    from pldr_jax.io.run_tokenizer import resolve_tokenizer

    class Args:
        checkpoint, config, step = str(model_dir), None, None
    cfg, params, _ = _load(Args)
    return cfg, params, resolve_tokenizer(str(model_dir), None)


@contextlib.contextmanager
def serving(app):
    """Run `app` with uvicorn in a thread on a free port of 127.0.0.1; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        th.join(timeout=60)


@pytest.fixture(scope="module")
def server(model):
    cfg, params, tok = model
    engine = Engine(cfg, params, slots=4, tokenizer=tok, eos_id=tok.eos_id)
    with serving(create_app(engine, model_name="tiny")) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model[0], model[1])


def test_greedy_equals_pldr_jax_generate_and_stream_equals_whole(model_dir, client, capsys):
    from pldr_jax.cli import main
    argv = ["generate", str(model_dir), "--greedy", "--max-new-tokens", "24", "--json"]
    for t in TEXTS[:3]:
        argv += ["--prompt", t]
    assert main(argv) == 0
    want = json.loads(capsys.readouterr().out)["results"]
    got = client.completions.create(model="tiny", prompt=TEXTS[:3], max_tokens=24, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [w["text"] for w in want]
    assert got.usage.completion_tokens == sum(w["num_tokens"] for w in want)
    assert got.usage.prompt_tokens == sum(len(w["prompt_ids"]) for w in want)
    for kw in (dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=5), dict(temperature=0, stop=["e"])):
        whole = client.completions.create(model="tiny", prompt=TEXTS[2], max_tokens=30, **kw)
        chunks = list(client.completions.create(model="tiny", prompt=TEXTS[2], max_tokens=30, stream=True, **kw))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert "e" not in client.completions.create(model="tiny", prompt=TEXTS[2], max_tokens=30, temperature=0,
                                                stop=["e"]).choices[0].text


def test_32_concurrent_mixed_requests_each_equal_alone(server, model, sampler):
    url, engine = server
    cfg, params, tok = model
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(32):
        ids = [int(t) for t in rng.integers(4, cfg.vocab_size, size=int(rng.integers(1, 30)))]
        kw = dict(temperature=0) if i % 2 else dict(temperature=0.8, top_p=0.95, seed=100 + i)
        jobs.append((ids, int(rng.integers(1, 17)), kw))

    async def run_all():
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*[ac.completions.create(model="tiny", prompt=ids, max_tokens=n, logprobs=0, **kw)
                                      for ids, n, kw in jobs])

    outs = asyncio.run(run_all())
    for (ids, n, kw), out in zip(jobs, outs):
        skw = dict(top_k=1) if kw.get("temperature") == 0 else dict(temperature=0.8, top_p=0.95, seed=kw["seed"])
        want = sampler([ids], max_new_tokens=n, eos_id=tok.eos_id, **skw).tokens[0]
        got = [tok.piece_to_id(t.replace(" ", "\u2581")) for t in out.choices[0].logprobs.tokens]
        assert got == want
        assert out.usage.completion_tokens == len(want)
    assert engine.live_slots == 0


def test_bad_inputs_get_400_or_429_and_the_server_keeps_serving(server, model):
    url, engine = server
    bad = [b"{not json", b"[1, 2]",
           {"prompt": "hi", "unknown_field": 1}, {"prompt": "hi " * 200}, {"prompt": [5] * 129},
           {"prompt": "hi", "max_tokens": -1}, {"prompt": "hi", "max_tokens": 10 ** 6},
           {"prompt": "hi", "temperature": -0.5}, {"prompt": "hi", "top_p": 0}, {"prompt": "hi", "top_p": 1.5},
           {"prompt": "hi", "top_k": -3}, {"prompt": "hi", "logprobs": 6}, {"prompt": "hi", "n": 0},
           {"prompt": []}, {"prompt": [[]]}, {"prompt": [0, 5]}, {"prompt": [5, 10 ** 6]}, {"prompt": 5},
           {"prompt": "hi", "stop": 3}, {"prompt": "hi", "presence_penalty": 1.0}, {}]
    for body in bad:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = httpx.post(url + "/v1/completions", **kw)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"], body
    ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    # a full queue: 429 with Retry-After (an engine that is not running, its queue filled)
    cfg, params, tok = model
    idle = Engine(cfg, params, slots=1, tokenizer=tok, eos_id=tok.eos_id, max_queue=1)
    with serving(create_app(idle, start_engine=False)) as url2:
        from pldr_jax.serve import Request
        idle.submit(Request(prompt=[5, 6], max_tokens=1))
        r = httpx.post(url2 + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        idle.run_until_idle()
        idle.start()
        assert httpx.post(url2 + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                          timeout=60).status_code == 200
        assert 'pldr_serve_errors_total{code="429"} 1.0' in httpx.get(url2 + "/metrics").text


def test_a_dropped_stream_frees_its_slot(server):
    url, engine = server
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 120, "stream": True,
                                                       "temperature": 0, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    deadline = time.time() + 30
    while engine.live_slots and time.time() < deadline:
        time.sleep(0.05)
    assert engine.live_slots == 0
    metrics = httpx.get(url + "/metrics").text
    assert 'pldr_serve_finished_total{reason="cancelled"}' in metrics


def test_models_health_metrics_and_tokenizer_endpoints(server, model):
    url, engine = server
    tok = model[2]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 128
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == "[END]" and info["bos_token"] == "[END]"
    text = "The cat[END]sat"
    ids = httpx.post(url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert ids == tok.encode("The cat") + [tok.eos_id] + tok.encode("sat")
    assert httpx.post(url + "/detokenize", json={"tokens": tok.encode("The cat")}).json()["prompt"] == "The cat"
    assert httpx.post(url + "/detokenize", json={"tokens": [10 ** 6]}).status_code == 400
    m = httpx.get(url + "/metrics").text
    for name in ("pldr_serve_requests_total", "pldr_serve_queue_depth", "pldr_serve_live_slots",
                 "pldr_serve_time_to_first_token_seconds_bucket", "pldr_serve_time_per_output_token_seconds_count",
                 "pldr_serve_tokens_per_second", "pldr_serve_generated_tokens_total"):
        assert name in m, name


def test_echo_logprobs_as_lm_eval_reads_them(client, model, sampler):
    from pldr_jax.eval.multiple_choice import loglikelihood_tokens
    cfg, params, tok = model
    ctx, cont = tok.encode("The cat sat on the"), tok.encode(" mat")
    r = client.completions.create(model="tiny", prompt=[ctx + cont], max_tokens=1, temperature=0, echo=True,
                                  logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ctx + cont) + 1
    (want, greedy), = loglikelihood_tokens(cfg, params, [(ctx, cont)], mode="full")
    assert sum(lp.token_logprobs[len(ctx):-1]) == pytest.approx(want, rel=1e-5)
    assert r.usage.prompt_tokens == len(ctx + cont) and r.usage.completion_tokens == 1
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))   # greedy: the top token
    z = client.completions.create(model="tiny", prompt=[ctx + cont], max_tokens=0, echo=True, logprobs=2)
    assert z.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]
    assert z.usage.completion_tokens == 0 and z.choices[0].text == tok.decode(ctx + cont)
    two = client.completions.create(model="tiny", prompt="Water is", max_tokens=8, temperature=1.0, seed=3, n=2)
    assert {c.index for c in two.choices} == {0, 1}
    want = [sampler([tok.encode("Water is")], max_new_tokens=8, seed=s, eos_id=tok.eos_id).tokens[0] for s in (3, 4)]
    assert [c.text for c in sorted(two.choices, key=lambda c: c.index)] == [tok.decode(w) for w in want]


def test_lm_eval_local_completions_equals_pldr_jax_eval_harness(server, model_dir, tmp_path, capsys):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from pldr_jax.cli import main
    from tests.test_lm_eval import _write_tasks
    url, _ = server
    tasks = tmp_path / "tasks"
    _write_tasks(tasks)
    out = tmp_path / "harness"
    assert main(["eval", "harness", str(model_dir), "--tasks", "local_mc,local_rolling", "--include_path", str(tasks),
                 "--output_path", str(out)]) == 0
    capsys.readouterr()
    want = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    got = lm_eval.simple_evaluate(
        model="local-completions", tasks=["local_mc", "local_rolling"], task_manager=TaskManager(include_path=str(tasks)),
        model_args=f"base_url={url}/v1/completions,tokenizer_backend=remote,max_length=128,batch_size=3,"
                   "num_concurrent=2")["results"]
    for m in ("acc,none", "acc_norm,none"):
        assert got["local_mc"][m] == want["local_mc"][m], m
    for m in ("bits_per_byte,none", "word_perplexity,none"):
        assert got["local_rolling"][m] == pytest.approx(want["local_rolling"][m], rel=1e-6), m


def test_incremental_text_equals_the_whole_decode(model_dir):
    """`detok.TextStream` decodes a few ids per token; its deltas join to the whole completion's
    decode (sentencepiece drops leading spaces of a decoded piece of text, and byte-fallback pieces
    make partial characters: random ids hit both), and a stop string cuts the text at its first
    occurrence."""
    import random

    from pldr_jax.data.tokenizer import Tokenizer
    from pldr_jax.serve.detok import TextStream
    tok = Tokenizer.load(model_dir / "tok" / "tokenizer.model")
    rnd = random.Random(0)
    space = [i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "\u2581"]
    for trial in range(60):
        ids = [rnd.choice(space) if space and rnd.random() < 0.2 else rnd.randrange(4, tok.vocab_size)
               for _ in range(rnd.randrange(1, 40))]
        full = tok.decode(ids)
        for stop in ((), ("e",), ("th", "  ")):
            ts = TextStream(tok, stop)
            text = "".join(ts.add(t) for t in ids) + ts.finish()
            cut = min((i for i in (full.find(s) for s in stop) if i >= 0), default=-1)
            assert text == (full[:cut] if cut >= 0 else full), (ids, stop)
