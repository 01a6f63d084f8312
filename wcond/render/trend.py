"""Rendering a TrendReport: a compact terminal table (worst movers first), CSV and Markdown (JSON: render.json)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from wcond.explain import what_next_trend
from wcond.render.report import legend_parts, markdown_legend
from wcond.render.text import (
    Keep,
    fmt_number,
    print_hidden,
    print_layer_table,
    print_prose,
    violation_parts,
)
from wcond.report import NUMERIC_FIELDS, TREND_METRICS, metric_label, resolve_metrics
from wcond.text import csv_cell, md_cell, md_code, one_line

if TYPE_CHECKING:
    from wcond.trend import TrendReport

__all__ = ["render_trend_table", "sparkline", "trend_csv", "trend_markdown"]

_BARS = "▁▂▃▄▅▆▇█"
_SPARK_MAX = 24
_FLAT = 1e-4  # relative spread under which a row of values counts as constant


def sparkline(values: Sequence[float | None], width: int = _SPARK_MAX) -> str:
    """One bar per value scaled between their min and max (a space for a missing value)."""
    if len(values) > width:  # evenly spaced, first and last kept
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    have = [v for v in values if v is not None and math.isfinite(v)]
    if not have:
        return " " * len(values)
    lo, hi = min(have), max(have)
    # A spread at float32 noise level is drawn flat, not stretched into full-height bars.
    flat = hi - lo <= _FLAT * max(abs(lo), abs(hi))
    out = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(" ")
        elif flat:
            out.append(_BARS[0])
        else:
            out.append(_BARS[round((v - lo) / (hi - lo) * (len(_BARS) - 1))])
    return "".join(out)


def _first_last(values: Sequence[float | None]) -> str:
    have = [v for v in values if v is not None]
    if not have:
        return "-"
    return f"{fmt_number(have[0], 3)}→{fmt_number(have[-1], 3)}"


def _label(report_path: str) -> str:
    return one_line(Path(report_path).name or report_path)


def _ordered_layers(t: TrendReport, metrics: Sequence[str]) -> list[str]:
    """Layers by how much they moved, most first (stored order among equals)."""
    names = list(t.trend)
    return sorted(names, key=lambda n: -t.movement(n, metrics))


# The columns that give way on a narrow console, least important first.
_CK_DROP_ORDER = ("layers", "step", "∥r/c", "acv_sum", "norm_loss")


def render_trend_table(
    t: TrendReport, console: Console, metrics: Sequence[str] = TREND_METRICS
) -> None:
    """Per checkpoint one summary line, then per layer each metric first→last with a sparkline.

    ``metrics``: names or table labels (:func:`wcond.report.resolve_metric`).
    """
    metrics = resolve_metrics(metrics)
    steps = [s for s in t.steps if s is not None]
    span = f", {t.x_label} {t.x[0]} → {t.x[-1]}" if t.x_label == "step" and steps else ""
    columns: dict[str, list[Text]] = {
        h: [] for h in ("step", "layers", "acv_sum", "cs", "norm_loss", "∥r/c", "gates")
    }
    for r, step in zip(t.reports, t.steps):
        s = r.summary
        columns["step"].append(Text("-" if step is None else str(step)))
        columns["layers"].append(Text(str(s.layers)))
        columns["acv_sum"].append(Text(fmt_number(s.acv_sum)))
        columns["cs"].append(Text(fmt_number(s.conv_similarity)))
        columns["norm_loss"].append(Text(fmt_number(s.norm_loss)))
        columns["∥r/c"].append(Text(f"{s.near_parallel_rows}/{s.near_parallel_cols}"))
        columns["gates"].append(
            Text("FAIL", style="bold red")
            if r.failed
            else Text("PASS", style="green")
            if r.gates
            else Text("-")
        )
    hidden = print_layer_table(
        console,
        [f"wcond inspect: {len(t.reports)} checkpoints{span}"],
        [_label(r.checkpoint) for r in t.reports],
        columns,
        _CK_DROP_ORDER,
        name_header="checkpoint",
    )
    print_hidden(console, hidden)

    order = _ordered_layers(t, metrics)
    cells = {
        metric_label(m): [
            Text(_first_last(t.trend[n][m]) + " ").append(sparkline(t.trend[n][m]), style="cyan")
            for n in order
        ]
        for m in metrics
    }
    # The least important metric (the last) gives way first; the first always stays.
    drop = [metric_label(m) for m in reversed(metrics[1:])]
    hidden_labels = print_layer_table(console, None, order, cells, drop)
    shown = [m for m in metrics if metric_label(m) not in hidden_labels]
    print_prose(
        console,
        "first→last checkpoint, then one bar per checkpoint (min to max of the row); layers "
        "that moved most first.",
        "  ",
        *legend_parts([metric_label(m) for m in shown]),
        style="dim",
    )
    print_hidden(console, [m for m in metrics if m not in shown])
    for r in t.reports:
        for g in r.gates:
            if not g.passed:
                print_prose(
                    console,
                    Text("FAIL", style="bold red"),
                    " ",
                    Keep(_label(r.checkpoint) + ":"),
                    " ",
                    *violation_parts(g),
                )
    gated = [r for r in t.reports if r.gates]
    hint = what_next_trend(t.reports, t.trend, console.width)
    if gated:
        failed = sum(1 for r in gated if r.failed)
        console.print(
            Text(
                f"gates: {len(gated) - failed} of {len(gated)} checkpoints pass",
                style="bold red" if failed else "green",
            )
        )
    if hint:
        print_prose(console, hint, style="dim")


def trend_csv(t: TrendReport) -> str:
    """Long format, one row per (checkpoint, layer, metric): easy to pivot in pandas or a sheet."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["checkpoint", "step", "layer", "metric", "value"])
    for k, (r, step) in enumerate(zip(t.reports, t.steps)):
        for layer, per_metric in t.trend.items():
            for m in NUMERIC_FIELDS:
                v = per_metric[m][k]
                if v is not None:
                    row = [r.checkpoint, "" if step is None else step, layer, m, v]
                    writer.writerow([csv_cell(c) for c in row])
    return buf.getvalue()


def trend_markdown(t: TrendReport, metrics: Sequence[str] = TREND_METRICS) -> str:
    """Markdown for a CI summary: one line per checkpoint, then each layer's metrics first→last."""
    metrics = resolve_metrics(metrics)

    def code(s: str) -> str:
        return md_cell(md_code(s))

    out = [f"## wcond inspect: {len(t.reports)} checkpoints", ""]
    out += ["| checkpoint | step | layers | acv_sum | conv_similarity | norm_loss | gates |"]
    out += ["|---|---:|---:|---:|---:|---:|---|"]
    for r, step in zip(t.reports, t.steps):
        s = r.summary
        verdict = "❌" if r.failed else ("✅" if r.gates else "")
        out.append(
            f"| {code(r.checkpoint)} | {'' if step is None else step} | {s.layers} | "
            f"{fmt_number(s.acv_sum)} | {fmt_number(s.conv_similarity)} | {fmt_number(s.norm_loss)} | {verdict} |"
        )
    out += ["", "| layer | " + " | ".join(metrics) + " |"]
    out += ["|---|" + "---:|" * len(metrics)]
    for name in _ordered_layers(t, metrics):
        cells = [_first_last(t.trend[name][m]) for m in metrics]
        out.append(f"| {code(name)} | " + " | ".join(cells) + " |")
    out += ["", markdown_legend([metric_label(m) for m in metrics])]
    return "\n".join(out) + "\n"
