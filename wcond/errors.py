"""Exceptions raised by the wcond library.

Every message names the file, key or parameter at fault and, where there is one, the fix, in
library words: a parameter is written ``name=value`` as a Python caller passes it. ``params``
lists the parameters so named; the CLI, which knows their flags, rewrites each ``name=`` to its
flag and turns the error into one line on stderr and exit code 2.
"""

from __future__ import annotations

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


class EngineError(WcondError):
    """A task that kept failing on the cluster (the message names its layer); nothing is reported or written."""
