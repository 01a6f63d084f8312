"""Shrinking a checkpoint into the factorized format (docs/FACTORIZED.md): W ~ P W' Q per layer."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wcond import metrics
from wcond._version import __version__
from wcond.checkpoint.base import Checkpoint, TensorInfo
from wcond.checkpoint.factorized import (
    COL_FUSED,
    COL_SCALE,
    MANIFEST_KEY,
    ROW_FUSED,
    ROW_SCALE,
    W_SUFFIX,
    along_dim,
    rebuild_fused,
)
from wcond.checkpoint.open import open_checkpoint
from wcond.checkpoint.target import output_format
from wcond.defaults import AXES, AXIS, DEVICE, TAU_COS, TAU_EUC, ProgressFn
from wcond.engine import Engine, Task, open_on_worker, plan_tasks
from wcond.engine.device import resolve_device
from wcond.errors import CheckpointError, UsageError
from wcond.layers import find_layers, is_fp8, is_layer, matches, no_match_message
from wcond.shrink.output import (
    _MANIFESTS,
    _formats,
    _open_source,
    _write,
    _written_bytes,
)
from wcond.shrink.pairs import Grouping, compress, fuse_vectors
from wcond.shrink.report import LayerShrink, ShrinkReport
from wcond.shrink.sizing import entry_bytes, file_bytes, manifest_bytes, safetensors_bytes

__all__ = ["MANIFEST", "Factorization", "factorize", "owner_scaled", "paying_parts", "shrink"]

_INDEX_BYTES = 4  # int32
# The manifest a factorized file carries (docs/FACTORIZED.md): the format and the writer, no
# more. The keys alone say how to rebuild, and a small manifest lets a layer pay from its first
# fused pairs; settings and per-layer figures are in the shrink report.
MANIFEST = json.dumps({"format": 2, "wcond_version": __version__}, separators=(",", ":"))
_FORMAT_2_AXES = ((ROW_FUSED, ROW_SCALE), (COL_FUSED, COL_SCALE))  # (fused, scale): rows, columns


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

    def tensors(self, key: str) -> dict[str, Tensor]:
        """The entries that replace ``key`` in a shrunk checkpoint (format 2, docs/FACTORIZED.md).

        W' comes with each stored row/column rescaled so that the original owning it has
        coefficient 1 (:func:`owner_scaled`); per fused axis, the originals without a stored
        row/column of their own as int32 [original, stored] pairs and their scales, float32
        (float64 for float64 layers).
        """
        w = self.w if self.w.dtype == torch.float64 else self.w.float()
        axes: dict[str, Tensor] = {}
        for dim, (g, (fused_key, scale_key)) in enumerate(
            zip((self.rows, self.cols), _FORMAT_2_AXES)
        ):
            if g is not None:
                w, fused, scale = owner_scaled(w, g, dim)
                axes[key + fused_key] = fused
                axes[key + scale_key] = scale.to(_coef_dtype(self.w.dtype))
        return {key + W_SUFFIX: w.to(self.w.dtype), **axes}

    def rebuilt(self, device: torch.device | str = "cpu") -> Tensor:
        """The dense weight a reader rebuilds from :meth:`tensors` (float32; float64 for float64 layers)."""
        parts = {k: t.to(device) for k, t in self.tensors("").items()}
        return rebuild_fused(
            parts[W_SUFFIX],
            *((parts[f], parts[c]) if f in parts else None for f, c in _FORMAT_2_AXES),
        )

    @property
    def stored_bytes(self) -> int:
        """The data bytes of :meth:`tensors`: W', and per fused pair an int32 pair and a scale."""
        per = 2 * _INDEX_BYTES + _coef_dtype(self.w.dtype).itemsize
        n = sum(g.index.numel() - g.kept for g in (self.rows, self.cols) if g is not None)
        return self.w.numel() * self.w.element_size() + n * per


