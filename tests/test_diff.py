"""`wcond diff`: pairing by key, B - A for every inspect metric, one-sided layers, shape changes, shrunk files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from wcond.analyze import NUMERIC_FIELDS, inspect
from wcond.cli import app
from wcond.diff import SUMMARY_FIELDS, MetricDiff, diff, rounding_resolution

runner = CliRunner()


def changed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """conv2 loses filters 4..7 (a new shape), fc is scaled, conv1 is gone, head appears."""
    out = {k: v.clone() for k, v in sd.items() if k != "conv1.weight"}
    out["conv2.weight"] = sd["conv2.weight"][:12].contiguous()
    out["fc.weight"] = sd["fc.weight"] * 2
    out["head.weight"] = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    return out


def test_self_diff_is_zero_everywhere(pt_file: Path) -> None:
    d = diff(pt_file, pt_file)
    assert d.only_a == [] and d.only_b == [] and d.shape_changes == []
    assert [x.name for x in d.layers] == ["conv1.weight", "conv2.weight", "fc.weight"]
    for layer in d.layers:
        assert set(layer.metrics) == set(NUMERIC_FIELDS)
        for name, m in layer.metrics.items():
            if m.a is None:  # CS of the matrix: absent on both sides, no change to speak of
                assert m.b is None and m.delta is None and name.startswith("conv_similarity")
            else:
                assert m.a == m.b and m.delta == 0 and m.relative == 0, (layer.name, name, m)
    assert all(m.delta == 0 for m in d.summary.values())


def test_self_diff_cli_json_and_table_show_no_change(pt_file: Path) -> None:
    result = runner.invoke(app, ["diff", str(pt_file), str(pt_file), "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    for layer in doc["layers"]:
        for metric in NUMERIC_FIELDS:
            entry = layer[metric]
            assert set(entry) == {"a", "b", "delta", "relative"}
            assert entry["delta"] in (0, None) and entry["a"] == entry["b"]
    table = runner.invoke(app, ["diff", str(pt_file), str(pt_file)]).stdout
    assert "(0 with a new shape), 0 only in A, 0 only in B" in table and "  new shape" not in table
    rows = [
        line.split() for line in table.splitlines() if line.startswith("   ") and line.strip()
    ]  # metric rows
    assert len(rows) > 40 and all(r[-2:] == ["0", "0%"] for r in rows)


def test_changes_are_b_minus_a_of_inspect(state_dict: dict[str, torch.Tensor]) -> None:
    after = changed(state_dict)
    d = diff(state_dict, after)
    ra, rb = inspect(state_dict), inspect(after)
    assert [x.name for x in d.layers] == ["conv2.weight", "fc.weight"]
    assert d.only_a == ["conv1.weight"] and d.only_b == ["head.weight"]
    assert [x.name for x in d.shape_changes] == ["conv2.weight"]
    conv2 = d.layers[0]
    assert (conv2.shape_a, conv2.shape_b) == ([16, 8, 3, 3], [12, 8, 3, 3])
    for layer in d.layers:
        la = next(r for r in ra.layers if r.name == layer.name)
        lb = next(r for r in rb.layers if r.name == layer.name)
        for metric in NUMERIC_FIELDS:
            a, b, m = getattr(la, metric), getattr(lb, metric), layer.metrics[metric]
            assert (m.a, m.b) == (a, b)
            if a is not None:
                assert m.delta == b - a
                assert m.relative == (
                    pytest.approx((b - a) / abs(a)) if a else (0.0 if b == a else None)
                )
    # the planted anti-parallel pair (rows 1, 4) survives the cut; scaling fc leaves its angles alone
    assert (
        conv2.metrics["near_parallel_rows"].delta == 0
        and conv2.metrics["params"].delta == -4 * 8 * 9
    )
    assert d.layers[1].metrics["acv_mean"].delta == pytest.approx(0, abs=1e-6)
    assert d.layers[1].metrics["norm_loss"].delta != 0
    assert d.summary["layers"].a == 3 and d.summary["layers"].b == 3
    assert set(d.summary) == set(SUMMARY_FIELDS)


def test_metric_diff_edges() -> None:
    assert MetricDiff.of(0, 0) == MetricDiff(0, 0, 0, 0.0)
    assert MetricDiff.of(0, 2) == MetricDiff(0, 2, 2, None)  # no relative change from exactly 0
    assert MetricDiff.of(None, 1.0).delta is None and MetricDiff.of(1.0, None).relative is None
    assert MetricDiff.of(-2.0, -1.0).relative == 0.5
    assert MetricDiff.of(math.nan, 1.0).delta is None


def test_cli_formats_and_output_file(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.safetensors"
    torch.save(state_dict, a)
    save_file(changed(state_dict), b)
    table = runner.invoke(app, ["diff", str(a), str(b)])
    assert table.exit_code == 0, table.output
    out = table.stdout
    assert "new shape" in out and "16x8x3x3" in out and "12x8x3x3" in out
    assert "only in A: conv1.weight" in out and "only in B: head.weight" in out
    md = runner.invoke(app, ["diff", str(a), str(b), "-o", str(tmp_path / "d.md")])
    assert md.exit_code == 0 and "wrote" in md.stderr
    text = (tmp_path / "d.md").read_text()
    assert (
        "**Only in A**: `conv1.weight`" in text and "- `conv2.weight`: 16x8x3x3 → 12x8x3x3" in text
    )
    assert "| `conv2.weight` | shape | 16x8x3x3 | 12x8x3x3 | new shape | |" in text
    doc = json.loads(runner.invoke(app, ["diff", str(a), str(b), "-f", "json"]).stdout)
    conv2 = doc["layers"][0]
    assert conv2["shape_changed"] is True and conv2["params"] == {
        "a": 1152,
        "b": 864,
        "delta": -288,
        "relative": -0.25,
    }
    assert doc["only_a"] == ["conv1.weight"] and doc["only_b"] == ["head.weight"]


def test_bad_input_is_exit_2(tmp_path: Path, pt_file: Path) -> None:
    result = runner.invoke(app, ["diff", str(pt_file), str(tmp_path / "missing.pt")])
    assert result.exit_code == 2 and "missing.pt" in result.stderr
    result = runner.invoke(app, ["diff", str(pt_file), str(pt_file), "--layers", "nothing*"])
    assert result.exit_code == 2 and "no layer matches" in result.stderr


def test_diff_of_a_shrunk_checkpoint(tmp_path: Path) -> None:
    """shrink writes factorized layers; inspect rebuilds them, so diff pairs them with the original key."""
    from wcond.shrink import shrink

    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, generator=g)
    w[7] = 1.5 * w[2]
    w[11] = -0.5 * w[5]
    sd = {
        "fc1.weight": w,
        "fc2.weight": torch.randn(6, 24, generator=g),
        "fc3.weight": torch.randn(5, 6, generator=g),
    }
    src, small = tmp_path / "dense.safetensors", tmp_path / "small.safetensors"
    save_file(sd, src)
    shrink(src, small, axis="rows")
    d = diff(src, small)
    assert d.only_a == [] and d.only_b == []
    fc1 = next(x for x in d.layers if x.name == "fc1.weight")
    assert fc1.shape_a == fc1.shape_b == [24, 40]  # the dense view keeps the original shape
    assert fc1.metrics["near_parallel_rows"].a == 2
    # rebuilding repeats the kept row for each fused one: the pairs are now exactly parallel
    assert fc1.metrics["rare_rows"].b == pytest.approx(0, abs=1e-6)


def test_rounding_level_changes_are_no_change() -> None:
    res = rounding_resolution("float32", "float32")
    assert MetricDiff.of(2.7435998916625977, 2.7435996532440186, res).delta == 0.0  # 1 ulp
    assert MetricDiff.of(2.7436, 2.7437, res).delta == pytest.approx(1e-4)
    assert MetricDiff.of(3, 4, res).delta == 1  # counts are exact
    assert rounding_resolution("float64", "float64") < 1e-14 < res


def test_scaled_layer_keeps_scale_free_metrics_exactly(state_dict: dict[str, torch.Tensor]) -> None:
    after = dict(state_dict)
    after["conv2.weight"] = state_dict["conv2.weight"] * 1.7
    d = diff(state_dict, after, device="cpu")
    layer = next(x for x in d.layers if x.name == "conv2.weight")
    for m in ("acv_sum", "acv_mean", "rare_rows", "rare_cols", "conv_similarity_norm"):
        assert layer.metrics[m].delta == 0, m
    assert layer.metrics["norm_loss"].delta != 0


def test_same_file_is_analyzed_once_and_a_copy_diffs_to_exact_zero(
    pt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wcond.diff as diff_module

    analyzed: list[object] = []
    real = diff_module.inspect_many

    def counting(sources: list[object], **kw: object) -> object:
        analyzed.extend(sources)
        return real(sources, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(diff_module, "inspect_many", counting)
    d = diff(pt_file, str(pt_file), device="cpu")
    assert len(analyzed) == 1 and d.report_a is not d.report_b
    assert all(m.delta in (0, None) for layer in d.layers for m in layer.metrics.values())
    copy = tmp_path / "copy.pt"
    copy.write_bytes(pt_file.read_bytes())
    d = diff(pt_file, copy, device="cpu")  # analyzed twice: the same bytes give the same numbers
    assert len(analyzed) == 3
    assert all(m.delta in (0, None) for layer in d.layers for m in layer.metrics.values())
