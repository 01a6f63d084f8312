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
from wcond.checkpoint.names import DCP_METADATA_NAME, INDEX_NAMES, directory_weights, natural_key
from wcond.checkpoint.safetensors_header import read_header
from wcond.errors import CheckpointError, show_path

__all__ = ["check_path", "check_source", "expand_paths", "resolve_source", "run_in_directory"]

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
        CheckpointError: a glob that matches nothing; a directory that is neither one
            checkpoint nor a run (see :func:`run_in_directory`).
    """
    found: list[Path] = []
    for arg in args:
        text = str(arg)
        if not Path(text).exists() and _GLOB_CHARS.search(text):
            matches = glob.glob(text)
            if not matches:
                raise CheckpointError(f"{text}: no file or directory matches this pattern")
            found += [Path(m) for m in matches]
        elif Path(text).is_dir() and (run := run_in_directory(Path(text))) is not None:
            found += run  # a training run's checkpoints side by side: as its glob would give
        else:
            found.append(Path(text))
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=lambda p: natural_key(str(p).lower()))  # step_2000 < step_10000


def run_in_directory(d: Path) -> list[Path] | None:
    """The checkpoints of a directory holding a training run's checkpoints side by side; None when
    the directory is one checkpoint (a single weights file, a shard index, a DCP directory, or
    safetensors shards whose tensor names are disjoint).

    Several torch files without an index are never shards: they are a run. Several safetensors
    files are a run when each holds the same tensor names, and one checkpoint's shards when no
    name is in two of them.

    Raises:
        CheckpointError: safetensors files that share some names but not all, or a header that
            cannot be read.
    """
    if (d / DCP_METADATA_NAME).is_file() or any((d / name).is_file() for name in INDEX_NAMES):
        return None
    st, pt = directory_weights(d)
    if len(pt) > 1 and not st:
        return pt
    if len(st) < 2 or pt:
        return None
    names: list[set[str]] = []
    for f in st:
        check_path(f)
        names.append(set(read_header(f).entries))
    if all(n == names[0] for n in names):
        return st
    if len(set().union(*names)) == sum(len(n) for n in names):
        return None  # shards: each name in one file
    raise CheckpointError(
        f"{show_path(d)}: its {len(st)} safetensors files share some tensor names but not all, so "
        "they are neither the shards of one checkpoint nor a run of checkpoints; pass the run's "
        f"files (a glob such as '{show_path(d)}/*.safetensors' for all of them) or one file"
    )
