"""Golden files: the exact table, Markdown, CSV and JUnit text of a fixed report (and of a diff).

Inputs are a seeded state dict built here, so the report names ``<state_dict>`` instead of a
machine-dependent path, and the terminal table is rendered on a 100-column console without color.
Regenerate after an intended change with ``python -m pytest tests/test_golden.py --update-golden``
and review the diff of tests/golden/.

Numbers are compared to 1e-5 relative rather than byte for byte: CSV and JUnit print full float
precision, whose last digits may differ between CPUs (BLAS summation order); everything else,
layout included, must match exactly.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.console import Console

from wcond.analyze import Report, inspect
from wcond.diff import diff
from wcond.render.diff import diff_to_markdown, render_diff_table
from wcond.render.junit import to_junit
from wcond.render.report import render_table, to_csv, to_markdown

GOLDEN = Path(__file__).parent / "golden"
GATES = ["near_parallel_rows>0", "acv_mean>0.2", "conv_similarity_norm>5"]
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


POINTWISE = "encoder.blocks.0.pointwise_projection.weight"


def golden_state_dict(seed: int = 5, pointwise: bool = False) -> dict[str, torch.Tensor]:
    """Conv2d, Conv2d with a dead filter, Linear; conv1 rows 1 and 4 near-parallel (1 - cos ~ 1.6e-3).

    The planted pair sits far from float32 noise so every printed digit is stable. ``pointwise``
    adds a 1x1 conv with more filters (16) than input dimensions (3) under a long key: the one
    layer whose ACV and CS floors are positive (the acv/fl and cs/fl columns), and whose name
    tests the table layout at 80 columns.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {
        "conv1.weight": torch.randn(6, 3, 3, 3, generator=g),
        "conv1.bias": torch.randn(6, generator=g),
        "conv2.weight": torch.randn(8, 6, 3, 3, generator=g) * 0.2,
        "fc.weight": torch.randn(4, 32, generator=g) * 0.3,
        "fc.bias": torch.zeros(4),
    }
    base = sd["conv1.weight"][1].flatten()
    noise = torch.randn(base.numel(), generator=g)
    noise -= (noise @ base) / (base @ base) * base  # orthogonal to the row: sets the angle exactly
    sd["conv1.weight"][4] = (0.8 * base + 0.045 * base.norm() / noise.norm() * noise).view(3, 3, 3)
    sd["conv2.weight"][5] = 0.0
    if pointwise:
        sd[POINTWISE] = torch.randn(16, 3, 1, 1, generator=g)
    return sd


def golden_report(pointwise: bool = True) -> Report:
    return inspect(
        golden_state_dict(pointwise=pointwise),
        tau_cos=0.01,
        tau_euc=1.0,
        fail_if=GATES,
        device="cpu",
    )


def _table(render: Callable[[object, Console], None], obj: object, width: int = 100) -> str:
    console = Console(
        record=True, width=width, file=io.StringIO(), color_system=None, legacy_windows=False
    )
    render(obj, console)
    return console.export_text()


def _same(got: str, want: str) -> bool:
    """Equal text outside numbers; numbers equal to 1e-5 relative."""
    if _NUMBER.split(got) != _NUMBER.split(want):
        return False
    a, b = _NUMBER.findall(got), _NUMBER.findall(want)
    return len(a) == len(b) and all(
        float(x) == pytest.approx(float(y), rel=1e-5, abs=1e-12) for x, y in zip(a, b)
    )


def check(name: str, text: str, update: bool) -> None:
    path = GOLDEN / name
    if update or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if not update:
            pytest.fail(f"{path} did not exist and was written; review it and rerun")
        return
    want = path.read_text(encoding="utf-8")
    if not _same(text, want):
        import difflib

        delta = "".join(
            difflib.unified_diff(want.splitlines(True), text.splitlines(True), "golden", "now")
        )
        pytest.fail(
            f"{name} differs from the golden file (rerun with --update-golden if intended):\n{delta}"
        )


def test_golden_report_has_what_the_goldens_should_show() -> None:
    """Guards the fixture: a golden file of a report with nothing in it would prove little."""
    r = golden_report()
    by = {x.name: x for x in r.layers}
    assert by["conv1.weight"].near_parallel_rows == 1 and by["conv2.weight"].dead_rows == 1
    assert [g.passed for g in r.gates] == [False, False, True]
    assert by["conv1.weight"].rare_rows == pytest.approx(0.045**2 / (0.8**2 + 0.045**2), rel=1e-3)
    pw = by[POINTWISE]  # the acv/fl and cs/fl columns have a number to show
    assert pw.acv_floor and pw.acv_sum and pw.conv_similarity_floor and pw.conv_similarity
    text = _table(render_table, r)
    assert "acv/fl" in text and "cs/fl" in text


@pytest.mark.parametrize("width", [80, 160])
def test_table_layout(width: int, update_golden: bool) -> None:
    """At 80 columns the least important columns give way and no layer name is split or cut."""
    text = _table(render_table, golden_report(), width)
    lines = text.splitlines()
    table = "\n".join(lines[1 : next(i for i, x in enumerate(lines) if x.startswith("acv:"))])
    assert all(len(line) <= width for line in table.splitlines())
    assert all(name in table for name in (POINTWISE, "conv1.weight", "fc.weight"))
    check(f"inspect_table_{width}.txt", text, update_golden)


def test_table(update_golden: bool) -> None:
    check("inspect_table.txt", _table(render_table, golden_report()), update_golden)


def test_markdown(update_golden: bool) -> None:
    check("inspect.md", to_markdown(golden_report()), update_golden)


def test_csv(update_golden: bool) -> None:
    check("inspect.csv", to_csv(golden_report()), update_golden)


def test_junit(update_golden: bool) -> None:
    check("inspect.junit.xml", to_junit(golden_report()), update_golden)


def _golden_diff():
    after = golden_state_dict()
    after["conv1.weight"] = after["conv1.weight"][
        [0, 1, 2, 3, 5]
    ].contiguous()  # the near-parallel row dropped
    after["conv2.weight"] = after["conv2.weight"] * 1.5
    del after["fc.weight"]
    after["head.weight"] = torch.eye(3)
    return diff(golden_state_dict(), after, tau_cos=0.01, tau_euc=1.0, device="cpu")


def test_diff_table(update_golden: bool) -> None:
    check("diff_table.txt", _table(render_diff_table, _golden_diff()), update_golden)


def test_diff_markdown(update_golden: bool) -> None:
    check("diff.md", diff_to_markdown(_golden_diff()), update_golden)


def test_number_tolerant_comparison_still_catches_changes() -> None:
    assert _same("acv 0.1234 | x", "acv 0.12340000001 | x")
    assert not _same("acv 0.1234 | x", "acv 0.1235 | x")
    assert not _same("acv 0.1234 | x", "acv 0.1234 || x")
