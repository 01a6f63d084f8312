"""What every renderer shares: numbers and shapes as text, and tables and prose that fit the console.

A table is laid out for the console's width. Layer names are never split across lines: the
name column gets the width of the longest name, the least important columns give way first (and
a note says which), and only a name that still cannot fit is elided in the middle, keeping its
distinctive end. Prose (summaries, legends, notes) wraps at spaces between words, never inside a
name (:class:`Keep`); a name wider than the console stands alone on its line.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, Union

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from wcond.text import one_line

if TYPE_CHECKING:
    from wcond.gates import GateResult

T = TypeVar("T")

__all__ = [
    "ELLIPSIS",
    "Keep",
    "Part",
    "elide",
    "fit_columns",
    "fit_table",
    "fmt_number",
    "fmt_shape",
    "keep_name",
    "listed",
    "path_title",
    "print_hidden",
    "print_layer_table",
    "print_note",
    "print_prose",
    "ratio",
    "short_path",
    "table_text",
    "violation_parts",
    "wrap_prose",
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


@dataclass(frozen=True)
class Keep:
    """A piece of a line that wrapping never breaks (a layer name, a path, ``name (value)``)."""

    text: str
    style: str = ""


def keep_name(name: object, style: str = "") -> Keep:
    """A name from a checkpoint or the command line: one line, escaped, never broken, never markup."""
    return Keep(one_line(name), style)


# A line of prose: plain strings (no markup) and Texts wrap at their spaces; Keeps never break.
Part = Union[str, Text, Keep]
CONTINUATION = "  "  # a wrapped line's continuation is indented, so that it reads as one item


def _joined(parts: Sequence[Part], style: str) -> tuple[Text, list[bool]]:
    """The parts as one Text, and for each character whether a line may break there."""
    text = Text(style=style, end="")
    breakable: list[bool] = []
    for part in parts:
        if isinstance(part, Keep):
            piece = Text(part.text, style=part.style)
            may = False
        else:
            piece = part if isinstance(part, Text) else Text(part)
            may = True
        text.append_text(piece)
        breakable += [may and ch == " " for ch in piece.plain]
    return text, breakable


def wrap_prose(
    parts: Sequence[Part], width: int, style: str = "", indent: str = CONTINUATION
) -> list[Text]:
    """``parts`` as lines of at most ``width`` cells, broken only at spaces of the prose parts.

    A word (a name, with the punctuation glued to it) wider than a line stands alone on its line
    rather than being split: the reader can still copy it whole.
    """
    text, breakable = _joined(parts, style)
    plain = text.plain
    # Words: maximal runs of characters between breakable spaces, as (start, end) offsets.
    words: list[tuple[int, int]] = []
    start = None
    for i, may in enumerate(breakable):
        if may:
            if start is not None:
                words.append((start, i))
                start = None
        elif start is None:
            start = i
    if start is not None:
        words.append((start, len(plain)))
    if not words:
        return [text]
    lines: list[Text] = []
    first, last, used = words[0][0], words[0][1], cell_len(plain[words[0][0] : words[0][1]])
    for a, b in words[1:]:
        gap = cell_len(plain[last:a])
        word = cell_len(plain[a:b])
        if used + gap + word <= width:
            last, used = b, used + gap + word
            continue
        lines.append(text[first:last])
        first, last, used = a, b, cell_len(indent) + word
    lines.append(text[first:last])
    return [line if i == 0 else Text(indent, end="") + line for i, line in enumerate(lines)]


def print_prose(console: Console, *parts: Part, style: str = "") -> None:
    """Print one line of prose wrapped to the console's width (see :func:`wrap_prose`)."""
    for line in wrap_prose(parts, console.width, style):
        # soft_wrap: rich neither wraps nor crops again a line already fitted (or a lone long name).
        console.print(line, soft_wrap=True)


def short_path(path: object, room: int) -> str:
    """``path`` in ``room`` cells if it can be: leading folders replaced by '…/', the file name kept.

    A title names the file; its folders matter less than its name, and the name is never cut.
    """
    shown = one_line(path)
    if cell_len(shown) <= room:
        return shown
    folders = shown.split("/")
    for k in range(1, len(folders)):
        tail = ELLIPSIS + "/" + "/".join(folders[k:])
        if cell_len(tail) <= room or k == len(folders) - 1:
            return tail
    return shown


def print_note(console: Console, name: object, note: object, label: str = "note") -> None:
    """``note NAME: text``: a remark about one layer or key, the name kept whole."""
    print_prose(
        console, Text(label, style="dim"), " ", Keep(one_line(name) + ":"), " ", one_line(note)
    )


def path_title(console: Console, prefix: str, path: object) -> list[Part]:
    """A table's title, ``prefix`` then ``path`` shortened to fit the rest of the line."""
    return [prefix, Keep(short_path(path, console.width - cell_len(prefix)))]


def print_hidden(console: Console, hidden: Sequence[str]) -> None:
    """The note under a table that left columns out to fit the console."""
    if hidden:
        print_prose(
            console,
            "hidden at this width: ",
            *listed(hidden),
            " (widen the terminal, or use -f json)",
            style="dim",
        )


def listed(items: Sequence[object], style: str = "") -> list[Part]:
    """``a, b, c`` as parts: each item escaped and kept whole, its comma glued to it."""
    out: list[Part] = []
    for i, item in enumerate(items):
        if i:
            out.append(" ")
        out.append(Keep(one_line(item) + ("," if i < len(items) - 1 else ""), style))
    return out


def violation_parts(g: GateResult) -> list[Part]:
    """``expr: layer (value), ...`` for a tripped gate, each layer kept with its value."""
    shown = g.violations[:10]
    parts: list[Part] = [Keep(one_line(g.expr) + ":")]
    for i, v in enumerate(shown):
        comma = "," if i < len(shown) - 1 else ""
        parts += [" ", Keep(f"{one_line(v.layer)} ({fmt_number(v.value)}){comma}")]
    if len(g.violations) > 10:
        parts.append(f" and {len(g.violations) - 10} more")
    return parts


def print_layer_table(
    console: Console,
    title: Sequence[Part] | None,
    names: Sequence[str],
    columns: Mapping[str, Sequence[str | Text]],
    drop_order: Sequence[str],
    *,
    name_styles: Sequence[str] | None = None,
    row_styles: Sequence[str] | None = None,
    left: Sequence[str] = (),
    name_header: str = "layer",
) -> list[str]:
    """Print a table of one row per layer, fitted to the console; returns the columns left out.

    ``title`` is a line of prose above the table (wrapped, not cut, on a narrow console; see
    :func:`short_path` for a path in it); ``columns`` maps each header to its cells
    (right-aligned unless named in ``left``).
    """
    # Names come from the checkpoint: shown on one line, never as markup or controls.
    shown_names, shown = fit_table(
        console.width, [one_line(n) for n in names], columns, drop_order, name_header
    )
    if title is not None:
        print_prose(console, *title)
    table = Table(
        header_style="bold",
        box=box.SIMPLE_HEAD,
        padding=(0, 0, 0, 1),
        pad_edge=False,
    )
    table.add_column(name_header, no_wrap=True)
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
