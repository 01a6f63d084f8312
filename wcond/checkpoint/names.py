"""The names checkpoints go by: weight-file suffixes, shard-index names, and the order of keys.

One table for every place that recognises a checkpoint by its name: opening a directory, the
Hugging Face cache lookup (wcond.hub), and the output format an ``-o`` path asks for. Torch-free.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = [
    "DCP_METADATA_NAME",
    "DCP_SHARD_SUFFIX",
    "INDEX_NAMES",
    "SAFETENSORS_SUFFIXES",
    "TORCHSCRIPT_SUFFIXES",
    "TORCH_SUFFIXES",
    "WEIGHT_NAMES",
    "WEIGHT_SUFFIXES",
    "directory_weights",
    "natural_key",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
# TorchScript archives are read (never written: an output is a plain state dict).
TORCHSCRIPT_SUFFIXES = (".jit",)
WEIGHT_SUFFIXES = TORCH_SUFFIXES + TORCHSCRIPT_SUFFIXES + SAFETENSORS_SUFFIXES
# The shard indexes transformers writes, safetensors first.
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# A torch.distributed.checkpoint directory's metadata file, beside its *.distcp shards.
DCP_METADATA_NAME = ".metadata"
DCP_SHARD_SUFFIX = ".distcp"
# The weights of a model repo, in the order wcond prefers them: an index, else its single file.
WEIGHT_NAMES = (INDEX_NAMES[0], "model.safetensors", INDEX_NAMES[1], "pytorch_model.bin")


def natural_key(key: str) -> list[Any]:
    """Sort key comparing digit runs as numbers: 'layers.2' < 'layers.10'."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)
    ]


def directory_weights(d: Path) -> tuple[list[Path], list[Path]]:
    """A directory's safetensors files and torch files (TorchScript included), by suffix, each sorted."""
    files = sorted(f for f in d.iterdir() if f.is_file())
    return (
        [f for f in files if f.suffix in SAFETENSORS_SUFFIXES],
        [f for f in files if f.suffix in TORCH_SUFFIXES + TORCHSCRIPT_SUFFIXES],
    )
