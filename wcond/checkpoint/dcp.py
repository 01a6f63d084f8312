"""torch.distributed.checkpoint (DCP) directories: a ``.metadata`` file and ``*.distcp`` shards.

This is what ``torch.distributed.checkpoint.save`` writes (FSDP, torchtitan, ...). The metadata
is read with a restricted unpickler, tensors one at a time through torch's DCP reader
(wcond.checkpoint.dcp_storage, imported only when a DCP directory is opened); the whole model is
never in memory at once. A nested state such as ``{"model": ..., "optim": ...}`` is unwrapped
like a torch file's (wcond.checkpoint.state_dict). Non-tensor entries (step counters, optimizer
hyperparameters) are pickles too and are never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from wcond.checkpoint.base import Checkpoint, TensorInfo
from wcond.checkpoint.names import DCP_METADATA_NAME, DCP_SHARD_SUFFIX
from wcond.checkpoint.state_dict import find_state_dict
from wcond.errors import CheckpointError, show_path

__all__ = ["METADATA_NAME", "SHARD_SUFFIX", "DCPCheckpoint"]

METADATA_NAME, SHARD_SUFFIX = DCP_METADATA_NAME, DCP_SHARD_SUFFIX


class DCPCheckpoint(Checkpoint):
    """An opened DCP directory: tensor shapes from its metadata, data read per tensor on demand."""

    format = "dcp"

    def __init__(
        self,
        path: Path,
        metadata: Any,
        files: list[Path],
        fqns: dict[str, str],
        infos: dict[str, TensorInfo],
        wrapper: tuple[str, ...],
    ):
        super().__init__(path, files, infos, wrapper=wrapper)
        self._dcp_metadata = metadata
        self._fqn = fqns  # key (inside the wrapper) -> DCP's flattened name

    @classmethod
    def probe(cls, path: Path, head: bytes = b"", size: int = 0) -> bool:
        """A directory holding a ``.metadata`` file (its shards are checked when it is opened)."""
        return path.is_dir() and (path / METADATA_NAME).is_file()

    @classmethod
    def open(cls, path: Path) -> DCPCheckpoint:
        """Read and check the metadata; no tensor data is read.

        Raises:
            CheckpointError: unreadable or inconsistent metadata (a tensor above
                MAX_DENSE_ELEMENTS values, chunks that do not cover it, storage entries past the
                end of their shard), shards missing or outside the directory, nothing analyzable.
            UnsafeCheckpointError: a metadata pickle that would construct anything but DCP metadata.
        """
        from wcond.checkpoint import dcp_storage  # torch.distributed: only for a DCP directory

        d = path
        files = sorted(f for f in d.iterdir() if f.suffix == SHARD_SUFFIX)
        if not files:
            raise CheckpointError(
                f"{show_path(d)}: has a DCP {METADATA_NAME} file but no *{SHARD_SUFFIX} shards"
            )
        md = dcp_storage.read_metadata(d / METADATA_NAME)
        # Rebuild the nested state from DCP's flattened names, with storage-free tensors standing in
        # for the data, and find the state dict in it exactly as in a torch file.
        paths = getattr(md, "planner_data", None)
        shards = dcp_storage.ShardSizes(d)
        nested: dict[str, Any] = {}
        by_id: dict[int, tuple[str, TensorInfo]] = {}
        for fqn, entry in md.state_dict_metadata.items():
            where = paths.get(fqn) if isinstance(paths, dict) else None
            parts = [str(p) for p in where] if isinstance(where, tuple) and where else [fqn]
            info = dcp_storage.tensor_entry_info(d, fqn, entry, md, shards)
            leaf: Any = (
                object()
                if info is None
                else torch.empty(info.shape, dtype=info.dtype, device="meta")
            )
            if info is not None:
                by_id[id(leaf)] = (fqn, info)
            if not _insert(nested, parts, leaf):
                _insert(
                    nested, [fqn], leaf
                )  # the path collides with another entry: keep DCP's name
        if not by_id:
            raise CheckpointError(f"{show_path(d)}: DCP checkpoint holds no tensors")
        wrapper, tensors = find_state_dict(nested, d)
        fqns = {key: by_id[id(t)][0] for key, t in tensors.items()}
        infos = {key: by_id[id(t)][1] for key, t in tensors.items()}
        return cls(d, md, files, fqns, infos, wrapper)

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, assembled from its chunks by torch's DCP reader."""
        self._check_key(key)
        from wcond.checkpoint import dcp_storage

        return dcp_storage.load_tensor(
            self.path, self._dcp_metadata, self._fqn[key], key, self._infos[key]
        )


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
