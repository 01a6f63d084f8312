"""A damaged or hostile Hugging Face cache: each repo id gets one line and exit 2, the cache untouched.

The cache is built here in huggingface_hub's layout (``models--org--name/{refs,snapshots,blobs}``,
tests/test_hub.py), then spoiled: refs holding garbage, something not a hash or gigabytes,
a snapshot folder missing or a file, weights linking outside the cache or in a loop, an index
naming a shard that is not there. Never the network (HF_HUB_OFFLINE, and no --download).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_fuzz_dcp import digest_dir
from test_fuzz_load import assert_all_answered, run_batch

import wcond

MAIN = "c" * 40


def _st_bytes(tmp: Path) -> bytes:
    f = tmp / "scratch.safetensors"
    save_file({"fc.weight": torch.randn(6, 4, generator=torch.Generator().manual_seed(0))}, str(f))
    return f.read_bytes()


def _repo(
    cache: Path, name: str, files: dict[str, bytes], ref: bytes | None = MAIN.encode()
) -> Path:
    """models--org--NAME with each file a blob linked from snapshots/MAIN, refs/main naming it."""
    storage = cache / f"models--org--{name}"
    (storage / "refs").mkdir(parents=True)
    (storage / "snapshots" / MAIN).mkdir(parents=True)
    (storage / "blobs").mkdir()
    for fname, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (storage / "snapshots" / MAIN / fname).symlink_to(
            os.path.relpath(blob, storage / "snapshots" / MAIN)
        )
    if ref is not None:
        (storage / "refs" / "main").write_bytes(ref)
    return storage


@pytest.fixture
def spoiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, str]]:
    """A cache of spoiled repos: org/NAME -> words its one error line must hold."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    st = _st_bytes(tmp_path)
    weights = {"model.safetensors": st}
    _repo(cache, "ok", weights)
    cases: dict[str, str] = {}

    _repo(cache, "refs-garbage", weights, ref=b"\xff\xfe\x00\x1b[31m" * 5)
    cases["refs-garbage"] = "not a commit hash"
    _repo(cache, "refs-not-hash", weights, ref=b"../../../../etc\n")
    cases["refs-not-hash"] = "not a commit hash"
    _repo(cache, "refs-short-hash", weights, ref=MAIN[:39].encode())
    cases["refs-short-hash"] = "not a commit hash"
    huge = _repo(cache, "refs-huge", weights, ref=None)
    with open(huge / "refs" / "main", "wb") as f:  # sparse: 4 GiB claimed, nothing written
        f.truncate(4 << 30)
    cases["refs-huge"] = "not a commit hash"
    s = _repo(cache, "refs-dangling", weights, ref=("d" * 40).encode())
    cases["refs-dangling"] = "not in the Hugging Face cache"
    s = _repo(cache, "no-snapshot", weights)
    for p in (s / "snapshots" / MAIN).iterdir():
        p.unlink()
    (s / "snapshots" / MAIN).rmdir()
    cases["no-snapshot"] = "not in the Hugging Face cache"
    s = _repo(cache, "snapshot-file", {})
    (s / "snapshots" / MAIN).rmdir()
    (s / "snapshots" / MAIN).write_bytes(st)
    cases["snapshot-file"] = "not in the Hugging Face cache"
    s = _repo(cache, "empty-snapshot", {"config.json": b"{}"})
    cases["empty-snapshot"] = "not in the Hugging Face cache"

    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(st)
    s = _repo(cache, "blob-outside", {})
    (s / "snapshots" / MAIN / "model.safetensors").symlink_to(outside)
    cases["blob-outside"] = "leads outside the repo's blobs in the Hugging Face cache ("
    s = _repo(cache, "blob-escapes", {})
    (s / "blobs" / "abc").symlink_to(outside)  # the blob itself a link out
    (s / "snapshots" / MAIN / "model.safetensors").symlink_to("../../blobs/abc")
    cases["blob-escapes"] = "leads outside the repo's blobs in the Hugging Face cache ("
    s = _repo(cache, "blob-loop", {})
    snap = s / "snapshots" / MAIN
    (snap / "model.safetensors").symlink_to("../../blobs/x")
    (s / "blobs" / "x").symlink_to("y")
    (s / "blobs" / "y").symlink_to("x")
    cases["blob-loop"] = "symlink loop"
    s = _repo(cache, "blob-missing", {})
    (s / "snapshots" / MAIN / "model.safetensors").symlink_to("../../blobs/gone")
    cases["blob-missing"] = "model.safetensors: no such file or directory"
    s = _repo(cache, "blob-fifo", {})
    os.mkfifo(s / "blobs" / "fifo")
    (s / "snapshots" / MAIN / "model.safetensors").symlink_to("../../blobs/fifo")
    cases["blob-fifo"] = "is a FIFO (named pipe)"

    index = {
        "weight_map": {
            "fc.weight": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    _repo(
        cache,
        "missing-shard",
        {
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": st,
        },
    )
    cases["missing-shard"] = (
        "shard 'model-00002-of-00002.safetensors' missing from the Hugging Face cache"
    )
    _repo(
        cache,
        "index-garbage",
        {"model.safetensors.index.json": b"\xff{[", "model-00001-of-00002.safetensors": st},
    )
    cases["index-garbage"] = "model.safetensors.index.json"
    out_index = {"weight_map": {"fc.weight": "../../../../outside.safetensors"}}
    _repo(cache, "index-outside", {"model.safetensors.index.json": json.dumps(out_index).encode()})
    cases["index-outside"] = "outside the index's directory"
    return cache, cases


def test_spoiled_hub_cache(spoiled: tuple[Path, dict[str, str]]) -> None:
    cache, cases = spoiled
    before = digest_dir(cache)
    cmds = [["inspect", f"org/{name}"] for name in cases] + [["inspect", "org/ok", "-f", "json"]]
    t = time.perf_counter()
    results = run_batch(cmds, timeout=120)
    assert time.perf_counter() - t < 60  # the 4 GiB refs file is never read whole
    assert_all_answered(results, len(cmds))
    for r, (name, words) in zip(results, cases.items()):
        assert r["code"] == 2, (name, r["out"])
        (line,) = [ln for ln in r["out"].splitlines() if ln.startswith("error:")]
        assert words in line, (name, line)
        assert "\x1b" not in r["out"], (name, line)  # nothing from a file reaches the terminal raw
    assert results[-1]["code"] == 0
    assert [x["name"] for x in json.loads(results[-1]["out"])["layers"]] == ["fc.weight"]
    assert digest_dir(cache) == before


def test_refs_read_is_bounded(spoiled: tuple[Path, dict[str, str]]) -> None:
    """The library reads at most a few bytes of refs/main, whatever its size."""
    t = time.perf_counter()
    with pytest.raises(wcond.CheckpointError, match="refs/main: not a commit hash"):
        wcond.open_checkpoint("org/refs-huge")
    assert time.perf_counter() - t < 2
