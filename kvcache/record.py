"""The one byte format of every tier below the device (Redis values, rows of disk segments).

Owns no state. A `Record` (a kind, its cache key and named tensors) is encoded as an Arrow IPC
stream holding exactly one record batch:

- columns: ``name`` (utf8), ``dtype`` (utf8, torch dtype name), ``shape`` (list<int64>),
  ``data`` (large_binary, the tensor's contiguous bytes, native little-endian, zero-padded to a
  multiple of 16 bytes so that decoded tensors are aligned views of one buffer);
- schema metadata: ``kv.format_version``, ``kv.fingerprint`` (model fingerprint), ``kv.kind``,
  ``kv.key`` and ``kv.checksum`` (``"<algo>:<hex>"``).

The checksum (checksum.py; default ``rowcol64``) covers everything a reader relies on: kind,
key, fingerprint, every tensor's name, dtype and shape, and all tensor bytes. `decode_record`
verifies all of it and raises `RecordError` for anything corrupt, foreign (other model
fingerprint), stale (other format version) or misfiled (other key); callers turn that into a
miss and delete the record.

Decoding costs one Arrow IPC parse and two small column reads per record, whatever its size, and
no per-byte Python work: with ``is_borrowed=True`` the tensors are read-only views of the given
buffer (no copy; the caller copies what it keeps, see `Record.owned`).

Format versions: 2 added the ``span`` kind and the ``rowcol64`` checksum (version-1 records are
stale: a miss, deleted).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from kvcache import checksum as checksums

FORMAT_VERSION = 2
_ALIGN = 16  # every tensor starts at a multiple of this in the data buffer (zero padding)
CHECKSUM_ALGOS = checksums.ALGORITHMS
RECORD_KINDS = ("block", "span", "checkpoint", "index")

_META_VERSION = b"kv.format_version"
_META_FINGERPRINT = b"kv.fingerprint"
_META_KIND = b"kv.kind"
_META_KEY = b"kv.key"
_META_CHECKSUM = b"kv.checksum"

_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.float8_e4m3fn, torch.float8_e5m2,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}
_SCHEMA_FIELDS = [
    pa.field("name", pa.utf8(), nullable=False),
    pa.field("dtype", pa.utf8(), nullable=False),
    pa.field("shape", pa.list_(pa.int64()), nullable=False),
    pa.field("data", pa.large_binary(), nullable=False),
]


with warnings.catch_warnings():  # torch warns once per process about read-only buffers; borrowed
    warnings.simplefilter("ignore")  # tensors are never written, so spend that warning here
    torch.from_numpy(np.frombuffer(b"\0" * 8, dtype=np.uint8))


class RecordError(Exception):
    """A record that must not be used: corrupt, foreign, stale or misfiled. Treat as a miss."""


@dataclass
class Record:
    """One cache entry: `kind` is "block", "span", "checkpoint" or "index"; `key` its cache key.

    `is_borrowed`: the tensors are read-only views of someone else's buffer (a Redis value, a
    memory-mapped segment); never write them, and call `owned` before keeping them.
    """

    kind: str
    key: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    is_borrowed: bool = False

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def owned(self) -> Record:
        """This record with tensors in memory of its own (itself if they already are)."""
        if not self.is_borrowed:
            return self
        return Record(self.kind, self.key, {name: t.clone() for name, t in self.tensors.items()})


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {dtype}")
    return name


def _byte_view(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous tensor as a uint8 numpy view (no copy)."""
    return tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy()


def _header_bytes(kind: str, key: str, fingerprint: str, names: list, dtypes: list, shapes: list) -> bytes:
    """What the checksum covers besides the tensor bytes. Unambiguous: no field holds a NUL
    (`encode_record` refuses them), the name count is explicit and shapes print as a list."""
    fields = [str(FORMAT_VERSION), kind, key, fingerprint, str(len(names)), *names, *dtypes, repr(shapes)]
    return "\0".join(fields).encode()


