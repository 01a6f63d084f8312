"""Writing checkpoints: a torch file or safetensors, atomically (wcond.output), keeping the source's layout.

What a written file keeps of the checkpoint it came from (a torch file's wrapper and non-tensor
entries, safetensors metadata) is handed over as a :class:`Layout` value.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from wcond.checkpoint.base import Checkpoint
from wcond.checkpoint.target import output_format
from wcond.errors import CheckpointError, show_key
from wcond.output import atomic_path

__all__ = ["Layout", "save_checkpoint"]


@dataclass(frozen=True)
class Layout:
    """What an output keeps of its source: a torch file's object and the key path to its state dict
    (its other entries, an epoch or optimizer state, are written back around the new tensors),
    and safetensors metadata."""

    obj: Any = None
    wrapper: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, ck: Checkpoint) -> Layout:
        """The layout of an opened checkpoint."""
        return cls(ck.obj, ck.wrapper, ck.metadata)

    @property
    def has_extras(self) -> bool:
        """A wrapper holding more than the state dict (entries a safetensors file cannot hold)."""
        return bool(self.wrapper) and isinstance(self.obj, Mapping) and len(self.obj) > 1


def save_checkpoint(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    like: Layout | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` to ``path`` (format from the extension), atomically.

    With ``like`` (the layout of the checkpoint the tensors came from, :meth:`Layout.of`), a torch
    output keeps the source's wrapper and non-tensor entries (a Lightning checkpoint's epoch,
    optimizer state, ...), and a safetensors output keeps its metadata (``metadata`` entries are
    added on top).

    Returns:
        Warnings for the user, e.g. wrapper entries a safetensors file cannot hold.
    """
    fmt = output_format(path)
    warnings: list[str] = []
    meta = dict(like.metadata) if like is not None else {}
    meta.update(metadata or {})
    with atomic_path(path) as tmp:
        if fmt == "safetensors":
            if like is not None and like.obj is not None and like.has_extras:
                warnings.append(
                    f"{path}: safetensors holds tensors only; the source's other entries "
                    "(epoch, optimizer state, ...) were not written"
                )
            for k, t in tensors.items():
                if t.layout != torch.strided or t.is_meta:
                    raise CheckpointError(
                        f"{path}: tensor {show_key(k)} is {'meta' if t.is_meta else 'sparse'}; "
                        "safetensors holds dense tensors only: write a torch file (.pt) instead"
                    )
            save_file({k: _plain(t) for k, t in tensors.items()}, str(tmp), metadata=meta or None)
        else:
            obj: Any = dict(tensors)
            if like is not None and like.obj is not None:
                obj = _rebuild(like.obj, like.wrapper, tensors)
            elif meta:
                warnings.append(
                    f"{path}: a torch file has no place for safetensors metadata; it was not written"
                )
            torch.save(obj, tmp)
    return warnings


def _plain(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses shared or non-contiguous storage: give it a compact copy when needed."""
    t = t.detach().cpu()
    return (
        t.contiguous().clone()
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes
        else t
    )


def _rebuild(obj: Any, wrapper: tuple[str, ...], tensors: Mapping[str, torch.Tensor]) -> Any:
    """The source object with its state dict replaced by ``tensors``, structure and order kept."""
    if wrapper:
        head, *rest = wrapper
        out = _copy_mapping(obj)
        out[head] = _rebuild(obj[head], tuple(rest), tensors)
        return out
    remaining = dict(tensors)
    new_root = _replace(obj, remaining, "")
    new_root.update(remaining)  # keys the source did not have (e.g. factors written by shrink)
    return new_root


def _replace(node: Mapping, remaining: dict[str, torch.Tensor], prefix: str) -> Any:
    out = _copy_mapping(node, empty=True)
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            if key in remaining:
                out[k] = remaining.pop(key)
        elif isinstance(v, Mapping) and _holds_tensor(v):
            out[k] = _replace(v, remaining, key + ".")
        else:
            out[k] = v
    return out


def _holds_tensor(node: Mapping) -> bool:
    return any(
        isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _holds_tensor(v))
        for v in node.values()
    )


def _copy_mapping(node: Mapping, empty: bool = False) -> Any:
    out: Any = OrderedDict() if isinstance(node, OrderedDict) else {}
    if not empty:
        out.update(node)
    return out
