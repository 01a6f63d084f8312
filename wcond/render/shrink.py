"""Rendering a ShrinkReport for the terminal: one row per layer, then the totals."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console
from rich.text import Text

from wcond.render.text import (
    Keep,
    Part,
    fmt_number,
    fmt_shape,
    keep_name,
    path_title,
    print_hidden,
    print_layer_table,
    print_note,
    print_prose,
    short_path,
)
from wcond.text import one_line

if TYPE_CHECKING:
    from wcond.shrink import FoldReport, ShrinkReport

__all__ = ["render_fold", "render_shrink"]

T = TypeVar("T")

# The columns that give way on a narrow console, least important first.
_DROP_ORDER = ("max°", "shape", "error")
_LEGEND = {
    "∥r/c": "row/column pairs fused",
    "error": "|W - P W' Q|/|W|",
    "max°": "widest pair fused",
}


def _change(before: T, after: T, show: Callable[[T], str]) -> str:
    """``before``, then `` → after`` when it changed."""
    return show(before) + ("" if after == before else f" → {show(after)}")


def render_shrink(report: ShrinkReport, console: Console) -> None:
    """The terminal view of a ShrinkReport: one row per layer, then the totals."""
    prefix = f"wcond shrink{' --fold' if report.mode == 'fold' else ''}: "
    columns: dict[str, list[str]] = {h: [] for h in ("shape", "∥r/c", "params", "error", "max°")}
    for r in report.layers:
        columns["shape"].append(_change(r.shape_before, r.shape_after, fmt_shape))
        columns["∥r/c"].append(f"{r.fused_rows}/{r.fused_cols}")
        columns["params"].append(_change(r.params_before, r.params_after, "{:,}".format))
        columns["error"].append(fmt_number(r.reconstruction_error, 3))
        columns["max°"].append(fmt_number(r.max_angle_deg, 3))
    hidden = print_layer_table(
        console,
        path_title(console, prefix, report.checkpoint),
        [r.name for r in report.layers],
        columns,
        _DROP_ORDER,
        row_styles=["bold" if r.changed else "dim" for r in report.layers],
    )
    print_hidden(console, hidden)
    legend = [Keep(f"{h}: {_LEGEND[h]}") for h in columns if h in _LEGEND and h not in hidden]
    print_prose(console, *_joined(legend, "  "), style="dim")
    print_prose(
        console,
        "values of every tensor: ",
        Keep(f"{report.params_before:,} → {report.params_after:,}"),
        " (",
        Text(f"{report.params_removed:,}", style="bold"),
        f" removed, {report.percent_removed:.2f}%); tensor bytes: ",
        Keep(f"{report.bytes_before:,} → {report.bytes_after:,}"),
    )
    if report.resolved:
        # One module's tensors: "conv1 = conv1.weight + conv1.bias;", the names kept whole.
        chain: list[Part] = ["chain:"]
        for i, (k, v) in enumerate(report.resolved.items()):
            last = ";" if i < len(report.resolved) - 1 else ""
            # The module stays on the line of its first tensor ("bn1 = bn1.weight +"), and a
            # line breaks after a "+", never before.
            names = [one_line(x) for x in v]
            names[0] = f"{one_line(k)} = {names[0]}"
            names = [x + " +" for x in names[:-1]] + [names[-1] + last]
            chain += [" ", *_joined([Keep(x) for x in names], " ")]
        print_prose(console, *chain)
    if report.widths:
        changed: list[Part] = []
        for i, (k, (a, b)) in enumerate(report.widths.items()):
            comma = "," if i < len(report.widths) - 1 else ";"
            changed += [" ", keep_name(k), f" {a} → {b}{comma}"]
        print_prose(
            console,
            "new widths (output units):",
            *changed,
            " build the model with these to load the output",
        )
    for r in report.layers:
        for note in r.notes:
            print_note(console, r.name, note)
    if report.output is None:
        console.print("dry run: nothing written")
    else:
        print_prose(console, "wrote ", keep_name(report.output))
    print_prose(console, _file_bytes_line(report))


def _joined(parts: list[Keep], sep: str) -> list[Part]:
    """``parts`` with ``sep`` between them (``a + b + c``); lines may break at its spaces."""
    out: list[Part] = []
    for i, p in enumerate(parts):
        out += [sep, p] if i else [p]
    return out


def _file_bytes_line(report: ShrinkReport) -> str:
    """The last line: the files' bytes before and after, the number a user compares."""
    before, after = report.file_bytes_before, report.file_bytes_after
    if after is None:
        return f"file bytes: {before:,} → (OUT is not a regular file)"
    change = 100.0 * (after - before) / before if before else 0.0
    approx = "at most " if report.file_bytes_estimated else ""
    line = f"file bytes: {before:,} → {approx}{after:,} ({change:+.1f}%)"
    if report.formats:
        line += f"; IN is {report.formats[0]}, OUT {report.formats[1]}: the formats differ too"
    return line


