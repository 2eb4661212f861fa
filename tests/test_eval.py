"""Evaluation: log-likelihood scoring vs direct forward passes, multiple choice, perplexity windows,
the lm-eval adapter (checked against the direct scorer) and the eval CLI."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import PLDRConfig, forward
import pldr_jax.eval.perplexity as ppl
from pldr_jax.eval import harness
from pldr_jax.eval import multiple_choice as mc

from .conftest import ref_path
from .helpers import fast_params

CFG = PLDRConfig.preset("tiny", vocab_size=32000)          # the paper tokenizer's vocabulary
CFG_G = PLDRConfig.preset("tiny-g", vocab_size=32000)      # identity G (an SDPA model)


@pytest.fixture(scope="module")
def model():
    return CFG, fast_params(CFG)


@pytest.fixture(scope="module")
def model_g():
    return CFG_G, fast_params(CFG_G, seed=1)


@pytest.fixture(scope="module")
def tok():
    from pldr_jax.data import Tokenizer
    return Tokenizer.load(ref_path("refinedweb-tokenizer-model-pldrllm-kvg-cache-paper.model"))


class Instance:  # the shape of lm_eval.api.instance.Instance that the adapter reads
    def __init__(self, *args):
        self.args = args


def _logp(logits, pos, tgt):
    return float(jax.nn.log_softmax(logits[0, pos])[tgt])


def _fwd(cfg, p, ids, g=None):
    """A direct forward pass on one sequence, right-padded to 8 with pad-aware A (= the sequence alone;
    one shape for every direct check keeps compilations few)."""
    x = np.zeros((1, 8), np.int32)
    x[0, :len(ids)] = ids
    return forward(cfg, p, jnp.asarray(x), g, pad_aware_A=True)


# --------------------------------------------------------------------------- core scoring
def test_rolling_windows_lm_eval_example():
    # lm-eval's docstring: 10 tokens, context 4 -> [BOS 0 1 2], [3 4 5 6], [5 6 7 8] scoring the last 2
    assert ppl.rolling_windows(10, 4) == [(0, 4, 4), (4, 8, 4), (6, 10, 2)]
    for n, w, s in [(1, 4, None), (23, 8, 3), (16, 8, 8), (5, 8, 2)]:
        wins = ppl.rolling_windows(n, w, s)
        scored = [i for a, e, k in wins for i in range(e - k + 1, e + 1)]          # target indices in S
        assert scored == list(range(1, n + 1)) and all(e - a <= w for a, e, _ in wins)
    with pytest.raises(ValueError):
        ppl.rolling_windows(5, 4, 5)


def test_loglikelihood_matches_direct_forward_in_every_mode(model):
    cfg, p = model
    ctx, cont = [5, 6, 7, 8], [9, 10]
    full = ctx + cont[:-1]
    lg = _fwd(cfg, p, full).logits
    want_full = _logp(lg, 3, 9) + _logp(lg, 4, 10)
    g_ctx = _fwd(cfg, p, ctx).deductive["G_LM"]
    lg_c = _fwd(cfg, p, full, g_ctx).logits
    want_cached = _logp(lg_c, 3, 9) + _logp(lg_c, 4, 10)
    want_causal = _logp(_fwd(cfg, p, ctx).logits, 3, 9) + _logp(lg, 4, 10)
    for mode, want in [("full", want_full), ("cached", want_cached), ("causal", want_causal)]:
        (ll, greedy), = mc.loglikelihood_tokens(cfg, p, [(ctx, cont)], mode=mode)
        assert ll == pytest.approx(want, abs=2e-4), mode
    assert want_full != pytest.approx(want_cached, abs=1e-3)        # A sees the continuation in "full"
    # batching and padding do not change a request's score
    reqs = [(ctx, cont), ([11, 12], [13]), ([], [5, 6, 7]), ([20] * 6, [21])]
    together = mc.loglikelihood_tokens(cfg, p, reqs, batch_size=8)
    alone = [mc.loglikelihood_tokens(cfg, p, [r])[0] for r in reqs]
    np.testing.assert_allclose([t[0] for t in together], [a[0] for a in alone], atol=1e-4)
    # empty context = the EOS prefix
    assert together[2][0] == pytest.approx(mc.loglikelihood_tokens(cfg, p, [([3], [5, 6, 7])])[0][0], abs=1e-6)
    with pytest.raises(ValueError, match="pad"):
        mc.loglikelihood_tokens(cfg, p, [([0, 5], [6])])
    with pytest.raises(ValueError, match="mode"):
        mc.loglikelihood_tokens(cfg, p, [(ctx, cont)], mode="bogus")


def test_multiple_choice_item_with_a_provably_most_likely_answer(model, model_g, tmp_path):
    """With G fixed while the continuation is scored (a predefined-G model in any mode, or a learned
    model in "cached" mode), attention is causal, so a one-token choice's log-likelihood is the
    log-softmax of the context's last-position logits: the argmax choice is provably the most likely."""
    ctx, choices = [5, 6, 7, 8, 9], [[11], [12], [13], [14]]
    for (cfg, p), mode in [(model_g, "full"), (model, "cached")]:
        lg = np.asarray(_fwd(cfg, p, ctx).logits[0, len(ctx) - 1])
        best = int(np.argmax([lg[c[0]] for c in choices]))
        worst = int(np.argmin([lg[c[0]] for c in choices]))
        items = [{"context": ctx, "choices": choices, "label": best},
                 {"context": ctx, "choices": choices, "label": worst}]
        path = tmp_path / f"mc_{mode}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in items))
        res = mc.score_multiple_choice(cfg, p, path, mode=mode)
        assert res.pred == [best, best] and res.acc == 0.5 and res.acc_norm == 0.5 and res.n == 2
        want = jax.nn.log_softmax(jnp.asarray(lg))
        np.testing.assert_allclose(res.loglikelihoods[0], [float(want[c[0]]) for c in choices], atol=1e-4)
        assert res.is_greedy[0][best] == (int(np.argmax(lg)) == choices[best][0])
    # fixed G: the three modes coincide
    cfg, p = model_g
    a = mc.score_multiple_choice(cfg, p, items, mode="full").loglikelihoods
    for mode in ("cached", "causal"):
        np.testing.assert_allclose(mc.score_multiple_choice(cfg, p, items, mode=mode).loglikelihoods, a, atol=1e-5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": [5], "choices": [[6], [7]], "label": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: label"):
        mc.load_jsonl(bad)


