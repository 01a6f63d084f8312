"""wcond/explain.py: `inspect --explain` and the one-line "what next" after the table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import wcond
from wcond.cli import app
from wcond.explain import CS_NORM_HIGH, CS_NORM_RISE, explain_text, what_next, what_next_trend
from wcond.render.report import render_table
from wcond.render.text import table_text
from wcond.report import METRIC_GUIDE, NUMERIC_FIELDS, Report, metric_label

runner = CliRunner()


def _report(**summary: int) -> Report:
    """A clean report (orthogonal rows, no pairs) with summary fields overridden."""
    w = torch.eye(4).reshape(4, 4, 1, 1)
    r = wcond.inspect({"conv.weight": w}, top=0)
    return dataclasses.replace(r, summary=dataclasses.replace(r.summary, **summary))


def _with_cs_norm(r: Report, value: float) -> Report:
    layers = [dataclasses.replace(x, conv_similarity_norm=value) for x in r.layers]
    return dataclasses.replace(r, layers=layers)


def test_explain_names_every_metric_with_its_guide_within_the_width() -> None:
    text = explain_text(80)
    for m in NUMERIC_FIELDS:
        label = metric_label(m)
        head = f"{m} ({label})" if label != m else m
        assert f"\n{head}: {METRIC_GUIDE[m].meaning}\n" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    assert text.count("\n  worse: ") == text.count("\n  next: ") == len(NUMERIC_FIELDS)


def test_inspect_explain_prints_the_guide_without_a_checkpoint() -> None:
    result = runner.invoke(app, ["inspect", "--explain"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert result.stdout == explain_text(80)


def test_nothing_stands_out_in_a_clean_layer() -> None:
    r = _report()
    assert r.summary.near_parallel_rows == 0 and r.layers[0].conv_similarity_norm == 1.0
    assert what_next(r) is None
    assert "what next" not in table_text(render_table, r, 100)


def test_near_parallel_pairs_point_to_shrink_dry_run(pt_file: Path) -> None:
    r = wcond.inspect(pt_file, top=0)  # conv2 rows 1 and 4 planted anti-parallel
    line = f"what next: 1 near-parallel pair to fuse: wcond shrink {r.checkpoint} --dry-run"
    assert what_next(r) == line
    assert what_next(r, width=len(line)) == line
    assert what_next(r, width=len(line) - 1) == (
        "what next: 1 near-parallel pair to fuse: wcond shrink CHECKPOINT --dry-run"
    )
    text = table_text(render_table, r, 200)
    assert text.rstrip().splitlines()[-1] == line


def test_nonfinite_comes_before_pairs_and_pairs_before_dead_rows() -> None:
    both = _report(nonfinite_layers=1, near_parallel_rows=2, dead_rows=3)
    assert what_next(both).startswith("what next: 1 layer with NaN/Inf")  # type: ignore[union-attr]
    pairs = _report(near_parallel_rows=2, dead_rows=3)
    assert what_next(pairs).startswith("what next: 2 near-parallel pairs")  # type: ignore[union-attr]
    dead = _report(dead_rows=3)
    assert what_next(dead) == "what next: 3 all-zero rows: see wcond inspect --explain (dead_rows)"


@pytest.mark.parametrize(
    ("value", "stands_out"),
    [(CS_NORM_HIGH, False), (CS_NORM_HIGH * (1 - 1e-9), False), (CS_NORM_HIGH * (1 + 1e-9), True)],
)
def test_cs_norm_above_the_threshold_points_to_init_cs(value: float, stands_out: bool) -> None:
    r = _with_cs_norm(_report(), value)
    got = what_next(r, width=200)
    if stands_out:
        assert got == (
            f"what next: 1 layer with cs_n > {CS_NORM_HIGH:g}: "
            "wcond init-cs CHECKPOINT -o OUT --keep-norm"  # a state dict has no path
        )
    else:
        assert got is None


def test_a_run_whose_cs_norm_rises_points_to_the_regularizer() -> None:
    r = _report()
    flat = {"conv.weight": {"conv_similarity_norm": [1.0, 1.0 * (1 + CS_NORM_RISE)]}}
    assert what_next_trend([r, r], flat) is None  # a rise of exactly CS_NORM_RISE is not over it
    rising = {"conv.weight": {"conv_similarity_norm": [1.0, None, 1.0 * (1 + CS_NORM_RISE) + 1e-6]}}
    assert what_next_trend([r, r, r], rising) == (
        f"what next: cs_n rose over {CS_NORM_RISE:.0%} in 1 layer: "
        "add wcond.metrics.conv_similarity to the loss"
    )
    # pairs in the last checkpoint come first
    paired = _report(near_parallel_cols=1)
    assert what_next_trend([r, paired], rising, width=80).startswith(  # type: ignore[union-attr]
        "what next: 1 near-parallel pair to fuse"
    )


def test_what_next_is_only_in_the_terminal_table(pt_file: Path) -> None:
    for fmt in ("json", "markdown", "csv", "html"):
        out = runner.invoke(app, ["inspect", str(pt_file), "-f", fmt])
        assert out.exit_code == 0 and "what next" not in out.stdout, fmt
    table = runner.invoke(app, ["inspect", str(pt_file)], env={"COLUMNS": "200"})
    assert "what next: 1 near-parallel pair to fuse: wcond shrink" in table.stdout
