"""GitHub Actions workflow commands: one ``::error`` per tripped gate, ``::warning`` for layers worth a look.

A workflow command is one line of a step's log that starts with ``::``. Whatever a checkpoint names
(a tensor key, a path) goes through :func:`wcond.text.one_line` (control characters, line breaks
included, shown as escapes; ``::`` broken up), then GitHub's own escapes: in the message ``%``, CR
and LF become ``%25``, ``%0D``, ``%0A``; in a property (``title=``) ``:`` and ``,`` also become
``%3A``, ``%2C``. A name can then neither end the command nor start another one.
"""

from __future__ import annotations

from collections.abc import Sequence

from wcond.render.text import fmt_number
from wcond.report import Report
from wcond.text import one_line

__all__ = ["LISTED", "escape_data", "escape_property", "workflow_commands"]

LISTED = 10  # layers named in one annotation; the rest are counted


def escape_data(s: object) -> str:
    """A workflow command's message: :func:`one_line`, then ``%``, CR, LF as GitHub escapes them."""
    return one_line(s).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(s: object) -> str:
    """A workflow command's property value: :func:`escape_data`, and ``:`` ``,`` escaped too."""
    return escape_data(s).replace(":", "%3A").replace(",", "%2C")


def _command(kind: str, title: str, message: str) -> str:
    return f"::{kind} title={escape_property(title)}::{escape_data(message)}"


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def workflow_commands(reports: Sequence[Report]) -> str:
    """Per report: one ``::error`` per tripped gate (checkpoint, layers, values), then a
    ``::warning`` for layers holding NaN/Inf (no gate trips on them) and one for all-zero rows."""
    lines = []
    for r in reports:
        for g in r.gates:
            if g.passed:
                continue
            where = _listed([f"{v.layer} = {fmt_number(v.value)}" for v in g.violations])
            n = len(g.violations)
            lines.append(
                _command(
                    "error",
                    f"wcond gate {g.expr}",
                    f"{r.checkpoint}: {n} layer{' trips' if n == 1 else 's trip'} {g.expr}: {where}",
                )
            )
        bad = [layer.name for layer in r.layers if layer.nonfinite]
        if bad:
            lines.append(
                _command(
                    "warning",
                    "wcond: NaN/Inf in weights",
                    f"{r.checkpoint}: {len(bad)} layers hold NaN or Inf (no gate trips on their "
                    f"metrics): {_listed(bad)}",
                )
            )
        dead = [f"{layer.name} ({layer.dead_rows})" for layer in r.layers if layer.dead_rows]
        if dead:
            lines.append(
                _command(
                    "warning",
                    "wcond: all-zero rows",
                    f"{r.checkpoint}: all-zero rows in {len(dead)} layers: {_listed(dead)}",
                )
            )
    return "".join(line + "\n" for line in lines)
