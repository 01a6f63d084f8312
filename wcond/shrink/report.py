"""What shrinking and folding did, per layer and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FoldReport", "LayerShrink", "ShrinkReport"]


@dataclass
class LayerShrink:
    """What shrinking did to one layer."""

    name: str
    shape_before: list[int]
    shape_after: list[int]
    fused_rows: int = 0
    fused_cols: int = 0
    params_before: int = 0
    params_after: int = 0
    reconstruction_error: float | None = 0.0  # |W - P W' Q|_F / |W|_F (fold: rows with bias)
    max_angle_deg: float | None = None  # the widest pair fused
    axes: list[str] = field(default_factory=list)  # the axes searched
    changed: bool = False  # factorized (shrink) or narrowed (fold) in OUT
    notes: list[str] = field(default_factory=list)


class _Removed:
    """What the shrink and fold reports share: parameters before/after, and their JSON form."""

    params_before: int
    params_after: int

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    @property
    def percent_removed(self) -> float:
        return 100.0 * self.params_removed / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)  # type: ignore[call-overload]  # each subclass is a dataclass
        doc["params_removed"] = self.params_removed
        doc["percent_removed"] = self.percent_removed
        return doc


@dataclass
class ShrinkReport(_Removed):
    """What `wcond shrink` did (or, for a dry run, would do)."""

    checkpoint: str
    output: str | None  # None: dry run, nothing written
    mode: str  # "factorize" or "fold"
    settings: dict[str, Any]
    layers: list[LayerShrink]
    params_before: int  # every tensor of the checkpoint
    params_after: int
    bytes_before: int  # tensor data, as stored (file_bytes_* count the whole files)
    bytes_after: int
    file_bytes_before: int = 0  # the files of the source, as on disk
    file_bytes_after: int | None = None  # OUT as written; None when OUT is no regular file
    file_bytes_estimated: bool = False  # a dry run: file_bytes_after is the size rule's bound
    formats: list[str] = field(default_factory=list)  # [IN's, OUT's] when they differ
    widths: dict[str, list[int]] = field(default_factory=dict)  # fold: key -> [units before, after]
    resolved: dict[str, list[str]] = field(default_factory=dict)  # fold: chain name -> its tensors
    warnings: list[str] = field(default_factory=list)


@dataclass
class FoldReport(_Removed):
    """What :func:`wcond.fold` did to a model."""

    model: str  # the model's class
    settings: dict[str, Any]
    layers: list[LayerShrink]  # the layers of the links found, folded or not
    params_before: int  # every parameter of the model
    params_after: int
    widths: dict[str, list[int]]  # module -> [units before, after], narrowed modules only
    left_alone: dict[str, str]  # layer module -> why it was not folded
    # module -> {constructor argument: [before, after]}: what to build the narrow model with
    constructor: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    max_abs_diff: float | None = None  # max |model(x) - new(x)| on the example input, eval mode
    input_shape: list[int] | None = None  # fold_checkpoint: the random input's shape
    checkpoint: str | None = None  # fold_checkpoint: the weights loaded
    output: str | None = None  # fold_checkpoint: where the narrow state dict went
    file_bytes_before: int = 0
    file_bytes_after: int | None = None
    warnings: list[str] = field(default_factory=list)
