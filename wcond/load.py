"""Reading checkpoints: torch.save files, safetensors, and sharded Hugging Face layouts.

Nothing here runs code from a pickle: torch files are read with ``weights_only=True``,
which only rebuilds tensors and plain containers and refuses everything else.
Safetensors are read lazily, tensor by tensor, and zip-format torch files are
memory-mapped, so a checkpoint is never held in memory twice.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from wcond import hub
from wcond.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["Checkpoint", "TensorInfo", "load_checkpoint", "open_checkpoint"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Keys under which training code nests the state dict (Lightning uses "state_dict").
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class Checkpoint:
    """An opened checkpoint: its tensors by key, read on demand, and where they came from.

    Attributes:
        path: the file or directory opened.
        format: "torch", "safetensors", or "sharded" (several files behind an index).
        wrapper: the key path to the state dict inside a torch file, e.g. ("state_dict",) for Lightning.
        metadata: safetensors metadata (the first shard's for a sharded checkpoint).
        files: the files the tensors live in.
    """

    def __init__(self, path: Path, fmt: str, files: list[Path]):
        self.path = path
        self.format = fmt
        self.files = files
        self.wrapper: tuple[str, ...] = ()
        self.metadata: dict[str, str] = {}
        self.obj: Any = None  # the whole unpickled object of a single torch file
        self._infos: dict[str, TensorInfo] = {}
        self._where: dict[str, Path] = {}
        self._torch_cache: tuple[Path, dict[str, torch.Tensor]] | None = None

    # -- public API
    def keys(self) -> list[str]:
        """Tensor keys in stored order."""
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, as stored (dtype unchanged)."""
        if key not in self._infos:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}")
        where = self._where[key]
        if where.suffix in SAFETENSORS_SUFFIXES:
            with _reading(where):
                with safe_open(str(where), framework="pt") as f:
                    return f.get_tensor(key)
        return self._torch_tensors(where)[key]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._infos:
            yield key, self.get(key)

    @property
    def num_bytes(self) -> int:
        return sum(i.numel * i.dtype.itemsize for i in self._infos.values())

    # -- internals
    def _torch_tensors(self, file: Path) -> dict[str, torch.Tensor]:
        if self._torch_cache is None or self._torch_cache[0] != file:
            obj = _torch_load(file)
            _, tensors = _state_dict_of(obj, file)
            self._torch_cache = (file, tensors)
        return self._torch_cache[1]

    def _add_safetensors(self, file: Path) -> None:
        with _reading(file):
            with safe_open(str(file), framework="pt") as f:
                if not self.metadata:
                    self.metadata = dict(f.metadata() or {})
                # safetensors does not keep the model's order (it sorts keys); natural order puts
                # "layers.2" before "layers.10", the closest thing to the model's own order.
                for key in sorted(f.keys(), key=natural_key):
                    sl = f.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.uint8)
                    self._add(key, TensorInfo(tuple(sl.get_shape()), dtype), file)

    def _add_torch(self, file: Path, keep_object: bool) -> None:
        obj = _torch_load(file)
        wrapper, tensors = _state_dict_of(obj, file)
        self.wrapper = wrapper
        if keep_object:
            self.obj = obj
        self._torch_cache = (file, tensors)
        for key, t in tensors.items():
            self._add(key, TensorInfo(tuple(t.shape), t.dtype), file)

    def _add(self, key: str, info: TensorInfo, file: Path) -> None:
        if key in self._infos:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} appears in both {self._where[key].name} and {file.name}"
            )
        self._infos[key] = info
        self._where[key] = file


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint file or directory without reading tensor data (safetensors) or with mmap (torch).

    Raises:
        CheckpointError: missing path, unknown or corrupt format, nothing analyzable.
        UnsafeCheckpointError: a pickle that would construct arbitrary objects.
    """
    p = Path(path)
    if not p.exists() and (repo := hub.parse_repo_id(str(path))) is not None:
        p = hub.resolve(repo)  # org/name[@rev]: from the Hugging Face cache (wcond/hub.py)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir() and (p / ".metadata").is_file():
        from wcond.load_dcp import open_dcp  # torch.distributed.checkpoint, only when needed

        return open_dcp(p)
    if p.is_dir():
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
        raise CheckpointError(f"{p}: holds no tensors")
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
    try:
        with open(file, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e.strerror}") from e
    size = file.stat().st_size
    if not head:
        raise CheckpointError(f"{file}: file is empty")
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
                f"{file}: truncated safetensors file (header says {n} bytes, file has {size - 8})"
            )
    if _looks_like_text(head):
        raise CheckpointError(
            f"{file}: looks like a text file, not a checkpoint (expected .safetensors or a torch.save file)"
        )
    raise CheckpointError(f"{file}: unknown format: neither safetensors nor a torch.save file")


def natural_key(key: str) -> list[Any]:
    """Sort key comparing digit runs as numbers: 'layers.2' < 'layers.10'."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)
    ]


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
            f"{d}: directory holds no checkpoint (.safetensors, .pt, .pth, .bin, .ckpt or *.index.json)"
        )
    names = ", ".join(f.name for f in (st + pt)[:6])
    raise CheckpointError(f"{d}: directory holds several checkpoints ({names}); name one file")


