"""torch.distributed.checkpoint (DCP) directories: a ``.metadata`` file and ``*.distcp`` shards.

This is what ``torch.distributed.checkpoint.save`` writes (FSDP, torchtitan, ...). Tensors are
read one at a time through torch's own DCP reader (``FileSystemReader`` and ``dcp.load``), which
assembles each tensor from its chunks in whichever shards hold them; no process group is
needed and the whole model is never in memory at once. A nested state such as
``{"model": ..., "optim": ...}`` is unwrapped like a torch file's (:data:`wcond.checkpoint.WRAPPER_KEYS`).

The ``.metadata`` file is a pickle; torch unpickles it without restriction. wcond reads it with
an unpickler that only builds DCP's own metadata classes, sizes, dtypes and paths, and refuses
anything else, as it refuses code in torch files. Non-tensor entries (step counters, optimizer
hyperparameters) are pickles too and are never read.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from wcond.checkpoint.base import Checkpoint, TensorInfo, _state_dict_of
from wcond.errors import CheckpointError, UnsafeCheckpointError, show_key, show_path

__all__ = ["DCPCheckpoint", "is_dcp_directory", "open_dcp"]

METADATA_NAME = ".metadata"
SHARD_SUFFIX = ".distcp"

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


def is_dcp_directory(d: Path) -> bool:
    """A directory holding a DCP ``.metadata`` file and at least one ``*.distcp`` shard."""
    return (d / METADATA_NAME).is_file() and any(d.glob(f"*{SHARD_SUFFIX}"))


class DCPCheckpoint(Checkpoint):
    """An opened DCP directory: tensor shapes from its metadata, data read per tensor on demand."""

    def __init__(self, path: Path, metadata: Any, files: list[Path]):
        super().__init__(path, "dcp", files)
        self._dcp_metadata = metadata
        self._fqn: dict[str, str] = {}  # key (inside the wrapper) -> DCP's flattened name

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, assembled from its chunks by torch's DCP reader."""
        if key not in self._fqn:
            raise CheckpointError(f"{show_path(self.path)}: no tensor named {show_key(key)}")
        import torch.distributed.checkpoint as dcp

        fqn, info = self._fqn[key], self._infos[key]
        target = {fqn: torch.empty(info.shape, dtype=info.dtype)}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_DISABLED_WARNING)
                dcp.load(target, storage_reader=_CheckedReader(self.path, self._dcp_metadata))
        except (RuntimeError, OSError, ValueError, EOFError, AssertionError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{show_path(self.path)}: cannot read tensor {show_key(key)} from the DCP shards "
                f"({show_key(first, 160)})"
            ) from e
        return target[fqn]


def open_dcp(d: Path) -> DCPCheckpoint:
    """Open a DCP directory: read and check its metadata; no tensor data is read.

    Raises:
        CheckpointError: unreadable or inconsistent metadata, shards outside the directory,
            nothing analyzable.
        UnsafeCheckpointError: a metadata pickle that would construct anything but DCP metadata.
    """
    files = sorted(f for f in d.iterdir() if f.suffix == SHARD_SUFFIX)
    if not files:
        raise CheckpointError(
            f"{show_path(d)}: has a DCP {METADATA_NAME} file but no *{SHARD_SUFFIX} shards"
        )
    md = _read_metadata(d / METADATA_NAME)
    ck = DCPCheckpoint(d, md, files)
    # Rebuild the nested state from DCP's flattened names, with storage-free tensors standing in
    # for the data, and find the state dict in it exactly as in a torch file.
    paths = getattr(md, "planner_data", None)
    nested: dict[str, Any] = {}
    by_id: dict[int, tuple[str, TensorInfo]] = {}
    for fqn, entry in md.state_dict_metadata.items():
        path = paths.get(fqn) if isinstance(paths, dict) else None
        parts = [str(p) for p in path] if isinstance(path, tuple) and path else [fqn]
        info = _tensor_info(d, fqn, entry)
        leaf: Any = (
            object() if info is None else torch.empty(info.shape, dtype=info.dtype, device="meta")
        )
        if info is not None:
            by_id[id(leaf)] = (fqn, info)
        if not _insert(nested, parts, leaf):
            _insert(nested, [fqn], leaf)  # the path collides with another entry: keep DCP's name
    if not by_id:
        raise CheckpointError(f"{show_path(d)}: DCP checkpoint holds no tensors")
    ck.wrapper, tensors = _state_dict_of(nested, d)
    for key, t in tensors.items():
        fqn, info = by_id[id(t)]
        ck._fqn[key] = fqn
        ck._add(key, info, d / METADATA_NAME)
    return ck


def _insert(root: dict[str, Any], parts: list[str], leaf: Any) -> bool:
    node = root
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            return False
        node = nxt
    if parts[-1] in node:
        return False
    node[parts[-1]] = leaf
    return True


def _tensor_info(d: Path, fqn: str, entry: Any) -> TensorInfo | None:
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


def _read_metadata(file: Path) -> Any:
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
