"""torch's DCP storage, imported only when a DCP directory is opened (it costs about a second).

The ``.metadata`` file is a pickle; torch unpickles it without restriction. wcond reads it with
an unpickler that only builds DCP's own metadata classes, sizes, dtypes and paths, and refuses
anything else, as it refuses code in torch files. Tensors are read one at a time through torch's
own DCP reader (``FileSystemReader`` and ``dcp.load``), which assembles each tensor from its chunks
in whichever shards hold them; no process group is needed.
"""

from __future__ import annotations

import errno
import io
import math
import os
import pickle
import stat
import warnings
from pathlib import Path
from typing import Any, TypeGuard

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from wcond.checkpoint.base import MAX_DENSE_ELEMENTS, TensorInfo
from wcond.errors import CheckpointError, UnsafeCheckpointError, show_key, show_path

__all__ = ["ShardSizes", "load_tensor", "read_metadata", "tensor_entry_info"]

# What a DCP .metadata pickle is made of (torch 2.2 to 2.13): these modules' classes, plus the
# few torch and pathlib values below. Everything else is refused.
_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
)
_OTHER_GLOBALS = {
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}
_DISABLED_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized"
# The largest .metadata read: a checkpoint of a few hundred tensors over thousands of ranks
# has tens of megabytes
MAX_METADATA_BYTES = 1 << 30
# What reading a damaged shard raises, besides torch's CheckpointException around any of them
_READ_ERRORS = (
    RuntimeError,
    OSError,
    ValueError,
    EOFError,
    AssertionError,
    KeyError,
    IndexError,
    TypeError,
    pickle.UnpicklingError,
)


def load_tensor(d: Path, metadata: Any, fqn: str, key: str, info: TensorInfo) -> torch.Tensor:
    """The tensor DCP names ``fqn`` (``key`` in wcond's reports), assembled from its chunks by
    torch's reader; CheckpointError if it cannot be.

    Its sizes were checked when the directory was opened (:func:`tensor_entry_info`); what is left
    is a shard whose bytes are damaged. torch reports that as a ``CheckpointException``, which
    derives from BaseException and so is caught here by name.
    """
    # zeros, not empty: chunks that overlap leave a gap (their total was checked, not their
    # overlap), which must not show whatever the allocator's memory held
    target = {fqn: torch.zeros(info.shape, dtype=info.dtype)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DISABLED_WARNING)
            dcp.load(target, storage_reader=_CheckedReader(d, metadata))
    except (CheckpointException, *_READ_ERRORS) as e:
        shards = sorted(_shards_of(metadata, fqn))
        where = ", ".join(show_key(s, 60) for s in shards[:3]) + (" ..." if len(shards) > 3 else "")
        raise CheckpointError(
            f"{show_path(d)}: cannot read tensor {show_key(key)} from its DCP shard "
            f"{where or '(none)'}: damaged ({show_key(_why(e), 160)})"
        ) from e
    return target[fqn]


