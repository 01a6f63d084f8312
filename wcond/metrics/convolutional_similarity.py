"""Convolutional Similarity (METRICS.md): autocorrelation sums, the loss, its norm and floors."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from wcond.metrics.vectors import _compute_dtype, _weights


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
