"""What `wcond inspect` reports: plain dataclasses, one number per field, no torch.

:mod:`wcond.analyze` fills them in; the renderers, gates and diffs read them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from wcond.errors import UsageError
from wcond.gates import GateResult

if TYPE_CHECKING:
    from wcond.metrics import Pair

__all__ = [
    "METRIC_ALIASES",
    "NUMERIC_FIELDS",
    "TREND_METRICS",
    "LayerReport",
    "Report",
    "Summary",
    "finite",
    "resolve_metric",
    "resolve_metrics",
]

# Keys of LayerReport that hold one number each: the ones gates and diffs can name.
# Columns describing a layer in a DataFrame, before its metrics.
LAYER_COLUMNS = ("kind", "shape", "dtype", "groups")
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
# Metrics the trend table shows by default (JSON and CSV carry every NUMERIC_FIELDS entry).
TREND_METRICS = ("acv_mean", "conv_similarity_norm", "norm_dev_max", "rare_rows")
# The terminal table's short column labels, accepted wherever a metric is named (gates, the
# monitor, trend metrics; through resolve_metric): each stands for exactly one of NUMERIC_FIELDS,
# the name every report shows (JSON keys, CSV/Markdown/HTML headers, pandas columns).
METRIC_ALIASES = {
    "acv": "acv_mean",
    "cs": "conv_similarity",
    "cs_n": "conv_similarity_norm",
    "normdev": "norm_dev_max",
    "rare_r": "rare_rows",
    "rare_c": "rare_cols",
    "dead": "dead_rows",
}
# Each aliased metric's label, the other way round.
METRIC_LABELS = {field: alias for alias, field in METRIC_ALIASES.items()}
# Table columns that show two metrics at once (a ratio, a pair of counts): label -> what they are.
# Not metrics, so not accepted by gates; the legends spell them out.
DERIVED_LABELS = {
    "acv/fl": "acv_sum / acv_floor",
    "cs/fl": "conv_similarity / conv_similarity_floor",
    "∥r/c": "near_parallel_rows / near_parallel_cols",
}


def resolve_metric(name: str) -> str:
    """The canonical metric name (one of NUMERIC_FIELDS) for a name or a table label.

    The one place where what a user types becomes a metric: gates, the monitor's ``metrics=``
    and the trend's metrics all go through it.

    Raises:
        UsageError: naming the metrics and labels there are, and the closest one.

    Example:
        >>> resolve_metric("cs_n"), resolve_metric("rare_rows")
        ('conv_similarity_norm', 'rare_rows')
    """
    if name in NUMERIC_FIELDS:
        return name
    if name in METRIC_ALIASES:
        return METRIC_ALIASES[name]
    close = difflib.get_close_matches(name, [*NUMERIC_FIELDS, *METRIC_ALIASES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(
        f"unknown metric {name!r}{hint}; one of: {', '.join(NUMERIC_FIELDS)} "
        f"(or the table's labels {', '.join(METRIC_ALIASES)})"
    )


def resolve_metrics(names: str | Sequence[str]) -> tuple[str, ...]:
    """:func:`resolve_metric` of each name (a single string is one name), in order, repeats dropped."""
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(dict.fromkeys(resolve_metric(n) for n in names))


def metric_label(name: str) -> str:
    """The terminal table's label of a metric, or its name where it has none."""
    return METRIC_LABELS.get(name, name)


@dataclass(frozen=True)
class MetricGuide:
    """How to read one metric: the legends, ``wcond inspect --explain`` and docs/NUMBERS.md say this."""

    meaning: str  # what it measures, a few words (the legends' text)
    worse: str  # which direction means redundancy or trouble
    measured: str  # per-layer values measured on trained networks (docs/NUMBERS.md has the runs)
    next: str  # what to do when it stands out


