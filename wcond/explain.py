"""Reading the numbers: the guide ``wcond inspect --explain`` prints, and the one-line "what next".

The guide's text is :data:`wcond.report.METRIC_GUIDE` (docs/NUMBERS.md says the same, with the
runs behind each range); this module only lays it out and picks what stands out in a report.
"""

from __future__ import annotations

import shlex
import textwrap
from collections.abc import Mapping, Sequence

from wcond.report import METRIC_GUIDE, NUMERIC_FIELDS, Report, metric_label

__all__ = ["CS_NORM_HIGH", "CS_NORM_RISE", "explain_text", "what_next", "what_next_trend"]

# conv_similarity_norm above this stands out: no layer measured for docs/NUMBERS.md went past 1.03
# (digits CNNs at init and trained, ResNet-18 at init, the samples; benchmarks/metric_ranges.py).
CS_NORM_HIGH = 1.1
# A relative rise of conv_similarity_norm over a run above this stands out: 30 epochs of training
# left the digits CNN's layers between 0.999 and 1.01, where they started.
CS_NORM_RISE = 0.1


def explain_text(width: int = 80, metrics: Sequence[str] = NUMERIC_FIELDS) -> str:
    """Per metric: its name and label, what it measures, which way is worse, trained range, next step."""
    out = [
        "wcond's numbers, per layer (the runs behind each range: docs/NUMBERS.md)",
        "",
    ]
    for m in metrics:
        g = METRIC_GUIDE[m]
        label = metric_label(m)
        head = f"{m} ({label})" if label != m else m
        out.append(f"{head}: {g.meaning}")
        for key, text in (("worse", g.worse), ("trained", g.measured), ("next", g.next)):
            out += textwrap.wrap(
                f"{key}: {text}",
                width=max(width, 40),
                initial_indent="  ",
                subsequent_indent="    ",
                break_on_hyphens=False,
                break_long_words=False,
            )
    return "\n".join(out) + "\n"


def _n(count: int, thing: str) -> str:
    return f"{count} {thing}" if count == 1 else f"{count} {thing}s"


def what_next(report: Report, width: int | None = None) -> str | None:
    """One line on the most pressing thing in ``report`` and the command for it; None if nothing stands out.

    With ``width``, a line that the checkpoint's path would push past it names CHECKPOINT instead.

    Example:
        >>> what_next(wcond.inspect("sample_checkpoints/mlp.safetensors"))
        'what next: 1 near-parallel pair to fuse: wcond shrink sample_checkpoints/mlp.safetensors --dry-run'
    """
    s = report.summary
    if s.nonfinite_layers:
        return (
            f"what next: {_n(s.nonfinite_layers, 'layer')} with NaN/Inf: the run diverged; "
            "gate on it with --fail-if 'nonfinite>0'"
        )
    pairs = s.near_parallel_rows + s.near_parallel_cols
    if pairs:
        line = "what next: {} to fuse: wcond shrink {} --dry-run"
        return _fit(line, _n(pairs, "near-parallel pair"), report.checkpoint, width)
    if s.dead_rows:
        return (
            f"what next: {_n(s.dead_rows, 'all-zero row')}: see wcond inspect --explain (dead_rows)"
        )
    high = sum(1 for r in report.layers if (r.conv_similarity_norm or 0.0) > CS_NORM_HIGH)
    if high:
        line = "what next: {} with cs_n > %g: wcond init-cs {} -o OUT --keep-norm" % CS_NORM_HIGH
        return _fit(line, _n(high, "layer"), report.checkpoint, width)
    return None


def _fit(line: str, what: str, checkpoint: str, width: int | None) -> str:
    """``line`` naming the checkpoint's path, or CHECKPOINT where it has none (a state dict,
    a module: "<state_dict>") or would not fit ``width``."""
    text = line.format(what, shlex.quote(checkpoint))
    if checkpoint.startswith("<") or (width is not None and len(text) > width):
        return line.format(what, "CHECKPOINT")
    return text


def what_next_trend(
    reports: Sequence[Report],
    trend: Mapping[str, Mapping[str, Sequence[float | None]]],
    width: int | None = None,
) -> str | None:
    """The same for a run: the last checkpoint's pairs first, then conv_similarity_norm rising."""
    if not reports:
        return None
    last = reports[-1]
    pairs = last.summary.near_parallel_rows + last.summary.near_parallel_cols
    rising = 0
    for by_metric in trend.values():
        values = [v for v in by_metric.get("conv_similarity_norm", []) if v is not None]
        if len(values) >= 2 and values[-1] > values[0] * (1 + CS_NORM_RISE):
            rising += 1
    if rising and not pairs and not last.summary.nonfinite_layers:
        return (
            f"what next: cs_n rose over {CS_NORM_RISE:.0%} in {_n(rising, 'layer')}: "
            "add wcond.metrics.conv_similarity to the loss"
        )
    return what_next(last, width)
