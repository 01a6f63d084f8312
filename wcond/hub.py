"""Hugging Face repo ids (``org/name[@revision]``) as checkpoints, read from the local Hub cache.

The public face of :mod:`wcond.checkpoint.hub`, where the resolver lives beside the readers.
"""

from wcond.checkpoint.hub import (
    RepoRef,
    allow_downloads,
    cache_dir,
    in_blob_store,
    parse_repo_id,
    resolve,
    weight_files,
)

__all__ = [
    "RepoRef",
    "allow_downloads",
    "cache_dir",
    "in_blob_store",
    "parse_repo_id",
    "resolve",
    "weight_files",
]
