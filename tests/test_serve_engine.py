"""The serving engine without HTTP: continuous batching gives every request the tokens `Sampler` gives
its prompt alone (greedy and sampled with the same seed; requests arriving at different steps, more
requests than slots), in the KV+G and KV-only modes, with a shared G as `Sampler`'s shared_g;
cancellation, max_tokens 0, prompt log-probabilities as `pldr-jax eval harness` scores them,
stop strings and streamed text."""

from __future__ import annotations

import pytest

from pldr_jax.decode import Sampler
from pldr_jax.serve import Engine, QueueFull, Request
from pldr_jax.serve.detok import TextStream

PROMPTS = [[70, 48, 9, 8, 68, 61, 1], [5, 17, 99], [12, 40, 33, 7, 7, 81, 2, 64, 90, 11, 45, 23], [9, 9, 4],
           [44, 2, 17, 60, 5, 5, 31, 72, 8, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [33]]
SAMPLING = [dict(top_k=1), dict(temperature=0.8, top_p=0.9, seed=7), dict(temperature=1.3, seed=3),
            dict(top_k=5, seed=11)]


@pytest.fixture(scope="module")
def sampler(tiny_v510):
    cfg, params = tiny_v510
    return Sampler(cfg, params)


def _staggered(engine, prompts, kws, max_tokens):
    """Submit request i after i engine steps (so requests join a running batch), run to the end."""
    reqs = []
    for i, (p, kw) in enumerate(zip(prompts, kws)):
        reqs.append(engine.submit(Request(prompt=p, max_tokens=max_tokens[i], **kw)))
        engine.step()
    engine.run_until_idle()
    return reqs


@pytest.mark.parametrize("mode,steps", [("kv_g", 16), ("kv", 1)])
def test_requests_equal_sampler_alone(tiny_v510, sampler, mode, steps):
    cfg, params = tiny_v510
    kv, g = {"kv_g": (True, True), "kv": (True, False)}[mode]
    engine = Engine(cfg, params, slots=3, mode=mode, eos_id=None, max_len=48, steps_per_sync=steps)
    kws = [dict(SAMPLING[i % len(SAMPLING)]) for i in range(len(PROMPTS))]
    max_tokens = [14 - i for i in range(len(PROMPTS))]
    reqs = _staggered(engine, PROMPTS, kws, max_tokens)
    for p, kw, n, r in zip(PROMPTS, kws, max_tokens, reqs):
        want = sampler([p], max_new_tokens=n, kv_cache=kv, g_cache=g, eos_id=None, **{"seed": 0, **kw}).tokens[0]
        assert r.tokens == want, (p, kw)
        assert r.finish_reason == "length"
    assert engine.live_slots == 0 and engine.queue_depth == 0


def test_eos_frees_the_slot_and_sampled_rows_differ_by_seed(tiny_v510, sampler):
    cfg, params = tiny_v510
    engine = Engine(cfg, params, slots=2, eos_id=None, max_len=48)
    a = engine.submit(Request(prompt=PROMPTS[0], max_tokens=12, temperature=1.5, seed=1))
    b = engine.submit(Request(prompt=PROMPTS[0], max_tokens=12, temperature=1.5, seed=2))
    engine.run_until_idle()
    assert a.tokens != b.tokens
    # an EOS id that greedy decoding produces ends the request there, with the EOS as its last token
    greedy = sampler([PROMPTS[1]], max_new_tokens=10, top_k=1, eos_id=None).tokens[0]
    eos = next(t for i, t in enumerate(greedy) if i >= 3 and t not in greedy[:i])
    engine = Engine(cfg, params, slots=1, eos_id=eos, max_len=48, steps_per_sync=1)
    r = engine.submit(Request(prompt=PROMPTS[1], max_tokens=10, top_k=1))
    other = engine.submit(Request(prompt=PROMPTS[2], max_tokens=3, top_k=1))
    engine.step()
    assert engine.live_slots == 1 and engine.queue_depth == 1
    engine.run_until_idle()
    assert r.tokens == greedy[:greedy.index(eos) + 1] and r.finish_reason == "stop"
    assert other.tokens == sampler([PROMPTS[2]], max_new_tokens=3, top_k=1, eos_id=eos).tokens[0]
    # an EOS first token (sampled at admission, handed out while the block after it runs) ends the
    # request and frees its slot, while the request beside it decodes on
    engine = Engine(cfg, params, slots=2, eos_id=greedy[0], max_len=48, steps_per_sync=8)
    first = engine.submit(Request(prompt=PROMPTS[1], max_tokens=10, top_k=1))
    beside = engine.submit(Request(prompt=PROMPTS[2], max_tokens=10, top_k=1, ignore_eos=True))
    engine.step()
    assert first.tokens == [greedy[0]] and first.finish_reason == "stop" and engine.live_slots == 1
    engine.run_until_idle()
    assert beside.tokens == sampler([PROMPTS[2]], max_new_tokens=10, top_k=1, eos_id=None).tokens[0]


def test_shared_g_equals_sampler_shared_g(tiny_v510, sampler):
    cfg, params = tiny_v510
    engine = Engine(cfg, params, slots=2, eos_id=None, max_len=48, shared_g=True)
    reqs = _staggered(engine, PROMPTS[:3], [dict(top_k=1)] * 3, [10, 10, 10])
    for r, p in zip(reqs[1:], PROMPTS[1:3]):
        want = sampler([PROMPTS[0], p], max_new_tokens=10, top_k=1, eos_id=None, shared_g=True).tokens[1]
        assert r.tokens == want
    own = sampler([PROMPTS[1]], max_new_tokens=10, top_k=1, eos_id=None).tokens[0]
    assert reqs[1].tokens != own        # the shared G changes the tokens: the test can fail


def test_cancel_max_tokens_zero_and_queue_bound(tiny_v510):
    cfg, params = tiny_v510
    engine = Engine(cfg, params, slots=1, eos_id=None, max_len=48, max_queue=1, steps_per_sync=4)
    r = engine.submit(Request(prompt=PROMPTS[0], max_tokens=30, top_k=1))
    engine.step()
    assert engine.live_slots == 1
    waiting = engine.submit(Request(prompt=PROMPTS[1], max_tokens=5, top_k=1))
    with pytest.raises(QueueFull):
        engine.submit(Request(prompt=PROMPTS[2], max_tokens=5, top_k=1))
    r.cancel()
    engine.step()                      # the cancelled request leaves, the waiting one takes its slot
    assert r.finish_reason == "cancelled" and len(r.tokens) < 30
    engine.run_until_idle()
    assert waiting.finish_reason == "length" and len(waiting.tokens) == 5
    z = engine.submit(Request(prompt=PROMPTS[2], max_tokens=0, prompt_logprobs=True))
    engine.run_until_idle()
    assert z.tokens == [] and z.finish_reason == "length"
    outs = list(z.outputs(timeout=1))
    assert outs[-1].finished and len(outs[0].prompt_logprobs) == len(PROMPTS[2])
    for bad in (dict(max_tokens=-1), dict(max_tokens=48), dict(temperature=0.0), dict(top_p=1.5),
                dict(top_k=-2), dict(prompt=[]), dict(prompt=[0, 5]), dict(prompt=[10 ** 6])):
        with pytest.raises(ValueError):
            engine.submit(Request(**{"prompt": PROMPTS[0], **bad}))


def test_prompt_logprobs_equal_the_harness_full_mode(tiny_v510):
    from pldr_jax.eval.multiple_choice import loglikelihood_tokens
    cfg, params = tiny_v510
    engine = Engine(cfg, params, slots=1, eos_id=None, max_len=48)
    prompt = PROMPTS[4]
    r = engine.submit(Request(prompt=prompt, max_tokens=0, prompt_logprobs=True))
    engine.run_until_idle()
    lps = next(iter(r.outputs(timeout=1))).prompt_logprobs
    assert lps[0] is None
    for split in (1, 5, len(prompt) - 1):
        (want, greedy), = loglikelihood_tokens(cfg, params, [(prompt[:split], prompt[split:])], mode="full")
        got = sum(lp for lp, _ in lps[split:])
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert greedy == all(lp >= max(top.values()) for lp, top in lps[split:])


class _CharTok:
    """Token id -> one character (ids >= 97 are letters, 3 = EOS); enough for text streaming."""
    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != 3)


def test_text_stream_deltas_join_to_the_text_and_stop_strings_cut():
    ts = TextStream(_CharTok(), stop=("cde", "zz"))
    deltas = [ts.add(ord(c)) for c in "abcdef"]
    assert "".join(deltas) == "ab" and ts.stopped and ts.text == "ab"
    assert ts.finish() == ""
    ts = TextStream(_CharTok(), stop=("xy",))
    deltas = [ts.add(ord(c)) for c in "abxaxb"] + [ts.finish()]
    assert "".join(deltas) == "abxaxb" and not ts.stopped
    assert deltas[1:3] == ["a", "b"]      # one character (a stop string's length - 1) held back