def render_fold(report: FoldReport, console: Console) -> None:
    """The terminal view of a FoldReport: the links folded, the new widths, what was left alone."""
    title: list[Part] = ["wcond shrink --fold --model: ", keep_name(report.model)]
    if report.checkpoint:
        title += [" with ", Keep(short_path(report.checkpoint, console.width - 6))]
    columns: dict[str, list[str]] = {h: [] for h in ("shape", "∥units", "params", "error")}
    for r in report.layers:
        columns["shape"].append(_change(r.shape_before, r.shape_after, fmt_shape))
        columns["∥units"].append(str(r.fused_rows))
        columns["params"].append(_change(r.params_before, r.params_after, "{:,}".format))
        columns["error"].append(fmt_number(r.reconstruction_error, 3))
    hidden = print_layer_table(
        console,
        title,
        [r.name for r in report.layers],
        columns,
        ("shape", "error"),
        row_styles=["bold" if r.changed else "dim" for r in report.layers],
    )
    print_hidden(console, hidden)
    print_prose(
        console,
        "model parameters (buffers not counted): ",
        Keep(f"{report.params_before:,} → {report.params_after:,}"),
        " (",
        Text(f"{report.params_removed:,}", style="bold"),
        f" removed, {report.percent_removed:.2f}%)",
    )
    if report.constructor:
        # "conv1 out_channels 16 → 15; bn1 num_features 16 → 15": each change kept whole.
        widths: list[Part] = ["constructor widths:"]
        modules = list(report.constructor.items())
        for i, (m, attrs) in enumerate(modules):
            changes = list(attrs.items())
            widths += [" ", keep_name(m)]
            for k, (a, (b, c)) in enumerate(changes):
                end = "," if k < len(changes) - 1 else ";" if i < len(modules) - 1 else ""
                widths += [" ", Keep(f"{one_line(a)} {b} → {c}{end}")]
        print_prose(console, *widths)
    else:
        console.print("constructor widths: unchanged (no positively parallel units found)")
    if report.left_alone:
        alone: list[Part] = ["left alone:"]
        for i, (m, why) in enumerate(report.left_alone.items()):
            end = ";" if i < len(report.left_alone) - 1 else ""
            alone += [" ", keep_name(m), f" ({one_line(why)}){end}"]
        print_prose(console, *alone)
    if report.max_abs_diff is not None:
        print_prose(
            console,
            f"max |Δ output| on a random input of shape {report.input_shape}: "
            f"{fmt_number(report.max_abs_diff, 3)}",
        )
    if report.output is None:
        console.print("dry run: nothing written")
    else:
        print_prose(console, "wrote ", keep_name(report.output))
        if report.file_bytes_after is not None:
            print_prose(
                console, f"file bytes: {report.file_bytes_before:,} → {report.file_bytes_after:,}"
            )
