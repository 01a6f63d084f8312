"""wcond: weight analysis and conditioning for PyTorch checkpoints.

Example:
    >>> import wcond
    >>> report = wcond.inspect("model.safetensors")
    >>> loss = task_loss + 1e-3 * wcond.metrics.conv_similarity(model)
"""

from __future__ import annotations

__version__ = "0.1.0"

from wcond import metrics
from wcond.analyze import LayerReport, Report, Summary, analyze_tensor, inspect
from wcond.condition import init_cs
from wcond.errors import CheckpointError, UnsafeCheckpointError, UsageError, WcondError
from wcond.load import Checkpoint, load_checkpoint, open_checkpoint
from wcond.shrink import load_state_dict

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LayerReport",
    "Report",
    "Summary",
    "UnsafeCheckpointError",
    "UsageError",
    "WcondError",
    "__version__",
    "analyze_tensor",
    "init_cs",
    "inspect",
    "load_checkpoint",
    "load_state_dict",
    "metrics",
    "open_checkpoint",
]
