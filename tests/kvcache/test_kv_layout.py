import pytest
import torch

from kvcache import fp8, layout
from kvcache.synthetic import SyntheticLayout, bitwise_equal, synthetic_state

LAY = SyntheticLayout()
TOKENS = list(range(3, 1003))


def test_entry_rates_from_layer_rates():
    assert layout.entry_rates([0, 4, 128]) == {"1.comp.entries": 4, "1.index.entries": 4, "2.comp.entries": 128}
    assert layout.entry_rates({5: 128, 7: 4, 9: 0}) == {"5.comp.entries": 128, "7.comp.entries": 4, "7.index.entries": 4}


@pytest.mark.parametrize("block_tokens", [128, 256])
@pytest.mark.parametrize("position", [1, 3, 4, 5, 127, 128, 129, 255, 256, 257, 300, 512, 999])
def test_blocks_plus_checkpoint_reassemble_the_exact_state(position, block_tokens):
    state = synthetic_state(LAY, TOKENS, position)
    rates = LAY.entry_rates
    assert layout.validate_state(state, rates, block_tokens) == position
    # blocks may come from any later state: entries never change once written
    later = synthetic_state(LAY, TOKENS, 1000)
    blocks = [layout.block_tensors(later, rates, j, block_tokens) for j in range(position // block_tokens)]
    checkpoint = layout.checkpoint_tensors(state, rates, block_tokens)
    assert all(not layout.is_entries(n) or t.shape[0] < block_tokens // rates[n] for n, t in checkpoint.items())
    assert bitwise_equal(layout.assemble_state(blocks, checkpoint, rates, block_tokens), state)


def test_assemble_rejects_pieces_that_do_not_fit():
    rates = LAY.entry_rates
    state = synthetic_state(LAY, TOKENS, 300)
    blocks = [layout.block_tensors(state, rates, j, 128) for j in range(2)]
    checkpoint = layout.checkpoint_tensors(state, rates, 128)
    with pytest.raises(ValueError):
        layout.assemble_state(blocks[:1], checkpoint, rates, 128)
    short = dict(blocks[1], **{"1.comp.entries": blocks[1]["1.comp.entries"][:-1]})
    with pytest.raises(ValueError):
        layout.assemble_state([blocks[0], short], checkpoint, rates, 128)


def test_validate_state_catches_contract_violations():
    state = synthetic_state(LAY, TOKENS, 300)
    with pytest.raises(ValueError, match="no entry rate"):
        layout.validate_state(state, {"1.comp.entries": 4}, 128)
    bad = dict(state, **{"2.comp.entries": state["2.comp.entries"][:1]})
    with pytest.raises(ValueError, match="rows"):
        layout.validate_state(bad, LAY.entry_rates, 128)
    with pytest.raises(ValueError):
        layout.validate_state({k: v for k, v in state.items() if k != "num_tokens"}, LAY.entry_rates, 128)


def test_checkpoint_positions():
    assert layout.checkpoint_positions(5000, 9000, 4096) == [4096, 5000, 8192, 9000]
    assert layout.checkpoint_positions(100, 100, 4096) == [100]
    assert layout.checkpoint_positions(0, 8192, 4096) == [4096, 8192]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_keeps_rope_dims_and_bounds_the_error(dtype):
    x = (torch.randn(37, 96, generator=torch.Generator().manual_seed(1)) * 5).to(dtype)
    x[3, :64] = 0  # an all-zero block
    values, scale, rope = fp8.quantize(x, rope_dim=16)
    assert values.dtype == fp8.FP8_DTYPE and values.shape == (37, 80) and scale.shape == (37, 2)
    assert torch.all(torch.log2(scale) == torch.round(torch.log2(scale)))  # powers of two
    restored = fp8.dequantize(values, scale, rope)
    assert restored.dtype == dtype and restored.shape == x.shape
    assert torch.equal(restored[:, 80:], x[:, 80:])
    err = (restored[:, :80].float() - x[:, :80].float()).abs()
    for block in range(2):
        cols = slice(64 * block, min(64 * (block + 1), 80))
        amax = x[:, cols].float().abs().amax(dim=1, keepdim=True)
        assert torch.all(err[:, cols] <= amax / 8 + 1e-6)
    assert torch.equal(restored[3, :64], torch.zeros(64, dtype=dtype))


def test_fp8_is_per_row_so_slicing_commutes():
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))
    whole = fp8.dequantize(*fp8.quantize(x, 16))
    parts = torch.cat([fp8.dequantize(*fp8.quantize(x[:8], 16)), fp8.dequantize(*fp8.quantize(x[8:], 16))])
    assert torch.equal(whole, parts)
    empty = fp8.dequantize(*fp8.quantize(torch.empty(0, 64), 16))
    assert empty.shape == (0, 64)


def test_fp8_tensor_dicts_round_trip_names():
    state = synthetic_state(LAY, TOKENS, 300)
    quantized = fp8.quantize_tensors(state, rope_dim=16)
    assert fp8.is_quantized(quantized) and "0.window#fp8" in quantized and "1.comp.tail_kv" in quantized
    restored = fp8.dequantize_tensors(quantized)
    assert restored.keys() == state.keys()
    assert torch.equal(restored["1.comp.tail_kv"], state["1.comp.tail_kv"])
    assert torch.equal(restored["num_tokens"], state["num_tokens"])


def specs(tensors):
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def test_run_check_accepts_fitting_runs_and_counts_their_blocks():
    rates = LAY.entry_rates
    state = synthetic_state(LAY, TOKENS, 700)  # 5 full blocks of 128
    checkpoint = layout.checkpoint_tensors(state, rates, 128)
    check = layout.RunCheck(checkpoint, rates, 128)
    assert check.rows_per_block == {name: 128 // rate for name, rate in rates.items()}
    runs = [layout.range_tensors(state, rates, 0, 3, 128), layout.range_tensors(state, rates, 3, 2, 128)]
    assert [check.add(specs(run)) for run in runs] == [3, 2]
    assert check.finish(5) == 700
    with pytest.raises(ValueError):
        check.finish(4)


def test_run_check_rejects_every_misfit():
    rates = LAY.entry_rates
    state = synthetic_state(LAY, TOKENS, 700)
    checkpoint = layout.checkpoint_tensors(state, rates, 128)
    check = layout.RunCheck(checkpoint, rates, 128)
    run = specs(layout.range_tensors(state, rates, 0, 2, 128))
    name = "1.comp.entries"
    dtype, shape = run[name]
    misfits = [
        {k: v for k, v in run.items() if k != name},                        # a tensor missing
        dict(run, extra=(dtype, shape)),                                      # a tensor too many
        dict(run, **{name: (dtype, (shape[0] - 1, *shape[1:]))}),             # not a whole block
        dict(run, **{name: (dtype, (shape[0] // 2, *shape[1:]))}),            # one block where the others have two
        dict(run, **{name: (torch.bfloat16, shape)}),                         # another dtype
        dict(run, **{name: (dtype, (shape[0], shape[1] + 1))}),               # another row shape
        dict(run, **{name: (dtype, (shape[0], *shape[1:], 1))}),              # another rank
        dict(run, **{name: (dtype, ())}),                                     # a scalar
    ]
    for misfit in misfits:
        with pytest.raises(ValueError):
            check.add(misfit)
    assert check.add(run) == 2
    with pytest.raises(ValueError, match="no entry rate"):
        layout.RunCheck(checkpoint, {k: v for k, v in rates.items() if k != name}, 128)
    short = dict(checkpoint, **{name: checkpoint[name][:-1]})  # the checkpoint's own rows must fit P
    with pytest.raises(ValueError):
        layout.RunCheck(short, rates, 128)
    with pytest.raises(ValueError):
        layout.RunCheck({"num_tokens": torch.tensor(128)}, rates, 128).add({})  # a run of no tensors