def owner_scaled(w: Tensor, g: Grouping, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """One fused axis in format 2: ``w`` (W') rescaled, the (F, 2) [original, stored] pairs, the scales.

    A grouping rebuilds original k as ``coef[k] * w[index[k]]`` along ``dim``. The original that
    owns stored slot p (``kept_indices[p]``) has coefficient c_p = coef[kept_indices[p]] (1/s
    after fusing, not 1): slot p is multiplied by c_p, so its owner needs no entry, and each
    original without a slot of its own is listed, in increasing order, as [original, p] with
    scale coef[original] / c_p. The rebuild is unchanged up to rounding. ``w`` is computed in the
    dtype given; the scales come in float64.

    Raises:
        ValueError: a grouping format 2 cannot hold: a kept original not in its own slot
            (slots follow the kept originals' order), or an owner with coefficient 0.
    """
    index, coef = g.index.cpu().to(torch.int64), g.coef.cpu().to(torch.float64)
    kept = torch.tensor(g.kept_indices, dtype=torch.int64)
    if not torch.equal(index[kept], torch.arange(kept.numel())) or bool((kept.diff() <= 0).any()):
        raise ValueError("kept_indices[p] must be the original in slot p, in increasing order")
    owner = coef[kept]
    if not bool((owner != 0).all()):
        raise ValueError("an original that owns a slot has coefficient 0")
    removed = torch.tensor(g.removed, dtype=torch.int64)
    slot = index[removed]
    scaled = w * owner.to(w.device, w.dtype).view(along_dim(w.ndim, dim))
    fused = torch.stack([removed, slot], dim=1).to(torch.int32)
    return scaled, fused, coef[removed] / owner[slot]


def _coef_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def factorize(
    w: Tensor,
    axes: Sequence[str] = ("rows",),
    *,
    tau_cos: float = TAU_COS,
    tau_euc: float = TAU_EUC,
    device: torch.device | str = DEVICE,
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
        small = compress(small, rows, 0) if rows.fused else small
    if "cols" in axes:
        cols = fuse_vectors(metrics.as_cols(small), tau_cos=tau_cos, tau_euc=tau_euc)
        small = compress(small, cols, 1) if cols.fused else small
    rows = rows if rows and rows.fused else None
    cols = cols if cols and cols.fused else None
    f = Factorization(small.to(w.dtype).cpu(), rows, cols, None)
    # the error of the values as written: W' rescaled and cast, the scales cast
    rebuilt = f.rebuilt(x.device).to(x.dtype)
    total = float(x.norm())
    f.error = float((x - rebuilt).norm()) / total if total > 0 else None
    return f


def shrink(
    source: str | Path,
    output: str | Path | None = None,
    *,
    tau_cos: float = TAU_COS,
    tau_euc: float = TAU_EUC,
    axis: str = AXIS,
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    protect: Sequence[str] = (),
    protect_ends: bool = True,
    force: bool = False,
    device: str = DEVICE,
    progress: ProgressFn | None = None,
    engine: Engine | None = None,
) -> ShrinkReport:
    """Fuse near-parallel rows/columns of every selected layer and write the factorized checkpoint.

    Args:
        output: where to write (.safetensors or a torch extension); None reports without writing.
        axis: "auto" fuses along the longer axis only (more rows than columns: rows), both axes
            for a square layer; or "rows", "cols", "both".
        layers, exclude: globs of layer keys to shrink or skip; a module name (``net.0``,
            ``features.*``) stands for its ``.weight``.
        protect: globs of layers never fused (keys or module names). With ``protect_ends`` (default), the first
            analyzable weight's columns (the network's inputs) and the last one's rows (its
            classes) are never fused, "first" and "last" in stored order, as in the paper.
        force: overwrite an existing ``output``.
        engine: where the layers are factorized: None for this process, or a
            :class:`wcond.engine.RayEngine` whose tasks read their layers from ``source`` (a path
            its workers see); the checkpoint is still written here. Progress then counts tasks.

    A layer is stored factorized only when that makes the file smaller: W', the [original,
    stored] pair and the scale per fused row/column and their entries in the file, counted from
    above, against
    the dense layer and its entry, counted from below; and only when the layers that pay save
    more than the manifest costs. So OUT is never larger than IN in the same format (a torch
    file stores its own name in each record: compare files of equal name length). Untouched
    tensors are written bit-identical.

    Example:
        >>> report = wcond.shrink.shrink("model.pt", "small.safetensors", tau_cos=1e-4)
        >>> model.load_state_dict(wcond.load_state_dict("small.safetensors"))
    """
    if axis not in AXES:
        raise UsageError(f"axis={axis!r}: use one of {', '.join(AXES)}", params=("axis",))
    ck, infos = _open_source(source, output, force)
    local = engine is None or engine.name == "local"
    # Here, an unusable device fails before anything is read; on an engine the workers resolve it.
    dev = resolve_device(device) if local else None
    specs = find_layers(infos, layers, exclude)
    if not specs:
        _no_layers(ck, infos, layers, exclude)
    analyzable = [k for k, i in infos.items() if is_layer(i)]
    first, last = (analyzable[0], analyzable[-1]) if protect_ends else (None, None)
    options: dict[str, Any] = {"tau_cos": tau_cos, "tau_euc": tau_euc}
    remote: dict[str, Factorization | None] = {}
    if engine is not None and not local:
        axes_of = {
            s.key: _axes(s.key, list(s.info.shape), axis, first, last, protect, []) for s in specs
        }
        work = [s for s in specs if axes_of[s.key] and not is_fp8(s.info.dtype)]
        tasks = plan_tasks(str(Path(ck.path).resolve()), [(s.key, s.info.numel) for s in work])
        results = engine.map(
            _factorize_task,
            tasks,
            {k: axes_of[k] for k in (s.key for s in work)},
            {**options, "device": device},
            gpu=str(device).startswith("cuda"),
            progress=progress,
        )
        for task, result in zip(tasks, results):
            remote.update(zip(task.keys, result))
        progress = None  # the engine reported progress by tasks

    fmt = _size_format(ck, output)
    size_before = file_bytes(ck.files)
    total = sum(s.info.numel for s in specs)
    done = 0
    reports: list[LayerShrink] = []
    factorizations: dict[str, Factorization] = {}
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
        if is_fp8(spec.info.dtype):
            rep.notes.append(
                "FP8 weights: not fused (W' and its coefficients would be stored wider than 8 bits)"
            )
            continue
        if spec.key in remote:
            f = remote[spec.key]
        else:
            assert dev is not None  # resolved above for every run that is not on an engine
            f = _factorize_layer(ck.get(spec.key), rep.axes, device=dev, **options)
        if f is None:
            rep.notes.append("NaN/Inf values: not fused")
            rep.reconstruction_error = None
            continue
        if not (f.fused_rows or f.fused_cols):
            continue
        factorizations[spec.key] = f
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
        # Where the work ran is its own field: the tensors and every other setting are the same
        # whichever engine wrote them, and the device is the one asked for (an engine's workers
        # resolve "auto" themselves).
        "device": str(dev) if dev is not None else str(device),
        "engine": engine.name if engine is not None else "local",
    }
    replaced, estimate = paying_parts(
        fmt,
        infos,
        factorizations,
        {r.name: r.notes for r in reports},
        metadata={k: v for k, v in ck.metadata.items() if k not in _MANIFESTS},
        archive=Path(output if output is not None else ck.path).stem,
        size_before=size_before,
    )
    for rep in reports:
        if rep.name in replaced:
            f = factorizations[rep.name]
            rep.fused_rows, rep.fused_cols = f.fused_rows, f.fused_cols
            rep.shape_after = list(f.w.shape)
            rep.params_after = f.w.numel()
            rep.reconstruction_error, rep.max_angle_deg = f.error, f.max_angle
            rep.changed = True

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
        bytes_after=ck.num_bytes
        + sum(new_bytes[k] - infos[k].numel * infos[k].dtype.itemsize for k in replaced),
        file_bytes_before=size_before,
    )
    if output is None:
        # a dry run: what the size rule counted, for the source's own format
        report.file_bytes_after = estimate
        report.file_bytes_estimated = True
        return report
    tensors: dict[str, Tensor] = {}
    for key in infos:
        tensors.update(replaced[key] if key in replaced else {key: ck.get(key)})
    entries = {MANIFEST_KEY: MANIFEST} if replaced else {}
    report.warnings += _write(ck, output, tensors, entries)
    report.file_bytes_after = _written_bytes(output)
    report.formats = _formats(ck, output)
    return report


