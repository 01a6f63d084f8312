"""ACV, Norm Loss and RaRe: the losses made of pair statistics and row norms, with their floors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from wcond.metrics.pairs import pair_statistics
from wcond.metrics.vectors import _weights, as_cols, as_rows


def acv(weights: Tensor | nn.Module | Iterable[Tensor]) -> Tensor:
    """Sum over weights of sum_{i<j} |cos(w_i, w_j)| between live rows (ACV paper eq. 9, no gamma)."""
    terms = [pair_statistics(as_rows(w)).acv_sum for w, _ in _weights(weights)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def acv_floor(n: int, d: int) -> float:
    """Welch-type lower bound on acv_sum for n unit vectors in d dimensions."""
    return max(0.0, (n * n / d - n) / 2) if d else 0.0


def _row_norms(w: Tensor) -> Tensor:
    return as_rows(w).norm(dim=1)


def norm_loss(weights: Tensor | nn.Module | Iterable[Tensor]) -> Tensor:
    """Norm Loss (eq. 3): sum over rows of (1 - |w_o|)^2, summed over weights."""
    terms = [norm_loss_of_norms(_row_norms(w)) for w, _ in _weights(weights)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def norm_dev_max(w: Tensor) -> Tensor:
    """max_o |1 - |w_o||."""
    return norm_dev_max_of_norms(_row_norms(w))


def norm_loss_of_norms(norms: Tensor) -> Tensor:
    """Norm Loss from the row norms |w_o| (``PairStats.norms`` of the rows): sum_o (1 - |w_o|)^2."""
    return (1 - norms).pow(2).sum()


def norm_dev_max_of_norms(norms: Tensor) -> Tensor:
    """norm_dev_max from the row norms: max_o |1 - |w_o||."""
    return (1 - norms).abs().max()


def rare(weights: Tensor | nn.Module | Iterable[Tensor], axis: str = "rows") -> Tensor:
    """RaRe loss: min_{i != j} (1 - cos^2) over live rows (or ``axis="cols"``), summed over weights.

    Minimizing it drives the closest pair of each weight towards (anti-)parallel, which is what
    lets ``wcond shrink`` fuse them. Weights with fewer than two live vectors contribute 0.
    """
    if axis not in ("rows", "cols"):
        raise ValueError(f"axis must be 'rows' or 'cols', got {axis!r}")
    pick = as_rows if axis == "rows" else as_cols
    terms = []
    for w, _ in _weights(weights):
        value = pair_statistics(pick(w)).rare
        if value is not None:
            terms.append(value)
    return torch.stack(terms).sum() if terms else torch.zeros(())
