"""Option and config values out of range: exit 2 before any work, never a traceback or a hang."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from wcond.cli import app
from wcond.config import load_config
from wcond.cosines import cos_matrix
from wcond.errors import UsageError
from wcond.render import plot

runner = CliRunner()


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.randn(4, 3, 3, 3)}, str(path))
    return path


def out(tmp_path: Path, name: str = "out.safetensors") -> str:
    return str(tmp_path / name)


# (command, extra arguments, the option named in the error)
CASES = [
    ("inspect", ["--tau-cos", "nan"], "--tau-cos"),
    ("inspect", ["--tau-cos", "-1e-4"], "--tau-cos"),
    ("inspect", ["--tau-euc", "inf"], "--tau-euc"),
    ("inspect", ["--top", "-1"], "--top"),
    ("inspect", ["--top", "100000000000000000000"], "--top"),
    ("diff", ["--tau-cos", "inf"], "--tau-cos"),
    ("shrink", ["--dry-run", "--tau-euc", "nan"], "--tau-euc"),
    ("init-cs", ["--seed", "18446744073709551616"], "--seed"),
    ("init-cs", ["--seed", "-1"], "--seed"),
    ("init-cs", ["-n", "0"], "--iterations"),
    ("init-cs", ["-n", "-5"], "--iterations"),
    ("init-cs", ["-n", "100000000000000000000"], "--iterations"),
    ("init-cs", ["--lr", "nan"], "--lr"),
    ("init-cs", ["--lr", "inf"], "--lr"),
    ("init-cs", ["--lr", "-0.1"], "--lr"),
    ("plot", ["--width", "60000", "--height", "600"], "--width"),
    ("plot", ["--dpi", "100000"], "--dpi"),
    ("plot", ["--dpi", "0"], "--dpi"),
    ("plot", ["--max-vectors", "1000000"], "--max-vectors"),
]


@pytest.mark.parametrize(("command", "extra", "option"), CASES)
def test_out_of_range_is_exit_2(
    ckpt: Path, tmp_path: Path, command: str, extra: list[str], option: str
) -> None:
    args = [command, str(ckpt)]
    if command == "diff":
        args.append(str(ckpt))
    if command == "init-cs":
        args += ["-o", out(tmp_path)]
    if command == "plot":
        args += ["-o", out(tmp_path, "p.png")]
    result = runner.invoke(app, args + extra)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert option in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_huge_canvas_is_one_line(ckpt: Path, tmp_path: Path) -> None:
    args = ["plot", str(ckpt), "-o", out(tmp_path, "p.png"), "--width", "16000"]
    result = runner.invoke(app, args + ["--height", "16000"])
    assert result.exit_code == 2
    assert result.stderr == (
        "error: --width 16000 --height 16000: 256,000,000 pixels is too large to draw; "
        "at most 40,000,000 (e.g. 8000 x 5000)\n"
    )


def test_a_default_size_at_a_huge_dpi_is_refused_before_reading(tmp_path: Path) -> None:
    missing = tmp_path / "not-read.safetensors"  # never opened: the canvas is refused first
    with pytest.raises(UsageError, match=r"a 8400x7200-pixel image \(dpi 1200\) is too large"):
        plot.check_heatmaps(1, None, dpi=1200)
    with pytest.raises(UsageError, match=r"a 8400x7200-pixel image \(dpi 1200\) is too large"):
        plot.plot_cosines([cos_matrix("w", torch.randn(8, 4))], tmp_path / "p.png", dpi=1200)
    assert not missing.exists() and not (tmp_path / "p.png").exists()
    with pytest.raises(UsageError, match="dpi=5: expected 10 to 1200"):
        plot.check_canvas((500, 500), dpi=5)
    plot.check_canvas((8000, 5000), dpi=100)  # the largest allowed


def test_max_vectors_is_bounded_in_the_library() -> None:
    with pytest.raises(UsageError, match="max_vectors=5000: expected 2 to 4096"):
        cos_matrix("w", torch.randn(8, 4), max_vectors=5000)


# --- [tool.wcond] and --config: every error names the file ------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tool.wcond]\ntau-cos = inf\n", "tau-cos = inf: expected number (finite, >= 0)"),
        ("[tool.wcond]\ntau-euc = nan\n", "tau-euc = nan: expected number (finite, >= 0)"),
        ("[tool.wcond]\ntop = 100000\n", "top = 100000: expected integer (0 to 1000)"),
        ("[tool]\nwcond = 5\n", "tool.wcond = 5: expected a table"),
        ("[tool.wcond]\ntau-cos = [1\n", "not valid TOML"),
    ],
)
def test_config_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        load_config(path)
    assert str(path) in str(e.value) and message in str(e.value)
    with pytest.raises(UsageError, match=str(path)):
        load_config(start=tmp_path)  # found by discovery, the same error


def test_pyproject_whose_tool_is_not_a_table_is_not_a_config(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('tool = "wcond"\n')
    assert load_config(start=tmp_path).path is None


def test_config_that_is_not_a_regular_file(ckpt: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(ckpt), "--config", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == f"error: config file {tmp_path}: not a regular file\n"


def test_help_reflows_the_docstring_and_lists_what_gates_take() -> None:
    """Docstring line breaks do not survive into the help (the terminal wraps again), and the
    help names every metric, its short label, and every operator a gate may use."""
    from typer.testing import CliRunner

    from wcond.cli import app
    from wcond.gates import OPERATORS
    from wcond.report import METRIC_LABELS, NUMERIC_FIELDS

    text = CliRunner().invoke(app, ["inspect", "--help"], env={"COLUMNS": "300"}).stdout
    assert "each file written in the format of its extension, the table still printed" in text
    for metric in NUMERIC_FIELDS:
        label = f" ({METRIC_LABELS[metric]})" if metric in METRIC_LABELS else ""
        assert f"{metric}{label}" in text, metric
    assert f"OP one of {' '.join(OPERATORS)}." in text
    shrink = CliRunner().invoke(app, ["shrink", "--help"], env={"COLUMNS": "300"}).stdout
    assert "Load it with wcond.load_state_dict(OUT), or write it dense with" in shrink
