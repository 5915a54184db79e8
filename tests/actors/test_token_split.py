"""Prefills cut INSIDE a sequence over micro-batches (StepBatch.plan): the plan's boundaries, and
router steps with cut prefills == the single-process model (logits and resulting states), in
process (LocalTransport, many cut positions) and with router + 2 shards on Ray (both transports)."""

from __future__ import annotations

import pytest

from actors.placement import split_experts
from model_shards.micro_batches import SegmentPart, plan_micro_batches

from factories import RTOL, random_ids, rel_err
from test_local_pipeline import make_router


def parts(plan) -> list[list[tuple[int, int, int, bool]]]:
    return [[(p.segment, p.offset, p.length, p.is_last) for p in mb] for mb in plan]


# ---- the plan (no model) ---------------------------------------------------------------------
@pytest.mark.parametrize("lengths, num_parts, want", [
    # one long prompt: halves (odd length: the first part takes the rounding)
    ([301], 2, [[(0, 0, 151, False)], [(0, 151, 150, True)]]),
    ([8192], 2, [[(0, 0, 4096, False)], [(0, 4096, 4096, True)]]),
    ([900], 3, [[(0, 0, 300, False)], [(0, 300, 300, False)], [(0, 600, 300, True)]]),
    # too short to cut into two parts of >= 128: one micro-batch
    ([200], 2, [[(0, 0, 200, True)]]),
    ([255], 2, [[(0, 0, 255, True)]]),
    ([256], 2, [[(0, 0, 128, False)], [(0, 128, 128, True)]]),
    # decode rows around a long prompt: the cut lands inside the prompt, rows never cut
    ([1, 1000, 1, 37, 1], 2, [[(0, 0, 1, True), (1, 0, 519, False)],
                              [(1, 519, 481, True), (2, 0, 1, True), (3, 0, 37, True), (4, 0, 1, True)]]),
    ([300, 40], 2, [[(0, 0, 170, False)], [(0, 170, 130, True), (1, 0, 40, True)]]),
    # the cut moves to keep both pieces >= 128 (target 175 -> 178 = 50 decode rows + 128)
    ([1] * 50 + [300], 2, [[(k, 0, 1, True) for k in range(50)] + [(50, 0, 128, False)], [(50, 128, 172, True)]]),
    # whole sequences balance as well or better: no cut (greedy longest-first, as before)
    ([130, 140], 2, [[(1, 0, 140, True)], [(0, 0, 130, True)]]),
    ([600, 600], 2, [[(0, 0, 600, True)], [(1, 0, 600, True)]]),
    ([5, 2, 3], 2, [[(0, 0, 5, True)], [(1, 0, 2, True), (2, 0, 3, True)]]),
    ([1] * 5, 2, [[(0, 0, 1, True), (2, 0, 1, True), (4, 0, 1, True)], [(1, 0, 1, True), (3, 0, 1, True)]]),
    ([4000], 1, [[(0, 0, 4000, True)]]),
])
def test_plan_boundaries(lengths, num_parts, want):
    plan = plan_micro_batches(lengths, num_parts)
    assert parts(plan) == want
    for k, n in enumerate(lengths):   # every sequence's parts tile [0, n) in micro-batch order
        mine = [p for mb in plan for p in mb if p.segment == k]
        assert [p.offset for p in mine] == [sum(q.length for q in mine[:i]) for i in range(len(mine))]
        assert sum(p.length for p in mine) == n and [p.is_last for p in mine] == [False] * (len(mine) - 1) + [True]
        assert all(p.length >= 128 for p in mine if len(mine) > 1)


def test_plan_min_part():
    assert parts(plan_micro_batches([11], 2, min_part=3)) == [[(0, 0, 6, False)], [(0, 6, 5, True)]]
    assert parts(plan_micro_batches([11], 3, min_part=5)) == [[(0, 0, 5, False)], [(0, 5, 6, True)]]
    with pytest.raises(ValueError, match="min_part"):
        plan_micro_batches([11], 2, min_part=1)
    assert plan_micro_batches([4], 2, min_part=2)[0] == [SegmentPart(0, 0, 2, False)]
    assert plan_micro_batches([3], 2, min_part=2) == [[SegmentPart(0, 0, 3, True)]]


# ---- helpers: run the same steps on the router and the single-process model -------------------
def assert_states_equal(mine, theirs) -> None:
    a, b = mine.export(), theirs.export()
    assert a.keys() == b.keys()
    for name in b:
        assert a[name].shape == b[name].shape, name
        if b[name].numel():
            scale = max(float(b[name].float().abs().max()), 1e-6)
            assert float((a[name].float() - b[name].float()).abs().max()) / scale <= RTOL, name


