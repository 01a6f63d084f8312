"""Project configuration: a repo pins its wcond policy once, in ``[tool.wcond]`` of pyproject.toml.

Found like ruff and pytest find theirs: walking up from the current directory to the root of
the repository (the first directory holding ``.git``; the filesystem's root outside one), the
first directory holding a ``wcond.toml`` or a ``pyproject.toml`` with a ``[tool.wcond]`` table
wins (``wcond.toml`` first when a directory has both). ``--config FILE`` names one explicitly.
A ``wcond.toml`` or ``--config`` file holds either the keys at top level or a ``[tool.wcond]``
table, as pyproject.toml does. Command-line flags override every key; list keys (``layers``,
``exclude``, ``fail-if``) are replaced by the flag, not extended.

Example pyproject.toml::

    [tool.wcond]
    tau-cos = 1e-4
    exclude = ["*.embed_tokens.weight"]
    groups = { "layer*.conv2.weight" = 32 }
    fail-if = ["near_parallel_rows>0", "acv_mean>0.3"]
"""

from __future__ import annotations

import math
import os
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wcond.defaults import DEVICES, INSPECT_FORMATS, MAX_TOP
from wcond.errors import UsageError
from wcond.gates import Gate
from wcond.report import resolve_metric

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["CONFIG_KEYS", "Config", "find_config", "load_config", "parse_groups"]

# Every key a config may hold, as written in the file (Python spells it with "_"), and what its value must be.
CONFIG_KEYS: dict[str, str] = {
    "tau-cos": "number (finite, >= 0)",
    "tau-euc": "number (finite, >= 0)",
    "top": f"integer (0 to {MAX_TOP})",
    "layers": "list of glob strings",
    "exclude": "list of glob strings",
    "groups": 'table of glob = integer, e.g. { "layer*.conv2.weight" = 32 }',
    "fail-if": 'list of gate expressions, e.g. ["acv_mean>0.5"]',
    "format": f"one of {', '.join(INSPECT_FORMATS)}",
    "device": f"one of {', '.join(DEVICES)}",
}


@dataclass(frozen=True)
class Config:
    """Settings read from one file (``path`` None: no file found), keys in Python spelling (``tau_cos``)."""

    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)


def find_config(start: str | Path | None = None) -> Path | None:
    """The first wcond.toml, or pyproject.toml with a [tool.wcond] table, from ``start`` (cwd) upward.

    The walk ends at the repository's root (a directory holding ``.git``), so a stray file
    above a clone never sets its policy.
    """
    here = Path(start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        own = directory / "wcond.toml"
        if own.is_file():
            return own
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and _wcond_table(_read(pyproject), pyproject) is not None:
            return pyproject
        if (directory / ".git").exists():
            break
    return None


def load_config(path: str | Path | None = None, start: str | Path | None = None) -> Config:
    """Read and check ``path``, or the file :func:`find_config` finds; an empty Config when there is none.

    Raises:
        UsageError: unreadable TOML, an unknown key, or a value of the wrong type, naming key and file.
    """
    if path is None:
        path = find_config(start)
        if path is None:
            return Config()
    path = Path(path)
    if not path.exists():
        raise UsageError(f"config file {path}: no such file")
    if not path.is_file():  # a directory, a FIFO (reading it would block), a device
        raise UsageError(f"config file {path}: not a regular file")
    doc = _read(path)
    if path.name == "pyproject.toml":
        table = _wcond_table(doc, path)
        if table is None:
            raise UsageError(
                f"{path}: has no [tool.wcond] table; add one, or name a wcond.toml instead"
            )
        return Config(path, _check(table, f"{path}: [tool.wcond]"))
    if "tool" not in doc:
        return Config(path, _check(doc, str(path)))  # the keys at top level
    table = _wcond_table(doc, path)
    if table is None:
        raise UsageError(f"{path}: has a [tool] table but no [tool.wcond]; put wcond's keys there")
    others = sorted(k for k in doc if k != "tool")
    if others:
        raise UsageError(
            f"{path}: holds both [tool.wcond] and top-level keys ({', '.join(others)}); "
            "use one form"
        )
    return Config(path, _check(table, f"{path}: [tool.wcond]"))


# pyproject.toml files are a few KB; a config this large is not one.
MAX_CONFIG_BYTES = 10_000_000


def _read(path: Path) -> dict[str, Any]:
    """A TOML file read within bounds: a regular file (a FIFO would block), at most
    MAX_CONFIG_BYTES, UTF-8, and not nested deeper than the parser's recursion allows."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UsageError(f"{path}: not a regular file; a config is a TOML file")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise UsageError(f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes; not a config file")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not valid TOML (not UTF-8 at byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from e
    except RecursionError as e:
        raise UsageError(f"{path}: not valid TOML (nested too deep to read)") from e


def _wcond_table(doc: Mapping[str, Any], path: Path) -> Mapping[str, Any] | None:
    """pyproject's [tool.wcond] table, None without one; a UsageError when it is not a table."""
    tool = doc.get("tool", {})
    if not isinstance(tool, Mapping):
        return None  # `tool = "..."`: not ours to judge, and no [tool.wcond] in it
    table = tool.get("wcond")
    if table is not None and not isinstance(table, Mapping):
        raise UsageError(f"{path}: tool.wcond = {table!r}: expected a table, [tool.wcond]")
    return table


def _check(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The table's keys checked, in Python spelling; ``where`` names the file (and table) in errors."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in CONFIG_KEYS:
            hint = (
                f" (did you mean {key.replace('_', '-')!r}?)"
                if key.replace("_", "-") in CONFIG_KEYS
                else ""
            )
            raise UsageError(
                f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(CONFIG_KEYS)}"
            )
        if not _valid(key, value):
            raise UsageError(f"{where}: {key} = {value!r}: expected {CONFIG_KEYS[key]}")
        if key == "fail-if":
            for expr in value:
                try:
                    Gate.parse(expr, resolve_metric)
                except UsageError as e:
                    raise UsageError(f"{where}: fail-if: {str(e).removeprefix('fail_if=')}") from e
        values[key.replace("-", "_")] = value
    return values


def _valid(key: str, v: Any) -> bool:
    if key in ("tau-cos", "tau-euc"):
        return (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        )
    if key == "top":
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOP
    if key in ("layers", "exclude", "fail-if"):
        return isinstance(v, list) and all(isinstance(s, str) for s in v)
    if key == "groups":
        return isinstance(v, dict) and all(
            isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in v.values()
        )
    if key == "format":
        return v in INSPECT_FORMATS
    return v in DEVICES  # device


def parse_groups(specs: Iterable[str]) -> dict[str, int]:
    """Parse ``KEY=G`` strings (KEY may be a glob) into a mapping."""
    out: dict[str, int] = {}
    for spec in specs:
        key, sep, value = spec.rpartition("=")
        if not sep or not key or not value.isdigit() or int(value) < 1:
            raise UsageError(
                f"groups={spec!r}: expected KEY=G with G a positive integer, "
                "e.g. 'layer1.conv2.weight=32'",
                params=("groups",),
            )
        out[key] = int(value)
    return out
