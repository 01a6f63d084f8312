"""wcond.checkpoint's readers: which one opens what, each path checked once, and the bounded JSON
reader every header, index and side file goes through."""

from __future__ import annotations

import json
import struct
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from wcond import CheckpointError, open_checkpoint
from wcond.checkpoint import open as open_module
from wcond.checkpoint import sharded
from wcond.checkpoint.bounded_json import (
    JSONTooDeep,
    JSONTooLarge,
    json_depth,
    parse_json,
    read_json,
)
from wcond.checkpoint.dcp import DCPCheckpoint
from wcond.checkpoint.safetensors_file import SafetensorsCheckpoint
from wcond.checkpoint.sharded import ShardedCheckpoint
from wcond.checkpoint.sniff import FILE_READERS, file_reader
from wcond.checkpoint.source import expand_paths, run_in_directory
from wcond.checkpoint.torch_file import TorchFileCheckpoint
from wcond.checkpoint.torchscript import TorchScriptCheckpoint
from wcond.cli import app
from wcond.trend import checkpoint_step

runner = CliRunner()


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Every check_path call of the readers, by path."""
    seen: Counter = Counter()
    real = open_module.check_path

    def counted(path):  # type: ignore[no-untyped-def]
        seen[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(open_module, "check_path", counted)
    monkeypatch.setattr(sharded, "check_path", counted)
    return seen


def test_a_file_is_checked_once(tmp_path: Path, checks: Counter) -> None:
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "m.safetensors"))
    open_checkpoint(tmp_path / "m.safetensors")
    assert checks == {"m.safetensors": 1}


def test_a_directory_with_one_file_checks_each_once(tmp_path: Path, checks: Counter) -> None:
    torch.save({"w": torch.ones(2, 2)}, tmp_path / "m.pt")
    assert open_checkpoint(tmp_path).format == "torch"
    assert checks == {tmp_path.name: 1, "m.pt": 1}


def test_an_index_and_its_shards_are_checked_once_each(tmp_path: Path, checks: Counter) -> None:
    save_file({"a": torch.ones(2, 2)}, str(tmp_path / "s1.safetensors"))
    torch.save({"b": torch.ones(3)}, tmp_path / "s2.bin")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.bin"}}))
    ck = open_checkpoint(tmp_path)
    assert isinstance(ck, ShardedCheckpoint) and ck.keys() == ["a", "b"]
    assert checks == {tmp_path.name: 1, index.name: 1, "s1.safetensors": 1, "s2.bin": 1}
    assert torch.equal(ck.get("b"), torch.ones(3)) and torch.equal(ck.get("a"), torch.ones(2, 2))


def safetensors_with_header_length(path: Path, n: int) -> None:
    """A valid safetensors file whose JSON header is exactly ``n`` bytes (padded with metadata)."""
    for pad in range(n):
        save_file({"w": torch.arange(4.0)}, str(path), metadata={"pad": "x" * pad})
        (length,) = struct.unpack("<Q", path.read_bytes()[:8])
        if length == n:
            return
    raise AssertionError(f"no padding gives a {n}-byte header")


@pytest.mark.parametrize("n", [0x280, 0x380, 0x480, 0x580])
def test_a_safetensors_header_that_starts_like_a_legacy_pickle_is_safetensors(
    tmp_path: Path, n: int
) -> None:
    """A header length of 0x280 is stored as 80 02 00 ..., the first bytes of a protocol-2 pickle."""
    path = tmp_path / "m.safetensors"
    safetensors_with_header_length(path, n)
    assert path.read_bytes()[:2] == bytes([0x80, n >> 8])
    assert file_reader(path) is SafetensorsCheckpoint
    ck = open_checkpoint(path)
    assert ck.format == "safetensors" and "pad" in ck.metadata
    assert torch.equal(ck.get("w"), torch.arange(4.0))


def test_each_reader_probes_only_its_own_format(tmp_path: Path) -> None:
    st, pt, legacy = tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "c.pt"
    jit = tmp_path / "d.pt"  # TorchScript under a torch file's suffix: the zip's names decide
    save_file({"w": torch.ones(1)}, str(st))
    torch.save({"w": torch.ones(1)}, pt)
    torch.save({"w": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(jit))
    for file, reader in (
        (st, SafetensorsCheckpoint),
        (pt, TorchFileCheckpoint),
        (legacy, TorchFileCheckpoint),
        (jit, TorchScriptCheckpoint),
    ):
        head, size = file.read_bytes()[:512], file.stat().st_size
        accepted = [r for r in FILE_READERS if r.probe(file, head, size)]
        # a TorchScript archive is a zip too: the torch reader would take it, so it is asked first
        assert accepted[0] is reader, file.name
        assert accepted == [reader] or accepted == [reader, TorchFileCheckpoint], file.name
        assert file_reader(file) is reader, file.name
    (tmp_path / "dcp").mkdir()
    assert not DCPCheckpoint.probe(tmp_path / "dcp")
    (tmp_path / "dcp" / ".metadata").write_bytes(b"")
    assert DCPCheckpoint.probe(tmp_path / "dcp")
    assert ShardedCheckpoint.probe(tmp_path / "x.index.json") and not ShardedCheckpoint.probe(st)


# --------------------------------------------------------------------------- bounded JSON


def test_depth_counts_brackets_outside_strings_only() -> None:
    assert json_depth('{"a": [[1]], "b": "[[[[{{{{"}') == 3
    assert json_depth("[]") == 1 and json_depth("1") == 0


def test_depth_limit_at_and_just_over() -> None:
    at = "[" * 8 + "]" * 8
    assert parse_json(at, max_depth=8) == [[[[[[[[]]]]]]]]
    with pytest.raises(JSONTooDeep) as e:
        parse_json("[" + at + "]", max_depth=8)
    assert (e.value.depth, e.value.limit) == (9, 8)


def test_size_limit_at_and_just_over(tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    f.write_text('{"a": 1}')  # 8 bytes
    assert read_json(f, max_bytes=8, max_depth=1) == {"a": 1}
    with pytest.raises(JSONTooLarge):
        read_json(f, max_bytes=7, max_depth=1)


def test_a_deep_document_never_reaches_the_parser() -> None:
    with pytest.raises(JSONTooDeep):
        parse_json("[" * 100_000, max_depth=8)


@pytest.mark.parametrize(
    "state",
    ["[" * 100_000, "not json", json.dumps([1, 2]), json.dumps({"global_step": "x"}), "\xff"],
)
def test_a_broken_trainer_state_leaves_the_step_to_the_name(tmp_path: Path, state: str) -> None:
    run = tmp_path / "checkpoint-300"
    run.mkdir()
    torch.save({"w": torch.ones(2)}, run / "pytorch_model.bin")
    (run / "trainer_state.json").write_text(state)
    assert checkpoint_step(run) == 300


# --------------------------------------------------------------------------- a directory: one checkpoint or a run


def write_run(d: Path, names_per_file: list[list[str]], suffix: str = ".safetensors") -> list[Path]:
    d.mkdir()
    files = []
    for i, names in enumerate(names_per_file):
        f = d / f"step_{(i + 1) * 100}{suffix}"
        tensors = {n: torch.full((4, 3), float(i + 1)) for n in names}
        save_file(tensors, str(f)) if suffix == ".safetensors" else torch.save(tensors, f)
        files.append(f)
    return files


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_directory_of_whole_checkpoints_is_a_run_like_its_glob(
    tmp_path: Path, suffix: str
) -> None:
    files = write_run(tmp_path / "runs", [["conv.weight", "fc.weight"]] * 3, suffix)
    assert run_in_directory(tmp_path / "runs") == files
    assert expand_paths([tmp_path / "runs"]) == expand_paths(
        [str(tmp_path / "runs" / f"*{suffix}")]
    )
    by_dir = runner.invoke(app, ["inspect", str(tmp_path / "runs"), "-f", "json"])
    by_glob = runner.invoke(app, ["inspect", str(tmp_path / "runs" / f"*{suffix}"), "-f", "json"])
    assert by_dir.exit_code == 0, by_dir.output
    assert json.loads(by_dir.stdout) == json.loads(by_glob.stdout)
    checkpoints = [c["checkpoint"] for c in json.loads(by_dir.stdout)["checkpoints"]]
    assert checkpoints == [str(f) for f in files]


def test_a_directory_of_disjoint_safetensors_stays_one_checkpoint(tmp_path: Path) -> None:
    write_run(tmp_path / "shards", [["a.weight"], ["b.weight"], ["c.weight"]])
    assert run_in_directory(tmp_path / "shards") is None
    ck = open_checkpoint(tmp_path / "shards")
    assert isinstance(ck, ShardedCheckpoint) and ck.keys() == ["a.weight", "b.weight", "c.weight"]
    assert expand_paths([tmp_path / "shards"]) == [tmp_path / "shards"]


def test_a_directory_neither_shards_nor_a_run_is_one_line(tmp_path: Path) -> None:
    write_run(tmp_path / "mixed", [["a.weight", "b.weight"], ["b.weight", "c.weight"]])
    with pytest.raises(CheckpointError, match="share some tensor names but not all"):
        open_checkpoint(tmp_path / "mixed")
    result = runner.invoke(app, ["inspect", str(tmp_path / "mixed")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pass the run's files (a glob such as" in lines[0], result.stderr
