"""Which tensors of a checkpoint are layers, what kind, and which the user selected."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wcond.checkpoint.base import TensorInfo
from wcond.config import parse_groups  # re-exported: KEY=G specs, parsed without torch
from wcond.errors import UsageError

__all__ = [
    "LayerSpec",
    "find_layers",
    "is_fp8",
    "is_layer",
    "layer_kind",
    "parse_groups",
    "selected",
    "skip_note",
]

_KINDS = {2: "matrix", 3: "conv1d", 4: "conv2d", 5: "conv3d"}


def is_layer(info: TensorInfo) -> bool:
    """A dense floating-point tensor of 2 to 5 dims with at least 2 rows and no empty dimension."""
    return info.skip is None and _layer_shaped(info) and 0 not in info.shape


def is_fp8(dtype: torch.dtype) -> bool:
    """An 8-bit float (e4m3fn, e5m2, ...): few torch kernels take it, so it is upcast to be read."""
    return dtype.is_floating_point and dtype.itemsize == 1


def skip_note(info: TensorInfo) -> str | None:
    """Why a stored tensor that would otherwise be analyzed (or cannot be read at all) is skipped."""
    if info.skip is not None:
        return info.skip
    if _layer_shaped(info) and 0 in info.shape:
        return f"zero-size dimension (shape {tuple(info.shape)}): nothing to analyze"
    return None


def _layer_shaped(info: TensorInfo) -> bool:
    return info.dtype.is_floating_point and 2 <= len(info.shape) <= 5 and info.shape[0] >= 2


def layer_kind(shape: Sequence[int]) -> str:
    """'matrix' (Linear, Embedding) or 'conv1d'/'conv2d'/'conv3d' (out, in, *kernel)."""
    return _KINDS.get(len(shape), f"{len(shape)}d")


def matches(key: str, globs: Sequence[str]) -> bool:
    """True when a glob matches the tensor key, or the module that owns it (``conv1``: ``conv1.weight``)."""
    module = key.removesuffix(".weight") if key.endswith(".weight") else None
    return any(
        fnmatch.fnmatchcase(key, g) or (module is not None and fnmatch.fnmatchcase(module, g))
        for g in globs
    )


def selected(key: str, layers: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """True when ``key`` matches one of the ``layers`` globs (or none are given) and no ``exclude`` glob.

    A glob matches a tensor key or its module's name (see :func:`matches`).
    """
    if layers and not matches(key, layers):
        return False
    return not matches(key, exclude)


def no_match_message(
    source: str, keys: Sequence[str], layers: Sequence[str], exclude: Sequence[str]
) -> str:
    """``SOURCE: no layer matches the patterns ...``, with the closest layer names when there are any."""
    import difflib

    names = [*keys, *(k.removesuffix(".weight") for k in keys if k.endswith(".weight"))]
    close: list[str] = []
    for g in layers:
        close += [c for c in difflib.get_close_matches(g, names, n=3) if c not in close]
    hint = f"; did you mean {', '.join(repr(c) for c in close[:3])}?" if close else ""
    asked = " ".join([*(f"layers={g}" for g in layers), *(f"exclude={g}" for g in exclude)])
    return f"{source}: no layer matches {asked}{hint}"


@dataclass(frozen=True)
class LayerSpec:
    """One layer to analyze: its key, stored shape and dtype, conv groups, and a note on grouping."""

    key: str
    info: TensorInfo
    groups: int = 1
    group_note: str | None = None

    @property
    def kind(self) -> str:
        return layer_kind(self.info.shape)


def find_layers(
    infos: dict[str, TensorInfo],
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    groups: dict[str, int] | None = None,
) -> list[LayerSpec]:
    """The analyzable, selected layers in stored order, with conv groups resolved.

    A state dict does not record conv groups. A conv whose filters read a single channel, or
    fewer channels than the previous conv produced, may be depthwise or grouped: the spec
    carries a note saying so unless ``groups`` names the layer.
    """
    groups = groups or {}
    specs: list[LayerSpec] = []
    prev_out: int | None = None
    for key, info in infos.items():
        if not is_layer(info):
            continue
        shape = info.shape
        g = next((v for pat, v in groups.items() if fnmatch.fnmatchcase(key, pat)), None)
        note = None
        if len(shape) >= 3:
            if g is not None:
                if shape[0] % g:
                    raise UsageError(
                        f"groups={key}={g}: {g} does not divide the layer's {shape[0]} output filters",
                        params=("groups",),
                    )
            elif shape[1] == 1 and prev_out not in (None, 1):
                note = f"may be depthwise (1 input channel per filter); pass --groups '{key}={shape[0]}' if so"
            elif prev_out is not None and shape[1] < prev_out and prev_out % shape[1] == 0:
                guess = prev_out // shape[1]
                if shape[0] % guess == 0:
                    note = (
                        f"may be grouped ({shape[1]} input channels per filter after a {prev_out}-channel conv); "
                        f"pass --groups '{key}={guess}' if so"
                    )
            prev_out = shape[0]
        if selected(key, layers, exclude):
            specs.append(LayerSpec(key, info, g or 1, note))
    return specs
