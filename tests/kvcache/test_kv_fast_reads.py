"""The restore path's fast reads: the record parse cache (parse_cache.py: a record is parsed
again unless every byte its parse depends on is unchanged; the checksum still runs over the
data) and the Redis tier's own MGET reader (resp_reader.py: the values redis-py would return,
read into pooled memory; failures look like redis-py's)."""

import dataclasses

import numpy as np
import pytest
import redis
import torch

from kvcache import parse_cache
from kvcache.record import Record, RecordError, decode_record, encode_record
from kvcache.redis_tier import RedisTier, make_client
from kvcache.resp_reader import MIN_ARENA_VALUE_BYTES, MGetReader
from kvcache.synthetic import bitwise_equal

FP = "fast-reads-fp"


def span_bytes(key="s1", seed=0, num_rows=64) -> tuple[bytes, dict]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {"a": torch.randn(num_rows, 64, generator=gen), "b": torch.randn(3, 5, generator=gen).bfloat16()}
    return bytes(encode_record(Record("span", key, tensors), FP)), tensors


# -- parse cache -------------------------------------------------------------------------------

def test_a_cached_parse_gives_the_exact_record_and_still_verifies_the_data():
    data, tensors = span_bytes()
    parse_cache.CACHE.clear()
    first = decode_record(data, FP, expected_key="s1", is_borrowed=True, verify=False)
    hits = parse_cache.CACHE.num_hits
    for form in (bytes(data), bytearray(data), memoryview(data)):  # another buffer, same bytes
        again = decode_record(form, FP, expected_key="s1", is_borrowed=True, verify=False)
        assert again.kind == "span" and again.key == "s1" and bitwise_equal(again.tensors, tensors)
        start = np.frombuffer(form, np.uint8).ctypes.data
        assert all(start <= t.data_ptr() < start + len(data) for t in again.tensors.values())  # borrowed
    assert parse_cache.CACHE.num_hits == hits + 3
    assert bitwise_equal(first.tensors, tensors)
    corrupt = bytearray(data)
    corrupt[data.find(tensors["a"][7].numpy().tobytes()) + 3] ^= 0x01  # data only: the parse is reused
    lazy = decode_record(bytes(corrupt), FP, expected_key="s1", is_borrowed=True, verify=False)
    assert parse_cache.CACHE.num_hits == hits + 4
    with pytest.raises(RecordError, match="checksum"):
        lazy.verify()
    with pytest.raises(RecordError, match="checksum"):
        decode_record(bytes(corrupt), FP, expected_key="s1")


def test_the_caller_checks_run_on_a_cached_parse():
    data, _ = span_bytes()
    decode_record(data, FP, expected_key="s1")
    with pytest.raises(RecordError, match="foreign"):
        decode_record(data, "other-model", expected_key="s1")
    with pytest.raises(RecordError, match="misfiled"):
        decode_record(data, FP, expected_key="s2")


def test_changed_framing_body_or_length_is_parsed_again():
    data, tensors = span_bytes()
    decode_record(data, FP, expected_key="s1")
    misses = parse_cache.CACHE.num_misses
    view = memoryview(data)
    framing = parse_cache.framing(view)
    assert framing is not None and data.startswith(framing)
    shapes_at = data.find(b"\x40\x00\x00\x00\x00\x00\x00\x00", len(framing))  # 64 rows, a shape value
    assert shapes_at > 0
    body = bytearray(data)
    body[shapes_at] = 0x3f  # 63 rows: a different parse (and a misplaced tensor)
    with pytest.raises(RecordError):
        decode_record(bytes(body), FP, expected_key="s1")
    assert parse_cache.CACHE.num_misses == misses + 1
    longer = data + b"\0" * 8  # trailing bytes: parsed again (and still the same record)
    assert bitwise_equal(decode_record(longer, FP, expected_key="s1").tensors, tensors)
    assert parse_cache.CACHE.num_misses == misses + 2
    header = bytearray(data)
    header[data.find(b"s1")] = ord("t")  # the key in the schema metadata
    with pytest.raises(RecordError):
        decode_record(bytes(header), FP, expected_key="s1")


