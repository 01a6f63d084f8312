"""Rendering a DiffReport: a rich table for the terminal, Markdown for CI summaries (JSON: render.json)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from wcond.render.text import (
    Keep,
    fit_table,
    fmt_number,
    fmt_shape,
    keep_name,
    listed,
    print_hidden,
    print_prose,
)
from wcond.text import md_cell, md_code, one_line

if TYPE_CHECKING:
    from wcond.diff import DiffReport, LayerDiff, MetricDiff

__all__ = ["diff_to_markdown", "render_diff_table"]

# Which way is better, for coloring the change: -1 lower is better, +1 higher is better, 0 neutral.
# The column that gives way on a narrow console.
_DROP_ORDER = ("rel",)

_BETTER = {
    "rare_rows": 1,
    "rare_cols": 1,
    "acv_floor": 0,
    "conv_similarity_floor": 0,
    "params": 0,
    "layers": 0,
}


def _signed(v: float | int | None) -> str:
    if v is None:
        return "-"
    return ("+" if v > 0 else "") + fmt_number(v)


def _percent(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.1f}%" if v else "0%"


def _cells(m: MetricDiff) -> list[str]:
    return [fmt_number(m.a), fmt_number(m.b), _signed(m.delta), _percent(m.relative)]


def _style(metric: str, m: MetricDiff) -> str:
    if not m.delta:
        return "dim"
    better = _BETTER.get(metric, -1)
    if better == 0:
        return ""
    return "green" if (m.delta > 0) == (better > 0) else "red"


def _shown(d: LayerDiff) -> list[tuple[str, MetricDiff]]:
    """Metrics that apply on at least one side (CS of a matrix applies on neither)."""
    return [(k, m) for k, m in d.metrics.items() if m.a is not None or m.b is not None]


def render_diff_table(d: DiffReport, console: Console) -> None:
    """Summary totals, then per layer every metric: A, B, change, relative change; then one-sided layers."""
    print_prose(
        console,
        Text("wcond diff", style="bold"),
        ": A = ",
        keep_name(d.a),
        "  B = ",
        keep_name(d.b),
    )
    # One first column, layer name then its metrics indented, so that a long key has the width.
    rows: list[tuple[Text, list[str], str | None, bool]] = [
        (Text("totals", style="bold"), [], None, False)
    ]
    for metric, m in d.summary.items():
        rows.append((Text(f"  {metric}"), _cells(m), _style(metric, m) or None, False))
    for layer in d.layers:
        changed = layer.shape_changed
        cells = [fmt_shape(layer.shape_a), fmt_shape(layer.shape_b), "new shape" if changed else ""]
        rows.append(
            (Text(one_line(layer.name), style="bold"), cells, "yellow" if changed else None, True)
        )
        for metric, m in _shown(layer):
            rows.append((Text(f"  {metric}"), _cells(m), _style(metric, m) or None, False))
    headers = ("A", "B", "change", "rel")
    columns = {h: [r[1][i] if i < len(r[1]) else "" for r in rows] for i, h in enumerate(headers)}
    names, shown = fit_table(
        console.width, [r[0].plain for r in rows], columns, _DROP_ORDER, "layer / metric"
    )
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", padding=(0, 0, 0, 1), pad_edge=False)
    table.add_column("layer / metric", no_wrap=True)
    for header in shown:
        table.add_column(header, justify="right", no_wrap=True)
    for k, ((name, _, style, section), shown_name) in enumerate(zip(rows, names)):
        if section:
            table.add_section()
        if shown_name != name.plain:
            name = Text(shown_name, style=name.style)
        table.add_row(name, *(columns[h][k] for h in shown), style=style)
    console.print(table)
    print_hidden(console, [h for h in headers if h not in shown])
    print_prose(
        console,
        f"{len(d.layers)} layer{'s' if len(d.layers) != 1 else ''} in both ({len(d.shape_changes)} with a new shape), "
        f"{len(d.only_a)} only in A, {len(d.only_b)} only in B; ",
        *(
            [Keep("change = B - A,"), " ", Keep("rel = change / |A|")]
            if "rel" in shown
            else [Keep("change = B - A")]
        ),
    )
    for side, names in (("only in A", d.only_a), ("only in B", d.only_b)):
        if names:
            print_prose(console, f"{side}: ", *listed(names))
    for layer in d.layers:
        for side, notes in (("A", layer.notes_a), ("B", layer.notes_b)):
            for note in notes:
                print_prose(
                    console,
                    f"note {side} ",
                    Keep(one_line(layer.name) + ":"),
                    " ",
                    one_line(note),
                    style="dim",
                )


def diff_to_markdown(d: DiffReport) -> str:
    """GitHub-flavoured Markdown: totals, shape changes, one-sided layers, then one table of every layer's metrics."""
    out = [f"## wcond diff: {md_code(d.a)} → {md_code(d.b)}", ""]
    out += ["| total | A | B | change | rel |", "|---|---:|---:|---:|---:|"]
    out += [f"| {k} | " + " | ".join(_cells(m)) + " |" for k, m in d.summary.items()]
    out.append("")
    if d.shape_changes:
        out += ["**Shape changes**", ""]
        out += [
            f"- {md_code(x.name)}: {fmt_shape(x.shape_a)} → {fmt_shape(x.shape_b)}"
            for x in d.shape_changes
        ]
        out.append("")
    for side, names in (("Only in A", d.only_a), ("Only in B", d.only_b)):
        if names:
            out += [f"**{side}**: " + ", ".join(md_code(n) for n in names), ""]
    out += ["| layer | metric | A | B | change | rel |", "|---|---|---:|---:|---:|---:|"]
    for layer in d.layers:
        changed = "new shape" if layer.shape_changed else ""
        out.append(
            f"| {md_cell(md_code(layer.name))} | shape | {fmt_shape(layer.shape_a)} "
            f"| {fmt_shape(layer.shape_b)} | {changed} | |"
        )
        out += [f"| | {k} | " + " | ".join(_cells(m)) + " |" for k, m in _shown(layer)]
    out += ["", "change = B - A; rel = change / |A|."]
    return "\n".join(out) + "\n"
