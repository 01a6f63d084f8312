"""Many checkpoints in one call: ordering, step numbers, the trend JSON, gates on each, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_state_dict
from safetensors.torch import save_file
from typer.testing import CliRunner

import wcond
from wcond.cli import app
from wcond.errors import CheckpointError
from wcond.render.trend import sparkline
from wcond.trend import checkpoint_step, expand_paths, trend

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A training run: three checkpoints whose conv2 drifts away from its planted parallel pair."""
    base = small_state_dict()
    run = tmp_path / "run"
    run.mkdir()
    for k, step in enumerate((1000, 2000, 10000)):
        sd = {key: t.clone() for key, t in base.items()}
        g = torch.Generator().manual_seed(k)
        sd["conv2.weight"] += 0.05 * k * torch.randn(sd["conv2.weight"].shape, generator=g)
        torch.save(sd, run / f"step_{step}.pt")
    return run


def test_paths_are_ordered_naturally_whatever_the_shell_passed(run_dir: Path) -> None:
    glob_order = expand_paths([run_dir / "step_*.pt"])
    given = expand_paths(
        [run_dir / "step_2000.pt", run_dir / "step_10000.pt", run_dir / "step_1000.pt"]
    )
    names = ["step_1000.pt", "step_2000.pt", "step_10000.pt"]
    assert [p.name for p in glob_order] == names
    assert [p.name for p in given] == names
    with pytest.raises(CheckpointError, match="no file or directory matches"):
        expand_paths([run_dir / "nothing_*.pt"])


def test_step_from_stored_global_step_then_name(tmp_path: Path, state_dict: dict) -> None:
    lightning = tmp_path / "last.ckpt"
    torch.save({"state_dict": state_dict, "global_step": 4321, "epoch": 3}, lightning)
    named = tmp_path / "epoch=3-step=1200.ckpt"
    torch.save({"state_dict": state_dict, "epoch": 3}, named)
    hf = tmp_path / "checkpoint-500"
    hf.mkdir()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, hf / "model.safetensors")
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 512}))
    plain = tmp_path / "model.pt"
    torch.save(state_dict, plain)
    assert checkpoint_step(lightning) == 4321  # stored value, though the name has no number
    assert checkpoint_step(named) == 1200
    assert checkpoint_step(hf) == 512  # trainer_state.json wins over the directory's name
    assert checkpoint_step(plain) is None


def test_trend_lines_up_each_checkpoints_own_numbers(run_dir: Path) -> None:
    paths = expand_paths([run_dir / "step_*.pt"])
    t = trend(paths, tau_cos=1e-4)
    assert t.steps == [1000, 2000, 10000] and t.x == t.steps and t.x_label == "step"
    for k, path in enumerate(paths):
        alone = wcond.inspect(path)
        for layer in alone.layers:
            assert t.trend[layer.name]["acv_mean"][k] == layer.acv_mean
            assert t.trend[layer.name]["rare_rows"][k] == layer.rare_rows
    # The planted pair is there at step 1000 only, and conv2 is the layer that moved.
    assert t.trend["conv2.weight"]["near_parallel_rows"] == [1, 0, 0]
    assert t.movement("conv2.weight") > t.movement("fc.weight")


def test_cli_json_gates_on_every_checkpoint_and_exit_code_is_the_worst(run_dir: Path) -> None:
    result = run(
        "inspect", run_dir / "step_*.pt", "-f", "json", "--fail-if", "near_parallel_rows>0"
    )
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert [Path(c["checkpoint"]).name for c in doc["checkpoints"]] == [
        "step_1000.pt",
        "step_2000.pt",
        "step_10000.pt",
    ]
    assert [c["step"] for c in doc["checkpoints"]] == doc["steps"] == [1000, 2000, 10000]
    assert [c["gates"][0]["passed"] for c in doc["checkpoints"]] == [False, True, True]
    assert doc["failed"] is True
    assert doc["trend"]["conv2.weight"]["near_parallel_rows"] == [1, 0, 0]
    # Gates that pass on every checkpoint: exit 0.
    ok = run(
        "inspect",
        run_dir / "step_2000.pt",
        run_dir / "step_10000.pt",
        "--fail-if",
        "near_parallel_rows>0",
    )
    assert ok.exit_code == 0, ok.output
    assert "gates: 2 of 2 checkpoints pass" in ok.stdout


def test_cli_table_names_each_checkpoint_and_the_failing_one(run_dir: Path) -> None:
    result = run("inspect", run_dir / "step_*.pt", "--fail-if", "near_parallel_rows>0")
    assert result.exit_code == 1
    out = result.stdout
    assert "3 checkpoints, step 1000 → 10000" in out
    assert out.index("step_1000.pt") < out.index("step_2000.pt") < out.index("step_10000.pt")
    assert "FAIL step_1000.pt: near_parallel_rows>0: conv2.weight (1)" in out
    assert "gates: 2 of 3 checkpoints pass" in out
    # Worst mover first: conv2 (its rare_rows went from ~0 to far from 0).
    layer_rows = [
        line.split()[0] for line in out.splitlines() if line.strip().endswith(tuple("▁▂▃▄▅▆▇█"))
    ]
    assert layer_rows[0] == "conv2.weight"


def test_cli_csv_is_long_format(run_dir: Path) -> None:
    result = run("inspect", run_dir / "step_*.pt", "-f", "csv")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "checkpoint,step,layer,metric,value"
    assert any(",10000,conv2.weight,near_parallel_rows,0" in line for line in lines)


def test_single_checkpoint_keeps_todays_output(pt_file: Path) -> None:
    result = run("inspect", pt_file, "-f", "json")
    doc = json.loads(result.stdout)
    assert "checkpoints" not in doc and doc["checkpoint"] == str(pt_file)
    table = run("inspect", pt_file).stdout
    assert table.startswith("wcond inspect:") and "checkpoints" not in table
    assert "near-parallel pairs: 1 rows, 0 cols" in table  # the one report's summary, as before


def test_html_and_junit_of_a_run_go_to_stdout_too(run_dir: Path) -> None:
    page = run("inspect", run_dir / "step_*.pt", "-f", "html")
    assert page.exit_code == 0 and page.stdout.startswith("<!DOCTYPE html>")
    assert "wcond inspect: 3 checkpoints" in page.stdout and "<svg" in page.stdout
    xml = run("inspect", run_dir / "step_*.pt", "-f", "junit")
    assert xml.exit_code == 0 and xml.stdout.count("<testsuite ") == 3


def test_sparkline() -> None:
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([2.0, None, 2.0]) == "▁ ▁"
    assert sparkline([0.497, 0.49700003, 0.497]) == "▁▁▁"  # float noise is not a trend
    assert len(sparkline(list(map(float, range(100))))) == 24


def test_plot_trend_writes_the_image(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "trend.png"
    result = run("plot", "--trend", run_dir / "step_*.pt", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_layer = tmp_path / "conv.svg"
    assert (
        run(
            "plot", "--trend", run_dir / "step_*.pt", "--layers", "conv*", "-o", per_layer
        ).exit_code
        == 0
    )
    assert "conv2" in per_layer.read_text()
    one = run("plot", "--trend", run_dir / "step_1000.pt", "-o", out)
    assert one.exit_code == 2 and "--trend needs at least two checkpoints" in one.stderr
