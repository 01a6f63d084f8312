"""What every opened checkpoint offers: its tensors by key, described without reading them, read on demand.

Each format has its reader, a subclass in a module of its own (torch_file, torchscript,
safetensors_file, sharded, dcp) that owns its state, says from a path and the file's first bytes whether the file is
its format (``probe``), and opens it (``open``). wcond.checkpoint.open asks them in order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from wcond.errors import CheckpointError, show_key, show_path

__all__ = ["MAX_DENSE_ELEMENTS", "Checkpoint", "TensorInfo", "tensor_info"]

# The most values one tensor a reader builds from a description may have (8 GiB of float32): a
# factorized layer rebuilt from its indices, a DCP tensor assembled from its chunks. A few
# kilobytes of metadata can describe a tensor of terabytes; no real layer comes near this
# (Llama-3 405B's largest is 2.1e9 values).
MAX_DENSE_ELEMENTS = 2**31


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, known without reading its data.

    ``skip`` says why a stored tensor cannot be analyzed (sparse, meta, a huge broadcast view,
    a dtype torch lacks); None for an ordinary dense tensor.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    skip: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class Checkpoint:
    """An opened checkpoint: its tensors by key, read on demand, and where they came from.

    Attributes:
        path: the file or directory opened.
        format: "torch", "torchscript", "safetensors", "sharded" (several files behind an index) or "dcp".
        wrapper: the key path to the state dict inside a torch file, e.g. ("state_dict",) for Lightning.
        metadata: safetensors metadata (the first shard's for a sharded checkpoint).
        files: the files the tensors live in.
        obj: the whole unpickled object of a single torch file (its non-tensor entries); else None.
    """

    format: ClassVar[str] = ""

    def __init__(
        self,
        path: Path,
        files: list[Path],
        infos: dict[str, TensorInfo],
        *,
        wrapper: tuple[str, ...] = (),
        metadata: Mapping[str, str] | None = None,
        obj: Any = None,
    ):
        self.path = path
        self.files = files
        self.wrapper = wrapper
        self.metadata: dict[str, str] = dict(metadata or {})
        self.obj = obj
        self._infos = infos

    @classmethod
    def probe(cls, path: Path, head: bytes = b"", size: int = 0) -> bool:
        """Whether ``path`` (checked to be a regular file or a directory; for a file, its first
        bytes ``head`` and its ``size``) is this reader's format."""
        return False

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        """Open ``path``, reading what describes its tensors but not their data."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        """Tensor keys in stored order."""
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, as stored (dtype unchanged)."""
        raise NotImplementedError

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._infos:
            yield key, self.get(key)

    def release(self) -> None:
        """Let go of what :meth:`get` keeps between calls (a torch file's mapped tensors)."""

    @property
    def num_bytes(self) -> int:
        return sum(i.numel * i.dtype.itemsize for i in self._infos.values())

    def _check_key(self, key: str) -> None:
        if key not in self._infos:
            raise CheckpointError(f"{show_path(self.path)}: no tensor named {show_key(key)}")


def tensor_info(t: torch.Tensor) -> TensorInfo:
    """Shape, dtype and (for sparse, meta or broadcast tensors) why it cannot be analyzed."""
    return TensorInfo(tuple(t.shape), t.dtype, _skip_reason(t))


def _skip_reason(t: torch.Tensor) -> str | None:
    """Why a loaded torch tensor cannot be analyzed, or None."""
    if t.layout != torch.strided:
        return f"sparse tensor ({str(t.layout).removeprefix('torch.')})"
    if t.is_meta:
        return "meta tensor: the file stores no values for it"
    dense = t.numel() * t.element_size()
    if dense > view_bytes(t):
        # A stride-0 (expand()ed) view: a few stored bytes can claim any shape, and the analysis
        # would materialize and compare every repeated row. Not a real layer: refuse it.
        return (
            f"broadcast view (a stride of 0): {dense:,} bytes as a dense tensor from "
            f"{view_bytes(t):,} stored; not materialized"
        )
    return None


def view_bytes(t: torch.Tensor) -> int:
    """Bytes of storage a strided tensor's view reaches, from its first element to its last."""
    if t.numel() == 0:
        return 0
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return int((last + 1) * t.element_size())
