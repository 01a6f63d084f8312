"""Shard indexes (``model.safetensors.index.json``): which file holds which tensor. Torch-free.

Read by the sharded reader (wcond.checkpoint.sharded) and by the Hub cache lookup (wcond.hub),
which checks that every shard an index names has been downloaded.
"""

from __future__ import annotations

from pathlib import Path

from wcond.checkpoint.bounded_json import JSONTooDeep, JSONTooLarge, read_json
from wcond.errors import CheckpointError, show_key, show_path

__all__ = ["MAX_INDEX_BYTES", "MAX_INDEX_DEPTH", "read_index"]

# A shard index is a few MB even for the largest models; its JSON is at most this deep.
MAX_INDEX_BYTES = 64_000_000
MAX_INDEX_DEPTH = 8


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of a shard index: size- and depth-bounded JSON, an object of string -> string.

    The caller has checked that ``index`` is a regular file.
    """
    where = show_path(index)
    invalid = f"{where}: not a valid shard index (expected JSON with a 'weight_map' object)"
    try:
        doc = read_json(index, max_bytes=MAX_INDEX_BYTES, max_depth=MAX_INDEX_DEPTH)
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read: {e.strerror}") from e
    except JSONTooLarge as e:
        raise CheckpointError(f"{where}: shard index larger than {e.limit} bytes") from e
    except JSONTooDeep as e:
        raise CheckpointError(
            f"{where}: shard index JSON nests {e.depth} levels deep (at most {e.limit})"
        ) from e
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(invalid) from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(invalid)
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(
                f"{where}: weight_map[{show_key(key)}] must be a shard file name, not {type(name).__name__}"
            )
    if not weight_map:
        raise CheckpointError(f"{where}: shard index lists no tensors")
    return weight_map
