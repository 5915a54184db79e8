"""Logit checks of a runner (router + shards, or any ModelRunner) against the single-process
reference model: whole-sequence prefill and batched decode. A module of its own (not conftest) so
that test files import it by a name no other test folder uses."""

from __future__ import annotations

import torch

from factories import RTOL, random_ids, rel_err

_REF: dict = {}  # reference outputs by (kind, seed, ...): the single-process model is deterministic


def _prefill_case(vocab: int, seed: int) -> torch.Tensor:
    return torch.stack([random_ids(19, vocab, seed), random_ids(19, vocab, seed + 1)])


def _decode_case(vocab: int, seed: int, num_steps: int):
    prompts = [random_ids(n, vocab, seed + n) for n in (5, 12, 17)]
    steps = [[torch.tensor([int(t)]) for t in random_ids(3, vocab, seed + 100 + i)] for i in range(num_steps)]
    return prompts, steps


def check_prefill(runner, ref, seed: int = 0) -> None:
    """Whole sequences: [2, 19] (crosses the window of 8 and several compression blocks)."""
    ids = _prefill_case(ref.config.vocab_size, seed)
    key = ("prefill", id(ref), seed)
    if key not in _REF:
        _REF[key] = ref(ids)
    assert rel_err(runner.forward(ids), _REF[key]) <= RTOL


def check_decode(runner, ref, num_steps: int = 4, seed: int = 10) -> None:
    """Batched prefill of different lengths (one step), then batched decode steps."""
    vocab = ref.config.vocab_size
    prompts, steps = _decode_case(vocab, seed, num_steps)
    key = ("decode", id(ref), seed, num_steps)
    if key not in _REF:
        theirs = [ref.new_state() for _ in prompts]
        _REF[key] = [ref.step(theirs, prompts, all_logits=True)] + [
            ref.step(theirs, tokens, all_logits=False) for tokens in steps]
    want = _REF[key]
    mine = [runner.new_state() for _ in prompts]
    got = runner.step(mine, prompts, all_logits=True)
    for g, w in zip(got, want[0]):
        assert g.shape == w.shape and rel_err(g, w) <= RTOL
    for i, tokens in enumerate(steps):
        got = runner.step(mine, tokens)
        for g, w in zip(got, want[1 + i]):
            assert g.shape == (vocab,) and rel_err(g, w) <= RTOL
    assert [s.num_tokens for s in mine] == [n + num_steps for n in (5, 12, 17)]
