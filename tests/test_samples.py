"""The committed sample checkpoints: make_samples.py rebuilds them, and the shrink demo works on its sample.

The demo asserts what the docs claim of `wcond shrink` / `wcond expand` / `wcond inspect` on
sample_checkpoints/redundant_mlp.safetensors, through the same commands the docs show.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import wcond
from wcond.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
# As the docs run it, from the repository root.
DEMO = "sample_checkpoints/redundant_mlp.safetensors"
runner = CliRunner()
WIDE = {"COLUMNS": "100"}  # the width the docs' copy of the output was taken at


def _make_samples(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ among the samples
    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES / "make_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a checkpoint's nested containers, by its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


# Tensors that a rebuild on another CPU or torch build may move by more than rounding: conv1's
# bias sits right before BatchNorm, so its gradient is rounding noise that Adam's normalised
# steps turn into drift (6e-3 measured between two machines), and bn1's running mean follows.
LOOSE = {"/state_dict/model.conv1.bias", "/state_dict/model.bn1.running_mean"}


def test_make_samples_rebuilds_the_committed_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = _make_samples(monkeypatch)
    m.main(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(m.SAMPLES)
    assert sorted(m.SAMPLES) == sorted(
        p.name for p in SAMPLES.iterdir() if p.is_file() and p.suffix != ".py"
    )
    # The safetensors samples come from init and plain Python arithmetic: the same bytes anywhere.
    for name in m.SAFETENSORS_SAMPLES:
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name
    # The pickles go through forward passes and training, whose sums depend on the CPU's kernels
    # (the committed files were written on another machine): the same keys, values and dtypes,
    # tensors equal within rounding.
    for name in ("small_cnn.pt", "lightning_cnn.ckpt"):
        new = dict(_flat(torch.load(tmp_path / name, weights_only=True)))
        old = dict(_flat(torch.load(SAMPLES / name, weights_only=True)))
        assert list(new) == list(old), name
        for key, value in old.items():
            if not isinstance(value, torch.Tensor):
                assert new[key] == value, (name, key)
                continue
            assert new[key].dtype == value.dtype and new[key].shape == value.shape, (name, key)
            atol = 1e-2 if key in LOOSE else 1e-6
            assert torch.allclose(new[key], value, rtol=1e-5, atol=atol), (name, key)


def test_the_demo_sample_is_what_its_docstring_says() -> None:
    sd = load_file(str(SAMPLES.parent / DEMO))
    assert {k: list(v.shape) for k, v in sd.items()} == {
        "fc1.weight": [64, 32],
        "fc1.bias": [64],
        "fc2.weight": [64, 64],
        "fc2.bias": [64],
        "fc3.weight": [10, 64],
        "fc3.bias": [10],
    }
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert 20_000 < (SAMPLES.parent / DEMO).stat().st_size < 40_000  # tens of KB


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch folder laid out as the repository, where the docs' commands run as written."""
    (tmp_path / "sample_checkpoints").mkdir()
    shutil.copy(SAMPLES.parent / DEMO, tmp_path / DEMO)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_inspect_shows_the_planted_near_parallel_pairs(demo: Path) -> None:
    result = runner.invoke(app, ["inspect", DEMO], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "near-parallel pairs: 32 rows, 16 cols" in " ".join(result.stdout.split())  # wrapped
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[4:7]}
    assert rows["fc1.weight"][-2:] == ["16/0", "0"] and rows["fc2.weight"][-2:] == ["16/16", "0"]
    assert rows["fc3.weight"][-2:] == ["0/0", "0"]


def test_shrink_removes_a_third_and_the_file_beats_dense_safetensors(demo: Path) -> None:
    result = runner.invoke(app, ["shrink", DEMO, "-o", "small.safetensors"], env=WIDE)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert " fc1.weight  64x32 → 48x32   16/0  2,048 → 1,536 " in out
    assert " fc2.weight  64x64 → 48x48  16/16  4,096 → 2,304 " in out
    assert "values of every tensor: 6,922 → 4,618 (2,304 removed, 33.29%)" in out
    assert "file bytes: 28,176 → 20,144 (-28.5%)" in out
    assert "note" not in out and result.stderr == ""
    # Smaller than the same tensors written dense as safetensors, not only than the input: the
    # gain is the factorization, not a change of format.
    dense = demo / "same_weights_dense.safetensors"
    save_file(load_file(str(demo / DEMO)), str(dense))
    assert (demo / "small.safetensors").stat().st_size < 0.75 * dense.stat().st_size
    stored = load_file(str(demo / "small.safetensors"))
    assert {"fc1.weight.__wcond_w", "fc2.weight.__wcond_w", "fc3.weight"} <= set(stored)
    assert "fc1.weight" not in stored and "fc2.weight" not in stored


def test_expand_restores_the_sample_within_the_planted_noise(demo: Path) -> None:
    assert runner.invoke(app, ["shrink", DEMO, "-o", "small.safetensors"]).exit_code == 0
    result = runner.invoke(
        app, ["expand", "small.safetensors", "-o", "dense.safetensors"], env=WIDE
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "expanded 2 factorized layers: fc1.weight, fc2.weight",
        "wrote dense.safetensors",
    ]
    before, after = load_file(str(demo / DEMO)), load_file(str(demo / "dense.safetensors"))
    assert list(after) == list(before)
    errors = {k: (after[k] - before[k]).abs().max().item() for k in before}
    # Untouched tensors come back bit-identical; a fused row or column is rebuilt as a multiple
    # of its partner, so it loses the planted noise (relative 1e-3 at most): 1.8e-4 measured,
    # against weights up to 0.31.
    assert errors["fc3.weight"] == 0 and all(errors[f"fc{i}.bias"] == 0 for i in (1, 2, 3))
    assert 0 < errors["fc1.weight"] < 2.5e-4 and 0 < errors["fc2.weight"] < 2.5e-4
    # The same tensors as wcond.load_state_dict gives any model.
    loaded = wcond.load_state_dict(demo / "small.safetensors")
    assert all(torch.equal(loaded[k], after[k]) for k in after)
    # And after expand nothing is left to do.
    again = runner.invoke(app, ["expand", "dense.safetensors", "-o", "again.safetensors"])
    assert "holds no factorized layers" in again.stdout


def test_shrink_json_gives_the_numbers_the_table_shows(demo: Path) -> None:
    result = runner.invoke(app, ["shrink", DEMO, "-o", "small.safetensors", "-f", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["params_before"], doc["params_after"], doc["params_removed"]) == (6922, 4618, 2304)
    assert (doc["file_bytes_before"], doc["file_bytes_after"]) == (28176, 20144)
    assert [(x["name"], x["fused_rows"], x["fused_cols"]) for x in doc["layers"]] == [
        ("fc1.weight", 16, 0),
        ("fc2.weight", 16, 16),
        ("fc3.weight", 0, 0),
    ]
