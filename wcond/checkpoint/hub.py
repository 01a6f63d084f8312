"""Hugging Face repo ids (``org/name[@revision]``) as checkpoints, read from the local Hub cache.

A path that exists always wins; only a path that does not exist and looks like a repo id comes
here. The weights are looked up in the cache huggingface_hub keeps
(``<cache>/models--org--name/{refs,snapshots,blobs}``, the cache directory taken from
``HF_HUB_CACHE``, else ``HF_HOME``/hub, as huggingface_hub does) without any network access.
Only when downloads are allowed (``download=True``, or the CLI's ``--download``) are the repo's
weight files fetched, and nothing else: its ``*.safetensors`` with their index, or, for a repo
without safetensors, its ``*.bin`` weights with theirs. Fetching needs huggingface_hub
(``pip install 'wcond[hub]'``); reading the cache does not.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from wcond.checkpoint.index import read_index
from wcond.checkpoint.names import WEIGHT_NAMES, WEIGHT_SUFFIXES
from wcond.errors import CheckpointError, UsageError, show_path

__all__ = [
    "RepoRef",
    "allow_downloads",
    "cache_dir",
    "in_blob_store",
    "parse_repo_id",
    "resolve",
    "weight_files",
]

# org/name as the Hub allows them, then an optional @revision (a branch, tag or commit hash).
_REPO_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_.-]{1,96})(?:@(?P<rev>[A-Za-z0-9_.\-/]{1,200}))?"
)
# A missing "runs/model.pt" is a mistyped path, not a repo id.
_FILE_SUFFIXES = (*WEIGHT_SUFFIXES, ".json")

# How long --download waits for the Hub's host to answer before saying it cannot be reached.
CONNECT_TIMEOUT = 10.0
# refs/<branch> holds a 40-hex-digit commit hash (huggingface_hub writes no newline; allow one)
_MAX_REF_BYTES = 41

_downloads: ContextVar[bool] = ContextVar("wcond_hub_downloads", default=False)


@dataclass(frozen=True)
class RepoRef:
    """A Hub model repo and the revision asked for (None: the default branch, "main")."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_repo_id(text: str) -> RepoRef | None:
    """``org/name`` or ``org/name@revision`` as a RepoRef; None for anything else."""
    m = _REPO_ID.fullmatch(text)
    if m is None:
        return None
    repo, rev = m.group("repo"), m.group("rev")
    if ".." in repo or repo.lower().endswith(_FILE_SUFFIXES):
        return None
    if rev is not None and (".." in rev or rev.startswith("/") or rev.endswith("/")):
        return None
    return RepoRef(repo, rev)


@contextmanager
def allow_downloads(allowed: bool = True) -> Iterator[None]:
    """Within the block, :func:`resolve` may fetch weights that are not cached (the CLI's --download)."""
    token = _downloads.set(allowed)
    try:
        yield
    finally:
        _downloads.reset(token)


