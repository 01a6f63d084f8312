"""An opened checkpoint: its tensors by key, read on demand, and how a state dict is found.

Below wcond.checkpoint.open (which checks paths, sniffs formats and opens files, indexes and directories)
and wcond.checkpoint.dcp (DCP directories), both of which build a :class:`Checkpoint`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wcond.checkpoint.safetensors_file import SafetensorsHeader, read_header, read_tensor
from wcond.checkpoint.source import natural_key  # re-exported
from wcond.checkpoint.torch_file import MAX_NESTING, load_torch, view_bytes
from wcond.errors import CheckpointError, show_key, show_path

__all__ = ["WRAPPER_KEYS", "Checkpoint", "TensorInfo", "natural_key", "tensor_info"]

# Keys under which training code nests the state dict (Lightning uses "state_dict").
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")


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
        format: "torch", "safetensors", or "sharded" (several files behind an index).
        wrapper: the key path to the state dict inside a torch file, e.g. ("state_dict",) for Lightning.
        metadata: safetensors metadata (the first shard's for a sharded checkpoint).
        files: the files the tensors live in.
    """

    def __init__(self, path: Path, fmt: str, files: list[Path]):
        self.path = path
        self.format = fmt
        self.files = files
        self.wrapper: tuple[str, ...] = ()
        self.metadata: dict[str, str] = {}
        self.obj: Any = None  # the whole unpickled object of a single torch file
        self._infos: dict[str, TensorInfo] = {}
        self._where: dict[str, Path] = {}
        self._headers: dict[Path, SafetensorsHeader] = {}
        self._torch_cache: tuple[Path, dict[str, torch.Tensor]] | None = None

    # -- public API
    def keys(self) -> list[str]:
        """Tensor keys in stored order."""
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, as stored (dtype unchanged)."""
        if key not in self._infos:
            raise CheckpointError(f"{show_path(self.path)}: no tensor named {show_key(key)}")
        where = self._where[key]
        header = self._headers.get(where)
        if header is not None:
            return read_tensor(where, header, key)
        return self._torch_tensors(where)[key]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._infos:
            yield key, self.get(key)

    @property
    def num_bytes(self) -> int:
        return sum(i.numel * i.dtype.itemsize for i in self._infos.values())

    # -- internals
    def _torch_tensors(self, file: Path) -> dict[str, torch.Tensor]:
        if self._torch_cache is None or self._torch_cache[0] != file:
            obj = _torch_load(file)
            _, tensors = _state_dict_of(obj, file)
            self._torch_cache = (file, tensors)
        return self._torch_cache[1]

    def _add_safetensors(self, file: Path) -> None:
        header = read_header(file)
        self._headers[file] = header
        if not self.metadata:
            self.metadata = dict(header.metadata)
        # safetensors does not keep the model's order (writers sort keys); natural order puts
        # "layers.2" before "layers.10", the closest thing to the model's own order.
        for key in sorted(header.entries, key=natural_key):
            e = header.entries[key]
            dtype = e.torch_dtype
            skip = None
            if dtype is None:
                dtype, skip = torch.uint8, f"dtype {e.dtype} has no torch equivalent"
            self._add(key, TensorInfo(e.shape, dtype, skip), file)

    def _add_torch(self, file: Path, keep_object: bool) -> None:
        obj = _torch_load(file)
        wrapper, tensors = _state_dict_of(obj, file)
        self.wrapper = wrapper
        if keep_object:
            self.obj = obj
        self._torch_cache = (file, tensors)
        for key, t in tensors.items():
            self._add(key, tensor_info(t), file)

    def _add(self, key: str, info: TensorInfo, file: Path) -> None:
        if key in self._infos:
            raise CheckpointError(
                f"{show_path(self.path)}: tensor {show_key(key)} appears in both "
                f"{show_path(self._where[key].name)} and {show_path(file.name)}"
            )
        self._infos[key] = info
        self._where[key] = file


def _torch_load(file: Path) -> Any:
    return load_torch(file)


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


def _state_dict_of(obj: Any, file: Path) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
    """Find the state dict inside a loaded object: (key path to it, tensors by flattened key)."""
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Mapping):
        raise CheckpointError(f"{show_path(file)}: holds a {type(obj).__name__}, not a state dict")
    wrapper: tuple[str, ...] = ()
    node: Mapping = obj
    while True:
        direct = any(isinstance(v, torch.Tensor) for v in node.values())
        inner = next(
            (
                k
                for k in WRAPPER_KEYS
                if isinstance(node.get(k), Mapping) and _has_tensor(node[k], file)
            ),
            None,
        )
        if inner is None or direct and not _is_wrapper_dict(node):
            break
        wrapper += (inner,)
        node = node[inner]
    tensors: dict[str, torch.Tensor] = {}
    for key, t in _flatten(node, file):
        if key in tensors:  # {"a.b": x, "a": {"b": y}}: two tensors, one name
            raise CheckpointError(f"{show_path(file)}: two tensors are both named {show_key(key)}")
        tensors[key] = t
    return wrapper, tensors


def _is_wrapper_dict(node: Mapping) -> bool:
    """A dict holding a state dict plus a few loose tensors (e.g. Lightning's extra entries)."""
    return sum(isinstance(v, torch.Tensor) for v in node.values()) < len(node) / 2


def _has_tensor(node: Any, file: Path) -> bool:
    if isinstance(node, torch.Tensor):
        return True
    if isinstance(node, Mapping):
        return any(True for _ in _flatten(node, file))
    return False


def _flatten(node: Mapping, file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted key, tensor) for every tensor in nested mappings, in order; depth-bounded, no recursion."""
    stack: list[tuple[str, Any, int]] = [("", node, 0)]
    while stack:
        key, n, depth = stack.pop()
        if isinstance(n, torch.Tensor):
            yield key, n
        elif isinstance(n, Mapping):
            if depth > MAX_NESTING:
                raise CheckpointError(
                    f"{show_path(file)}: dicts nested more than {MAX_NESTING} levels deep; not a state dict"
                )
            stack.extend(
                (f"{key}.{k}" if key else str(k), v, depth + 1)
                for k, v in reversed(list(n.items()))
            )
