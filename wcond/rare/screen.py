"""Which pairs of one axis of a W' may have become near-parallel since the last update."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["PairScreen"]


class PairScreen:
    """The pairs of one axis of a W' that may be near-parallel now, in float32, never missing one.

    A full look takes the vectors' Gram matrix. Cosines of unit vectors of length d in float32
    are off by at most about d * eps (the dot product's rounding in any summation order, and the
    normalisation's), so each pair's angle is taken as a lower bound. The look keeps the unit
    vectors as a snapshot, the pairs within ``_MARGIN`` of the threshold's angle, and for each
    vector a budget: half the gap between the threshold and its closest other partner. Angles
    between lines obey the triangle inequality, so a pair has come no closer than its snapshot
    angle less the angles its two vectors have turned since. Until a vector turns past its
    budget, no pair outside the kept ones can have reached the threshold, and a call costs one
    pass over the vectors: the kept pairs that the bound does not rule out are the candidates
    for the caller's float64 test. Past a budget, the call looks afresh. NaN or Inf never passes
    a comparison: such vectors end up candidates that the float64 test refuses.
    """

    def __init__(self, tau_cos: float) -> None:
        # a near-parallel pair is within this angle (radians) of parallel or anti-parallel
        self.reach = math.acos(1 - tau_cos) if tau_cos < 2 else math.pi
        self.units: Tensor | None = None  # the snapshot, unit rows
        self.budget: Tensor | None = None  # per vector, radians
        self.near: tuple[Tensor, Tensor, Tensor] | None = None  # i < j, angle lower bound
        self.looks = 0  # full looks taken

    def candidates(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        """Index pairs (i, j), i < j, that may pass the near-parallel test now."""
        v = vectors if vectors.dtype == torch.float32 else vectors.float()
        slack = (v.shape[1] + 8) * torch.finfo(torch.float32).eps
        if self.units is not None and self.units.shape == v.shape:
            assert self.budget is not None and self.near is not None
            cos = (v * self.units).sum(dim=1) / v.norm(dim=1) - slack
            turned = cos.clamp_(-1.0, 1.0).acos_().nan_to_num_(nan=math.pi)
            if bool((turned < self.budget).all()):
                i, j, angle = self.near
                left = angle - turned[i] - turned[j] <= self.reach
                return i[left], j[left]
        self.looks += 1
        u = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        cos = (u @ u.T).abs_().fill_diagonal_(0.0)
        # angle lower bound = acos(min(1, |cos| + slack)); near: within reach + _MARGIN
        limit = math.cos(min(math.pi, self.reach + _MARGIN)) - slack
        closest = cos.amax(dim=1)
        # Only rows with a near partner need more than their largest cosine. (u @ u.T is
        # symmetric only up to rounding: a pair may be near from one of its rows alone. It is
        # kept once all the same, and the other row's budget counts it as far, which is safe.)
        rows = torch.nonzero(closest >= limit).flatten()
        sub = cos[rows]
        near = sub >= limit
        r, c = torch.nonzero(near, as_tuple=True)
        n = v.shape[0]
        key = torch.unique(torch.minimum(rows[r], c) * n + torch.maximum(rows[r], c))
        i, j = key // n, key % n  # each near pair once, from whichever row (or both) saw it
        dot = (u[i] * u[j]).sum(dim=1).abs_()  # within the same float32 bound as the Gram's
        pair_angle = (dot + slack).clamp_(max=1.0).acos_().nan_to_num_(nan=0.0)
        closest[rows] = sub.masked_fill_(near, 0.0).amax(dim=1)
        closest_far = (closest + slack).clamp_(max=1.0).acos_()
        self.units, self.near = u, (i, j, pair_angle)
        # NaN (a non-finite vector): no budget, so every call looks afresh, and no pair is near
        self.budget = ((closest_far - self.reach) / 2).nan_to_num_(nan=0.0)
        close = pair_angle <= self.reach
        return i[close], j[close]


# How far (radians) beyond the threshold's angle a full look keeps pairs, to follow them with
# the bound; every other pair gives its vectors at least half of this to turn before the next
# full look (Adam at lr 1e-3 turns a row of unit norm in a 256-wide layer by about 0.02 a step).
_MARGIN = 0.2
