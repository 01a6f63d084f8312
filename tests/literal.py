"""Literal float64 definitions of every wcond metric, slow and obvious.

These follow docs/METRICS.md word for word: explicit Python loops over pairs,
channels, lags and positions, sums taken with ``math.fsum`` (correctly rounded), no FFT
and none of the identities METRICS.md lists as "facts that make it fast". The fast code
in ``wcond.metrics`` is checked against them, so they must stay this way.

Inputs are a numpy array or a torch tensor ``w`` of shape (out, in, *kernel) (or, for the
vector functions, a sequence of 1-D vectors); everything is converted to float64 numpy
first. Cost is polynomial in every size with a Python-level constant: keep test layers
tiny (conv_similarity is O(out^2 in^2 prod(k)^2) Python steps).

Orientation of the full cross-correlation (``full_xcorr``), used throughout::

    full_xcorr(a, b)[m + ka - 1] = sum_n a[n] * b[n + m],   m = 1-ka .. kb-1 per axis,

with b read as 0 outside its support. This is the paper's eq. 6 (K1 (x) K2)[m] =
sum_n K1[n] K2[n + m], and also its eq. 1b/2: the full feature map F = K (x) X is
``full_xcorr(K, X)``. It equals ``torch.nn.functional.conv1d(b, a, padding=ka-1)``
and ``numpy.correlate(b, a, "full")``. Swapping a and b flips the result along every
axis, so squared norms (and hence CS) do not depend on the orientation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "acv_floor",
    "acv_mean",
    "acv_sum",
    "clip_lags",
    "cols",
    "conv_similarity",
    "conv_similarity_norm",
    "cos",
    "cs_floor",
    "cs_pair",
    "d_euc",
    "dead_indices",
    "feature_map",
    "feature_map_inner",
    "full_xcorr",
    "live_indices",
    "near_parallel_pairs",
    "norm_dev_max",
    "norm_loss",
    "rare",
    "rows",
    "to_f64",
]


# --------------------------------------------------------------------------- conversion


def to_f64(w: Any) -> np.ndarray:
    """A numpy float64 copy of a numpy array, torch tensor (any dtype) or nested list."""
    if hasattr(w, "detach"):  # torch.Tensor, without importing torch here
        w = w.detach().cpu().double().numpy()
    return np.array(w, dtype=np.float64)


def _vectors(vectors: Iterable[Any]) -> list[np.ndarray]:
    return [to_f64(v).ravel() for v in vectors]


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """sum_k a_k b_k, correctly rounded."""
    return math.fsum(x * y for x, y in zip(a.ravel().tolist(), b.ravel().tolist(), strict=True))


def _sq(a: np.ndarray) -> float:
    return _dot(a, a)


def _pow2_exponent(a: np.ndarray) -> int:
    """e with max|a| * 2**-e in [0.5, 1); 0 for a zero or non-finite a."""
    peak = float(np.max(np.abs(a))) if a.size else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return 0
    return math.frexp(peak)[1]


def _norm(a: np.ndarray) -> float:
    """|a|, scaled by an exact power of two first so that tiny or huge entries neither underflow nor overflow."""
    e = _pow2_exponent(a)
    return math.ldexp(math.sqrt(_sq(np.ldexp(a, -e))), e)


# --------------------------------------------------------------------------- vectors of a layer


def rows(w: Any) -> list[np.ndarray]:
    """Output units: ``w[o].flatten()`` for o = 0..out-1."""
    w = to_f64(w)
    if w.ndim < 2:
        raise ValueError(f"rows needs a weight of ndim >= 2, got shape {w.shape}")
    return [w[o].flatten() for o in range(w.shape[0])]


def cols(w: Any) -> list[np.ndarray]:
    """Input units: ``w[:, c].flatten()`` for c = 0..in-1."""
    w = to_f64(w)
    if w.ndim < 2:
        raise ValueError(f"cols needs a weight of ndim >= 2, got shape {w.shape}")
    return [w[:, c].flatten() for c in range(w.shape[1])]


def dead_indices(vectors: Iterable[Any]) -> list[int]:
    """Indices of vectors whose norm is exactly 0 (every entry is 0)."""
    return [k for k, v in enumerate(_vectors(vectors)) if not np.any(v != 0.0)]


def live_indices(vectors: Iterable[Any]) -> list[int]:
    """Indices of vectors with non-zero norm."""
    vs = _vectors(vectors)
    dead = set(dead_indices(vs))
    return [k for k in range(len(vs)) if k not in dead]


def cos(a: Any, b: Any) -> float:
    """a.b / (|a| |b|); not clamped to [-1, 1], so rounding can leave it 1 ulp outside."""
    a, b = to_f64(a).ravel(), to_f64(b).ravel()
    # Exact power-of-two rescaling (cos is scale-free) keeps 1e-200-sized vectors from underflowing.
    a, b = np.ldexp(a, -_pow2_exponent(a)), np.ldexp(b, -_pow2_exponent(b))
    na, nb = _norm(a), _norm(b)
    if na == 0.0 or nb == 0.0:
        raise ValueError("cos of a zero vector is undefined")
    return _dot(a, b) / (na * nb)


# --------------------------------------------------------------------------- ACV


def acv_sum(vectors: Iterable[Any]) -> float:
    """sum_{i<j} |cos(w_i, w_j)| over live vectors; 0.0 with fewer than two."""
    vs = _vectors(vectors)
    live = live_indices(vs)
    terms = []
    for a in range(len(live)):
        for b in range(a + 1, len(live)):
            terms.append(abs(cos(vs[live[a]], vs[live[b]])))
    return math.fsum(terms)


def acv_mean(vectors: Iterable[Any]) -> float | None:
    """acv_sum / (N(N-1)/2) with N live vectors; None with fewer than two."""
    vs = _vectors(vectors)
    n = len(live_indices(vs))
    if n < 2:
        return None
    return acv_sum(vs) / (n * (n - 1) / 2)


def acv_floor(n: int, d: int) -> float:
    """Welch floor on acv_sum for n vectors of dimension d: max(0, (n^2/d - n)/2)."""
    return max(0.0, (n * n / d - n) / 2)


# --------------------------------------------------------------------------- Convolutional Similarity


def full_xcorr(a: Any, b: Any) -> np.ndarray:
    """Full N-D cross-correlation, ``out[m + ka - 1] = sum_n a[n] b[n + m]`` (see module docstring).

    a and b must have the same ndim (1, 2 or 3 spatial axes, or more); shapes may differ,
    giving ka + kb - 1 lags per axis (2k - 1 for equal shapes, lag 0 at index k - 1).
    """
    a, b = to_f64(a), to_f64(b)
    if a.ndim != b.ndim or a.ndim == 0:
        raise ValueError(f"full_xcorr needs equal ndim >= 1, got {a.shape} and {b.shape}")
    out_shape = tuple(ka + kb - 1 for ka, kb in zip(a.shape, b.shape, strict=True))
    out = np.zeros(out_shape, dtype=np.float64)
    for t in itertools.product(*(range(s) for s in out_shape)):
        m = tuple(ti - (ka - 1) for ti, ka in zip(t, a.shape, strict=True))  # the lag
        terms = []
        for n in itertools.product(*(range(s) for s in a.shape)):
            q = tuple(ni + mi for ni, mi in zip(n, m, strict=True))
            if all(0 <= qi < kb for qi, kb in zip(q, b.shape, strict=True)):
                terms.append(float(a[n]) * float(b[q]))
        out[t] = math.fsum(terms)
    return out


def cs_pair(k_i: Any, k_j: Any) -> float:
    """One pair term of eq. 10: sum_{c1, c2} ||K_i[c1] (x) K_j[c2]||^2 over every channel pair."""
    k_i, k_j = to_f64(k_i), to_f64(k_j)
    if k_i.shape != k_j.shape or k_i.ndim < 2:
        raise ValueError(
            f"cs_pair needs two (in, *kernel) filters, got {k_i.shape} and {k_j.shape}"
        )
    terms = []
    for c1 in range(k_i.shape[0]):
        for c2 in range(k_j.shape[0]):
            terms.append(_sq(full_xcorr(k_i[c1], k_j[c2])))
    return math.fsum(terms)


def _group_pairs(out: int, groups: int) -> list[tuple[int, int]]:
    """Pairs i < j of filters in the same group (consecutive blocks of out/groups filters)."""
    if groups < 1 or out % groups:
        raise ValueError(f"{out} filters cannot be split into {groups} groups")
    per = out // groups
    pairs = []
    for g in range(groups):
        for i in range(g * per, (g + 1) * per):
            for j in range(i + 1, (g + 1) * per):
                pairs.append((i, j))
    return pairs


def conv_similarity(w: Any, groups: int = 1) -> float | None:
    """CS, eq. 10 with c2 running over 0..C-1: sum over same-group pairs i<j of cs_pair; None for ndim < 3."""
    w = to_f64(w)
    if w.ndim < 3:
        return None
    return math.fsum(cs_pair(w[i], w[j]) for i, j in _group_pairs(w.shape[0], groups))


def conv_similarity_norm(w: Any, groups: int = 1) -> float | None:
    """CS / sum_{i<j, same group} |K_i|^2 |K_j|^2; None for ndim < 3 or a zero denominator."""
    w = to_f64(w)
    if w.ndim < 3:
        return None
    pairs = _group_pairs(w.shape[0], groups)
    den = math.fsum(_sq(w[i]) * _sq(w[j]) for i, j in pairs)
    if den == 0.0:
        return None
    cs = conv_similarity(w, groups)
    assert cs is not None
    return cs / den


def cs_floor(w: Any, groups: int = 1, clamp: bool = True) -> float | None:
    """Lower bound on CS at fixed filter norms, summed over groups; None for ndim < 3.

    Per group: ((sum n_i)^2 - L sum n_i^2) / 2 with n_i = |K_i|^2 and L = prod(2k - 1)
    over the spatial axes (the number of DFT bins). With ``clamp`` (the default) each
    group's value is raised to 0 before summing, since every group's CS is >= 0 anyway;
    ``clamp=False`` gives the raw (possibly negative) sum.
    """
    w = to_f64(w)
    if w.ndim < 3:
        return None
    out = w.shape[0]
    if groups < 1 or out % groups:
        raise ValueError(f"{out} filters cannot be split into {groups} groups")
    per = out // groups
    n_bins = math.prod(2 * k - 1 for k in w.shape[2:])
    values = []
    for g in range(groups):
        n = [_sq(w[i]) for i in range(g * per, (g + 1) * per)]
        value = (math.fsum(n) ** 2 - n_bins * math.fsum(x * x for x in n)) / 2
        values.append(max(0.0, value) if clamp else value)
    return math.fsum(values)


# --------------------------------------------------------------------------- Norm deviation


def norm_loss(w: Any) -> float:
    """sum_o (1 - |w_o|)^2 over all rows, dead rows included (each adds 1)."""
    return math.fsum((1.0 - _norm(r)) ** 2 for r in rows(w))


def norm_dev_max(w: Any) -> float:
    """max_o |1 - |w_o|| over all rows, dead rows included."""
    return max(abs(1.0 - _norm(r)) for r in rows(w))


# --------------------------------------------------------------------------- RaRe and near-parallel pairs


def rare(vectors: Iterable[Any]) -> float | None:
    """min_{i != j} (1 - cos^2) over live vectors; None with fewer than two (not clamped at 0)."""
    vs = _vectors(vectors)
    live = live_indices(vs)
    if len(live) < 2:
        return None
    return min(1.0 - cos(vs[i], vs[j]) ** 2 for i in live for j in live if i != j)


def d_euc(a: Any, b: Any) -> float:
    """Rescale the longer vector to the shorter one's length and compare, sign-aligned.

    ``|| w_a |w_b| / |w_a| - sign(cos) w_b ||`` with w_a the longer (the first argument
    on a tie); sign(0) is taken as +1 so that D_euc = |w_b| sqrt(2 - 2|cos|) holds always.
    """
    a, b = to_f64(a).ravel(), to_f64(b).ravel()
    if _norm(a) < _norm(b):
        a, b = b, a
    na, nb = _norm(a), _norm(b)
    if nb == 0.0:
        raise ValueError("d_euc of a zero vector is undefined")
    sign = 1.0 if cos(a, b) >= 0 else -1.0
    diff = a * (nb / na) - sign * b
    return _norm(diff)


def near_parallel_pairs(
    vectors: Iterable[Any], tau_cos: float = 1e-4, tau_euc: float = 0.1
) -> list[tuple[int, int, float]]:
    """(i, j, cos) for live i < j (original indices) with 1 - |cos| < tau_cos and d_euc < tau_euc."""
    vs = _vectors(vectors)
    live = live_indices(vs)
    found = []
    for a in range(len(live)):
        for b in range(a + 1, len(live)):
            i, j = live[a], live[b]
            c = cos(vs[i], vs[j])
            if 1.0 - abs(c) < tau_cos and d_euc(vs[i], vs[j]) < tau_euc:
                found.append((i, j, c))
    return found


# --------------------------------------------------------------------------- feature maps (CS paper eq. 1b, 2, 3)


def _channels(x: Any, what: str) -> np.ndarray:
    x = to_f64(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what} must be (length,) or (channels, length), got {x.shape}")
    return x


def feature_map(k: Any, x: Any) -> np.ndarray:
    """Full cross-correlation feature map F = K (x) X, eq. 1b/2, zero padding N-1 on both sides.

    ``F[i] = sum_c sum_n K[c, n] X[c, i + n - N + 1]``, i = 0..M+N-2, X read as 0 outside
    0..M-1. k is (N,) or (C, N); x is (M,) or (C, M) (C = 1 is the paper's single channel).
    """
    k, x = _channels(k, "kernel"), _channels(x, "input")
    if k.shape[0] != x.shape[0]:
        raise ValueError(f"kernel has {k.shape[0]} channels, input {x.shape[0]}")
    n_k, m = k.shape[1], x.shape[1]
    f = np.zeros(m + n_k - 1, dtype=np.float64)
    for i in range(m + n_k - 1):
        terms = []
        for c in range(k.shape[0]):
            for n in range(n_k):
                idx = i + n - n_k + 1
                if 0 <= idx < m:
                    terms.append(float(k[c, n]) * float(x[c, idx]))
        f[i] = math.fsum(terms)
    return f


def feature_map_inner(k1: Any, k2: Any, x: Any) -> float:
    """<F1, F2> of the full feature maps F_r = K_r (x) X (eq. 1b/2), by explicit loops.

    k1, k2 are equally long 1-D kernels and x a 1-D input (the paper's case); (C, N)
    kernels with a (C, M) input are accepted too, F summing over channels as a conv does.
    """
    f1, f2 = feature_map(k1, x), feature_map(k2, x)
    if f1.shape != f2.shape:
        raise ValueError(f"kernels of different lengths: {to_f64(k1).shape} and {to_f64(k2).shape}")
    return math.fsum(float(p) * float(q) for p, q in zip(f1, f2, strict=True))


def clip_lags(c: np.ndarray, span: Sequence[int]) -> np.ndarray:
    """Keep lags -(s-1)..s-1 per axis of a centred full_xcorr of equal shapes (the paper's [1-N, N-1])."""
    slices = []
    for size, s in zip(c.shape, span, strict=True):
        centre = (size - 1) // 2
        if s - 1 > centre:
            raise ValueError(f"cannot clip {size} lags to a kernel span of {s}")
        slices.append(slice(centre - (s - 1), centre + s))
    return c[tuple(slices)]
