"""Faults while writing: a full disk, an unwritable or vanished directory, a closed stdout, SIGTERM.

Each ends with one line on stderr and exit 2 (130 for Ctrl-C), and leaves no partial output and
no temporary file behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import wcond.checkpoint.write
import wcond.output
from wcond.cli import app

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(stderr: str) -> str:
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    src = tmp_path / "in" / "model.safetensors"
    src.parent.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"conv.weight": torch.randn(8, 4, 3, 3, generator=g)}, str(src))
    return src


def _enospc_after_half(self: Path, data: str, *args: object, **kwargs: object) -> int:
    """Path.write_text that writes half its text, then finds the disk full."""
    with open(self, "w", encoding="utf-8") as f:
        f.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_on_output_file(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.setattr(Path, "write_text", _enospc_after_half)
    result = run("inspect", ckpt, "-f", "json", "-o", out_dir / "report.json")
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert str(out_dir / "report.json") in line and "No space left on device" in line
    assert list(out_dir.iterdir()) == []  # neither the report nor a temporary file


def test_full_disk_while_saving_a_checkpoint(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    def half_then_full(tensors: object, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(wcond.checkpoint.write, "save_file", half_then_full)
    out = tmp_path / "cs.safetensors"
    result = run("init-cs", ckpt, "-o", out, "-n", 1, "--device", "cpu")
    assert result.exit_code == 2
    assert "No space left on device" in one_error_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_output_directory_vanishes_while_writing(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    out_dir = tmp_path / "out"
    real_write_text = Path.write_text

    def write_then_vanish(self: Path, *args: object, **kwargs: object) -> int:
        n = real_write_text(self, *args, **kwargs)  # type: ignore[arg-type]
        shutil.rmtree(out_dir)
        return n

    monkeypatch.setattr(Path, "write_text", write_then_vanish)
    result = run("inspect", ckpt, "-o", out_dir / "report.md")
    assert result.exit_code == 2
    assert "nothing was written" in one_error_line(result.stderr)
    assert not out_dir.exists()


def test_unwritable_directory(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    # Real permissions do not stop root; the refusal the OS would give is simulated here and
    # exercised for real in test_read_only_directory_for_real and test_proc.
    def refused(*args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    monkeypatch.setattr(wcond.output.tempfile, "mkdtemp", refused)
    result = run("inspect", ckpt, "-o", tmp_path / "report.csv")
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "Permission denied" in line and "report.csv" in line
    assert not (tmp_path / "report.csv").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_directory_for_real(ckpt: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = run("inspect", ckpt, "-o", ro / "report.json")
    finally:
        ro.chmod(0o755)
    assert result.exit_code == 2
    assert "Permission denied" in one_error_line(result.stderr)
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("target", ["/proc/wcond-report.json", "/proc/self/no/such/report.md"])
def test_proc(ckpt: Path, target: str) -> None:
    result = run("inspect", ckpt, "-o", target)
    assert result.exit_code == 2
    assert "nothing was written" in one_error_line(result.stderr)


def test_missing_parent_directories_are_created(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "nightly" / "report.json"
    result = run("inspect", ckpt, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["report.json"]


def test_full_device_given_as_output(ckpt: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    result = run("inspect", ckpt, "-f", "json", "-o", "/dev/full")
    assert result.exit_code == 2
    assert "/dev/full: cannot write it (No space left on device)" in one_error_line(result.stderr)


# --- in a real process: stdout on a full disk, SIGTERM and Ctrl-C ------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("fmt", ["json", "table"])
def test_full_disk_on_stdout(ckpt: Path, fmt: str) -> None:
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "wcond", "inspect", str(ckpt), "-f", fmt],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == (
        "error: cannot write to standard output: No space left on device"
    )


# Runs init-cs and, when it reaches ``phase``, says "ready" on stderr and waits to be signalled.
_DRIVER = textwrap.dedent(
    """
    import sys, time
    import torch, wcond.checkpoint.write
    from wcond.cli import app

    phase = sys.argv[1]

    def wait_here():
        print("ready", file=sys.stderr, flush=True)
        time.sleep(60)

    if phase == "optimizing":
        torch.optim.Adam.step = lambda self, *a, **k: wait_here()
    else:  # saving: the temporary file is half written
        def half_written(tensors, path, metadata=None):
            open(path, "wb").write(b"partial")
            wait_here()
        wcond.checkpoint.write.save_file = half_written
    app(sys.argv[2:], prog_name="wcond")
    """
)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize(
    ("phase", "sig", "code", "message"),
    [
        ("optimizing", signal.SIGTERM, 2, "terminated (SIGTERM); nothing was written"),
        ("saving", signal.SIGTERM, 2, "terminated (SIGTERM); nothing was written"),
    ],
)
def test_signal_leaves_no_temporary_file(
    ckpt: Path, tmp_path: Path, phase: str, sig: int, code: int, message: str
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["init-cs", str(ckpt), "-o", str(out_dir / "cs.safetensors"), "-n", "5"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, phase, *args, "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline() == "ready\n"
        if phase == "saving":
            assert [p.suffix for p in out_dir.iterdir()] == [".wcond-tmp"]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert one_error_line(err) == message
    assert list(out_dir.iterdir()) == []


def test_sigterm_handler_is_restored_after_a_command(ckpt: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    assert run("inspect", ckpt, "-f", "json").exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_bug_met_on_some_input_is_one_line_not_a_traceback(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last resort: an exception no check names still ends as one line and exit 2."""
    import wcond.analyze

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("\x1b[31mforged")

    monkeypatch.setattr(wcond.analyze, "analyze_tensor", broken)
    result = run("inspect", ckpt)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert line.startswith("error: internal error: ZeroDivisionError: \\x1b[31mforged")
    assert "WCOND_DEBUG=1" in line
    monkeypatch.setenv("WCOND_DEBUG", "1")
    assert isinstance(run("inspect", ckpt).exception, ZeroDivisionError)


def test_a_reader_that_goes_away_ends_the_run_quietly(ckpt: Path) -> None:
    """`wcond inspect x | head`: no error line for a closed pipe, and the shell's SIGPIPE code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "wcond", "inspect", str(ckpt), "-f", "json", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before wcond writes anything: its first write meets EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""
