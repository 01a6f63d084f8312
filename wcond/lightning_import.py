"""Lightning, imported on first use by wcond's callbacks, so that wcond needs it only for them."""

from __future__ import annotations

from typing import Any

from wcond.errors import UsageError

__all__ = ["import_lightning"]


def import_lightning(callback: str, without: str) -> Any:
    """``lightning.pytorch`` (or the older ``pytorch_lightning``); UsageError naming ``callback`` if absent.

    ``without`` says what to use instead when Lightning is not installed.
    """
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl  # type: ignore[no-redef]
        except ImportError as e:
            raise UsageError(
                f"{callback} is a Lightning callback and needs Lightning: "
                f"pip install 'wcond[lightning]' (without Lightning, use {without})"
            ) from e
    return pl
