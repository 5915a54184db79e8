"""A shard's resident memory grows by about its share of the expert bytes, not the checkpoint."""

from __future__ import annotations

import pytest

from actors.launch import launch
from factories import tiny_config, write_random

MB = 1 << 20


@pytest.mark.slow
def test_shard_rss_grows_by_its_share_of_experts(ray_cluster, tmp_path):
    # 7 experts x 4 layers x 3 x [4096 x 64] fp32 = 88 MB of experts; shards hold 3 / 2 / 2 of them
    cfg = tiny_config(n_routed_experts=7, moe_intermediate_size=4096)
    path = write_random(tmp_path / "big", cfg, seed=1, with_mtp=False)
    total = cfg.num_layers * cfg.n_routed_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size * 4
    runner = launch(path, num_expert_shards=3, placement_strategy="SPREAD")
    try:
        for info in runner.infos:
            share = total * len(info.expert_ids) // cfg.n_routed_experts
            assert info.num_expert_bytes == share
            growth = info.rss_after_load - info.rss_before_load
            print(f"shard {info.shard_id}: {len(info.expert_ids)} experts, share {share / MB:.1f} MB, "
                  f"RSS +{growth / MB:.1f} MB (checkpoint experts {total / MB:.1f} MB)")
            assert 0.8 * share <= growth <= 1.25 * share + 8 * MB
            assert growth < 0.5 * total
    finally:
        runner.shutdown()
