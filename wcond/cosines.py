"""The cosine matrix of a layer's rows (or columns): what the heatmaps of `wcond plot` and the HTML report draw.

This is the analysis side of the pictures: it reads a layer's weight from a checkpoint and
computes the signed cosines and the near-parallel marks (with
:func:`wcond.metrics.near_parallel_pairs`, the same test as the counts `inspect` reports); the
drawing is :mod:`wcond.render.plot`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from wcond import metrics
from wcond.checkpoint.base import Checkpoint
from wcond.checkpoint.factorized import dense_view
from wcond.checkpoint.open import open_checkpoint
from wcond.defaults import MAX_VECTORS, MAX_VECTORS_LIMIT, TAU_COS, TAU_EUC
from wcond.errors import UsageError, WcondError
from wcond.layers import is_layer

if TYPE_CHECKING:
    from wcond.report import LayerReport, Report

__all__ = ["CosMatrix", "cos_matrix", "heatmap_cosines", "layer_cosines", "layer_weight"]


@dataclass
class CosMatrix:
    """Signed cosines between the shown vectors of one layer axis (NaN where a vector is dead)."""

    name: str
    axis: str
    cos: np.ndarray
    indices: list[int]  # original row/column index of each shown vector
    total: int  # vectors in the layer
    near_parallel: list[tuple[int, int]] = field(default_factory=list)  # positions in ``indices``

    @property
    def subsampled(self) -> bool:
        return len(self.indices) < self.total


def _pick(n: int, limit: int, include: Sequence[int] = ()) -> list[int]:
    """All of 0..n-1 when n <= limit, else ``limit`` evenly spaced indices, ``include`` ones first."""
    if n <= limit:
        return list(range(n))
    chosen = set(sorted({i for i in include if 0 <= i < n})[: limit // 2])
    chosen.update(np.linspace(0, n - 1, num=limit - len(chosen)).round().astype(int).tolist())
    fill = iter(range(n))
    while len(chosen) < limit:  # rounding made duplicates
        chosen.add(next(fill))
    return sorted(chosen)


def cos_matrix(
    name: str,
    w: torch.Tensor,
    *,
    axis: str = "rows",
    max_vectors: int = MAX_VECTORS,
    tau_cos: float = TAU_COS,
    tau_euc: float = TAU_EUC,
    include: Sequence[int] = (),
) -> CosMatrix:
    """The cosine matrix of a layer's rows or columns (METRICS.md), at most ``max_vectors`` of them.

    ``include`` names vectors to keep when subsampling (e.g. the layer's closest pairs).
    """
    if axis not in ("rows", "cols"):
        raise UsageError(f"axis={axis!r}: expected 'rows' or 'cols'", params=("axis",))
    if not 2 <= max_vectors <= MAX_VECTORS_LIMIT:
        raise UsageError(
            f"max_vectors={max_vectors}: expected 2 to {MAX_VECTORS_LIMIT}", params=("max_vectors",)
        )
    vectors = metrics.as_rows(w) if axis == "rows" else metrics.as_cols(w)
    vectors = vectors.detach().to("cpu", torch.float32)
    idx = _pick(vectors.shape[0], max_vectors, include)
    shown = vectors[idx]
    v = shown.double().numpy()
    norms = np.linalg.norm(v, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = v / norms[:, None]  # dead (zero) vectors become NaN: their angle is undefined
    cos = np.clip(u @ u.T, -1.0, 1.0)
    near = [
        (p.i, p.j) for p in metrics.near_parallel_pairs(shown, tau_cos=tau_cos, tau_euc=tau_euc)
    ]
    return CosMatrix(name, axis, cos, idx, vectors.shape[0], near)


def layer_weight(source: str | Path | Checkpoint, key: str) -> torch.Tensor:
    """The weight stored under ``key``; a UsageError listing the layer keys when there is none."""
    ck = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    # a shrunk layer: its dense weight
    infos, get, _ = dense_view({k: ck.info(k) for k in ck.keys()}, ck.get, str(ck.path))
    if key not in infos:
        layers = [k for k, info in infos.items() if is_layer(info)]
        close = [k for k in layers if key in k or k in key][:5]
        hint = (
            f"; did you mean {', '.join(close)}?"
            if close
            else f"; layers: {', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''}"
        )
        raise UsageError(f"{ck.path}: no tensor {key!r}{hint}")
    info = infos[key]
    if not is_layer(info):
        raise UsageError(
            f"{ck.path}: {key!r} ({tuple(info.shape)}, {info.dtype}) is not a layer weight (2 to 5 "
            "dims, floating point)"
        )
    return get(key)


def layer_cosines(
    key: str,
    sources: Sequence[str | Path | Checkpoint],
    *,
    axis: str = "rows",
    max_vectors: int = MAX_VECTORS,
    tau_cos: float = TAU_COS,
    tau_euc: float = TAU_EUC,
) -> list[CosMatrix]:
    """The cosine matrix of layer ``key`` in each source; named by file as well when there are several.

    Every weight is read before any matrix is computed, so that a source without the layer fails fast.
    """
    weights = [(source, layer_weight(source, key)) for source in sources]
    return [
        cos_matrix(
            f"{_file_name(source)}: {key}" if len(sources) > 1 else key,
            w,
            axis=axis,
            max_vectors=max_vectors,
            tau_cos=tau_cos,
            tau_euc=tau_euc,
        )
        for source, w in weights
    ]


def heatmap_cosines(
    report: Report,
    layers: Sequence[LayerReport],
    weights: Checkpoint | Mapping[str, torch.Tensor],
) -> dict[str, CosMatrix | str]:
    """The row cosines of each of ``layers`` (their closest pairs kept), or why a layer cannot be drawn.

    What the HTML report's heatmaps draw, at the near-parallel thresholds ``report`` was made with.
    """
    tau_cos = report.settings.get("tau_cos", TAU_COS)
    tau_euc = report.settings.get("tau_euc", TAU_EUC)
    out: dict[str, CosMatrix | str] = {}
    for layer in layers:
        try:
            w = (
                weights[layer.name]
                if isinstance(weights, Mapping)
                else layer_weight(weights, layer.name)
            )
        except (KeyError, WcondError) as e:
            out[layer.name] = str(e)
            continue
        include = [i for p in layer.closest_rows for i in (p.i, p.j)]
        out[layer.name] = cos_matrix(
            layer.name, w, tau_cos=tau_cos, tau_euc=tau_euc, include=include
        )
    return out


def _file_name(source: str | Path | Checkpoint) -> str:
    return Path(source.path if isinstance(source, Checkpoint) else str(source)).name
