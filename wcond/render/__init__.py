"""Rendering: results as text for the terminal, scripts, CI and browsers.

One module per output format (``json``, ``html``, ``junit``, ``plot`` for images) or per kind of
result where its views share their columns (``report``, ``diff``, ``trend``, ``init_cs``,
``shrink``), and ``text`` for what they all share. Renderers are pure: they take data and return
text; whatever a page needs from a checkpoint (the heatmaps' cosines) the caller hands over.

:data:`RENDERERS` is the one table from a kind of result and a format to its renderer, and
:func:`render` the one dispatch, for reports, diffs and runs (several checkpoints' trend).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from wcond.render import diff, html, junit, report, trend
from wcond.render.json import to_json
from wcond.render.text import table_text

__all__ = ["RENDERERS", "Renderers", "render"]


@dataclass(frozen=True)
class Renderers:
    """How one kind of result is drawn: a table printed on a console, and text in every format."""

    table: Callable[[Any, Console], None]
    formats: Mapping[str, Callable[..., str]]  # every format but the table
    width: int = 120  # the table's width written as text (-o FILE)

    @property
    def names(self) -> tuple[str, ...]:
        """The format names, the table first."""
        return ("table", *self.formats)


RENDERERS: dict[str, Renderers] = {
    "report": Renderers(
        report.render_table,
        {
            "json": to_json,
            "markdown": report.to_markdown,
            "csv": report.to_csv,
            "html": html.to_html,
            "junit": junit.to_junit,
        },
    ),
    "diff": Renderers(diff.render_diff_table, {"json": to_json, "markdown": diff.diff_to_markdown}),
    "trend": Renderers(
        trend.render_trend_table,
        {
            "json": to_json,
            "csv": trend.trend_csv,
            "markdown": trend.trend_markdown,
            "html": html.to_run_html,
            "junit": junit.trend_to_junit,
        },
        width=140,
    ),
}


def render(kind: str, result: Any, fmt: str, **options: Any) -> str:
    """``result`` (a Report, DiffReport or TrendReport, as ``kind`` says) as text in format ``fmt``.

    ``options`` go to that format's renderer (html: ``cosines=``, the heatmaps' data).

    Example:
        >>> render("report", wcond.inspect("model.pt"), "markdown")
    """
    r = RENDERERS[kind]
    if fmt == "table":
        return table_text(r.table, result, r.width)
    return r.formats[fmt](result, **options)
