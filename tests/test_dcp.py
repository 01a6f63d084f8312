"""DCP directories written here by torch.distributed.checkpoint.save (no process group), read tensor by tensor."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import wcond
from wcond.cli import app

dcp = pytest.importorskip("torch.distributed.checkpoint")
from wcond.checkpoint import dcp_storage  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(32, 6)
    )


def _save(state: dict, d: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(d))
    return d


@pytest.fixture
def nested(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A training state: {"model": ..., "optim": Adam state after one step, "step": 3}."""
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return _save(
        {"model": model.state_dict(), "optim": opt.state_dict(), "step": 3}, tmp_path / "ckpt"
    ), sd


def test_nested_state_unwrapped_like_a_torch_file(
    nested: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    d, sd = nested
    assert sorted(p.name for p in d.iterdir()) == [".metadata", "__0_0.distcp"]
    ck = wcond.open_checkpoint(d)
    assert ck.format == "dcp" and ck.wrapper == ("model",)
    assert ck.keys() == list(sd)
    for key, t in sd.items():
        assert ck.info(key).shape == tuple(t.shape)
        assert torch.equal(ck.get(key), t)
    assert wcond.load_checkpoint(d).keys() == sd.keys()


def test_reads_one_tensor_per_get(
    nested: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each get reads exactly its own chunk through torch's FileSystemReader; nothing else is loaded."""
    d, sd = nested
    seen: list[list[str]] = []
    original = dcp_storage.FileSystemReader.read_data

    def spy(self, plan, planner):  # type: ignore[no-untyped-def]
        seen.append([item.storage_index.fqn for item in plan.items])
        return original(self, plan, planner)

    monkeypatch.setattr(dcp_storage.FileSystemReader, "read_data", spy)
    ck = wcond.open_checkpoint(d)
    assert seen == []  # opening reads metadata only
    ck.get("2.weight")
    assert seen == [["model.2.weight"]]


def test_inspect_dcp_equals_inspect_of_the_state_dict(
    nested: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    d, sd = nested
    a, b = wcond.inspect(d, groups={"2.weight": 2}), wcond.inspect(sd, groups={"2.weight": 2})
    assert a.format == "dcp" and a.wrapper == "model"
    assert (
        [r.name for r in a.layers]
        == [r.name for r in b.layers]
        == ["0.weight", "2.weight", "4.weight"]
    )
    for ra, rb in zip(a.layers, b.layers):
        assert ra == rb


def test_flat_state_without_wrapper(tmp_path: Path) -> None:
    sd = _model().state_dict()
    ck = wcond.open_checkpoint(_save(dict(sd), tmp_path / "flat"))
    assert ck.wrapper == () and ck.keys() == list(sd)


def test_cli_init_cs_and_shrink_write_a_normal_file(
    nested: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    d, sd = nested
    out = tmp_path / "cs.pt"
    result = CliRunner().invoke(
        app, ["init-cs", str(d), "-o", str(out), "-n", "2", "--device", "cpu", "--seed", "0"]
    )
    assert result.exit_code == 0, result.output
    written = torch.load(out, weights_only=True)
    assert list(written) == list(sd)  # the model's state dict, as a plain torch file
    assert not torch.equal(written["0.weight"], sd["0.weight"])
    assert torch.equal(written["4.weight"], sd["4.weight"])
    for small in (tmp_path / "small.safetensors", tmp_path / "small.pt"):
        result = CliRunner().invoke(app, ["shrink", str(d), "-o", str(small)])
        assert result.exit_code == 0, result.output
        assert set(wcond.load_state_dict(small)) == set(sd)


class _Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


def test_hostile_metadata_is_refused_not_run(
    nested: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    d, _ = nested
    (d / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(
        wcond.UnsafeCheckpointError,
        match=r"\.metadata: refused: this DCP metadata pickle would construct 'builtins\.print'",
    ):
        wcond.open_checkpoint(d)
    assert "pwned" not in capsys.readouterr().out


def test_metadata_pointing_outside_the_directory_is_refused(
    nested: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    d, _ = nested
    md = dcp_storage.read_metadata(d / ".metadata")
    for info in md.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    buf = io.BytesIO()
    pickle.dump(md, buf)
    (d / ".metadata").write_bytes(buf.getvalue())
    result = CliRunner().invoke(app, ["inspect", str(d)])
    assert result.exit_code == 2
    assert (
        "DCP metadata points outside its directory ('../elsewhere.distcp'); refused"
        in result.output
    )


def test_metadata_without_shards(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".metadata").write_bytes(b"x")
    with pytest.raises(
        wcond.CheckpointError, match=r"has a DCP \.metadata file but no \*\.distcp shards"
    ):
        wcond.open_checkpoint(tmp_path / "d")


def _rewrite(d: Path, md: object) -> None:
    buf = io.BytesIO()
    pickle.dump(md, buf)
    (d / ".metadata").write_bytes(buf.getvalue())


def test_size_cap_at_its_edge(
    nested: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The largest tensor (optimizer states included) at the cap opens; one value over, refused."""
    d, _ = nested
    md = dcp_storage.read_metadata(d / ".metadata")
    sizes = {fqn: e.size.numel() for fqn, e in md.state_dict_metadata.items() if hasattr(e, "size")}
    largest = max(sizes.values())
    monkeypatch.setattr(dcp_storage, "MAX_DENSE_ELEMENTS", largest)
    assert wcond.open_checkpoint(d).keys()
    monkeypatch.setattr(dcp_storage, "MAX_DENSE_ELEMENTS", largest - 1)
    with pytest.raises(wcond.CheckpointError, match=f"refused above {largest - 1:,} values"):
        wcond.open_checkpoint(d)


def test_storage_entry_bounds_at_their_edges(
    nested: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """An entry may end exactly at its shard's end and hold exactly its chunk's bytes; not one past or short."""
    d, _ = nested
    md = dcp_storage.read_metadata(d / ".metadata")
    size = (d / "__0_0.distcp").stat().st_size
    last = max(md.storage_data.values(), key=lambda s: s.offset)
    assert last.offset + last.length == size  # as dcp.save writes it: opens
    key = next(k for k in md.storage_data if k.fqn == "model.4.weight")
    need = 6 * 32 * 4
    entry = md.storage_data[key]
    last.length += 1
    _rewrite(d, md)
    with pytest.raises(wcond.CheckpointError, match=f"which holds {size:,} bytes"):
        wcond.open_checkpoint(d)
    last.length -= 1
    entry.length = need
    _rewrite(d, md)
    assert wcond.open_checkpoint(d).keys()  # the count is met (its bytes are checked on reading)
    entry.length = need - 1
    _rewrite(d, md)
    with pytest.raises(wcond.CheckpointError, match=f"needs {need:,} bytes; .* holds {need - 1:,}"):
        wcond.open_checkpoint(d)


def test_metadata_memo_bomb_allocates_nothing(tmp_path: Path) -> None:
    """LONG_BINPUT 1231382369: the C unpickler would size its memo array to ten gigabytes."""
    import tracemalloc

    (tmp_path / ".metadata").write_bytes(b"\x80\x04}r\x61\x65\x64\x49.")
    tracemalloc.start()
    try:
        with pytest.raises(wcond.CheckpointError, match=r"not DCP metadata \(holds a dict\)"):
            dcp_storage.read_metadata(tmp_path / ".metadata")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20
