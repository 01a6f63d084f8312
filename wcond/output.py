"""Output files written atomically, and the image formats plots write.

Everything is written to a temporary file beside the target and renamed over it only once
complete; an error or Ctrl-C removes the temporary file. Torch-free: reports are written without it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wcond.errors import OutputError, UsageError

__all__ = ["IMAGE_SUFFIXES", "atomic_path", "check_plot_output", "write_text"]

IMAGE_SUFFIXES = (".png", ".svg")


def check_plot_output(out: str | Path) -> Path:
    """The output path, if its extension is one we write."""
    out = Path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(
            f"{out}: unknown image format {out.suffix or '(no extension)'!r}; use .png or .svg"
        )
    return out


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` when the block succeeds.

    A missing parent directory is created. Any failure (a full disk, a read-only or vanished
    directory, Ctrl-C, SIGTERM) removes the temporary file; an OSError becomes an
    :class:`OutputError` naming ``target``.
    """
    target = Path(target)
    if target.is_dir():
        raise UsageError(f"{target}: is a directory; give a file name")
    if target.exists() and not target.is_file():
        # A device or a pipe (-o /dev/null, /dev/stdout): write straight to it; renaming a
        # temporary file over it would replace the device itself.
        with _as_output_error(target, partial=True):
            yield target
        return
    with _as_output_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        # The temporary file has the target's own name, in a private directory beside it:
        # torch.save stores the file's name in every record of its zip, so a random name would
        # change the bytes.
        tmp_dir = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".wcond-tmp", dir=target.parent)
        )
    tmp = tmp_dir / target.name
    try:
        with _as_output_error(target):
            tmp.touch()
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _new_file_mode(target))
            os.replace(tmp, target)
    except BaseException:  # Ctrl-C and SIGTERM included: never leave the partial file
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextmanager
def _as_output_error(target: Path, partial: bool = False) -> Iterator[None]:
    """An OSError while writing ``target`` as an OutputError naming it and the system's reason."""
    try:
        yield
    except OSError as e:
        what = os.fsdecode(e.filename) if e.filename is not None else None
        where = (
            f"{target}: cannot write it"
            if what is None or what == str(target) or ".wcond-tmp" in what
            else f"{what}: failed while writing {target}"
        )
        outcome = "it may hold part of the output" if partial else "nothing was written"
        raise OutputError(f"{where} ({e.strerror or e}); {outcome}") from e


def _new_file_mode(target: Path) -> int:
    """The existing file's mode when overwriting, else 0666 less the umask."""
    if target.exists():
        return target.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text(path: str | Path, text: str) -> None:
    """Write a text report atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
