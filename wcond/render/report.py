"""Rendering a Report: rich table for the terminal, Markdown for CI summaries, CSV (JSON: render.json)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

from rich.console import Console
from rich.text import Text

from wcond.explain import what_next
from wcond.render.text import (
    Keep,
    fmt_number,
    fmt_shape,
    keep_name,
    listed,
    path_title,
    print_hidden,
    print_layer_table,
    print_note,
    print_prose,
    ratio,
    violation_parts,
)
from wcond.report import (
    DERIVED_LABELS,
    METRIC_ALIASES,
    NUMERIC_FIELDS,
    LayerReport,
    Report,
    legend,
)
from wcond.text import csv_cell, md_cell, md_code, md_text

__all__ = ["fmt_number", "render_table", "to_csv", "to_markdown"]


# Columns of the terminal and Markdown tables: header, cell value, and the number ranked to
# highlight the worst layer (None: no highlight), higher being worse unless flagged.
_Cell = Callable[[LayerReport], "float | int | str | None"]
_COLUMNS: list[tuple[str, _Cell, _Cell | None, bool]] = [
    ("acv", lambda r: r.acv_mean, lambda r: r.acv_mean, True),
    ("acv/fl", lambda r: ratio(r.acv_sum, r.acv_floor), None, True),
    ("cs_n", lambda r: r.conv_similarity_norm, lambda r: r.conv_similarity_norm, True),
    ("cs/fl", lambda r: ratio(r.conv_similarity, r.conv_similarity_floor), None, True),
    ("normdev", lambda r: r.norm_dev_max, lambda r: r.norm_dev_max, True),
    ("rare_r", lambda r: r.rare_rows, lambda r: r.rare_rows, False),
    ("rare_c", lambda r: r.rare_cols, lambda r: r.rare_cols, False),
    (
        "∥r/c",
        lambda r: _pair_counts(r),
        lambda r: (r.near_parallel_rows or 0) + (r.near_parallel_cols or 0),
        True,
    ),
    ("dead", lambda r: r.dead_rows, lambda r: r.dead_rows, True),
]


def _pair_counts(r: LayerReport) -> str:
    return "-" if r.near_parallel_rows is None else f"{r.near_parallel_rows}/{r.near_parallel_cols}"


def _cell(layer: LayerReport, column: _Cell, digits: int = 3) -> str:
    v = column(layer)
    return v if isinstance(v, str) else fmt_number(v, digits)


def _worst(report: Report, rank: _Cell, higher_worse: bool) -> LayerReport | None:
    have = [r for r in report.layers if rank(r) is not None]
    if not have:
        return None
    pick = max if higher_worse else min
    best = pick(have, key=rank)  # type: ignore[arg-type, return-value]
    return best if rank(best) else None


# The order in which columns give way on a narrow terminal.
_DROP_ORDER = ("cs/fl", "acv/fl", "dead", "rare_c", "normdev", "shape")


def render_table(report: Report, console: Console) -> None:
    """The default terminal view: one row per layer, worst value of each column highlighted, then the summary.

    On a console too narrow for every column, the least important give way (JSON has them all);
    layer names are never split, and elided in the middle only when they cannot fit otherwise.
    """
    worst = [_worst(report, rank, hw) if rank else None for _, _, rank, hw in _COLUMNS]
    tripped = {v.layer for g in report.gates for v in g.violations}
    cells: dict[str, list[Text]] = {"shape": [Text(fmt_shape(r.shape)) for r in report.layers]}
    for (header, value, _, _), w in zip(_COLUMNS, worst):
        cells[header] = []
        for r in report.layers:
            style = "bold red" if w is r else ""
            if header == "∥r/c" and (r.near_parallel_rows or r.near_parallel_cols) and not style:
                style = "yellow"
            cells[header].append(Text(_cell(r, value), style=style))
    hidden = print_layer_table(
        console,
        path_title(console, "wcond inspect: ", report.checkpoint),
        [r.name for r in report.layers],
        cells,
        _DROP_ORDER,
        name_styles=["bold red" if r.name in tripped or r.nonfinite else "" for r in report.layers],
        left=("shape",),
    )
    shown = [h for h in cells if h not in hidden]
    # Each "label: name (meaning)" kept on one line; two spaces between them.
    print_prose(console, *legend_parts([h for h in shown if h != "shape"]), style="dim")
    print_hidden(console, hidden)
    _print_summary(report, console)
    hint = what_next(report, console.width)
    if hint:
        print_prose(console, hint, style="dim")


def legend_parts(headers: list[str]) -> list[str | Keep]:
    """The terminal legend for :func:`print_prose`: "label: name (meaning)" for each header shown,
    each kept whole, two spaces between them."""
    entries = [
        Keep(f"{label}: {name} ({meaning})" if meaning else f"{label}: {name}")
        for label, name, meaning in legend(headers)
    ]
    return [p for k in entries for p in ("  ", k)][1:]


def _print_summary(report: Report, console: Console) -> None:
    s = report.summary
    print_prose(
        console,
        Text(str(s.layers), style="bold"),
        f" layers, {s.params:,} parameters analyzed ({s.skipped_tensors} other tensors skipped); "
        f"near-parallel pairs: {s.near_parallel_rows} rows, {s.near_parallel_cols} cols; "
        f"dead rows: {s.dead_rows}",
    )
    print_prose(
        console,
        f"totals: acv_sum {fmt_number(s.acv_sum)}, conv_similarity {fmt_number(s.conv_similarity)}, "
        f"norm_loss {fmt_number(s.norm_loss)}",
    )
    labels = {
        "acv_mean": "highest acv_mean",
        "conv_similarity_norm": "highest conv_similarity_norm",
        "near_parallel": "most near-parallel pairs",
        "rare_rows": "lowest rare_rows",
    }
    for key, label in labels.items():
        if s.worst.get(key):
            print_prose(console, f"{label}: ", *listed(s.worst[key][:3]))
    for r in report.layers:
        for note in r.notes:
            print_note(console, r.name, note)
    for key, why in s.skipped.items():
        print_note(console, key, why, "skipped")
    for g in report.gates:
        if g.passed:
            print_prose(console, Text("PASS", style="green"), " ", keep_name(g.expr))
        else:
            print_prose(console, Text("FAIL", style="bold red"), " ", *violation_parts(g))


def to_markdown(report: Report) -> str:
    """A GitHub-flavoured Markdown report that pastes into a CI job summary."""
    s = report.summary
    out = [f"## wcond inspect: {md_code(report.checkpoint)}", ""]
    verdict = (
        "❌ gates failed" if report.failed else ("✅ all gates passed" if report.gates else "")
    )
    out.append(
        f"{s.layers} layers, {s.params:,} parameters; near-parallel pairs: {s.near_parallel_rows} rows, "
        f"{s.near_parallel_cols} cols; dead rows: {s.dead_rows}. {verdict}".rstrip()
    )
    out.append("")
    labels = [h for h, *_ in _COLUMNS]
    headers = ["layer", "shape"] + [METRIC_ALIASES.get(h, h) for h in labels]
    out.append("| " + " | ".join(headers) + " |")
    out.append("|" + "|".join(["---", "---"] + ["---:"] * len(_COLUMNS)) + "|")
    for r in report.layers:
        cells = [md_code(r.name), fmt_shape(r.shape)] + [
            _cell(r, value, 4) for _, value, *_ in _COLUMNS
        ]
        out.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    out += ["", markdown_legend(labels)]
    if report.gates:
        out += ["", "**Gates**", ""]
        for g in report.gates:
            if g.passed:
                out.append(f"- ✅ {md_code(g.expr)}")
            else:
                names = ", ".join(
                    f"{md_code(v.layer)} ({fmt_number(v.value)})" for v in g.violations
                )
                out.append(f"- ❌ {md_code(g.expr)}: {names}")
    notes = [f"- {md_code(r.name)}: {md_text(n)}" for r in report.layers for n in r.notes]
    notes += [f"- {md_code(k)}: skipped: {md_text(why)}" for k, why in s.skipped.items()]
    if notes:
        out += ["", "**Notes**", ""] + notes
    return "\n".join(out) + "\n"


def markdown_legend(labels: list[str]) -> str:
    """One line under a Markdown table: each column's name (its terminal label) and meaning."""
    parts = []
    for label, name, meaning in legend(labels):
        if label in DERIVED_LABELS:
            parts.append(f"{md_code(label)} = " + " / ".join(map(md_code, name.split(" / "))))
        else:
            short = f" ({md_code(label)})" if label != name else ""
            parts.append(f"{md_code(name)}{short}: {md_text(meaning)}")
    return "**Columns**: " + "; ".join(parts) + "."


CSV_FIELDS = ["name", "kind", "shape", "dtype", "groups", *NUMERIC_FIELDS, "notes"]


def to_csv(report: Report) -> str:
    """One row per layer, one column per metric; empty cells where a value does not apply."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in report.layers:
        row = {f: getattr(r, f) for f in CSV_FIELDS if f not in ("shape", "notes")}
        row["shape"] = fmt_shape(r.shape)
        row["notes"] = "; ".join(r.notes)
        writer.writerow({k: "" if v is None else csv_cell(v) for k, v in row.items()})
    return buf.getvalue()
