"""Isolation end to end, with real models: another tenant's salt is a miss (a cold prefill with
the right logits); another model (other fingerprint) neither finds the first model's prefixes nor
uses its records when they sit under its own keys (they are misses, deleted from Redis and disk);
its logits are always its own cold prefill's."""

from dataclasses import dataclass

import pytest
import redis
import torch

from kv_model_helpers import random_tokens, relative_error, service_for
from kvcache.disk_tier import DiskTier
from kvcache.hierarchy import index_record
from kvcache.keys import block_key, chain_hashes, checkpoint_key, index_key, token_array
from kvcache.record import encode_record
from kvcache.resume import prefill, prompt_checkpoints, resume
from model_shards import DeepseekV4
from model_shards.random_checkpoint import generate

NUM_PROMPT_TOKENS = 300  # 2 blocks + a checkpoint inside the third


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """The tiny preset with other weights and one config change, hence another fingerprint."""
    path = str(tmp_path_factory.mktemp("other_model"))
    generate(path, "tiny", "hf", "none", seed=1, rms_norm_eps=1e-5)
    return DeepseekV4.from_pretrained(path)


@torch.no_grad()
def cold_logits(model, tokens):
    return model(tokens[None])[0, -1]


@dataclass
class PrefixKeys:
    """One fingerprint's keys for a checkpoint at `position` (inside block 2): the checkpoint,
    the two blocks before it, and block 2's index record."""

    checkpoint: str
    blocks: list[str]
    index: str

    @property
    def records(self) -> list[str]:
        return [self.checkpoint, *self.blocks]


def keys_at(prompt, position: int, fingerprint: str) -> PrefixKeys:
    tokens = token_array(prompt.tolist())
    hashes = chain_hashes(tokens, 128, fingerprint, None, 2)
    return PrefixKeys(checkpoint_key(hashes[2], tokens[256:position], fingerprint, None),
                      [block_key(hashes[1]), block_key(hashes[2])], index_key(hashes[2]))


def commit_prompt(model, svc, prompt, salt=None):
    run = prefill(model, model.new_state(), prompt, export_positions=prompt_checkpoints(svc, len(prompt)))
    svc.commit(prompt.tolist(), run.exports, salt)
    svc.flush()


def test_a_tenant_never_resumes_from_another_tenants_prefix(tiny_model, tmp_path, redis_url, redis_prefix):
    prompt = random_tokens(NUM_PROMPT_TOKENS, tiny_model.config.vocab_size, seed=8)
    stores = dict(redis_url=redis_url, redis_prefix=redis_prefix, disk_dir=tmp_path)
    with service_for(tiny_model, **stores) as svc:
        commit_prompt(tiny_model, svc, prompt, salt="tenant-a")
    expected = cold_logits(tiny_model, prompt)
    for store in (dict(redis_url=redis_url, redis_prefix=redis_prefix), dict(disk_dir=tmp_path)):
        with service_for(tiny_model, device_bytes=0, **store) as svc:
            for salt in ("tenant-b", None):
                other = resume(tiny_model, svc, prompt, salt)
                assert other.num_cached_tokens == 0
                assert relative_error(other.logits, expected) <= 1e-5
            own = resume(tiny_model, svc, prompt, "tenant-a")
            assert own.num_cached_tokens == NUM_PROMPT_TOKENS - 1
            assert relative_error(own.logits, expected) <= 1e-5


def test_another_models_prefixes_and_records_are_misses(tiny_model, other_model, tmp_path, redis_url, redis_prefix):
    assert other_model.fingerprint != tiny_model.fingerprint
    prompt = random_tokens(NUM_PROMPT_TOKENS, tiny_model.config.vocab_size, seed=9)
    stores = dict(redis_url=redis_url, redis_prefix=redis_prefix, disk_dir=tmp_path)
    with service_for(tiny_model, **stores) as svc:
        commit_prompt(tiny_model, svc, prompt)
    expected = cold_logits(other_model, prompt)
    with service_for(other_model, device_bytes=0, **stores) as svc:
        assert resume(other_model, svc, prompt).num_cached_tokens == 0  # its keys differ
    # the first model's records under the keys the other model uses (with a valid index of its
    # own pointing at them): a foreign fingerprint, so a miss, and deleted
    position = NUM_PROMPT_TOKENS - 1
    ours, theirs = (keys_at(prompt, position, model.fingerprint) for model in (tiny_model, other_model))
    client = redis.Redis.from_url(redis_url)
    values = [client.get(redis_prefix + key) for key in ours.records]  # the first model's records
    assert all(value is not None for value in values)
    index = bytes(encode_record(index_record(theirs.index, [position - 256]), other_model.fingerprint))
    disk = DiskTier(tmp_path, budget_bytes=1 << 30)
    items = list(zip(theirs.records, values)) + [(theirs.index, index)]
    for key, value in items:
        client.set(redis_prefix + key, value)
    disk.put_many(items)
    for store in (dict(redis_url=redis_url, redis_prefix=redis_prefix), dict(disk_dir=tmp_path)):
        with service_for(other_model, device_bytes=0, **store) as svc:
            resumed = resume(other_model, svc, prompt)
            assert resumed.num_cached_tokens == 0
            assert relative_error(resumed.logits, expected) <= 1e-5
            svc.flush()
            tier = next(iter(store)).split("_")[0]
            # the checkpoint and both blocks: a lookup's first read fetches what a hit would use
            assert svc.stats().tiers[tier].num_corrupt == 3
            assert svc.stack.tiers[1].contains_many(theirs.records) == [False] * 3
    assert client.exists(redis_prefix + theirs.checkpoint) == 0
    assert DiskTier(tmp_path, budget_bytes=1 << 30).contains_many([theirs.checkpoint]) == [False]
    client.close()


def test_other_weights_alone_change_the_fingerprint(tiny_model, tmp_path):
    generate(str(tmp_path), "tiny", "hf", "none", seed=1)
    assert DeepseekV4.from_pretrained(str(tmp_path)).fingerprint != tiny_model.fingerprint
