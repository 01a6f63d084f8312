"""Exceptions raised by the wcond library.

Every message names the file, key or option at fault and, where there is one, the fix.
The CLI turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations


class WcondError(Exception):
    """Base class: an input or argument wcond cannot use."""


class CheckpointError(WcondError):
    """A checkpoint that is missing, unreadable, corrupt or holds nothing to analyze."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would construct arbitrary objects; it is refused, never executed."""


class UsageError(WcondError):
    """A bad option value (a malformed gate, an unknown device, an output that would overwrite)."""


class OutputError(WcondError):
    """An output that cannot be written: a full disk, a read-only or vanished directory, a closed stdout."""
