"""A shard's process dies (or hangs) during a generation: the step fails with ShardError within
30 s, the shard restarts and reloads its experts, the group is rebuilt, the next request succeeds."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch

from actors.launch import launch
from actors.messages import ShardError

from ep_checks import check_decode, check_prefill


def generate_until_error(runner, act, delay_s: float = 0.4, limit_s: float = 60.0):
    """Decode one sequence until a step raises; `act()` runs in a thread after delay_s.
    Returns (the exception, seconds from act() to the exception reaching us)."""
    state = runner.new_state()
    runner.step([state], [torch.arange(1, 9)])
    acted_at = []

    def actor_thread():
        time.sleep(delay_s)
        acted_at.append(time.monotonic())
        act()

    th = threading.Thread(target=actor_thread, daemon=True)
    th.start()
    deadline = time.monotonic() + limit_s
    with pytest.raises(ShardError) as info:
        while time.monotonic() < deadline:
            runner.step([state], [torch.tensor([3])])
    th.join()
    return info.value, time.monotonic() - acted_at[0]


@pytest.mark.slow
@pytest.mark.parametrize("same_node_links", [True, False])   # decode messages over the links / over gloo
def test_killed_shard_process_fails_step_then_recovers(ray_cluster, ep_ckpt, ep_ref, same_node_links):
    runner = launch(ep_ckpt, num_expert_shards=2, micro_batches=2, transport="collective",
                    same_node_links=same_node_links)
    try:
        victim = runner.infos[1]
        err, latency = generate_until_error(runner, lambda: os.kill(victim.pid, signal.SIGKILL))
        assert latency < 30, f"error took {latency:.1f} s"
        assert 1 in err.shard_ids and "invalid" in str(err)
        # the next request succeeds: shard 1 restarted (new process, experts reloaded), group rebuilt
        check_prefill(runner, ep_ref, seed=1)
        infos = runner.shard_infos()
        assert infos[1].pid != victim.pid and infos[1].is_restarted and infos[1].expert_ids == victim.expert_ids
        assert infos[0].pid == runner.infos[0].pid          # the survivor kept its process and experts
        check_decode(runner, ep_ref, num_steps=3, seed=1)
        assert runner.is_healthy()

        # the same through the Ray transport (actor killed by Ray this time)
        runner.use_transport("ray")
        err, latency = generate_until_error(runner, lambda: ray.kill(runner.shards[0], no_restart=False))
        assert latency < 30 and err.shard_ids == (0,)
        check_prefill(runner, ep_ref, seed=1)
        runner.use_transport("collective")                  # shard 0 restarted meanwhile: group rebuilt
        check_decode(runner, ep_ref, num_steps=3, seed=1)
    finally:
        runner.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("same_node_links", [True, False])
def test_hung_shard_times_out_then_recovers(ray_cluster, ep_ckpt, ep_ref, same_node_links):
    runner = launch(ep_ckpt, num_expert_shards=2, transport="collective", collective_timeout_s=3.0,
                    same_node_links=same_node_links)
    try:
        victim = runner.infos[0]
        err, latency = generate_until_error(runner, lambda: os.kill(victim.pid, signal.SIGSTOP))
        assert latency < 30 and err.shard_ids == (0,)
        check_prefill(runner, ep_ref, seed=1)               # the stuck shard is killed and restarted
        assert runner.shard_infos()[0].pid != victim.pid
    finally:
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        runner.shutdown()
