"""README.md: every ```python block runs as written, and every block showing a command's output shows it."""

from __future__ import annotations

import difflib
import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(
    r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S
)


# Optional extras a block may use (CI installs them all): a block naming one that is missing here
# is skipped, as the extra's own tests are.
_EXTRAS = ("pandas", "pyarrow", "matplotlib", "tensorboard", "lightning", "ray", "huggingface_hub")


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = [m for m in _EXTRAS if m in code and importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, not installed here")
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_readme_has_python_examples() -> None:
    assert BLOCKS


# --------------------------------------------------------------------------- shown output

_COMMAND_OUTPUT = re.compile(r"```\n\$ (wcond [^\n]*)\n(.*?)```", flags=re.S)
_TRY_IT = re.compile(r"```sh\n[^\n]*&& (wcond [^\n]*)\n```\n.*?```\n(.*?)```", flags=re.S)
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_SECONDS = re.compile(r"\b\d+\.\d s\b")  # wall time, different on every run


def shown_outputs() -> list[tuple[str, str]]:
    """(command, output) for every README block that shows what a command prints, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    pairs = [(m.start(), m.group(1), m.group(2)) for m in _TRY_IT.finditer(text)]
    pairs += [(m.start(), m.group(1), m.group(2)) for m in _COMMAND_OUTPUT.finditer(text)]
    return [(cmd, out) for _, cmd, out in sorted(pairs)]


def _normal(text: str) -> list[str]:
    return [_SECONDS.sub("N s", line.rstrip()) for line in text.strip("\n").splitlines()]


def _same(got: list[str], want: list[str]) -> bool:
    """Equal text outside numbers; numbers equal to the digits the README prints (1e-2 relative).

    A line holding a value at float32 noise level (0 < |x| < 1e-5, e.g. rare_rows of a planted
    copy) differs between CPUs in every digit: there only the text around the numbers must match.
    """
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if _NUMBER.split(g) != _NUMBER.split(w):
            return False
        a, b = [float(x) for x in _NUMBER.findall(g)], [float(y) for y in _NUMBER.findall(w)]
        if any(0 < abs(v) < 1e-5 for v in a + b):
            continue
        if not all(x == pytest.approx(y, rel=1e-2, abs=1e-9) for x, y in zip(a, b)):
            return False
    return True


def test_readme_shows_real_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block showing `$ wcond ...` and its output matches what that command prints today.

    Commands run in order in a scratch copy of sample_checkpoints/ (a later block reads what an
    earlier one wrote), on the CPU, in a 100-column console, in this process (one torch import).
    """
    import torch
    from typer.testing import CliRunner

    from wcond.cli import app

    shown = shown_outputs()
    assert len(shown) >= 5, "the README's output blocks were not found"
    shutil.copytree(ROOT / "sample_checkpoints", tmp_path / "sample_checkpoints")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device auto: the CPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    runner = CliRunner()
    for command, output in shown:
        result = runner.invoke(app, shlex.split(command)[1:], prog_name="wcond")
        got = _normal(result.output)
        want = _normal(output)
        if not _same(got, want):
            delta = "\n".join(difflib.unified_diff(want, got, "README", "now", lineterm=""))
            pytest.fail(f"README output of `{command}` is not what it prints:\n{delta}")
