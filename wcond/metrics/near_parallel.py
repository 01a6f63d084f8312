"""The near-parallel test (METRICS.md): float32 candidates from the blocks, decided in float64."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from wcond.metrics.blocks import _cosine_blocks
from wcond.metrics.vectors import _compute_dtype, _live_units


@dataclass(frozen=True)
class Pair:
    """Two vectors (indices into the original rows or columns) and their cosine."""

    i: int
    j: int
    cos: float
    d_euc: float
    near_parallel: bool


def _refine_pairs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """cos, 1 - cos^2 and D_euc of the row pairs (a[k], b[k]), in float64, differentiable.

    Each row is divided by its largest magnitude first, so no square overflows or underflows.
    With unit vectors and s the sign of the cosine, |u_a - s u_b|^2 = 2 (1 - |cos|) and
    |u_a + s u_b|^2 = 2 (1 + |cos|): their product over 4 is 1 - cos^2, free of the cancellation of
    1 - cos^2 near |cos| = 1, and D_euc = min(|a|, |b|) |u_a - s u_b| (METRICS.md identity).
    """
    a, b = a.double(), b.double()
    pa = a.detach().abs().amax(dim=1, keepdim=True)
    pb = b.detach().abs().amax(dim=1, keepdim=True)
    na, nb = (a / pa).norm(dim=1, keepdim=True), (b / pb).norm(dim=1, keepdim=True)
    ua, ub = a / pa / na, b / pb / nb
    cos = (ua * ub).sum(dim=1).clamp(-1.0, 1.0)
    s = torch.where(cos.detach() < 0, -1.0, 1.0).to(a.dtype)[:, None]
    minus = (ua - s * ub).norm(dim=1)
    plus = (ua + s * ub).norm(dim=1)
    shorter = torch.minimum(pa * na, pb * nb).squeeze(1)
    return cos, (minus * plus / 2) ** 2, shorter.detach() * minus.detach()


def _near_count(start: int, a: Tensor, reach: Tensor, tau_cos: float) -> Tensor:
    """How many pairs of one block of |cos| are near-parallel, as a device tensor (no wait)."""
    lim = torch.maximum(reach[start : start + a.shape[0], None], reach[None, start:])
    chord = (2 - 2 * a).clamp_min_(0).sqrt_()  # sqrt(2 - 2|cos|) = |u_i - s u_j|
    return (((1 - a) < tau_cos) & (chord < lim)).sum()


def near_parallel_pairs(vectors: Tensor, *, tau_cos: float, tau_euc: float) -> Iterator[Pair]:
    """Every near-parallel pair i < j of the rows of ``vectors`` (N, d), found block by block.

    The same test as ``pair_statistics``' count (1 - |cos| < tau_cos and D_euc < tau_euc), so it
    yields exactly that many pairs, without ever holding the N x N cosine matrix.
    """
    v = _compute_dtype(vectors).detach()
    live_idx, norms, u = _live_units(v)
    idx = live_idx.tolist() if live_idx is not None else list(range(u.shape[0]))
    v_live = v if live_idx is None else v[live_idx]
    reach = _reach(norms, tau_euc, u.dtype)
    for start, c in _cosine_blocks(u):
        for i, j, cos, d in _near_in_block(start, v_live, c.abs_(), reach, tau_cos, tau_euc):
            yield Pair(idx[i], idx[j], cos, d, True)


def near_parallel_among(
    vectors: Tensor, i: Tensor, j: Tensor, *, tau_cos: float, tau_euc: float
) -> list[Pair]:
    """The pairs (i[k], j[k]) of rows of ``vectors`` that are near-parallel, decided in float64.

    The test and the float64 evaluation of :func:`near_parallel_pairs`, for candidate pairs a
    caller has already narrowed down (zero rows never pass).
    """
    i, j, cos, d_euc = _passing(vectors.detach(), i, j, tau_cos, tau_euc)
    found = torch.stack([i.double(), j.double(), cos, d_euc]).tolist()
    return [Pair(int(a), int(b), c, d, True) for a, b, c, d in zip(*found)]


def _passing(
    v: Tensor, i: Tensor, j: Tensor, tau_cos: float, tau_euc: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The row pairs (i[k], j[k]) of v that pass the near-parallel test in float64: (i, j, cos, D_euc)."""
    cos, _, d_euc = _refine_pairs(v[i], v[j])
    ok = ((1 - cos.abs()) < tau_cos) & (d_euc < tau_euc)
    return i[ok], j[ok], cos[ok], d_euc[ok]


