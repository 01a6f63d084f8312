"""Reading the factorized format that `wcond shrink` writes (specified in docs/FACTORIZED.md).

A shrunk checkpoint stores a layer as W' plus, per fused axis, the original rows (columns) that
have no stored row of their own, each as [original, stored] and a scale (format 2; format 1
stored an index and a coefficient for every original row and column, and still loads); this
module turns it back into the dense checkpoint it stands for. It sits beside
wcond.checkpoint.open (below analyze, plot and shrink), so reading a shrunk file runs one way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wcond.checkpoint.base import MAX_DENSE_ELEMENTS, TensorInfo
from wcond.checkpoint.open import open_checkpoint
from wcond.errors import CheckpointError

__all__ = [
    "Factored",
    "dense_view",
    "fused_to_index",
    "load_state_dict",
    "rebuild_dense",
    "rebuild_fused",
]

W_SUFFIX = ".__wcond_w"
ROW_INDEX, ROW_COEF = ".__wcond_row_index", ".__wcond_row_coef"
COL_INDEX, COL_COEF = ".__wcond_col_index", ".__wcond_col_coef"
# format 2 (written since): only the originals without a stored row/column of their own
ROW_FUSED, ROW_SCALE = ".__wcond_row_fused", ".__wcond_row_scale"
COL_FUSED, COL_SCALE = ".__wcond_col_fused", ".__wcond_col_scale"
_PARTS = (ROW_INDEX, ROW_COEF, COL_INDEX, COL_COEF, ROW_FUSED, ROW_SCALE, COL_FUSED, COL_SCALE)
# per axis (rows, then columns): format 1's (index, coef) and format 2's (fused, scale) suffixes
_AXES = (
    ((ROW_INDEX, ROW_COEF), (ROW_FUSED, ROW_SCALE)),
    ((COL_INDEX, COL_COEF), (COL_FUSED, COL_SCALE)),
)
MANIFEST_KEY = "wcond.shrink"
FOLD_MANIFEST_KEY = "wcond.fold"
_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def along_dim(ndim: int, dim: int) -> list[int]:
    shape = [1] * ndim
    shape[dim] = -1
    return shape


def spread(w: Tensor, index: Tensor, coef: Tensor, dim: int) -> Tensor:
    """P W' along ``dim``: original k = coef[k] * w'[index[k]]."""
    return w.index_select(dim, index.to(w.device, torch.int64)) * coef.to(w.device, w.dtype).view(
        along_dim(w.ndim, dim)
    )


def rebuild_dense(
    w: Tensor,
    rows: tuple[Tensor, Tensor] | None = None,
    cols: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """P W' Q from the stored parts: W[o, c] = row_coef[o] * col_coef[c] * W'[row_index[o], col_index[c]].

    Computed in float32 (float64 for float64 W'); the caller casts to the stored dtype.
    """
    out = w if w.dtype == torch.float64 else w.float()
    if rows is not None:
        out = spread(out, rows[0], rows[1], 0)
    if cols is not None:
        out = spread(out, cols[0], cols[1], 1)
    return out


def fused_to_index(fused: Tensor, scale: Tensor, stored: int) -> tuple[Tensor, Tensor]:
    """Format 2's entries of one axis as format 1's: an index and a coefficient per original.

    ``fused`` (F, 2) holds [original, stored] for the originals without a stored row of their own
    and ``scale`` (F,) their coefficients; the i-th original not listed is stored row i, with
    coefficient 1. ``stored`` is W''s size along the axis, so there are stored + F originals.
    The entries must already be checked (distinct originals below stored + F, stored rows below
    ``stored``).
    """
    n = stored + fused.shape[0]
    original = fused[:, 0].to(torch.int64)
    listed = torch.zeros(n, dtype=torch.bool, device=fused.device)
    listed[original] = True
    index = torch.empty(n, dtype=torch.int64, device=fused.device)
    index[~listed] = torch.arange(stored, device=fused.device)
    index[original] = fused[:, 1].to(torch.int64)
    coef = torch.ones(n, dtype=scale.dtype, device=scale.device)
    coef[original] = scale
    return index, coef


def rebuild_fused(
    w: Tensor,
    rows: tuple[Tensor, Tensor] | None = None,
    cols: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The dense weight from format 2's (fused, scale) of the rows (dim 0) and columns (dim 1).

    Along each axis, W[o] = scale * W'[s] for each listed [o, s], and the i-th original not
    listed is W'[i]. Computed as :func:`rebuild_dense` is; the caller casts to the stored dtype.
    """
    parts = [
        None if p is None else fused_to_index(p[0], p[1], w.shape[dim])
        for dim, p in enumerate((rows, cols))
    ]
    return rebuild_dense(w, parts[0], parts[1])


@dataclass(frozen=True)
class Factored:
    """A layer a checkpoint stores factorized: its stored W' shape and the dense shape it stands for."""

    key: str
    stored_shape: tuple[int, ...]
    dense_shape: tuple[int, ...]
    rows: bool
    cols: bool

    @property
    def params_stored(self) -> int:
        return math.prod(self.stored_shape)

    @property
    def params_dense(self) -> int:
        return math.prod(self.dense_shape)

    def annotate(self, rep: Any) -> None:
        """Add to an inspect LayerReport: its ``factorized`` field and a note."""
        rep.factorized = {"params_stored": self.params_stored, "params_dense": self.params_dense}
        fused = " and ".join(a for a, on in (("rows", self.rows), ("columns", self.cols)) if on)
        rep.notes.append(
            f"factorized ({fused} fused): stored as {'x'.join(map(str, self.stored_shape))}, "
            f"{self.params_stored:,} of {self.params_dense:,} parameters "
            f"({100 * self.params_stored / max(self.params_dense, 1):.1f}%); metrics are of the rebuilt dense weight"
        )


def dense_view(
    infos: Mapping[str, TensorInfo], get: Callable[[str], Tensor], source: str = "<state_dict>"
) -> tuple[dict[str, TensorInfo], Callable[[str], Tensor], dict[str, Factored]]:
    """The dense checkpoint a shrunk one stands for: factor keys replaced by the original key.

    Returns the infos in stored order (a factorized layer where its W' is), a getter that rebuilds
    factorized layers on demand, and the factorized layers by key. Any other checkpoint passes
    through unchanged. Every factor is checked (docs/FACTORIZED.md, "Reading a file you did not
    write") before a dense tensor is allocated; ``source`` names the file in the errors.

    Raises:
        CheckpointError: an incomplete or inconsistent factorization, naming ``source`` and the key.
    """
    if not any(k.endswith(W_SUFFIX) or k.endswith(_PARTS) for k in infos):
        return dict(infos), get, {}
    out: dict[str, TensorInfo] = {}
    factored: dict[str, Factored] = {}
    for key, info in infos.items():
        if key.endswith(W_SUFFIX):
            base = key.removesuffix(W_SUFFIX)
            factored[base] = _factored(base, infos, source)
            out[base] = TensorInfo(factored[base].dense_shape, info.dtype)
        elif key.endswith(_PARTS):
            base = key.removesuffix(next(p for p in _PARTS if key.endswith(p)))
            if base + W_SUFFIX not in infos:
                raise CheckpointError(
                    f"{source}: {key!r} has no {base + W_SUFFIX!r} beside it: the shrunk "
                    "checkpoint is incomplete"
                )
        else:
            out[key] = info

    def view_get(key: str) -> Tensor:
        f = factored.get(key)
        if f is None:
            return get(key)
        w = get(key + W_SUFFIX)
        parts: list[tuple[Tensor, Tensor] | None] = []
        for on, (old, new), dim in zip((f.rows, f.cols), _AXES, (0, 1)):
            if not on:
                parts.append(None)
            elif key + new[0] in infos:  # format 2
                parts.append(_fused_parts(source, key, get, new, w.shape[dim]))
            else:
                parts.append(_axis_parts(source, key, get, old, w.shape[dim]))
        return rebuild_dense(w, parts[0], parts[1]).to(w.dtype)

    return out, view_get, factored


def _factored(base: str, infos: Mapping[str, TensorInfo], source: str) -> Factored:
    """Check one factorized layer from shapes and dtypes alone; the dense shape it stands for."""
    if base in infos:
        raise CheckpointError(
            f"{source}: {base!r} is stored both dense and factorized ({base + W_SUFFIX!r}); "
            "the checkpoint is inconsistent"
        )
    w = infos[base + W_SUFFIX]
    if len(w.shape) < 2:
        raise CheckpointError(
            f"{source}: {base + W_SUFFIX!r} has shape {list(w.shape)}; a factorized weight has "
            "at least 2 dims"
        )
    shape = list(w.shape)
    on = []
    for dim, ((idx, coef), (fused, scale)) in enumerate(_AXES):
        old, new = _pair(source, base, infos, idx, coef), _pair(source, base, infos, fused, scale)
        if old is not None and new is not None:
            raise CheckpointError(
                f"{source}: {base!r} gives its {('rows', 'columns')[dim]} both as "
                f"{base + idx!r} (format 1) and as {base + fused!r} (format 2); the checkpoint "
                "is inconsistent"
            )
        if old is not None:
            i, c = old
            if (
                len(i.shape) != 1
                or i.shape != c.shape
                or i.dtype not in _INDEX_DTYPES
                or not c.dtype.is_floating_point
            ):
                raise CheckpointError(
                    f"{source}: {base + idx!r} and {base + coef!r} must be an integer and a float "
                    f"vector of the same length (got {_described(i)} and {_described(c)})"
                )
            if i.shape[0] < w.shape[dim]:
                raise CheckpointError(
                    f"{source}: {base + idx!r} has {i.shape[0]} entries for the {w.shape[dim]} "
                    f"stored {('rows', 'columns')[dim]} of {base + W_SUFFIX!r}; a factorization "
                    "never stores more than it stands for"
                )
            shape[dim] = i.shape[0]
        if new is not None:
            f, c = new
            if (
                len(f.shape) != 2
                or f.shape[1] != 2
                or f.dtype not in _INDEX_DTYPES
                or len(c.shape) != 1
                or c.shape[0] != f.shape[0]
                or not c.dtype.is_floating_point
            ):
                raise CheckpointError(
                    f"{source}: {base + fused!r} and {base + scale!r} must be an (F, 2) integer "
                    f"tensor and a float vector of length F (got {_described(f)} and "
                    f"{_described(c)})"
                )
            shape[dim] = w.shape[dim] + f.shape[0]
        on.append(old is not None or new is not None)
    dense = math.prod(shape)
    if dense > MAX_DENSE_ELEMENTS:
        raise CheckpointError(
            f"{source}: {base!r} would rebuild to shape {shape} ({dense:,} values) from "
            f"{math.prod(w.shape):,} stored; refused above {MAX_DENSE_ELEMENTS:,} values"
        )
    return Factored(base, tuple(w.shape), tuple(shape), on[0], on[1])


def _pair(
    source: str, base: str, infos: Mapping[str, TensorInfo], first: str, second: str
) -> tuple[TensorInfo, TensorInfo] | None:
    """Two entries that go together (index and coef, fused and scale): both, or neither."""
    a, b = infos.get(base + first), infos.get(base + second)
    if (a is None) != (b is None):
        have, missing = (first, second) if a is not None else (second, first)
        raise CheckpointError(
            f"{source}: {base + have!r} has no {base + missing!r} beside it: the shrunk "
            "checkpoint is incomplete"
        )
    return None if a is None or b is None else (a, b)


def _axis_parts(
    source: str, base: str, get: Callable[[str], Tensor], suffixes: tuple[str, str], size: int
) -> tuple[Tensor, Tensor]:
    """One axis's index and coefficients, the index checked against the stored size first."""
    index, coef = get(base + suffixes[0]), get(base + suffixes[1])
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise CheckpointError(
            f"{source}: {base + suffixes[0]!r} points outside the {size} stored rows/columns of "
            f"{base + W_SUFFIX!r} (entries {int(index.min())} to {int(index.max())})"
        )
    return index, coef


def _fused_parts(
    source: str, base: str, get: Callable[[str], Tensor], suffixes: tuple[str, str], size: int
) -> tuple[Tensor, Tensor]:
    """One format-2 axis as an index and a coefficient per original, its entries checked first.

    ``size`` is W''s size along the axis: stored rows must lie below it, originals below
    ``size`` + F, each listed once.
    """
    fused, scale = get(base + suffixes[0]), get(base + suffixes[1])
    key = base + suffixes[0]
    n = size + fused.shape[0]
    for col, what, bound in ((0, "original", n), (1, "stored", size)):
        v = fused[:, col]
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= bound):
            raise CheckpointError(
                f"{source}: {key!r} has {what} indices {int(v.min())} to {int(v.max())}; "
                f"they must lie in 0 to {bound - 1} ({size} stored rows/columns of "
                f"{base + W_SUFFIX!r}, {n} original)"
            )
    values, counts = torch.unique(fused[:, 0], return_counts=True)
    if bool((counts > 1).any()):
        twice = int(values[counts > 1][0])
        raise CheckpointError(
            f"{source}: {key!r} lists original row/column {twice} more than once; each is "
            "rebuilt from one stored row/column"
        )
    return fused_to_index(fused, scale, size)


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Dense tensors of the original shapes by key, for any checkpoint wcond reads.

    A shrunk checkpoint's factorized layers are rebuilt (W = P W' Q); every other tensor, and
    every tensor of any other checkpoint, comes back as stored.

    Example:
        >>> model.load_state_dict(wcond.load_state_dict("small.safetensors"))
    """
    ck = open_checkpoint(path)
    infos, get, _ = dense_view({k: ck.info(k) for k in ck.keys()}, ck.get, str(ck.path))
    return {k: get(k) for k in infos}


def _described(info: TensorInfo | Tensor) -> str:
    return f"{list(info.shape)} {_dtype_name(info.dtype)}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
