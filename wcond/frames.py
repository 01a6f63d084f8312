"""Reports as pandas DataFrames (and Parquet files): one row per layer, one column per metric.

pandas is optional: it is imported when a frame is asked for, with an install line if missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from wcond.errors import UsageError
from wcond.save import atomic_path

if TYPE_CHECKING:
    import pandas as pd

    from wcond.report import Report
    from wcond.trend import TrendReport

__all__ = ["report_frame", "require_pandas", "require_parquet", "trend_frame", "write_parquet"]

# Columns describing a layer, before its metrics.
LAYER_COLUMNS = ("kind", "shape", "dtype", "groups")


def require_pandas() -> Any:
    """The pandas module, or a UsageError with the install line."""
    try:
        import pandas
    except ImportError as e:
        raise UsageError(
            "a DataFrame needs pandas, which is not installed: pip install 'wcond[pandas]'"
        ) from e
    return pandas


def report_frame(report: Report) -> pd.DataFrame:
    """One row per layer (index: the tensor key), one column per metric; ``None`` becomes NaN.

    Metric columns are float64 (counts too, so that a layer where a count does not apply holds
    NaN rather than turning the column into objects); ``shape`` is a string such as "64x3x7x7".
    """
    from wcond.report import NUMERIC_FIELDS

    pd = require_pandas()
    nan = float("nan")
    rows = []
    for r in report.layers:
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
    index = pd.Index([r.name for r in report.layers], name="layer")
    frame = pd.DataFrame(rows, index=index, columns=columns)
    return frame.astype({m: "float64" for m in NUMERIC_FIELDS} | {"groups": "int64"})


def trend_frame(trend: TrendReport) -> pd.DataFrame:
    """A trend in long form: (checkpoint, step, x, path, layer, metric, value) rows, None as NaN."""
    pd = require_pandas()
    nan = float("nan")
    rows = []
    for i, (report, step, x) in enumerate(zip(trend.reports, trend.steps, trend.x)):
        for layer, by_metric in trend.trend.items():
            for metric, values in by_metric.items():
                v = values[i]
                rows.append(
                    (
                        i,
                        nan if step is None else step,
                        x,
                        report.checkpoint,
                        layer,
                        metric,
                        nan if v is None else float(v),
                    )
                )
    columns = ["checkpoint", "step", "x", "path", "layer", "metric", "value"]
    return pd.DataFrame(rows, columns=columns).astype({"value": "float64", "step": "float64"})


def require_parquet(path: str | Path) -> None:
    """pandas and pyarrow are installed, or a UsageError with the install line."""
    require_pandas()
    try:
        import pyarrow  # noqa: F401  (pandas' Parquet engine)
    except ImportError as e:
        raise UsageError(
            f"{path}: writing Parquet needs pyarrow, which is not installed: pip install 'wcond[parquet]'"
        ) from e


def write_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a frame of :func:`report_frame` or :func:`trend_frame` to a Parquet file, atomically."""
    require_parquet(path)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, engine="pyarrow")
