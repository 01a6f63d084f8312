"""RaRe merging (papers/rank-redundancy.txt): fuse near-parallel rows and columns into a smaller checkpoint.

Two ways to shrink:

* :func:`shrink` stores each shrunk layer factorized, ``W ~ P W' Q``, with P and Q sparse: one
  index and one coefficient per original row (output unit) and per original column (input
  channel). Any model loads it through :func:`load_state_dict`, which rebuilds dense tensors.
* :func:`fold` removes units outright along an explicit chain of layers joined by ReLU-like
  activations: a unit whose row (bias included) is a positive multiple of another's is dropped
  and its outgoing weights are added to the other's. The result is a plain, narrower state
  dict, exactly equivalent for exactly parallel units.

How a shrunk layer stored under key K (original shape (out, in, *kernel)) is written::

    K.__wcond_w          W', shape (out', in', *kernel), the layer's dtype
    K.__wcond_row_index  int32 (out,): the row of W' each original row is rebuilt from   } only when
    K.__wcond_row_coef   float32 (out,): its coefficient (float64 for float64 layers)    } rows were fused
    K.__wcond_col_index  int32 (in,)  } the same for the input channels,
    K.__wcond_col_coef   float32 (in,) } only when columns were fused

    W[o, c] = row_coef[o] * col_coef[c] * W'[row_index[o], col_index[c]]

plus a JSON manifest under ``wcond.shrink`` (``wcond.fold`` for folding) in the safetensors
metadata, or as a top-level string entry of a torch file. The keys alone suffice to rebuild.

Fusing one pair (METRICS.md, "Fusing"): keep the shorter vector w_j, take the least-squares
ratio r = <w_i, w_j> / |w_j|^2 (the paper's sum(w_i)/sum(w_j) blows up when sum(w_j) ~ 0) and
s = sqrt(1 + r^2); original j gets coefficient 1/s and i gets r/s. The coefficients of a group
form a unit vector and groups are disjoint, so Q Q^T = I and the best W' for the grouping is
W Q^T: the fused vector is sum_k coef_k w_k (= s w_j for an exactly parallel pair).
"""

from __future__ import annotations

import fnmatch
import heapq
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wcond import __version__, metrics
from wcond.device import resolve_device
from wcond.errors import CheckpointError, UsageError
from wcond.layers import find_layers, is_layer
from wcond.load import Checkpoint, TensorInfo, open_checkpoint
from wcond.save import check_output, output_format, save_checkpoint

__all__ = [
    "ExpandResult",
    "Factorization",
    "Factored",
    "Grouping",
    "LayerShrink",
    "ShrinkReport",
    "dense_view",
    "expand",
    "factorize",
    "fold",
    "fuse_vectors",
    "load_state_dict",
    "rebuild_dense",
    "shrink",
]

W_SUFFIX = ".__wcond_w"
ROW_INDEX, ROW_COEF = ".__wcond_row_index", ".__wcond_row_coef"
COL_INDEX, COL_COEF = ".__wcond_col_index", ".__wcond_col_coef"
_PARTS = (ROW_INDEX, ROW_COEF, COL_INDEX, COL_COEF)
MANIFEST_KEY = "wcond.shrink"
FOLD_MANIFEST_KEY = "wcond.fold"
AXES = ("auto", "rows", "cols", "both")
_INDEX_BYTES = 4  # int32

ProgressFn = Callable[[int, int, str], None]


# --------------------------------------------------------------------------- fusing vectors


@dataclass
class Grouping:
    """How N vectors of one axis were fused: vector k is rebuilt as ``coef[k] * fused[index[k]]``.

    Kept vectors stay in their original order; ``kept_indices`` names the original vector whose
    slot each fused vector took.
    """

    index: Tensor  # (N,) int64
    coef: Tensor  # (N,) float64
    kept_indices: list[int]
    fused: int = 0  # pairs fused: N - kept
    max_angle: float | None = None  # degrees, the widest pair fused (angle up to sign)

    @property
    def kept(self) -> int:
        return len(self.kept_indices)

    @property
    def removed(self) -> list[int]:
        """Original indices that no longer have a slot of their own."""
        keep = set(self.kept_indices)
        return [k for k in range(self.index.numel()) if k not in keep]


