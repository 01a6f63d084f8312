"""Exit codes are a contract: 0 clean, 1 a gate tripped, 2 anything else, in one line on stderr.

Whatever a reader raises, even an exception that derives from BaseException as
torch.distributed's CheckpointException does, or a dependency's sys.exit(), every command ends
in one line and exit 2, never a traceback and never exit 1. The same for --model factories that
cannot be built.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wcond.checkpoint import open as open_module
from wcond.cli import app

runner = CliRunner()


class ForeignBaseException(BaseException):
    """Like torch.distributed.checkpoint's CheckpointException: not an Exception."""


def one_line(stderr: str) -> str:
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for f in (a, b):
        torch.save({"conv.weight": torch.randn(8, 4, 3, 3), "fc.weight": torch.randn(6, 8)}, f)
    return a, b


def commands(a: Path, b: Path, out: Path) -> dict[str, list[str]]:
    return {
        "inspect": ["inspect", str(a)],
        "inspect (several)": ["inspect", str(a), str(b)],
        "diff": ["diff", str(a), str(b)],
        "plot": ["plot", str(a), "-o", str(out / "p.png")],
        "init-cs": ["init-cs", str(a), "-o", str(out / "i.pt"), "--iterations", "1"],
        "shrink": ["shrink", str(a), "-o", str(out / "s.pt")],
        "expand": ["expand", str(a), "-o", str(out / "e.pt")],
        "fold": ["shrink", str(a), "--fold", "--chain", "fc.weight,conv.weight", "--dry-run"],
    }


@pytest.mark.parametrize(
    "raised",
    [
        ForeignBaseException("storage 3 of shard __0_0.distcp\nis corrupt\n(a long second line)"),
        SystemExit(1),
        SystemExit("a dependency gave up"),
    ],
    ids=["BaseException", "SystemExit(1)", "SystemExit(str)"],
)
def test_every_command_ends_in_exit_2_whatever_a_reader_raises(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: BaseException
) -> None:
    def reader(path: Path) -> None:
        raise raised

    monkeypatch.setattr(open_module, "file_reader", reader)
    out = tmp_path / "out"
    for name, args in commands(*files, out).items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        line = one_line(result.stderr)
        assert line.startswith("error: ") and type(raised).__name__ in line, (name, line)
        assert "WCOND_DEBUG=1" in line, (name, line)
        assert not out.exists() or not any(out.iterdir()), name  # nothing written


def test_the_message_of_a_foreign_exception_is_one_escaped_line(
    files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def reader(path: Path) -> None:
        raise ForeignBaseException("\x1b[31mforged\nsecond line")

    monkeypatch.setattr(open_module, "file_reader", reader)
    line = one_line(runner.invoke(app, ["inspect", str(files[0])]).stderr)
    assert "ForeignBaseException: \\x1b[31mforged raised inside a library wcond uses" in line
    assert "second line" not in line
    monkeypatch.setenv("WCOND_DEBUG", "1")  # the traceback, for a bug report
    with pytest.raises(ForeignBaseException):
        runner.invoke(app, ["inspect", str(files[0])])


def test_a_gate_is_still_exit_1(files: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["inspect", str(files[0]), "--fail-if", "acv_mean>=0"])
    assert result.exit_code == 1, result.output


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "def make(width):\n    return nn.Linear(8, width)\n",
            "a factory is called with no arguments, and this one needs some",
        ),
        (
            "def make():\n    raise RuntimeError('no GPU here\\nline two')\n",
            "calling it raised RuntimeError: no GPU here",
        ),
        ("def make():\n    return {'weight': 1}\n", "returned a dict, not a torch.nn.Module"),
        (
            "raise ValueError('config missing')\ndef make():\n    return nn.Linear(8, 3)\n",
            "importing {}.nets raised ValueError: config missing",
        ),
        ("make = 3\n", "has no factory 'make'"),
    ],
    ids=["needs-arguments", "raises", "not-a-module", "import-raises", "not-callable"],
)
def test_a_model_factory_that_cannot_be_built_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    package = f"badmodels_{tmp_path.name.replace('-', '_')}"  # not the name other tests import
    pkg = tmp_path / package
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("from torch import nn\n" + textwrap.dedent(source))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    importlib.invalidate_caches()
    src = tmp_path / "in.pt"
    torch.save(torch.nn.Linear(8, 3).state_dict(), src)
    spec = f"{package}.nets:make"
    try:
        result = runner.invoke(app, ["shrink", str(src), "--fold", "--model", spec, "--dry-run"])
    finally:
        for name in [m for m in sys.modules if m.startswith(package)]:
            del sys.modules[name]
    assert result.exit_code == 2, result.output
    line = one_line(result.stderr)
    assert line.startswith(f"error: --model '{spec}': ") and message.format(package) in line, line
    assert "internal error" not in line
