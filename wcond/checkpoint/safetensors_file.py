"""Safetensors files: the header read and checked once (safetensors_header), each tensor read from
its byte range on demand."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import torch

from wcond.checkpoint.base import Checkpoint, TensorInfo
from wcond.checkpoint.names import natural_key
from wcond.checkpoint.safetensors_header import (
    SafetensorsEntry,
    SafetensorsHeader,
    bad,
    read_header,
)
from wcond.errors import CheckpointError, show_key, show_path

__all__ = ["TORCH_DTYPES", "SafetensorsCheckpoint", "read_tensor"]

# safetensors dtype -> torch dtype (None where torch has none)
TORCH_DTYPES: dict[str, torch.dtype | None] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F4": None,
    "F6_E2M3": None,
    "F6_E3M2": None,
}


class SafetensorsCheckpoint(Checkpoint):
    """A safetensors file: its header read and checked once, each tensor read from its byte range on demand."""

    format = "safetensors"

    def __init__(self, path: Path, header: SafetensorsHeader):
        # safetensors does not keep the model's order (writers sort keys); natural order puts
        # "layers.2" before "layers.10", the closest thing to the model's own order.
        infos = {key: _info(header.entries[key]) for key in sorted(header.entries, key=natural_key)}
        super().__init__(path, [path], infos, metadata=header.metadata)
        self._header = header

    @classmethod
    def probe(cls, path: Path, head: bytes = b"", size: int = 0) -> bool:
        """An 8-byte header length and a JSON object after it; a length past the file's end is
        reported as a truncated safetensors file."""
        if len(head) < 9 or head[8:9] != b"{":
            return False
        (n,) = struct.unpack("<Q", head[:8])
        if n > size - 8:
            raise CheckpointError(
                f"{show_path(path)}: truncated safetensors file (header says {n} bytes, file has {size - 8})"
            )
        return True

    @classmethod
    def open(cls, path: Path) -> SafetensorsCheckpoint:
        return cls(path, read_header(path))

    def get(self, key: str) -> torch.Tensor:
        self._check_key(key)
        return read_tensor(self.path, self._header, key)


def _info(e: SafetensorsEntry) -> TensorInfo:
    dtype = TORCH_DTYPES[e.dtype]
    if dtype is None:
        return TensorInfo(e.shape, torch.uint8, f"dtype {e.dtype} has no torch equivalent")
    return TensorInfo(e.shape, dtype)


def read_tensor(file: str | os.PathLike[str], header: SafetensorsHeader, name: str) -> torch.Tensor:
    """The tensor ``name`` of a validated header, read from its byte range (one open, one read)."""
    e = header.entries[name]
    dtype = TORCH_DTYPES[e.dtype]
    if dtype is None:
        raise CheckpointError(
            f"{show_path(file)}: tensor {show_key(name)} has dtype {e.dtype}, which torch cannot hold"
        )
    nbytes = e.end - e.begin
    buf = torch.empty(nbytes, dtype=torch.uint8)
    with open(file, "rb") as f:
        f.seek(header.data_start + e.begin)
        got = f.readinto(buf.numpy().data) if nbytes else 0
    if got != nbytes:
        raise bad(file, f"tensor {show_key(name)}: file ended after {got} of its {nbytes} bytes")
    if sys.byteorder != "little" and dtype.itemsize > 1:
        buf = buf.view(-1, dtype.itemsize).flip(1).reshape(-1)  # the format is little-endian
    return buf.view(dtype).reshape(e.shape)
