"""wcond: weight analysis and conditioning for PyTorch checkpoints.

Example:
    >>> import wcond
    >>> report = wcond.inspect("model.safetensors")
    >>> loss = task_loss + 1e-3 * wcond.metrics.conv_similarity(model)
"""

from __future__ import annotations

import importlib
import importlib.util
import os as _os
import sys as _sys
from typing import TYPE_CHECKING, Any

# OpenMP's default busy-waiting lets torch's idle worker threads spin between wcond's many small
# operations; with anything else running on the machine that made `wcond init-cs` 6x slower and
# inspect 5x slower. Never spinning (OMP_WAIT_POLICY=PASSIVE) cured that but made inspect 1.4x
# slower on a quiet machine, where each small operation then waits for its threads to wake. A short
# spin (GOMP_SPINCOUNT=10000 rounds, where libgomp's default is 300,000) keeps both, as measured
# in benchmarks/README.md. It only takes effect before torch is first imported, and a value the
# user set for either variable wins.
if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "10000"

from wcond._version import __version__
from wcond.errors import (
    CheckpointError,
    EngineError,
    UnsafeCheckpointError,
    UsageError,
    WcondError,
)

# The rest of the API imports torch: it is loaded on first use, so that `import wcond` (and with it
# `wcond --help`) stays light. Each name maps to the module that defines it.
_LAZY = {
    "metrics": "wcond.metrics",
    "LayerReport": "wcond.report",
    "Report": "wcond.report",
    "Summary": "wcond.report",
    "analyze_tensor": "wcond.analyze",
    "inspect": "wcond.analyze",
    "inspect_many": "wcond.analyze",
    "init_cs": "wcond.condition",
    "Checkpoint": "wcond.checkpoint.base",
    "load_checkpoint": "wcond.checkpoint.open",
    "open_checkpoint": "wcond.checkpoint.open",
    "load_state_dict": "wcond.checkpoint.factorized",
    "fold": "wcond.shrink.tracing",
}

if TYPE_CHECKING:
    from wcond import metrics
    from wcond.analyze import analyze_tensor, inspect, inspect_many
    from wcond.checkpoint.base import Checkpoint
    from wcond.checkpoint.factorized import load_state_dict
    from wcond.checkpoint.open import load_checkpoint, open_checkpoint
    from wcond.condition import init_cs
    from wcond.report import LayerReport, Report, Summary
    from wcond.shrink.tracing import fold


def __getattr__(name: str) -> Any:
    """Import a heavy API name on first use (PEP 562) and keep it as a module attribute."""
    if name not in _LAZY:
        # A submodule not imported yet (wcond.shrink, wcond.diff, ...), as `import wcond` once gave.
        if not name.startswith("_") and importlib.util.find_spec(f"wcond.{name}") is not None:
            return importlib.import_module(f"wcond.{name}")
        raise AttributeError(f"module 'wcond' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if name == "metrics" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "EngineError",
    "LayerReport",
    "Report",
    "Summary",
    "UnsafeCheckpointError",
    "UsageError",
    "WcondError",
    "__version__",
    "analyze_tensor",
    "fold",
    "init_cs",
    "inspect",
    "inspect_many",
    "load_checkpoint",
    "load_state_dict",
    "metrics",
    "open_checkpoint",
]
