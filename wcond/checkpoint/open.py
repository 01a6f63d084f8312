"""Opening any checkpoint: resolve the argument, check the path once, and ask the readers in order.

Nothing here runs code from a pickle: torch files are read with ``weights_only=True``,
which only rebuilds tensors and plain containers and refuses everything else.
Safetensors are read lazily, tensor by tensor, and zip-format torch files are
memory-mapped, so a checkpoint is never held in memory twice.

Inputs are hostile until checked: only regular files and directories are opened (a FIFO would
block forever), safetensors headers and shard indexes are validated before anything they claim is
allocated (wcond.checkpoint.safetensors_file, .index), torch files are checked against their own
zip records before they are mapped (wcond.checkpoint.torch_file), TorchScript archives are read by
a restricted unpickler that never runs their code (wcond.checkpoint.torchscript), and every string
from a file is escaped before it reaches a message.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wcond.checkpoint.base import Checkpoint
from wcond.checkpoint.dcp import DCPCheckpoint
from wcond.checkpoint.names import directory_weights
from wcond.checkpoint.sharded import ShardedCheckpoint
from wcond.checkpoint.sniff import file_reader
from wcond.checkpoint.source import check_path, resolve_source
from wcond.errors import CheckpointError, show_path

__all__ = ["LAYOUT_READERS", "load_checkpoint", "open_checkpoint"]

# Formats known from the path's layout (a directory, an index's name), asked before a file's
# first bytes are read (wcond.checkpoint.sniff).
LAYOUT_READERS: tuple[type[Checkpoint], ...] = (DCPCheckpoint, ShardedCheckpoint)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint file or directory without reading tensor data (safetensors) or with mmap (torch).

    Raises:
        CheckpointError: missing path, unknown or corrupt format, nothing analyzable.
        UnsafeCheckpointError: a pickle that would construct arbitrary objects.
    """
    p = resolve_source(path)  # org/name[@rev]: from the Hugging Face cache (wcond/hub.py)
    is_dir = check_path(p) == "directory"
    for reader in LAYOUT_READERS:
        if reader.probe(p):
            return reader.open(p)
    if is_dir:
        p = _lone_file(p)
    ck = file_reader(p).open(p)
    if not ck.keys():
        raise CheckpointError(f"{show_path(p)}: holds no tensors")
    return ck


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by its stored key (wrappers such as Lightning's ``state_dict`` unwrapped).

    Example:
        >>> sd = wcond.load_checkpoint("model.safetensors")
    """
    ck = open_checkpoint(path)
    return dict(ck.items())


def _lone_file(d: Path) -> Path:
    """The one weights file of a directory that no layout reader claims (checked)."""
    st, pt = directory_weights(d)
    if len(st) + len(pt) == 1:
        check_path((st + pt)[0])
        return (st + pt)[0]
    if not st and not pt:
        raise CheckpointError(
            f"{show_path(d)}: directory holds no checkpoint "
            "(.safetensors, .pt, .pth, .bin, .ckpt, .jit or *.index.json)"
        )
    names = ", ".join(show_path(f.name) for f in (st + pt)[:6])
    raise CheckpointError(
        f"{show_path(d)}: directory holds several checkpoints ({names}); name one file, "
        "or several files (or a glob) for their trend"
    )
