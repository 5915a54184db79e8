"""StatePool: pooled states (slot views + entry pages) decode exactly like standalone states, slots
and pages come back when states die, growth keeps live states intact, and export / load / clone
see the same tensors."""

from __future__ import annotations

import gc

import pytest
import torch

from factories import random_ids, random_model, tiny_config
from model_shards import SequenceState
from model_shards.state_pool import StatePool


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("pool"), tiny_config(), seed=7)


def small_pool(model, **kw) -> StatePool:
    """Two slots, pages of two entries, two pages per rate: every decode below grows something."""
    pool = StatePool(model.config, model.dense.dtype, model.dense.device, **{
        "num_slots": 2, "page_size": 2, "num_pages": 2, **kw})
    model.dense.state_pool = pool
    return pool


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def decode(model, states, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Batched decode; returns each sequence's logits stacked over the steps."""
    outs = [[] for _ in states]
    for t in range(steps[0].numel()):
        for k, logits in enumerate(model.step(states, [s[t: t + 1] for s in steps], all_logits=False)):
            outs[k].append(logits)
    return [torch.stack(o) for o in outs]


def test_pooled_and_standalone_decode_agree_across_pages_and_growth(model):
    pool = small_pool(model)
    vocab = model.config.vocab_size
    prompts = [random_ids(n, vocab, seed=n) for n in (3, 17, 30, 45)]   # 4 states > 2 slots: growth
    steps = [random_ids(14, vocab, seed=50 + k) for k in range(4)]
    pooled = [model.new_state() for _ in prompts]
    assert pool.num_slots == 4 and all(s.pool is pool for s in pooled)
    standalone = [SequenceState.new(model.config) for _ in prompts]
    model.step(pooled, prompts)
    model.step(standalone, prompts)
    got, want = decode(model, pooled, steps), decode(model, standalone, steps)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5
    # entries span several 2-entry pages; the pool grew its pages (CSA rate 4: 59 tokens -> 14 entries)
    assert len(pooled[3].page_ids[4]) == 7 and pool.num_pages[4] >= 1 + sum(len(s.page_ids[4]) for s in pooled)
    for p, s in zip(pooled, standalone):
        exported, expected = p.export(), s.export()
        assert exported.keys() == expected.keys()
        for name in expected:
            assert torch.allclose(exported[name], expected[name], rtol=1e-5, atol=1e-6), name


def test_full_forward_equals_pooled_decode(model):
    small_pool(model)
    ids = random_ids(40, model.config.vocab_size, seed=3)
    full = model(ids.unsqueeze(0))[0]
    state = model.new_state()
    pieces = [model(ids[:9].unsqueeze(0), state=state)[0]]
    for t in range(9, 40):
        pieces.append(model(ids[t: t + 1].unsqueeze(0), state=state)[0])
    assert rel_err(torch.cat(pieces), full) <= 1e-5


def test_slots_and_pages_return_when_states_die(model):
    pool = small_pool(model, num_slots=4, num_pages=16)
    free_slots, free_pages = pool.num_free_slots, pool.num_free_pages(4)
    states = [model.new_state() for _ in range(3)]
    model.step(states, [random_ids(20, model.config.vocab_size, seed=k) for k in range(3)])
    assert pool.num_free_slots == free_slots - 3
    assert pool.num_free_pages(4) == free_pages - 3 * 3     # 20 tokens -> 5 entries -> 3 pages each
    del states
    gc.collect()
    assert pool.num_free_slots == free_slots and pool.num_free_pages(4) == free_pages


def test_reused_slot_starts_clean(model):
    pool = small_pool(model, num_slots=1)
    ids = random_ids(25, model.config.vocab_size, seed=9)
    first = model.new_state()
    want = model.step([first], [ids])[0]
    del first
    gc.collect()
    again = model.new_state()
    assert again.slot_id == 0 and pool.num_slots == 1
    assert torch.equal(model.step([again], [ids])[0], want)


def test_load_into_pooled_state_and_clone_is_standalone(model):
    small_pool(model)
    vocab = model.config.vocab_size
    src = model.new_state()
    model.step([src], [random_ids(27, vocab, seed=1)])
    tensors = src.export()
    restored = model.new_state()
    restored.load(tensors)
    copy = src.clone()
    assert copy.pool is None and copy.slot_id == -1 and restored.pool is src.pool
    nxt = random_ids(6, vocab, seed=2)
    a, b, c = (decode(model, [s], [nxt])[0] for s in (src, restored, copy))
    assert torch.equal(a, b) and rel_err(c, a) <= 1e-5
    with pytest.raises(ValueError, match="fresh"):
        src.load(tensors)


def test_pooled_states_are_blank_copies_of_the_pool_prototype():
    """new_state copies the pool's prototype structure (no tensors allocated) and attaches slot
    views: fresh counters, its own layer / compressor objects, every fixed buffer in the pool."""
    cfg = tiny_config()
    pool = StatePool(cfg, torch.float32, "cpu")
    a, b = pool.new_state(), pool.new_state()
    assert a.device == torch.device("cpu") and a.num_tokens == 0 and a.slot_id != b.slot_id
    for la, lb, i in zip(a.layers, b.layers, range(cfg.num_layers)):
        assert la is not lb and la.num_tokens == 0
        assert la.ring.data_ptr() == pool.rings[i][a.slot_id].data_ptr()
        for name, ca, cb in (("comp", la.comp, lb.comp), ("index", la.index, lb.index)):
            if ca is None:
                continue
            assert ca is not cb and (ca.num_entries, ca.num_tail) == (0, 0)
            assert ca._tail_kv.data_ptr() == pool.tails[(i, name)][0][a.slot_id].data_ptr()
    assert all(layer.ring.device.type == "meta" for layer in pool._proto.layers)   # the prototype stays blank
