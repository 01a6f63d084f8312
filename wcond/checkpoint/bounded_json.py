"""JSON from a checkpoint, bounded before it is parsed: one reader for headers, indexes and side files.

``json.loads`` recurses once per nesting level, so a few kilobytes of ``[[[[...`` end in a
RecursionError, and a file of any size is read whole. Every JSON document wcond takes from a
checkpoint (a safetensors header, a shard index, a ``trainer_state.json``) is read here: its size
bounded first, its nesting depth counted before ``json.loads`` sees it. Callers phrase the errors,
since each names its file in its own words. Torch-free.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from itertools import accumulate
from typing import Any

__all__ = ["JSONTooDeep", "JSONTooLarge", "json_depth", "parse_json", "read_json"]

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


class JSONTooDeep(ValueError):
    """The document nests deeper than allowed (``depth`` levels, at most ``limit``)."""

    def __init__(self, depth: int, limit: int):
        super().__init__(f"JSON nests {depth} levels deep (at most {limit})")
        self.depth, self.limit = depth, limit


class JSONTooLarge(ValueError):
    """The file holds more than ``limit`` bytes."""

    def __init__(self, limit: int):
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


def json_depth(text: str) -> int:
    """The deepest nesting of brackets outside JSON strings."""
    steps = (1 if b in "[{" else -1 for b in _BRACKETS.findall(_STRINGS.sub("", text)))
    return max(accumulate(steps), default=0)


def parse_json(
    text: str,
    *,
    max_depth: int,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """``json.loads`` after checking the depth.

    Raises:
        JSONTooDeep: nested deeper than ``max_depth``.
        ValueError: not JSON (a RecursionError from the parser comes out as a ValueError too).
    """
    depth = json_depth(text)
    if depth > max_depth:
        raise JSONTooDeep(depth, max_depth)
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError as e:
        raise ValueError("JSON nests too deep for the parser") from e


def read_json(file: str | os.PathLike[str], *, max_bytes: int, max_depth: int) -> Any:
    """A JSON file of at most ``max_bytes`` bytes (UTF-8) and ``max_depth`` levels.

    Raises:
        OSError: the file cannot be read.
        JSONTooLarge, JSONTooDeep, ValueError: as their names say; ValueError for bad UTF-8 or JSON.
    """
    with open(file, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise JSONTooLarge(max_bytes)
    return parse_json(raw.decode("utf-8"), max_depth=max_depth)