def tensor_entry_info(
    d: Path, fqn: str, entry: Any, metadata: Any, shards: ShardSizes
) -> TensorInfo | None:
    """Shape and dtype of a tensor entry, its sizes checked; None for a non-tensor (bytes) entry.

    Nothing is allocated or read: the shape is checked against MAX_DENSE_ELEMENTS, its chunks
    against the shape (inside it, their values adding up to its values), each chunk against its
    storage entry (at least the chunk's bytes) and each storage entry against its shard file
    (inside the directory, a regular file, the entry within its size).
    """
    if not isinstance(entry, TensorStorageMetadata):
        return None
    name = f"{show_path(d)}: DCP tensor {show_key(fqn)}"
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    shape = _ints(getattr(entry, "size", None))
    if not isinstance(dtype, torch.dtype) or shape is None:
        raise CheckpointError(f"{name} has no valid shape and dtype in the metadata")
    numel = math.prod(shape)
    if numel > MAX_DENSE_ELEMENTS:
        raise CheckpointError(
            f"{name} claims shape {list(shape)} ({numel:,} values); refused above "
            f"{MAX_DENSE_ELEMENTS:,} values"
        )
    chunks = getattr(entry, "chunks", None)
    chunks = chunks if isinstance(chunks, list) else None
    if chunks is None or (numel and not chunks):
        raise CheckpointError(f"{name} has no chunk list in the metadata")
    total = 0
    for chunk in chunks:
        offsets, sizes = (
            _ints(getattr(chunk, "offsets", None)),
            _ints(getattr(chunk, "sizes", None)),
        )
        if (
            offsets is None
            or sizes is None
            or len(offsets) != len(shape)
            or len(sizes) != len(shape)
        ):
            raise CheckpointError(f"{name} has a malformed chunk in the metadata")
        if any(o + n > s for o, n, s in zip(offsets, sizes, shape)):
            raise CheckpointError(
                f"{name}: its chunk at offsets {list(offsets)} with sizes {list(sizes)} lies "
                f"outside its shape {list(shape)}"
            )
        total += math.prod(sizes)
        _check_storage(
            name, metadata, MetadataIndex(fqn, offsets), math.prod(sizes) * dtype.itemsize, shards
        )
    if total != numel:
        raise CheckpointError(
            f"{name}: its chunks hold {total:,} values, its shape {list(shape)} has {numel:,}"
        )
    return TensorInfo(shape, dtype)


class ShardSizes:
    """The size of each shard file a DCP directory's storage entries name, each checked once."""

    def __init__(self, d: Path):
        self.dir = d
        self._root = d.resolve()
        self._sizes: dict[str, int | str] = {}  # name -> size, or why it cannot be read

    def size(self, name: str) -> int | str:
        if name not in self._sizes:
            self._sizes[name] = self._stat(name)
        return self._sizes[name]

    def _stat(self, name: str) -> int | str:
        path = self.dir / name
        try:
            real = path.resolve(strict=True)
            st = os.stat(real)
        except FileNotFoundError:
            return "which is missing"
        except RuntimeError:  # pathlib's word for a symlink loop before Python 3.13
            return "a symlink loop"
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "a symlink loop"
            return f"which cannot be read ({e.strerror or type(e).__name__})"
        if real.parent != self._root:
            return "a link leading outside the directory; refused"
        if not stat.S_ISREG(st.st_mode):
            return "which is not a regular file"
        return st.st_size


def _check_storage(
    name: str, metadata: Any, index: MetadataIndex, need: int, shards: ShardSizes
) -> None:
    """The storage entry of one chunk: present, holding at least the chunk's bytes, inside its shard."""
    where = metadata.storage_data.get(index)
    if where is None:
        raise CheckpointError(
            f"{name}: no storage entry for its chunk at offsets {list(index.offset or ())}"
        )
    shard = show_key(where.relative_path, 60)
    offset, length = getattr(where, "offset", None), getattr(where, "length", None)
    if not _is_count(offset) or not _is_count(length):
        raise CheckpointError(
            f"{name}: its storage entry in {shard} has no valid offset and length"
        )
    if getattr(where, "transform_descriptors", None):
        what = ", ".join(show_key(str(t), 40) for t in list(where.transform_descriptors)[:3])
        raise CheckpointError(
            f"{name} is stored through {what} (compression); wcond reads DCP shards as "
            "torch.distributed.checkpoint.save writes them by default"
        )
    if length < need:
        raise CheckpointError(
            f"{name}: its chunk needs {need:,} bytes; its storage entry in {shard} holds {length:,}"
        )
    size = shards.size(where.relative_path)
    if isinstance(size, str):
        raise CheckpointError(f"{name} is stored in {shard}, {size}")
    if offset + length > size:
        raise CheckpointError(
            f"{name} is stored at bytes {offset:,} to {offset + length:,} of {shard}, which "
            f"holds {size:,} bytes (truncated?)"
        )


