"""The help path is light: --help, --version, COMMAND --help and usage errors import neither torch nor numpy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
import json, sys
from wcond.cli import app
try:
    app(args=sys.argv[1:], prog_name="wcond")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "numpy", "pydantic") if m in sys.modules)
print("\\n" + json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["inspect", "--help"],
        ["diff", "--help"],
        ["init-cs", "--help"],
        ["shrink", "--help"],
        ["expand", "--help"],
        ["plot", "--help"],
        ["inspect"],  # missing argument: a usage error
        ["inspect", "x.pt", "--format", "yaml"],  # a bad choice
        ["nosuchcommand"],
    ],
)
def test_help_and_usage_errors_import_no_torch(args: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["code"] in (0, 2)
    assert result["heavy"] == [], f"wcond {' '.join(args)} imported {result['heavy']}"


def test_import_wcond_is_light_until_a_heavy_name_is_used() -> None:
    probe = (
        "import sys, wcond; light = 'torch' not in sys.modules; wcond.inspect; "
        "print(light, 'torch' in sys.modules, callable(wcond.shrink.shrink))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"]


def test_the_cli_needs_no_click_where_typer_does_not() -> None:
    """typer 0.26 and later vendor click: a plain install has no `click`, and wcond must not ask."""
    import importlib.util

    if importlib.util.find_spec("typer._click") is None:
        pytest.skip("this typer still depends on click")
    probe = "import sys; sys.modules['click'] = None\n" + _PROBE
    for args in (["--help"], ["inspect"], ["inspect", "no/such/file.pt"]):
        run = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
        assert "Traceback" not in run.stderr, run.stderr
        assert json.loads(run.stdout.strip().splitlines()[-1])["code"] in (0, 2)


@pytest.mark.parametrize(
    "args, says",
    [
        (["inspect", "no/such.pt"], "no/such.pt: no such file or directory"),
        (["inspect", "org/not-cached"], "not in the Hugging Face cache"),
        (["inspect", "a.pt", "--fail-if", "bogus"], "--fail-if 'bogus'"),
        (["inspect", "a.pt", "-f", "parquet"], "give -o FILE.parquet"),
        (["inspect", "a.pt", "--groups", "x"], "--groups 'x'"),
        (["inspect", "a.pt", "-o", "r.md", "-o", "r.bin"], "r.bin: no report format for '.bin'"),
        (["inspect", "a.pt", "-o", "r.yaml"], "r.yaml: no report format for '.yaml'"),
        (["inspect", "a.pt", "-o", "r.md", "-o", "./r.md"], "r.md: given twice to -o"),
        (
            ["inspect", "a.pt", "-f", "json", "-o", "r.json", "-o", "r.md"],
            "--format goes with one -o",
        ),
        (["diff", "a.pt", "b.pt", "-o", "d.md", "-o", "d.html"], "no report format for '.html'"),
        (["diff", "a.pt", "b.pt", "-o", "d.yaml"], "d.yaml: no report format for '.yaml'"),
        (["diff", "a.pt", "no/such.pt"], "no/such.pt: no such file or directory"),
        (["shrink", "a.pt"], "-o OUT is required"),
        (["shrink", "a.pt", "-o", "c.pt", "--chain", "x"], "--chain goes with --fold"),
        (["shrink", "a.pt", "-o", "b.pt"], "b.pt: already exists; pass --force"),
        (["init-cs", "a.pt", "-o", "b.pt"], "b.pt: already exists; pass --force"),
        (["init-cs", "a.pt", "-o", "c.pt", "--history", "h.yaml"], "give a .json file"),
        (["expand", "a.pt", "-o", "c.txt"], "unknown output format '.txt'"),
        (["plot", "a.pt", "-o", "c.gif"], "unknown image format '.gif'"),
    ],
)
def test_usage_errors_met_in_a_command_import_no_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], says: str
) -> None:
    """Checks that need only the arguments and the filesystem run before torch is imported."""
    for name in ("a.pt", "b.pt"):
        (tmp_path / name).write_bytes(b"not read")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, cwd=tmp_path
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["code"] == 2 and says in run.stderr, run.stderr
    assert result["heavy"] == [], f"wcond {' '.join(args)} imported {result['heavy']}"
