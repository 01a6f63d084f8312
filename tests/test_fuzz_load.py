"""Hostile and odd input: every file gets a report or one clear line, quickly, and is left unchanged.

Hand-made files for each way a checkpoint can be bad (special files, malformed pickles, forged
zip records, forged safetensors headers, shard indexes pointing outside their directory, odd
tensor types), then seeded mutations of a torch pickle stream and of a safetensors header.
The commands run in one child process (tests/_fuzz_child below) under a time bound, so a hang
fails the test instead of stalling it; in that process the CLI runs in-process via CliRunner.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import random
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wcond import CheckpointError, UnsafeCheckpointError, open_checkpoint

ROOT = Path(__file__).resolve().parents[1]
OK_CODES = {0, 1, 2}

# Runs each command of a JSON list through the CLI in-process; prints one JSON line per command.
CHILD = r"""
import json, sys, time, warnings
from typer.testing import CliRunner
from wcond.cli import app
runner = CliRunner()
for args in json.loads(sys.stdin.read()):
    t = time.perf_counter()
    r = runner.invoke(app, args)
    exc = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)
    print(json.dumps({"args": args, "code": r.exit_code, "out": r.output, "exc": exc,
                      "s": time.perf_counter() - t}), flush=True)
"""


def run_batch(commands: list[list[str]], timeout: float = 240) -> list[dict]:
    """Run CLI commands in one child process; a hang anywhere fails with TimeoutExpired."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    env.pop("WCOND_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(commands),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def digest(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def assert_all_answered(results: list[dict], n: int) -> None:
    assert len(results) == n
    for r in results:
        where = " ".join(r["args"])
        assert r["exc"] is None, f"{where}: {r['exc']}"
        assert r["code"] in OK_CODES, f"{where}: exit {r['code']}: {r['out'][-500:]}"
        assert "Traceback" not in r["out"], f"{where}: {r['out'][-800:]}"
        # the CLI's last-resort line for a bug: hostile input must meet a named check instead
        assert "internal error" not in r["out"], f"{where}: {r['out'][-800:]}"
        if r["code"] == 2:  # one line naming the problem
            errors = [ln for ln in r["out"].splitlines() if ln.startswith("error:")]
            assert len(errors) == 1, f"{where}: {r['out']}"


# --------------------------------------------------------------------------- file makers


def good_torch(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    torch.save(
        {"conv.weight": torch.randn(8, 4, 3, 3, generator=g), "fc.weight": torch.randn(6, 5)}, path
    )
    return path


def pickle_of(path: Path) -> tuple[str, bytes]:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        return name, z.read(name)


def repack(
    src: Path, dst: Path, *, pkl: bytes | None = None, drop: str = "", cut: str = ""
) -> Path:
    """Copy a torch zip with data.pkl replaced, a record dropped, or a record cut to 10 bytes."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for n in zi.namelist():
            b = zi.read(n)
            if drop and n.endswith(drop):
                continue
            if pkl is not None and n.endswith("/data.pkl"):
                b = pkl
            if cut and n.endswith(cut):
                b = b[:10]
            zo.writestr(n, b)
    return dst


def safetensors_bytes(
    header: dict | list | str | bytes, data: bytes = b"", n: int | None = None
) -> bytes:
    raw = (
        header
        if isinstance(header, bytes)
        else (header if isinstance(header, str) else json.dumps(header)).encode()
    )
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def f32(shape: list[int], begin: int = 0) -> dict:
    size = 4 * int(torch.tensor(shape).prod()) if shape else 4
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + size]}


def hostile_torch_files(d: Path) -> dict[str, Path]:
    good = good_torch(d / "good.pt")
    name, pkl = pickle_of(good)
    rebuild_v2 = b"ctorch._utils\n_rebuild_tensor_v2\n"
    cases: dict[str, bytes] = {
        "empty_pickle": b"",
        "stop_only": b".",
        "unknown_opcode": b"\x80\x02\xff.",
        "list_not_dict": pickle.dumps([1, 2, 3], protocol=2),
        "tensor_less_dict": pickle.dumps({"a": 1}, protocol=2),
        "unsafe_global": b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R.",
        # BUILD (b) of an OrderedDict with a state that is not a dict
        "build_wrong_state": b"\x80\x02ccollections\nOrderedDict\n)RK\x05b.",
        # _rebuild_tensor_v2 called with no arguments / a string for a storage
        "rebuild_no_args": b"\x80\x02}X\x01\x00\x00\x00a" + rebuild_v2 + b")Rs.",
        "rebuild_bad_args": b"\x80\x02}X\x01\x00\x00\x00a"
        + rebuild_v2
        + b"(X\x01\x00\x00\x00xK\x00K\x02\x85K\x01\x85\x89)tRs.",
        "deep_dicts": b"\x80\x02" + b"}X\x01\x00\x00\x00a" * 5000 + b"}" + b"s" * 5000 + b".",
        "deep_lists": b"\x80\x02" + b"]" * 20000 + b"a" * 19999 + b".",
        # fc.weight: a shape 131072 / 6 times what its storage holds
        "storage_short": pkl.replace(b"K\x06K\x05\x86", b"J\x00\x00\x02\x00K\x05\x86", 1),
        # size and stride of different lengths
        "size_stride_mismatch": pkl.replace(b"K\x06K\x05\x86", b"K\x06K\x05K\x01\x87", 1),
    }
    assert cases["storage_short"] != pkl and cases["size_stride_mismatch"] != pkl
    out = {k: repack(good, d / f"{k}.pt", pkl=v) for k, v in cases.items()}
    out["missing_record"] = repack(good, d / "missing_record.pt", drop="/data/0")
    out["truncated_record"] = repack(good, d / "truncated_record.pt", cut="/data/1")
    raw = good.read_bytes()
    (d / "truncated_zip.pt").write_bytes(raw[: len(raw) // 2])
    out["truncated_zip"] = d / "truncated_zip.pt"
    (d / "truncated_zip_tail.pt").write_bytes(raw[:-30])  # torch's reader says only EINVAL here
    out["truncated_zip_tail"] = d / "truncated_zip_tail.pt"
    legacy = d / "legacy.pt"
    torch.save({"fc.weight": torch.randn(6, 5)}, legacy, _use_new_zipfile_serialization=False)
    (d / "truncated_legacy.pt").write_bytes(legacy.read_bytes()[:-40])
    out["truncated_legacy"] = d / "truncated_legacy.pt"
    (d / "zeros.pt").write_bytes(b"\0" * 4096)
    out["zeros"] = d / "zeros.pt"
    return out


def hostile_safetensors_files(d: Path) -> dict[str, Path]:
    w = f32([4, 4])
    data = bytes(64)
    cases: dict[str, bytes] = {
        "huge_header_len": safetensors_bytes({"w": w}, data, n=2**62),
        "header_past_end": safetensors_bytes({"w": w}, data, n=5000),
        "not_json": safetensors_bytes(b"{not json", data),
        "not_object": safetensors_bytes([1, 2], data),
        "not_utf8": safetensors_bytes(b'{"\xff": 1}', data),
        "deep_json": safetensors_bytes("{" + '"a":[' * 5000 + "]" * 5000 + "}", data),
        "duplicate_key": safetensors_bytes(
            '{"w": %s, "w": %s}' % (json.dumps(w), json.dumps(f32([2, 8]))), data
        ),
        "unknown_dtype": safetensors_bytes({"w": {**w, "dtype": "F17"}}, data),
        "negative_shape": safetensors_bytes({"w": {**w, "shape": [-4, -4]}}, data),
        "float_shape": safetensors_bytes({"w": {**w, "shape": [4.0, 4]}}, data),
        "offsets_past_end": safetensors_bytes({"w": {**w, "data_offsets": [0, 6400]}}, data),
        "offsets_reversed": safetensors_bytes({"w": {**w, "data_offsets": [64, 0]}}, data),
        "shape_disagrees": safetensors_bytes({"w": {**w, "shape": [400, 400]}}, data),
        "overlap": safetensors_bytes({"a": f32([2, 4]), "b": f32([4, 2], 16)}, data),
        "bad_metadata": safetensors_bytes({"__metadata__": {"k": 3}, "w": w}, data),
        "entry_not_object": safetensors_bytes({"w": [1, 2]}, data),
        "short_file": b"\x05\x00",
        "empty_header": safetensors_bytes({}, b""),
    }
    return {k: _write(d / f"{k}.safetensors", v) for k, v in cases.items()}


def hostile_index_dirs(d: Path) -> dict[str, Path]:
    shard = d / "shards"
    shard.mkdir()
    save_file({"fc.weight": torch.randn(6, 5)}, str(shard / "a.safetensors"))
    outside = d / "outside.safetensors"
    save_file({"x.weight": torch.randn(6, 5)}, str(outside))
    (shard / "link.safetensors").symlink_to(outside)
    (shard / "loop1.safetensors").symlink_to(shard / "loop2.safetensors")
    (shard / "loop2.safetensors").symlink_to(shard / "loop1.safetensors")
    maps = {
        "dotdot": {"weight_map": {"x.weight": "../outside.safetensors"}},
        "absolute": {"weight_map": {"x.weight": str(outside)}},
        "symlink_out": {"weight_map": {"x.weight": "link.safetensors"}},
        "symlink_loop": {"weight_map": {"x.weight": "loop1.safetensors"}},
        "value_not_string": {"weight_map": {"fc.weight": 7}},
        "value_dict": {"weight_map": {"fc.weight": {"a": "b"}}},
        "weight_map_list": {"weight_map": ["a.safetensors"]},
        "no_weight_map": {"metadata": {}},
        "missing_shard": {"weight_map": {"fc.weight": "b.safetensors"}},
    }
    out = {k: _write(shard / f"{k}.index.json", json.dumps(v).encode()) for k, v in maps.items()}
    out["deep_json"] = _write(
        shard / "deep_json.index.json",
        ('{"weight_map":' + "[" * 10000 + "]" * 10000 + "}").encode(),
    )
    out["not_json"] = _write(shard / "not_json.index.json", b"\xff\xfe{")
    return out


def odd_tensor_files(d: Path) -> dict[str, Path]:
    """Valid files with tensors wcond must analyze (FP8) or skip with a note (the rest)."""
    g = torch.Generator().manual_seed(1)
    fp8 = {
        "e4m3.weight": torch.randn(6, 5, generator=g).to(torch.float8_e4m3fn),
        "e5m2.weight": torch.randn(6, 5, generator=g).to(torch.float8_e5m2),
    }
    odd = {
        **fp8,
        "fc.weight": torch.randn(6, 5, generator=g),
        "coo.weight": torch.randn(6, 5, generator=g).to_sparse(),
        "csr.weight": torch.randn(6, 5, generator=g).to_sparse_csr(),
        "meta.weight": torch.empty(6, 5, device="meta"),
        "zero.weight": torch.empty(6, 0),
        "expanded.weight": torch.randn(1, 5, generator=g).expand(100_000, 5),
        "ids": torch.arange(12).reshape(3, 4),
        "mask": torch.ones(3, 4, dtype=torch.bool),
    }
    torch.save(odd, d / "odd.pt")
    save_file(
        {**fp8, "fc.weight": torch.randn(6, 5), "zero.weight": torch.empty(6, 0)},
        str(d / "odd.safetensors"),
    )
    return {"odd_torch": d / "odd.pt", "odd_safetensors": d / "odd.safetensors"}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- hand-made cases


def test_hand_made_hostile_files(tmp_path: Path) -> None:
    """inspect, diff (both sides) and init-cs on every hostile file: exit 2 with one error line."""
    files = {
        **hostile_torch_files(tmp_path),
        **hostile_safetensors_files(tmp_path),
        **hostile_index_dirs(tmp_path),
    }
    good = tmp_path / "good.pt"
    bad = {k: p for k, p in files.items() if k not in ("good",)}
    before = digest([*bad.values(), good])
    cmds: list[list[str]] = []
    for p in bad.values():
        cmds += [
            ["inspect", str(p)],
            ["diff", str(good), str(p)],
            ["diff", str(p), str(good)],
            ["init-cs", str(p), "-o", str(tmp_path / "out.safetensors"), "--force"],
            ["shrink", str(p), "-o", str(tmp_path / "out_s.safetensors"), "--force"],
        ]
    results = run_batch(cmds)
    assert_all_answered(results, len(cmds))
    for r in results:
        assert r["code"] == 2, f"{r['args']}: {r['out']}"
    by_file = {r["args"][1]: r["out"] for r in results if r["args"][0] == "inspect"}
    # each message names the file (escaped) and what is wrong
    expect = {
        "unsafe_global": "refused: its pickle would construct the object os.system",
        "unknown_opcode": "malformed pickle",
        "list_not_dict": "holds a list, not a state dict",
        "deep_dicts": "nested more than",
        "deep_lists": "nested more than",
        "storage_short": "needs more bytes than its storage holds",
        "truncated_record": "holds 10",
        "missing_record": "corrupt or truncated torch checkpoint",
        "truncated_legacy": "unexpected EOF",
        "truncated_zip": "its zip archive is incomplete or damaged",
        "truncated_zip_tail": "its zip archive is incomplete or damaged",
        "duplicate_key": "names 'w' twice",
        "huge_header_len": "header says 4611686018427387904 bytes",
        "header_past_end": "truncated",
        "deep_json": "nests",
        "unknown_dtype": "unknown dtype",
        "negative_shape": "non-negative integers",
        "offsets_past_end": "past the 64 data bytes",
        "shape_disagrees": "needs 640000 bytes",
        "overlap": "overlap",
        "not_object": "unknown format",
        "dotdot": "outside the index's directory",
        "absolute": "outside the index's directory",
        "symlink_out": "outside the index's directory",
        "value_not_string": "must be a shard file name",
        "weight_map_list": "'weight_map' object",
    }
    for key, words in expect.items():
        out = by_file[str(files[key])]
        assert str(files[key]) in out and words in out, (key, out)
    assert digest([*bad.values(), good]) == before
    assert not (tmp_path / "out.safetensors").exists()


def test_no_code_runs(tmp_path: Path) -> None:
    """An unsafe pickle is refused by name; its payload never runs."""
    marker = tmp_path / "ran"
    payload = f"touch {marker}".encode()
    pkl = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(payload)) + payload + b"\x85R."
    bad = repack(good_torch(tmp_path / "good.pt"), tmp_path / "evil.pt", pkl=pkl)
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        open_checkpoint(bad)
    assert not marker.exists()


def special_files(d: Path) -> dict[str, tuple[Path, str]]:
    """A FIFO, a socket, a character device and a symlink loop, each with the words of its error."""
    fifo = d / "fifo.pt"
    os.mkfifo(fifo)
    sock = d / "sock.safetensors"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()
    loop = d / "a.pt"
    loop.symlink_to(d / "b.pt")
    (d / "b.pt").symlink_to(loop)
    return {
        "fifo": (fifo, "is a FIFO"),
        "socket": (sock, "is a socket"),
        "chardev": (Path("/dev/zero"), "is a character device"),
        "loop": (loop, "symlink loop"),
    }


_HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # plot asks for it first


def test_special_files_refused_without_blocking(tmp_path: Path) -> None:
    """Refused before any open: a FIFO with no writer would block a reader forever."""
    good = good_torch(tmp_path / "good.pt")
    cmds, words = [], []
    for kind, (path, why) in special_files(tmp_path).items():
        if kind != "fifo":  # in this process only what cannot block it, should the check regress
            with pytest.raises(CheckpointError, match=why):
                open_checkpoint(path)
        for cmd in (
            ["inspect", str(path)],
            ["diff", str(good), str(path)],
            ["diff", str(path), str(good)],
            ["init-cs", str(path), "-o", str(tmp_path / "o.pt")],
            ["shrink", str(path), "-o", str(tmp_path / "o.safetensors")],
            ["expand", str(path), "-o", str(tmp_path / "e.safetensors")],
            *([["plot", str(path), "-o", str(tmp_path / "p.png")]] if _HAS_MATPLOTLIB else []),
        ):
            cmds.append(cmd)
            words.append(why)
    results = run_batch(cmds, timeout=120)
    assert_all_answered(results, len(cmds))
    for r, why in zip(results, words):
        assert r["code"] == 2 and why in r["out"], r


def test_non_utf8_file_names_read_like_any_other(tmp_path: Path) -> None:
    d = os.fsencode(tmp_path)
    pt, st = d + b"/\xff\x1b.pt", d + b"/\xfe.safetensors"
    torch.save({"fc.weight": torch.randn(6, 5)}, os.fsdecode(pt))
    save_file({"fc.weight": torch.randn(6, 5)}, os.fsdecode(st))
    assert open_checkpoint(pt).keys() == ["fc.weight"]  # bytes paths, as os.listdir(bytes) gives
    assert open_checkpoint(st).get("fc.weight").shape == (6, 5)
    results = run_batch([["inspect", os.fsdecode(p), "-f", "json"] for p in (pt, st)])
    assert_all_answered(results, 2)
    for r in results:
        assert r["code"] == 0
        assert [layer["name"] for layer in json.loads(r["out"])["layers"]] == ["fc.weight"]
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(d + b"/\xfd\x1b[31m.pt")
    assert "\\xfd\\x1b[31m.pt: no such file" in str(e.value)  # escaped, never raw


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_odd_tensor_types(tmp_path: Path) -> None:
    """FP8 is analyzed; sparse, meta, zero-size and broadcast tensors are skipped with a note."""
    files = odd_tensor_files(tmp_path)
    before = digest(list(files.values()))
    cmds = [["inspect", str(p), "-f", "json"] for p in files.values()]
    cmds += [["diff", str(files["odd_torch"]), str(files["odd_safetensors"]), "-f", "json"]]
    cmds += [["init-cs", str(files["odd_torch"]), "-o", str(tmp_path / "o.pt")]]
    cmds += [["shrink", str(files["odd_torch"]), "-o", str(tmp_path / "s.pt"), "-f", "json"]]
    cmds += [["shrink", str(files["odd_torch"]), "-o", str(tmp_path / "s.safetensors")]]
    results = run_batch(cmds)
    assert_all_answered(results, len(cmds))
    torch_rep, st_rep = (json.loads(r["out"]) for r in results[:2])
    assert [x["name"] for x in torch_rep["layers"]] == ["e4m3.weight", "e5m2.weight", "fc.weight"]
    assert [x["dtype"] for x in torch_rep["layers"][:2]] == ["float8_e4m3fn", "float8_e5m2"]
    assert all(x["acv_mean"] is not None for x in torch_rep["layers"])
    skipped = torch_rep["summary"]["skipped"]
    assert set(skipped) == {
        "coo.weight",
        "csr.weight",
        "meta.weight",
        "zero.weight",
        "expanded.weight",
    }
    assert "sparse" in skipped["coo.weight"] and "meta tensor" in skipped["meta.weight"]
    assert "broadcast view" in skipped["expanded.weight"]
    assert torch_rep["summary"]["skipped_tensors"] == 7  # the five above, ids and mask
    assert [x["name"] for x in st_rep["layers"]] == ["e4m3.weight", "e5m2.weight", "fc.weight"]
    assert list(st_rep["summary"]["skipped"]) == ["zero.weight"]
    shrunk = json.loads(results[-2]["out"])
    notes = {x["name"]: x["notes"] for x in shrunk["layers"]}
    assert any("FP8 weights: not fused" in n for n in notes["e5m2.weight"])
    # safetensors cannot hold the sparse tensors that a torch file can: one line, nothing written
    assert (
        results[-1]["code"] == 2
        and "is sparse; safetensors holds dense tensors only" in (results[-1]["out"])
    )
    assert not (tmp_path / "s.safetensors").exists()
    assert digest(list(files.values())) == before


def test_fp8_matches_its_float32_upcast(tmp_path: Path) -> None:
    """The FP8 numbers are those of the same values in float32 (FP8 -> fp32 is exact)."""
    import wcond

    w8 = torch.randn(7, 6, generator=torch.Generator().manual_seed(3)).to(torch.float8_e4m3fn)
    save_file({"a.weight": w8}, str(tmp_path / "a.safetensors"))
    save_file({"a.weight": w8.float()}, str(tmp_path / "b.safetensors"))
    a, b = (wcond.inspect(tmp_path / f).layers[0] for f in ("a.safetensors", "b.safetensors"))
    assert a.dtype == "float8_e4m3fn" and a.acv_sum == b.acv_sum and a.rare_rows == b.rare_rows


def test_header_length_limit_checked_before_reading(tmp_path: Path) -> None:
    """A 150 MB header claim in a (sparse) 200 MB file is refused before any of it is read."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 150_000_000) + b"{")
        f.truncate(200_000_000)
    with pytest.raises(CheckpointError, match="exceeds the 100000000-byte limit"):
        open_checkpoint(path)


def test_index_size_limit(tmp_path: Path, monkeypatch) -> None:
    import wcond.checkpoint.index

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}) + " " * 200)
    monkeypatch.setattr(wcond.checkpoint.index, "MAX_INDEX_BYTES", 100)
    with pytest.raises(CheckpointError, match="larger than 100 bytes"):
        open_checkpoint(tmp_path)


