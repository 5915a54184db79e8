"""Replica routing: conversation affinity by prefix, spread, least-loaded fallback."""

from cluster.routing import ReplicaRouter, affinity_key

ASSISTANT = 3


def test_affinity_key_is_the_first_user_turn():
    turn1 = [0, 50, 51, 2, 60, 61, ASSISTANT, 6]
    turn2 = turn1[:-1] + [70, 71, 1, 2, 80, ASSISTANT, 6]
    assert affinity_key(turn1, ASSISTANT, 1024) == affinity_key(turn2, ASSISTANT, 1024)
    assert affinity_key(turn1, ASSISTANT, 1024) != affinity_key([0, 50, 51, 2, 99, ASSISTANT], ASSISTANT, 1024)
    assert affinity_key(turn1, ASSISTANT, 3) == affinity_key([0, 50, 51, 9], ASSISTANT, 3)  # capped
    assert affinity_key(turn1, ASSISTANT, 1024, "conv-1") == affinity_key([5], ASSISTANT, 1024, "conv-1")


def test_preferred_replica_is_stable_and_spread():
    router = ReplicaRouter(4)
    keys = [affinity_key([0, i, ASSISTANT], ASSISTANT, 64) for i in range(200)]
    picks = [router.pick(k) for k in keys]
    assert picks == [router.pick(k) for k in keys]
    assert all(picks.count(r) > 25 for r in range(4))
    # rendezvous hashing: growing to 5 replicas moves only the keys that now prefer replica 4
    bigger = ReplicaRouter(5)
    moved = [(a, bigger.pick(k)) for a, k in zip(picks, keys) if bigger.pick(k) != a]
    assert all(b == 4 for _, b in moved) and len(moved) < 80


def test_least_loaded_when_the_preferred_replica_is_busy():
    router = ReplicaRouter(2, max_imbalance=2)
    key = affinity_key([0, 1, ASSISTANT], ASSISTANT, 64)
    best = router.pick(key)
    router.started(best, 3)
    assert router.pick(key) == 1 - best
    router.finished(best, 2)
    assert router.pick(key) == best
