"""Scheduler unit tests: exact counters and batch composition, step by step."""

import pytest

from actors.scheduler import FINISHED, RUNNING, WAITING, Scheduler, SchedulerConfig, Sequence


def seq(seq_id, num_prompt, num_computed=0, checkpoints=()):
    return Sequence(seq_id, list(range(num_prompt)), num_prompt, num_computed, list(checkpoints))


def plan(out):
    return [(c.seq.seq_id, c.start, c.num_new_tokens, c.is_sampling) for c in out.chunks]


def run(sched, out, token=7):
    for c in out.chunks:
        sched.on_chunk_done(c, token if c.is_sampling else None)


def test_chunked_prefill_then_decode_in_one_batch():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_num_waiting=4))
    a, b = seq("a", 10), seq("b", 3)
    assert s.add(a) and s.add(b)
    out = s.schedule()
    assert plan(out) == [("a", 0, 8, False)] and out.admitted_ids == ["a"]
    assert a.status == RUNNING and b.status == WAITING
    run(s, out)
    assert a.num_computed_tokens == 8 and a.num_tokens == 10
    out = s.schedule()  # a finishes its prompt (2), b gets the rest of the budget (3 of 6)
    assert plan(out) == [("a", 8, 2, True), ("b", 0, 3, True)] and out.admitted_ids == ["b"]
    run(s, out)
    assert (a.num_computed_tokens, a.num_tokens, b.num_computed_tokens, b.num_tokens) == (10, 11, 3, 4)
    out = s.schedule()  # both decode: one token each
    assert plan(out) == [("a", 10, 1, True), ("b", 3, 1, True)]
    assert out.num_batched_tokens == 2


def test_cap_on_running_and_back_pressure():
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16, max_num_waiting=1))
    assert s.add(seq("a", 2))
    assert not s.add(seq("x", 2))  # the queue holds one: back-pressure as a return value
    out = s.schedule()
    assert plan(out) == [("a", 0, 2, True)]
    assert s.add(seq("b", 2))       # a left the queue, so b fits
    run(s, out)
    assert plan(s.schedule()) == [("a", 2, 1, True)]  # b waits: one running at most
    assert s.num_running == 1 and s.num_waiting == 1
    s.finish("a")
    assert plan(s.schedule()) == [("b", 0, 2, True)]


def test_decodes_first_under_a_tight_budget():
    s = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=3, max_num_waiting=4))
    s.add(seq("a", 1))
    s.add(seq("b", 1))
    run(s, s.schedule())
    s.add(seq("c", 5))
    out = s.schedule()
    assert plan(out) == [("a", 1, 1, True), ("b", 1, 1, True), ("c", 0, 1, False)]


def test_chunks_stop_at_checkpoints_and_cache_hits_skip_tokens():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_num_waiting=2))
    a = seq("a", 20, num_computed=6, checkpoints=[10, 19, 20])
    s.add(a)
    steps = []
    for _ in range(4):
        out = s.schedule()
        steps.append(plan(out))
        run(s, out)
    assert steps == [[("a", 6, 4, False)], [("a", 10, 9, False)], [("a", 19, 1, True)], [("a", 20, 1, True)]]


def test_abort_while_running_and_waiting():
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_num_waiting=2))
    a, b = seq("a", 4), seq("b", 4)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert s.finish("b").status == FINISHED  # waiting
    assert s.finish("a") is a                 # running, its step still in flight
    run(s, out)                               # late results of an aborted sequence are ignored
    assert a.num_computed_tokens == 0 and not s.has_work
    assert s.finish("a") is None


def test_config_validation():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0).validate()
    with pytest.raises(ValueError, match="must be >= max_num_seqs"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4).validate()
    with pytest.raises(ValueError):
        Scheduler().add(seq("a", 3, num_computed=3))
