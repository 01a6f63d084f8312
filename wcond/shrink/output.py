"""Writing shrunk and folded checkpoints, and `expand`: the factorized format back to dense."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from wcond.checkpoint.base import Checkpoint, TensorInfo
from wcond.checkpoint.factorized import FOLD_MANIFEST_KEY, MANIFEST_KEY, W_SUFFIX, dense_view
from wcond.checkpoint.open import open_checkpoint
from wcond.checkpoint.target import check_output, output_format
from wcond.checkpoint.write import Layout, save_checkpoint
from wcond.errors import UsageError

__all__ = ["ExpandResult", "expand"]


def _open_source(
    source: str | Path, output: str | Path | None, force: bool
) -> tuple[Checkpoint, dict[str, TensorInfo]]:
    """Check OUT (unless a dry run), then open the source; an already shrunk one is refused."""
    if output is not None:
        check_output(source, output, force)
    ck = open_checkpoint(source)
    infos = {k: ck.info(k) for k in ck.keys()}
    if any(k.endswith(W_SUFFIX) for k in infos):
        raise UsageError(
            f"{ck.path}: is already shrunk (holds {W_SUFFIX} factors); expand it first: "
            f"wcond expand {ck.path} -o dense.safetensors"
        )
    return ck, infos


def _written_bytes(output: str | Path) -> int | None:
    """The size of the file written at ``output``; None for a device or pipe (-o /dev/null)."""
    p = Path(output)
    return p.stat().st_size if p.is_file() else None


def _formats(ck: Checkpoint, output: str | Path) -> list[str]:
    """[IN's format, OUT's] when they differ (their sizes then compare formats too), else []."""
    source = "safetensors" if all(p.suffix == ".safetensors" for p in ck.files) else "torch"
    out = output_format(output)
    return [source, out] if out != source else []


@dataclass
class ExpandResult:
    """What `wcond expand` wrote."""

    checkpoint: str
    output: str
    expanded: list[str]  # keys rebuilt from factors
    warnings: list[str] = field(default_factory=list)


def expand(source: str | Path, output: str | Path, *, force: bool = False) -> ExpandResult:
    """Write a shrunk checkpoint's dense tensors (see :func:`load_state_dict`) as a plain checkpoint.

    Example:
        >>> expand("small.safetensors", "dense.safetensors")
    """
    check_output(source, output, force)
    ck = open_checkpoint(source)
    infos, get, factored = dense_view({k: ck.info(k) for k in ck.keys()}, ck.get, str(ck.path))
    tensors = {k: get(k) for k in infos}
    result = ExpandResult(str(ck.path), str(output), list(factored))
    result.warnings += _write(ck, output, tensors, {})
    return result


_MANIFESTS = (MANIFEST_KEY, FOLD_MANIFEST_KEY)


def _write(
    ck: Checkpoint, output: str | Path, tensors: dict[str, Tensor], entries: Mapping[str, str]
) -> list[str]:
    """Save ``tensors`` in their given order through wcond.checkpoint.write with the source's layout.

    ``entries`` (the manifest) go to the safetensors metadata, or to the top level of a torch
    file; stale wcond manifests of the source are dropped.
    """
    # Without a source object to rebuild (a DCP directory, torch shards) the output is flat.
    wrapper = ck.wrapper if ck.obj is not None else ()
    metadata = {k: v for k, v in ck.metadata.items() if k not in _MANIFESTS}
    if output_format(output) == "safetensors":
        # the source's object is only consulted to warn about a wrapper's entries that
        # safetensors cannot hold
        like = Layout(ck.obj, wrapper, metadata)
        return save_checkpoint(output, tensors, like=like, metadata=entries)
    # save_checkpoint keeps the order and non-tensor entries of ``like.obj``: give it the source's
    # structure with the new tensors in their new order, so a factorized layer sits where it was.
    like = Layout(_torch_layout(ck.obj, wrapper, tensors, entries), wrapper, metadata)
    return save_checkpoint(output, tensors, like=like)


def _torch_layout(
    obj: Any, wrapper: tuple[str, ...], tensors: Mapping[str, Tensor], entries: Mapping[str, str]
) -> Any:
    def loose(node: Any) -> dict[str, Any]:
        """A node's entries that are neither tensors nor hold tensors, stale manifests left out."""
        if not isinstance(node, Mapping):
            return {}
        return {k: v for k, v in node.items() if k not in _MANIFESTS and not _holds_tensors(v)}

    if not wrapper:
        return {**tensors, **loose(obj), **entries}
    top: dict[str, Any] = {k: v for k, v in obj.items() if k not in _MANIFESTS}
    node = top
    for k in wrapper[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    inner = node[wrapper[-1]]
    node[wrapper[-1]] = {**tensors, **loose(inner)}
    top.update(entries)
    return top


def _holds_tensors(v: Any) -> bool:
    return isinstance(v, Tensor) or (
        isinstance(v, Mapping) and any(_holds_tensors(x) for x in v.values())
    )
