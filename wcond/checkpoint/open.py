"""Reading checkpoints: torch.save files, safetensors, and sharded Hugging Face layouts.

Nothing here runs code from a pickle: torch files are read with ``weights_only=True``,
which only rebuilds tensors and plain containers and refuses everything else.
Safetensors are read lazily, tensor by tensor, and zip-format torch files are
memory-mapped, so a checkpoint is never held in memory twice.

Inputs are hostile until checked: only regular files and directories are opened (a FIFO would
block forever), safetensors headers and shard indexes are validated before anything they claim is
allocated (wcond.checkpoint.safetensors_file), torch files are checked against their own zip records before
they are mapped (wcond.checkpoint.torch_file), and every string from a file is escaped before it reaches a message.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path

import torch

from wcond import hub
from wcond.checkpoint.base import (  # re-exported: wcond.checkpoint.open is where readers look for them
    Checkpoint,
    TensorInfo,
    tensor_info,
)
from wcond.checkpoint.source import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, check_path, resolve_source
from wcond.errors import CheckpointError, show_key, show_path

__all__ = ["Checkpoint", "TensorInfo", "load_checkpoint", "open_checkpoint", "tensor_info"]

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# A shard index is a few MB even for the largest models; its JSON is at most this deep.
MAX_INDEX_BYTES = 64_000_000
MAX_INDEX_DEPTH = 8


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint file or directory without reading tensor data (safetensors) or with mmap (torch).

    Raises:
        CheckpointError: missing path, unknown or corrupt format, nothing analyzable.
        UnsafeCheckpointError: a pickle that would construct arbitrary objects.
    """
    p = resolve_source(path)  # org/name[@rev]: from the Hugging Face cache (wcond/hub.py)
    if check_path(p) == "directory":
        if (p / ".metadata").is_file():
            from wcond.checkpoint.dcp import (
                open_dcp,  # torch.distributed.checkpoint, only when needed
            )

            return open_dcp(p)
        return _open_directory(p)
    if p.name.endswith(".index.json"):
        return _open_index(p)
    kind = sniff(p)
    if kind == "safetensors":
        ck = Checkpoint(p, "safetensors", [p])
        ck._add_safetensors(p)
    else:
        ck = Checkpoint(p, "torch", [p])
        ck._add_torch(p, keep_object=True)
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


def sniff(file: Path) -> str:
    """'torch' or 'safetensors' from the file's first bytes; CheckpointError for anything else."""
    if check_path(file) != "file":
        raise CheckpointError(f"{show_path(file)}: is a directory, expected a checkpoint file")
    try:
        with open(file, "rb") as f:
            head = f.read(512)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"{show_path(file)}: cannot read: {e.strerror}") from e
    if not head:
        raise CheckpointError(f"{show_path(file)}: file is empty")
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch"  # torch's legacy (pre-1.6) pickle format
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n <= size - 8:
            return "safetensors"
        if head[8:9] == b"{":
            raise CheckpointError(
                f"{show_path(file)}: truncated safetensors file (header says {n} bytes, file has {size - 8})"
            )
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


def _open_directory(d: Path) -> Checkpoint:
    for name in INDEX_NAMES:
        if (d / name).is_file():
            return _open_index(d / name)
    st = sorted(f for f in d.iterdir() if f.is_file() and f.suffix in SAFETENSORS_SUFFIXES)
    pt = sorted(f for f in d.iterdir() if f.is_file() and f.suffix in TORCH_SUFFIXES)
    if len(st) == 1 and not pt:
        return open_checkpoint(st[0])
    if len(pt) == 1 and not st:
        return open_checkpoint(pt[0])
    if len(st) > 1 and not pt:
        ck = Checkpoint(d, "sharded", st)  # shards without an index: their union
        for f in st:
            sniff(f)
            ck._add_safetensors(f)
        return ck
    if not st and not pt:
        raise CheckpointError(
            f"{show_path(d)}: directory holds no checkpoint (.safetensors, .pt, .pth, .bin, .ckpt or *.index.json)"
        )
    names = ", ".join(show_path(f.name) for f in (st + pt)[:6])
    raise CheckpointError(
        f"{show_path(d)}: directory holds several checkpoints ({names}); name one file, "
        "or several files (or a glob) for their trend"
    )


def _open_index(index: Path) -> Checkpoint:
    weight_map = _read_index(index)
    root = index.parent.resolve()
    shards: dict[Path, None] = {}  # insertion-ordered set: one look-up per key, not a list scan
    for key, name in weight_map.items():
        shards.setdefault(_shard_path(index, root, key, name))
    for f in shards:
        if not f.exists():  # a FIFO or device is refused by name when sniffed below
            raise CheckpointError(
                f"{show_path(index)}: shard {show_path(f.name)} listed in the index is missing"
            )
    ck = Checkpoint(index, "sharded", list(shards))
    for f in shards:
        if sniff(f) == "safetensors":
            ck._add_safetensors(f)
        else:
            ck._add_torch(f, keep_object=False)
    ck._torch_cache = None
    return ck


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map of a shard index: size- and depth-bounded JSON, an object of string -> string."""
    where = show_path(index)
    check_path(index)
    try:
        with open(index, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read: {e.strerror}") from e
    if len(raw) > MAX_INDEX_BYTES:
        raise CheckpointError(f"{where}: shard index larger than {MAX_INDEX_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        depth = max(accumulate(_json_depth_steps(text)), default=0)
        if depth > MAX_INDEX_DEPTH:
            raise CheckpointError(
                f"{where}: shard index JSON nests {depth} levels deep (at most {MAX_INDEX_DEPTH})"
            )
        doc = json.loads(text)
    except (
        ValueError,
        RecursionError,
    ) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(
            f"{where}: not a valid shard index (expected JSON with a 'weight_map' object)"
        ) from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{where}: not a valid shard index (expected JSON with a 'weight_map' object)"
        )
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(
                f"{where}: weight_map[{show_key(key)}] must be a shard file name, not {type(name).__name__}"
            )
    if not weight_map:
        raise CheckpointError(f"{where}: shard index lists no tensors")
    return weight_map


def _json_depth_steps(text: str) -> Iterator[int]:
    """+1/-1 for each bracket outside JSON strings: their running sum is the nesting depth."""
    for b in _BRACKETS.findall(_STRINGS.sub("", text)):
        yield 1 if b in "[{" else -1


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def _shard_path(index: Path, root: Path, key: str, name: str) -> Path:
    """The shard file ``name`` of an index, which must stay inside the index's directory."""
    bad = (
        os.path.isabs(name)
        or "\x00" in name
        or any(part == ".." for part in re.split(r"[/\\]", name))
    )
    f = index.parent / name
    if not bad:
        try:
            resolved = f.resolve()  # follows symlinks: a link out of the directory is caught here
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise CheckpointError(
                f"{show_path(index)}: shard {show_key(name)} cannot be resolved (symlink loop?)"
            ) from e
        # In a Hugging Face cache snapshot, every file links to the repo's blob store.
        bad = not resolved.is_relative_to(root) and not hub.in_blob_store(index.parent, resolved)
    if bad:
        raise CheckpointError(
            f"{show_path(index)}: shard {show_key(name)} for tensor {show_key(key)} is outside the "
            "index's directory; an index may only name files beside it"
        )
    return f
