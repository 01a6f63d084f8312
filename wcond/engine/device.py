"""Choosing the torch device the heavy work runs on."""

from __future__ import annotations

import torch

from wcond.defaults import DEVICE
from wcond.errors import UsageError

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device = DEVICE) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an explicit device must be available."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(
            f"device={name!r}: not a device (use auto, cpu, cuda, cuda:N or mps)",
            params=("device",),
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device={name!r}: CUDA is not available here (torch {torch.__version__}); "
            "use cpu or auto",
            params=("device",),
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(
            f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) present",
            params=("device",),
        )
    if dev.type == "mps" and not _mps_available():
        raise UsageError(
            f"device={name!r}: MPS is not available here; use cpu or auto", params=("device",)
        )
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(
            f"device={name!r}: unsupported device type {dev.type!r} (use auto, cpu, cuda or mps)",
            params=("device",),
        )
    return dev


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())
