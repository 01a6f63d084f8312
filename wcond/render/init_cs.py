"""Rendering an init-cs result for the terminal: CS before and after per layer, then the totals."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

from wcond.render.text import (
    Keep,
    fmt_number,
    path_title,
    print_hidden,
    print_layer_table,
    print_note,
    print_prose,
)
from wcond.text import one_line

if TYPE_CHECKING:
    from wcond.condition import InitCSResult, LayerResult

__all__ = ["render_init_cs"]

# The columns that give way on a narrow console, least important first.
_DROP_ORDER = ("max|Δw|", "|W|", "cs_n", "norms", "dirs", "floor", "gap")


# Each legend entry and the columns it explains.
_LEGEND = (
    (
        {"change", "norms", "dirs"},
        "change = norms + dirs, the parts due to the filters' norms and to their directions "
        "(CS of the new filters rescaled to their old norms)",
    ),
    ({"floor"}, "floor: lowest CS at these filter norms"),
    ({"gap"}, "gap: share of CS - floor removed"),
    ({"cs_n"}, "cs_n: conv_similarity_norm before→after"),
    ({"|W|"}, "|W|: layer norm"),
)


def _pct(v: float | None) -> str:
    """A signed percentage with one decimal, none from 100% up (keeps the table within 80 columns)."""
    if v is None:
        return "-"
    return f"{100 * v:+.0f}%" if abs(v) >= 0.9995 else f"{100 * v:+.1f}%"


def render_init_cs(result: InitCSResult, console: Console) -> None:
    """The terminal view: CS before/after per layer, the drop split into norms and directions, then totals and notes."""
    keep_norm = result.settings["keep_norm"]
    # With --keep-norm the norm part and |W| are 0 by construction; the floor is what matters instead.
    middle = ["floor", "gap"] if keep_norm else ["norms", "dirs"]
    headers = ["CS", "after", "change", *middle, "cs_n", *([] if keep_norm else ["|W|"]), "max|Δw|"]
    rows = []
    for r in result.layers:
        if keep_norm:
            middle = [
                fmt_number(r.cs_floor, 3),
                "-" if r.floor_gap_closed is None else _pct(r.floor_gap_closed).lstrip("+"),
            ]
        else:
            middle = [_pct(_neg(r.drop_from_norms)), _pct(_neg(r.drop_from_directions))]
        rows.append(
            [
                fmt_number(r.cs_before, 3),
                fmt_number(r.cs_after, 3),
                _pct(_neg(r.cs_drop)),
                *middle,
                f"{fmt_number(r.cs_norm_before, 3)}→{fmt_number(r.cs_norm_after, 3)}",
                *([] if keep_norm else [_pct(r.norm_change)]),
                fmt_number(r.max_abs_change, 3),
            ]
        )
    columns = {h: [row[i] for row in rows] for i, h in enumerate(headers)}
    hidden = print_layer_table(
        console,
        path_title(console, "wcond init-cs: ", result.checkpoint),
        [r.name for r in result.layers],
        columns,
        _DROP_ORDER,
        row_styles=["" if r.optimized else "dim" for r in result.layers],
    )
    print_hidden(console, hidden)
    # The legend explains the columns shown: a dropped column's entry would only confuse.
    shown = set(headers) - set(hidden)
    legend = ["CS before and after"] + [text for cols, text in _LEGEND if cols <= shown]
    print_prose(console, "; ".join(legend), style="dim")
    s = result.settings
    done = result.optimized
    where = (
        s["device"] if s.get("engine", "local") == "local" else f"{s['device']} on {s['engine']}"
    )
    drop = (result.cs_before - result.cs_after) / result.cs_before if result.cs_before else None
    print_prose(
        console,
        f"total CS {fmt_number(result.cs_before)} → {fmt_number(result.cs_after)} ({_pct(_neg(drop))}) over "
        f"{len(done)} of {len(result.layers)} conv layers; {s['iterations']} {s['optimizer']} steps, ",
        Keep(f"lr {s['lr']:g},"),
        f" {'--keep-norm, ' if keep_norm else ''}",
        Keep(one_line(where) + ","),
        f" {result.seconds:.1f} s",
    )
    if not keep_norm and _norms_dominate(done):
        print_prose(
            console,
            "most of the drop came from smaller filters (CS is homogeneous of degree 4): behind "
            "BatchNorm that acts as a larger learning rate, without it the signal shrinks "
            "(benchmarks/CS_TRAINING.md); --keep-norm holds each filter's norm fixed so that "
            "only directions change",
        )
    for r in result.layers:
        for note in r.notes:
            print_note(console, r.name, note)


def _neg(v: float | None) -> float | None:
    """A drop shown as a (negative) change."""
    return (
        None if v is None else 0.0 - v
    )  # 0.0 - 0.0 is +0.0: an unchanged layer shows +0.0%, not -0.0%


def _norms_dominate(rows: list[LayerResult]) -> bool:
    norms = sum((r.drop_from_norms or 0.0) * (r.cs_before or 0.0) for r in rows)
    dirs = sum((r.drop_from_directions or 0.0) * (r.cs_before or 0.0) for r in rows)
    return norms > max(dirs, 0.0)
