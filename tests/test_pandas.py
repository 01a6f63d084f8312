"""Report.to_pandas and `wcond inspect -f parquet`: one row per layer, one column per metric, None as NaN."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import wcond
from wcond.analyze import NUMERIC_FIELDS
from wcond.cli import app

pd = pytest.importorskip("pandas")


def test_to_pandas_rows_columns_and_nan(state_dict: dict[str, torch.Tensor]) -> None:
    report = wcond.inspect(state_dict)
    df = report.to_pandas()
    assert (
        list(df.index)
        == [r.name for r in report.layers]
        == [
            "conv1.weight",
            "conv2.weight",
            "fc.weight",
        ]
    )
    assert df.index.name == "layer"
    assert list(df.columns) == ["kind", "shape", "dtype", "groups", *NUMERIC_FIELDS, "notes"]
    assert all(df[m].dtype == "float64" for m in NUMERIC_FIELDS)
    # conv_similarity does not apply to a matrix: None in the report, NaN in the frame.
    assert report.layers[2].conv_similarity is None
    assert math.isnan(df.loc["fc.weight", "conv_similarity"])
    assert df.loc["conv2.weight", "shape"] == "16x8x3x3"
    for r in report.layers:
        for m in NUMERIC_FIELDS:
            v = getattr(r, m)
            if v is not None:
                assert df.loc[r.name, m] == pytest.approx(float(v), rel=0, abs=0)
    assert df.loc["conv2.weight", "near_parallel_rows"] == 1


def test_to_pandas_counts_that_do_not_apply_are_nan() -> None:
    bad = torch.randn(4, 3)
    bad[0, 0] = float("nan")
    df = wcond.inspect({"good.weight": torch.randn(4, 3), "bad.weight": bad}).to_pandas()
    assert math.isnan(df.loc["bad.weight", "near_parallel_rows"])
    assert df.loc["bad.weight", "nonfinite"] == 1
    assert df.loc["good.weight", "near_parallel_rows"] == 0


def test_missing_pandas_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, state_dict: dict[str, torch.Tensor]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(wcond.UsageError, match=r"pip install 'wcond\[pandas\]'"):
        wcond.inspect(state_dict).to_pandas()


def test_cli_parquet_round_trip(tmp_path: Path, pt_file: Path) -> None:
    pytest.importorskip("pyarrow")
    out = tmp_path / "report.parquet"
    result = CliRunner().invoke(app, ["inspect", str(pt_file), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    back = pd.read_parquet(out)
    want = wcond.inspect(pt_file).to_pandas()
    pd.testing.assert_frame_equal(back, want)


def test_cli_parquet_needs_an_output_file(pt_file: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(pt_file), "-f", "parquet"])
    assert result.exit_code == 2
    assert "error: --format parquet writes a binary file: give -o FILE.parquet" in result.output


def test_trend_to_pandas_long_form(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    from wcond.trend import trend

    later = {k: v.clone() for k, v in state_dict.items()}
    later["fc.weight"][3] = later["fc.weight"][0] * 3  # a near-parallel pair appears in fc
    paths = [tmp_path / "step_100.pt", tmp_path / "step_200.pt"]
    torch.save(state_dict, paths[0])
    torch.save(later, paths[1])
    t = trend(paths)
    df = t.to_pandas()
    assert list(df.columns) == ["checkpoint", "step", "x", "path", "layer", "metric", "value"]
    assert len(df) == 2 * 3 * len(NUMERIC_FIELDS)  # checkpoints x layers x metrics
    near = df[(df.layer == "fc.weight") & (df.metric == "near_parallel_rows")]
    assert list(near.step) == [100, 200] and list(near.value) == [0, 1]
    cs_fc = df[(df.layer == "fc.weight") & (df.metric == "conv_similarity")]
    assert cs_fc.value.isna().all()  # does not apply to a matrix
    wide = df.pivot_table("value", "x", ["layer", "metric"])
    assert wide.loc[200, ("conv2.weight", "acv_mean")] == pytest.approx(
        t.reports[1].layers[1].acv_mean, rel=1e-12
    )


def test_cli_parquet_of_several_checkpoints_is_the_long_form(
    tmp_path: Path, state_dict: dict[str, torch.Tensor]
) -> None:
    pytest.importorskip("pyarrow")
    for step in (1, 2):
        torch.save(state_dict, tmp_path / f"step_{step}.pt")
    out = tmp_path / "trend.parquet"
    result = CliRunner().invoke(
        app, ["inspect", str(tmp_path / "step_*.pt"), "-o", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    back = pd.read_parquet(out)
    assert sorted(set(back.step)) == [1, 2] and set(back.layer) == {
        "conv1.weight",
        "conv2.weight",
        "fc.weight",
    }
