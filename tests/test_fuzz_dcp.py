"""Hostile DCP directories: each gets a report or one line and exit 2 through the CLI, inputs untouched.

The directories start from what ``torch.distributed.checkpoint.save`` writes (no process group),
or are forged with DCP's own classes: a tensor split into two chunks, as FSDP writes it, read
back whole; then metadata that lies (sizes, chunks, storage entries), shards that are cut,
damaged, missing, special files or links leading out, and ``.metadata`` files that are no DCP
pickle. The commands run in one child process under a time bound (tests/test_fuzz_load.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_fuzz_load import assert_all_answered, run_batch

import wcond

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.filesystem import _StorageInfo  # noqa: E402
from torch.distributed.checkpoint.metadata import (  # noqa: E402
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from wcond.checkpoint import dcp_storage  # noqa: E402

SHARD = "__0_0.distcp"


def digest_dir(d: Path) -> dict[str, tuple[str, str]]:
    """Every entry under d (not following links): files by content hash (a file over 1 MiB, such
    as a sparse decoy of gigabytes, by size and mtime), links by target."""
    out: dict[str, tuple[str, str]] = {}
    for root, dirs, files in os.walk(d):
        for name in [*dirs, *files]:
            p = Path(root, name)
            rel = str(p.relative_to(d))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file() and st.st_size > 1 << 20:
                out[rel] = ("big file", f"{st.st_size} {st.st_mtime_ns}")
            elif p.is_file():
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("other", str(st.st_mode))
    return out


def saved(d: Path) -> Path:
    """A training state as torch.distributed.checkpoint.save writes it."""
    g = torch.Generator().manual_seed(0)
    state = {
        "model": {
            "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
            "fc.weight": torch.randn(6, 5, generator=g),
        },
        "step": 3,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(d))
    return d


def forged(
    d: Path,
    tensors: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]],
    shapes: dict[str, tuple[int, ...]],
) -> Path:
    """A DCP directory built from DCP's classes: each tensor as chunks (offsets, values) in one shard,
    each chunk a torch.save stream, as FileSystemWriter stores it."""
    d.mkdir()
    blob = io.BytesIO()
    sd_md, storage = {}, {}
    for fqn, chunks in tensors.items():
        metas = []
        for offsets, t in chunks:
            start = blob.tell()
            torch.save(t.clone(), blob)
            storage[MetadataIndex(fqn, offsets)] = _StorageInfo(SHARD, start, blob.tell() - start)
            metas.append(ChunkStorageMetadata(torch.Size(offsets), t.shape))
        sd_md[fqn] = TensorStorageMetadata(
            TensorProperties(dtype=chunks[0][1].dtype), torch.Size(shapes[fqn]), metas
        )
    (d / SHARD).write_bytes(blob.getvalue())
    write_md(
        d,
        Metadata(sd_md, planner_data={k: tuple(k.split(".")) for k in sd_md}, storage_data=storage),
    )
    return d


def write_md(d: Path, md: object) -> None:
    buf = io.BytesIO()
    pickle.dump(md, buf)
    (d / ".metadata").write_bytes(buf.getvalue())


def two_chunks(d: Path) -> Path:
    """fc.weight (6, 5) in two row chunks, as two FSDP ranks write it."""
    w = torch.arange(30, dtype=torch.float32).reshape(6, 5)
    return forged(d, {"fc.weight": [((0, 0), w[:4]), ((4, 0), w[4:])]}, {"fc.weight": (6, 5)})


def test_two_chunks_read_back_whole(tmp_path: Path) -> None:
    d = two_chunks(tmp_path / "ok")
    ck = wcond.open_checkpoint(d)
    assert ck.format == "dcp" and ck.keys() == ["fc.weight"]
    assert torch.equal(ck.get("fc.weight"), torch.arange(30, dtype=torch.float32).reshape(6, 5))


# ----------------------------------------------------------------------- hostile cases


def _md(d: Path) -> Metadata:
    return dcp_storage.read_metadata(d / ".metadata")


def _edit(fn: Callable[[Metadata], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        md = _md(d)
        fn(md)
        write_md(d, md)

    return apply


def _fc(md: Metadata) -> TensorStorageMetadata:
    return md.state_dict_metadata["fc.weight"]


def _storage(md: Metadata, index: int = 0) -> _StorageInfo:
    return [v for k, v in md.storage_data.items() if k.fqn == "fc.weight"][index]


def _cut_shard(keep: int) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        raw = (d / SHARD).read_bytes()
        (d / SHARD).write_bytes(raw[:keep])

    return apply


def _damage(d: Path) -> None:
    """Overwrite the middle of fc.weight's second chunk (its pickle and zip records)."""
    where = _storage(_md(d), 1)
    raw = bytearray((d / SHARD).read_bytes())
    mid = where.offset + where.length // 3
    raw[mid : mid + 200] = b"\xff" * 200
    (d / SHARD).write_bytes(bytes(raw))


