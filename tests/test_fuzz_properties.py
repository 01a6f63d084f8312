"""Property: whatever the bytes, reading a checkpoint succeeds or raises a WcondError, nothing else.

hypothesis mutates a safetensors header, the pickle stream inside a torch.save zip (data.pkl),
a DCP directory's ``.metadata`` and a shard index's JSON, both byte by byte and field by field
(values of any JSON or pickle type put where a shape, an offset or a file name belongs).
Each example is opened with ``open_checkpoint`` and every tensor read; the only exceptions
allowed are wcond's own (CheckpointError, UnsafeCheckpointError), which the CLI turns into one
line and exit 2. A few mutated files then go through the CLI itself. Runs are derandomized, so
CI sees the same examples each time.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_fuzz_dcp import saved
from test_fuzz_load import assert_all_answered, mutate, run_batch

from wcond import open_checkpoint
from wcond.errors import WcondError

dcp = pytest.importorskip("torch.distributed.checkpoint")

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run and in CI
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def read_everything(path: Path) -> None:
    """Open and read every tensor; a WcondError is a fine answer, any other exception is a bug."""
    try:
        ck = open_checkpoint(path)
        for key in ck.keys():
            ck.get(key)
    except WcondError:
        pass


@contextmanager
def scratch() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="wcond-fuzz-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# Byte edits: (op, where as a fraction of the length, bytes)
EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "truncate", "dup"]),
        st.floats(0, 1, allow_nan=False),
        st.binary(min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=4,
)


def edit(data: bytes, edits: list[tuple[str, float, bytes]]) -> bytes:
    b = bytearray(data)
    for op, where, chunk in edits:
        i = min(int(where * len(b)), max(len(b) - 1, 0))
        if op == "flip" and b:
            b[i : i + len(chunk)] = chunk[: len(b) - i]
        elif op == "insert":
            b[i:i] = chunk
        elif op == "delete":
            del b[i : i + len(chunk)]
        elif op == "truncate":
            del b[i:]
        elif op == "dup":
            b[i:i] = b[i : i + 4 * len(chunk)]
    return bytes(b)


# What a forged field may hold: any JSON value, and the numbers that break arithmetic
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64]),
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


# --------------------------------------------------------------------------- safetensors


def _safetensors(d: Path) -> bytes:
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "a.weight": torch.randn(6, 4, generator=g),
            "b.weight": torch.randn(5, 3, 3, 3, generator=g),
        },
        str(d / "good.safetensors"),
        metadata={"format": "pt"},
    )
    return (d / "good.safetensors").read_bytes()


def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@FUZZ
@given(edits=EDITS, fix_length=st.booleans())
def test_safetensors_header_bytes(edits: list, fix_length: bool) -> None:
    with scratch() as d:
        raw = _safetensors(d)
        (n,) = struct.unpack("<Q", raw[:8])
        header = edit(raw[8 : 8 + n], edits)
        length = len(header) if fix_length else n
        (d / "m.safetensors").write_bytes(struct.pack("<Q", length) + header + raw[8 + n :])
        read_everything(d / "m.safetensors")


@FUZZ
@given(
    tensor=st.sampled_from(["a.weight", "b.weight", "__metadata__"]),
    field=st.sampled_from(["dtype", "shape", "data_offsets", None]),
    value=JSON,
)
def test_safetensors_header_fields(tensor: str, field: str | None, value: Any) -> None:
    with scratch() as d:
        header, data = _split(_safetensors(d))
        if field is None or tensor == "__metadata__":
            header[tensor] = value
        else:
            header[tensor][field] = value
        raw = json.dumps(header).encode()
        (d / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        read_everything(d / "m.safetensors")


# --------------------------------------------------------------------------- torch pickles


def _torch_zip(d: Path, pkl: bytes | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    src = d / "good.pt"
    torch.save(
        {
            "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
            "fc.weight": torch.randn(6, 5, generator=g),
        },
        src,
    )
    if pkl is None:
        return src
    dst = d / "m.pt"
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for name in zi.namelist():
            zo.writestr(name, pkl if name.endswith("/data.pkl") else zi.read(name))
    return dst


def _data_pkl(d: Path) -> bytes:
    with zipfile.ZipFile(_torch_zip(d)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


@FUZZ
@given(edits=EDITS)
def test_torch_pickle_stream(edits: list) -> None:
    with scratch() as d:
        read_everything(_torch_zip(d, edit(_data_pkl(d), edits)))


@FUZZ
@given(
    old=st.sampled_from(
        [b"K\x06K\x05\x86", b"K\x08K\x04K\x03K\x03t", b"K\x00", b"ctorch\nFloatStorage\n"]
    ),
    new=st.binary(max_size=12),
)
def test_torch_pickle_values(old: bytes, new: bytes) -> None:
    """A shape tuple, a storage offset or a storage type replaced by other opcodes."""
    with scratch() as d:
        read_everything(_torch_zip(d, _data_pkl(d).replace(old, new, 1)))


# --------------------------------------------------------------------------- DCP metadata


def _dcp(d: Path) -> Path:
    (d / "ckpt").mkdir()
    return saved(d / "ckpt")


@FUZZ
@given(edits=EDITS)
def test_dcp_metadata_bytes(edits: list) -> None:
    with scratch() as d:
        ck = _dcp(d)
        md = ck / ".metadata"
        md.write_bytes(edit(md.read_bytes(), edits))
        read_everything(ck)


PICKLED = st.one_of(
    JSON,
    st.builds(torch.Size, st.lists(st.integers(-(2**40), 2**40), max_size=3)),
    st.sampled_from([torch.float32, torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn]),
)


@FUZZ
@given(
    target=st.sampled_from(
        [
            "size",
            "chunks",
            "dtype",
            "chunk.offsets",
            "chunk.sizes",
            "offset",
            "length",
            "relative_path",
            "entry",
        ]
    ),
    fqn=st.sampled_from(["model.fc.weight", "model.conv.weight", "step"]),
    value=PICKLED,
)
def test_dcp_metadata_fields(target: str, fqn: str, value: Any) -> None:
    """One field of the metadata (a tensor's size, chunks or dtype; a storage entry) set to a value of any type."""
    with scratch() as d:
        ck = _dcp(d)
        with open(ck / ".metadata", "rb") as f:
            md = pickle.load(f)  # written by torch just now: trusted
        entry = md.state_dict_metadata[fqn]
        where = next(v for k, v in md.storage_data.items() if k.fqn == fqn)
        if target in ("size", "chunks") and hasattr(entry, "chunks"):
            setattr(entry, target, value)
        elif target == "dtype" and hasattr(entry, "properties"):
            entry.properties.dtype = value
        elif target.startswith("chunk.") and hasattr(entry, "chunks"):
            setattr(entry.chunks[0], target.removeprefix("chunk."), value)
        elif target == "entry":
            md.state_dict_metadata[fqn] = value
        else:
            setattr(where, target, value)
        buf = io.BytesIO()
        pickle.dump(md, buf)
        (ck / ".metadata").write_bytes(buf.getvalue())
        read_everything(ck)


# --------------------------------------------------------------------------- shard indexes


def _index_dir(d: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file(
        {"a.weight": torch.randn(6, 4, generator=g)}, str(d / "model-00001-of-00002.safetensors")
    )
    save_file(
        {"b.weight": torch.randn(5, 3, generator=g)}, str(d / "model-00002-of-00002.safetensors")
    )
    return d / "model.safetensors.index.json"


INDEX = {
    "metadata": {"total_size": 156},
    "weight_map": {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
    },
}


@FUZZ
@given(edits=EDITS)
def test_index_json_bytes(edits: list) -> None:
    with scratch() as d:
        index = _index_dir(d)
        index.write_bytes(edit(json.dumps(INDEX).encode(), edits))
        read_everything(d)


@FUZZ
@given(where=st.sampled_from(["weight_map", "metadata", "a.weight", "new key", "root"]), value=JSON)
def test_index_json_fields(where: str, value: Any) -> None:
    with scratch() as d:
        index = _index_dir(d)
        doc: Any = json.loads(json.dumps(INDEX))
        if where == "root":
            doc = value
        elif where in ("weight_map", "metadata"):
            doc[where] = value
        elif where == "a.weight":
            doc["weight_map"]["a.weight"] = value
        else:
            doc["weight_map"][str(value)[:40]] = "model-00001-of-00002.safetensors"
        index.write_text(json.dumps(doc))
        read_everything(d)


# --------------------------------------------------------------------------- the CLI


def test_cli_on_mutated_files(tmp_path: Path) -> None:
    """A few mutants of each kind through `wcond inspect`: exit 0 or 2, one error line, files unchanged."""
    rng = random.Random(7)
    paths: list[Path] = []
    raw = _safetensors(tmp_path)
    (n,) = struct.unpack("<Q", raw[:8])
    pkl = _data_pkl(tmp_path)
    for i in range(4):
        h = mutate(raw[8 : 8 + n], rng)
        p = tmp_path / f"st{i}.safetensors"
        p.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])
        paths.append(p)
        d = tmp_path / f"pt{i}"
        d.mkdir()
        paths.append(_torch_zip(d, mutate(pkl, rng)))
        d = tmp_path / f"dcp{i}"
        d.mkdir()
        ck = _dcp(d)
        (ck / ".metadata").write_bytes(mutate((ck / ".metadata").read_bytes(), rng))
        paths.append(ck)
        d = tmp_path / f"idx{i}"
        d.mkdir()
        _index_dir(d).write_bytes(mutate(json.dumps(INDEX).encode(), rng))
        paths.append(d)
    files = sorted(f for p in paths for f in ([p] if p.is_file() else p.iterdir()))
    before = {f: f.read_bytes() for f in files}
    results = run_batch([["inspect", str(p)] for p in paths])
    assert_all_answered(results, len(paths))
    assert {r["code"] for r in results} <= {0, 2}
    assert any(r["code"] == 2 for r in results)  # the mutations did break files
    assert {f: f.read_bytes() for f in files} == before
