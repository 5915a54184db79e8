"""The one byte format of every tier below the device (Redis values, rows of disk segments).

Owns no state. A `Record` (a kind, its cache key and named tensors) is encoded as an Arrow IPC
stream holding exactly one record batch:

- columns: ``name`` (utf8), ``dtype`` (utf8, torch dtype name), ``shape`` (list<int64>),
  ``data`` (large_binary, the tensor's contiguous bytes, native little-endian, zero-padded to a
  multiple of 16 bytes so that decoded tensors are aligned views of one buffer);
- schema metadata: ``kv.format_version``, ``kv.fingerprint`` (model fingerprint), ``kv.kind``,
  ``kv.key`` and ``kv.checksum`` (``"<algo>:<hex>"``).

The checksum (checksum.py; default ``colsum64``) covers everything a reader relies on: kind,
key, fingerprint, every tensor's name, dtype and shape, and all tensor bytes. `decode_record`
verifies all of it and raises `RecordError` for anything corrupt, foreign (other model
fingerprint), stale (other format version) or misfiled (other key); callers turn that into a
miss and delete the record.

Decoding costs one Arrow IPC parse, three small column reads and one checksum pass per record,
whatever its size, and no per-byte Python work: with ``is_borrowed=True`` the record keeps a
read-only view of the given buffer (no copy; the caller copies what it keeps, see
`Record.owned`), and the restore path copies each tensor's bytes from there straight into the
state it assembles (`Record.byte_views`).

Format versions: 2 added the ``span`` kind and the ``rowcol64`` checksum; 3 made ``colsum64``
the default checksum and came with key scheme 2 (keys.py). Records of another version are
stale: a miss, deleted.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import torch

from kvcache import checksum as checksums
from kvcache import parse_cache
from kvcache.record_tensors import DTYPES, Slot, byte_view, contiguous_strides, dtype_name, strided_views

FORMAT_VERSION = 3
_ALIGN = 16  # every tensor starts at a multiple of this in the data buffer (zero padding)
CHECKSUM_ALGOS = checksums.ALGORITHMS
RECORD_KINDS = ("block", "span", "checkpoint", "index")

_META_VERSION = b"kv.format_version"
_META_FINGERPRINT = b"kv.fingerprint"
_META_KIND = b"kv.kind"
_META_KEY = b"kv.key"
_META_CHECKSUM = b"kv.checksum"

_MAX_ITEMSIZE = max(dtype.itemsize for dtype in DTYPES.values())  # a data region must start aligned to it
_SCHEMA_FIELDS = [
    pa.field("name", pa.utf8(), nullable=False),
    pa.field("dtype", pa.utf8(), nullable=False),
    pa.field("shape", pa.list_(pa.int64()), nullable=False),
    pa.field("data", pa.large_binary(), nullable=False),
]




class RecordError(Exception):
    """A record that must not be used: corrupt, foreign, stale or misfiled. Treat as a miss."""


class Record:
    """One cache entry: `kind` is "block", "span", "checkpoint" or "index"; `key` its cache key;
    `tensors` its named tensors.

    `is_borrowed`: the tensors are read-only views of someone else's buffer (a Redis value, a
    memory-mapped segment); never write them, and call `owned` before keeping them.

    A decoded record also keeps its data region as one uint8 array and each tensor's place in
    it (`byte_views`): the restore path copies bytes from there straight into the state it
    assembles, without building a torch view per tensor; `tensors` is then built on first use
    (one ``as_strided`` per tensor, strides made by the parse). `specs` (each tensor's dtype and
    shape) is made once per parse and shared, so the restore path checks a record's layout
    without building anything.
    A record decoded with ``verify=False`` holds its checksum check until `verify` runs it;
    `tensors`, `byte_views` and `owned` run it first (so its bytes are never used unchecked).
    """

    __slots__ = ("kind", "key", "is_borrowed", "_tensors", "_raw", "_slots", "_specs", "_check", "_address")

    def __init__(self, kind: str, key: str, tensors: dict[str, torch.Tensor] | None = None,
                 is_borrowed: bool = False):
        self.kind, self.key, self.is_borrowed = kind, key, is_borrowed
        self._tensors = {} if tensors is None else tensors
        self._raw: np.ndarray | None = None  # the data region (decoded records)
        self._slots: dict[str, Slot] | None = None
        self._specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = None  # (decoded records)
        self._check: tuple[str, bytes] | None = None  # (stored checksum, header) not yet verified
        self._address: int | None = None  # where `_raw` starts (decoded records; made on first use)

    @classmethod
    def _decoded(cls, kind: str, key: str, raw: np.ndarray, slots: dict, specs: dict, is_borrowed: bool,
                 check: tuple[str, bytes] | None = None, address: int | None = None) -> Record:
        record = cls(kind, key, None, is_borrowed)
        record._tensors, record._raw, record._slots, record._specs, record._check = None, raw, slots, specs, check
        record._address = address
        return record

    @property
    def is_verified(self) -> bool:
        return self._check is None

    def unverified_copy(self) -> Record:
        """A new record over the same bytes and parse whose checksum check is pending if this
        one's is (this record itself when it holds tensors): a restore plan keeps one taken at
        the lookup and hands out a copy of it per replay, so every replay verifies the bytes
        again (restore_plan.py)."""
        if self._slots is None:
            return self
        return Record._decoded(self.kind, self.key, self._raw, self._slots, self._specs, self.is_borrowed,
                               self._check, self._address)

    def verify(self, column_sums=None) -> None:
        """Run the checksum check `decode_record(..., verify=False)` left pending (once);
        raises `RecordError` if the bytes are corrupt. `column_sums`: the data region's
        colsum64 column sums, made by a pass that read the bytes for another purpose (see
        `fused_check`): the check then digests those instead of reading the bytes again."""
        if self._check is not None:
            if column_sums is None:
                _verify_checksum(*self._check, self._raw)
            elif not checksums.verify_column_sums(self._check[0], self._check[1], self._raw.nbytes // 8, column_sums):
                raise RecordError("checksum mismatch")
            self._check = None

    def fused_check(self) -> tuple[int, int, int] | None:
        """For a pending ``colsum64`` check: (the data region's address, its words, the row
        width), what a pass that sums the words while copying them needs (`verify` with
        ``column_sums``); None when nothing is pending or the check is another algorithm's
        (then `verify` reads the bytes itself)."""
        check = self._check
        if check is None or self._raw is None or not check[0].startswith("colsum64:") or self._raw.nbytes % 8:
            return None
        num_words = self._raw.nbytes // 8
        return self.address, num_words, checksums.col_words(num_words)

    @property
    def address(self) -> int:
        """Where a decoded record's data region starts in memory (the region stays alive while
        the record does)."""
        if self._address is None:
            self._address = self._raw.__array_interface__["data"][0]
        return self._address

    def slot_addresses(self) -> dict[str, int] | None:
        """Each tensor's first byte in memory (decoded records: the start of what `byte_views`
        views); None for a record holding tensors."""
        if self._slots is None:
            return None
        base = self.address
        return {name: base + slot[0] for name, slot in self._slots.items()}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self.verify()
            self._tensors = strided_views(self._raw, self._slots)  # shares the region (read-only if borrowed)
        return self._tensors

    def tensor_views(self, *, verify: bool = True) -> dict[str, torch.Tensor]:
        """`tensors`, or with ``verify=False`` views of the same bytes with a pending check left
        pending (not kept as `tensors`): call `verify` before their bytes are used (the deferred
        restore verifies each record right before copying its rows, see restore.py)."""
        if verify or self._slots is None or self._check is None:
            return self.tensors
        return strided_views(self._raw, self._slots)

    def specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Each tensor's (dtype, shape), from the parsed layout (no tensor built, no check run;
        read-only: a decoded record shares it)."""
        if self._specs is not None:  # made by the parse (shared by the records parsed from the same bytes)
            return self._specs
        return {name: (t.dtype, tuple(t.shape)) for name, t in self._tensors.items()}

    def byte_views(self, *, verify: bool = True) -> dict[str, tuple[np.ndarray, torch.dtype, tuple[int, ...]]]:
        """Each tensor as (its contiguous bytes as a uint8 array (a view, no copy), dtype, shape).
        With ``verify=False`` a pending check stays pending: call `verify` before reading them."""
        if verify:
            self.verify()
        if self._slots is not None:
            raw = self._raw
            return {name: (raw[lo:lo + nbytes], dtype, shape)
                    for name, (lo, nbytes, dtype, shape, _) in self._slots.items()}
        return {name: (byte_view(t.contiguous()), t.dtype, tuple(t.shape)) for name, t in self._tensors.items()}

    def row_blocks(self, *, verify: bool = True
                   ) -> dict[str, torch.Tensor | tuple[np.ndarray, torch.dtype, tuple[int, ...]]]:
        """What the deferred restore hands ``SequenceState.load`` as this record's row blocks:
        a decoded record's `byte_views` (no tensor built: one numpy slice each), else its
        `tensors` (a device-tier record's own tensors). ``verify=False`` as in `byte_views`."""
        if self._slots is not None:
            return self.byte_views(verify=verify)
        return self.tensor_views(verify=verify)

    @property
    def num_bytes(self) -> int:
        if self._slots is not None:
            return sum(slot[1] for slot in self._slots.values())
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def owned(self) -> Record:
        """This record with tensors in memory of its own (itself if they already are)."""
        self.verify()
        if not self.is_borrowed:
            return self
        if self._slots is not None:  # one copy of the whole region
            return Record._decoded(self.kind, self.key, self._raw.copy(), self._slots, self._specs, False)
        return Record(self.kind, self.key, {name: t.clone() for name, t in self._tensors.items()})

    def __repr__(self) -> str:
        return f"Record({self.kind!r}, {self.key!r}, {self.num_bytes} bytes, is_borrowed={self.is_borrowed})"


