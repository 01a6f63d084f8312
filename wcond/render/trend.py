"""Rendering a TrendReport: a compact terminal table (worst movers first), CSV and Markdown (JSON: render.json)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from wcond.explain import what_next_trend
from wcond.render.report import legend_line, markdown_legend
from wcond.render.text import fmt_number
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


def render_trend_table(
    t: TrendReport, console: Console, metrics: Sequence[str] = TREND_METRICS
) -> None:
    """Per checkpoint one summary line, then per layer each metric first→last with a sparkline.

    ``metrics``: names or table labels (:func:`wcond.report.resolve_metric`).
    """
    metrics = resolve_metrics(metrics)
    steps = [s for s in t.steps if s is not None]
    span = f", {t.x_label} {t.x[0]} → {t.x[-1]}" if t.x_label == "step" and steps else ""
    ck_table = Table(
        title=f"wcond inspect: {len(t.reports)} checkpoints{span}",
        title_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        padding=(0, 0, 0, 1),
        pad_edge=False,
    )
    for h in ("checkpoint", "step", "layers", "acv_sum", "cs", "norm_loss", "∥r/c", "gates"):
        ck_table.add_column(h, justify="left" if h == "checkpoint" else "right", overflow="fold")
    for r, step in zip(t.reports, t.steps):
        s = r.summary
        verdict = (
            Text("FAIL", style="bold red")
            if r.failed
            else Text("PASS", style="green")
            if r.gates
            else Text("-")
        )
        ck_table.add_row(
            Text(_label(r.checkpoint)),
            Text("-" if step is None else str(step)),
            Text(str(s.layers)),
            Text(fmt_number(s.acv_sum)),
            Text(fmt_number(s.conv_similarity)),
            Text(fmt_number(s.norm_loss)),
            Text(f"{s.near_parallel_rows}/{s.near_parallel_cols}"),
            verdict,
        )
    console.print(ck_table)

    order = _ordered_layers(t, metrics)
    cells = {
        m: [
            Text(_first_last(t.trend[n][m]) + " ").append(sparkline(t.trend[n][m]), style="cyan")
            for n in order
        ]
        for m in metrics
    }
    widths = {m: max([len(metric_label(m))] + [c.cell_len for c in cells[m]]) + 1 for m in metrics}
    name_width = min(28, max([5] + [len(one_line(n)) for n in order])) + 1
    shown = list(metrics)
    while len(shown) > 1 and name_width + sum(widths[m] for m in shown) + 1 > console.width:
        shown.pop()  # the least important metric gives way on a narrow terminal
    layer_table = Table(
        header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False
    )
    layer_table.add_column("layer", overflow="fold", min_width=12, max_width=28)
    for m in shown:
        layer_table.add_column(metric_label(m), justify="right", no_wrap=True)
    for i, name in enumerate(order):
        layer_table.add_row(Text(one_line(name)), *(cells[m][i] for m in shown))
    console.print(layer_table)
    legend = legend_line([metric_label(m) for m in shown])
    hidden = [m for m in metrics if m not in shown]
    console.print(
        Text(
            "first→last checkpoint, then one bar per checkpoint (min to max of the row); layers "
            f"that moved most first.  {legend}"
            + (f"  hidden at this width: {', '.join(hidden)} (-f json has all)" if hidden else ""),
            style="dim",
        ),
        soft_wrap=True,
    )
    for r in t.reports:
        for g in r.gates:
            if g.passed:
                continue
            names = ", ".join(
                f"{one_line(v.layer)} ({fmt_number(v.value)})" for v in g.violations[:10]
            )
            more = f" and {len(g.violations) - 10} more" if len(g.violations) > 10 else ""
            line = Text("FAIL ", style="bold red")
            line.append(f"{_label(r.checkpoint)}: {one_line(g.expr)}: {names}{more}")
            console.print(line, soft_wrap=True)
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
        console.print(Text(hint, style="dim"))


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
