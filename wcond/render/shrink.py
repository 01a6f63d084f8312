"""Rendering a ShrinkReport for the terminal: one row per layer, then the totals."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console

from wcond.render.text import fmt_number, fmt_shape, print_layer_table
from wcond.text import markup

if TYPE_CHECKING:
    from wcond.shrink import FoldReport, ShrinkReport

__all__ = ["render_fold", "render_shrink"]

T = TypeVar("T")

# The columns that give way on a narrow console, least important first.
_DROP_ORDER = ("max°", "shape", "error")


def _change(before: T, after: T, show: Callable[[T], str]) -> str:
    """``before``, then `` → after`` when it changed."""
    return show(before) + ("" if after == before else f" → {show(after)}")


def render_shrink(report: ShrinkReport, console: Console) -> None:
    """The terminal view of a ShrinkReport: one row per layer, then the totals."""
    title = f"wcond shrink{' --fold' if report.mode == 'fold' else ''}: {report.checkpoint}"
    columns: dict[str, list[str]] = {h: [] for h in ("shape", "∥r/c", "params", "error", "max°")}
    for r in report.layers:
        columns["shape"].append(_change(r.shape_before, r.shape_after, fmt_shape))
        columns["∥r/c"].append(f"{r.fused_rows}/{r.fused_cols}")
        columns["params"].append(_change(r.params_before, r.params_after, "{:,}".format))
        columns["error"].append(fmt_number(r.reconstruction_error, 3))
        columns["max°"].append(fmt_number(r.max_angle_deg, 3))
    hidden = print_layer_table(
        console,
        title,
        [r.name for r in report.layers],
        columns,
        _DROP_ORDER,
        row_styles=["bold" if r.changed else "dim" for r in report.layers],
    )
    if hidden:
        console.print(
            f"[dim]hidden at this width: {', '.join(hidden)} (widen the terminal, or use -f json)[/]"
        )
    console.print(
        "[dim]∥r/c: row/column pairs fused  error: |W - P W' Q|/|W|  max°: widest pair fused[/]"
    )
    console.print(
        f"values of every tensor: {report.params_before:,} → {report.params_after:,} "
        f"([bold]{report.params_removed:,}[/] removed, {report.percent_removed:.2f}%); "
        f"tensor bytes: {report.bytes_before:,} → {report.bytes_after:,}",
        soft_wrap=True,
    )
    if report.resolved:
        chain = "; ".join(
            f"{markup(k)} = {markup(' + '.join(v))}" for k, v in report.resolved.items()
        )
        console.print(f"chain: {chain}", soft_wrap=True)
    if report.widths:
        changed = ", ".join(f"{markup(k)} {a} → {b}" for k, (a, b) in report.widths.items())
        console.print(
            f"new widths (output units): {changed}; build the model with these to load the output",
            soft_wrap=True,
        )
    for r in report.layers:
        for note in r.notes:
            console.print(f"[dim]note[/] {markup(r.name)}: {markup(note)}", soft_wrap=True)
    if report.output is None:
        console.print("dry run: nothing written")
    else:
        console.print(f"wrote {markup(report.output)}", soft_wrap=True)
    console.print(_file_bytes_line(report), soft_wrap=True)


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
    title = f"wcond shrink --fold --model: {report.model}"
    if report.checkpoint:
        title += f" with {report.checkpoint}"
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
    if hidden:
        console.print(
            f"[dim]hidden at this width: {', '.join(hidden)} (widen the terminal, or use -f json)[/]"
        )
    console.print(
        f"model parameters (buffers not counted): {report.params_before:,} → "
        f"{report.params_after:,} ([bold]{report.params_removed:,}[/] removed, "
        f"{report.percent_removed:.2f}%)",
        soft_wrap=True,
    )
    if report.constructor:
        widths = "; ".join(
            f"{markup(m)} " + ", ".join(f"{a} {b} → {c}" for a, (b, c) in attrs.items())
            for m, attrs in report.constructor.items()
        )
        console.print(f"constructor widths: {widths}", soft_wrap=True)
    else:
        console.print("constructor widths: unchanged (no positively parallel units found)")
    if report.left_alone:
        alone = "; ".join(f"{markup(m)} ({markup(why)})" for m, why in report.left_alone.items())
        console.print(f"left alone: {alone}", soft_wrap=True)
    if report.max_abs_diff is not None:
        console.print(
            f"max |Δ output| on a random input of shape {report.input_shape}: "
            f"{fmt_number(report.max_abs_diff, 3)}",
            soft_wrap=True,
        )
    if report.output is None:
        console.print("dry run: nothing written")
    else:
        console.print(f"wrote {markup(report.output)}", soft_wrap=True)
        if report.file_bytes_after is not None:
            console.print(
                f"file bytes: {report.file_bytes_before:,} → {report.file_bytes_after:,}",
                soft_wrap=True,
            )
