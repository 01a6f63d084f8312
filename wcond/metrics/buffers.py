"""Reusable buffers: the large temporaries of the metrics, kept across calls when asked."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
from torch import Tensor


class _Workspace(threading.local):
    depth = 0
    buffers: dict[tuple[str, torch.dtype, torch.device], Tensor]


_workspace = _Workspace()


@contextlib.contextmanager
def reuse_buffers() -> Iterator[None]:
    """Within it, the large temporaries of the metrics are cut from buffers kept across calls.

    A fresh tensor of hundreds of MiB costs a page fault per 4 KiB page on every call, as much as
    the arithmetic on it for a 2048-wide layer; reused buffers pay that once. The buffers are freed
    when the outermost ``with`` ends. Only computations without gradients use them.

    Example:
        >>> with torch.no_grad(), reuse_buffers():
        ...     stats = [pair_statistics(as_rows(w)) for w in weights]
    """
    if _workspace.depth == 0:
        _workspace.buffers = {}
    _workspace.depth += 1
    try:
        yield
    finally:
        _workspace.depth -= 1
        if _workspace.depth == 0:
            _workspace.buffers = {}


def _buffer(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialized tensor: a view of the slot's kept buffer inside reuse_buffers(), else new."""
    if _workspace.depth == 0 or torch.is_grad_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    key = (slot, dtype, device)
    buf = _workspace.buffers.get(key)
    if buf is None or buf.numel() < n:
        del buf  # let the old one go before the larger one is allocated
        _workspace.buffers.pop(key, None)
        buf = _workspace.buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)
