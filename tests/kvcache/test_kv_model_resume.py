"""Resuming from a cached checkpoint and recomputing the rest equals a cold prefill (<= 1e-5
relative, fp32), for matched prefixes that end on, just before and just after checkpoint, block
and span boundaries. checkpoint_tokens=256 and block_tokens=128, so spans are 2 blocks long;
the committed sequence has periodic checkpoints (256, 512), an end-of-prompt one inside a block
(603, 602 = len - 1) and an end-of-response one (700)."""

import pytest
import torch

from kv_model_helpers import random_tokens, relative_error, service_for
from kvcache.resume import prefill, prompt_checkpoints, resume

NUM_PROMPT_TOKENS, NUM_TOKENS, NUM_TAIL_TOKENS = 603, 700, 37
TOLERANCE = 1e-5

# (tokens shared with the committed sequence, expected resume position)
CASES = [
    (255, 0),      # before the first checkpoint / block boundary: a miss, cold prefill
    (256, 256),    # on a checkpoint, a block and a span boundary
    (257, 256),
    (383, 256), (384, 256), (385, 256),   # around a block boundary without a checkpoint
    (511, 256), (512, 512), (513, 512),   # around a periodic checkpoint (= span boundary)
    (602, 602), (603, 603), (604, 603),   # around the end-of-prompt checkpoints, inside a block
    (699, 603), (700, 700),               # before and at (the query continues) the end of the response
]


@pytest.fixture(scope="module", params=[None, 128], ids=["spans", "blocks"])
def committed(request, tiny_model):
    """A service (device tier) holding one prompt + response, and the sequence's tokens."""
    vocab = tiny_model.config.vocab_size
    tokens = random_tokens(NUM_TOKENS, vocab, seed=3)
    svc = service_for(tiny_model, checkpoint_tokens=256, span_tokens=request.param)
    positions = prompt_checkpoints(svc, NUM_PROMPT_TOKENS) + [NUM_TOKENS]
    run = prefill(tiny_model, tiny_model.new_state(), tokens, chunk_tokens=256, export_positions=positions)
    svc.commit(tokens.tolist(), run.exports)
    yield svc, tokens
    svc.close()


@torch.no_grad()
def cold(model, tokens: torch.Tensor):
    state = model.new_state()
    logits = model(tokens[None], state=state)[0, -1]
    return logits, state.export()


@pytest.mark.parametrize("num_shared, expected", CASES)
def test_resume_plus_recompute_equals_a_cold_prefill(num_shared, expected, committed, tiny_model):
    svc, tokens = committed
    tail = random_tokens(NUM_TAIL_TOKENS, tiny_model.config.vocab_size, seed=100 + num_shared)
    tail[0] = (tokens[num_shared] + 1) % tiny_model.config.vocab_size if num_shared < NUM_TOKENS else tail[0]
    query = torch.cat([tokens[:num_shared], tail])
    resumed = resume(tiny_model, svc, query, chunk_tokens=256)
    assert resumed.num_cached_tokens == expected
    logits, state = cold(tiny_model, query)
    assert relative_error(resumed.logits, logits) <= TOLERANCE
    resumed_state = resumed.state.export()
    assert resumed_state.keys() == state.keys()
    for name, tensor in state.items():
        assert resumed_state[name].shape == tensor.shape, name
        if tensor.numel() and tensor.is_floating_point():
            assert relative_error(resumed_state[name], tensor) <= TOLERANCE, name
        else:
            assert torch.equal(resumed_state[name], tensor), name


def test_an_identical_prompt_resumes_one_token_short(committed, tiny_model):
    svc, tokens = committed
    resumed = resume(tiny_model, svc, tokens[:NUM_PROMPT_TOKENS])
    assert resumed.num_cached_tokens == NUM_PROMPT_TOKENS - 1
    assert relative_error(resumed.logits, cold(tiny_model, tokens[:NUM_PROMPT_TOKENS])[0]) <= TOLERANCE
