"""Incremental state equals the full forward: chunked prefill, decode, batched decode, mixed steps,
and export / import of the state at any position."""

from __future__ import annotations

import pytest
import torch

from factories import random_ids, random_model, tiny_config
from model_shards import SequenceState
from model_shards.cpu_experts import DecodeExperts


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("inc"), tiny_config(), seed=3)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_random_chunks_then_decode_equal_full(model):
    ids = random_ids(90, model.config.vocab_size, seed=11)
    full = model(ids.unsqueeze(0))[0]
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        state, pos, pieces = model.new_state(), 0, []
        while pos < 60:
            n = int(torch.randint(1, 19, (1,), generator=gen))
            pieces.append(model(ids[pos: pos + n].unsqueeze(0), state=state)[0])
            pos += pieces[-1].shape[0]
        while pos < 90:
            pieces.append(model(ids[pos: pos + 1].unsqueeze(0), state=state)[0])
            pos += 1
        assert state.num_tokens == 90
        assert rel_err(torch.cat(pieces), full) <= 1e-5


def test_batched_decode_of_different_lengths(model):
    vocab = model.config.vocab_size
    prompts = [random_ids(n, vocab, seed=n) for n in (1, 9, 33, 64)]
    continuation = [random_ids(12, vocab, seed=100 + n) for n in range(4)]
    states = [model.new_state() for _ in prompts]
    model.step(states, prompts)
    outs = [[] for _ in prompts]
    for t in range(12):
        logits = model.step(states, [c[t: t + 1] for c in continuation], all_logits=False)
        for k, l in enumerate(logits):
            outs[k].append(l)
    for k, p in enumerate(prompts):
        full = model(torch.cat([p, continuation[k]]).unsqueeze(0))[0][p.numel():]
        assert rel_err(torch.stack(outs[k]), full) <= 1e-5


def test_mixed_prefill_chunks_and_decodes_in_one_step(model):
    vocab = model.config.vocab_size
    a, b, c = (random_ids(n, vocab, seed=n) for n in (40, 23, 57))
    sa, sb, sc = model.new_state(), model.new_state(), model.new_state()
    model.step([sa, sb], [a[:39], b[:10]])
    # one step: a decodes, b continues its prefill, c starts
    la, lb, lc = model.step([sa, sb, sc], [a[39:40], b[10:23], c[:57]])
    assert rel_err(la, model(a.unsqueeze(0))[0][39:]) <= 1e-5
    assert rel_err(lb, model(b.unsqueeze(0))[0][10:]) <= 1e-5
    assert rel_err(lc, model(c.unsqueeze(0))[0]) <= 1e-5
    assert (sa.num_tokens, sb.num_tokens, sc.num_tokens) == (40, 23, 57)


@pytest.mark.parametrize("cut", [1, 3, 4, 7, 8, 9, 16, 17, 31])
def test_export_import_at_any_position(model, cut):
    ids = random_ids(45, model.config.vocab_size, seed=cut)
    state = model.new_state()
    model(ids[:cut].unsqueeze(0), state=state)
    exported = state.export()
    restored = SequenceState.from_export(model.config, exported)
    a = model(ids[cut:].unsqueeze(0), state=state)
    b = model(ids[cut:].unsqueeze(0), state=restored)
    assert torch.equal(a, b)  # bitwise: the export is exact
    assert rel_err(b[0], model(ids.unsqueeze(0))[0][cut:]) <= 1e-5


def test_export_names_and_shapes(model):
    cfg = model.config
    state = model.new_state()
    model(random_ids(21, cfg.vocab_size).unsqueeze(0), state=state)
    t = state.export()
    assert int(t["num_tokens"]) == 21
    assert t["0.window"].shape == (7, cfg.head_dim)            # sliding layer: W-1 = 7 latents
    assert t["1.comp.entries"].shape == (5, cfg.head_dim)      # CSA: 21 // 4
    assert t["1.comp.tail_kv"].shape == (1, 2 * cfg.head_dim)  # 21 % 4
    assert t["1.comp.overlap_kv"].shape == (4, cfg.head_dim)
    assert t["1.index.entries"].shape == (5, cfg.index_head_dim)
    assert t["2.comp.entries"].shape == (2, cfg.head_dim)      # HCA (rate 8): 21 // 8
    assert t["2.comp.tail_gate"].shape == (5, cfg.head_dim)
    assert "2.comp.overlap_kv" not in t and "2.index.entries" not in t
    bad = dict(t)
    bad["1.comp.entries"] = bad["1.comp.entries"][:3]
    with pytest.raises(ValueError, match="1.comp.entries"):
        SequenceState.from_export(cfg, bad)


def test_state_is_independent_after_clone(model):
    ids = random_ids(30, model.config.vocab_size, seed=2)
    s1 = model.new_state()
    model(ids[:20].unsqueeze(0), state=s1)
    s2 = s1.clone()
    a = model(ids[20:].unsqueeze(0), state=s1)
    b = model(ids[20:].unsqueeze(0), state=s2)
    assert torch.equal(a, b)


def test_ties_in_topk_go_to_lower_index():
    from model_shards.ops import stable_topk
    scores = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]])
    assert stable_topk(scores, 3).tolist() == [[1, 3, 0]]
    assert stable_topk(torch.zeros(1, 6), 2).tolist() == [[0, 1]]


