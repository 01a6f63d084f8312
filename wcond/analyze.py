"""Per-layer redundancy report of a checkpoint: the numbers behind `wcond inspect`.

Each value is computed by the function in :mod:`wcond.metrics` that defines it; this module
only walks the layers, keeps memory bounded (one layer at a time) and collects the results
into plain dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from wcond import metrics
from wcond.device import resolve_device
from wcond.errors import CheckpointError
from wcond.gates import Gate, GateResult, evaluate_gates
from wcond.layers import find_layers, is_layer, layer_kind
from wcond.load import Checkpoint, TensorInfo, open_checkpoint
from wcond.module import module_view
from wcond.shrink import dense_view

__all__ = ["LayerReport", "Report", "Summary", "analyze_tensor", "inspect"]

ProgressFn = Callable[[int, int, str], None]

# Keys of LayerReport that hold one number each: the ones gates and diffs can name.
NUMERIC_FIELDS = (
    "acv_sum",
    "acv_mean",
    "acv_floor",
    "conv_similarity",
    "conv_similarity_norm",
    "conv_similarity_floor",
    "norm_loss",
    "norm_dev_max",
    "rare_rows",
    "rare_cols",
    "near_parallel_rows",
    "near_parallel_cols",
    "dead_rows",
    "dead_cols",
    "nonfinite",
    "params",
)


@dataclass
class LayerReport:
    """The diagnostics of one layer. ``None`` marks a value that does not apply (CS of a matrix)."""

    name: str
    kind: str
    shape: list[int]
    dtype: str
    params: int
    groups: int = 1
    acv_sum: float | None = None
    acv_mean: float | None = None
    acv_floor: float | None = None
    conv_similarity: float | None = None
    conv_similarity_norm: float | None = None
    conv_similarity_floor: float | None = None
    norm_loss: float | None = None
    norm_dev_max: float | None = None
    rare_rows: float | None = None
    rare_cols: float | None = None
    near_parallel_rows: int | None = None
    near_parallel_cols: int | None = None
    dead_rows: int = 0
    dead_cols: int = 0
    nonfinite: int = 0
    closest_rows: list[metrics.Pair] = field(default_factory=list)
    closest_cols: list[metrics.Pair] = field(default_factory=list)
    factorized: dict[str, int] | None = (
        None  # stored by `wcond shrink`: {"params_stored", "params_dense"}
    )
    notes: list[str] = field(default_factory=list)

    def value(self, metric: str) -> float | None:
        v = getattr(self, metric)
        return None if v is None else float(v)


@dataclass
class Summary:
    """Totals over the analyzed layers and the most redundant ones."""

    layers: int
    params: int
    tensors: int
    skipped_tensors: int
    acv_sum: float
    conv_similarity: float | None  # None when no conv layer was analyzed
    norm_loss: float
    near_parallel_rows: int
    near_parallel_cols: int
    dead_rows: int
    nonfinite_layers: int
    worst: dict[str, list[str]]


@dataclass
class Report:
    """What `wcond inspect` reports: settings, one LayerReport per layer, a Summary, gate verdicts."""

    checkpoint: str
    format: str
    wrapper: str | None
    settings: dict[str, Any]
    layers: list[LayerReport]
    summary: Summary
    gates: list[GateResult] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(not g.passed for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats become None."""
        return _finite(asdict(self))

    def to_pandas(self) -> Any:
        """A pandas DataFrame: one row per layer (index: tensor key), one column per metric, None as NaN.

        Needs pandas (``pip install 'wcond[pandas]'``), imported only here.

        Example:
            >>> wcond.inspect("model.pt").to_pandas().sort_values("acv_mean").tail(3)
        """
        from wcond.frames import report_frame

        return report_frame(self)


# Which fields each part of analyze_tensor fills, so that a caller asking for a few (the training
# monitor) pays only for those.
ROW_FIELDS = ("acv_sum", "acv_mean", "acv_floor", "rare_rows", "near_parallel_rows", "dead_rows")
COL_FIELDS = ("rare_cols", "near_parallel_cols", "dead_cols")
NORM_FIELDS = ("norm_loss", "norm_dev_max")
CONV_FIELDS = ("conv_similarity", "conv_similarity_norm", "conv_similarity_floor")


