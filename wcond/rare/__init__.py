"""Fusing near-parallel rows and columns while a model trains: the RaRe paper's Algorithm 1.

Lee et al., "Rank redundancy" (docs/METRICS.md, References), Section 3: each weight is kept as
``P W' Q`` where only W' trains and P, Q are fixed sparse maps (one entry per original row and
column). After every update, each W' whose rows or columns hold a near-parallel pair (either
sign, the test of METRICS.md) has that pair fused by the least-squares rule of
:func:`wcond.shrink.fuse_vectors`, and P or Q absorbs the coefficients, so the layer computes the
same function up to float rounding for an exactly (anti-)parallel pair. The optimizer keeps its
state for the rows and columns that stay. A checkpoint exported from it is in wcond's factorized
format: ``wcond.load_state_dict`` gives back the original architecture's state dict.

Example:
    >>> fusion = wcond.rare.DynamicFusion(model, optimizer, frobenius=True)
    >>> for x, y in data:
    ...     loss = loss_fn(model(x), y) + fusion.regularizer()
    ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
    ...     fusion.step()
    >>> fusion.export("small.safetensors")

The package follows the steps: :mod:`.weight` keeps a layer's weight as P W' Q (a torch
parametrization), :mod:`.screen` finds the pairs that may have become near-parallel after an
update, :mod:`.fusion` fuses them and carries the optimizer along, exports and reports, and
:mod:`.lightning` wraps it all as a Lightning callback.
"""

from __future__ import annotations

from typing import Any

from wcond.rare.fusion import LAMBDA_L2, LAMBDA_RARE, DynamicFusion, FusedLayer, FusionReport

# DynamicFusionCallback (a Lightning callback, built on first use) is left out of __all__, so
# that `import *` does not need Lightning.
__all__ = ["LAMBDA_L2", "LAMBDA_RARE", "DynamicFusion", "FusedLayer", "FusionReport"]


def __getattr__(name: str) -> Any:
    # The Lightning callback is built on first use, so that wcond needs Lightning only for it.
    if name == "DynamicFusionCallback":
        from wcond.rare.lightning import lightning_callback

        cls = lightning_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'wcond.rare' has no attribute {name!r}")
