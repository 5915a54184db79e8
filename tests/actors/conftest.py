"""Fixtures of the router / expert-shard tests: a 7-expert checkpoint (so 2 and 3 shards split
unevenly) and its single-process reference model (the checks that compare against it: ep_checks.py),
and a real two-rank gloo group in this process (the data plane's wire tests)."""

from __future__ import annotations

import threading

import pytest
import torch

from factories import tiny_config, write_random


@pytest.fixture(scope="session")
def ep_ckpt(tmp_path_factory) -> str:
    return write_random(tmp_path_factory.mktemp("ep_ckpt"), tiny_config(n_routed_experts=7), seed=3)


@pytest.fixture(scope="session")
def ep_ref(ep_ckpt):
    from model_shards import DeepseekV4
    return DeepseekV4.from_pretrained(ep_ckpt)


@pytest.fixture(scope="module")
def groups():
    """{0: router's Group, 1: shard's Group} of one gloo generation on loopback."""
    from actors.messages import GroupSpec
    from actors.transport.group import Group, open_master_store
    store = open_master_store("127.0.0.1", 10.0)
    spec = GroupSpec(1, "127.0.0.1", store.port, 2, 0, "gloo", 10.0)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault(1, Group(GroupSpec(1, "127.0.0.1", store.port, 2, 1, "gloo", 10.0),
                                                                  "127.0.0.1", torch.device("cpu"))))
    th.start()
    out[0] = Group(spec, "127.0.0.1", torch.device("cpu"), store)
    th.join()
    yield out
    out[0].close()
    out[1].close()
