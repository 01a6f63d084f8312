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

    from wcond.analyze import Report

__all__ = ["report_frame", "require_pandas", "write_parquet"]

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
    from wcond.analyze import NUMERIC_FIELDS

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


def write_parquet(report: Report, path: str | Path) -> None:
    """Write :func:`report_frame` to a Parquet file, atomically (needs pyarrow)."""
    frame = report_frame(report)
    try:
        import pyarrow  # noqa: F401  (pandas' Parquet engine; checked here for a clear message)
    except ImportError as e:
        raise UsageError(
            f"{path}: writing Parquet needs pyarrow, which is not installed: pip install 'wcond[parquet]'"
        ) from e
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, engine="pyarrow")
