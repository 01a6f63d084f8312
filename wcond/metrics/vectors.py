"""A layer's vectors as every metric takes them (METRICS.md, "Vectors of a layer").

The weights walked from a tensor, a list or a module; upcast to the compute dtype; cut into
rows or columns; their norms, which rows are dead, and their unit vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from wcond.metrics.buffers import _buffer

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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


# Rows whose largest entry lies in [2**-40, 2**40] have squared norms far from float32 underflow
# and overflow for any length up to 2**40, so their norms are taken directly; other rows are first
# divided by a power of two (exact) near their largest entry.
_SAFE_PEAK = (2.0**-40, 2.0**40)


def _dead_indices(n: int, live_idx: Tensor | None) -> list[int]:
    if live_idx is None:
        return []
    return sorted(set(range(n)) - set(live_idx.tolist()))


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
