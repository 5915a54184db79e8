"""SequenceState.load with "*.entries" given as lists of row blocks (the KV cache's deferred
restore): the same state as the single-tensor form, pooled (pages, consecutive or scattered) and
standalone; blocks go in block order with `before_block` right before each; every shape is
checked before anything changes; an exception from `before_block` propagates. `copy_blocks`
hands the byte copies over in one call; a load plan (`plan_load`) loads the same state again
without its checks."""

from __future__ import annotations

import gc

import pytest
import torch

from factories import random_ids, random_model, tiny_config
from model_shards import SequenceState
from model_shards.state_pool import StatePool

NUM_TOKENS = 203   # CSA rate 4: 50 entries (+3 tail tokens); HCA rate 8: 25 entries (+3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("blocks"), tiny_config(), seed=5)


@pytest.fixture(scope="module")
def exported(model):
    state = SequenceState.new(model.config)
    model.step([state], [random_ids(NUM_TOKENS, model.config.vocab_size, seed=1)])
    return state.export()


def as_blocks(tensors: dict, cuts: list[float]) -> dict:
    """`tensors` with every entries tensor cut into row blocks at the fractions `cuts` of its
    rows (the same number of blocks for every tensor; some may be empty)."""
    out = dict(tensors)
    for name, t in tensors.items():
        if name.endswith(".entries"):
            bounds = [0] + [int(c * t.shape[0]) for c in cuts] + [t.shape[0]]
            out[name] = [t[a:b] for a, b in zip(bounds, bounds[1:])]
    return out


def assert_same_state(state: SequenceState, expected: dict) -> None:
    got = state.export()
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].shape == expected[name].shape and torch.equal(got[name], expected[name]), name


def pooled(model, **kw) -> StatePool:
    """Pages of 4 entries: a load of 50 entries spans 13 pages of each rate-4 compressor."""
    pool = StatePool(model.config, model.dense.dtype, model.dense.device, **{
        "num_slots": 2, "page_size": 4, "num_pages": 4, **kw})
    model.dense.state_pool = pool
    return pool


@pytest.mark.parametrize("cuts", [[], [0.5], [0.1, 0.1, 0.37, 0.8, 0.99]])
def test_blocks_load_the_same_state_as_one_tensor(model, exported, cuts):
    pooled(model)
    blocks = as_blocks(exported, cuts)
    for state in (model.new_state(), SequenceState.new(model.config)):
        state.load(blocks)
        assert_same_state(state, exported)
    one = model.new_state()
    one.load(exported)   # the single-tensor form, unchanged
    assert_same_state(one, exported)


def test_a_loaded_pooled_state_decodes_like_the_original(model, exported):
    pooled(model)
    original = SequenceState.from_export(model.config, exported)
    restored = model.new_state()
    restored.load(as_blocks(exported, [0.25, 0.5, 0.75]))
    steps = random_ids(9, model.config.vocab_size, seed=2)
    for t in range(9):
        want = model.step([original], [steps[t:t + 1]], all_logits=False)[0]
        got = model.step([restored], [steps[t:t + 1]], all_logits=False)[0]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_scattered_pages_are_written_where_the_page_table_says(model, exported):
    pool = pooled(model, num_pages=64)
    holders = [model.new_state() for _ in range(4)]
    dim = holders[0].layers[1].comp.dim
    for _ in range(6):   # one page each in turn, then free every other holder: the free pages interleave
        for state in holders:
            state.layers[1].comp.append_entries(torch.zeros(4, dim))
    del holders[::2]
    gc.collect()
    state = model.new_state()
    state.load(as_blocks(exported, [0.3, 0.6]))
    page_ids = state.page_ids[4]
    assert any(b != a + 1 for a, b in zip(page_ids, page_ids[1:]))   # not one run of pages
    assert_same_state(state, exported)
    assert pool.num_free_pages(4) + len(page_ids) <= pool.num_pages[4]


def test_before_block_runs_in_block_order_before_each_blocks_copies(model, exported):
    pooled(model)
    state = model.new_state()
    comp = state.layers[1].comp
    seen = []
    state.load(as_blocks(exported, [0.2, 0.6]), before_block=lambda j: seen.append((j, comp.num_entries)))
    rows = exported["1.comp.entries"].shape[0]
    assert seen == [(0, 0), (1, int(0.2 * rows)), (2, int(0.6 * rows))]
    assert_same_state(state, exported)


