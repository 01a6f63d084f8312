"""pandas and Parquet, optional: imported when a frame is asked for, with an install line if missing.

The frames themselves are built by ``Report.to_pandas`` and ``TrendReport.to_pandas``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from wcond.errors import UsageError
from wcond.output import atomic_path

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["require_pandas", "require_parquet", "write_parquet"]


def require_pandas() -> Any:
    """The pandas module, or a UsageError with the install line."""
    try:
        import pandas
    except ImportError as e:
        raise UsageError(
            "a DataFrame needs pandas, which is not installed: pip install 'wcond[pandas]'"
        ) from e
    return pandas


def require_parquet(path: str | Path) -> None:
    """pandas and pyarrow are installed, or a UsageError with the install line."""
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401  (pandas' Parquet engine)
    except ImportError as e:
        raise UsageError(
            f"{path}: writing Parquet needs pandas and pyarrow ({e.name} is not installed): "
            "pip install 'wcond[parquet]'"
        ) from e


def write_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a frame (``Report.to_pandas()``, ``TrendReport.to_pandas()``) to a Parquet file, atomically."""
    require_parquet(path)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, engine="pyarrow")
