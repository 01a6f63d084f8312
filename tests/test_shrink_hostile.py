"""Forged factorized (shrunk) files: `inspect` and `expand` refuse them alike, naming the file, before allocating."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import wcond
from wcond.cli import app
from wcond.errors import CheckpointError
from wcond.shrink import (
    COL_COEF,
    COL_FUSED,
    COL_INDEX,
    COL_SCALE,
    MANIFEST_KEY,
    ROW_COEF,
    ROW_FUSED,
    ROW_INDEX,
    ROW_SCALE,
    W_SUFFIX,
)

runner = CliRunner()
K = "fc.weight"


def _good() -> dict[str, torch.Tensor]:
    """fc.weight (6, 4) stored as 4 rows: rows 4, 5 rebuilt from rows 0, 1."""
    g = torch.Generator().manual_seed(0)
    return {
        K + W_SUFFIX: torch.randn(4, 4, generator=g),
        K + ROW_INDEX: torch.tensor([0, 1, 2, 3, 0, 1], dtype=torch.int32),
        K + ROW_COEF: torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, -0.5]),
        "fc.bias": torch.zeros(6),
        "out.weight": torch.randn(3, 6, generator=g),
    }


def _forge(tmp_path: Path, **changes: torch.Tensor | None) -> Path:
    sd = _good()
    for suffix, t in changes.items():
        key = (
            K
            + {"w": W_SUFFIX, "ri": ROW_INDEX, "rc": ROW_COEF, "ci": COL_INDEX, "cc": COL_COEF}[
                suffix
            ]
        )
        if t is None:
            del sd[key]
        else:
            sd[key] = t
    path = tmp_path / "forged.safetensors"
    save_file(sd, str(path))
    return path


def _refused(path: Path, tmp_path: Path, message: str) -> None:
    before = path.read_bytes()
    for argv in (["inspect", str(path)], ["expand", str(path), "-o", str(tmp_path / "d.pt")]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], lines
        assert "Traceback" not in result.output
    assert not (tmp_path / "d.pt").exists() and path.read_bytes() == before


def test_the_good_file_reads(tmp_path: Path) -> None:
    path = _forge(tmp_path)
    dense = wcond.load_state_dict(path)
    assert dense[K].shape == (6, 4)
    torch.testing.assert_close(dense[K][5], -0.5 * _good()[K + W_SUFFIX][1])
    assert runner.invoke(app, ["inspect", str(path)]).exit_code == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"ri": torch.tensor([0, 1, 2, 3, 0, 4], dtype=torch.int32)},
            "points outside the 4 stored",
        ),
        (
            {"ri": torch.tensor([0, 1, 2, 3, 0, -1], dtype=torch.int32)},
            "points outside the 4 stored",
        ),
        (
            {"ri": torch.tensor([0, 1, 2, 3, 0, 2**31 - 1], dtype=torch.int32)},
            "points outside the 4 stored",
        ),
        (  # index and coefficients of different lengths
            {"ri": torch.tensor([0, 1, 2, 3, 0], dtype=torch.int32)},
            "must be an integer and a float vector of the same length",
        ),
        (  # fewer original rows than stored ones
            {"ri": torch.tensor([0, 1, 2], dtype=torch.int32), "rc": torch.ones(3)},
            "has 3 entries for the 4 stored rows",
        ),
        ({"ri": torch.ones(6, dtype=torch.bool)}, "must be an integer and a float vector"),
        ({"ri": torch.zeros(6, 1, dtype=torch.int32)}, "must be an integer and a float vector"),
        ({"rc": torch.ones(6, dtype=torch.int32)}, "must be an integer and a float vector"),
        ({"rc": None}, "has no 'fc.weight.__wcond_row_coef' beside it"),
        ({"w": torch.zeros(4)}, "a factorized weight has at least 2 dims"),
    ],
    ids=[
        "too-large",
        "negative",
        "int32-max",
        "lengths-differ",
        "shorter-than-stored",
        "bool-index",
        "2d-index",
        "int-coef",
        "missing-coef",
        "1d-w",
    ],
)
def test_forged_factors_are_refused(tmp_path: Path, changes: dict, message: str) -> None:
    _refused(_forge(tmp_path, **changes), tmp_path, message)


def test_a_manifest_that_disagrees_never_drives_an_allocation(tmp_path: Path) -> None:
    sd = _good()
    path = tmp_path / "lying.safetensors"
    lie = {"layers": {K: {"shape": [2**40, 2**40], "stored_shape": [1, 1]}}, "format": 1}
    save_file(sd, str(path), metadata={MANIFEST_KEY: json.dumps(lie)})
    report = wcond.inspect(path)
    (fc,) = [r for r in report.layers if r.name == K]
    assert fc.shape == [6, 4] and fc.factorized == {"params_stored": 16, "params_dense": 24}
    out = tmp_path / "dense.safetensors"
    result = runner.invoke(app, ["expand", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert wcond.load_checkpoint(out)[K].shape == (6, 4)
    bad = tmp_path / "garbage.safetensors"  # a manifest that is not even JSON is ignored too
    save_file(sd, str(bad), metadata={MANIFEST_KEY: "{not json"})
    assert wcond.load_state_dict(bad)[K].shape == (6, 4)


# --------------------------------------------------------------------------- format 2

_SUFFIXES = {
    "w": W_SUFFIX,
    "rf": ROW_FUSED,
    "rs": ROW_SCALE,
    "cf": COL_FUSED,
    "cs": COL_SCALE,
    "ri": ROW_INDEX,
    "rc": ROW_COEF,
}


def _good2() -> dict[str, torch.Tensor]:
    """fc.weight (6, 5) stored as 4 x 4: originals 1 and 4 are 2 x stored row 0 and -0.5 x stored
    row 2, the others stored rows 0 to 3 in order; original column 3 is 3 x stored column 1."""
    g = torch.Generator().manual_seed(1)
    return {
        K + W_SUFFIX: torch.randn(4, 4, generator=g),
        K + ROW_FUSED: torch.tensor([[1, 0], [4, 2]], dtype=torch.int32),
        K + ROW_SCALE: torch.tensor([2.0, -0.5]),
        K + COL_FUSED: torch.tensor([[3, 1]], dtype=torch.int32),
        K + COL_SCALE: torch.tensor([3.0]),
        "fc.bias": torch.zeros(6),
        "out.weight": torch.randn(3, 6, generator=g),
    }


def _forge2(tmp_path: Path, **changes: torch.Tensor | None) -> Path:
    sd = _good2()
    for suffix, t in changes.items():
        if suffix == "dense":
            sd[K] = t  # type: ignore[assignment]
        elif t is None:
            del sd[K + _SUFFIXES[suffix]]
        else:
            sd[K + _SUFFIXES[suffix]] = t
    path = tmp_path / "forged.safetensors"
    save_file(sd, str(path))
    return path


def test_the_good_format_2_file_reads(tmp_path: Path) -> None:
    path = _forge2(tmp_path)
    wp = _good2()[K + W_SUFFIX]
    rows = [(0, 1.0), (0, 2.0), (1, 1.0), (2, 1.0), (2, -0.5), (3, 1.0)]  # (stored row, scale)
    cols = [(0, 1.0), (1, 1.0), (2, 1.0), (1, 3.0), (3, 1.0)]
    want = torch.tensor([[a * b * float(wp[i, j]) for j, b in cols] for i, a in rows])
    torch.testing.assert_close(wcond.load_state_dict(path)[K], want)
    assert runner.invoke(app, ["inspect", str(path)]).exit_code == 0


def _i32(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rs": None}, "'fc.weight.__wcond_row_fused' has no 'fc.weight.__wcond_row_scale' beside"),
        ({"rf": None}, "'fc.weight.__wcond_row_scale' has no 'fc.weight.__wcond_row_fused' beside"),
        ({"w": None}, "has no 'fc.weight.__wcond_w' beside it"),
        ({"dense": torch.zeros(6, 5)}, "'fc.weight' is stored both dense and factorized"),
        (
            {"ri": torch.arange(6, dtype=torch.int32), "rc": torch.ones(6)},
            "gives its rows both as 'fc.weight.__wcond_row_index' (format 1) and as "
            "'fc.weight.__wcond_row_fused'",
        ),
        ({"rf": torch.tensor([1, 4], dtype=torch.int32)}, "must be an (F, 2) integer tensor"),
        ({"rf": torch.zeros(2, 3, dtype=torch.int32)}, "must be an (F, 2) integer tensor"),
        (
            {"rf": torch.zeros(2, 2)},
            "integer tensor and a float vector of length F (got [2, 2] float32",
        ),
        ({"rf": torch.zeros(2, 2, dtype=torch.bool)}, "must be an (F, 2) integer tensor"),
        ({"rs": torch.ones(2, dtype=torch.int32)}, "and a float vector of length F"),
        ({"rs": torch.ones(2, 1)}, "and a float vector of length F"),
        (
            {"rs": torch.ones(3)},
            "and a float vector of length F (got [2, 2] int32 and [3] float32)",
        ),
        (
            {"rf": _i32([1, 0], [-1, 2])},
            "'fc.weight.__wcond_row_fused' has original indices -1 to 1; they must lie in 0 to 5",
        ),
        (
            {"rf": _i32([1, 0], [6, 2])},
            "'fc.weight.__wcond_row_fused' has original indices 1 to 6; they must lie in 0 to 5",
        ),
        (
            {"rf": _i32([4, 0], [4, 2])},
            "'fc.weight.__wcond_row_fused' lists original row/column 4 more than once",
        ),
        (
            {"rf": _i32([1, -1], [4, 2])},
            "'fc.weight.__wcond_row_fused' has stored indices -1 to 2; they must lie in 0 to 3",
        ),
        (
            {"rf": _i32([1, 0], [4, 4])},
            "'fc.weight.__wcond_row_fused' has stored indices 0 to 4; they must lie in 0 to 3",
        ),
        (
            {"rf": _i32([1, 0], [4, 2**31 - 1])},
            "has stored indices 0 to 2147483647; they must lie in 0 to 3",
        ),
        (
            {"cf": _i32([3, 4])},
            "'fc.weight.__wcond_col_fused' has stored indices 4 to 4; they must lie in 0 to 3",
        ),
        (
            {"cf": _i32([5, 1])},
            "'fc.weight.__wcond_col_fused' has original indices 5 to 5; they must lie in 0 to 4",
        ),
    ],
    ids=[
        "missing-scale",
        "missing-fused",
        "missing-w",
        "dense-and-factorized",
        "both-forms",
        "1d-fused",
        "fused-3-wide",
        "float-fused",
        "bool-fused",
        "int-scale",
        "2d-scale",
        "lengths-differ",
        "negative-original",
        "original-past-the-end",
        "original-twice",
        "negative-stored",
        "stored-past-the-end",
        "stored-int32-max",
        "col-stored-past-the-end",
        "col-original-past-the-end",
    ],
)
def test_forged_format_2_factors_are_refused(tmp_path: Path, changes: dict, message: str) -> None:
    _refused(_forge2(tmp_path, **changes), tmp_path, message)


def _huge(form: int) -> dict[str, torch.Tensor]:
    """A 1x1 W' whose row and column entries stand for more than 2^31 values, in format 1 or 2.

    Format 1: 2^20 entries an axis, 2^40 values. Format 2: 2^16 fused rows and columns,
    (2^16 + 1)^2 values, every entry a duplicate, which is only seen once values are read.
    """
    n = 2**20 if form == 1 else 2**16
    index = torch.zeros(n, dtype=torch.int32) if form == 1 else torch.zeros(n, 2, dtype=torch.int32)
    names = ("ri", "rc", "ci", "cc") if form == 1 else ("rf", "rs", "cf", "cs")
    return dict(
        zip(names, (index, torch.ones(n), index.clone(), torch.ones(n))), w=torch.ones(1, 1)
    )


@pytest.mark.parametrize("form", [1, 2])
def test_a_few_kilobytes_cannot_ask_for_terabytes(tmp_path: Path, form: int) -> None:
    """Refused from the shapes alone, before any value is read."""
    path = (_forge if form == 1 else _forge2)(tmp_path, **_huge(form))
    _refused(path, tmp_path, "refused above 2,147,483,648 values")
    with pytest.raises(CheckpointError, match="forged.safetensors"):
        wcond.load_state_dict(path)
