"""Reading the factorized format that `wcond shrink` writes (specified in docs/FACTORIZED.md).

A shrunk checkpoint stores a layer as W' plus one index and one coefficient per original row
and column; this module turns it back into the dense checkpoint it stands for. It sits beside
wcond.load (below analyze, plot and shrink), so reading a shrunk file runs one way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wcond.errors import CheckpointError
from wcond.load import TensorInfo, open_checkpoint

__all__ = ["Factored", "dense_view", "load_state_dict", "rebuild_dense"]

W_SUFFIX = ".__wcond_w"
ROW_INDEX, ROW_COEF = ".__wcond_row_index", ".__wcond_row_coef"
COL_INDEX, COL_COEF = ".__wcond_col_index", ".__wcond_col_coef"
_PARTS = (ROW_INDEX, ROW_COEF, COL_INDEX, COL_COEF)
MANIFEST_KEY = "wcond.shrink"
FOLD_MANIFEST_KEY = "wcond.fold"
_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# The most values one rebuilt layer may have (8 GiB of float32). A few kilobytes of indices can
# describe a dense tensor of terabytes; no real layer comes near this (Llama-3 405B's largest
# is 2.1e9 values).
MAX_DENSE_ELEMENTS = 2**31


def _along(ndim: int, dim: int) -> list[int]:
    shape = [1] * ndim
    shape[dim] = -1
    return shape


def _spread(w: Tensor, index: Tensor, coef: Tensor, dim: int) -> Tensor:
    """P W' along ``dim``: original k = coef[k] * w'[index[k]]."""
    return w.index_select(dim, index.to(w.device, torch.int64)) * coef.to(w.device, w.dtype).view(
        _along(w.ndim, dim)
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
        out = _spread(out, rows[0], rows[1], 0)
    if cols is not None:
        out = _spread(out, cols[0], cols[1], 1)
    return out


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
        parts = [
            _axis_parts(source, key, get, suffixes, w.shape[dim]) if on else None
            for on, suffixes, dim in (
                (f.rows, (ROW_INDEX, ROW_COEF), 0),
                (f.cols, (COL_INDEX, COL_COEF), 1),
            )
        ]
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
    for dim, (idx, coef) in enumerate(((ROW_INDEX, ROW_COEF), (COL_INDEX, COL_COEF))):
        i, c = infos.get(base + idx), infos.get(base + coef)
        if (i is None) != (c is None):
            have, missing = (idx, coef) if i is not None else (coef, idx)
            raise CheckpointError(
                f"{source}: {base + have!r} has no {base + missing!r} beside it: the shrunk "
                "checkpoint is incomplete"
            )
        if i is not None and c is not None:
            if (
                len(i.shape) != 1
                or i.shape != c.shape
                or i.dtype not in _INDEX_DTYPES
                or not c.dtype.is_floating_point
            ):
                raise CheckpointError(
                    f"{source}: {base + idx!r} and {base + coef!r} must be an integer and a float "
                    f"vector of the same length (got {list(i.shape)} {_dtype_name(i.dtype)} and "
                    f"{list(c.shape)} {_dtype_name(c.dtype)})"
                )
            if i.shape[0] < w.shape[dim]:
                raise CheckpointError(
                    f"{source}: {base + idx!r} has {i.shape[0]} entries for the {w.shape[dim]} "
                    f"stored {('rows', 'columns')[dim]} of {base + W_SUFFIX!r}; a factorization "
                    "never stores more than it stands for"
                )
            shape[dim] = i.shape[0]
        on.append(i is not None)
    dense = math.prod(shape)
    if dense > MAX_DENSE_ELEMENTS:
        raise CheckpointError(
            f"{source}: {base!r} would rebuild to shape {shape} ({dense:,} values) from "
            f"{math.prod(w.shape):,} stored; refused above {MAX_DENSE_ELEMENTS:,} values"
        )
    return Factored(base, tuple(w.shape), tuple(shape), on[0], on[1])


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
