"""Parse cache of record framing: a record whose bytes before its tensor data equal, byte for
byte, those of a record parsed before is not parsed again (record.py's restore fast path).

Owns: `CACHE`, this process's bounded LRU of parses (thread-safe). Why: parsing a record (an
Arrow IPC stream: schema message, batch message, the name / dtype / shape / offset columns)
costs ~25 us of Python and Arrow calls whatever the record's size, about as much as copying
1 MB, so on a restore of many MB-sized records it is a large share of the time; a record served
again (an agent loop, a resent prompt, every router of a cluster reading the same Redis value)
would repeat the same parse of the same bytes.

Soundness: the parse of a record is a function of its bytes before the data payload (the
`framing` below plus the `body_head`: the other columns' buffers and the payload offsets) and of
its total length; the payload is opaque to it. An entry is used only if both are equal to the
bytes parsed then, so it is exactly the parse the bytes would get now: same key, metadata,
checksum field, shapes and places. It never skips the checksum pass over the data (the caller
runs it on the bytes in hand) nor any check that depends on the caller (fingerprint, key,
version); a record that fails to parse is never cached.

Framing of an Arrow IPC stream (format >= 0.15): each message is ``0xFFFFFFFF``, a little-endian
int32 metadata length, the flatbuffer metadata, then its body. A record is the schema message
(no body) then the batch message, so `framing` is ``[0, 16 + len1 + len2)``: both flatbuffers,
with the schema's key-value metadata (key, fingerprint, checksum) in the first. The body starts
right after it.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

MAX_ENTRIES = 4096     # about 1-2 KiB of framing each: a few MiB at most
MAX_FRAMING_BYTES = 1 << 16
_CONTINUATION = 0xFFFFFFFF
_PREFIX = struct.Struct("<Ii")  # a message's continuation marker and metadata length


@dataclass(frozen=True)
class Parsed:
    """What record.py reads from a record's bytes besides the payload; positions are byte
    offsets from the start of the stream. Immutable: shared by every record parsed from it."""
    version: str
    fingerprint: str
    kind: str
    key: str
    stored_checksum: str
    header: bytes                                  # what the checksum digests besides the data
    slots: dict                                    # name -> record.Slot: (lo, nbytes, dtype, shape, strides)
    specs: dict                                    # name -> (dtype, shape)
    data_start: int                                # the data region: [data_start, data_end)
    data_end: int


@dataclass(frozen=True)
class _Entry:
    total_bytes: int
    body_head: bytes                               # bytes [len(framing), body_head_end)
    parsed: Parsed


def framing(view: memoryview) -> bytes | None:
    """The schema and batch message headers of an Arrow IPC stream (a 1-D byte view), or None
    if the bytes do not start like one (then the full parse decides what they are)."""
    if view.nbytes < 8:
        return None
    continuation, length = _PREFIX.unpack_from(view, 0)
    end = 8 + length
    if continuation != _CONTINUATION or not 8 <= end <= min(view.nbytes - 8, MAX_FRAMING_BYTES):
        return None
    continuation, length = _PREFIX.unpack_from(view, end)
    end += 8 + length
    if continuation != _CONTINUATION or not 16 <= end <= min(view.nbytes, MAX_FRAMING_BYTES):
        return None
    return view[:end].tobytes()


class ParseCache:
    """framing bytes -> (total length, body head bytes, parse); least recently used evicted."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.num_hits = self.num_misses = 0

    def get(self, key: bytes | None, view: memoryview) -> Parsed | None:
        """The cached parse of the record in `view` whose `framing` is `key`, if every byte it
        depends on is unchanged."""
        if key is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        head_end = len(key) + len(entry.body_head) if entry is not None else 0
        if (entry is None or view.nbytes != entry.total_bytes
                or view[len(key):head_end].tobytes() != entry.body_head):  # (bytes compare: memcmp)
            self.num_misses += 1
            return None
        self.num_hits += 1
        return entry.parsed

    def put(self, key: bytes | None, view: memoryview, parsed: Parsed) -> None:
        """Remember `parsed`, the parse of `view` (whose data region must follow its framing)."""
        if key is None or not len(key) <= parsed.data_start <= parsed.data_end <= view.nbytes:
            return
        entry = _Entry(view.nbytes, view[len(key):parsed.data_start].tobytes(), parsed)
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def offset_in(view_array: np.ndarray, inner_address: int) -> int | None:
    """Where `inner_address` lies in the buffer of `view_array` (a uint8 array), or None if
    outside (e.g. Arrow copied a buffer to align it)."""
    start = view_array.__array_interface__["data"][0]
    offset = inner_address - start
    return offset if 0 <= offset <= view_array.nbytes else None


CACHE = ParseCache()
