"""wcond: weight analysis and conditioning for PyTorch checkpoints.

Example:
    >>> import wcond
    >>> report = wcond.inspect("model.safetensors")
    >>> loss = task_loss + 1e-3 * wcond.metrics.conv_similarity(model)
"""

from __future__ import annotations

import os as _os
import sys as _sys

# OpenMP's default busy-waiting lets torch's idle worker threads spin between wcond's many small
# operations; with anything else running on the machine that made `wcond init-cs` 6x slower
# (benchmarks/README.md). Passive waiting costs nothing measurable on the large products. It only
# takes effect before torch is first imported, and a value the user set wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from wcond import hub, metrics, monitor
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
    "hub",
    "load_state_dict",
    "metrics",
    "monitor",
    "open_checkpoint",
]
