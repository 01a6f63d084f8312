"""What a tensor costs in a file: its data plus its entry in the format's index.

The size rule of `wcond shrink` (docs/FACTORIZED.md, "Size") compares what a layer takes dense
with what its factors take, index entries and manifest included. Entries are bounded, not
guessed: the factorized side is counted with an upper bound and the dense side with a lower one,
so a layer is factorized only when the file really gets smaller. A safetensors file is then
counted exactly (:func:`safetensors_bytes`): its header's data offsets all move when tensors
are added, which no per-entry bound sees.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["entry_bytes", "file_bytes", "manifest_bytes", "safetensors_bytes"]

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# The order safetensors lays tensors out in: by dtype, widest first, then by name.
_ST_ORDER: tuple[str, ...] = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16")
_ST_ORDER += ("I16", "I8", "U8", "BOOL")
# A torch zip record: local header (30) + central directory entry (46), each holding the record's
# name; an alignment extra field (4 + up to 63 bytes of padding to 64); in data.pkl the key and
# the tensor's rebuild call (storage tuple, size and stride, about 60 bytes plus 5 per dimension
# each for size and stride). Measured with torch 2.x: 180 to 310 bytes per tensor.
_ZIP_HEADERS = 30 + 46
_ZIP_ALIGN_MAX = 4 + 63
_PICKLE_CALL_MIN, _PICKLE_CALL_MAX = 40, 100


def entry_bytes(
    fmt: str,
    key: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    file_size: int,
    archive: str,
    upper: bool,
) -> int:
    """Bytes one tensor takes in a file of format ``fmt`` ("safetensors" or "torch"), data included.

    ``upper`` gives a bound from above (what adding it can cost), else from below (what removing
    it saves at least). ``file_size`` bounds the digits of a safetensors data offset; ``archive``
    is the name torch.save gives the zip's records (the file's stem).
    """
    data = math.prod(shape) * dtype.itemsize
    name = len(key.encode("utf-8"))
    if fmt == "safetensors":
        offset = str(file_size) if upper else "0"
        entry = {"dtype": _ST_DTYPES.get(dtype, "F32"), "shape": list(shape)}
        entry["data_offsets"] = [offset, offset]  # type: ignore[list-item]
        text = json.dumps({key: entry}, separators=(",", ":"), ensure_ascii=False)
        # the offsets are numbers, not strings: drop their quotes; one comma joins entries
        return data + len(text.encode("utf-8")) - 2 - 4 + 1
    digits = len(str(max(file_size, 1))) if upper else 1
    record = len(f"{archive}/data/".encode()) + digits
    pickle = 5 + name + (_PICKLE_CALL_MAX + 10 * len(shape) if upper else _PICKLE_CALL_MIN)
    return data + _ZIP_HEADERS + 2 * record + (_ZIP_ALIGN_MAX if upper else 0) + pickle


def manifest_bytes(fmt: str, key: str, text: str) -> int:
    """Bytes at most that a manifest string ``text`` under ``key`` adds to a file of format ``fmt``."""
    quoted = json.dumps(text, ensure_ascii=False).encode("utf-8")
    if fmt == "safetensors":
        # ,"key":"..." inside __metadata__ (plus '"__metadata__":{},' when it is the only entry),
        # and up to 7 bytes of padding that keep the header a multiple of 8
        return len(quoted) + len(key.encode("utf-8")) + 4 + len('"__metadata__":{},') + 7
    # a pickled str: opcode and length (5 bytes each for key and value), memo and setitem opcodes
    return len(text.encode("utf-8")) + len(key.encode("utf-8")) + 5 + 5 + 16


def file_bytes(paths: Sequence[Path]) -> int:
    """The bytes the files of a checkpoint take on disk."""
    return sum(p.stat().st_size for p in paths if p.is_file())


def safetensors_bytes(
    entries: Iterable[tuple[str, Sequence[int], torch.dtype]], metadata: Mapping[str, str] | None
) -> int:
    """The exact size of the safetensors file ``safetensors.torch.save_file`` writes for these tensors.

    The header is JSON (metadata first, then the tensors in the order of :data:`_ST_ORDER`, each
    with its data offsets), padded with spaces to a multiple of 8; the data follows, packed.
    """
    rows = sorted(
        (
            _ST_ORDER.index(_ST_DTYPES.get(dtype, "F32")),
            key.encode("utf-8"),
            key,
            list(shape),
            dtype,
        )
        for key, shape, dtype in entries
    )
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for _, _, key, shape, dtype in rows:
        size = math.prod(shape) * dtype.itemsize
        header[key] = {
            "dtype": _ST_DTYPES.get(dtype, "F32"),
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    n = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return 8 + n + (-n) % 8 + offset
