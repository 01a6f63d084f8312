"""action.yml: a composite action that parses, and whose wcond step runs here as on a runner."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_checkpoints" / "small_cnn.pt"
EXPR = re.compile(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}")


def _action() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")  # PyYAML: only this parse needs it
    doc = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def test_action_yml_is_a_composite_action_with_the_inputs_ci_needs() -> None:
    doc = _action()
    assert doc["runs"]["using"] == "composite"
    assert {"checkpoints", "fail-if", "config", "outputs", "torch-version"} <= set(doc["inputs"])
    assert doc["inputs"]["checkpoints"]["required"] is True
    steps = doc["runs"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert uses[0].startswith("actions/setup-python@") and uses[-1].startswith(
        "actions/upload-artifact@"
    )
    assert "!cancelled()" in steps[-1]["if"]  # the reports are uploaded when a gate trips too
    install = next(s for s in steps if s.get("id") == "install")["run"]
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    assert 'pip install "${WCOND_ACTION_PATH}' in install
    for step in steps:
        if "run" in step:
            assert step["shell"] == "bash"
            # Inputs reach scripts through env only: an expression in a script is shell injection.
            assert "${{" not in step["run"], step["run"]


def _run_inspect_step(
    tmp_path: Path, **given: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The action's wcond step, its env filled from the inputs' defaults and ``given``, in bash -eo pipefail."""
    doc = _action()
    step = next(s for s in doc["runs"]["steps"] if s.get("id") == "inspect")
    inputs = {k: str(v.get("default", "")) for k, v in doc["inputs"].items()}
    inputs.update(given)
    env = {k: EXPR.sub(lambda m: inputs[m.group(1)], str(v)) for k, v in step["env"].items()}
    shim = tmp_path / "bin" / "wcond"  # `wcond` as pip installs it, from this checkout
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m wcond "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        **env,
        "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "GITHUB_ACTIONS": "true",
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "GITHUB_OUTPUT": str(tmp_path / "output.txt"),
    }
    script = tmp_path / "step.sh"
    script.write_text(step["run"])
    # What GitHub runs for shell: bash.
    cmd = ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True), work


def test_the_wcond_step_runs_with_its_default_inputs(tmp_path: Path) -> None:
    result, work = _run_inspect_step(tmp_path, checkpoints=str(SAMPLE))
    assert result.returncode == 0, result.stderr
    for name in ("report.html", "wcond.xml", "report.json"):
        assert (work / "wcond-report" / name).stat().st_size > 0, name
    assert (tmp_path / "output.txt").read_text() == "exit-code=0\n"
    assert "## wcond inspect" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "conv1.weight" in result.stdout  # the table in the job log


def test_a_tripped_gate_fails_the_step_and_still_writes_the_reports(tmp_path: Path) -> None:
    result, work = _run_inspect_step(
        tmp_path,
        checkpoints=str(SAMPLE),
        **{"fail-if": "near_parallel_rows>0\nacv_mean>2\n", "args": "--exclude fc.*"},
    )
    assert result.returncode == 1, result.stderr
    assert (tmp_path / "output.txt").read_text() == "exit-code=1\n"
    assert "<failure" in (work / "wcond-report" / "wcond.xml").read_text(encoding="utf-8")
    errors = [line for line in result.stdout.splitlines() if line.startswith("::error ")]
    assert len(errors) == 1 and "near_parallel_rows>0" in errors[0]
    assert "fc.weight" not in (work / "wcond-report" / "report.json").read_text()