def test_an_exception_from_before_block_propagates(model, exported):
    pooled(model)
    state = model.new_state()

    def fail_at_second(block_id):
        if block_id == 1:
            raise RuntimeError("corrupt source")

    with pytest.raises(RuntimeError, match="corrupt source"):
        state.load(as_blocks(exported, [0.5]), before_block=fail_at_second)
    comp = state.layers[1].comp
    assert comp.num_entries == int(0.5 * exported["1.comp.entries"].shape[0])   # block 0 only: discard it


@pytest.mark.parametrize("damage", ["short", "long", "width", "not_a_tensor", "missing", "tail"])
def test_bad_shapes_raise_before_anything_changes(model, exported, damage):
    pool = pooled(model)
    blocks = as_blocks(exported, [0.5])
    name = "3.index.entries"
    if damage == "short":
        blocks[name] = blocks[name][:1]
    elif damage == "long":
        blocks[name] = blocks[name] + [blocks[name][0][:1]]
    elif damage == "width":
        blocks[name] = [b[:, :-1] for b in blocks[name]]
    elif damage == "not_a_tensor":
        blocks[name] = [b.tolist() for b in blocks[name]]
    elif damage == "missing":
        del blocks[name]
    else:
        blocks["3.index.tail_kv"] = blocks["3.index.tail_kv"][:1]
    free_pages = {rate: pool.num_free_pages(rate) for rate in pool.rates}
    state = model.new_state()
    with pytest.raises((ValueError, KeyError, TypeError)):
        state.load(blocks)
    assert state.num_tokens == 0 and all(not ids for ids in state.page_ids.values())
    assert all(layer.num_tokens == 0 for layer in state.layers)
    for layer in state.layers:
        for cs in (layer.comp, layer.index):
            assert cs is None or (cs.num_entries == 0 and cs.num_tail == 0)
    assert {rate: pool.num_free_pages(rate) for rate in pool.rates} == free_pages
    state.load(exported)   # still fresh: loads normally
    assert_same_state(state, exported)


def as_byte_blocks(blocks: dict, every: int = 1) -> dict:
    """`as_blocks` output with row blocks as `ByteRows` (every `every`-th; the others stay tensors)."""
    return {name: [(b.contiguous().view(-1).view(torch.uint8).numpy(), b.dtype, tuple(b.shape)) if i % every == 0
                   else b for i, b in enumerate(v)] if isinstance(v, list) else v for name, v in blocks.items()}


def copy_by_hand(copies) -> None:
    """Make the copies of a `ByteCopies` (what a `copy_blocks` caller does)."""
    import numpy as np
    from model_shards import byte_kernels

    for block, _, offset, count, dest in copies.items():
        assert type(block) is tuple and 0 <= offset and offset + count <= block[0].nbytes
        src = block[0].__array_interface__["data"][0] + offset
        if byte_kernels.is_available():
            byte_kernels.copy_segments([src, count, dest])
        else:   # (no compiler: numpy views of the two addresses)
            np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * count).from_address(dest))[:] = \
                block[0][offset:offset + count]


def holding_pages(model, pages: str) -> list:
    """States holding pages of a 64-page pool so that the next one's pages are one run or scattered."""
    pooled(model, num_pages=64)
    holders = [model.new_state() for _ in range(4)]
    if pages == "scattered":
        dim = holders[0].layers[1].comp.dim
        for _ in range(6):
            for state in holders:
                state.layers[1].comp.append_entries(torch.zeros(4, dim))
        del holders[::2]
        gc.collect()
    return holders