def _open_index(index: Path) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index}: not a valid shard index (expected JSON with a 'weight_map' object)"
        ) from e
    shards: list[Path] = []
    for name in weight_map.values():
        f = index.parent / name
        if f not in shards:
            shards.append(f)
    missing = [f.name for f in shards if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard {missing[0]} listed in the index is missing")
    ck = Checkpoint(index, "sharded", shards)
    for f in shards:
        if sniff(f) == "safetensors":
            ck._add_safetensors(f)
        else:
            ck._add_torch(f, keep_object=False)
    ck._torch_cache = None
    return ck


def _torch_load(file: Path) -> Any:
    mmap = zipfile.is_zipfile(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = (
            f"the object {found.group(1)}"
            if found
            else "objects other than tensors and plain containers"
        )
        raise UnsafeCheckpointError(
            f"{file}: refused: its pickle would construct {what}, and wcond never runs code from a checkpoint. "
            "If you trust the file, re-save just the weights: torch.save(model.state_dict(), path)"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError, struct.error, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{file}: corrupt or truncated torch checkpoint ({first[:160]})"
        ) from e


def _state_dict_of(obj: Any, file: Path) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
    """Find the state dict inside a loaded object: (key path to it, tensors by flattened key)."""
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a state dict")
    wrapper: tuple[str, ...] = ()
    node: Mapping = obj
    while True:
        direct = any(isinstance(v, torch.Tensor) for v in node.values())
        inner = next(
            (k for k in WRAPPER_KEYS if isinstance(node.get(k), Mapping) and _has_tensor(node[k])),
            None,
        )
        if inner is None or direct and not _is_wrapper_dict(node):
            break
        wrapper += (inner,)
        node = node[inner]
    tensors = dict(_flatten(node))
    return wrapper, tensors


def _is_wrapper_dict(node: Mapping) -> bool:
    """A dict holding a state dict plus a few loose tensors (e.g. Lightning's extra entries)."""
    return sum(isinstance(v, torch.Tensor) for v in node.values()) < len(node) / 2


def _has_tensor(node: Any) -> bool:
    if isinstance(node, torch.Tensor):
        return True
    if isinstance(node, Mapping):
        return any(_has_tensor(v) for v in node.values())
    return False


def _flatten(node: Mapping, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            yield key, v
        elif isinstance(v, Mapping):
            yield from _flatten(v, key + ".")


@contextmanager
def _reading(file: Path) -> Iterator[None]:
    """Turn safetensors' errors into CheckpointError naming the file."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({msg})") from e