def _replace_shard(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / SHARD).unlink()
        make(d / SHARD)

    return apply


def _link_outside(p: Path) -> None:
    outside = p.parent.parent / (p.parent.name + "_outside.distcp")
    two_chunks(p.parent.parent / (p.parent.name + "_src"))
    shutil.copy(p.parent.parent / (p.parent.name + "_src") / SHARD, outside)
    p.symlink_to(outside)


def _loop(p: Path) -> None:
    p.symlink_to(p.parent / "loop.distcp")
    (p.parent / "loop.distcp").symlink_to(p)


def _set(attr: str, value: object) -> Callable[[Path], None]:
    """Set one field of fc.weight's second storage entry."""
    return _edit(lambda md: setattr(_storage(md, 1), attr, value))


def _chunks(*chunks: tuple[tuple[int, int], tuple[int, int]]) -> Callable[[Metadata], None]:
    def apply(md: Metadata) -> None:
        _fc(md).chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks]

    return apply


class _Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


# name -> (how the two-chunk directory is spoiled, words the one error line must hold)
HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "huge_shape": (
        _edit(lambda md: setattr(_fc(md), "size", torch.Size([2**40, 2**40]))),
        "claims shape [1099511627776, 1099511627776] (1,208,925,819,614,629,174,706,176 values); "
        "refused above 2,147,483,648 values",
    ),
    "just_over_cap": (
        _edit(lambda md: setattr(_fc(md), "size", torch.Size([2**31 + 1]))),
        "refused above 2,147,483,648 values",
    ),
    "negative_shape": (
        _edit(lambda md: setattr(_fc(md), "size", (-6, 5))),
        "has no valid shape and dtype in the metadata",
    ),
    "dtype_string": (
        _edit(lambda md: setattr(_fc(md).properties, "dtype", "float32")),
        "has no valid shape and dtype in the metadata",
    ),
    "chunk_outside": (
        _edit(_chunks(((0, 0), (4, 5)), ((4, 0), (4, 5)))),
        "its chunk at offsets [4, 0] with sizes [4, 5] lies outside its shape [6, 5]",
    ),
    "chunks_short": (
        _edit(_chunks(((0, 0), (4, 5)))),
        "its chunks hold 20 values, its shape [6, 5] has 30",
    ),
    "chunks_twice": (
        _edit(_chunks(((0, 0), (4, 5)), ((4, 0), (2, 5)), ((4, 0), (2, 5)))),
        "its chunks hold 40 values, its shape [6, 5] has 30",
    ),
    "chunk_rank_mismatch": (
        _edit(_chunks(((0,), (30,)))),
        "has a malformed chunk in the metadata",
    ),
    "no_chunks": (_edit(lambda md: setattr(_fc(md), "chunks", [])), "has no chunk list"),
    "no_storage_entry": (
        _edit(lambda md: md.storage_data.pop(MetadataIndex("fc.weight", (4, 0)))),
        "no storage entry for its chunk at offsets [4, 0]",
    ),
    "storage_not_dict": (
        _edit(lambda md: setattr(md, "storage_data", [1, 2])),
        "malformed DCP metadata",
    ),
    "length_short": (
        _set("length", 10),
        "its chunk needs 40 bytes; its storage entry in '__0_0.distcp' holds 10",
    ),
    "negative_offset": (_set("offset", -5), "has no valid offset and length"),
    "offset_past_end": (_set("offset", 10**9), "of '__0_0.distcp', which holds"),
    "compressed": (_set("transform_descriptors", ["zstandard/1"]), "(compression)"),
    "dotdot": (_set("relative_path", "../x.distcp"), "points outside its directory"),
    "nul_in_path": (
        _set("relative_path", SHARD + "\0x"),
        "points outside its directory ('__0_0.distcp\\x00x')",
    ),
    "truncated_shard": (_cut_shard(1500), "(truncated?)"),
    "damaged_shard": (
        _damage,
        "cannot read tensor 'fc.weight' from its DCP shard '__0_0.distcp': damaged",
    ),
    "missing_shard": (
        lambda d: (d / SHARD).rename(d / "__1_0.distcp"),
        "is stored in '__0_0.distcp', which is missing",
    ),
    "symlink_out": (_replace_shard(_link_outside), "a link leading outside the directory; refused"),
    "symlink_loop": (_replace_shard(_loop), "is stored in '__0_0.distcp', a symlink loop"),
    "shard_is_fifo": (_replace_shard(os.mkfifo), "which is not a regular file"),
    "shard_is_dir": (_replace_shard(lambda p: p.mkdir()), "which is not a regular file"),
    "metadata_text": (
        lambda d: (d / ".metadata").write_text("not a pickle\n"),
        "corrupt DCP metadata",
    ),
    "metadata_empty": (
        lambda d: (d / ".metadata").write_bytes(b""),
        "corrupt DCP metadata (EOFError)",
    ),
    "metadata_dict": (lambda d: write_md(d, {"fc.weight": 1}), "not DCP metadata (holds a dict)"),
    "metadata_unsafe": (lambda d: write_md(d, _Boom()), "would construct 'posix.system'"),
    "metadata_cut": (
        lambda d: (d / ".metadata").write_bytes((d / ".metadata").read_bytes()[:-20]),
        "DCP metadata",
    ),
}