def encode_record(record: Record, fingerprint: str, *, checksum: str = checksums.DEFAULT_ALGORITHM
                  ) -> pa.Buffer:
    """Serialize `record` (bytes-like `pa.Buffer`; `memoryview(buf)` is zero-copy)."""
    if record.kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {record.kind!r}")
    if checksum not in CHECKSUM_ALGOS:
        raise ValueError(f"checksum must be one of {CHECKSUM_ALGOS}, got {checksum!r}")
    names = list(record.tensors)
    parts = [_byte_view(record.tensors[name].contiguous()) for name in names]
    sizes = [-(-p.nbytes // _ALIGN) * _ALIGN for p in parts]  # each element padded to _ALIGN
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = np.zeros(int(offsets[-1]), dtype=np.uint8)
    for part, start in zip(parts, offsets[:-1]):
        data[start:start + part.nbytes] = part
    dtypes = [dtype_name(record.tensors[n].dtype) for n in names]
    shapes = [list(record.tensors[n].shape) for n in names]
    if any("\0" in text for text in (record.key, fingerprint, *names)):
        raise ValueError("keys, fingerprints and tensor names must not contain NUL")
    header = _header_bytes(record.kind, record.key, fingerprint, names, dtypes, shapes)
    metadata = {
        _META_VERSION: str(FORMAT_VERSION).encode(),
        _META_FINGERPRINT: fingerprint.encode(),
        _META_KIND: record.kind.encode(),
        _META_KEY: record.key.encode(),
        _META_CHECKSUM: checksums.compute(checksum, header, memoryview(data)).encode(),
    }
    schema = pa.schema(_SCHEMA_FIELDS, metadata=metadata)
    data_column = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(names), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    batch = pa.record_batch(
        [
            pa.array(names, pa.utf8()),
            pa.array(dtypes, pa.utf8()),
            pa.array(shapes, pa.list_(pa.int64())),
            data_column,
        ],
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


_SCHEMA = pa.schema(_SCHEMA_FIELDS)


def _contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


def _read_batch(data) -> pa.RecordBatch:
    try:
        buffer = data if isinstance(data, pa.Buffer) else pa.py_buffer(data)
        reader = pa.BufferReader(buffer)  # the stream's first two messages: schema, then the batch
        schema = pa.ipc.read_schema(pa.ipc.read_message(reader))
        if not schema.equals(_SCHEMA, check_metadata=False):
            raise RecordError("unexpected record schema")
        batch = pa.ipc.read_record_batch(pa.ipc.read_message(reader), schema)
        batch.validate(full=True)
        return batch
    except RecordError:
        raise
    except Exception as exc:  # any parse failure of untrusted bytes is a corrupt record
        raise RecordError(f"unreadable record: {exc}") from exc


def decode_record(data, fingerprint: str, *, expected_key: str | None = None,
                  is_borrowed: bool = False) -> Record:
    """Parse and verify record bytes (bytes, memoryview or `pa.Buffer`).

    The tensors are fresh copies, or with `is_borrowed` read-only views of `data` (which they
    keep alive). Raises `RecordError` if the bytes are corrupt, the format version or fingerprint
    differ, or the record's key is not `expected_key`.
    """
    try:
        return _decode(data, fingerprint, expected_key, is_borrowed)
    except RecordError:
        raise
    except Exception as exc:  # untrusted bytes: any inconsistency is a corrupt record
        raise RecordError(f"inconsistent record: {exc}") from exc


def _decode(data, fingerprint: str, expected_key: str | None, is_borrowed: bool) -> Record:
    batch = _read_batch(data)
    meta = batch.schema.metadata or {}
    version = meta.get(_META_VERSION, b"?").decode(errors="replace")
    if version != str(FORMAT_VERSION):
        raise RecordError(f"stale record: format version {version}, expected {FORMAT_VERSION}")
    record_fingerprint = meta.get(_META_FINGERPRINT, b"").decode(errors="replace")
    if record_fingerprint != fingerprint:
        raise RecordError(f"foreign record: fingerprint {record_fingerprint!r}")
    kind = meta.get(_META_KIND, b"").decode(errors="replace")
    key = meta.get(_META_KEY, b"").decode(errors="replace")
    if kind not in RECORD_KINDS:
        raise RecordError(f"unknown record kind {kind!r}")
    if expected_key is not None and key != expected_key:
        raise RecordError(f"misfiled record: holds key {key!r}, stored under {expected_key!r}")
    names = batch.column(0).to_pylist()
    dtypes = batch.column(1).to_pylist()
    shapes = batch.column(2).to_pylist()
    column = batch.column(3)
    offsets = np.frombuffer(
        column.buffers()[1], dtype=np.int64, count=len(column) + 1, offset=8 * column.offset
    ).tolist()
    payload = column.buffers()[2]
    start, end = offsets[0], offsets[-1]
    view = memoryview(payload if payload is not None else b"")[start:end]
    if any("\0" in name for name in names):
        raise RecordError("NUL in a tensor name")
    header = _header_bytes(kind, key, record_fingerprint, names, dtypes, shapes)
    stored = meta.get(_META_CHECKSUM, b"").decode(errors="replace")
    try:
        is_intact = checksums.verify(stored, header, view)
    except ValueError as exc:
        raise RecordError(f"bad checksum field {stored!r}: {exc}") from exc
    if not is_intact:
        raise RecordError("checksum mismatch")
    raw = np.frombuffer(view, dtype=np.uint8)
    if is_borrowed:
        base = torch.from_numpy(raw)  # read-only view; the numpy array keeps `data` alive
    else:
        base = torch.empty(end - start, dtype=torch.uint8)  # one copy of all tensor bytes
        base.numpy()[:] = raw
    typed: dict[torch.dtype, torch.Tensor] = {}  # the data region viewed as each dtype (a 16-multiple)
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes)):
        torch_dtype = _DTYPES.get(dtype)
        if torch_dtype is None or name in tensors or min(shape, default=0) < 0:
            raise RecordError(f"bad tensor spec {name!r} {dtype!r} {shape!r}")
        itemsize = torch_dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        lo, hi = offsets[i] - start, offsets[i + 1] - start
        if lo % _ALIGN or not hi - _ALIGN < lo + nbytes <= hi:
            raise RecordError(f"tensor {name!r}: {nbytes} bytes do not fit its {hi - lo}-byte slot")
        if torch_dtype not in typed:
            typed[torch_dtype] = base.view(torch_dtype)
        tensors[name] = typed[torch_dtype].as_strided(shape, _contiguous_strides(shape), lo // itemsize)
    return Record(kind=kind, key=key, tensors=tensors, is_borrowed=is_borrowed)
