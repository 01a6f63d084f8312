"""Exceptions raised by the wcond library.

Every message names the file, key or parameter at fault and, where there is one, the fix, in
library words: a parameter is written ``name=value`` as a Python caller passes it. ``params``
lists the parameters so named; the CLI, which knows their flags, rewrites each ``name=`` to its
flag and turns the error into one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class WcondError(Exception):
    """Base class: an input or argument wcond cannot use."""

    def __init__(self, message: str, *, params: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.params = tuple(params)  # parameters the message names as ``name=value``


class CheckpointError(WcondError):
    """A checkpoint that is missing, unreadable, corrupt or holds nothing to analyze."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would construct arbitrary objects; it is refused, never executed."""


class UsageError(WcondError):
    """A bad option value (a malformed gate, an unknown device, an output that would overwrite)."""


class OutputError(WcondError):
    """An output that cannot be written: a full disk, a read-only or vanished directory, a closed stdout."""


class EngineError(WcondError):
    """A task that kept failing on the cluster (the message names its layer); nothing is reported or written."""


def show_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """A path for a message: printable characters as they are, anything else escaped (``\\x1b``, ``\\xff``).

    File names on Linux are bytes; one that is not UTF-8 arrives with surrogate escapes, which
    would crash a UTF-8 terminal, and one with control characters could forge output lines.
    """
    return _escape(os.fsdecode(path))


def show_key(key: str, limit: int = 80) -> str:
    """A tensor key (or any string from a checkpoint) quoted for a message, escaped and shortened."""
    text = _escape(str(key))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"'{text}'"


def _escape(text: str) -> str:
    """wcond.text.visible, with a byte that was not UTF-8 (a surrogate escape) shown as that byte."""
    from wcond.text import visible  # imported here: wcond.text needs rich, errors needs nothing

    if text.isprintable():
        return text
    return "".join(
        f"\\x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else visible(ch) for ch in text
    )
