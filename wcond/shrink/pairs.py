"""Finding and fusing near-parallel vectors: the greedy RaRe merge of one axis (METRICS.md, "Fusing")."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from wcond import metrics
from wcond.checkpoint.factorized import along_dim

__all__ = ["Grouping", "fuse_vectors"]


@dataclass
class Grouping:
    """How N vectors of one axis were fused: vector k is rebuilt as ``coef[k] * fused[index[k]]``.

    Kept vectors stay in their original order; ``kept_indices`` names the original vector whose
    slot each fused vector took.
    """

    index: Tensor  # (N,) int64
    coef: Tensor  # (N,) float64
    kept_indices: list[int]
    fused: int = 0  # pairs fused: N - kept
    max_angle: float | None = None  # degrees, the widest pair fused (angle up to sign)

    @property
    def kept(self) -> int:
        return len(self.kept_indices)

    @property
    def removed(self) -> list[int]:
        """Original indices that no longer have a slot of their own."""
        keep = set(self.kept_indices)
        return [k for k in range(self.index.numel()) if k not in keep]


def fuse_vectors(
    vectors: Tensor,
    *,
    tau_cos: float,
    tau_euc: float,
    positive: bool = False,
    pairs: Iterable[metrics.Pair] | None = None,
) -> Grouping:
    """Greedy RaRe merging of the near-parallel rows of ``vectors`` (N, d), closest pair first.

    Candidates come from the blocked search of :func:`wcond.metrics.near_parallel_pairs`. Each
    fusion keeps the shorter (group) vector, and the fused vector, the best fit of its group, is
    re-tested against every vector that remains, so groups of three or more form when they
    pass the same test. ``positive`` fuses only pairs with cos > 0 (what folding through a ReLU
    needs). Zero vectors are never fused. ``pairs``: the near-parallel pairs, when the caller has
    found them already (``wcond.metrics.near_parallel_among`` on its candidates).
    """
    v = vectors.detach()
    n = v.shape[0]
    heap = [
        (1 - abs(p.cos), p.i, p.j, 0, 0)
        for p in (
            metrics.near_parallel_pairs(v, tau_cos=tau_cos, tau_euc=tau_euc)
            if pairs is None
            else pairs
        )
        if not positive or p.cos > 0
    ]
    groups: dict[
        int, list[tuple[int, float]]
    ] = {}  # kept index -> (member, coefficient), fused groups only
    absorbed = [False] * n
    widest = 0.0
    fused = 0
    if heap:
        heapq.heapify(heap)
        work = v.clone()  # row k: the current vector of the group kept at k
        norms = work.norm(dim=1)
        alive = norms > 0
        norm_list, alive_list = norms.tolist(), alive.tolist()
        version = [0] * n
        while heap:
            gap, a, b, va, vb = heapq.heappop(heap)
            if not (alive_list[a] and alive_list[b]) or version[a] != va or version[b] != vb:
                continue  # a or b was fused since this pair was measured; its new vector was re-tested
            # Keep the shorter vector (the paper: keeping the longer one lets it grow without bound).
            keep, drop = (a, b) if (norm_list[a], a) <= (norm_list[b], b) else (b, a)
            r = float(work[drop] @ work[keep]) / norm_list[keep] ** 2
            s = math.sqrt(1 + r * r)
            members = [(m, c / s) for m, c in groups.pop(keep, [(keep, 1.0)])]
            members += [(m, c * r / s) for m, c in groups.pop(drop, [(drop, 1.0)])]
            groups[keep] = members
            work[keep] = (work[keep] + r * work[drop]) / s  # W q, the least-squares fused vector
            new_norm = float(work[keep].norm())
            norms[keep], norm_list[keep] = new_norm, new_norm
            alive[drop], alive_list[drop], absorbed[drop] = False, False, True
            version[keep] += 1
            fused += 1
            widest = max(widest, math.degrees(math.acos(min(1.0, max(0.0, 1 - gap)))))
            for other, gap2 in _retest(work, norms, alive, keep, tau_cos, tau_euc, positive):
                lo, hi = min(keep, other), max(keep, other)
                heapq.heappush(heap, (gap2, lo, hi, version[lo], version[hi]))
    kept = [k for k in range(n) if not absorbed[k]]
    slot = {k: p for p, k in enumerate(kept)}
    index = [slot.get(k, -1) for k in range(n)]
    coef = [1.0] * n
    for root, members in groups.items():
        for m, c in members:
            index[m], coef[m] = slot[root], c
    return Grouping(
        torch.tensor(index, dtype=torch.int64),
        torch.tensor(coef, dtype=torch.float64),
        kept,
        fused,
        widest if fused else None,
    )


def _retest(
    work: Tensor,
    norms: Tensor,
    alive: Tensor,
    k: int,
    tau_cos: float,
    tau_euc: float,
    positive: bool,
) -> Iterable[tuple[int, float]]:
    """(other, 1 - |cos|) for every remaining vector near-parallel to ``work[k]`` (the test of METRICS.md)."""
    cos = (work @ work[k]) / (
        norms * norms[k]
    )  # zero vectors give NaN, which fails every test below
    a = cos.abs().clamp(max=1.0)
    d_euc = torch.minimum(norms, norms[k]) * torch.sqrt((2 - 2 * a).clamp_min(0))
    hit = alive & (1 - a < tau_cos) & (d_euc < tau_euc)
    if positive:
        hit &= cos > 0
    hit[k] = False
    idx = torch.nonzero(hit).flatten()
    return zip(idx.tolist(), (1 - a[idx]).tolist())


def compress(w: Tensor, g: Grouping, dim: int) -> Tensor:
    """P^T W along ``dim``: fused[g] = sum_{k in g} coef[k] w_k, the least-squares W' for this grouping."""
    shape = list(w.shape)
    shape[dim] = g.kept
    scaled = w * g.coef.to(w.device, w.dtype).view(along_dim(w.ndim, dim))
    return w.new_zeros(shape).index_add_(dim, g.index.to(w.device), scaled)
