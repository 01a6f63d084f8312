"""Any result as JSON for scripts: its ``to_dict()`` under the wcond version, null where a value does not apply."""

from __future__ import annotations

import json
from typing import Any, Protocol

from wcond._version import __version__

__all__ = ["to_json"]


class _Result(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def to_json(result: _Result, **extra: Any) -> str:
    """The stable interface for scripts and CI: ``{"wcond_version", **result.to_dict(), **extra}``, indented."""
    return json.dumps({"wcond_version": __version__, **result.to_dict(), **extra}, indent=2) + "\n"