def paying_parts(
    fmt: str,
    infos: Mapping[str, TensorInfo],
    factorizations: Mapping[str, Factorization],
    notes: Mapping[str, list[str]],
    *,
    metadata: Mapping[str, str],
    archive: str,
    size_before: int,
) -> tuple[dict[str, dict[str, Tensor]], int]:
    """The layers worth storing factorized in a file of format ``fmt``, with their parts, and its size.

    A layer is stored factorized only when that makes the file smaller: W', its fused pairs and
    scales and their entries in the file, counted from above, against the dense layer and its
    entry, counted from below; and only when the layers that pay also pay for the manifest.
    Safetensors files are counted exactly, torch files within bounds (``archive``: the file's
    stem, which names its zip records). Each layer left dense gets a line in ``notes[key]``.

    Args:
        infos: every tensor of the dense checkpoint, in order; ``metadata``: its safetensors
            metadata (without wcond's manifests); ``size_before``: its file's size.

    Returns:
        The parts by key of the layers kept, and the size of the file they make (exact for
        safetensors, a bound from above for torch; ``size_before`` when none is kept).
    """
    offsets = 2 * max(size_before, sum(i.numel * i.dtype.itemsize for i in infos.values()))
    candidates = []
    for key, f in factorizations.items():
        info = infos[key]
        parts = f.tensors(key)
        dense = entry_bytes(
            fmt, key, info.shape, info.dtype, file_size=offsets, archive=archive, upper=False
        )
        factored = sum(
            entry_bytes(fmt, k, t.shape, t.dtype, file_size=offsets, archive=archive, upper=True)
            for k, t in parts.items()
        )
        c = _Candidate(key, f, parts, dense - factored, notes[key])
        if factored >= dense:
            c.left_dense(
                f"W' with its fused pairs and scales takes up to {factored:,} bytes of the file, "
                f"dense at least {dense:,}"
            )
            continue
        candidates.append(c)
    if fmt == "safetensors":
        kept, size = _pay_exactly(metadata, infos, candidates)
    else:
        kept, size = _pay_within_bounds(candidates, size_before)
    return {c.key: c.parts for c in kept}, size


