"""Pair statistics: ACV sums, the largest |cos|, RaRe, the closest pairs and the near-parallel count."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from wcond.metrics.blocks import _cosine_blocks
from wcond.metrics.near_parallel import (
    Pair,
    _cos_error,
    _near_count,
    _near_count_exact,
    _reach,
    _refine_pairs,
)
from wcond.metrics.vectors import _compute_dtype, _dead_indices, _live_units


@dataclass
class PairStats:
    """Everything wcond derives from the pairwise cosines of one set of vectors.

    ``acv_sum``, ``max_abs_cos`` and ``rare`` are tensors that carry gradients; the rest are plain
    numbers.
    """

    n: int  # vectors in all
    live: int  # vectors with a non-zero entry
    dead: list[int]  # indices of zero vectors, left out of every cosine
    acv_sum: Tensor  # sum_{i<j} |cos|
    max_abs_cos: Tensor  # max_{i<j} |cos| (0 with fewer than two live vectors)
    near_parallel: int = 0
    closest: list[Pair] = field(default_factory=list)
    rare_value: Tensor | None = None  # min_{i != j} (1 - cos^2), computed without cancellation
    norms: Tensor | None = (
        None  # |w_i| of every vector, dead ones 0 (float64 where float32 overflows)
    )

    @property
    def pairs(self) -> int:
        return self.live * (self.live - 1) // 2

    @property
    def acv_mean(self) -> float | None:
        return float(self.acv_sum) / self.pairs if self.pairs else None

    @property
    def rare(self) -> Tensor | None:
        """RaRe: min_{i != j} (1 - cos^2); None with fewer than two live vectors."""
        return self.rare_value if self.pairs else None


# Pairs re-evaluated in float64 to pick the RaRe pair: float32 cosines that differ by rounding
# alone may rank the true closest pair a few places down, never out of the top few.
_REFINE = 8


def pair_statistics(
    vectors: Tensor,
    *,
    tau_cos: float | None = None,
    tau_euc: float | None = None,
    top_k: int = 0,
    norms: Tensor | None = None,
) -> PairStats:
    """Pairwise cosine statistics of the rows of ``vectors`` (N, d), computed in blocks.

    Args:
        vectors: one vector per row; rows that are exactly zero are dead and left out.
        tau_cos, tau_euc: when both are given, count near-parallel pairs
            (1 - |cos| < tau_cos and D_euc < tau_euc, with D_euc = |w_short| sqrt(2 - 2|cos|)).
        top_k: also return the ``top_k`` pairs with the largest |cos|.
        norms: ``vector_norms(vectors)``, when the caller already took it (saves a pass).

    Returns:
        A PairStats. Only blocks of at most 2**24 cosines exist at any time, so memory stays
        bounded for any N; on an accelerator the loop over blocks never waits for the device.
        RaRe and the closest pairs are re-evaluated in float64 from the vectors themselves, as
        ``|u_i - s u_j| |u_i + s u_j| / 2`` (s the sign of the cosine), which has no cancellation
        where ``1 - cos^2`` has.

    Example:
        >>> s = pair_statistics(as_rows(w), tau_cos=1e-4, tau_euc=0.1, top_k=3)
        >>> s.acv_mean, float(s.rare), s.near_parallel
    """
    v = _compute_dtype(vectors)
    live_idx, norms, u = _live_units(v, norms)
    n = u.shape[0]
    dead = _dead_indices(v.shape[0], live_idx)
    zero = v.new_zeros(())
    stats = PairStats(n=v.shape[0], live=n, dead=dead, acv_sum=zero, max_abs_cos=zero)
    stats.norms = norms.detach()
    if live_idx is not None:
        stats.norms = norms.new_zeros(v.shape[0]).index_copy_(0, live_idx, stats.norms)
    if n < 2:
        return stats

    count_pairs = tau_cos is not None and tau_euc is not None
    track = torch.is_grad_enabled() and u.requires_grad
    on_host = u.device.type == "cpu"
    reach = _reach(norms, tau_euc, u.dtype) if tau_euc is not None and count_pairs else None
    want = max(top_k, _REFINE)
    v_live = (v if live_idx is None else v[live_idx]).detach()
    acv_parts: list[Tensor] = []
    max_parts: list[Tensor] = []
    cand: list[tuple[Tensor, Tensor, Tensor]] = []  # (|cos|, i, j) in live indexing
    near = torch.zeros((), dtype=torch.long, device=u.device)
    kth = -math.inf  # on the host: the want-th largest |cos| among the candidates so far
    for start, c in _cosine_blocks(u):
        a = c.abs() if track else c.abs_()  # without gradients, no second block-sized buffer
        row_max = a.detach().amax(dim=1)
        acv_parts.append(a.sum())
        max_parts.append(a.amax() if track else row_max.max())
        a_d = a.detach()
        if count_pairs:
            assert tau_cos is not None and tau_euc is not None and reach is not None
            if not on_host:  # count on the device, so the loop never waits for it
                near = near + _near_count(start, a_d, reach, tau_cos)
            elif float(row_max.max()) > 1 - tau_cos - _cos_error(u.shape[1]):
                # Free on the host, and it usually rules the block out: then no pair is a candidate
                # of _near_chunks. The few candidates get D_euc in float64, exact even for rows of 1e37.
                near = near + _near_count_exact(start, v_live, a_d, reach, tau_cos, tau_euc)
        if not on_host:
            cand.append(_block_candidates(start, a_d, row_max, want))
        elif float(row_max.max()) >= kth:  # else no pair of this block can be among the best
            cand.append(_block_candidates(start, a_d, row_max, want))
            best = torch.cat([x[0] for x in cand])
            if best.numel() >= want:
                kth = float(best.topk(want).values[-1])
    stats.acv_sum = torch.stack(acv_parts).sum()
    stats.max_abs_cos = torch.stack(max_parts).max()
    stats.near_parallel = int(near)
    pairs = _best_pairs(cand, want)  # the one wait for the device, after all blocks
    if not pairs:  # every cosine is exactly 0 and only masked entries were picked
        stats.rare_value = 1 - stats.max_abs_cos**2
        return stats
    idx = live_idx.tolist() if live_idx is not None else list(range(n))
    live_v = v if live_idx is None else v[live_idx]  # with gradients, unlike v_live
    i_t = torch.tensor([p[0] for p in pairs], device=v.device)
    j_t = torch.tensor([p[1] for p in pairs], device=v.device)
    cos, sin2, d_euc = _refine_pairs(live_v[i_t], live_v[j_t])
    stats.rare_value = sin2.min().to(v.dtype)
    cos_l, d_l = cos.detach().tolist(), d_euc.tolist()  # one read from the device for all pairs
    order = sorted(range(len(pairs)), key=lambda k: -abs(cos_l[k]))[:top_k]
    for k in order:
        i, j = pairs[k]
        c_k, d_k = cos_l[k], d_l[k]
        np_pair = count_pairs and (1 - abs(c_k) < tau_cos) and (d_k < tau_euc)  # type: ignore[operator]
        stats.closest.append(Pair(idx[i], idx[j], c_k, d_k, bool(np_pair)))
    return stats


def _block_candidates(
    start: int, a: Tensor, row_max: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest |cos| of a block as tensors (|cos|, i, j), without waiting for the device.

    They lie in the k rows with the largest maxima (a row outside those has k larger values
    elsewhere), so only k rows are searched instead of the whole block.
    """
    rows = row_max.topk(min(k, row_max.numel())).indices
    vals, cols = a[rows].topk(min(k, a.shape[1]), dim=1)
    i = (rows + start)[:, None].expand_as(cols)
    return vals.flatten(), i.flatten(), (cols + start).flatten()


def _best_pairs(cand: list[tuple[Tensor, Tensor, Tensor]], k: int) -> list[tuple[int, int]]:
    """The k pairs i < j with the largest |cos| among the blocks' candidates (masked j <= i dropped)."""
    vals = torch.cat([c[0] for c in cand])
    i = torch.cat([c[1] for c in cand])
    j = torch.cat([c[2] for c in cand])
    keep = j > i  # entries on or below the diagonal are masked zeros, not pairs
    vals = torch.where(keep, vals, -1.0)
    top = vals.topk(min(k, vals.numel())).indices
    found = torch.stack([i[top], j[top], keep[top].long()]).tolist()
    return [(a, b) for a, b, ok in zip(*found) if ok]