def run_both(runner, ref, steps, num_seqs: int, all_logits: bool = True, cut_steps: tuple[int, ...] = ()):
    """steps: [[(sequence, token ids)]]; every step's logits and the final states compared."""
    mine = [runner.new_state() for _ in range(num_seqs)]
    theirs = [ref.new_state() for _ in range(num_seqs)]
    for i, step in enumerate(steps):
        seqs, ids = [k for k, _ in step], [t for _, t in step]
        got = runner.step([mine[k] for k in seqs], ids, all_logits=all_logits)
        if i in cut_steps:
            assert runner.last_timing.num_cut_sequences >= 1
        want = ref.step([theirs[k] for k in seqs], ids, all_logits=all_logits)
        for g, w in zip(got, want):
            assert g.shape == w.shape and rel_err(g, w) <= RTOL, (i, rel_err(g, w))
    for a, b in zip(mine, theirs):
        assert a.num_tokens == b.num_tokens
        assert_states_equal(a, b)


def decode_steps(seqs: list[int], vocab: int, num: int, seed: int):
    return [[(k, random_ids(1, vocab, seed + 7 * i + k)) for k in seqs] for i in range(num)]


# ---- in process: many cut positions against the window (8) and the rates (4, 8) ---------------
@pytest.mark.parametrize("micro_batches", [2, 3])
@pytest.mark.parametrize("length", [7, 13, 23, 37])
def test_local_cut_prefill_matches(ep_ckpt, ep_ref, micro_batches, length):
    router = make_router(ep_ckpt, split_experts(7, 2), micro_batches)
    router.min_split_tokens = 3
    vocab = ep_ref.config.vocab_size
    steps = [[(0, random_ids(length, vocab, length))],          # cut prefill
             [(0, random_ids(length + 4, vocab, 1 + length))]]  # chunked prefill, cut again
    run_both(router, ep_ref, steps + decode_steps([0], vocab, 9, length), 1, cut_steps=(0, 1))


def test_local_mixed_step_matches(ep_ckpt, ep_ref):
    """Decode rows of sequences with history + a long and a short prompt in one step (cut: the long
    prompt's later part shares micro-batch 1 with a decode row), then decode all four."""
    router = make_router(ep_ckpt, split_experts(7, 2), 2)
    router.min_split_tokens = 5
    vocab = ep_ref.config.vocab_size
    steps = [[(2, random_ids(11, vocab, 2)), (3, random_ids(14, vocab, 3))],
             [(2, random_ids(1, vocab, 4)), (0, random_ids(41, vocab, 5)), (3, random_ids(1, vocab, 6)),
              (1, random_ids(3, vocab, 7))]]
    for all_logits in (True, False):
        run_both(router, ep_ref, steps + decode_steps([0, 1, 2, 3], vocab, 5, 8), 4, all_logits, cut_steps=(1,))


# ---- router + 2 shards on Ray, the tiny preset (window 128, m = 4, m' = 128) ------------------
def test_ray_cut_prefill_matches(ray_cluster, tiny_ckpt, tiny_model):
    from actors.launch import launch
    vocab = tiny_model.config.vocab_size
    runner = launch(tiny_ckpt, num_expert_shards=2, micro_batches=2, transport="collective")
    try:
        for transport in ("collective", "ray"):
            runner.use_transport(transport)
            # 389 tokens cut at 195 (mid HCA window, mid CSA window), then a 301-token chunk cut at
            # +151 (position 540), then decodes: crosses the HCA boundaries 128, 256, 384, 512, 640
            single = [[(0, random_ids(389, vocab, 1))], [(0, random_ids(301, vocab, 2))]]
            run_both(runner, tiny_model, single + decode_steps([0], vocab, 4, 3), 1, cut_steps=(0, 1))
            run_both(runner, tiny_model, single, 1, all_logits=False, cut_steps=(0, 1))
            # two prompts of very different lengths + decode rows of two sequences with history
            mixed = [[(2, random_ids(130, vocab, 4)), (3, random_ids(141, vocab, 5))],
                     [(2, random_ids(1, vocab, 6)), (0, random_ids(517, vocab, 7)), (3, random_ids(1, vocab, 8)),
                      (1, random_ids(23, vocab, 9))]]
            run_both(runner, tiny_model, mixed + decode_steps([0, 1, 2, 3], vocab, 3, 10), 4, cut_steps=(1,))
            assert runner.last_timing.num_micro_batches == 2
        assert runner.is_healthy()
    finally:
        runner.shutdown()