# measured: per-layer min to max over 3 seeds of the digits networks that
# benchmarks/metric_ranges.py trains (docs/NUMBERS.md has the command, the table, the untrained
# values and the other networks).
_SHRINK = "wcond shrink CKPT --dry-run, then -o OUT to fuse the pairs (rows/cols)"
_RARE = "train with wcond.metrics.rare(model) as a loss, or wcond.rare.DynamicFusion"
METRIC_GUIDE: dict[str, MetricGuide] = {
    "acv_sum": MetricGuide(
        "sum of |cos| of row pairs",
        "higher; compare it with acv_floor, since it grows with rows^2",
        "2.0 to 546 (digits CNN), 9.6 to 526 (digits MLP)",
        "read acv_mean instead, which compares across layers",
    ),
    "acv_mean": MetricGuide(
        "mean |cos| of row pairs",
        "higher: the rows point the same ways",
        "0.032 to 0.27 (digits CNN), 0.16 to 0.26 (digits MLP)",
        "add wcond.metrics.acv(model) to the training loss (the ACV paper)",
    ),
    "acv_floor": MetricGuide(
        "lowest acv_sum possible at this shape",
        "neither; above 0 when rows outnumber their length",
        "0 to 196 (digits CNN), 0 (digits MLP)",
        "nothing: a property of the shape, not of training",
    ),
    "conv_similarity": MetricGuide(
        "filters' cross-correlation overlap (CS)",
        "higher; it grows with filter norms^4, so compare conv_similarity_norm",
        "216 to 232 (digits CNN)",
        "wcond init-cs CKPT -o OUT --keep-norm before training, or "
        "wcond.metrics.conv_similarity(model) as a loss (the CS paper)",
    ),
    "conv_similarity_norm": MetricGuide(
        "CS / white filters' CS",
        "higher",
        "0.999 to 1.01 (digits CNN)",
        "wcond init-cs CKPT -o OUT --keep-norm (directions only); rising in training: "
        "wcond.metrics.conv_similarity(model) as a loss",
    ),
    "conv_similarity_floor": MetricGuide(
        "lowest CS at these filter norms",
        "neither; the part of CS that init-cs cannot remove without changing norms",
        "126 to 139 (digits CNN)",
        "nothing; init-cs reports the gap to it",
    ),
    "norm_loss": MetricGuide(
        "sum of (1-|row|)² over rows",
        "higher: rows far from unit norm",
        "0.71 to 12.7 (digits CNN), 0.29 to 3.4 (digits MLP)",
        "add wcond.metrics.norm_loss(model) to the loss (the Norm Loss paper)",
    ),
    "norm_dev_max": MetricGuide(
        "max |1-|row|| over rows",
        "higher",
        "0.29 to 0.78 (digits CNN), 0.22 to 0.49 (digits MLP)",
        "wcond.metrics.norm_loss(model) as a loss; alone it is no sign of redundancy",
    ),
    "rare_rows": MetricGuide(
        "min 1-cos² of row pairs",
        "lower: some rows are (nearly) parallel",
        "0.072 to 0.98 (digits CNN), 0.35 to 0.82 (digits MLP)",
        f"near 0: {_SHRINK}; to prevent: {_RARE}",
    ),
    "rare_cols": MetricGuide(
        "min 1-cos² of col pairs",
        "lower: some inputs are read (nearly) the same way",
        "0.049 to 0.98 (digits CNN), 0.067 to 0.60 (digits MLP)",
        f"near 0: {_SHRINK}",
    ),
    "near_parallel_rows": MetricGuide(
        "fusable row pairs",
        "any above 0",
        "0 (digits CNN and MLP); 0 to 1 with the RaRe loss",
        _SHRINK,
    ),
    "near_parallel_cols": MetricGuide(
        "fusable col pairs",
        "any above 0",
        "0 (digits CNN and MLP); 0 to 2 with the RaRe loss",
        _SHRINK,
    ),
    "dead_rows": MetricGuide(
        "all-zero rows",
        "any above 0: units that output only their bias",
        "0 (every network measured)",
        "check pruning or the init; such a unit can be removed",
    ),
    "dead_cols": MetricGuide(
        "all-zero columns",
        "any above 0: inputs the layer ignores",
        "0 (every network measured)",
        "check the layer before (a dead unit there?)",
    ),
    "nonfinite": MetricGuide(
        "NaN/Inf entries",
        "any above 0: the checkpoint is broken",
        "0 (every network measured)",
        "find the step that diverged; gate with --fail-if 'nonfinite>0'",
    ),
    "params": MetricGuide(
        "parameters in the layer",
        "neither",
        "576 to 36,864 (digits CNN), 640 to 4,096 (digits MLP)",
        "nothing",
    ),
}


def legend(labels: Sequence[str]) -> list[tuple[str, str, str]]:
    """(label, name, meaning) for table headers: a metric's label or name, or a DERIVED_LABELS key.

    A header that is a metric's own name has that name as its label; a derived column's name
    is what it divides or pairs, and its meaning is left empty (the name says it).
    """
    out = []
    for label in labels:
        if label in DERIVED_LABELS:
            out.append((label, DERIVED_LABELS[label], ""))
        else:
            name = resolve_metric(label)
            out.append((label, name, METRIC_GUIDE[name].meaning))
    return out


# The metrics that count things (integers), as opposed to measuring them.
COUNT_FIELDS = frozenset(
    ("near_parallel_rows", "near_parallel_cols", "dead_rows", "dead_cols", "nonfinite", "params")
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
    closest_rows: list[Pair] = field(default_factory=list)
    closest_cols: list[Pair] = field(default_factory=list)
    factorized: dict[str, int] | None = (
        None  # stored by `wcond shrink`: {"params_stored", "params_dense"}
    )
    notes: list[str] = field(default_factory=list)

    def value(self, metric: str) -> float | None:
        v = getattr(self, metric)
        return None if v is None else float(v)

    def numbers(self) -> dict[str, float | None]:
        """Every metric of NUMERIC_FIELDS by name: what gates and diffs compare."""
        return {m: self.value(m) for m in NUMERIC_FIELDS}


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
    # Tensors that look like weights but are not analyzed, by key: why (sparse, meta, zero-size, ...).
    skipped: dict[str, str] = field(default_factory=dict)


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
        return finite(asdict(self))

    def to_pandas(self) -> Any:
        """A pandas DataFrame: one row per layer (index: tensor key), one column per metric, None as NaN.

        Needs pandas (``pip install 'wcond[pandas]'``), imported only here.

        Example:
            >>> wcond.inspect("model.pt").to_pandas().sort_values("acv_mean").tail(3)
        """
        from wcond.frames import require_pandas

        # Metric columns are float64 (counts too, so that a layer where a count does not apply
        # holds NaN rather than turning the column into objects); shape reads "64x3x7x7".
        pd = require_pandas()
        nan = float("nan")
        rows = []
        for r in self.layers:
            row: dict[str, Any] = {
                "kind": r.kind,
                "shape": "x".join(map(str, r.shape)),
                "dtype": r.dtype,
                "groups": r.groups,
            }
            for m in NUMERIC_FIELDS:
                v = getattr(r, m)
                row[m] = nan if v is None else float(v)
            row["notes"] = "; ".join(r.notes)
            rows.append(row)
        columns = [*LAYER_COLUMNS, *NUMERIC_FIELDS, "notes"]
        index = pd.Index([r.name for r in self.layers], name="layer")
        frame = pd.DataFrame(rows, index=index, columns=columns)
        return frame.astype({m: "float64" for m in NUMERIC_FIELDS} | {"groups": "int64"})


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or Inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