def test_many_small_tensors_read_once_each(tmp_path: Path, monkeypatch) -> None:
    """The header of a safetensors file is parsed once, not once per tensor (quadratic before)."""
    import wcond.checkpoint.safetensors_file

    path = tmp_path / "moe.safetensors"
    save_file({f"experts.{i}.weight": torch.randn(3, 2) for i in range(300)}, str(path))
    expected = load_file(str(path))
    calls = []
    real = wcond.checkpoint.safetensors_file.read_header
    monkeypatch.setattr(
        wcond.checkpoint.safetensors_file, "read_header", lambda f: calls.append(f) or real(f)
    )
    ck = open_checkpoint(path)
    assert ck.keys()[:3] == ["experts.0.weight", "experts.1.weight", "experts.2.weight"]
    assert all(torch.equal(t, expected[k]) for k, t in ck.items())
    assert len(calls) == 1


# --------------------------------------------------------------------------- mutation fuzzing


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: flip a byte, insert or delete a few, truncate, duplicate a slice."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["flip", "insert", "delete", "truncate", "dup", "digit"])
        i = rng.randrange(len(b)) if b else 0
        if op == "flip" and b:
            b[i] = rng.randrange(256)
        elif op == "insert":
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif op == "delete":
            del b[i : i + rng.randint(1, 4)]
        elif op == "truncate":
            del b[i:]
        elif op == "dup" and b:
            j = min(len(b), i + rng.randint(1, 16))
            b[i:i] = b[i:j]
        elif op == "digit":  # JSON numbers: make a shape or offset something else
            digits = [k for k, c in enumerate(b) if 48 <= c <= 57]
            if digits:
                b[rng.choice(digits)] = rng.choice(b"0123456789-.e")
    return bytes(b)


