"""Checkpoint paths from the command line, checked before anything heavy is imported.

What a path names (a regular file, a directory, a glob, a Hub id) is known from the filesystem
alone, so a wrong path is reported in a blink, without waiting for torch. The readers in
``wcond.checkpoint.open`` use the same checks.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wcond import hub
from wcond.errors import CheckpointError, UsageError, show_path

__all__ = [
    "IMAGE_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "TORCH_SUFFIXES",
    "check_new_file",
    "check_output",
    "check_path",
    "check_plot_output",
    "check_source",
    "expand_paths",
    "natural_key",
    "output_format",
    "resolve_source",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
IMAGE_SUFFIXES = (".png", ".svg")

_GLOB_CHARS = re.compile(r"[*?\[]")

_SPECIAL_FILES = (
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def check_path(path: str | os.PathLike[str]) -> str:
    """'file' or 'directory'; CheckpointError for anything else, before anything is opened.

    Opening a FIFO for reading blocks until a writer comes, a character device can stream
    forever: only regular files and directories are read. A symlink loop is an error too.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise CheckpointError(f"{show_path(path)}: no such file or directory") from e
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{show_path(path)}: symlink loop") from e
        raise CheckpointError(f"{show_path(path)}: cannot read: {e.strerror}") from e
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    kind = next(
        (name for test, name in _SPECIAL_FILES if test(mode)), "not a regular file or directory"
    )
    raise CheckpointError(
        f"{show_path(path)}: is a {kind}; wcond reads checkpoints from regular files and directories only"
    )


def resolve_source(path: str | os.PathLike[str]) -> Path:
    """The path a checkpoint argument names: itself, or for a missing ``org/name[@rev]`` the Hub
    cache's copy (fetched where downloads are allowed; else a CheckpointError saying how)."""
    p = Path(os.fsdecode(path))  # bytes on Linux: a name need not be UTF-8
    if not os.path.lexists(p) and (repo := hub.parse_repo_id(str(p))) is not None:
        return hub.resolve(repo)
    return p


def check_source(arg: str | os.PathLike[str]) -> None:
    """Refuse a checkpoint argument that can name nothing readable: the check the loader makes first.

    A glob is left to :func:`expand_paths`; a Hub id must be in the Hugging Face cache; anything
    else must be a regular file or a directory.
    """
    text = os.fsdecode(arg)
    if not os.path.lexists(text) and _GLOB_CHARS.search(text):
        return
    check_path(resolve_source(text))


def expand_paths(args: Sequence[str | Path]) -> list[Path]:
    """Checkpoint paths from arguments (a quoted glob such as 'run/step_*.pt' is expanded), in natural order.

    Raises:
        CheckpointError: a glob that matches nothing.
    """
    found: list[Path] = []
    for arg in args:
        text = str(arg)
        if not Path(text).exists() and _GLOB_CHARS.search(text):
            matches = glob.glob(text)
            if not matches:
                raise CheckpointError(f"{text}: no file or directory matches this pattern")
            found += [Path(m) for m in matches]
        else:
            found.append(Path(text))
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=lambda p: natural_key(str(p).lower()))  # step_2000 < step_10000


def natural_key(key: str) -> list[Any]:
    """Sort key comparing digit runs as numbers: 'layers.2' < 'layers.10'."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)
    ]


# --------------------------------------------------------------------------- outputs


def output_format(path: str | Path) -> str:
    """'safetensors' or 'torch' from the output's extension; UsageError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise UsageError(
        f"{path}: unknown output format {suffix or '(no extension)'!r}; use .safetensors, .pt, .pth, .bin or .ckpt"
    )


def check_output(src: str | Path, out: str | Path, force: bool) -> None:
    """Refuse to write over the input, or over an existing file without ``force``."""
    src_p, out_p = Path(src), Path(out)
    if out_p.exists() and (
        src_p.resolve() == out_p.resolve() or _same_file(src_p, out_p) or _inside(out_p, src_p)
    ):
        raise UsageError(
            f"{out}: refusing to write over the input checkpoint; choose another -o path"
        )
    check_new_file(out, force)


def check_new_file(out: str | Path, force: bool) -> str:
    """Refuse a directory, or an existing file without ``force``; the format from the extension."""
    out_p = Path(out)
    if out_p.is_dir():
        raise UsageError(
            f"{out}: is a directory; give a file name such as {out_p / 'model.safetensors'}"
        )
    if out_p.exists() and not force:
        raise UsageError(
            f"{out}: already exists; pass force=True to overwrite it", params=("force",)
        )
    return output_format(out_p)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(out: Path, src: Path) -> bool:
    """An output that is one of a sharded input's files."""
    return src.is_dir() and out.resolve().parent == src.resolve()


def check_plot_output(out: str | Path) -> Path:
    """The output path, if its extension is one we write."""
    out = Path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(
            f"{out}: unknown image format {out.suffix or '(no extension)'!r}; use .png or .svg"
        )
    return out
