"""What every renderer shares: numbers and shapes as text, and tables that fit the console.

A table is laid out for the console's width. Layer names are never split across lines: the
name column gets the width of the longest name, the least important columns give way first, and
only a name that still cannot fit is elided in the middle, keeping its distinctive end.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from wcond.text import one_line

T = TypeVar("T")

__all__ = [
    "ELLIPSIS",
    "elide",
    "fit_columns",
    "fit_table",
    "fmt_number",
    "fmt_shape",
    "print_layer_table",
    "ratio",
    "table_text",
]

ELLIPSIS = "…"
MIN_NAME_WIDTH = 16  # below this an elided name no longer says which layer it is


def fmt_number(v: float | int | None, digits: int = 4) -> str:
    """Compact: ints as is, floats to ``digits`` significant digits, '-' for null."""
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    if v != v:  # NaN
        return "nan"
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.{digits}g}"
    return f"{v:.{max(0, digits - 2)}e}"


def fmt_shape(shape: Sequence[int]) -> str:
    """A tensor shape as ``64x3x7x7``."""
    return "x".join(map(str, shape))


def ratio(value: float | None, floor: float | None) -> float | None:
    """``value / floor``, None when either is missing or the floor is 0."""
    return value / floor if value is not None and floor else None


def elide(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters: its middle replaced by '…', two thirds kept at the end.

    The end of a key (``layer4.1.conv2.weight``) is what tells layers apart; the start says where.
    """
    if len(name) <= width:
        return name
    if width <= 1:
        return ELLIPSIS[:width]
    tail = (2 * (width - 1) + 2) // 3
    head = width - 1 - tail
    return name[:head] + ELLIPSIS + name[len(name) - tail :]


def fit_columns(
    total: int, name: int, columns: dict[str, int], drop_order: Sequence[str]
) -> tuple[list[str], int]:
    """Which columns to show, and the name column's width, in ``total`` characters.

    Args:
        total: the console width.
        name: the width the name column needs to show every name whole (padding included).
        columns: the other columns' widths (padding included), in display order.
        drop_order: the columns that may give way, least important first.

    Returns:
        The shown columns in display order, and the name column's width: ``name`` when the names
        fit whole after dropping what may give way, else what is left (at least MIN_NAME_WIDTH).
    """
    shown = list(columns)
    for h in drop_order:
        if name + sum(columns[c] for c in shown) <= total:
            break
        if h in shown:
            shown.remove(h)
    room = total - sum(columns[c] for c in shown)
    return shown, max(min(name, room), MIN_NAME_WIDTH)


def fit_table(
    total: int,
    names: Sequence[str],
    columns: Mapping[str, Sequence[str | Text]],
    drop_order: Sequence[str],
    name_header: str = "layer",
) -> tuple[list[str], list[str]]:
    """Lay out a table of one name column and ``columns`` (header -> cells) in ``total`` characters.

    Widths are measured as rich draws a ``box.SIMPLE_HEAD`` table with ``padding=(0, 0, 0, 1)``
    and ``pad_edge=False``, as every wcond table is. Returns the names to print (elided only
    if they cannot fit whole) and the columns shown, in display order.
    """

    def width(cell: str | Text) -> int:
        return cell.cell_len if isinstance(cell, Text) else cell_len(cell)

    # rich's SIMPLE_HEAD box draws a blank edge on either side and a blank divider between
    # columns; with padding (0, 0, 0, 1) every column but the first also has one space before it.
    name = max([cell_len(name_header), *(cell_len(n) for n in names)])
    widths = {h: max([cell_len(h), *(width(c) for c in col)]) + 2 for h, col in columns.items()}
    shown, name_width = fit_columns(total - 2, name, widths, drop_order)
    return [elide(n, name_width) for n in names], shown


def print_layer_table(
    console: Console,
    title: str,
    names: Sequence[str],
    columns: Mapping[str, Sequence[str | Text]],
    drop_order: Sequence[str],
    *,
    name_styles: Sequence[str] | None = None,
    row_styles: Sequence[str] | None = None,
    left: Sequence[str] = (),
) -> list[str]:
    """Print a table of one row per layer, fitted to the console; returns the columns left out.

    ``columns`` maps each header to its cells (right-aligned unless named in ``left``).
    """
    # Names and titles come from the checkpoint: shown on one line, never as markup or controls.
    shown_names, shown = fit_table(console.width, [one_line(n) for n in names], columns, drop_order)
    table = Table(
        title=Text(one_line(title)),
        title_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        padding=(0, 0, 0, 1),
        pad_edge=False,
    )
    table.add_column("layer", no_wrap=True)
    for h in shown:
        table.add_column(h, justify="left" if h in left else "right", no_wrap=True)
    for i, name in enumerate(shown_names):
        table.add_row(
            Text(name, style=name_styles[i] if name_styles else ""),
            *(columns[h][i] for h in shown),
            style=row_styles[i] if row_styles else None,
        )
    console.print(table)
    return [h for h in columns if h not in shown]


def table_text(render: Callable[[T, Console], None], obj: T, width: int = 120) -> str:
    """What ``render`` prints for ``obj`` on a ``width``-column console without color, as text."""
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    render(obj, console)
    return console.export_text()