def analyze_tensor(
    name: str,
    w: torch.Tensor,
    *,
    groups: int = 1,
    tau_cos: float = 1e-4,
    tau_euc: float = 0.1,
    top: int = 3,
    device: torch.device | str = "cpu",
    fields: Collection[str] | None = None,
) -> LayerReport:
    """All diagnostics of one weight tensor of shape (out, in, *kernel).

    ``fields`` (names of NUMERIC_FIELDS) limits the work to what those need; the others stay None/0.
    """
    shape = list(w.shape)
    rep = LayerReport(
        name=name,
        kind=layer_kind(shape),
        shape=shape,
        dtype=str(w.dtype).removeprefix("torch."),
        params=w.numel(),
        groups=groups,
    )

    def wanted(part: tuple[str, ...]) -> bool:
        return fields is None or any(f in fields for f in part)

    w = w.to(device=device)
    with torch.no_grad():
        # NaN propagates through aminmax and an infinity shows at one end: one pass, 8x cheaper
        # than isfinite on CPU, settles the usual all-finite case (benchmarks/README.md, monitor).
        lo, hi = torch.aminmax(w) if w.numel() else (w.new_zeros(()), w.new_zeros(()))
        finite = math.isfinite(float(lo)) and math.isfinite(float(hi))
        bad = 0 if finite else int((~torch.isfinite(w)).sum())
        if bad:
            rep.nonfinite = bad
            rep.notes.append(f"{bad} NaN/Inf values: metrics not computed")
            return rep
        if wanted(ROW_FIELDS):
            rows = metrics.pair_statistics(
                metrics.as_rows(w), tau_cos=tau_cos, tau_euc=tau_euc, top_k=top
            )
            rep.dead_rows = len(rows.dead)
            rep.acv_sum = float(rows.acv_sum)
            rep.acv_mean = rows.acv_mean
            rep.acv_floor = metrics.acv_floor(rows.live, math.prod(shape[1:]))
            rep.rare_rows = _opt(rows.rare)
            rep.near_parallel_rows = rows.near_parallel
            rep.closest_rows = rows.closest
            if rows.dead:
                n = len(rows.dead)
                rep.notes.append(
                    f"{n} all-zero row{'s' if n > 1 else ''} (left out of cosine metrics)"
                )
        if wanted(COL_FIELDS):
            cols = metrics.pair_statistics(
                metrics.as_cols(w), tau_cos=tau_cos, tau_euc=tau_euc, top_k=top
            )
            rep.dead_cols = len(cols.dead)
            rep.rare_cols = _opt(cols.rare)
            rep.near_parallel_cols = cols.near_parallel
            rep.closest_cols = cols.closest
        if wanted(NORM_FIELDS):
            rep.norm_loss = float(metrics.norm_loss(w))
            rep.norm_dev_max = float(metrics.norm_dev_max(w))
        if w.ndim >= 3 and wanted(CONV_FIELDS):
            cs = metrics.conv_similarity(w, groups=groups)
            rep.conv_similarity = float(cs)
            pair_norms = float(metrics.pair_norm_products(w, groups))
            rep.conv_similarity_norm = float(cs) / pair_norms if pair_norms else None
            if fields is None or "conv_similarity_floor" in fields:
                rep.conv_similarity_floor = metrics.conv_similarity_floor(w, groups=groups)
    return rep