def _header_bytes(kind: str, key: str, fingerprint: str, names: list, dtypes: list, shapes: list, *,
                  version: str | None = None) -> bytes:
    """What the checksum covers besides the tensor bytes. Unambiguous: no field holds a NUL
    (`encode_record` refuses them), the name count is explicit and shapes print as a list.
    `version`: the record's (a reader uses only records of its own `FORMAT_VERSION`)."""
    fields = [str(FORMAT_VERSION) if version is None else version, kind, key, fingerprint, str(len(names)), *names, *dtypes, repr(shapes)]
    return "\0".join(fields).encode()


def encode_record(record: Record, fingerprint: str, *, checksum: str = checksums.DEFAULT_ALGORITHM
                  ) -> pa.Buffer:
    """Serialize `record` (bytes-like `pa.Buffer`; `memoryview(buf)` is zero-copy)."""
    if record.kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {record.kind!r}")
    if checksum not in CHECKSUM_ALGOS:
        raise ValueError(f"checksum must be one of {CHECKSUM_ALGOS}, got {checksum!r}")
    names = list(record.tensors)
    parts = [byte_view(record.tensors[name].contiguous()) for name in names]
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
                  is_borrowed: bool = False, verify: bool = True) -> Record:
    """Parse and verify record bytes (bytes, memoryview or `pa.Buffer`).

    The tensors are fresh copies, or with `is_borrowed` read-only views of `data` (which they
    keep alive). Raises `RecordError` if the bytes are corrupt, the format version or fingerprint
    differ, or the record's key is not `expected_key`. With ``verify=False`` (and `is_borrowed`)
    everything but the checksum pass over the tensor bytes is checked here, and that pass waits
    for `Record.verify` (which the record's accessors run first): a caller that copies the bytes
    right after verifying them reads them from cache.
    """
    try:
        return _decode(data, fingerprint, expected_key, is_borrowed, verify or not is_borrowed)
    except RecordError:
        raise
    except Exception as exc:  # untrusted bytes: any inconsistency is a corrupt record
        raise RecordError(f"inconsistent record: {exc}") from exc