# --------------------------------------------------------------------------- text, adapter, perplexity
ITEMS = [  # short, so every request fits one length bucket (8)
    {"context": "The cat sat on the", "choices": ["mat", "moon", "stock market"], "label": 0},
    {"context": "Water is", "choices": ["wet", "dry"], "label": 0},
]


def test_harness_adapter_equals_direct_scorer(model, tok):
    cfg, p = model
    res = mc.score_multiple_choice(cfg, p, ITEMS, tokenizer=tok)
    lm = harness.PLDRLM(cfg, p, tok, batch_size=4)
    reqs = [Instance(d["context"], " " + c) for d in ITEMS for c in d["choices"]]
    got = lm.loglikelihood(reqs)
    flat = [ll for lls in res.loglikelihoods for ll in lls]
    # different batch compositions / paddings: equal up to float32 summation order
    np.testing.assert_allclose([g[0] for g in got], flat, rtol=2e-5, atol=1e-4)
    assert [g[1] for g in got] == [g for gs in res.is_greedy for g in gs]
    # acc_norm divides by the choice's length in characters (lm-eval)
    assert res.lengths[0] == [3.0, 4.0, 12.0]
    assert res.pred_norm[0] == int(np.argmax(np.array(res.loglikelihoods[0]) / [3, 4, 12]))
    # the adapter's numbers against a direct forward on the encoded pair (plain tuples work too)
    ctx_ids, cont_ids = mc.encode_pair(mc.make_encoder(tok), "The cat sat on the", " mat")
    assert ctx_ids + cont_ids == tok.encode("The cat sat on the mat")
    seq = ctx_ids + cont_ids
    assert len(seq) <= 9
    lg = _fwd(cfg, p, seq[:-1]).logits
    want = sum(_logp(lg, i - 1, seq[i]) for i in range(len(ctx_ids), len(seq)))
    assert lm.loglikelihood([("The cat sat on the", " mat")])[0][0] == pytest.approx(want, abs=2e-4)


