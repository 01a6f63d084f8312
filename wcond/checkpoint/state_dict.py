"""Finding the state dict inside a loaded object: unwrapping training wrappers, flattening nested dicts.

A torch file (and the nested state a DCP directory describes) may hold the state dict at the top
or under a wrapper such as Lightning's ``{"state_dict": ..., "epoch": ...}``; both readers find it
here, by the same rule.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from wcond.errors import CheckpointError, show_key, show_path

__all__ = ["MAX_NESTING", "WRAPPER_KEYS", "find_state_dict"]

# Containers nested deeper than this are not a checkpoint; walking them would recurse without end.
MAX_NESTING = 100
# Keys under which training code nests the state dict (Lightning uses "state_dict").
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")


def find_state_dict(obj: Any, file: Path) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
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