def test_mutated_torch_pickles(tmp_path: Path) -> None:
    good = good_torch(tmp_path / "good.pt")
    _, pkl = pickle_of(good)
    rng = random.Random(1234)
    files = [repack(good, tmp_path / f"m{i}.pt", pkl=mutate(pkl, rng)) for i in range(40)]
    before = digest([good, *files])
    cmds = [["inspect", str(f), "-f", "json"] for f in files]
    cmds += [["diff", str(good), str(f)] for f in files[::4]]
    cmds += [["init-cs", str(f), "-o", str(tmp_path / f"{f.stem}_cs.pt")] for f in files[::4]]
    results = run_batch(cmds)
    assert_all_answered(results, len(cmds))
    assert digest([good, *files]) == before
    assert any(r["code"] == 2 for r in results)  # the mutations did break files


def test_mutated_safetensors_headers(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "a.weight": torch.randn(6, 4, generator=g),
            "b.weight": torch.randn(5, 3, 3, 3, generator=g),
        },
        str(good),
        metadata={"format": "pt"},
    )
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8 : 8 + n], raw[8 + n :]
    rng = random.Random(99)
    files = []
    for i in range(40):
        h = mutate(header, rng)
        length = len(h) if rng.random() < 0.8 else rng.choice([0, 1, len(h) + 7, 2**40, n])
        files.append(_write(tmp_path / f"m{i}.safetensors", struct.pack("<Q", length) + h + data))
    before = digest([good, *files])
    cmds = [["inspect", str(f), "-f", "json"] for f in files]
    cmds += [["diff", str(f), str(good)] for f in files[::4]]
    cmds += [["shrink", str(f), "-o", str(tmp_path / f"{f.stem}_s.pt")] for f in files[::4]]
    results = run_batch(cmds)
    assert_all_answered(results, len(cmds))
    assert digest([good, *files]) == before
    assert any(r["code"] == 2 for r in results)


def test_safetensors_validation_matches_safetensors_on_valid_files(tmp_path: Path) -> None:
    """Our reader returns exactly what safetensors' own loader does, every dtype included."""
    g = torch.Generator().manual_seed(5)
    tensors = {
        f"t.{dt}": torch.randn(3, 4, generator=g).to(dt)
        for dt in (
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.float64,
            torch.int8,
            torch.int64,
            torch.uint8,
            torch.bool,
            torch.float8_e4m3fn,
            torch.float8_e5m2,
        )
    }
    tensors["empty"] = torch.empty(0, 4)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    ck = open_checkpoint(path)
    ref = load_file(str(path))
    assert ck.metadata == {"k": "v"}
    for k, t in ref.items():
        got = ck.get(k)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)), k