def _ints(value: Any) -> tuple[int, ...] | None:
    """A shape, offsets or sizes as non-negative ints; None if it is anything else."""
    if not isinstance(value, (tuple, list)) or not all(_is_count(v) for v in value):
        return None
    return tuple(value)


def _is_count(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _shards_of(metadata: Any, fqn: str) -> set[str]:
    return {
        str(getattr(where, "relative_path", "?"))
        for index, where in metadata.storage_data.items()
        if getattr(index, "fqn", None) == fqn
    }


def _why(e: BaseException) -> str:
    """The first line that says what went wrong, from torch's CheckpointException or any error."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    text = str(e)
    if (
        "WeightsUnpickler error:" in text
    ):  # torch.load's advice about weights_only says nothing here
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


class _MetadataUnpickler(pickle._Unpickler):
    """Builds DCP metadata classes, torch sizes/dtypes and paths; refuses every other global.

    Python's own unpickler, not the C one: the C unpickler's memo is an array sized by the
    largest index a PUT names, so six bytes (LONG_BINPUT 1231382369) make it allocate and zero
    ten gigabytes. Here the memo is a dict. Metadata is small; the speed does not matter.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES or (module, name) in _OTHER_GLOBALS:
            value = super().find_class(module, name)
            if module not in _DCP_MODULES or isinstance(value, type):
                return value
        elif module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_metadata(file: Path) -> Any:
    """DCP's metadata, unpickled with only its own classes allowed and its shape checked."""
    try:
        with open(file, "rb") as f:
            # read whole, within a bound, then unpickled from memory: a frame or string claiming
            # exabytes meets the end of the data instead of asking the allocator for them
            size = os.fstat(f.fileno()).st_size
            if size > MAX_METADATA_BYTES:
                raise CheckpointError(
                    f"{show_path(file)}: DCP metadata of {size:,} bytes; refused above "
                    f"{MAX_METADATA_BYTES:,}"
                )
            raw = f.read(size)
        md = _MetadataUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        what = str(e).removeprefix("GLOBAL ") if str(e).startswith("GLOBAL ") else None
        if what is not None:
            raise UnsafeCheckpointError(
                f"{show_path(file)}: refused: this DCP metadata pickle would construct "
                f"{show_key(what)}, and wcond never runs code from a checkpoint"
            ) from e
        raise CheckpointError(
            f"{show_path(file)}: corrupt DCP metadata ({show_key(str(e))})"
        ) from e
    except OSError as e:
        raise CheckpointError(f"{show_path(file)}: cannot read DCP metadata: {e.strerror}") from e
    except (
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        OverflowError,
        MemoryError,
        RecursionError,
    ) as e:
        raise CheckpointError(
            f"{show_path(file)}: corrupt DCP metadata ({type(e).__name__})"
        ) from e
    if not isinstance(md, Metadata) or not isinstance(
        getattr(md, "state_dict_metadata", None), dict
    ):
        raise CheckpointError(f"{show_path(file)}: not DCP metadata (holds a {type(md).__name__})")
    if not isinstance(getattr(md, "storage_data", None), dict) or not all(
        isinstance(k, str) for k in md.state_dict_metadata
    ):
        raise CheckpointError(f"{show_path(file)}: malformed DCP metadata (its entries or storage)")
    for where in md.storage_data.values():
        rel = getattr(where, "relative_path", None)
        if (
            not isinstance(rel, str)
            or "\0" in rel
            or Path(rel).name != rel
            or rel in ("", ".", "..")
        ):
            raise CheckpointError(
                f"{show_path(file)}: DCP metadata points outside its directory ({show_key(str(rel))}); refused"
            )
    return md


class _CheckedReader(FileSystemReader):
    """torch's FileSystemReader, given the metadata wcond already read and checked (not its pickle.load)."""

    def __init__(self, path: Path, metadata: Any):
        super().__init__(path)
        self._checked = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._checked, "storage_meta", None) is None:
            self._checked.storage_meta = StorageMeta()
        self._checked.storage_meta.load_id = self.load_id
        return self._checked
