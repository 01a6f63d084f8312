"""Writing checkpoints and reports without ever leaving a half-written file or touching the input.

Everything is written to a temporary file beside the target and renamed over it only once
complete; an error or Ctrl-C removes the temporary file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from wcond.checkpoint.open import Checkpoint
from wcond.checkpoint.source import check_output, output_format  # re-exported
from wcond.errors import CheckpointError, OutputError, UsageError, show_key

__all__ = ["atomic_path", "check_output", "output_format", "save_checkpoint", "write_text"]


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` when the block succeeds.

    A missing parent directory is created. Any failure (a full disk, a read-only or vanished
    directory, Ctrl-C, SIGTERM) removes the temporary file; an OSError becomes an
    :class:`OutputError` naming ``target``.
    """
    target = Path(target)
    if target.is_dir():
        raise UsageError(f"{target}: is a directory; give a file name")
    if target.exists() and not target.is_file():
        # A device or a pipe (-o /dev/null, /dev/stdout): write straight to it; renaming a
        # temporary file over it would replace the device itself.
        with _as_output_error(target, partial=True):
            yield target
        return
    with _as_output_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        # The temporary file has the target's own name, in a private directory beside it:
        # torch.save stores the file's name in every record of its zip, so a random name would
        # change the bytes.
        tmp_dir = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".wcond-tmp", dir=target.parent)
        )
    tmp = tmp_dir / target.name
    try:
        with _as_output_error(target):
            tmp.touch()
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _new_file_mode(target))
            os.replace(tmp, target)
    except BaseException:  # Ctrl-C and SIGTERM included: never leave the partial file
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextmanager
def _as_output_error(target: Path, partial: bool = False) -> Iterator[None]:
    """An OSError while writing ``target`` as an OutputError naming it and the system's reason."""
    try:
        yield
    except OSError as e:
        what = os.fsdecode(e.filename) if e.filename is not None else None
        where = (
            f"{target}: cannot write it"
            if what is None or what == str(target) or ".wcond-tmp" in what
            else f"{what}: failed while writing {target}"
        )
        outcome = "it may hold part of the output" if partial else "nothing was written"
        raise OutputError(f"{where} ({e.strerror or e}); {outcome}") from e


def _new_file_mode(target: Path) -> int:
    """The existing file's mode when overwriting, else 0666 less the umask."""
    if target.exists():
        return target.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text(path: str | Path, text: str) -> None:
    """Write a text report atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_checkpoint(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    like: Checkpoint | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` to ``path`` (format from the extension), atomically.

    With ``like`` (the checkpoint the tensors came from), a torch output keeps the source's
    wrapper and non-tensor entries (a Lightning checkpoint's epoch, optimizer state, ...), and a
    safetensors output keeps its metadata (``metadata`` entries are added on top).

    Returns:
        Warnings for the user, e.g. wrapper entries a safetensors file cannot hold.
    """
    fmt = output_format(path)
    warnings: list[str] = []
    meta = dict(like.metadata) if like is not None else {}
    meta.update(metadata or {})
    with atomic_path(path) as tmp:
        if fmt == "safetensors":
            if like is not None and like.obj is not None and _has_extras(like):
                warnings.append(
                    f"{path}: safetensors holds tensors only; the source's other entries "
                    "(epoch, optimizer state, ...) were not written"
                )
            for k, t in tensors.items():
                if t.layout != torch.strided or t.is_meta:
                    raise CheckpointError(
                        f"{path}: tensor {show_key(k)} is {'meta' if t.is_meta else 'sparse'}; "
                        "safetensors holds dense tensors only: write a torch file (.pt) instead"
                    )
            save_file({k: _plain(t) for k, t in tensors.items()}, str(tmp), metadata=meta or None)
        else:
            obj: Any = dict(tensors)
            if like is not None and like.obj is not None:
                obj = _rebuild(like.obj, like.wrapper, tensors)
            elif meta:
                warnings.append(
                    f"{path}: a torch file has no place for safetensors metadata; it was not written"
                )
            torch.save(obj, tmp)
    return warnings


def _plain(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses shared or non-contiguous storage: give it a compact copy when needed."""
    t = t.detach().cpu()
    return (
        t.contiguous().clone()
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes
        else t
    )


def _has_extras(ck: Checkpoint) -> bool:
    return bool(ck.wrapper) and isinstance(ck.obj, Mapping) and len(ck.obj) > 1


def _rebuild(obj: Any, wrapper: tuple[str, ...], tensors: Mapping[str, torch.Tensor]) -> Any:
    """The source object with its state dict replaced by ``tensors``, structure and order kept."""
    if wrapper:
        head, *rest = wrapper
        out = _copy_mapping(obj)
        out[head] = _rebuild(obj[head], tuple(rest), tensors)
        return out
    remaining = dict(tensors)
    new_root = _replace(obj, remaining, "")
    new_root.update(remaining)  # keys the source did not have (e.g. factors written by shrink)
    return new_root


def _replace(node: Mapping, remaining: dict[str, torch.Tensor], prefix: str) -> Any:
    out = _copy_mapping(node, empty=True)
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            if key in remaining:
                out[k] = remaining.pop(key)
        elif isinstance(v, Mapping) and _holds_tensor(v):
            out[k] = _replace(v, remaining, key + ".")
        else:
            out[k] = v
    return out


def _holds_tensor(node: Mapping) -> bool:
    return any(
        isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _holds_tensor(v))
        for v in node.values()
    )


def _copy_mapping(node: Mapping, empty: bool = False) -> Any:
    out: Any = OrderedDict() if isinstance(node, OrderedDict) else {}
    if not empty:
        out.update(node)
    return out
