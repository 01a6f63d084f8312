"""Tables in a narrow console or a CI log: layer names are never split, and elided only when they must be."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.console import Console

from wcond.condition import init_cs
from wcond.diff import diff
from wcond.render.diff import render_diff_table
from wcond.render.init_cs import render_init_cs
from wcond.render.shrink import render_shrink
from wcond.render.text import elide, fit_columns
from wcond.shrink import shrink

LONG = "model.encoder.layers.11.attention.output.dense_projection.weight"  # 63 characters


def long_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "conv1.weight": torch.randn(8, 3, 3, 3, generator=g),
        "block.conv2.weight": torch.randn(8, 8, 3, 3, generator=g),
        LONG: torch.randn(16, 8, 1, 1, generator=g),
    }


def text(render: Callable[[object, Console], None], obj: object, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    render(obj, console)
    return console.export_text()


def table_lines(out: str) -> list[str]:
    """The lines of the table itself: rich draws its blank left edge; the title and the prose
    after the table start flush (their wrapped continuations are indented, hence "until")."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(" ") and line.strip())
    end = next((i for i in range(start, len(lines)) if lines[i][:1].strip()), len(lines))
    return [line for line in lines[start:end] if line.strip()]


def name_lines(lines: list[str]) -> list[str]:
    """The lines showing LONG, whole or elided: the start and the distinctive end on one line."""
    return [x for x in lines if x.split()[0].startswith("model.") and "_projection.weight" in x]


def test_elide_keeps_the_distinctive_end() -> None:
    assert elide("layer4.1.conv2.weight", 30) == "layer4.1.conv2.weight"
    short = elide(LONG, 24)
    assert len(short) == 24 and short == LONG[:7] + "…" + LONG[-16:]


def test_fit_columns_drops_before_it_elides() -> None:
    widths = {"a": 10, "b": 10, "c": 10}
    assert fit_columns(80, 30, widths, ("c", "b")) == (["a", "b", "c"], 30)
    assert fit_columns(55, 30, widths, ("c", "b")) == (["a", "b"], 30)
    assert fit_columns(40, 40, widths, ("c", "b")) == (["a"], 30)  # nothing left to drop: elide


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    sd = long_state_dict()
    path = tmp_path_factory.mktemp("layout") / "long.pt"
    torch.save(sd, path)
    after = {k: v * 1.1 for k, v in sd.items()}
    return {
        "diff": diff(sd, after, device="cpu"),
        "shrink": shrink(path, None, device="cpu", tau_cos=0.5, tau_euc=10.0),
        "init-cs": init_cs(sd, iterations=2, device="cpu")[1],
    }


RENDER = {"diff": render_diff_table, "shrink": render_shrink, "init-cs": render_init_cs}


@pytest.mark.parametrize("kind", list(RENDER))
@pytest.mark.parametrize("width", [80, 160])
def test_names_are_never_split(reports: dict[str, object], kind: str, width: int) -> None:
    lines = table_lines(text(RENDER[kind], reports[kind], width))
    assert all(len(line) <= width for line in lines)
    # Never split over lines: each of the layer's rows shows its start and its end together.
    fragments = [x.split()[0] for x in lines if LONG.endswith(x.split()[0])]
    assert name_lines(lines) and all(f.startswith("model.") for f in fragments), "\n".join(lines)
    if width == 160:
        assert any(LONG in line for line in lines)


@pytest.mark.parametrize("kind", list(RENDER))
def test_a_name_that_cannot_fit_is_elided_in_the_middle(
    reports: dict[str, object], kind: str
) -> None:
    lines = table_lines(text(RENDER[kind], reports[kind], 50))
    assert all(len(line) <= 50 for line in lines)
    assert not any(LONG in line for line in lines)
    elided = [x.split()[0] for x in lines if x.split()[0].startswith("model")]
    assert len(elided) == 1 and "…" in elided[0]
    head, tail = elided[0].split("…")
    assert LONG.startswith(head) and LONG.endswith(tail) and len(tail) > len(head)


def test_piped_stdout_uses_columns_or_a_wide_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from wcond.cli.common import PIPE_WIDTH, stdout

    monkeypatch.delenv("COLUMNS", raising=False)
    assert not stdout.is_terminal and stdout.width == PIPE_WIDTH
    monkeypatch.setenv("COLUMNS", "97")
    assert stdout.width == 97
