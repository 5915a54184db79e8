"""Checkpoint reading: safetensors files (one, or sharded with model.safetensors.index.json).

Owns: the index from canonical tensor names to where their bytes are, and reading them
(memory-mapped through safetensors' `safe_open`; a slice reads only its rows) with FP8 / FP4
dequantization. Readers ask for exactly the tensors they need, so an expert shard never touches
other experts' bytes. Every failure raises CheckpointError naming the file and the tensor.
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors import safe_open

from . import quant
from .names import EXPERT, IGNORED, PACKED_DOWN, PACKED_GATE_UP, canonical


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (missing / unknown / mis-shaped tensor, bad file)."""


@dataclass(frozen=True)
class TensorRef:
    file: str             # absolute path of the .safetensors file
    key: str              # the name inside that file
    packed_index: int = -1  # for packed experts: which expert row; -1 otherwise
    packed_part: str = ""   # "w1" / "w3" (halves of gate_up_proj) or "w2" (down_proj)


class CheckpointReader:
    """Canonical name -> TensorRef for every tensor of a checkpoint directory."""

    def __init__(self, path: str, progress: Callable[[int, int], None] | None = None):
        self.path = path
        files = self._list_files(path)
        # progress(bytes read so far, bytes of all files): a loader's progress bar hook
        self.progress = progress
        self.num_bytes_read = 0
        self.num_file_bytes = sum(os.path.getsize(f) for f in files)
        self._handles: dict[str, object] = {}
        self.refs: dict[str, TensorRef] = {}
        for f in files:
            try:
                handle = safe_open(f, framework="pt")
            except Exception as e:  # truncated / not safetensors
                raise CheckpointError(f"{f}: cannot open as safetensors ({e})") from None
            for key in handle.keys():
                if any(p.search(key) for p in IGNORED):
                    continue
                self._add(f, key, handle)
            del handle

    def _handle(self, file: str):
        """The open (memory-mapped) file; reopened after `release()`."""
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(file, framework="pt")
        return handle

    def release(self) -> None:
        """Unmap every file and hand freed heap pages back to the OS. Pages of a mapped checkpoint
        count as resident memory while mapped, and glibc keeps freed dequantization temporaries in
        its arenas, so loaders release after each batch of reads to keep peak memory near the
        loaded weights."""
        self._handles.clear()
        _malloc_trim()

    @staticmethod
    def _list_files(path: str) -> list[str]:
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index file ({e})") from None
            files = sorted({os.path.join(path, f) for f in weight_map.values()})
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise CheckpointError(f"{index}: lists missing file(s) {[os.path.basename(m) for m in missing]}")
            return files
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files")
        return files

    def _add(self, f: str, key: str, handle) -> None:
        name = canonical(key)
        m_gu, m_down = PACKED_GATE_UP.match(name), PACKED_DOWN.match(name)
        if m_gu or m_down:
            num_experts = handle.get_slice(key).get_shape()[0]
            prefix = (m_gu or m_down).group(1)
            for e in range(num_experts):
                for part in (("w1", "w3") if m_gu else ("w2",)):
                    self._put(f"{prefix}.{e}.{part}.weight", TensorRef(f, key, e, part), f)
            return
        self._put(name, TensorRef(f, key), f)

    def _put(self, name: str, ref: TensorRef, f: str) -> None:
        if name in self.refs:
            raise CheckpointError(f"{f}: tensor {name!r} appears twice (also in {self.refs[name].file})")
        self.refs[name] = ref

    def names(self) -> list[str]:
        return list(self.refs)

    def shape(self, name: str) -> tuple[int, ...]:
        ref = self._ref(name)
        shape = tuple(self._handle(ref.file).get_slice(ref.key).get_shape())
        if ref.packed_index < 0:
            return shape
        if ref.packed_part == "w2":
            return shape[1:]
        return (shape[1] // 2, shape[2])

    def _ref(self, name: str) -> TensorRef:
        ref = self.refs.get(name)
        if ref is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} missing from the checkpoint")
        return ref

    def read_raw(self, name: str) -> torch.Tensor:
        """The stored tensor (packed experts sliced to one expert), without dequantization."""
        ref = self._ref(name)
        try:
            sl = self._handle(ref.file).get_slice(ref.key)
            if ref.packed_index < 0:
                t = sl[:]
            else:
                t = sl[ref.packed_index]                 # reads only this expert's rows
                if ref.packed_part != "w2":
                    half = t.shape[0] // 2
                    t = t[:half] if ref.packed_part == "w1" else t[half:]
            self._count(t.numel() * t.element_size())
            return t
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{ref.file}: cannot read tensor {ref.key!r} ({e})") from None

    def _count(self, num_bytes: int) -> None:
        self.num_bytes_read += num_bytes
        if self.progress is not None:
            self.progress(min(self.num_bytes_read, self.num_file_bytes), self.num_file_bytes)

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A weight as `dtype`, FP8 (block scales) and FP4 (packed, per-32 scales) dequantized."""
        raw = self.read_raw(name)
        scale_name = name[: -len(".weight")] + ".scale" if name.endswith(".weight") else None
        ref = self.refs[name]
        try:
            if raw.dtype == torch.float8_e4m3fn:
                if scale_name not in self.refs:
                    raise CheckpointError(f"{ref.file}: FP8 tensor {ref.key!r} has no scale tensor")
                return quant.dequantize_fp8_block(raw, self.read_raw(scale_name), dtype=dtype)
            if raw.dtype in (torch.int8, torch.uint8) and scale_name in self.refs:
                return quant.dequantize_fp4(raw, self.read_raw(scale_name), dtype=dtype)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{ref.file}: cannot dequantize {ref.key!r} ({e})") from None
        if raw.dtype.is_floating_point:
            return raw.to(dtype)
        return raw

    def expert_names(self) -> list[str]:
        return [n for n in self.refs if EXPERT.match(n)]
