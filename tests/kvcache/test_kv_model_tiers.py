"""A state restored from each tier (device; Redis alone; disk alone, in fresh service instances)
decodes bitwise like the original in-memory state, and a resent prompt's last-token logits are
bitwise those of the original prefill."""

import pytest
import torch

from kv_model_helpers import random_tokens, service_for, stores
from kvcache.resume import decode, import_state, prefill, prompt_checkpoints, resume

NUM_PROMPT_TOKENS = 603  # inside a block, with non-empty compressor tails (603 % 4 == 3)
NUM_DECODE_STEPS = 16


@pytest.fixture(scope="module")
def original(tiny_model):
    prompt = random_tokens(NUM_PROMPT_TOKENS, tiny_model.config.vocab_size, seed=1)
    with service_for(tiny_model, checkpoint_tokens=256) as svc:
        positions = prompt_checkpoints(svc, NUM_PROMPT_TOKENS)
    assert positions == [256, 512, 602, 603]
    state = tiny_model.new_state()
    run = prefill(tiny_model, state, prompt, chunk_tokens=256, export_positions=positions)
    steps = random_tokens(NUM_DECODE_STEPS, tiny_model.config.vocab_size, seed=2)
    return dict(prompt=prompt, exports=run.exports, prompt_logits=run.logits, steps=steps,
                decoded=decode(tiny_model, state, steps))


@pytest.mark.parametrize("tier", ["device", "redis", "disk"])
def test_restored_state_decodes_bitwise_like_the_original(tier, tiny_model, original, tmp_path, redis_url,
                                                          redis_prefix):
    store = stores(tier, redis_url, redis_prefix, tmp_path)
    writer = service_for(tiny_model, checkpoint_tokens=256, **store)
    writer.commit(original["prompt"].tolist(), original["exports"])
    writer.flush()
    reader = writer if tier == "device" else service_for(tiny_model, checkpoint_tokens=256, device_bytes=0, **store)
    if reader is not writer:
        writer.close()
    with reader:
        hit = reader.lookup(original["prompt"].tolist())
        assert hit.num_cached_tokens == NUM_PROMPT_TOKENS and hit.checkpoint_tier == tier
        assert hit.num_blocks_by_tier == {tier: NUM_PROMPT_TOKENS // 128}
        logits = decode(tiny_model, import_state(tiny_model, hit.state_tensors), original["steps"])
        assert torch.equal(logits, original["decoded"])
        resent = resume(tiny_model, reader, original["prompt"])  # resumes at len - 1
        assert resent.num_cached_tokens == NUM_PROMPT_TOKENS - 1 and resent.checkpoint_tier == tier
        assert torch.equal(resent.logits, original["prompt_logits"])
