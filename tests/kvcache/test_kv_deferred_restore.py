"""The deferred restore (``lookup(..., is_deferred=True)`` then `import_state`: each run record
verified right before its rows are copied once into the model's pooled state, restore.py): the
restored state is the exported one bitwise from every tier, and a span that fails its checksum
mid-restore leaves the state it was loading unused (dropped, its slot back in the pool), is
deleted from its tier, and `resume` recomputes from what is still intact. checkpoint_tokens=256
and block_tokens=128: spans of 2 blocks; real Redis and real Arrow segment files."""

import pytest
import torch

from kv_model_helpers import corrupt_stored, random_tokens, relative_error, service_for, stores
from kvcache.keys import chain_hashes, span_key, token_array
from kvcache import restore
from kvcache.restore import DeferredState
from kvcache.resume import import_state, prefill, prompt_checkpoints, resume
from model_shards.state_load import ByteCopies

NUM_PROMPT_TOKENS = 603
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def original(tiny_model):
    prompt = random_tokens(NUM_PROMPT_TOKENS, tiny_model.config.vocab_size, seed=11)
    with service_for(tiny_model, checkpoint_tokens=256) as svc:
        positions = prompt_checkpoints(svc, NUM_PROMPT_TOKENS)
    run = prefill(tiny_model, tiny_model.new_state(), prompt, chunk_tokens=256, export_positions=positions)
    return dict(prompt=prompt, exports=run.exports)


def committed_service(model, original, store: dict):
    """Commit the prompt's exports through a writer, then a reader on the same store (fresh
    device tier, off for the byte tiers so that nothing is promoted)."""
    writer = service_for(model, checkpoint_tokens=256, **store)
    writer.commit(original["prompt"].tolist(), original["exports"])
    writer.flush()
    if not store:
        return writer
    writer.close()
    return service_for(model, checkpoint_tokens=256, device_bytes=0, **store)


def assert_state_is(state, expected: dict) -> None:
    got = state.export()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape and torch.equal(got[name], tensor), name


@pytest.mark.parametrize("tier", ["device", "redis", "disk"])
def test_a_deferred_restore_is_the_exported_state_bitwise(tier, tiny_model, original, tmp_path, redis_url,
                                                           redis_prefix):
    with committed_service(tiny_model, original, stores(tier, redis_url, redis_prefix, tmp_path)) as svc:
        hit = svc.lookup(original["prompt"].tolist(), is_deferred=True)
        assert hit.num_cached_tokens == NUM_PROMPT_TOKENS and hit.checkpoint_tier == tier
        assert hit.state_tensors is None and hit.deferred.num_runs == 2   # spans [0, 2) and [2, 4)
        state = import_state(tiny_model, hit)
        assert state.pool is tiny_model.dense.state_pool   # straight into the pool's pages
        assert_state_is(state, original["exports"][NUM_PROMPT_TOKENS])
        assert svc.stats().tiers[tier].num_corrupt == 0


@pytest.fixture(params=["fused", "numpy"])
def protocol(request, monkeypatch):
    """How `DeferredState.load_into` verifies: in the pass that copies (``copy_blocks``, the byte
    kernels: every run's copies in one call) or with a checksum pass before each block's copies
    (``before_block``, without a compiler)."""
    if request.param == "numpy":
        monkeypatch.setattr(restore, "_fused_enabled", lambda: False)
    else:
        assert restore._fused_enabled()
    return request.param


@pytest.mark.parametrize("tier", ["redis", "disk"])
def test_a_span_corrupt_mid_restore_drops_the_state_and_resume_recomputes(tier, tiny_model, original, tmp_path,
                                                                           redis_url, redis_prefix, redis_client,
                                                                           protocol):
    store = stores(tier, redis_url, redis_prefix, tmp_path)
    svc = committed_service(tiny_model, original, store)
    hashes = chain_hashes(token_array(original["prompt"]), 128, svc.storage_fingerprint, None, 4)
    key = span_key(hashes[4], 2)   # blocks [2, 4): run 1, verified after run 0 was copied
    corrupt_stored(tier, key, redis_client, redis_prefix, tmp_path)
    with svc:
        hit = svc.lookup(original["prompt"].tolist(), is_deferred=True)
        assert hit.num_cached_tokens == NUM_PROMPT_TOKENS   # parsed; the span's checksum waits for the copy
        pool = tiny_model.dense.state_pool
        num_free_slots = pool.num_free_slots
        copied = []
        if protocol == "numpy":
            load = hit.deferred._before_block
            hit.deferred._before_block = lambda run_id: (copied.append(run_id), load(run_id))
        else:   # (one hand-over: the runs whose byte copies it holds)
            load = hit.deferred._copy_blocks
            hit.deferred._copy_blocks = lambda copies: (
                copied.append(sorted({j for j in copies.block_ids.tolist() if j < 2})), load(copies))
        assert import_state(tiny_model, hit) is None   # the partly loaded state is dropped ...
        assert copied == ([0, 1] if protocol == "numpy" else [[0, 1]])   # ... after run 0's rows were copied
        assert [run.pending is None for run in hit.deferred.runs] == [True, False]   # run 0 verified, run 1 not
        assert pool.num_free_slots == num_free_slots    # ... and its slot is back in the pool
        svc.flush()
        assert svc.stats().tiers[tier].num_corrupt == 1
        assert svc.stack.tiers[1].contains_many([key]) == [False]
        resumed = resume(tiny_model, svc, original["prompt"], chunk_tokens=256)
        assert resumed.num_cached_tokens == 256 and resumed.checkpoint_tier == tier   # span [0, 2) still intact
        cold = prefill(tiny_model, tiny_model.new_state(), original["prompt"], chunk_tokens=256)
        assert relative_error(resumed.logits, cold.logits) <= TOLERANCE


class _Run:
    """A stand-in for a lookup hit: what DeferredState reads of one (its record's key)."""

    def __init__(self, key):
        self.record = type("R", (), {"key": key})()


class _Loader:
    """An engine state that calls ``before_block`` for the blocks it copies (or ``copy_blocks``
    once first, with no byte copies)."""

    def __init__(self, block_ids):
        self.block_ids, self.loaded = block_ids, []

    def load(self, tensors, *, before_block=None, copy_blocks=None):
        if copy_blocks is not None:
            copy_blocks(ByteCopies.of([]))
        for j in self.block_ids:
            if before_block is not None:
                before_block(j)
            self.loaded.append(j)


@pytest.mark.parametrize("block_ids", [[0, 1, 2, 3], [0, 2], []])
def test_every_run_is_settled_once_in_order_before_its_block(block_ids, protocol):
    settled = []
    runs = [_Run(f"s{i}") for i in range(3)]   # blocks 0-2 from runs, block 3 from the checkpoint
    deferred = DeferredState({}, runs, lambda hit: settled.append(hit.record.key) or True)
    loader = _Loader(block_ids)
    assert deferred.load_into(loader) and loader.loaded == block_ids
    assert settled == ["s0", "s1", "s2"]   # runs a load skips are settled too, and none twice


def test_a_run_failing_its_settle_stops_the_load_before_its_block(protocol):
    """(Fused: the runs are settled in the one hand-over, before the load copies any block, so
    it copies none.)"""
    settled = []
    deferred = DeferredState({}, [_Run("s0"), _Run("s1"), _Run("s2")],
                             lambda hit: settled.append(hit.record.key) or hit.record.key != "s1")
    loader = _Loader([0, 1, 2, 3])
    assert not deferred.load_into(loader)
    assert loader.loaded == ([0] if protocol == "numpy" else []) and settled == ["s0", "s1"]