def _verify_checksum(stored: str, header: bytes, raw: np.ndarray) -> None:
    try:
        is_intact = checksums.verify(stored, header, raw)
    except ValueError as exc:
        raise RecordError(f"bad checksum field {stored!r}: {exc}") from exc
    if not is_intact:
        raise RecordError("checksum mismatch")


def _decode(data, fingerprint: str, expected_key: str | None, is_borrowed: bool, verify: bool) -> Record:
    view = memoryview(data).cast("B")  # bytes, memoryview or pa.Buffer: no copy
    framing = parse_cache.framing(view)
    parsed = parse_cache.CACHE.get(framing, view)
    if parsed is not None:  # the same framing bytes as a record parsed before (parse_cache.py)
        raw = np.frombuffer(view, dtype=np.uint8)[parsed.data_start:parsed.data_end]
        address = data.address + parsed.data_start if type(data) is pa.Buffer else raw.__array_interface__["data"][0]
        if address % _MAX_ITEMSIZE:  # misaligned for a tensor view: parse
            parsed = None
    if parsed is None:
        parsed, raw = _parse(data, view)
        address = raw.__array_interface__["data"][0]
        start = parse_cache.offset_in(np.frombuffer(view, dtype=np.uint8), address)
        if start is not None:  # Arrow used the bytes in place (it did not copy them to align them)
            parse_cache.CACHE.put(framing, view, dataclasses.replace(parsed, data_start=start,
                                                                     data_end=start + raw.nbytes))
    if parsed.version != str(FORMAT_VERSION):
        raise RecordError(f"stale record: format version {parsed.version}, expected {FORMAT_VERSION}")
    if parsed.fingerprint != fingerprint:
        raise RecordError(f"foreign record: fingerprint {parsed.fingerprint!r}")
    if expected_key is not None and parsed.key != expected_key:
        raise RecordError(f"misfiled record: holds key {parsed.key!r}, stored under {expected_key!r}")
    check = (parsed.stored_checksum, parsed.header)
    if verify:
        _verify_checksum(*check, raw)
    if not is_borrowed:  # one copy of all tensor bytes
        raw = raw.copy()
    return Record._decoded(parsed.kind, parsed.key, raw, parsed.slots, parsed.specs, is_borrowed,
                           None if verify else check, address if is_borrowed else None)


