"""Hugging Face repo ids (``org/name[@revision]``) as checkpoints, read from the local Hub cache.

The public face of :mod:`wcond.checkpoint.hub`, where the resolver lives beside the readers.
"""

from wcond.checkpoint.hub import *  # noqa: F403
from wcond.checkpoint.hub import __all__ as __all__
