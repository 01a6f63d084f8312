"""A training run's checkpoints over time: one inspect report each, and every metric's trend per layer.

Each checkpoint goes through :func:`wcond.analyze.inspect_many` (no metric is computed here);
this module orders the checkpoints, finds their step numbers, and lines the numbers up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wcond.analyze import inspect_many
from wcond.checkpoint.bounded_json import read_json
from wcond.checkpoint.open import open_checkpoint
from wcond.checkpoint.source import expand_paths  # re-exported: trend() takes its result
from wcond.defaults import ProgressFn
from wcond.engine import Engine
from wcond.errors import CheckpointError
from wcond.report import (  # re-exported
    NUMERIC_FIELDS,
    TREND_METRICS,
    Report,
    finite,
    resolve_metrics,
)

__all__ = ["TREND_METRICS", "TrendReport", "checkpoint_step", "expand_paths", "trend"]

# Keys under which training code stores its step (Lightning and most loops: global_step).
_STEP_KEYS = ("global_step", "step")
# A Hugging Face trainer_state.json: its log history is a list of flat dicts, a few MB at most.
MAX_STATE_BYTES = 64_000_000
MAX_STATE_DEPTH = 16
# A step number in a file or directory name: step_1000, epoch=3-step=1200, checkpoint-500, iter42.
_STEP_NAME = re.compile(r"(?:step|steps|iter|iteration|checkpoint|ckpt)[=_\-]?(\d+)", re.IGNORECASE)


def checkpoint_step(path: str | Path) -> int | None:
    """The training step a checkpoint was saved at: stored ``global_step``, else a number in its name.

    Looks at a torch file's top-level ``global_step``/``step``, safetensors metadata, a Hugging Face
    ``trainer_state.json`` beside the weights, then names like ``step_1000``, ``epoch=3-step=1200``
    or ``checkpoint-500``. None when there is none.
    """
    p = Path(path)
    stored = _stored_step(p)
    if stored is not None:
        return stored
    for name in (p.stem if p.is_file() else p.name, p.parent.name):
        found = _STEP_NAME.findall(name)
        if found:
            return int(found[-1])
        if name.isdigit():
            return int(name)
    return None


def _stored_step(p: Path) -> int | None:
    state = (p if p.is_dir() else p.parent) / "trainer_state.json"
    if state.is_file():
        try:
            doc = read_json(state, max_bytes=MAX_STATE_BYTES, max_depth=MAX_STATE_DEPTH)
        except (OSError, ValueError):  # unreadable, too large, too deep or not JSON: not a step
            doc = None
        step = doc.get("global_step") if isinstance(doc, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    try:
        ck = open_checkpoint(p)
    except CheckpointError:
        return None
    for key in _STEP_KEYS:
        value: Any = ck.obj.get(key) if isinstance(ck.obj, dict) else ck.metadata.get(key)
        if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
            value = value.item()  # a 0-d tensor
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


@dataclass
class TrendReport:
    """Several checkpoints' reports in order, and each layer's metrics across them."""

    reports: list[Report]
    steps: list[int | None]
    # layer -> metric -> one value per checkpoint (None: not in that checkpoint, or not applicable)
    trend: dict[str, dict[str, list[float | None]]]

    @property
    def failed(self) -> bool:
        """True when a gate tripped on any checkpoint."""
        return any(r.failed for r in self.reports)

    @property
    def x(self) -> list[int]:
        """The x axis: step numbers when every checkpoint has a distinct one, else positions 0..n-1."""
        steps = [s for s in self.steps if s is not None]
        if len(steps) == len(self.steps) and len(set(steps)) == len(steps):
            return steps
        return list(range(len(self.reports)))

    @property
    def x_label(self) -> str:
        return "step" if self.x == self.steps else "checkpoint"

    def movement(self, layer: str, metrics: Sequence[str] = TREND_METRICS) -> float:
        """How far a layer moved: the largest change between first and last value, relative to the first."""
        best = 0.0
        for m in resolve_metrics(metrics):
            values = [v for v in self.trend[layer].get(m, []) if v is not None and math.isfinite(v)]
            if len(values) >= 2:
                first, last = values[0], values[-1]
                scale = max(abs(first), abs(last), 1e-12)
                best = max(best, abs(last - first) / scale)
        return best

    def to_pandas(self) -> Any:
        """The trend in long form: one row per checkpoint, layer and metric, None as NaN.

        Columns: checkpoint (its position), step (None -> NaN), x (the plot axis), path, layer,
        metric, value. Pivot it as needed, e.g. ``df.pivot_table("value", "x", ["layer", "metric"])``.
        Needs pandas (``pip install 'wcond[pandas]'``), imported only here.
        """
        from wcond.frames import require_pandas

        pd = require_pandas()
        nan = float("nan")
        rows = []
        for i, (report, step, x) in enumerate(zip(self.reports, self.steps, self.x)):
            for layer, by_metric in self.trend.items():
                for metric, values in by_metric.items():
                    v = values[i]
                    step_value = nan if step is None else step
                    value = nan if v is None else float(v)
                    rows.append((i, step_value, x, report.checkpoint, layer, metric, value))
        columns = ["checkpoint", "step", "x", "path", "layer", "metric", "value"]
        return pd.DataFrame(rows, columns=columns).astype({"value": "float64", "step": "float64"})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"checkpoints": [report + "step"], "steps", "trend", "failed"}."""
        return finite(
            {
                "checkpoints": [
                    {"step": s, **r.to_dict()} for r, s in zip(self.reports, self.steps)
                ],
                "steps": self.steps,
                "x": self.x,
                "trend": self.trend,
                "failed": self.failed,
            }
        )


def trend(
    sources: Sequence[str | Path],
    *,
    progress: ProgressFn | None = None,
    engine: Engine | None = None,
    **inspect_kwargs: Any,
) -> TrendReport:
    """Inspect several checkpoints (in the order given) and line up every metric per layer.

    Args:
        sources: checkpoint paths, oldest first (:func:`expand_paths` orders a run's files).
        progress, engine: as for :func:`wcond.inspect`.
        inspect_kwargs: the rest of :func:`wcond.inspect`'s settings, the same for every checkpoint
            (layers, exclude, groups, tau_cos, tau_euc, top, device, fail_if).

    Returns:
        A TrendReport: gates are evaluated on every checkpoint; ``failed`` if any tripped.

    Example:
        >>> from wcond.trend import expand_paths, trend
        >>> t = trend(expand_paths(["run/step_*.pt"]), fail_if=["rare_rows<1e-6"])
        >>> t.trend["conv1.weight"]["acv_mean"]  # one value per checkpoint
    """
    reports = inspect_many(list(sources), progress=progress, engine=engine, **inspect_kwargs)
    steps = [checkpoint_step(s) for s in sources]
    names: list[str] = []
    for r in reports:
        names += [layer.name for layer in r.layers]
    by_name = [{layer.name: layer for layer in r.layers} for r in reports]
    table: dict[str, dict[str, list[float | None]]] = {}
    for name in dict.fromkeys(names):
        per_ck = [layers.get(name) for layers in by_name]
        table[name] = {
            m: [None if lr is None else lr.value(m) for lr in per_ck] for m in NUMERIC_FIELDS
        }
    return TrendReport(reports=reports, steps=steps, trend=table)