@dataclass
class _Candidate:
    """A layer that pays on its own: its factors, their tensors and the bytes it saves at least."""

    key: str
    f: Factorization
    parts: dict[str, Tensor]
    gain: int
    notes: list[str]

    def left_dense(self, why: str) -> None:
        self.notes.append(
            f"{self.f.fused_rows} row and {self.f.fused_cols} column pairs would fuse, but {why}: "
            "left dense"
        )


def _pay_within_bounds(
    candidates: list[_Candidate], size_before: int
) -> tuple[list[_Candidate], int]:
    """Torch files: keep the layers that pay only if together they also pay for the manifest.

    Returns the layers kept and a bound from above on the file's size (the source's when none).
    """
    fixed = manifest_bytes("torch", MANIFEST_KEY, MANIFEST)
    gain = sum(c.gain for c in candidates)
    if candidates and gain <= fixed:
        for c in candidates:
            c.left_dense(
                f"all the factorized layers together save at most {gain:,} bytes and the "
                f"manifest a factorized file carries takes up to {fixed:,}"
            )
        return [], size_before
    return candidates, size_before - gain + fixed if candidates else size_before


def _pay_exactly(
    metadata: Mapping[str, str],
    infos: Mapping[str, TensorInfo],
    candidates: list[_Candidate],
) -> tuple[list[_Candidate], int]:
    """Safetensors: drop the layers that gain least until the exact file size is below the dense one.

    Returns the layers kept and the exact size of the file they make.
    """
    dense = safetensors_bytes(((k, i.shape, i.dtype) for k, i in infos.items()), metadata or None)
    kept = sorted(candidates, key=lambda c: -c.gain)
    while kept:
        parts = {c.key: c.parts for c in kept}
        entries: list[tuple[str, Sequence[int], torch.dtype]] = []
        for key, info in infos.items():
            if key in parts:
                entries += [(k, t.shape, t.dtype) for k, t in parts[key].items()]
            else:
                entries.append((key, info.shape, info.dtype))
        size = safetensors_bytes(entries, {**metadata, MANIFEST_KEY: MANIFEST})
        if size < dense:
            return kept, size
        c = kept.pop()
        c.left_dense(
            f"with the manifest a factorized file carries the file would take {size:,} bytes, "
            f"dense {dense:,}"
        )
    return [], dense


def _size_format(ck: Checkpoint, output: str | Path | None) -> str:
    """The format whose bytes the size rule counts: OUT's, or for a dry run the source's."""
    if output is not None:
        return output_format(output)
    return "safetensors" if all(p.suffix == ".safetensors" for p in ck.files) else "torch"


def _factorize_layer(
    w: Tensor, axes: Sequence[str], *, tau_cos: float, tau_euc: float, device: torch.device | str
) -> Factorization | None:
    """One layer's factorization, None when it holds NaN/Inf: the per-layer step of both paths."""
    if not bool(torch.isfinite(w).all()):
        return None
    return factorize(w, axes, tau_cos=tau_cos, tau_euc=tau_euc, device=device)


def _factorize_task(
    task: Task, axes_of: dict[str, list[str]], options: dict[str, Any]
) -> list[Factorization | None]:
    """An engine task: reopen the checkpoint where the worker runs and factorize the task's layers."""
    ck = open_checkpoint(open_on_worker(task.path))
    options = dict(options)
    dev = resolve_device(options.pop("device"))
    out = []
    for key in task.keys:
        f = _factorize_layer(ck.get(key), axes_of[key], device=dev, **options)
        if f is not None:  # the driver may have no GPU: ship the groupings on the CPU
            for g in (f.rows, f.cols):
                if g is not None:
                    g.index, g.coef = g.index.cpu(), g.coef.cpu()
        out.append(f)
    return out


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
    if matches(key, protect):
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


def _no_layers(
    ck: Checkpoint,
    infos: Mapping[str, TensorInfo],
    layers: Sequence[str],
    exclude: Sequence[str],
) -> None:
    if any(is_layer(i) for i in infos.values()):
        keys = [k for k, i in infos.items() if is_layer(i)]
        raise CheckpointError(
            no_match_message(str(ck.path), keys, layers, exclude), params=("layers", "exclude")
        )
    raise CheckpointError(
        f"{ck.path}: no weight matrices or conv kernels to shrink (need floating-point tensors with 2 to 5 dims)"
    )