def fuse_vectors(
    vectors: Tensor, *, tau_cos: float, tau_euc: float, positive: bool = False
) -> Grouping:
    """Greedy RaRe merging of the near-parallel rows of ``vectors`` (N, d), closest pair first.

    Candidates come from the blocked search of :func:`wcond.metrics.near_parallel_pairs`. Each
    fusion keeps the shorter (group) vector, and the fused vector, the best fit of its group, is
    re-tested against every vector that remains, so groups of three or more form when they
    pass the same test. ``positive`` fuses only pairs with cos > 0 (what folding through a ReLU
    needs). Zero vectors are never fused.
    """
    v = vectors.detach()
    n = v.shape[0]
    heap = [
        (1 - abs(p.cos), p.i, p.j, 0, 0)
        for p in metrics.near_parallel_pairs(v, tau_cos=tau_cos, tau_euc=tau_euc)
        if not positive or p.cos > 0
    ]
    groups: dict[
        int, list[tuple[int, float]]
    ] = {}  # kept index -> (member, coefficient), fused groups only
    absorbed = [False] * n
    widest = 0.0
    fused = 0
    if heap:
        heapq.heapify(heap)
        work = v.clone()  # row k: the current vector of the group kept at k
        norms = work.norm(dim=1)
        alive = norms > 0
        norm_list, alive_list = norms.tolist(), alive.tolist()
        version = [0] * n
        while heap:
            gap, a, b, va, vb = heapq.heappop(heap)
            if not (alive_list[a] and alive_list[b]) or version[a] != va or version[b] != vb:
                continue  # a or b was fused since this pair was measured; its new vector was re-tested
            # Keep the shorter vector (the paper: keeping the longer one lets it grow without bound).
            keep, drop = (a, b) if (norm_list[a], a) <= (norm_list[b], b) else (b, a)
            r = float(work[drop] @ work[keep]) / norm_list[keep] ** 2
            s = math.sqrt(1 + r * r)
            members = [(m, c / s) for m, c in groups.pop(keep, [(keep, 1.0)])]
            members += [(m, c * r / s) for m, c in groups.pop(drop, [(drop, 1.0)])]
            groups[keep] = members
            work[keep] = (work[keep] + r * work[drop]) / s  # W q, the least-squares fused vector
            new_norm = float(work[keep].norm())
            norms[keep], norm_list[keep] = new_norm, new_norm
            alive[drop], alive_list[drop], absorbed[drop] = False, False, True
            version[keep] += 1
            fused += 1
            widest = max(widest, math.degrees(math.acos(min(1.0, max(0.0, 1 - gap)))))
            for other, gap2 in _retest(work, norms, alive, keep, tau_cos, tau_euc, positive):
                lo, hi = min(keep, other), max(keep, other)
                heapq.heappush(heap, (gap2, lo, hi, version[lo], version[hi]))
    kept = [k for k in range(n) if not absorbed[k]]
    slot = {k: p for p, k in enumerate(kept)}
    index = [slot.get(k, -1) for k in range(n)]
    coef = [1.0] * n
    for root, members in groups.items():
        for m, c in members:
            index[m], coef[m] = slot[root], c
    return Grouping(
        torch.tensor(index, dtype=torch.int64),
        torch.tensor(coef, dtype=torch.float64),
        kept,
        fused,
        widest if fused else None,
    )


def _retest(
    work: Tensor,
    norms: Tensor,
    alive: Tensor,
    k: int,
    tau_cos: float,
    tau_euc: float,
    positive: bool,
) -> Iterable[tuple[int, float]]:
    """(other, 1 - |cos|) for every remaining vector near-parallel to ``work[k]`` (the test of METRICS.md)."""
    cos = (work @ work[k]) / (
        norms * norms[k]
    )  # zero vectors give NaN, which fails every test below
    a = cos.abs().clamp(max=1.0)
    d_euc = torch.minimum(norms, norms[k]) * torch.sqrt((2 - 2 * a).clamp_min(0))
    hit = alive & (1 - a < tau_cos) & (d_euc < tau_euc)
    if positive:
        hit &= cos > 0
    hit[k] = False
    idx = torch.nonzero(hit).flatten()
    return zip(idx.tolist(), (1 - a[idx]).tolist())


def _along(ndim: int, dim: int) -> list[int]:
    shape = [1] * ndim
    shape[dim] = -1
    return shape


def _compress(w: Tensor, g: Grouping, dim: int) -> Tensor:
    """P^T W along ``dim``: fused[g] = sum_{k in g} coef[k] w_k, the least-squares W' for this grouping."""
    shape = list(w.shape)
    shape[dim] = g.kept
    scaled = w * g.coef.to(w.device, w.dtype).view(_along(w.ndim, dim))
    return w.new_zeros(shape).index_add_(dim, g.index.to(w.device), scaled)


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


# --------------------------------------------------------------------------- one layer


