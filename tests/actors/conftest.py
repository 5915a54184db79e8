"""Fixtures of the router / expert-shard tests: a 7-expert checkpoint (so 2 and 3 shards split
unevenly) and its single-process reference model (the checks that compare against it: ep_checks.py)."""

from __future__ import annotations

import pytest

from factories import tiny_config, write_random


@pytest.fixture(scope="session")
def ep_ckpt(tmp_path_factory) -> str:
    return write_random(tmp_path_factory.mktemp("ep_ckpt"), tiny_config(n_routed_experts=7), seed=3)


@pytest.fixture(scope="session")
def ep_ref(ep_ckpt):
    from model_shards import DeepseekV4
    return DeepseekV4.from_pretrained(ep_ckpt)
