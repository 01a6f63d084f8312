"""Where a checkpoint is written: its format from the extension, never over the input. Torch-free,
so that a wrong ``-o`` is refused before torch is imported."""

from __future__ import annotations

import os
from pathlib import Path

from wcond.checkpoint.names import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES
from wcond.errors import UsageError

__all__ = ["check_new_file", "check_output", "output_format"]


def output_format(path: str | Path) -> str:
    """'safetensors' or 'torch' from the output's extension; UsageError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise UsageError(
        f"{path}: unknown output format {suffix or '(no extension)'!r}; use .safetensors, .pt, .pth, .bin or .ckpt"
    )


def check_output(src: str | Path, out: str | Path, force: bool) -> None:
    """Refuse to write over the input, or over an existing file without ``force``."""
    src_p, out_p = Path(src), Path(out)
    if out_p.exists() and (
        src_p.resolve() == out_p.resolve() or _same_file(src_p, out_p) or _inside(out_p, src_p)
    ):
        raise UsageError(
            f"{out}: refusing to write over the input checkpoint; choose another -o path"
        )
    check_new_file(out, force)


def check_new_file(out: str | Path, force: bool) -> str:
    """Refuse a directory, or an existing file without ``force``; the format from the extension."""
    out_p = Path(out)
    if out_p.is_dir():
        raise UsageError(
            f"{out}: is a directory; give a file name such as {out_p / 'model.safetensors'}"
        )
    if out_p.exists() and not force:
        raise UsageError(
            f"{out}: already exists; pass force=True to overwrite it", params=("force",)
        )
    return output_format(out_p)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(out: Path, src: Path) -> bool:
    """An output that is one of a sharded input's files."""
    return src.is_dir() and out.resolve().parent == src.resolve()