def test_rolling_loglikelihood_and_perplexity(model, tok, tmp_path):
    cfg, p = model
    text = "Power law graph attention."
    ids = tok.encode(text)
    assert len(ids) <= 8
    lm = harness.PLDRLM(cfg, p, tok)
    (ll,) = lm.loglikelihood_rolling([Instance(text)])
    seq = [3] + ids
    lg = _fwd(cfg, p, seq[:-1]).logits
    assert ll == pytest.approx(sum(_logp(lg, i - 1, seq[i]) for i in range(1, len(seq))), abs=5e-4)
    # windows: a 20-token document in windows of 8 = the sum over windows of direct (padded) passes
    doc = list(range(40, 60))
    sums, counts = ppl.doc_loglikelihoods(cfg, p, [doc], window=8)
    S, want = [3] + doc, 0.0
    for a, e, n in ppl.rolling_windows(len(doc), 8):
        lw = _fwd(cfg, p, S[a:e]).logits
        want += sum(_logp(lw, j, S[a + j + 1]) for j in range(e - a - n, e - a))
    assert counts[0] == 20 and sums[0] == pytest.approx(want, abs=1e-3)
    # perplexity of a text file: each paragraph a document; EOS appended only when asked (the harness adds none)
    f = tmp_path / "docs.txt"
    f.write_text(text + "\n\nA short one.\n")
    r = ppl.perplexity_of_file(cfg, p, f, tok, add_eos=True)
    assert r.documents == 2 and r.tokens == len(ids) + 1 + len(tok.encode("A short one.")) + 1
    assert ppl.perplexity_of_file(cfg, p, f, tok).tokens == r.tokens - 2
    assert r.perplexity == pytest.approx(math.exp(r.nll / r.tokens)) and r.bits_per_byte > 0
    j = tmp_path / "docs.jsonl"
    j.write_text(json.dumps({"input_ids": doc}) + "\n")
    assert ppl.perplexity_of_file(cfg, p, j, window=8).nll == pytest.approx(-sums[0], abs=1e-6)


def test_generate_until(model, tok):
    cfg, p = model
    lm = harness.PLDRLM(cfg, p, tok, max_gen_toks=6)
    (text,) = lm.generate_until([Instance("The cat sat on the", {"until": ["\n\n"], "max_gen_toks": 6})])
    from pldr_jax.decode import generate
    out = generate(cfg, p, [tok.encode("The cat sat on the")], max_new_tokens=6, top_k=1, eos_id=3)
    new = [t for t in out.tokens[0] if t != 3]
    assert text == tok.decode(new)
    if len(text) > 2:  # an `until` string cuts the continuation before it
        stop = text[len(text) // 2:]
        (cut,) = lm.generate_until([("The cat sat on the", {"until": stop, "max_gen_toks": 6})])
        assert cut == text[: text.index(stop)]


def test_adapter_construction_and_cli(model, tok, tmp_path, monkeypatch, capsys):
    import pldr_jax.g_sources as gs
    from pldr_jax.cli import build_parser

    cfg, p = model
    monkeypatch.setattr(gs, "load_model_spec", lambda spec, config=None, step=None: (cfg, p, None))
    tok_path = str(ref_path("refinedweb-tokenizer-model-pldrllm-kvg-cache-paper.model"))
    lm = harness.PLDRLM.create_from_arg_string(f"pretrained=ckpt,tokenizer={tok_path},batch_size=4,mode=cached",
                                               {"device": "cpu", "batch_size": None})
    assert lm.batch_size == 4 and lm.mode == "cached" and lm.max_length == cfg.max_seq_len
    assert lm.eot_token_id == 3 and lm.rank == 0 and lm.world_size == 1
    with pytest.raises(ValueError, match="mode"):
        harness.PLDRLM(cfg, p, mode="x")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in ITEMS))
    out = tmp_path / "res.json"
    args = build_parser().parse_args(["eval", "mc", "ckpt", "--data", str(data), "--tokenizer", tok_path,
                                      "--output", str(out)])
    assert args.func(args) == 0
    got = json.loads(out.read_text())
    want = mc.score_multiple_choice(cfg, p, ITEMS, tokenizer=tok)
    assert got["acc"] == want.acc and got["acc_norm"] == want.acc_norm and got["n"] == 2
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"input_ids": list(range(40, 47))}) + "\n")
    capsys.readouterr()
    args = build_parser().parse_args(["eval", "perplexity", "ckpt", "--data", str(docs), "--mode", "causal"])
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "perplexity" and res["tokens"] == 7 and res["documents"] == 1
    want = ppl.perplexity_of_tokens(cfg, p, [list(range(40, 47))], mode="causal")
    assert res["perplexity"] == pytest.approx(want.perplexity)
