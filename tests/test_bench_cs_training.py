"""Smoke run of benchmarks/cs_training.py (issue 23): every arm, two seeds, a tiny network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "cs_training.py"


def test_cs_training_smoke(tmp_path: Path) -> None:
    out = tmp_path / "runs.json"
    args = [
        "--seeds",
        "2",
        "--epochs",
        "2",
        "--early-epoch",
        "1",
        "--width",
        "8",
        "--iterations",
        "20",
    ]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| init-cs − norm-matched" not in proc.stdout  # a sentence, not a table row
    assert "init-cs − norm-matched, paired" in proc.stdout
    doc = json.loads(out.read_text())
    runs = {(r["arm"], r["seed"]): r for r in doc["runs"]}
    assert {arm for arm, _ in runs} == {
        "baseline",
        "init-cs",
        "init-cs-kn",
        "norm-matched",
        "cs-reg",
    }
    for seed in (0, 1):
        base = runs["baseline", seed]["init"]["filter_norm"]
        # keep-norm leaves every filter's norm; norm-matched takes init-cs's norms, not its directions
        assert runs["init-cs-kn", seed]["init"]["filter_norm"] == pytest.approx(base, rel=1e-5)
        cs_norms = runs["init-cs", seed]["init"]["filter_norm"]
        assert runs["norm-matched", seed]["init"]["filter_norm"] == pytest.approx(
            cs_norms, rel=1e-5
        )
        assert runs["norm-matched", seed]["fm_sim_init"][0] == pytest.approx(
            runs["baseline", seed]["fm_sim_init"][0], rel=1e-4
        )  # the first layer's maps are scale-free: same directions, same |cos|
        for arm in ("baseline", "init-cs", "cs-reg"):
            r = runs[arm, seed]
            assert len(r["test_acc"]) == len(r["eval_epochs"]) == 2
            assert all(0 <= a <= 100 for a in r["test_acc"])
            assert len(r["fm_sim_init"]) == len(r["fm_sim_final"]) == 3
    table = subprocess.run(
        [sys.executable, str(SCRIPT), "--compare", f"{out}:baseline", f"{out}:init-cs"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "| init-cs (width 8, digits, bn=True) |" in table
