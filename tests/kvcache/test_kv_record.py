import numpy as np
import pytest
import torch

import kvcache.record as record_module
from kvcache import checksum
from kvcache.record import FORMAT_VERSION, Record, RecordError, decode_record, encode_record
from kvcache.synthetic import bitwise_equal


def sample_tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "num_tokens": torch.tensor(300, dtype=torch.int64),
        "0.window": torch.randn(127, 64, generator=gen).bfloat16(),
        "1.comp.entries": torch.randn(32, 64, generator=gen),
        "1.comp.tail_kv": torch.empty(0, 128),
        "fp8": torch.randn(4, 64, generator=gen).to(torch.float8_e4m3fn),
        "half": torch.randn(3, 5, generator=gen).half(),
        "mask": torch.tensor([True, False, True]),
        "strided": torch.randn(6, 8, generator=gen)[:, ::2],
    }


@pytest.mark.parametrize("algorithm", checksum.ALGORITHMS)
def test_round_trip_is_bitwise_exact(algorithm):
    tensors = sample_tensors()
    data = encode_record(Record("checkpoint", "ckey", tensors), "model-a", checksum=algorithm)
    for form in (data, bytes(data), memoryview(data)):
        for is_borrowed in (False, True):
            decoded = decode_record(form, "model-a", expected_key="ckey", is_borrowed=is_borrowed)
            assert decoded.kind == "checkpoint" and decoded.key == "ckey" and decoded.is_borrowed == is_borrowed
            assert bitwise_equal(decoded.tensors, {k: v.contiguous() for k, v in tensors.items()})


def test_borrowed_tensors_view_the_buffer_until_owned():
    data = bytes(encode_record(Record("span", "k", {"a": torch.arange(64.0), "b": torch.ones(3, 5)}), "fp"))
    start, end = np.frombuffer(data, np.uint8).ctypes.data, np.frombuffer(data, np.uint8).ctypes.data + len(data)
    borrowed = decode_record(data, "fp", is_borrowed=True)
    assert all(start <= t.data_ptr() < end for t in borrowed.tensors.values())
    owned = borrowed.owned()
    assert not owned.is_borrowed and owned.owned() is owned
    assert all(not start <= t.data_ptr() < end for t in owned.tensors.values())
    assert bitwise_equal(owned.tensors, borrowed.tensors)
    copied = decode_record(data, "fp")
    assert all(not start <= t.data_ptr() < end for t in copied.tensors.values())


@pytest.mark.parametrize("num_words", [0, 1, 15, 16, 17, 255, 256, 257, 5000])
def test_rowcol64_detects_every_change_of_up_to_three_words(num_words):
    rng = np.random.default_rng(num_words)
    words = rng.integers(0, 2**63, num_words, dtype=np.uint64)
    reference = checksum.compute("rowcol64", b"h", memoryview(words.view(np.uint8)))
    assert checksum.compute("rowcol64", b"H", memoryview(words.view(np.uint8))) != reference
    for trial in range(200 if num_words else 0):
        changed = words.copy()
        positions = rng.choice(num_words, size=min(num_words, 1 + trial % 3), replace=False)
        for position in positions:  # single bit flips, and arbitrary new words
            flip = np.uint64(1) << np.uint64(trial % 64)
            changed[position] ^= flip if trial % 2 else rng.integers(1, 2**63, dtype=np.uint64)
        assert checksum.compute("rowcol64", b"h", memoryview(changed.view(np.uint8))) != reference
    width = checksum.row_words(num_words)
    assert width >= checksum.MIN_ROW_WORDS and width * width >= num_words


def test_every_flipped_byte_is_detected_or_harmless():
    tensors = {"a": torch.arange(40, dtype=torch.float32).reshape(5, 8), "n": torch.tensor(3)}
    data = bytes(encode_record(Record("block", "k", tensors), "fp"))
    num_detected = 0
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            corrupt = bytearray(data)
            corrupt[i] ^= mask
            try:
                decoded = decode_record(bytes(corrupt), "fp", expected_key="k")
            except RecordError:
                num_detected += 1
                continue
            assert bitwise_equal(decoded.tensors, tensors), f"byte {i} changed content silently"
    assert num_detected > len(data)  # most flips are detected; the rest hit padding


def test_foreign_stale_misfiled_and_garbage_records_raise(monkeypatch):
    data = encode_record(Record("block", "k", {"x": torch.ones(2)}), "model-a")
    with pytest.raises(RecordError, match="foreign"):
        decode_record(data, "model-b")
    with pytest.raises(RecordError, match="misfiled"):
        decode_record(data, "model-a", expected_key="other")
    monkeypatch.setattr(record_module, "FORMAT_VERSION", FORMAT_VERSION + 1)
    newer = encode_record(Record("block", "k", {"x": torch.ones(2)}), "model-a")
    monkeypatch.setattr(record_module, "FORMAT_VERSION", FORMAT_VERSION)
    with pytest.raises(RecordError, match="stale"):
        decode_record(newer, "model-a")
    for garbage in (b"", b"not arrow at all", bytes(data)[: len(data) // 2]):
        with pytest.raises(RecordError):
            decode_record(garbage, "model-a")


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_record(Record("weird", "k", {}), "fp")
    with pytest.raises(ValueError):
        encode_record(Record("block", "k", {"c": torch.ones(2, dtype=torch.complex64)}), "fp")
    with pytest.raises(ValueError):
        encode_record(Record("block", "k", {}), "fp", checksum="md5")
    with pytest.raises(ValueError):
        encode_record(Record("block", "k", {"a\0b": torch.ones(2)}), "fp")


def test_unverified_views_and_specs_come_from_the_parse():
    tensors = {k: v.contiguous() for k, v in sample_tensors().items()}
    data = bytes(encode_record(Record("checkpoint", "ckey", tensors), "model-a"))
    lazy = decode_record(data, "model-a", expected_key="ckey", is_borrowed=True, verify=False)
    expected_specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    assert lazy.specs() == expected_specs and Record("checkpoint", "ckey", tensors).specs() == expected_specs
    views = lazy.tensor_views(verify=False)
    assert not lazy.is_verified  # nothing checked yet: the caller verifies before using the bytes
    start = np.frombuffer(data, np.uint8).ctypes.data
    assert all(start <= t.data_ptr() < start + len(data) for t in views.values() if t.numel())
    assert all(t.is_contiguous() for t in views.values())
    assert bitwise_equal(views, tensors) and bitwise_equal(lazy.tensors, tensors) and lazy.is_verified
