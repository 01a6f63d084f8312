"""The four redundancy metrics, differentiable, one implementation each.

Every number `wcond inspect` reports comes from a function in this module, and the
same functions serve as training regularizers::

    loss = task_loss + beta * wcond.metrics.conv_similarity(model)

Definitions follow ../shared/METRICS.md (the project's contract). Inputs are a weight
tensor of shape (out, in, *kernel), a list of them, or an ``nn.Module`` (whose Conv and
Linear weights are walked). fp16/bf16 are upcast to float32; float64 stays float64.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Pair",
    "PairStats",
    "acv",
    "acv_floor",
    "as_cols",
    "as_float",
    "as_rows",
    "autocorrelation_sums",
    "conv_similarity",
    "conv_similarity_batch",
    "conv_similarity_floor",
    "conv_similarity_floor_of",
    "conv_similarity_norm",
    "filter_energies",
    "near_parallel_among",
    "near_parallel_pairs",
    "norm_dev_max",
    "norm_loss",
    "pair_norm_products",
    "pair_norm_products_of",
    "norm_dev_max_of_norms",
    "norm_loss_of_norms",
    "pair_statistics",
    "rare",
    "reuse_buffers",
    "vector_norms",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Pairwise cosine blocks are at most this many elements (64 MiB in float32), so a
# 32000 x 4096 embedding never materializes its 32000 x 32000 cosine matrix.
_BLOCK_ELEMENTS = 1 << 24


class _Workspace(threading.local):
    depth = 0
    buffers: dict[tuple[str, torch.dtype, torch.device], Tensor]


_workspace = _Workspace()


@contextlib.contextmanager
def reuse_buffers() -> Iterator[None]:
    """Within it, the large temporaries of the metrics are cut from buffers kept across calls.

    A fresh tensor of hundreds of MiB costs a page fault per 4 KiB page on every call, as much as
    the arithmetic on it for a 2048-wide layer; reused buffers pay that once. The buffers are freed
    when the outermost ``with`` ends. Only computations without gradients use them.

    Example:
        >>> with torch.no_grad(), reuse_buffers():
        ...     stats = [pair_statistics(as_rows(w)) for w in weights]
    """
    if _workspace.depth == 0:
        _workspace.buffers = {}
    _workspace.depth += 1
    try:
        yield
    finally:
        _workspace.depth -= 1
        if _workspace.depth == 0:
            _workspace.buffers = {}


def _buffer(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialized tensor: a view of the slot's kept buffer inside reuse_buffers(), else new."""
    if _workspace.depth == 0 or torch.is_grad_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    key = (slot, dtype, device)
    buf = _workspace.buffers.get(key)
    if buf is None or buf.numel() < n:
        del buf  # let the old one go before the larger one is allocated
        _workspace.buffers.pop(key, None)
        buf = _workspace.buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def _float_type(w: Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def as_float(w: Tensor) -> Tensor:
    """w in float32 (float64 stays float64), as every metric computes; w itself when it already is."""
    return _compute_dtype(w)


def _compute_dtype(w: Tensor) -> Tensor:
    """w in float32 (float64 stays float64); a conversion lands in a reused buffer when allowed."""
    dtype = _float_type(w)
    if w.dtype == dtype:
        return w
    if w.requires_grad:
        return w.to(dtype)
    return _buffer("convert", tuple(w.shape), dtype, w.device).copy_(w)


def as_rows(w: Tensor) -> Tensor:
    """Rows of a weight: one flattened vector per output unit (filter, neuron)."""
    return _compute_dtype(w).reshape(w.shape[0], -1)


def as_cols(w: Tensor) -> Tensor:
    """Columns of a weight: one flattened vector per input unit (for a conv, all that reads channel c).

    For a matrix this is a transposed view, no copy.
    """
    w = _compute_dtype(w)
    if w.requires_grad:
        return w.transpose(0, 1).reshape(w.shape[1], -1)
    if math.prod(w.shape[2:]) == 1:  # a matrix or a 1x1 conv: a transposed view
        return w.reshape(w.shape[0], w.shape[1]).transpose(0, 1)
    out = _buffer("cols", (w.shape[1], w.shape[0], *w.shape[2:]), w.dtype, w.device)
    return out.copy_(w.transpose(0, 1)).reshape(w.shape[1], -1)


# --------------------------------------------------------------------------- pairwise cosines


@dataclass(frozen=True)
class Pair:
    """Two vectors (indices into the original rows or columns) and their cosine."""

    i: int
    j: int
    cos: float
    d_euc: float
    near_parallel: bool


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

# Rows whose largest entry lies in [2**-40, 2**40] have squared norms far from float32 underflow
# and overflow for any length up to 2**40, so their norms are taken directly; other rows are first
# divided by a power of two (exact) near their largest entry.
_SAFE_PEAK = (2.0**-40, 2.0**40)


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


def _dead_indices(n: int, live_idx: Tensor | None) -> list[int]:
    if live_idx is None:
        return []
    return sorted(set(range(n)) - set(live_idx.tolist()))


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


def _live_units(v: Tensor, norms: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor]:
    """(indices of the rows of v with a non-zero entry, or None when all have one; their norms; their unit vectors).

    Dead means exactly zero: a row of 1e-25s is live although its squares underflow in float32.
    Rows whose norm is far from 1 are divided by a power of two near their largest entry first
    (exact), so that a row of 1e37s or of subnormals gets its direction right; their norms are
    then returned in float64. The unit vectors keep v's memory layout (a transposed matrix stays
    transposed, for the GEMM), in a reused buffer when allowed. ``norms``: ``vector_norms(v)``
    when the caller has them.
    """
    norms = vector_norms(v) if norms is None else norms
    if v.shape[0]:
        lo, hi = torch.aminmax(norms.detach())
        if _SAFE_PEAK[0] <= float(lo) and float(hi) <= _SAFE_PEAK[1]:  # the common case
            return None, norms, _divide_rows(v, norms)
    peak = v.detach().abs().amax(dim=1) if v.shape[1] else v.new_zeros(v.shape[0])
    idx = None
    if not bool((peak > 0).all()):  # NaN rows count as dead too
        idx = torch.nonzero(peak > 0).flatten()
        v, peak = v[idx], peak[idx]
    if not v.shape[0]:
        return idx, peak, v
    scale = torch.exp2(torch.floor(torch.log2(peak)))[:, None]
    scaled = v / scale
    norms = scaled.norm(dim=1)
    # float64 holds the true norms of any float32 row (up to 2**128 * sqrt(d)).
    return idx, norms.double() * scale.squeeze(1).double(), scaled / norms[:, None]


def vector_norms(v: Tensor) -> Tensor:
    """The norm of each row of v (N, d) in float32 (float64 stays), as ``pair_statistics`` takes them.

    A row holding NaN or Inf gets a NaN or Inf norm, and so does a row whose squares overflow
    float32 (entries beyond about 1e19): a finite result is a cheap proof that v is finite.

    For a transposed matrix these are the column norms of the stored one, taken by row panels: a
    reduction across the stored rows is several times slower than along them in torch, and
    squaring the whole matrix first would allocate its size again.
    """
    v = _compute_dtype(v)
    if v.requires_grad or v.is_contiguous() or v.ndim != 2 or v.stride(0) != 1:
        return v.norm(dim=1)
    stored = v.T  # contiguous (d, n): the vectors are its columns
    sq = v.new_zeros(v.shape[0])
    tmp = _buffer("norm_panel", (min(256, stored.shape[0]), stored.shape[1]), v.dtype, v.device)
    for panel in stored.split(tmp.shape[0]):
        part = tmp[: panel.shape[0]]
        torch.mul(panel, panel, out=part)
        sq += part.sum(dim=0)
    return sq.sqrt_()


def _divide_rows(v: Tensor, norms: Tensor) -> Tensor:
    """v / norms per row, in v's layout (row-major or transposed)."""
    if v.requires_grad:
        return v / norms[:, None]
    if v.ndim == 2 and not v.is_contiguous() and v.stride(0) == 1:
        stored = v.T
        out = _buffer("units", tuple(stored.shape), v.dtype, v.device)
        return torch.div(stored, norms[None, :], out=out).T
    out = _buffer("units", tuple(v.shape), v.dtype, v.device)
    return torch.div(v, norms[:, None], out=out)


def _cosine_blocks(u: Tensor) -> Iterator[tuple[int, Tensor]]:
    """The upper triangle of u u^T in row blocks of at most 2**24 cosines: (first row, cosines).

    Block rows start..stop are taken against columns start..n only, so column 0 of a block is row
    ``start``; entries on or below the diagonal are set to 0, which no cosine statistic counts.
    """
    n, d = u.shape
    # Up to 1024 rows a block: wide GEMMs run near the machine's best rate, and every block costs
    # a dozen small operations on its cosines. At most 2**24 cosines bound the memory.
    block = max(1, min(n, _PANEL_ROWS, _BLOCK_ELEMENTS // max(n, 1)))
    track = u.requires_grad and torch.is_grad_enabled()
    for start in range(0, n - 1, block):
        stop = min(n, start + block)
        m = stop - start
        if track:
            c = u[start:stop] @ u[start:].T
            c[:, :m] = c[:, :m].triu(1)  # only this square holds j <= i
        else:
            c = _buffer("cosines", (m, n - start), u.dtype, u.device)
            if stop < n:
                torch.matmul(u[start:stop], u[stop:].T, out=c[:, m:])
            _upper_square(u[start:stop], c[:, :m])
            c[:, :m].triu_(1)  # also clears what _upper_square left below the diagonal
        yield start, c


# Rows per cosine block; _upper_square halves a diagonal square down to no fewer than
# _SQUARE_TILE rows, and only while the square is worth a call of its own.
_PANEL_ROWS = 1024
_SQUARE_TILE = 256
_SQUARE_SPLIT_WORK = 1 << 25  # multiply-adds: splitting a smaller square saves less than it costs


def _upper_square(x: Tensor, out: Tensor) -> None:
    """x x^T into out on and above its diagonal; what lies below is left unwritten (stale).

    A block's leading square holds its diagonal: computed whole, half of it is wasted (a quarter of
    a 1024-row block's work against 2048 vectors). Halving it recursively computes each
    off-diagonal half once and only the small squares on the diagonal whole. Measured on a 1.1B
    model's decoder layer (seven matrices, 2048 to 5632 vectors): 2% less time a layer than
    256-row blocks with whole squares; 5632-vector Grams 4% to 16% less, 2048-vector ones within
    the noise.
    """
    m, d = x.shape
    if m < 2 * _SQUARE_TILE or m * m * d < _SQUARE_SPLIT_WORK:
        torch.matmul(x, x.T, out=out)
        return
    h = m // 2
    _upper_square(x[:h], out[:h, :h])
    torch.matmul(x[:h], x[h:].T, out=out[:h, h:])
    _upper_square(x[h:], out[h:, h:])


# --------------------------------------------------------------------------- Convolutional Similarity


def autocorrelation_sums(w: Tensor) -> Tensor:
    """R_i = sum_c autocorr_full(K_i[c]) for every filter, shape (out, 2k1-1, 2k2-1, ...), lag m at index m mod (2k-1).

    Small kernels (up to 64 taps: 3x3, 7x7, 3x3x3) go through the Gram matrix of kernel positions,
    G_i[n, n'] = sum_c K_i[c, n] K_i[c, n'], and R_i[m] = sum_{n' - n = m} G_i[n, n']: one batched
    matmul, many times faster than thousands of tiny FFTs. Larger kernels go through the power
    spectrum (Wiener-Khinchin): the DFT of length 2k-1 per axis makes circular autocorrelation
    equal the full linear one.
    """
    w = _compute_dtype(w)
    kernel = tuple(w.shape[2:])
    sizes = [2 * k - 1 for k in kernel]
    taps = math.prod(kernel)
    if taps <= _GRAM_MAX_TAPS:
        # (out, taps, in): contiguous when the caller keeps channels last, a strided view otherwise.
        positions = w.reshape(w.shape[0], w.shape[1], taps).transpose(1, 2)
        gram = _PositionGram.apply(positions).reshape(w.shape[0], taps * taps)
        if gram.device.type == "cpu":
            r = gram.new_zeros(w.shape[0], math.prod(sizes)).index_add(
                1, _lag_index(kernel, gram.device), gram
            )
        else:  # index_add adds with atomics on a GPU (run-to-run noise); a 0/1 matmul does not
            r = gram @ _lag_matrix(kernel, gram.device, gram.dtype)
        return r.reshape(w.shape[0], *sizes)
    spatial = tuple(range(2, w.ndim))
    spec = torch.fft.rfftn(w, s=sizes, dim=spatial)
    power = (spec.real**2 + spec.imag**2).sum(dim=1)  # P_i, summed over input channels
    return torch.fft.irfftn(power, s=sizes, dim=tuple(range(1, len(sizes) + 1)))


_GRAM_MAX_TAPS = 64


class _PositionGram(torch.autograd.Function):
    """G = X X^T for X of shape (out, taps, in).

    The backward is one matmul, (dG + dG^T) X, where autograd would use two.
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x @ x.transpose(1, 2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (grad + grad.transpose(1, 2)) @ x


@functools.lru_cache(maxsize=64)
def _lag_index(kernel: tuple[int, ...], device: torch.device) -> Tensor:
    """For every position pair (n, n') of a kernel, row-major, the flat index of lag n' - n mod (2k-1) per axis."""
    grid = torch.cartesian_prod(*(torch.arange(k) for k in kernel)).reshape(-1, len(kernel))
    lags = (grid[None, :, :] - grid[:, None, :]).remainder(
        torch.tensor([2 * k - 1 for k in kernel])
    )
    flat = torch.zeros(lags.shape[:2], dtype=torch.long)
    for axis, k in enumerate(kernel):
        flat = flat * (2 * k - 1) + lags[..., axis]
    return flat.flatten().to(device)


@functools.lru_cache(maxsize=64)
def _lag_matrix(kernel: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The 0/1 matrix (taps^2, lags) that sums each position pair into its lag (see _lag_index)."""
    index = _lag_index(kernel, torch.device("cpu"))
    lags = math.prod(2 * k - 1 for k in kernel)
    m = torch.zeros(index.numel(), lags, dtype=dtype)
    m[torch.arange(index.numel()), index] = 1
    return m.to(device)


def _group_sums(values: Tensor, groups: int) -> Tensor:
    """Reshape per-filter rows (out, ...) into (groups, out/groups, -1)."""
    out = values.shape[0]
    if out % groups:
        raise ValueError(f"groups={groups} does not divide the {out} output filters")
    return values.reshape(groups, out // groups, -1)


def filter_energies(w: Tensor, groups: int = 1) -> Tensor:
    """|K_i|^2 of every filter, as (groups, filters per group): what CS's norm terms are made of."""
    return _group_sums(_compute_dtype(w).reshape(w.shape[0], -1).pow(2).sum(1), groups).squeeze(-1)


def pair_norm_products(w: Tensor, groups: int) -> Tensor:
    """sum_{i<j, same group} |K_i|^2 |K_j|^2."""
    return pair_norm_products_of(filter_energies(w, groups))


def pair_norm_products_of(energies: Tensor) -> Tensor:
    """``pair_norm_products`` from ``filter_energies``: ((sum n)^2 - sum n^2) / 2 per group, summed."""
    return ((energies.sum(1) ** 2 - (energies**2).sum(1)) / 2).sum()


def _conv_similarity_tensor(w: Tensor, groups: int = 1) -> Tensor:
    if w.ndim < 3:
        raise ValueError(
            f"Convolutional Similarity needs a conv kernel (ndim >= 3), got shape {tuple(w.shape)}"
        )
    return conv_similarity_batch(w[None], groups)[0]


def conv_similarity_batch(w: Tensor, groups: int = 1) -> Tensor:
    """CS of each of L same-shaped conv kernels stacked as (L, out, in, *kernel): a tensor (L,).

    The same computation as ``conv_similarity`` (which is this with L = 1), in one set of batched
    operations for all L kernels: what ``init_cs`` steps, so that a step costs a few large kernel
    launches instead of a few per layer.

    Example:
        >>> conv_similarity_batch(torch.stack([conv_a.weight, conv_b.weight]))  # tensor([cs_a, cs_b])
    """
    if w.ndim < 4:
        raise ValueError(f"conv_similarity_batch needs (L, out, in, *kernel), got {tuple(w.shape)}")
    n_layers, out = w.shape[0], w.shape[1]
    if out % groups:
        raise ValueError(f"groups={groups} does not divide the {out} output filters")
    r = autocorrelation_sums(w.reshape(n_layers * out, *w.shape[2:]))
    r = r.reshape(n_layers, groups, out // groups, -1)
    # CS = sum_{i<j} <R_i, R_j> = (|sum_i R_i|^2 - sum_i |R_i|^2) / 2, per group (METRICS.md).
    total = r.sum(dim=2).pow(2).sum(dim=(1, 2))
    self_terms = r.pow(2).sum(dim=(1, 2, 3))
    return (total - self_terms) / 2


def conv_similarity(weights: Tensor | nn.Module | Iterable[Tensor], groups: int = 1) -> Tensor:
    """Convolutional Similarity (CS paper eq. 10, all channel pairs), summed over conv weights.

    Cost is linear in out x in: the pair terms are inner products of the filters'
    channel-summed autocorrelations. Matrices (ndim 2) contribute nothing. For a module,
    each Conv's own ``groups`` is used; ``groups`` applies to bare tensors.

    Example:
        >>> loss = task_loss + 1e-3 * conv_similarity(model)
    """
    terms = [_conv_similarity_tensor(w, g) for w, g in _weights(weights, groups) if w.ndim >= 3]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def conv_similarity_norm(w: Tensor, groups: int = 1) -> Tensor:
    """Scale-free CS: CS / sum_{i<j} |K_i|^2 |K_j|^2 (1 for 1x1 kernels and white spectra)."""
    return _conv_similarity_tensor(w, groups) / pair_norm_products(w, groups)


def conv_similarity_floor(w: Tensor, groups: int = 1) -> float:
    """Lower bound on CS at the filters' current norms: ((sum n)^2 - L sum n^2) / 2 per group, clamped at 0."""
    return conv_similarity_floor_of(filter_energies(w.detach(), groups), tuple(w.shape[2:]))


def conv_similarity_floor_of(energies: Tensor, kernel: Sequence[int]) -> float:
    """``conv_similarity_floor`` from ``filter_energies`` and the kernel's shape (L lag bins)."""
    bins = math.prod(2 * k - 1 for k in kernel)
    per_group = (energies.sum(1) ** 2 - bins * (energies**2).sum(1)) / 2
    return float(per_group.clamp_min(0).sum())


# --------------------------------------------------------------------------- ACV, norm, RaRe


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


def _weights(
    weights: Tensor | nn.Module | Iterable[Tensor], groups: int = 1
) -> Iterator[tuple[Tensor, int]]:
    """Normalize a tensor, a list of tensors or a module to (weight, groups) pairs."""
    if isinstance(weights, Tensor):
        yield weights, groups
    elif isinstance(weights, nn.Module):
        for m in weights.modules():
            if isinstance(m, _CONV_TYPES):
                yield m.weight, m.groups
            elif isinstance(m, nn.Linear):
                yield m.weight, 1
    else:
        for w in weights:
            yield w, groups