def routed_tokens(cfg, num_tokens: int, seed: int):
    """Random MoE inputs: x [T, hidden], distinct expert ids [T, k], routing weights [T, k]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, cfg.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=gen)[: cfg.num_experts_per_tok]
                       for _ in range(num_tokens)])
    return x, ids, torch.rand(num_tokens, cfg.num_experts_per_tok, generator=gen)


def test_expert_bank_subset_computes_its_share(model):
    bank, cfg = model.experts, model.config
    x, ids, w = routed_tokens(cfg, 6, seed=0)
    from model_shards import ExpertBank
    parts = [[0, 2, 4], [1, 3, 5, 6]]
    banks = []
    for held in parts:
        part = ExpertBank(cfg, held)
        for layer in range(cfg.num_layers):
            part.w13[layer] = torch.nn.Parameter(bank.w13[layer][held].clone(), requires_grad=False)
            part.w2t[layer] = torch.nn.Parameter(bank.w2t[layer][held].clone(), requires_grad=False)
        banks.append(part)
    whole = bank(1, x, ids, w)
    assert rel_err(banks[0](1, x, ids, w) + banks[1](1, x, ids, w), whole) <= 1e-5
    only_first = banks[0](1, x, ids, w * torch.isin(ids, torch.tensor(parts[0])))
    assert torch.equal(only_first, banks[0](1, x, ids, w))      # a bank ignores experts it does not hold


def test_expert_bank_paths_agree(model, monkeypatch):
    """The three ways a bank computes its experts: the C kernel (CPU decode), one grouped GEMM,
    the per-expert loop."""
    from model_shards import cpu_kernels
    bank, cfg = model.experts, model.config
    x, ids, w = routed_tokens(cfg, 9, seed=1)
    assert cpu_kernels.is_available()
    assert bank.decode_experts.can_run(x, bank.w13[2], ids.numel(), len(bank.expert_ids))   # 18 pairs, 7 experts
    kernel = bank(2, x, ids, w)
    monkeypatch.setattr(bank.decode_experts, "is_enabled", False)
    assert bank._can_grouped_mm(x)            # CPU: the one-call path is the default otherwise
    grouped = bank(2, x, ids, w)
    monkeypatch.setattr(bank, "_is_grouped_mm_ok", False)
    looped = bank(2, x, ids, w)
    assert rel_err(grouped, looped) <= 1e-6 and rel_err(kernel, looped) <= 1e-6
    many = routed_tokens(cfg, 40, seed=2)     # 80 pairs > 4 per expert: the grouped GEMM again
    assert not DecodeExperts(True).can_run(many[0], bank.w13[2], many[1].numel(), len(bank.expert_ids))


def test_expert_shard_banks_take_the_kernel_too(model):
    """An expert shard's subset: pairs routed to experts it does not hold (-1) add nothing."""
    from model_shards import ExpertBank
    cfg = model.config
    part = ExpertBank(cfg, [0, 2, 4])
    for i, e in enumerate(part.expert_ids):
        part.w13[1].data[i] = model.experts.w13[1][e]
        part.w2t[1].data[i] = model.experts.w2t[1][e]
    x, ids, w = routed_tokens(cfg, 3, seed=4)
    assert part.decode_experts.can_run(x, part.w13[1], ids.numel(), len(part.expert_ids))
    want = model.experts(1, x, ids, w * torch.isin(ids, torch.tensor(part.expert_ids)))
    assert rel_err(part(1, x, ids, w), want) <= 1e-6


def test_query_block_size_does_not_change_prefill(model, monkeypatch):
    """GPUs use larger query blocks (Attention.QUERY_BLOCK_GPU); blocking must not change the math."""
    from model_shards.attention import Attention
    ids = random_ids(300, model.config.vocab_size, seed=21)
    small_blocks = model(ids.unsqueeze(0))[0]
    monkeypatch.setattr(Attention, "QUERY_BLOCK", Attention.QUERY_BLOCK_GPU)
    one_block = model(ids.unsqueeze(0))[0]
    monkeypatch.setattr(Attention, "QUERY_BLOCK", 7)
    odd_blocks = model(ids.unsqueeze(0))[0]
    assert rel_err(one_block, small_blocks) <= 1e-5 and rel_err(odd_blocks, small_blocks) <= 1e-5


@pytest.mark.parametrize("query_block", [7, 16, 128])
def test_aligned_window_keys_do_not_change_prefill(model, monkeypatch, query_block):
    """GPUs start each query block's window keys early enough that their count is a multiple of 8
    (Attention.KEY_ALIGN_GPU; the extra keys are masked): the same logits, also in a chunked
    prefill (a window already holding keys) and at blocks where the shift runs into key 0."""
    from model_shards.attention import Attention
    monkeypatch.setattr(Attention, "QUERY_BLOCK", query_block)
    ids = random_ids(300, model.config.vocab_size, seed=22)
    runs = {}
    for align in (1, 8):
        monkeypatch.setattr(Attention, "KEY_ALIGN", align)
        whole = model(ids.unsqueeze(0))[0]
        state = model.new_state()
        chunked = torch.cat([model(ids[None, a:b], state=state)[0] for a, b in ((0, 37), (37, 150), (150, 300))])
        runs[align] = (whole, chunked)
    for got, want in zip(runs[8], runs[1]):
        assert rel_err(got, want) <= 1e-6


def test_sinkhorn_numpy_path_equals_the_torch_loop_bitwise():
    """CPU runs Sinkhorn in numpy, GPUs run the torch loop (fused there): the same arithmetic."""
    from model_shards.fused import Sinkhorn
    from model_shards.ops import sinkhorn, sinkhorn_torch
    comb = torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(0)) + 1e-6
    want = sinkhorn_torch(comb, 20, 1e-6)
    assert torch.equal(sinkhorn(comb, 20, 1e-6), want)
    assert torch.equal(Sinkhorn()(comb, 20, 1e-6), want)        # on CPU the owner object is the numpy path
    assert torch.allclose(want.sum(dim=-2), torch.ones(5, 4), atol=1e-5)   # columns normalised last
