"""A safetensors file's header, checked before anything it claims is allocated. Torch-free.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional ``__metadata__``
object of strings), then the tensor bytes. Every number in the header is a claim: each is checked
against the file's size and against the others before it drives a read or an allocation. This is
the validation safetensors' own loader does, plus what it lacks (duplicate keys are refused, so
two readers can never see different tensors under one name).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any

from wcond.checkpoint.bounded_json import JSONTooDeep, parse_json
from wcond.errors import CheckpointError, show_key, show_path

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "SafetensorsEntry",
    "SafetensorsHeader",
    "bad",
    "read_header",
]

# safetensors' own loader refuses headers above 100 MB; no real checkpoint comes near it.
MAX_HEADER_BYTES = 100_000_000
# JSON nesting a valid header needs: {name: {"shape": [...]}} is 3; metadata adds nothing deeper.
MAX_JSON_DEPTH = 8

# safetensors dtype -> bits per element
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor's record in the header: dtype name, shape, and byte range within the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: where the data section starts, the tensors in header order, the metadata."""

    data_start: int
    entries: dict[str, SafetensorsEntry]
    metadata: dict[str, str]


def read_header(file: str | os.PathLike[str], size: int | None = None) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file; CheckpointError saying what is wrong."""
    with open(file, "rb") as f:
        if size is None:
            size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(file, f"file is {len(prefix)} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise bad(file, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if n > size - 8:
            raise bad(
                file, f"truncated: header says {n} bytes, the file has {size - 8} after the length"
            )
        raw = f.read(n)
    if len(raw) != n:
        raise bad(file, "the file shrank while being read")
    return _parse(file, raw, size - 8 - n, 8 + n)


def _parse(
    file: str | os.PathLike[str], raw: bytes, data_size: int, data_start: int
) -> SafetensorsHeader:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(file, f"header is not UTF-8 (byte {e.start})") from e
    try:
        doc = parse_json(text, max_depth=MAX_JSON_DEPTH, object_pairs_hook=_no_duplicates)
    except JSONTooDeep as e:
        raise bad(file, f"header JSON nests {e.depth} levels deep (at most {e.limit})") from e
    except _DuplicateKey as e:
        raise bad(
            file, f"header names {show_key(e.key)} twice; readers could disagree on which is meant"
        ) from e
    except ValueError as e:
        raise bad(file, f"header is not valid JSON ({str(e)[:80]})") from e
    if not isinstance(doc, dict):
        raise bad(file, f"header is a JSON {type(doc).__name__}, not an object")
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad(file, "__metadata__ must be an object of strings")
    entries: dict[str, SafetensorsEntry] = {}
    for name, spec in doc.items():
        entries[name] = _entry(file, name, spec, data_size)
    _check_layout(file, entries, data_size)
    return SafetensorsHeader(data_start, entries, metadata)


def _entry(file: str | os.PathLike[str], name: str, spec: Any, data_size: int) -> SafetensorsEntry:
    if not isinstance(spec, dict):
        raise bad(
            file, f"tensor {show_key(name)}: expected an object with dtype, shape and data_offsets"
        )
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise bad(file, f"tensor {show_key(name)}: unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise bad(file, f"tensor {show_key(name)}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(
            file,
            f"tensor {show_key(name)}: data_offsets must be [begin, end] with 0 <= begin <= end",
        )
    begin, end = offsets
    if end > data_size:
        raise bad(
            file,
            f"tensor {show_key(name)}: data_offsets end at {end}, past the {data_size} data bytes",
        )
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits != (end - begin) * 8:
        raise bad(
            file,
            f"tensor {show_key(name)}: shape {tuple(shape)} of {dtype} needs {-(-bits // 8)} bytes, "
            f"data_offsets give {end - begin}",
        )
    return SafetensorsEntry(dtype, tuple(shape), begin, end)


def _check_layout(
    file: str | os.PathLike[str], entries: dict[str, SafetensorsEntry], data_size: int
) -> None:
    """Tensors may not overlap (one byte read as two tensors); sorting is n log n."""
    spans = sorted((e.begin, e.end, k) for k, e in entries.items() if e.end > e.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise bad(file, f"tensors {show_key(a)} and {show_key(b)} overlap in the file")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def bad(file: str | os.PathLike[str], what: str) -> CheckpointError:
    return CheckpointError(f"{show_path(file)}: corrupt or truncated safetensors file: {what}")