def _reach(norms: Tensor, tau_euc: float, dtype: torch.dtype) -> Tensor:
    """tau_euc / |w_i| per vector: D_euc < tau_euc <=> sqrt(2 - 2|cos|) < max(reach_i, reach_j).

    Taken in float64, so that huge or tiny norms give 0 or inf, not NaN.
    """
    return (tau_euc / norms.detach().double()).to(dtype)


# Candidate pairs are re-evaluated in float64 in chunks of about this many entries of their vectors.
_REFINE_ELEMENTS = 1 << 20


def _near_in_block(
    start: int, v: Tensor, a: Tensor, reach: Tensor, tau_cos: float, tau_euc: float
) -> Iterator[tuple[int, int, float, float]]:
    """Near-parallel pairs of one block of |cos| of the live rows v, in live indexing: (i, j, cos, D_euc)."""
    for i, j, cos, d_euc in _near_chunks(start, v, a, reach, tau_cos, tau_euc):
        yield from zip(i.tolist(), j.tolist(), cos.tolist(), d_euc.tolist())


def _near_count_exact(
    start: int, v: Tensor, a: Tensor, reach: Tensor, tau_cos: float, tau_euc: float
) -> int:
    """How many pairs ``_near_in_block`` yields, counted without a Python step per pair."""
    return sum(len(c[0]) for c in _near_chunks(start, v, a, reach, tau_cos, tau_euc))


def _near_chunks(
    start: int, v: Tensor, a: Tensor, reach: Tensor, tau_cos: float, tau_euc: float
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The near-parallel pairs of one block, as tensors (i, j, cos, D_euc) a chunk at a time.

    The block's |cos| (float32 for float32 weights) only picks candidates; their cosine and D_euc
    are taken again in float64 (``_refine_pairs``), which decides. A float32 |cos| of vectors of
    length d is off by at most about d units in the last place, so the candidates are the pairs
    within that of both thresholds: every pair float64 accepts, and with a loose tau_cos not the
    whole block. They are refined in chunks, so memory stays bounded however many there are.
    """
    # Generous on both sides: this only spares the float64 pass the pairs that cannot pass it.
    err = _cos_error(v.shape[1])
    bi, bj = torch.nonzero((1 - a) < tau_cos + err, as_tuple=True)
    if not len(bi):
        return
    i, j = bi + start, bj + start
    upper = j > i  # entries on or below the diagonal are masked zeros, not pairs
    bi, bj, i, j = bi[upper], bj[upper], i[upper], j[upper]
    lim = torch.maximum(reach[i], reach[j]).double()  # from float32 norms: off by far below 2**-10
    chord2 = (2 - 2 * a[bi, bj].double()).clamp_min(0)
    keep = chord2 < lim * lim * (1 + 2.0**-10) + 2 * err  # chord2 = 2 - 2|cos|
    i, j = i[keep], j[keep]
    step = max(1, _REFINE_ELEMENTS // max(1, v.shape[1]))
    for k in range(0, len(i), step):
        found = _passing(v, i[k : k + step], j[k : k + step], tau_cos, tau_euc)
        if len(found[0]):
            yield found


def _cos_error(d: int) -> float:
    """A bound on how far a block's float32 |cos| of vectors of length d lies from the true one.

    Twice the float32 dot product's bound, (d + 2) units of 2**-24, so that every float32 screen
    on |cos| lets through every pair the float64 test may accept.
    """
    return (d + 2) * 2.0**-23