def cache_dir() -> Path:
    """The Hub cache directory, as huggingface_hub finds it (read at each call, so env changes count)."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


def resolve(ref: RepoRef | str, *, download: bool | None = None) -> Path:
    """The local file holding a repo's weights (a weights file or a shard index) in the Hub cache.

    Args:
        ref: a RepoRef or ``"org/name[@revision]"``.
        download: fetch the weight files when they are not cached (needs huggingface_hub and
            the network). None: as :func:`allow_downloads` says (default: never).

    Raises:
        CheckpointError: not cached (and no download), or the repo holds no weights.
        UsageError: a download is needed and huggingface_hub is not installed.

    Example:
        >>> wcond.inspect(wcond.hub.resolve("google-bert/bert-base-uncased@main"))
    """
    if isinstance(ref, str):
        parsed = parse_repo_id(ref)
        if parsed is None:
            raise UsageError(f"{ref!r}: not a Hugging Face repo id (expected org/name[@revision])")
        ref = parsed
    cache = cache_dir()
    found, missing = _cached_weights(cache, ref)
    if found is not None:
        return found
    if not (_downloads.get() if download is None else download):
        where = f"{missing} missing from" if missing else "not in"
        raise CheckpointError(
            f"{ref}: no such file or directory, and {where} the Hugging Face cache ({cache}); "
            "fetch its weight files with download=True",
            params=("download",),
        )
    _fetch(ref, cache)
    found, missing = _cached_weights(cache, ref)
    if found is None:
        raise CheckpointError(
            f"{ref}: downloaded, but {missing or 'no weights file'} is still missing from {cache}"
        )
    return found


def in_blob_store(snapshot: Path, resolved: Path) -> bool:
    """True when ``snapshot`` is a Hub cache snapshot folder and ``resolved`` lies in its repo's blobs.

    huggingface_hub stores each file once under ``models--org--name/blobs/`` and links it from
    ``snapshots/<commit>/``: a shard index there names links that leave the snapshot folder, by design.
    """
    if snapshot.parent.name != "snapshots" or not snapshot.parent.parent.name.startswith(
        "models--"
    ):
        return False
    try:
        blobs = (snapshot.parent.parent / "blobs").resolve()
    except (OSError, RuntimeError):
        return False
    return resolved.is_relative_to(blobs) and resolved.parent == blobs


def weight_files(files: list[str]) -> list[str]:
    """The files of a repo listing worth fetching: root-level safetensors and their index, else .bin weights."""
    root = [f for f in files if "/" not in f]
    safetensors = [f for f in root if f.endswith((".safetensors", ".safetensors.index.json"))]
    if any(f.endswith(".safetensors") for f in safetensors):
        return safetensors
    bins = [f for f in root if f.startswith("pytorch_model") and f.endswith(".bin")]
    bins = bins or [f for f in root if f.endswith(".bin")]  # not training_args.bin if avoidable
    return bins + [f for f in root if f.endswith(".bin.index.json") and f not in bins]


def _snapshot(cache: Path, ref: RepoRef) -> Path | None:
    """The snapshot folder of the revision: refs/<branch or tag> names a commit, a hash names itself."""
    storage = cache / ("models--" + ref.repo_id.replace("/", "--"))
    revision = ref.revision or "main"
    ref_file = storage / "refs" / revision
    commit = revision
    if ref_file.is_file():
        try:
            with open(ref_file, "rb") as f:
                raw = f.read(_MAX_REF_BYTES + 1)  # a hash and a newline; never a huge file whole
        except OSError as e:
            raise CheckpointError(f"{show_path(ref_file)}: cannot read: {e.strerror}") from e
        commit = raw.decode("utf-8", errors="replace").strip()
        if len(raw) > _MAX_REF_BYTES or not re.fullmatch(r"[0-9a-f]{40}", commit):
            raise CheckpointError(
                f"{show_path(ref_file)}: not a commit hash; the Hugging Face cache looks damaged"
            )
    snapshot = storage / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _cached_weights(cache: Path, ref: RepoRef) -> tuple[Path | None, str | None]:
    """(the weights to open, None) when cached; else (None, the first missing file if partly cached)."""
    snapshot = _snapshot(cache, ref)
    if snapshot is None:
        return None, None
    names = [n for n in WEIGHT_NAMES if (snapshot / n).is_file()]
    if not names:
        for suffix in (".safetensors", ".bin"):
            loose = sorted(f.name for f in snapshot.iterdir() if f.name.endswith(suffix))
            if len(loose) == 1:
                names = loose
                break
    if not names:
        return None, None
    chosen = snapshot / names[0]
    _check_inside(snapshot, chosen)
    if chosen.name.endswith(".index.json"):
        missing = _missing_shard(chosen)
        if missing is not None:
            return None, missing
    return chosen, None


def _check_inside(snapshot: Path, chosen: Path) -> None:
    """The weights file is a link into the repo's blobs (or a plain file in the snapshot, where
    the cache was made without symlinks); a link anywhere else is refused, as in a shard index."""
    try:
        resolved = chosen.resolve(strict=True)
        plain = resolved.parent == snapshot.resolve(strict=True)
    except (OSError, RuntimeError):
        return  # missing or a loop: opening it says which, naming it
    if not plain and not in_blob_store(snapshot, resolved):
        raise CheckpointError(
            f"{show_path(chosen)}: leads outside the repo's blobs in the Hugging Face cache "
            f"({show_path(resolved)}); refused"
        )


def _missing_shard(index: Path) -> str | None:
    """The first shard an index names that is not in the snapshot (a partly downloaded repo)."""
    try:
        shards = dict.fromkeys(read_index(index).values())
    except CheckpointError:
        return None  # opening it reports the broken index, naming it
    for name in shards:
        if not (index.parent / name).is_file():
            return f"shard {name!r}"
    return None


def _fetch(ref: RepoRef, cache: Path) -> None:
    """Download the repo's weight files (and nothing else) into the cache.

    The Hub's endpoint is tried once first, with a bounded wait: without a network the client
    would retry for half a minute, printing a warning for each try. Its warnings stay off the
    terminal (``WCOND_DEBUG=1`` shows them); its progress bars do not.
    """
    hub = _require_hub()
    endpoint = getattr(getattr(hub, "constants", None), "ENDPOINT", "https://huggingface.co")
    why = _unreachable(endpoint)
    if why is not None:
        raise CheckpointError(f"{ref}: download failed: cannot reach {endpoint} ({why})")
    try:
        with _quiet_client():
            _download(hub, ref, cache)
    except CheckpointError:
        raise
    except (
        Exception
    ) as e:  # network, auth, offline mode, unknown repo: one line, the library's words
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ref}: download failed: {first[:200]}") from e


def _download(hub: Any, ref: RepoRef, cache: Path) -> None:
    files = hub.HfApi().list_repo_files(ref.repo_id, revision=ref.revision)
    wanted = weight_files(files)
    if not wanted:
        raise CheckpointError(f"{ref}: the repo holds no *.safetensors or *.bin weights")
    hub.snapshot_download(
        ref.repo_id, revision=ref.revision, allow_patterns=wanted, cache_dir=cache
    )


def _unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to the endpoint's host fails within CONNECT_TIMEOUT s; None if it opens."""
    url = urlsplit(endpoint)
    if not url.hostname:
        return None  # not a URL we can try; the client will say
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    return None


@contextmanager
def _quiet_client() -> Iterator[None]:
    """huggingface_hub's logged retries and Python warnings off the terminal, unless WCOND_DEBUG is set."""
    if os.environ.get("WCOND_DEBUG"):
        yield
        return
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _require_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as e:
        raise UsageError(
            "downloading from the Hugging Face Hub needs huggingface_hub: pip install 'wcond[hub]'"
        ) from e
    return huggingface_hub