def _parse(data, view: memoryview) -> tuple[parse_cache.Parsed, np.ndarray]:
    """Everything of a record's bytes but its data (version, fingerprint and key unchecked) and
    the data region as a uint8 view; RecordError if they do not hold a well-formed record."""
    batch = _read_batch(data)
    meta = batch.schema.metadata or {}
    version = meta.get(_META_VERSION, b"?").decode(errors="replace")
    record_fingerprint = meta.get(_META_FINGERPRINT, b"").decode(errors="replace")
    kind = meta.get(_META_KIND, b"").decode(errors="replace")
    key = meta.get(_META_KEY, b"").decode(errors="replace")
    if kind not in RECORD_KINDS:
        raise RecordError(f"unknown record kind {kind!r}")
    columns = batch.columns
    names = columns[0].to_pylist()
    dtypes = columns[1].to_pylist()
    shapes = columns[2].to_pylist()
    column = columns[3]
    _, offset_buffer, payload = column.buffers()
    offsets = np.frombuffer(offset_buffer, dtype=np.int64, count=len(column) + 1,
                            offset=8 * column.offset).tolist()
    start, end = offsets[0], offsets[-1]
    region = np.frombuffer(payload if payload is not None else b"", dtype=np.uint8)
    if not 0 <= start <= end <= len(region):
        raise RecordError(f"data offsets [{start}, {end}) outside the {len(region)}-byte buffer")
    raw = region[start:end]
    if any("\0" in name for name in names):
        raise RecordError("NUL in a tensor name")
    header = _header_bytes(kind, key, record_fingerprint, names, dtypes, shapes, version=version)
    stored = meta.get(_META_CHECKSUM, b"").decode(errors="replace")
    if stored.partition(":")[0] not in CHECKSUM_ALGOS:
        raise RecordError(f"bad checksum field {stored!r}")
    slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
    for i, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes)):
        torch_dtype = DTYPES.get(dtype)
        if torch_dtype is None or name in slots or min(shape, default=0) < 0:
            raise RecordError(f"bad tensor spec {name!r} {dtype!r} {shape!r}")
        nbytes = math.prod(shape) * torch_dtype.itemsize
        lo, hi = offsets[i] - start, offsets[i + 1] - start
        if lo % _ALIGN or not hi - _ALIGN < lo + nbytes <= hi:
            raise RecordError(f"tensor {name!r}: {nbytes} bytes do not fit its {hi - lo}-byte slot")
        slots[name] = (lo, nbytes, torch_dtype, tuple(shape), contiguous_strides(shape))
    specs = {name: (dtype, shape) for name, (_, _, dtype, shape, _) in slots.items()}
    parsed = parse_cache.Parsed(version, record_fingerprint, kind, key, stored, header, slots, specs, 0, raw.nbytes)
    return parsed, raw
