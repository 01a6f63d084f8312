"""Reading torch.save files without trusting them.

``torch.load(weights_only=True)`` already refuses to run code; what it does not do is check that
the file agrees with itself. A zip checkpoint read with ``mmap=True`` maps each storage from its
record's offset for as many bytes as the pickle claims, so a truncated record silently reads its
neighbours' bytes. So after loading, each storage is matched to the zip record it was mapped from
(all are slices of one mapping of the file: their addresses differ by the records' offsets) and
checked against that record's size. Every error torch, pickle or zipfile can raise on a malformed
file becomes a CheckpointError naming the file; errors of wcond's own code are left alone.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from wcond.checkpoint.base import Checkpoint, tensor_info
from wcond.checkpoint.state_dict import MAX_NESTING, find_state_dict
from wcond.errors import CheckpointError, UnsafeCheckpointError, show_key, show_path

__all__ = [
    "LOAD_ERRORS",
    "DataRecord",
    "TorchFileCheckpoint",
    "data_records",
    "iter_tensors",
    "load_torch",
]

# What a malformed file can make torch.load, pickle or zipfile raise. Not a blanket Exception:
# errors in wcond's own code must surface as the bugs they are.
LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,  # includes NotImplementedError and RecursionError
    EOFError,
    ValueError,  # includes UnicodeDecodeError
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    OverflowError,
    MemoryError,
    struct.error,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
)

_UNSAFE = re.compile(r"GLOBAL ([\w.]+)|Can only (?:create new object|build)|Trying to call reduce")


class TorchFileCheckpoint(Checkpoint):
    """A torch.save file: the state dict found inside it (a training wrapper unwrapped), tensors mapped.

    Opened as a checkpoint of its own, it keeps the whole object (``obj``: the wrapper's epoch,
    optimizer state, ...) and its tensors. Opened as one shard of several (``keep_object=False``),
    it keeps neither once its tensors are described: :meth:`get` loads the file again, and
    :meth:`release` lets it go, so that one shard at a time is mapped.
    """

    format = "torch"

    def __init__(self, path: Path, obj: Any, *, keep_object: bool = True):
        wrapper, tensors = find_state_dict(obj, path)
        infos = {key: tensor_info(t) for key, t in tensors.items()}
        super().__init__(path, [path], infos, wrapper=wrapper, obj=obj if keep_object else None)
        self._keep = keep_object
        self._tensors: dict[str, torch.Tensor] | None = tensors if keep_object else None

    @classmethod
    def probe(cls, path: Path, head: bytes = b"", size: int = 0) -> bool:
        """A zip archive (torch >= 1.6) or a pickle of protocol 2 to 5 (the legacy format)."""
        return head[:4] == b"PK\x03\x04" or (
            len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5
        )

    @classmethod
    def open(cls, path: Path, *, keep_object: bool = True) -> TorchFileCheckpoint:
        return cls(path, load_torch(path), keep_object=keep_object)

    def get(self, key: str) -> torch.Tensor:
        self._check_key(key)
        if self._tensors is None:
            _, self._tensors = find_state_dict(load_torch(self.path), self.path)
        return self._tensors[key]

    def release(self) -> None:
        if not self._keep:
            self._tensors = None


def load_torch(file: str | os.PathLike[str]) -> Any:
    """The unpickled object of a torch.save file, tensors memory-mapped (zip format) or read (legacy).

    Raises:
        UnsafeCheckpointError: the pickle would construct something other than tensors and containers.
        CheckpointError: anything malformed, truncated or inconsistent, naming the file and the fault.
    """
    path = os.fspath(file)
    with _translated(path):
        is_zip = zipfile.is_zipfile(path)
        records = _storage_records(path) if is_zip else {}
        with _encodable(path) as name:
            mapped = is_zip and name is not None
            obj = _load(name, mmap=mapped, fallback=path)
    if mapped:
        _check_records(path, obj, records)
    return obj


def iter_tensors(obj: Any, file: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples as (key path, tensor); depth-bounded."""
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    while stack:
        key, node, depth = stack.pop()
        if isinstance(node, torch.Tensor):
            yield key, node
            continue
        if depth > MAX_NESTING:
            raise CheckpointError(
                f"{show_path(file)}: containers nested more than {MAX_NESTING} levels deep; not a checkpoint"
            )
        if isinstance(node, dict):
            children = [(f"{key}.{k}" if key else str(k), v) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            children = [(f"{key}.{i}" if key else str(i), v) for i, v in enumerate(node)]
        else:
            continue
        stack.extend((k, v, depth + 1) for k, v in reversed(children))


def _load(
    name: str | None, *, map_location: str = "cpu", mmap: bool = False, fallback: str = ""
) -> Any:
    # torch warns about pickle protocols and beta sparse layouts; a report or one line, nothing else.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name is None:  # a file name torch cannot pass to C++: give it the open file instead
            with open(fallback, "rb") as f:
                return torch.load(f, map_location=map_location, weights_only=True)
        return torch.load(name, map_location=map_location, weights_only=True, mmap=mmap)


class DataRecord(NamedTuple):
    """A tensor data record of a torch zip archive: its name, where its bytes start in the file, how many."""

    name: str
    offset: int
    size: int


def data_records(path: str | os.PathLike[str], kind: str = "torch checkpoint") -> list[DataRecord]:
    """Every ``<archive>/data/<key>`` record of a torch zip archive (torch.save's or torch.jit.save's), checked.

    Each must have its local header, be stored uncompressed (so that it can be mapped) and end
    inside the file; ``kind`` names the archive in the message.

    Raises:
        CheckpointError: a record that fails one of those checks, named.
        zipfile.BadZipFile, OSError: the archive cannot be read at all (callers translate them).
    """
    out: list[DataRecord] = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        for info in z.infolist():
            if "/data/" not in info.filename:
                continue
            name = show_key(info.filename)
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CheckpointError(
                    f"{show_path(path)}: corrupt {kind}: record {name} has no local header"
                )
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(
                    f"{show_path(path)}: corrupt {kind}: record {name} is compressed; "
                    "torch stores tensor data uncompressed"
                )
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            if start + info.file_size > file_size:
                raise CheckpointError(
                    f"{show_path(path)}: corrupt or truncated {kind}: record {name} claims "
                    f"{info.file_size} bytes, past the end of the file"
                )
            out.append(DataRecord(info.filename, start, info.file_size))
    return out


def _storage_records(path: str) -> dict[int, tuple[str, int]]:
    """Data offset in the file -> (record name, size) of every tensor record of a zip checkpoint."""
    return {r.offset: (r.name, r.size) for r in data_records(path)}


def _check_records(path: str, obj: Any, records: dict[int, tuple[str, int]]) -> None:
    """Each memory-mapped storage must lie within the zip record it was mapped from."""
    storages: dict[int, tuple[str, int]] = {}  # address -> (a tensor using it, storage bytes)
    for key, t in iter_tensors(obj, path):
        if t.layout == torch.strided and not t.is_meta and t.untyped_storage().nbytes():
            storage = t.untyped_storage()
            storages.setdefault(storage.data_ptr(), (key, storage.nbytes()))
    if not storages:
        return
    # Every storage is mapping_start + record offset: the mapping's start is the one address
    # that puts every storage at the start of some record.
    ptrs = iter(storages)
    first = next(ptrs)
    starts = {first - offset for offset in records}
    for ptr in ptrs:
        starts = {s for s in starts if ptr - s in records}
        if len(starts) <= 1:
            break
    faults = []
    for start in starts:
        faults = [
            (key, nbytes, *records[ptr - start])
            for ptr, (key, nbytes) in storages.items()
            if ptr - start not in records or records[ptr - start][1] < nbytes
        ]
        if not faults:
            return
    if not starts or not faults:
        raise CheckpointError(
            f"{show_path(path)}: corrupt torch checkpoint: its tensors do not line up with its data records"
        )
    key, nbytes, name, size = faults[0]
    raise CheckpointError(
        f"{show_path(path)}: corrupt or truncated torch checkpoint: tensor {show_key(key)} needs "
        f"{nbytes} bytes but its record {show_key(name)} holds {size}"
    )


@contextmanager
def _encodable(path: str) -> Iterator[str | None]:
    """A name torch's C++ reader accepts: the path itself, /proc/self/fd/N for a non-UTF-8 name, or None."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield path
        return
    if not os.path.isdir("/proc/self/fd"):
        yield None
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


@contextmanager
def _translated(path: str) -> Iterator[None]:
    """Errors a malformed file makes torch, pickle or zipfile raise -> CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        detail = _detail(e)
        unsafe = _UNSAFE.search(str(e))
        if unsafe:
            what = f"the object {unsafe.group(1)}" if unsafe.group(1) else "arbitrary objects"
            raise UnsafeCheckpointError(
                f"{show_path(path)}: refused: its pickle would construct {what}, and wcond never runs code "
                "from a checkpoint. If you trust the file, re-save just the weights: "
                "torch.save(model.state_dict(), path)"
            ) from e
        raise CheckpointError(
            f"{show_path(path)}: corrupt torch checkpoint: malformed pickle ({detail})"
        ) from e
    except RecursionError as e:
        raise CheckpointError(
            f"{show_path(path)}: corrupt torch checkpoint: pickle nested too deeply"
        ) from e
    except MemoryError as e:
        raise CheckpointError(
            f"{show_path(path)}: corrupt torch checkpoint: it claims more memory than there is"
        ) from e
    except LOAD_ERRORS as e:
        raise CheckpointError(
            f"{show_path(path)}: corrupt or truncated torch checkpoint ({_detail(e)})"
        ) from e


def _detail(e: BaseException) -> str:
    """The informative line of a torch/pickle error, without torch's boilerplate; printable and short."""
    skip = (
        "Weights only load failed",
        "Please file an issue",
        "Check the documentation",
        "(1)",
        "(2)",
    )
    message = str(e)
    # torch's zip reader on a cut archive: EINVAL, or miniz's words when the cut is early
    if (isinstance(e, OSError) and e.errno == errno.EINVAL) or "central directory" in message:
        return "its zip archive is incomplete or damaged"
    if "WeightsUnpickler error:" in message:  # torch's advice first, the fault after this marker
        message = message.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(skip)]
    text = (useful or lines or [type(e).__name__])[0]
    text = text.removeprefix("WeightsUnpickler error:").strip() or type(e).__name__
    text = text.split(" This is an internal miniz error")[0]  # torch's boilerplate after the fault
    if text == "EOFError":
        text = "the file ends early"
    elif text.startswith("Trying to resize storage that is not resizable"):
        text = "a tensor's shape needs more bytes than its storage holds"
    return show_key(text, limit=160)[1:-1]
