"""Reading and writing checkpoints: one reader per format, one place that picks among them.

The public face is loaded on first use (PEP 562): ``wcond.checkpoint.source`` checks paths from the
command line without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "Checkpoint": "wcond.checkpoint.base",
    "TensorInfo": "wcond.checkpoint.base",
    "tensor_info": "wcond.checkpoint.base",
    "open_checkpoint": "wcond.checkpoint.open",
    "load_checkpoint": "wcond.checkpoint.open",
    "load_state_dict": "wcond.checkpoint.factorized",
    "save_checkpoint": "wcond.checkpoint.write",
}

if TYPE_CHECKING:
    from wcond.checkpoint.base import Checkpoint, TensorInfo, tensor_info
    from wcond.checkpoint.factorized import load_state_dict
    from wcond.checkpoint.open import load_checkpoint, open_checkpoint
    from wcond.checkpoint.write import save_checkpoint


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'wcond.checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "Checkpoint",
    "TensorInfo",
    "load_checkpoint",
    "load_state_dict",
    "open_checkpoint",
    "save_checkpoint",
    "tensor_info",
]
