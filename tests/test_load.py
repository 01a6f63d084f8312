"""wcond.checkpoint: every layout wcond reads, and every way a file can be bad."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wcond import CheckpointError, UnsafeCheckpointError, load_checkpoint, open_checkpoint


def assert_same(
    loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], ordered: bool = True
) -> None:
    assert (list(loaded) if ordered else sorted(loaded)) == (
        list(expected) if ordered else sorted(expected)
    )
    for k in expected:
        assert loaded[k].dtype == expected[k].dtype and torch.equal(loaded[k], expected[k]), k


def test_plain_state_dict(pt_file: Path, state_dict: dict) -> None:
    assert_same(load_checkpoint(pt_file), state_dict)
    ck = open_checkpoint(pt_file)
    assert ck.format == "torch" and ck.wrapper == ()
    assert ck.info("conv2.weight").shape == (16, 8, 3, 3)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict", "module"])
def test_wrappers(tmp_path: Path, state_dict: dict, wrapper: str) -> None:
    path = tmp_path / "w.pth"
    torch.save({wrapper: state_dict, "epoch": 3, "note": "x"}, path)
    assert_same(load_checkpoint(path), state_dict)
    assert open_checkpoint(path).wrapper == (wrapper,)


def test_lightning_checkpoint(tmp_path: Path, state_dict: dict) -> None:
    lightning = {
        "epoch": 4,
        "global_step": 100,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": OrderedDict((f"model.{k}", v) for k, v in state_dict.items()),
        "optimizer_states": [
            {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}
        ],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1},
    }
    path = tmp_path / "l.ckpt"
    torch.save(lightning, path)
    loaded = load_checkpoint(path)
    assert list(loaded) == [f"model.{k}" for k in state_dict]  # optimizer tensors are not layers
    assert open_checkpoint(path).wrapper == ("state_dict",)


def test_nested_dicts_are_flattened_with_dots(tmp_path: Path) -> None:
    path = tmp_path / "n.pt"
    torch.save({"encoder": {"w": torch.ones(2, 2)}, "decoder": {"w": torch.zeros(3, 2)}}, path)
    assert list(load_checkpoint(path)) == ["encoder.w", "decoder.w"]


def test_legacy_torch_format(tmp_path: Path, state_dict: dict) -> None:
    path = tmp_path / "old.bin"
    torch.save(state_dict, path, _use_new_zipfile_serialization=False)
    assert_same(load_checkpoint(path), state_dict)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
def test_safetensors_keeps_dtype_and_metadata(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"a.weight": torch.randn(4, 3).to(dtype), "steps": torch.tensor([1, 2])}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "who": "test"})
    ck = open_checkpoint(path)
    assert ck.format == "safetensors" and ck.metadata == {"format": "pt", "who": "test"}
    assert ck.info("a.weight").dtype == dtype
    assert_same(load_checkpoint(path), tensors, ordered=False)


def test_safetensors_keys_in_natural_order(tmp_path: Path) -> None:
    names = ["layers.10.w", "layers.2.w", "embed.w", "layers.1.w"]
    path = tmp_path / "m.safetensors"
    save_file({n: torch.zeros(2, 2) for n in names}, str(path))
    assert open_checkpoint(path).keys() == ["embed.w", "layers.1.w", "layers.2.w", "layers.10.w"]


def _shard(tmp_path: Path, state_dict: dict) -> Path:
    keys = list(state_dict)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate([keys[:half], keys[half:]], 1):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file({k: state_dict[k] for k in part}, str(tmp_path / name))
        weight_map.update({k: name for k in part})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_sharded_by_index_and_by_directory(tmp_path: Path, state_dict: dict) -> None:
    index = _shard(tmp_path, state_dict)
    for target in (index, tmp_path):
        ck = open_checkpoint(target)
        assert ck.format == "sharded" and len(ck.files) == 2
        assert_same(dict(ck.items()), state_dict, ordered=False)


def test_sharded_torch_bin_index(tmp_path: Path, state_dict: dict) -> None:
    keys = list(state_dict)
    torch.save({k: state_dict[k] for k in keys[:3]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state_dict[k] for k in keys[3:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {
        k: f"pytorch_model-0000{1 if i < 3 else 2}-of-00002.bin" for i, k in enumerate(keys)
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same(load_checkpoint(tmp_path), state_dict)


def test_directory_with_one_checkpoint(tmp_path: Path, state_dict: dict) -> None:
    torch.save(state_dict, tmp_path / "only.pt")
    (tmp_path / "README.txt").write_text("hello")
    assert_same(load_checkpoint(tmp_path), state_dict)


def test_unsafe_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # what a malicious checkpoint does
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2, 2), "payload": Evil()}, path)
    with pytest.raises(UnsafeCheckpointError) as e:
        open_checkpoint(path)
    assert (
        str(path) in str(e.value) and "system" in str(e.value) and "never runs code" in str(e.value)
    )
    assert not marker.exists()


BAD_FILES = {
    "missing": (None, "no such file or directory"),
    "empty": (b"", "file is empty"),
    "text": (b"this is not a checkpoint\nat all\n", "looks like a text file"),
    "garbage": (bytes(range(256)) * 4, "unknown format"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files(tmp_path: Path, case: str) -> None:
    content, message = BAD_FILES[case]
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(16, 16)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        open_checkpoint(path)


def test_truncated_safetensors_header(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(16, 16)}, str(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="truncated safetensors"):
        open_checkpoint(path)


def test_truncated_torch_zip(pt_file: Path) -> None:
    pt_file.write_bytes(pt_file.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt or truncated torch checkpoint"):
        open_checkpoint(pt_file)


def test_directory_problems(tmp_path: Path, state_dict: dict) -> None:
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        open_checkpoint(tmp_path)
    torch.save(state_dict, tmp_path / "a.pt")
    torch.save(state_dict, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="several checkpoints"):
        open_checkpoint(tmp_path)


def test_index_with_missing_shard(tmp_path: Path, state_dict: dict) -> None:
    index = _shard(tmp_path, state_dict)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match="model-00002-of-00002.safetensors listed in the index is missing"
    ):
        open_checkpoint(index)


def test_broken_index(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        open_checkpoint(index)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        open_checkpoint(path)
