"""Two checkpoints side by side: every metric of :func:`wcond.inspect` for both, layers matched by key.

Nothing here computes a metric: both sides go through :func:`wcond.analyze.inspect` (which also
reads shrunk, factorized checkpoints), and this module only pairs and subtracts.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from wcond.analyze import inspect_many
from wcond.checkpoint.base import Checkpoint
from wcond.report import NUMERIC_FIELDS, Report, finite

__all__ = [
    "ROUNDING_ULPS",
    "SUMMARY_FIELDS",
    "DiffReport",
    "LayerDiff",
    "MetricDiff",
    "diff",
    "diff_reports",
    "rounding_resolution",
]

Source = str | Path | Checkpoint | Mapping[str, torch.Tensor] | torch.nn.Module

# Totals of wcond.analyze.Summary compared in the diff's summary.
SUMMARY_FIELDS = (
    "layers",
    "params",
    "acv_sum",
    "conv_similarity",
    "norm_loss",
    "near_parallel_rows",
    "near_parallel_cols",
    "dead_rows",
)


# A metric is computed in float32 (float64 for float64 weights), so two values within a few units
# in the last place of each other differ by rounding alone: scaling a layer by 1.5 moves its
# scale-free acv_mean by 1-3 float32 ulps. Such a difference is reported as no change.
ROUNDING_ULPS = 8


def rounding_resolution(*dtypes: str) -> float:
    """Relative size of ROUNDING_ULPS units in the last place of the dtype the metrics were computed in."""
    wide = bool(dtypes) and all(d == "float64" for d in dtypes)
    return ROUNDING_ULPS * (2.0**-52 if wide else 2.0**-23)


@dataclass
class MetricDiff:
    """One metric on both sides. ``delta`` is b - a; ``relative`` is delta / |a| (None where undefined).

    Counts are compared exactly; for real values, a change within ``resolution`` (relative to the
    larger of |a| and |b|) is rounding and becomes a delta of exactly 0.
    """

    a: float | int | None
    b: float | int | None
    delta: float | int | None
    relative: float | None

    @classmethod
    def of(
        cls, a: float | int | None, b: float | int | None, resolution: float = 0.0
    ) -> MetricDiff:
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            return cls(a, b, None, None)
        delta = b - a
        if isinstance(delta, float) and abs(delta) <= resolution * max(abs(a), abs(b)):
            delta = 0.0
        if a != 0:
            relative: float | None = delta / abs(a)
        else:
            relative = 0.0 if delta == 0 else None  # growth from exactly 0 has no relative size
        return cls(a, b, delta, relative)

    @property
    def changed(self) -> bool:
        return self.a != self.b


@dataclass
class LayerDiff:
    """A layer present in both checkpoints: its shapes and each metric of NUMERIC_FIELDS on both sides."""

    name: str
    kind: str
    shape_a: list[int]
    shape_b: list[int]
    metrics: dict[str, MetricDiff]
    notes_a: list[str] = field(default_factory=list)
    notes_b: list[str] = field(default_factory=list)

    @property
    def shape_changed(self) -> bool:
        return self.shape_a != self.shape_b


@dataclass
class DiffReport:
    """What `wcond diff` reports: matched layers in A's order, layers on one side only, summary totals."""

    a: str
    b: str
    settings: dict[str, Any]
    layers: list[LayerDiff]
    only_a: list[str]
    only_b: list[str]
    summary: dict[str, MetricDiff]
    report_a: Report = field(repr=False)
    report_b: Report = field(repr=False)

    @property
    def shape_changes(self) -> list[LayerDiff]:
        return [d for d in self.layers if d.shape_changed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each layer carries, under each metric's name, {"a", "b", "delta", "relative"}."""
        layers = []
        for d in self.layers:
            entry: dict[str, Any] = {
                "name": d.name,
                "kind": d.kind,
                "shape_a": d.shape_a,
                "shape_b": d.shape_b,
                "shape_changed": d.shape_changed,
            }
            entry.update({m: asdict(v) for m, v in d.metrics.items()})
            entry["notes_a"], entry["notes_b"] = d.notes_a, d.notes_b
            layers.append(entry)
        return finite(
            {
                "a": self.a,
                "b": self.b,
                "settings": self.settings,
                "summary": {m: asdict(v) for m, v in self.summary.items()},
                "layers": layers,
                "only_a": self.only_a,
                "only_b": self.only_b,
            }
        )


def diff_reports(ra: Report, rb: Report) -> DiffReport:
    """Pair two inspect reports by layer key (A's order) and take every metric's change."""
    by_name_b = {r.name: r for r in rb.layers}
    names_a = {r.name for r in ra.layers}
    layers = []
    for la in ra.layers:
        lb = by_name_b.get(la.name)
        if lb is None:
            continue
        res = rounding_resolution(la.dtype, lb.dtype)
        metrics = {m: MetricDiff.of(getattr(la, m), getattr(lb, m), res) for m in NUMERIC_FIELDS}
        layers.append(
            LayerDiff(la.name, lb.kind, la.shape, lb.shape, metrics, list(la.notes), list(lb.notes))
        )
    res = rounding_resolution(*(r.dtype for r in ra.layers + rb.layers))
    summary = {
        f: MetricDiff.of(getattr(ra.summary, f), getattr(rb.summary, f), res)
        for f in SUMMARY_FIELDS
    }
    return DiffReport(
        a=ra.checkpoint,
        b=rb.checkpoint,
        settings=dict(ra.settings),
        layers=layers,
        only_a=[r.name for r in ra.layers if r.name not in by_name_b],
        only_b=[r.name for r in rb.layers if r.name not in names_a],
        summary=summary,
        report_a=ra,
        report_b=rb,
    )


def diff(a: Source, b: Source, **inspect_kwargs: Any) -> DiffReport:
    """Inspect both checkpoints with the same settings and compare them layer by layer.

    Args:
        a, b: checkpoint paths, opened Checkpoints, state dicts or modules (anything
            :func:`wcond.inspect` reads).
        inspect_kwargs: passed to :func:`wcond.inspect` for both (layers, exclude, groups, tau_cos,
            ..., engine: on a Ray engine both sides' layers are submitted together).

    Example:
        >>> d = wcond.diff.diff("before.pt", "after.safetensors")
        >>> {l.name: l.metrics["acv_mean"].delta for l in d.layers}
    """
    if _same_source(a, b):
        # The same file (or object) on both sides is analyzed once: its diff is exactly zero on
        # every device, whatever the device's summation order.
        (ra,) = inspect_many([a], **inspect_kwargs)
        return diff_reports(ra, copy.deepcopy(ra))
    ra, rb = inspect_many([a, b], **inspect_kwargs)
    return diff_reports(ra, rb)


def _same_source(a: Source, b: Source) -> bool:
    if a is b:
        return True
    if isinstance(a, (str, Path)) and isinstance(b, (str, Path)):
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False
    return False
