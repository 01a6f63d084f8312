"""A layer's weight kept as ``P W' Q``: the parametrization DynamicFusion installs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FactorizedWeight"]


class FactorizedWeight(nn.Module):
    """The parametrization ``weight = P W' Q`` (times ``k g / |W'|_F`` with Frobenius normalisation).

    P and Q are stored as one index and one coefficient per original row / column, and the
    original row / column that owns each stored one (buffers, so ``state_dict()`` carries them);
    an axis with nothing fused is the identity and costs nothing.
    """

    row_index: Tensor
    row_coef: Tensor
    row_roots: Tensor
    col_index: Tensor
    col_coef: Tensor
    col_roots: Tensor
    k: Tensor

    def __init__(self, w: Tensor, frobenius: bool) -> None:
        super().__init__()
        rows, cols = w.shape[0], w.shape[1]
        for axis, n in (("row", rows), ("col", cols)):
            self.register_buffer(f"{axis}_index", torch.arange(n, device=w.device))
            self.register_buffer(f"{axis}_coef", torch.ones(n, dtype=w.dtype, device=w.device))
            self.register_buffer(f"{axis}_roots", torch.arange(n, device=w.device))
        self.fused = [False, False]
        self.frobenius = frobenius
        if frobenius:
            # eq. 16: FN(W) = k W / |W|_F * g, k the initial norm, g trainable (starts at 1)
            self.register_buffer("k", w.detach().norm())
            self.gain = nn.Parameter(torch.ones((), dtype=w.dtype, device=w.device))

    def forward(self, w: Tensor) -> Tensor:
        out = w
        for dim, (index, coef) in enumerate(
            ((self.row_index, self.row_coef), (self.col_index, self.col_coef))
        ):
            if self.fused[dim]:
                shape = [1] * out.ndim
                shape[dim] = -1
                out = out.index_select(dim, index) * coef.view(shape)
        if self.frobenius:
            # |P W' Q|_F = |W'|_F: the coefficients of a group form a unit vector
            out = out * (self.k * self.gain / w.norm())
        return out

    def set_axis(self, dim: int, index: Tensor, coef: Tensor, roots: Tensor) -> None:
        """Install one axis's map: original k -> ``coef[k] * W'[index[k]]``; ``roots[p]`` owns slot p."""
        prefix = ("row", "col")[dim]
        like = getattr(self, f"{prefix}_coef")
        setattr(self, f"{prefix}_index", index.to(like.device, torch.int64))
        setattr(self, f"{prefix}_coef", coef.to(like.device, like.dtype))
        setattr(self, f"{prefix}_roots", roots.to(like.device, torch.int64))
        self.fused[dim] = len(roots) < len(index)

    def scale(self, w: Tensor) -> Tensor | float:
        """The factor Frobenius normalisation multiplies W' by (1 without it)."""
        return self.k * self.gain / w.norm() if self.frobenius else 1.0
