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

from wcond.checkpoint import hub
from wcond.checkpoint.names import natural_key
from wcond.errors import CheckpointError, show_path

__all__ = ["check_path", "check_source", "expand_paths", "resolve_source"]

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