def test_hostile_dcp_directories(tmp_path: Path) -> None:
    """Each spoiled directory: inspect, diff and init-cs exit 2 with one line naming the directory."""
    good = saved(tmp_path / "good")
    dirs = {}
    for name, (spoil, _) in HOSTILE.items():
        d = two_chunks(tmp_path / name)
        spoil(d)
        dirs[name] = d
    before = {name: digest_dir(d) for name, d in dirs.items()}
    cmds = []
    for name, d in dirs.items():
        cmds.append(["inspect", str(d)])
        if name in (
            "huge_shape",
            "truncated_shard",
            "damaged_shard",
            "symlink_out",
            "metadata_text",
        ):
            cmds += [
                ["diff", str(good), str(d)],
                ["init-cs", str(d), "-o", str(tmp_path / "cs.pt"), "--force"],
                ["shrink", str(d), "-o", str(tmp_path / "s.safetensors"), "--force"],
            ]
    results = run_batch(cmds)
    assert_all_answered(results, len(cmds))
    by_dir = {r["args"][1]: r for r in results if r["args"][0] == "inspect"}
    for name, (_, words) in HOSTILE.items():
        r = by_dir[str(dirs[name])]
        assert r["code"] == 2, (name, r["out"])
        (line,) = [ln for ln in r["out"].splitlines() if ln.startswith("error:")]
        assert str(dirs[name]) in line and words in line, (name, line)
    for r in results:
        assert r["code"] == 2, (r["args"], r["out"])
    assert {name: digest_dir(d) for name, d in dirs.items()} == before
    assert not (tmp_path / "cs.pt").exists() and not (tmp_path / "s.safetensors").exists()


def test_saved_directory_damaged_like_a_user_would_meet_it(tmp_path: Path) -> None:
    """What dcp.save wrote, cut short or with a shard overwritten: one line naming the tensor."""
    cut, damaged = saved(tmp_path / "cut"), saved(tmp_path / "damaged")
    raw = (cut / SHARD).read_bytes()
    (cut / SHARD).write_bytes(raw[: len(raw) - 100])
    md = _md(damaged)
    where = next(v for k, v in md.storage_data.items() if k.fqn == "model.conv.weight")
    buf = bytearray((damaged / SHARD).read_bytes())
    buf[where.offset + 100 : where.offset + 300] = bytes(200)
    (damaged / SHARD).write_bytes(bytes(buf))
    results = run_batch(
        [["inspect", str(cut)], ["inspect", str(damaged)], ["inspect", str(saved(tmp_path / "ok"))]]
    )
    assert_all_answered(results, 3)
    assert [r["code"] for r in results] == [2, 2, 0]
    assert "DCP tensor 'model.fc.weight' is stored at bytes" in results[0]["out"]
    assert "(truncated?)" in results[0]["out"]
    assert (
        "cannot read tensor 'conv.weight' from its DCP shard '__0_0.distcp': damaged"
        in results[1]["out"]
    )
    assert "conv.weight" in results[2]["out"] and "fc.weight" in results[2]["out"]


def test_non_tensor_entries_stay_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step counter's bytes are never read, even when its storage entry points past the end."""
    d = saved(tmp_path / "d")
    md = _md(d)
    step = next(v for k, v in md.storage_data.items() if k.fqn == "step")
    step.offset = 10**12
    write_md(d, md)
    ck = wcond.open_checkpoint(d)
    assert ck.keys() == ["conv.weight", "fc.weight"]
    assert ck.get("fc.weight").shape == (6, 5)