def inspect(
    source: str | Path | Checkpoint | Mapping[str, torch.Tensor] | torch.nn.Module,
    *,
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    groups: Mapping[str, int] | None = None,
    tau_cos: float = 1e-4,
    tau_euc: float = 0.1,
    top: int = 3,
    device: str = "cpu",
    fail_if: Sequence[str | Gate] = (),
    progress: ProgressFn | None = None,
) -> Report:
    """Analyze every selected layer of a checkpoint (path, opened Checkpoint, state dict, or module).

    Args:
        source: a checkpoint path, an opened Checkpoint, a state dict, or an ``nn.Module`` (whose
            convs give their own groups and whose Conv/Linear/Embedding layers name their kind).
        layers, exclude: glob patterns on tensor keys.
        groups: conv groups by key or glob (a state dict does not record them; a module does).
        tau_cos, tau_euc: near-parallel thresholds (METRICS.md).
        top: how many closest pairs to list per layer and axis.
        device: "auto", "cpu", "cuda", "mps" or any torch device string.
        fail_if: gate expressions such as "acv_mean>0.5".
        progress: called as progress(bytes_done, bytes_total, key) while layers are read.

    Example:
        >>> report = wcond.inspect("model.safetensors", fail_if=["near_parallel_rows>0"])
        >>> [layer.name for layer in report.layers if layer.acv_mean > 0.2]
    """
    gates = [g if isinstance(g, Gate) else Gate.parse(g) for g in fail_if]
    dev = resolve_device(device)
    known_groups: dict[str, int] = {}
    kinds: dict[str, str] = {}
    source_name = None
    if isinstance(source, torch.nn.Module):
        view = module_view(source)
        source, known_groups, kinds, source_name = view.tensors, view.groups, view.kinds, view.name
    if isinstance(source, Mapping):
        infos = {
            k: TensorInfo(tuple(t.shape), t.dtype)
            for k, t in source.items()
            if isinstance(t, torch.Tensor)
        }
        get = source.__getitem__
        name, fmt = (source_name, "module") if source_name else ("<state_dict>", "state_dict")
        wrapper = None
    else:
        ck = source if isinstance(source, Checkpoint) else open_checkpoint(source)
        infos = {k: ck.info(k) for k in ck.keys()}
        get = ck.get
        name, fmt, wrapper = str(ck.path), ck.format, ".".join(ck.wrapper) or None
    infos, get, factored = dense_view(
        infos, get
    )  # a shrunk checkpoint: analyze the dense weights it stands for
    # The module's own conv groups come first: find_layers takes the first pattern that matches.
    specs = find_layers(infos, layers, exclude, {**known_groups, **(groups or {})})
    if not specs:
        if any(is_layer(i) for i in infos.values()):
            raise CheckpointError(f"{name}: no layer matches the --layers/--exclude patterns")
        raise CheckpointError(
            f"{name}: no analyzable tensors (need floating-point tensors with 2 to 5 dims and at least 2 rows)"
        )
    total = sum(s.info.numel for s in specs)
    done = 0
    reports: list[LayerReport] = []
    for spec in specs:
        if progress:
            progress(done, total, spec.key)
        rep = analyze_tensor(
            spec.key,
            get(spec.key),
            groups=spec.groups,
            tau_cos=tau_cos,
            tau_euc=tau_euc,
            top=top,
            device=dev,
        )
        rep.kind = kinds.get(spec.key, rep.kind)
        if spec.group_note:
            rep.notes.append(spec.group_note)
        if spec.key in factored:
            factored[spec.key].annotate(rep)
        reports.append(rep)
        done += spec.info.numel
    if progress:
        progress(total, total, "")
    report = Report(
        checkpoint=name,
        format=fmt,
        wrapper=wrapper,
        settings={
            "tau_cos": tau_cos,
            "tau_euc": tau_euc,
            "top": top,
            "device": str(dev),
            "layers": list(layers),
            "exclude": list(exclude),
            "groups": dict(groups or {}),
        },
        layers=reports,
        summary=_summarize(reports, len(infos)),
    )
    report.gates = evaluate_gates(gates, reports)
    return report


def _summarize(layers: list[LayerReport], tensors: int) -> Summary:
    def total(metric: str) -> float:
        return float(sum(getattr(r, metric) or 0 for r in layers))

    def worst(metric: str, largest: bool = True, n: int = 5) -> list[str]:
        have = [
            r
            for r in layers
            if getattr(r, metric) is not None and math.isfinite(getattr(r, metric))
        ]
        have.sort(key=lambda r: getattr(r, metric), reverse=largest)
        return [r.name for r in have[:n]]

    near = [r for r in layers if (r.near_parallel_rows or 0) + (r.near_parallel_cols or 0) > 0]
    near.sort(key=lambda r: (r.near_parallel_rows or 0) + (r.near_parallel_cols or 0), reverse=True)
    return Summary(
        layers=len(layers),
        params=sum(r.params for r in layers),
        tensors=tensors,
        skipped_tensors=tensors - len(layers),
        acv_sum=total("acv_sum"),
        conv_similarity=total("conv_similarity")
        if any(r.conv_similarity is not None for r in layers)
        else None,
        norm_loss=total("norm_loss"),
        near_parallel_rows=int(total("near_parallel_rows")),
        near_parallel_cols=int(total("near_parallel_cols")),
        dead_rows=int(total("dead_rows")),
        nonfinite_layers=sum(1 for r in layers if r.nonfinite),
        worst={
            "acv_mean": worst("acv_mean"),
            "conv_similarity_norm": worst("conv_similarity_norm"),
            "near_parallel": [r.name for r in near[:5]],
            "rare_rows": worst("rare_rows", largest=False),
            "norm_dev_max": worst("norm_dev_max"),
        },
    )


def _opt(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