def test_the_cache_is_bounded_and_ignores_what_is_not_a_stream():
    cache = parse_cache.ParseCache(max_entries=2)
    data, _ = span_bytes()
    decode_record(data, FP)
    parsed = parse_cache.CACHE.get(parse_cache.framing(memoryview(data)), memoryview(data))
    for seed in range(3):
        cache.put(bytes([seed]) * 16, memoryview(b"\0" * 64), dataclasses.replace(parsed, data_start=16, data_end=32))
    assert len(cache) == 2
    assert parse_cache.framing(memoryview(b"not an arrow stream")) is None
    with pytest.raises(RecordError):
        decode_record(b"\xff\xff\xff\xff\x08\x00\x00\x00" + b"\0" * 8, FP)


# -- MGET reader -------------------------------------------------------------------------------

SIZES = [0, 1, 100, MIN_ARENA_VALUE_BYTES - 1, MIN_ARENA_VALUE_BYTES, 3 << 20, 70_000]


def test_mget_returns_what_redis_py_returns(redis_url, redis_prefix, redis_client):
    rng = np.random.default_rng(0)
    values = {f"{redis_prefix}{i}".encode(): rng.integers(0, 256, size, dtype=np.uint8).tobytes()
              for i, size in enumerate(SIZES)}
    values[f"{redis_prefix}crlf".encode()] = b"\r\n" * 40_000  # terminators inside a value
    redis_client.mset(values)
    keys = list(values) + [f"{redis_prefix}absent".encode()]
    reader = MGetReader(make_client(redis_url))
    for _ in range(2):  # the second call reuses the connection
        got = reader.mget([keys[:3], keys[3:]])  # two pipelined MGETs
        assert len(got) == len(keys) and got[-1] is None
        assert [bytes(v) for v in got[:-1]] == [redis_client.get(k) for k in keys[:-1]]
        assert all(isinstance(v, memoryview) and v.readonly for v, k in zip(got, keys)
                   if k in values and len(values[k]) >= MIN_ARENA_VALUE_BYTES)
    reader.close()


def test_mget_reconnects_after_the_server_closed_the_connection(redis_url, redis_prefix, redis_client):
    redis_client.set(redis_prefix + "a", b"x" * 100)
    reader = MGetReader(make_client(redis_url))
    assert reader.mget([[(redis_prefix + "a").encode()]]) == [b"x" * 100]
    redis_client.client_kill_filter(_type="normal", skipme=True)  # kills the reader's connection too
    assert reader.mget([[(redis_prefix + "a").encode()]]) == [b"x" * 100]
    reader.close()


def test_mget_errors_are_redis_errors_and_drop_the_connection(redis_url, redis_prefix, redis_client):
    redis_client.set(redis_prefix + "a", b"x")
    reader = MGetReader(make_client(redis_url))
    with pytest.raises(redis.exceptions.ResponseError):
        reader.mget([[]])  # MGET without keys: an error reply
    assert reader.mget([[(redis_prefix + "a").encode()]]) == [b"x"]
    reader.close()


def test_the_redis_tier_reads_through_the_reader_and_values_survive_the_next_read(redis_url, redis_prefix):
    tier = RedisTier(redis_url, budget_bytes=1 << 30, prefix=redis_prefix)
    big = [np.full(200_000, i, np.uint8).tobytes() for i in range(3)]
    tier.put_many([(f"k{i}", value) for i, value in enumerate(big)])
    first = tier.get_many(["k0", "k1", "k2", "missing"])
    second = tier.get_many(["k2", "k1", "k0"])  # a new arena while `first` still holds its own
    assert [bytes(v) for v in first[:3]] == big and first[3] is None
    assert [bytes(v) for v in second] == big[::-1]
    assert tier.num_records == 3
    tier.close()
