"""Which reader a checkpoint file needs, from its first bytes: its name is not trusted."""

from __future__ import annotations

import os
from pathlib import Path

from wcond.checkpoint.base import Checkpoint
from wcond.checkpoint.safetensors_file import SafetensorsCheckpoint
from wcond.checkpoint.torch_file import TorchFileCheckpoint
from wcond.checkpoint.torchscript import TorchScriptCheckpoint
from wcond.errors import CheckpointError, show_path

__all__ = ["FILE_READERS", "file_reader"]

# The formats of a single file, asked in this order. A TorchScript archive is a zip like
# torch.save's: its reader looks at the zip's names first.
FILE_READERS: tuple[type[Checkpoint], ...] = (
    SafetensorsCheckpoint,
    TorchScriptCheckpoint,
    TorchFileCheckpoint,
)


def file_reader(file: Path) -> type[Checkpoint]:
    """The reader for a regular file (already checked), from its first bytes.

    Raises:
        CheckpointError: empty, unreadable, text, or no format wcond reads, in those words.
    """
    try:
        with open(file, "rb") as f:
            head = f.read(512)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"{show_path(file)}: cannot read: {e.strerror}") from e
    if not head:
        raise CheckpointError(f"{show_path(file)}: file is empty")
    for reader in FILE_READERS:
        if reader.probe(file, head, size):
            return reader
    if _looks_like_text(head):
        raise CheckpointError(
            f"{show_path(file)}: looks like a text file, not a checkpoint (expected .safetensors or a torch.save file)"
        )
    raise CheckpointError(
        f"{show_path(file)}: unknown format: neither safetensors nor a torch.save file"
    )


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\n\r\t" for ch in text)