@dataclass
class Factorization:
    """One layer as W ~ P W' Q: the stored W' and the groupings of its rows (P) and columns (Q)."""

    w: Tensor  # W', the layer's dtype, on the CPU
    rows: Grouping | None
    cols: Grouping | None
    error: float | None  # |W - P W' Q|_F / |W|_F from the values as stored; None for W = 0

    @property
    def fused_rows(self) -> int:
        return self.rows.fused if self.rows else 0

    @property
    def fused_cols(self) -> int:
        return self.cols.fused if self.cols else 0

    @property
    def max_angle(self) -> float | None:
        angles = [g.max_angle for g in (self.rows, self.cols) if g and g.max_angle is not None]
        return max(angles) if angles else None

    def stored(self, g: Grouping | None) -> tuple[Tensor, Tensor] | None:
        """One axis as written: int32 indices and float32 (float64 for float64 layers) coefficients."""
        return (
            None if g is None else (g.index.to(torch.int32), g.coef.to(_coef_dtype(self.w.dtype)))
        )

    def tensors(self, key: str) -> dict[str, Tensor]:
        """The entries that replace ``key`` in a shrunk checkpoint."""
        out = {key + W_SUFFIX: self.w}
        for g, (idx_key, coef_key) in (
            (self.rows, (ROW_INDEX, ROW_COEF)),
            (self.cols, (COL_INDEX, COL_COEF)),
        ):
            part = self.stored(g)
            if part is not None:
                out[key + idx_key], out[key + coef_key] = part
        return out

    @property
    def stored_bytes(self) -> int:
        per = _INDEX_BYTES + torch.empty((), dtype=_coef_dtype(self.w.dtype)).element_size()
        n = sum(g.index.numel() for g in (self.rows, self.cols) if g is not None)
        return self.w.numel() * self.w.element_size() + n * per


def _coef_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def factorize(
    w: Tensor,
    axes: Sequence[str] = ("rows",),
    *,
    tau_cos: float = 1e-4,
    tau_euc: float = 0.1,
    device: torch.device | str = "cpu",
) -> Factorization:
    """Fuse the near-parallel rows and/or columns of one weight (out, in, *kernel).

    Rows (output units; a conv's filters) are fused first, then the columns (input channels) of
    the row-fused P^T W, so W' = P^T W Q^T, the best fit for both groupings.

    Example:
        >>> f = factorize(model.fc1.weight, ["rows"])
        >>> f.fused_rows, f.w.shape, f.error
    """
    x = w.detach().to(resolve_device(device))
    x = x if x.dtype == torch.float64 else x.float()
    rows = cols = None
    small = x
    if "rows" in axes:
        rows = fuse_vectors(metrics.as_rows(small), tau_cos=tau_cos, tau_euc=tau_euc)
        small = _compress(small, rows, 0) if rows.fused else small
    if "cols" in axes:
        cols = fuse_vectors(metrics.as_cols(small), tau_cos=tau_cos, tau_euc=tau_euc)
        small = _compress(small, cols, 1) if cols.fused else small
    rows = rows if rows and rows.fused else None
    cols = cols if cols and cols.fused else None
    stored = small.to(w.dtype).cpu()
    f = Factorization(stored, rows, cols, None)
    rebuilt = rebuild_dense(stored.to(x.device), f.stored(rows), f.stored(cols)).to(x.dtype)
    total = float(x.norm())
    f.error = float((x - rebuilt).norm()) / total if total > 0 else None
    return f


# --------------------------------------------------------------------------- reports


@dataclass
class LayerShrink:
    """What shrinking did to one layer."""

    name: str
    shape_before: list[int]
    shape_after: list[int]
    fused_rows: int = 0
    fused_cols: int = 0
    params_before: int = 0
    params_after: int = 0
    reconstruction_error: float | None = 0.0  # |W - P W' Q|_F / |W|_F (fold: rows with bias)
    max_angle_deg: float | None = None  # the widest pair fused
    axes: list[str] = field(default_factory=list)  # the axes searched
    changed: bool = False  # factorized (shrink) or narrowed (fold) in OUT
    notes: list[str] = field(default_factory=list)


@dataclass
class ShrinkReport:
    """What `wcond shrink` did (or, for a dry run, would do)."""

    checkpoint: str
    output: str | None  # None: dry run, nothing written
    mode: str  # "factorize" or "fold"
    settings: dict[str, Any]
    layers: list[LayerShrink]
    params_before: int  # every tensor of the checkpoint
    params_after: int
    bytes_before: int  # tensor data, as stored
    bytes_after: int
    widths: dict[str, list[int]] = field(default_factory=dict)  # fold: key -> [units before, after]
    warnings: list[str] = field(default_factory=list)

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    @property
    def percent_removed(self) -> float:
        return 100.0 * self.params_removed / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["params_removed"] = self.params_removed
        doc["percent_removed"] = self.percent_removed
        return doc


