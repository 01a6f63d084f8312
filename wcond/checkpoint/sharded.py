"""Sharded checkpoints: several files behind a shard index, or a directory of safetensors shards.

Each shard is opened by its own reader (safetensors or torch file, from its first bytes); this
reader holds them, knows which shard holds which key, and refuses a key stored twice. An index may
only name files beside it (or, in a Hugging Face cache snapshot, that snapshot's blobs).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from wcond.checkpoint import hub
from wcond.checkpoint.base import Checkpoint, TensorInfo
from wcond.checkpoint.index import read_index
from wcond.checkpoint.names import INDEX_NAMES, directory_weights
from wcond.checkpoint.sniff import file_reader
from wcond.checkpoint.source import check_path, run_in_directory
from wcond.checkpoint.torch_file import TorchFileCheckpoint
from wcond.errors import CheckpointError, show_key, show_path

__all__ = ["ShardedCheckpoint"]


class ShardedCheckpoint(Checkpoint):
    """Several checkpoint files read as one: the union of their tensors, one shard read at a time."""

    format = "sharded"

    def __init__(self, path: Path, shards: list[Checkpoint]):
        infos: dict[str, TensorInfo] = {}
        self._where: dict[str, Checkpoint] = {}
        for shard in shards:
            for key in shard.keys():
                if key in infos:
                    raise CheckpointError(
                        f"{show_path(path)}: tensor {show_key(key)} appears in both "
                        f"{show_path(self._where[key].path.name)} and {show_path(shard.path.name)}"
                    )
                infos[key] = shard.info(key)
                self._where[key] = shard
        torch_shards = [s for s in shards if isinstance(s, TorchFileCheckpoint)]
        super().__init__(
            path,
            [s.path for s in shards],
            infos,
            wrapper=torch_shards[-1].wrapper if torch_shards else (),
            metadata=next((s.metadata for s in shards if s.metadata), {}),
        )
        self._current: Checkpoint | None = None

    @classmethod
    def probe(cls, path: Path, head: bytes = b"", size: int = 0) -> bool:
        """A shard index, or a directory holding one, or several safetensors files whose tensor
        names are disjoint (the same names in each would be a run: ``source.run_in_directory``)."""
        if not path.is_dir():
            return path.name.endswith(".index.json")
        if any((path / name).is_file() for name in INDEX_NAMES):
            return True
        st, pt = directory_weights(path)
        return len(st) > 1 and not pt and run_in_directory(path) is None

    @classmethod
    def open(cls, path: Path) -> ShardedCheckpoint:
        if not path.is_dir():
            return cls._open_index(path)
        for name in INDEX_NAMES:
            if (path / name).is_file():
                check_path(path / name)
                return cls._open_index(path / name)
        st, _ = directory_weights(path)  # shards without an index: their union
        return cls(path, [_open_shard(f) for f in st])

    @classmethod
    def _open_index(cls, index: Path) -> ShardedCheckpoint:
        weight_map = read_index(index)
        root = index.parent.resolve()
        shards: dict[Path, None] = {}  # insertion-ordered set: one look-up per key, not a list scan
        for key, name in weight_map.items():
            shards.setdefault(_shard_path(index, root, key, name))
        for f in shards:
            if not f.exists():  # a FIFO or device is refused by name when checked below
                raise CheckpointError(
                    f"{show_path(index)}: shard {show_path(f.name)} listed in the index is missing"
                )
        return cls(index, [_open_shard(f) for f in shards])

    def get(self, key: str) -> torch.Tensor:
        self._check_key(key)
        shard = self._where[key]
        if self._current is not None and self._current is not shard:
            self._current.release()  # one shard's tensors mapped at a time
        self._current = shard
        return shard.get(key)


def _open_shard(file: Path) -> Checkpoint:
    if check_path(file) != "file":
        raise CheckpointError(f"{show_path(file)}: is a directory, expected a checkpoint file")
    reader = file_reader(file)
    if reader is TorchFileCheckpoint:
        return TorchFileCheckpoint.open(file, keep_object=False)
    return reader.open(file)


def _shard_path(index: Path, root: Path, key: str, name: str) -> Path:
    """The shard file ``name`` of an index, which must stay inside the index's directory."""
    bad = (
        os.path.isabs(name)
        or "\x00" in name
        or any(part == ".." for part in re.split(r"[/\\]", name))
    )
    f = index.parent / name
    if not bad:
        try:
            resolved = f.resolve()  # follows symlinks: a link out of the directory is caught here
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise CheckpointError(
                f"{show_path(index)}: shard {show_key(name)} cannot be resolved (symlink loop?)"
            ) from e
        # In a Hugging Face cache snapshot, every file links to the repo's blob store.
        bad = not resolved.is_relative_to(root) and not hub.in_blob_store(index.parent, resolved)
    if bad:
        raise CheckpointError(
            f"{show_path(index)}: shard {show_key(name)} for tensor {show_key(key)} is outside the "
            "index's directory; an index may only name files beside it"
        )
    return f
