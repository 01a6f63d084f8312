"""torch's DCP storage, imported only when a DCP directory is opened (it costs about a second).

The ``.metadata`` file is a pickle; torch unpickles it without restriction. wcond reads it with
an unpickler that only builds DCP's own metadata classes, sizes, dtypes and paths, and refuses
anything else, as it refuses code in torch files. Tensors are read one at a time through torch's
own DCP reader (``FileSystemReader`` and ``dcp.load``), which assembles each tensor from its chunks
in whichever shards hold them; no process group is needed.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from wcond.checkpoint.base import TensorInfo
from wcond.errors import CheckpointError, UnsafeCheckpointError, show_key, show_path

__all__ = ["load_tensor", "read_metadata", "tensor_entry_info"]

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


def load_tensor(d: Path, metadata: Any, fqn: str, key: str, info: TensorInfo) -> torch.Tensor:
    """The tensor DCP names ``fqn`` (``key`` in wcond's reports), assembled from its chunks by
    torch's reader; CheckpointError if it cannot be."""
    target = {fqn: torch.empty(info.shape, dtype=info.dtype)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DISABLED_WARNING)
            dcp.load(target, storage_reader=_CheckedReader(d, metadata))
    except (RuntimeError, OSError, ValueError, EOFError, AssertionError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{show_path(d)}: cannot read tensor {show_key(key)} from the DCP shards "
            f"({show_key(first, 160)})"
        ) from e
    return target[fqn]


def tensor_entry_info(d: Path, fqn: str, entry: Any) -> TensorInfo | None:
    """Shape and dtype of a tensor entry; None for a non-tensor (bytes) entry."""
    if not isinstance(entry, TensorStorageMetadata):
        return None
    dtype = getattr(entry.properties, "dtype", None)
    shape = tuple(entry.size)
    if not isinstance(dtype, torch.dtype) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CheckpointError(
            f"{show_path(d)}: DCP metadata of {show_key(fqn)} has no valid shape and dtype"
        )
    return TensorInfo(shape, dtype)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata classes, torch sizes/dtypes and paths; refuses every other global."""

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
    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f).load()
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
    except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise CheckpointError(
            f"{show_path(file)}: corrupt or unreadable DCP metadata ({type(e).__name__})"
        ) from e
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{show_path(file)}: not DCP metadata (holds a {type(md).__name__})")
    for where in (md.storage_data or {}).values():
        rel = getattr(where, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
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