@pytest.mark.parametrize("every", [1, 2, "float64"])
@pytest.mark.parametrize("pages", ["one_run", "scattered", "standalone"])
def test_copy_blocks_hands_over_the_byte_copies_of_every_block_at_once(model, exported, every, pages):
    """With `copy_blocks`, the byte blocks are not copied by the load but handed over in ONE
    call (block, its j, source offset, size, destination address per copy); the caller's copies
    make the same state. A contiguous CPU tensor block of the state's dtype is handed over too
    (as a view of its bytes); a block of another dtype is copied (converted) by the load."""
    holders = holding_pages(model, pages)
    state = SequenceState.new(model.config) if pages == "standalone" else model.new_state()
    blocks = as_byte_blocks(as_blocks(exported, [0.2, 0.6]), 1 if every == 1 else 2)   # block 1: a tensor
    if every == "float64":
        blocks = {name: [b.double() if j == 1 else b for j, b in enumerate(v)] if isinstance(v, list) else v
                  for name, v in blocks.items()}
    seen = []

    def copy_blocks(copies):
        seen.append(copies)
        copy_by_hand(copies)

    state.load(blocks, copy_blocks=copy_blocks)
    assert len(seen) == 1
    copies = seen[0]
    num_entries_tensors = sum(name.endswith(".entries") for name in exported)
    per_block = [int((copies.block_ids == j).sum()) for j in range(3)]
    expected = [num_entries_tensors, 0 if every == "float64" else num_entries_tensors, num_entries_tensors]
    assert per_block == expected if pages != "scattered" else all(a >= b for a, b in zip(per_block, expected))
    assert copies.layout is None   # (planned block by block: no load plan)
    assert_same_state(state, exported)
    del holders


def test_an_exception_from_copy_blocks_propagates(model, exported):
    pooled(model)
    state = model.new_state()

    def fail(copies):
        raise RuntimeError("corrupt source")

    with pytest.raises(RuntimeError, match="corrupt source"):
        state.load(as_byte_blocks(as_blocks(exported, [0.5])), copy_blocks=fail)
    with pytest.raises(ValueError):   # (one hook or the other)
        model.new_state().load(exported, before_block=lambda j: None, copy_blocks=fail)


@pytest.mark.parametrize("pages", ["one_run", "scattered", "standalone"])
@pytest.mark.parametrize("kind", ["bytes", "tensors"])
def test_a_load_plan_loads_the_same_state_again_and_again(model, exported, pages, kind):
    """`plan_load` checks once; loads with the plan into fresh states of the same structure give
    the same state as without one. With every block a byte block or a contiguous CPU tensor of
    the state's dtype, the plan hands every block over (tensor blocks as byte views), and into
    one run of pages each load's copies are the plan's (`layout` is the plan) with only the
    destinations new; scattered pages are planned block by block (`layout` None)."""
    holders = holding_pages(model, pages)
    blocks = as_blocks(exported, [0.2, 0.6])
    if kind == "bytes":
        blocks = as_byte_blocks(blocks)
    new = (lambda: SequenceState.new(model.config)) if pages == "standalone" else model.new_state
    plan = new().plan_load(blocks)
    num_entries_tensors = sum(name.endswith(".entries") for name in exported)
    assert plan.blocks is not None and len(plan.blocks) == 3 * num_entries_tensors
    assert plan.fixed is not None   # (windows, tails, overlaps: one C call of byte copies)
    states, seen = [], []
    for _ in range(2):
        state = new()

        def copy_blocks(copies):
            seen.append(copies)
            copy_by_hand(copies)
        state.load(blocks, copy_blocks=copy_blocks, plan=plan)
        assert_same_state(state, exported)
        states.append(state)
    one_run = [all(b == a + 1 for ids in st.page_ids.values() for a, b in zip(ids, ids[1:])) for st in states]
    assert one_run[0] == (pages != "scattered")
    assert [c.layout is plan for c in seen] == one_run
    if all(one_run):
        assert seen[0].blocks is seen[1].blocks and list(seen[0].counts) == list(seen[1].counts)
        assert not set(seen[0].dests.tolist()) & set(seen[1].dests.tolist())   # (two states, two places)
    plain = new()
    plain.load(blocks, plan=plan)   # (without a hook: copied by the load)
    assert_same_state(plain, exported)
    del holders


def test_a_load_plan_refuses_another_structure(model, exported):
    pooled(model)
    blocks = as_byte_blocks(as_blocks(exported, [0.5]))
    plan = model.new_state().plan_load(blocks)
    other = SequenceState.new(model.config, dtype=torch.float64)
    assert plan.fits(model.new_state()) and not plan.fits(other)
    with pytest.raises(ValueError):
        other.load(blocks, plan=plan)
    assert other.num_tokens == 0 and all(layer.num_tokens == 0 for layer in other.layers)
    with pytest.raises(ValueError):   # (a plan checks as `load` does)
        model.new_state().plan_load({**blocks, "3.index.tail_kv": blocks["3.index.tail_kv"][:1]})