# --------------------------------------------------------------------------- shrink a checkpoint


def shrink(
    source: str | Path,
    output: str | Path | None = None,
    *,
    tau_cos: float = 1e-4,
    tau_euc: float = 0.1,
    axis: str = "auto",
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    protect: Sequence[str] = (),
    protect_ends: bool = True,
    force: bool = False,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> ShrinkReport:
    """Fuse near-parallel rows/columns of every selected layer and write the factorized checkpoint.

    Args:
        output: where to write (.safetensors or a torch extension); None reports without writing.
        axis: "auto" fuses along the longer axis only (more rows than columns: rows), both axes
            for a square layer; or "rows", "cols", "both".
        protect: globs of layers never fused. With ``protect_ends`` (default), the first
            analyzable weight's columns (the network's inputs) and the last one's rows (its
            classes) are never fused, "first" and "last" in stored order, as in the paper.
        force: overwrite an existing ``output``.

    A layer is stored factorized only when that takes fewer bytes than the dense layer (the
    index and coefficient per row/column cost 8 bytes each); untouched tensors are written
    bit-identical.

    Example:
        >>> report = wcond.shrink.shrink("model.pt", "small.safetensors", tau_cos=1e-4)
        >>> model.load_state_dict(wcond.load_state_dict("small.safetensors"))
    """
    if axis not in AXES:
        raise UsageError(f"--axis {axis!r}: use one of {', '.join(AXES)}")
    ck, infos = _open_source(source, output, force)
    dev = resolve_device(device)
    specs = find_layers(infos, layers, exclude)
    if not specs:
        _no_layers(ck, infos)
    analyzable = [k for k, i in infos.items() if is_layer(i)]
    first, last = (analyzable[0], analyzable[-1]) if protect_ends else (None, None)

    total = sum(s.info.numel for s in specs)
    done = 0
    reports: list[LayerShrink] = []
    replaced: dict[str, dict[str, Tensor]] = {}
    manifest_layers: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if progress:
            progress(done, total, spec.key)
        done += spec.info.numel
        shape = list(spec.info.shape)
        rep = LayerShrink(
            spec.key, shape, shape, params_before=spec.info.numel, params_after=spec.info.numel
        )
        reports.append(rep)
        rep.axes = _axes(spec.key, shape, axis, first, last, protect, rep.notes)
        if not rep.axes:
            continue
        w = ck.get(spec.key)
        if not bool(torch.isfinite(w).all()):
            rep.notes.append("NaN/Inf values: not fused")
            rep.reconstruction_error = None
            continue
        f = factorize(w, rep.axes, tau_cos=tau_cos, tau_euc=tau_euc, device=dev)
        if not (f.fused_rows or f.fused_cols):
            continue
        dense_bytes = spec.info.numel * w.element_size()
        if f.stored_bytes >= dense_bytes:
            rep.notes.append(
                f"{f.fused_rows} row and {f.fused_cols} column pairs would fuse, but W' plus an index and a "
                f"coefficient per row/column ({f.stored_bytes:,} bytes) is not smaller than the dense layer "
                f"({dense_bytes:,} bytes): left dense"
            )
            continue
        rep.fused_rows, rep.fused_cols = f.fused_rows, f.fused_cols
        rep.shape_after = list(f.w.shape)
        rep.params_after = f.w.numel()
        rep.reconstruction_error, rep.max_angle_deg = f.error, f.max_angle
        rep.changed = True
        replaced[spec.key] = f.tensors(spec.key)
        manifest_layers[spec.key] = {
            "shape": shape,
            "stored_shape": rep.shape_after,
            "dtype": _dtype_name(w.dtype),
            "fused_rows": f.fused_rows,
            "fused_cols": f.fused_cols,
            "reconstruction_error": f.error,
        }
    if progress:
        progress(total, total, "")

    settings = {
        "tau_cos": tau_cos,
        "tau_euc": tau_euc,
        "axis": axis,
        "layers": list(layers),
        "exclude": list(exclude),
        "protect": list(protect),
        "protect_ends": protect_ends,
        "device": str(dev),
    }
    new_bytes = {
        k: sum(t.numel() * t.element_size() for t in parts.values())
        for k, parts in replaced.items()
    }
    report = ShrinkReport(
        checkpoint=str(ck.path),
        output=str(output) if output is not None else None,
        mode="factorize",
        settings=settings,
        layers=reports,
        params_before=sum(i.numel for i in infos.values()),
        params_after=sum(i.numel for i in infos.values())
        - sum(r.params_before - r.params_after for r in reports),
        bytes_before=ck.num_bytes,
        bytes_after=ck.num_bytes + sum(new_bytes[k] - _nbytes(infos[k]) for k in replaced),
    )
    if output is not None:
        tensors: dict[str, Tensor] = {}
        for key in infos:
            tensors.update(replaced[key] if key in replaced else {key: ck.get(key)})
        manifest = {
            "format": 1,
            "wcond_version": __version__,
            "settings": settings,
            "layers": manifest_layers,
            "rebuild": "W[o, c] = row_coef[o] * col_coef[c] * W'[row_index[o], col_index[c]]",
            "suffixes": {
                "w": W_SUFFIX,
                "row_index": ROW_INDEX,
                "row_coef": ROW_COEF,
                "col_index": COL_INDEX,
                "col_coef": COL_COEF,
            },
        }
        report.warnings += _write(ck, output, tensors, {MANIFEST_KEY: json.dumps(manifest)})
    return report


def _axes(
    key: str,
    shape: list[int],
    axis: str,
    first: str | None,
    last: str | None,
    protect: Sequence[str],
    notes: list[str],
) -> list[str]:
    """The axes to fuse in one layer, after the protections; says in ``notes`` what a protection removed."""
    if axis == "auto":
        want = (
            ["rows"]
            if shape[0] > shape[1]
            else ["cols"]
            if shape[1] > shape[0]
            else ["rows", "cols"]
        )
    else:
        want = ["rows", "cols"] if axis == "both" else [axis]
    if any(fnmatch.fnmatchcase(key, g) for g in protect):
        notes.append("protected (--protect): not fused")
        return []
    if key == first and "cols" in want:
        want.remove("cols")
        notes.append(
            "columns protected: the first layer reads the network's inputs (--no-protect-ends lifts this)"
        )
    if key == last and "rows" in want:
        want.remove("rows")
        notes.append(
            "rows protected: the last layer's rows are the outputs (classes) (--no-protect-ends lifts this)"
        )
    return want


def _no_layers(ck: Checkpoint, infos: Mapping[str, TensorInfo]) -> None:
    if any(is_layer(i) for i in infos.values()):
        raise CheckpointError(f"{ck.path}: no layer matches the --layers/--exclude patterns")
    raise CheckpointError(
        f"{ck.path}: no weight matrices or conv kernels to shrink (need floating-point tensors with 2 to 5 dims)"
    )


def _open_source(
    source: str | Path, output: str | Path | None, force: bool
) -> tuple[Checkpoint, dict[str, TensorInfo]]:
    """Check OUT (unless a dry run), then open the source; an already shrunk one is refused."""
    if output is not None:
        check_output(source, output, force)
    ck = open_checkpoint(source)
    infos = {k: ck.info(k) for k in ck.keys()}
    if any(k.endswith(W_SUFFIX) for k in infos):
        raise UsageError(
            f"{ck.path}: is already shrunk (holds {W_SUFFIX} factors); expand it first: wcond expand {ck.path} -o dense.safetensors"
        )
    return ck, infos


def _nbytes(info: TensorInfo) -> int:
    return info.numel * torch.empty((), dtype=info.dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- fold a chain


def fold(
    source: str | Path,
    output: str | Path | None = None,
    *,
    chain: Sequence[str],
    tau_cos: float = 1e-4,
    tau_euc: float = 0.1,
    force: bool = False,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> ShrinkReport:
    """Remove positively parallel units along a chain of layers; write a plain, narrower state dict.

    ``chain`` lists weight keys in the order data flows; each layer must feed the next directly
    through a positively homogeneous, per-unit activation (ReLU, LeakyReLU; max or average pooling
    and eval-mode dropout are fine too): relu(k z) = k relu(z) for k > 0 is what makes this exact.
    Nothing that mixes or shifts units (BatchNorm, LayerNorm, residual sums) may sit between; wcond
    cannot see the model's forward, so it only refuses a BatchNorm of that width beside the layer.

    Where rows i, j of a layer, with the bias ``<key minus .weight>.bias`` appended, are positively
    near-parallel, [w_i, b_i] ~ k [w_j, b_j] with k > 0, unit i is removed and the next layer's
    column i is added to column j times k (least-squares fit for near-parallel units). Tensors keep
    their keys; the model class is rebuilt with the widths in ``report.widths``.

    Example:
        >>> report = fold("mlp.pt", "narrow.pt", chain=["fc1.weight", "fc2.weight", "fc3.weight"])
        >>> report.widths  # {"fc1.weight": [128, 121], "fc2.weight": [128, 126]}
    """
    chain = list(chain)
    if len(chain) < 2:
        raise UsageError(
            "--chain needs at least two layer keys in the order data flows, e.g. --chain fc1.weight,fc2.weight"
        )
    if len(set(chain)) != len(chain):
        raise UsageError(f"--chain names a layer twice: {','.join(chain)}")
    ck, infos = _open_source(source, output, force)
    _check_chain(ck, infos, chain)
    dev = resolve_device(device)

    biases = [b for b in (_bias_key(k, infos) for k in chain[:-1]) if b]
    current: dict[str, Tensor] = {}
    for key in chain + biases:
        t = ck.get(key).to(dev)
        current[key] = t if t.dtype == torch.float64 else t.float()
    reports = {
        k: LayerShrink(k, list(infos[k].shape), list(infos[k].shape), params_before=infos[k].numel)
        for k in chain
    }
    widths: dict[str, list[int]] = {}
    manifest_layers: dict[str, dict[str, Any]] = {}
    total = len(chain) - 1
    for n, (a, b) in enumerate(zip(chain, chain[1:])):
        if progress:
            progress(n, total, a)
        rep = reports[a]
        rep.axes = ["rows"]
        bias = _bias_key(a, infos)
        w = current[a]
        rows = metrics.as_rows(w)
        ext = torch.cat([rows, current[bias][:, None]], dim=1) if bias else rows
        if not bool(torch.isfinite(ext).all()):
            raise CheckpointError(f"{ck.path}: {a!r} holds NaN/Inf values; cannot fold it")
        g = fuse_vectors(ext, tau_cos=tau_cos, tau_euc=tau_euc, positive=True)
        widths[a] = [w.shape[0], g.kept]
        if not g.fused:
            continue
        fused_ext = _compress(ext, g, 0)
        err = float((ext - _spread(fused_ext, g.index, g.coef, 0)).norm()) / float(
            ext.norm()
        )  # > 0: it had pairs
        current[a] = _compress(w, g, 0)
        if bias:
            current[bias] = _compress(current[bias], g, 0)
        current[b] = _compress(
            current[b], g, 1
        )  # next layer: column j gets sum_k coef_k * column k
        rep.fused_rows, rep.reconstruction_error, rep.max_angle_deg = g.fused, err, g.max_angle
        reports[b].fused_cols = g.fused
        reports[b].notes.append(
            f"input columns folded with {a}'s removed units (exact given those units)"
        )
        manifest_layers[a] = {
            "width_before": w.shape[0],
            "width_after": g.kept,
            "removed": g.removed,
            "kept": g.kept_indices,
        }
    if progress:
        progress(total, total, "")
    reports[chain[-1]].reconstruction_error = None  # its rows are the chain's outputs: never fused

    out_tensors = {k: t.to(infos[k].dtype).cpu() for k, t in current.items()}
    for k, rep in reports.items():
        rep.shape_after = list(out_tensors[k].shape)
        rep.params_after = out_tensors[k].numel()
        rep.changed = rep.shape_after != rep.shape_before
    params_before = sum(i.numel for i in infos.values())
    removed = sum(infos[k].numel - t.numel() for k, t in out_tensors.items())
    report = ShrinkReport(
        checkpoint=str(ck.path),
        output=str(output) if output is not None else None,
        mode="fold",
        settings={"tau_cos": tau_cos, "tau_euc": tau_euc, "chain": chain, "device": str(dev)},
        layers=list(reports.values()),
        params_before=params_before,
        params_after=params_before - removed,
        bytes_before=ck.num_bytes,
        bytes_after=ck.num_bytes
        - sum(_nbytes(infos[k]) - t.numel() * t.element_size() for k, t in out_tensors.items()),
        widths=widths,
    )
    if output is not None:
        changed = {k: t for k, t in out_tensors.items() if t.shape != infos[k].shape}
        tensors = {key: changed[key] if key in changed else ck.get(key) for key in infos}
        manifest = {
            "format": 1,
            "wcond_version": __version__,
            "mode": "fold",
            "chain": chain,
            "settings": report.settings,
            "layers": manifest_layers,
        }
        entries = {FOLD_MANIFEST_KEY: json.dumps(manifest)}
        if output_format(output) == "torch" and not ck.wrapper:
            # In a bare state dict an extra entry would break model.load_state_dict(torch.load(OUT)).
            entries = {}
            report.warnings.append(
                f"{output}: a bare torch state dict has no place for the removed indices (they are in this report); "
                "write .safetensors to keep them in the file's metadata"
            )
        report.warnings += _write(ck, output, tensors, entries)
    return report


def _bias_key(key: str, infos: Mapping[str, TensorInfo]) -> str | None:
    """``<module>.bias`` of a ``<module>.weight`` when it exists with one entry per output unit."""
    if not key.endswith(".weight"):
        return None
    bias = key.removesuffix(".weight") + ".bias"
    info = infos.get(bias)
    return bias if info is not None and info.shape == (infos[key].shape[0],) else None


def _parent(key: str) -> str:
    """The module holding a tensor's module: 'features' for 'features.1.running_mean', '' for 'bn1.weight'."""
    return key.rsplit(".", 2)[0] if key.count(".") >= 2 else ""


def _check_chain(ck: Checkpoint, infos: Mapping[str, TensorInfo], chain: Sequence[str]) -> None:
    for key in chain:
        if key not in infos:
            hint = f"; did you mean {key + '.weight'!r}?" if key + ".weight" in infos else ""
            raise UsageError(f"--chain: {ck.path} has no tensor named {key!r}{hint}")
        if not is_layer(infos[key]):
            raise UsageError(
                f"--chain: {key!r} (shape {list(infos[key].shape)}) is not a weight matrix or conv kernel"
            )
    for a, b in zip(chain, chain[1:]):
        out_a, in_b = infos[a].shape[0], infos[b].shape[1]
        if out_a != in_b:
            raise UsageError(
                f"--chain: {b!r} reads {in_b} inputs but {a!r} produces {out_a} units; each layer must feed the next "
                "directly (no flatten, grouped conv or concatenation between)"
            )
        for k, info in infos.items():
            if (
                k.endswith((".running_mean", ".running_var"))
                and info.shape == (out_a,)
                and _parent(k) == _parent(a)
            ):
                raise UsageError(
                    f"--chain: {k!r} looks like a BatchNorm on the {out_a} units of {a!r}; --fold needs each layer to feed the "
                    "next through ReLU/LeakyReLU with nothing between. Fold the BatchNorm into the layer first, or shrink without --fold"
                )


# --------------------------------------------------------------------------- reading shrunk checkpoints


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
    infos: Mapping[str, TensorInfo], get: Callable[[str], Tensor]
) -> tuple[dict[str, TensorInfo], Callable[[str], Tensor], dict[str, Factored]]:
    """The dense checkpoint a shrunk one stands for: factor keys replaced by the original key.

    Returns the infos in stored order (a factorized layer where its W' is), a getter that rebuilds
    factorized layers on demand, and the factorized layers by key. Any other checkpoint passes
    through unchanged.
    """
    if not any(k.endswith(W_SUFFIX) or k.endswith(_PARTS) for k in infos):
        return dict(infos), get, {}
    out: dict[str, TensorInfo] = {}
    factored: dict[str, Factored] = {}
    for key, info in infos.items():
        if key.endswith(W_SUFFIX):
            base = key.removesuffix(W_SUFFIX)
            factored[base] = _factored(base, infos)
            out[base] = TensorInfo(factored[base].dense_shape, info.dtype)
        elif key.endswith(_PARTS):
            base = key.removesuffix(next(p for p in _PARTS if key.endswith(p)))
            if base + W_SUFFIX not in infos:
                raise CheckpointError(
                    f"{key!r} has no {base + W_SUFFIX!r} beside it: the shrunk checkpoint is incomplete"
                )
        else:
            out[key] = info

    def view_get(key: str) -> Tensor:
        f = factored.get(key)
        if f is None:
            return get(key)
        w = get(key + W_SUFFIX)
        parts = [
            _axis_parts(key, get, suffixes, w.shape[dim]) if on else None
            for on, suffixes, dim in (
                (f.rows, (ROW_INDEX, ROW_COEF), 0),
                (f.cols, (COL_INDEX, COL_COEF), 1),
            )
        ]
        return rebuild_dense(w, parts[0], parts[1]).to(w.dtype)

    return out, view_get, factored


def _factored(base: str, infos: Mapping[str, TensorInfo]) -> Factored:
    if base in infos:
        raise CheckpointError(
            f"{base!r} is stored both dense and factorized ({base + W_SUFFIX!r}); the checkpoint is inconsistent"
        )
    w = infos[base + W_SUFFIX]
    if len(w.shape) < 2:
        raise CheckpointError(
            f"{base + W_SUFFIX!r} has shape {list(w.shape)}; a factorized weight has at least 2 dims"
        )
    shape = list(w.shape)
    on = []
    for dim, (idx, coef) in enumerate(((ROW_INDEX, ROW_COEF), (COL_INDEX, COL_COEF))):
        i, c = infos.get(base + idx), infos.get(base + coef)
        if (i is None) != (c is None):
            have, missing = (idx, coef) if i is not None else (coef, idx)
            raise CheckpointError(
                f"{base + have!r} has no {base + missing!r} beside it: the shrunk checkpoint is incomplete"
            )
        if i is not None and c is not None:
            if len(i.shape) != 1 or i.shape != c.shape or i.dtype.is_floating_point:
                raise CheckpointError(
                    f"{base + idx!r} and {base + coef!r} must be an integer and a float vector of the same length "
                    f"(got {list(i.shape)} {_dtype_name(i.dtype)} and {list(c.shape)} {_dtype_name(c.dtype)})"
                )
            shape[dim] = i.shape[0]
        on.append(i is not None)
    return Factored(base, tuple(w.shape), tuple(shape), on[0], on[1])


def _axis_parts(
    base: str, get: Callable[[str], Tensor], suffixes: tuple[str, str], size: int
) -> tuple[Tensor, Tensor]:
    index, coef = get(base + suffixes[0]), get(base + suffixes[1])
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise CheckpointError(
            f"{base + suffixes[0]!r} points outside the {size} stored rows/columns of {base + W_SUFFIX!r}"
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
    infos, get, _ = dense_view({k: ck.info(k) for k in ck.keys()}, ck.get)
    return {k: get(k) for k in infos}


@dataclass
class ExpandResult:
    """What `wcond expand` wrote."""

    checkpoint: str
    output: str
    expanded: list[str]  # keys rebuilt from factors
    warnings: list[str] = field(default_factory=list)


def expand(source: str | Path, output: str | Path, *, force: bool = False) -> ExpandResult:
    """Write a shrunk checkpoint's dense tensors (see :func:`load_state_dict`) as a plain checkpoint.

    Example:
        >>> expand("small.safetensors", "dense.safetensors")
    """
    check_output(source, output, force)
    ck = open_checkpoint(source)
    infos, get, factored = dense_view({k: ck.info(k) for k in ck.keys()}, ck.get)
    tensors = {k: get(k) for k in infos}
    result = ExpandResult(str(ck.path), str(output), list(factored))
    result.warnings += _write(ck, output, tensors, {})
    return result


# --------------------------------------------------------------------------- writing


_MANIFESTS = (MANIFEST_KEY, FOLD_MANIFEST_KEY)


def _write(
    ck: Checkpoint, output: str | Path, tensors: dict[str, Tensor], entries: Mapping[str, str]
) -> list[str]:
    """Save ``tensors`` in their given order through wcond.save with the source's layout.

    ``entries`` (the manifest) go to the safetensors metadata, or to the top level of a torch
    file; stale wcond manifests of the source are dropped.
    """
    layout = Checkpoint(ck.path, ck.format, ck.files)
    # Without a source object to rebuild (a DCP directory, torch shards) the output is flat.
    layout.wrapper = ck.wrapper if ck.obj is not None else ()
    layout.metadata = {k: v for k, v in ck.metadata.items() if k not in _MANIFESTS}
    if output_format(output) == "safetensors":
        layout.obj = (
            ck.obj
        )  # only consulted to warn about a wrapper's entries that safetensors cannot hold
        return save_checkpoint(output, tensors, like=layout, metadata=entries)
    # save_checkpoint keeps the order and non-tensor entries of ``like.obj``: give it the source's
    # structure with the new tensors in their new order, so a factorized layer sits where it was.
    layout.obj = _torch_layout(ck.obj, layout.wrapper, tensors, entries)
    return save_checkpoint(output, tensors, like=layout)


def _torch_layout(
    obj: Any, wrapper: tuple[str, ...], tensors: Mapping[str, Tensor], entries: Mapping[str, str]
) -> Any:
    def loose(node: Any) -> dict[str, Any]:
        """A node's entries that are neither tensors nor hold tensors, stale manifests left out."""
        if not isinstance(node, Mapping):
            return {}
        return {k: v for k, v in node.items() if k not in _MANIFESTS and not _holds_tensors(v)}

    if not wrapper:
        return {**tensors, **loose(obj), **entries}
    top: dict[str, Any] = {k: v for k, v in obj.items() if k not in _MANIFESTS}
    node = top
    for k in wrapper[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    inner = node[wrapper[-1]]
    node[wrapper[-1]] = {**tensors, **loose(inner)}
    top.update(entries)
    return top


def _holds_tensors(v: Any) -> bool:
    return isinstance(v, Tensor) or (
        isinstance(v, Mapping) and any(_holds_tensors(x) for x in v.values())
    )
