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
from wcond.shrink import COL_COEF, COL_INDEX, MANIFEST_KEY, ROW_COEF, ROW_INDEX, W_SUFFIX

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


def test_a_few_kilobytes_cannot_ask_for_terabytes(tmp_path: Path) -> None:
    """1x1 W' with 2^20 row and column entries stands for 2^40 values: refused from shapes alone."""
    n = 2**20
    path = _forge(
        tmp_path,
        w=torch.ones(1, 1),
        ri=torch.zeros(n, dtype=torch.int32),
        rc=torch.ones(n),
        ci=torch.zeros(n, dtype=torch.int32),
        cc=torch.ones(n),
    )
    _refused(path, tmp_path, "refused above 2,147,483,648 values")
    with pytest.raises(CheckpointError, match="forged.safetensors"):
        wcond.load_state_dict(path)


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
