"""Sampling and output-processing unit tests (no model)."""

import pytest
import torch

from actors.engine_output import FINISH_LENGTH, FINISH_STOP, OutputProcessor
from actors.sampling import SamplingError, SamplingParams, SeqSampler, derive_seed
from model_shards.tokenizer import ByteTokenizer

V = 64


def logits(seed=0):
    return torch.randn(V, generator=torch.Generator().manual_seed(seed))


def draws(params, num=50, seed_logits=0):
    s = SeqSampler(params, V)
    return [s.sample(logits(seed_logits + i))[0] for i in range(num)]


def test_greedy_takes_lowest_id_on_ties():
    x = torch.zeros(V)
    x[5] = x[9] = 3.0
    assert SeqSampler(SamplingParams(temperature=0.0), V).sample(x)[0] == 5


def test_seed_reproducible_and_distinct():
    p = SamplingParams(temperature=1.0, seed=1234)
    assert draws(p) == draws(p)
    assert draws(p) != draws(SamplingParams(temperature=1.0, seed=1235))
    # the stream depends only on the sequence's own logits: interleaving another sampler is harmless
    a, b = SeqSampler(p, V), SeqSampler(SamplingParams(temperature=1.0, seed=9), V)
    mixed = []
    for i in range(50):
        mixed.append(a.sample(logits(i))[0])
        b.sample(logits(100 + i))
    assert mixed == draws(p)


def test_top_k_and_top_p_restrict_support():
    x = torch.linspace(0, 10, V)  # higher ids are likelier
    s = SeqSampler(SamplingParams(temperature=2.0, top_k=3, seed=1), V)
    assert {s.sample(x)[0] for _ in range(200)} <= {V - 1, V - 2, V - 3}
    probs = torch.softmax(x, -1)
    s = SeqSampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1), V)
    got = {s.sample(x)[0] for _ in range(300)}
    order = torch.argsort(probs, descending=True)
    mass, allowed = 0.0, set()
    for i in order.tolist():  # the smallest head reaching 0.5
        allowed.add(i)
        mass += float(probs[i])
        if mass >= 0.5:
            break
    assert got <= allowed and len(got) >= 1


def test_logprobs_are_raw_log_softmax():
    x = logits(3)
    tok, lp = SeqSampler(SamplingParams(temperature=0.0, is_logprobs=True, num_top_logprobs=3), V).sample(x)
    ref = torch.log_softmax(x, -1)
    assert lp.token_id == tok and lp.logprob == pytest.approx(float(ref[tok]))
    assert [t for t, _ in lp.top] == torch.argsort(ref, descending=True)[:3].tolist()
    assert lp.top[0][0] == tok


def test_forced_tokens_then_normal_sampling():
    s = SeqSampler(SamplingParams(temperature=0.0, forced_token_ids=(4, 5, 6)), V)
    x = logits(0)
    assert [s.sample(x)[0] for _ in range(4)] == [4, 5, 6, int(torch.argmax(x))]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=3), dict(top_p=0), dict(top_k=-1),
                                 dict(max_tokens=0), dict(num_top_logprobs=21, is_logprobs=True),
                                 dict(num_top_logprobs=2), dict(stop=("",)), dict(seed=1.5)])
def test_invalid_params(bad):
    with pytest.raises(SamplingError):
        SamplingParams(**bad).validate()


def test_derive_seed():
    assert derive_seed(7, 0) == 7 and derive_seed(7, 1) != derive_seed(7, 2)
    assert derive_seed(None) != derive_seed(None)


def _run(proc, tok, text):
    out, finish = [], None
    for t in tok.encode(text):
        o = proc.push(t)
        out.append(o.text)
        if o.finish_reason:
            return "".join(out), o.finish_reason, o.stop_reason
    return "".join(out), finish, None


def test_stop_string_across_tokens_and_multibyte():
    tok = ByteTokenizer()
    proc = OutputProcessor(tok, SamplingParams(stop=("STOP", "é!")), 100)
    # byte tokens: "STOP" spans 4 tokens; it and everything after it are cut
    assert _run(proc, tok, "abc STOP def") == ("abc ", FINISH_STOP, "STOP")
    proc = OutputProcessor(tok, SamplingParams(stop=("é!",)), 100)
    assert _run(proc, tok, "café!x") == ("caf", FINISH_STOP, "é!")
    # a held-back prefix that turns out not to be a stop string is released
    proc = OutputProcessor(tok, SamplingParams(stop=("STOP",)), 100)
    text, finish, _ = _run(proc, tok, "STOr more")
    assert text + proc.finish_now() == "STOr more" and finish is None


def test_eos_and_length():
    tok = ByteTokenizer()
    proc = OutputProcessor(tok, SamplingParams(), 100)
    assert proc.push(tok.encode("a")[0]).text == "a"
    o = proc.push(tok.eos_id)
    assert (o.text, o.finish_reason, o.stop_reason) == ("", FINISH_STOP, tok.eos_id)
    proc = OutputProcessor(tok, SamplingParams(is_eos_ignored=True), 2)
    assert proc.push(tok.eos_id).finish_reason is None
    assert proc.push(tok.encode("b")[0]).finish_reason == FINISH_LENGTH
