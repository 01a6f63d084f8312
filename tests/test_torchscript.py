"""TorchScript archives (wcond.checkpoint.torchscript): read like the state dict they hold, never run.

A scripted and a traced model made here, and the same weights saved as a state dict, give the
same keys, tensors and reports; forged and mutated archives, built with zipfile, end in a report
or one line with exit 2, and nothing in them runs.
"""

from __future__ import annotations

import json
import random
import re
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import wcond
from wcond import CheckpointError, UnsafeCheckpointError, open_checkpoint
from wcond.checkpoint import torchscript
from wcond.checkpoint.sniff import file_reader
from wcond.checkpoint.torchscript import TorchScriptCheckpoint
from wcond.cli import app

runner = CliRunner()


class Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """Conv, batchnorm (buffers), a ModuleList of nested blocks, a linear head, a buffer of its own
    and a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block(8, 8), Block(8, 16)])
        self.head = nn.Linear(16, 10)
        self.register_buffer("scale", torch.full((10,), 0.5))
        # a plain tensor attribute: neither parameter nor buffer, so not in state_dict()
        self.offset = torch.zeros(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3))) * self.scale + self.offset


class NoWeights(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    for m in net.modules():  # buffers that differ from their defaults
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return net.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ts")
    net = make_net()
    out = {"state_dict": d / "model.pt", "scripted": d / "scripted.jit", "traced": d / "traced.jit"}
    torch.save(net.state_dict(), out["state_dict"])
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net).save(str(out["scripted"]))
        torch.jit.save(torch.jit.trace(net, torch.randn(1, 3, 8, 8)), str(out["traced"]))
        torch.jit.script(NoWeights()).save(str(d / "empty.jit"))
    out["empty"] = d / "empty.jit"
    return out


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:  # type: ignore[no-untyped-def]
    """The one line a failure prints; fails unless it is one line and exit 2 with no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and "internal error" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("kind", ["scripted", "traced"])
def test_keys_order_and_tensors_equal_the_models_state_dict(
    files: dict[str, Path], kind: str
) -> None:
    expected = make_net().state_dict()
    assert file_reader(files[kind]) is TorchScriptCheckpoint
    ck = open_checkpoint(files[kind])
    assert ck.format == "torchscript"
    assert ck.keys() == list(expected)  # names and order of module.state_dict()
    assert "blocks.1.bn.running_var" in ck.keys() and "scale" in ck.keys()
    assert "offset" not in ck.keys()
    for key, t in expected.items():
        got = ck.get(key)
        assert got.dtype == t.dtype and got.shape == t.shape, key
        assert torch.equal(got, t), key


@pytest.mark.parametrize("kind", ["scripted", "traced"])
def test_reports_equal_the_state_dicts(files: dict[str, Path], kind: str) -> None:
    def metrics(path: Path) -> str:
        report = wcond.inspect(path).to_dict()
        return json.dumps([report["layers"], report["summary"]], sort_keys=True)

    report = metrics(files[kind])
    assert report == metrics(files["state_dict"])
    assert "blocks.0.conv.weight" in report


def test_never_loads_with_torch_nor_reads_code(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.jit.load or torch.load called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def recording_open(self, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", recording_open)
    ck = open_checkpoint(files["scripted"])
    assert all(torch.isfinite(t.float()).all() for _, t in ck.items())
    assert any(n.endswith("/data.pkl") for n in opened)
    assert not [n for n in opened if "/code/" in n]


def test_released_tensors_are_mapped_again(files: dict[str, Path]) -> None:
    ck = open_checkpoint(files["scripted"])
    before = ck.get("head.weight").clone()
    ck.release()
    assert torch.equal(ck.get("head.weight"), before)


def test_cli_inspect_prints_the_table(files: dict[str, Path]) -> None:
    r = run("inspect", files["scripted"])
    assert r.exit_code == 0, r.output
    for key in ("stem.weight", "blocks.0.conv.weight", "blocks.1.conv.weight", "head.weight"):
        assert key in r.output
    assert "4 layers" in r.output


def test_init_cs_writes_a_plain_state_dict(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    r = run("init-cs", files["traced"], "-o", out, "-n", "2")
    assert r.exit_code == 0, r.output
    written = torch.load(out, weights_only=True)
    assert type(written) is dict and list(written) == list(make_net().state_dict())
    assert not [n for n in zipfile.ZipFile(out).namelist() if n.endswith("constants.pkl")]
    assert open_checkpoint(out).format == "torch"
    r = run("init-cs", files["traced"], "-o", tmp_path / "out.jit", "-n", "2")
    assert "unknown output format '.jit'" in error_line(r)


def test_an_archive_without_tensors_is_one_line(files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="holds no tensors"):
        open_checkpoint(files["empty"])
    assert "empty.jit: holds no tensors" in error_line(run("inspect", files["empty"]))


def test_probe_needs_constants_pkl_beside_data_pkl(files: dict[str, Path], tmp_path: Path) -> None:
    for kind in ("scripted", "traced", "empty"):
        path = files[kind]
        assert TorchScriptCheckpoint.probe(path, path.read_bytes()[:512], path.stat().st_size)
    pt = files["state_dict"]
    assert not TorchScriptCheckpoint.probe(pt, pt.read_bytes()[:512], pt.stat().st_size)
    # constants.pkl in another directory than data.pkl is not TorchScript's layout
    odd = repack(
        files["scripted"], tmp_path / "odd.jit", rename=("/constants.pkl", "x/constants.pkl")
    )
    assert not TorchScriptCheckpoint.probe(odd, odd.read_bytes()[:512], odd.stat().st_size)


# --------------------------------------------------------------------------- forged archives


def repack(
    src: Path,
    dst: Path,
    *,
    pkl: bytes | None = None,
    drop: str = "",
    cut: str = "",
    rename: tuple[str, str] | None = None,
) -> Path:
    """A copy of an archive with data.pkl replaced, a record dropped or cut in half, or one renamed."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            name, data = info.filename, zi.read(info)
            if drop and name.endswith(drop):
                continue
            if pkl is not None and name.endswith("/data.pkl"):
                data = pkl
            if cut and name.endswith(cut):
                data = data[: len(data) // 2]
            if rename and name.endswith(rename[0]):
                name = rename[1]
            zo.writestr(name, data)
    return dst


def data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def forged(tmp_path: Path, pkl: bytes, name: str = "forged.jit") -> Path:
    """A minimal TorchScript layout around a hand-written data.pkl."""
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("forged/data.pkl", pkl)
        z.writestr("forged/constants.pkl", b"\x80\x02).")
        z.writestr("forged/version", b"3\n")
    return path


def call(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle that calls module.name(arg): GLOBAL, one string, TUPLE1, REDUCE."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + _unicode(arg) + b"\x85R."


def _unicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def in_a_module(inner: bytes) -> bytes:
    """``inner`` (a pickle's body, without PROTO and STOP) as the attribute ``x`` of a __torch__ module."""
    return (
        b"\x80\x02c__torch__\nNet\n)\x81}(X\x08\x00\x00\x00trainingK\x00"
        + _unicode("x")
        + inner
        + b"ub."
    )


@pytest.mark.parametrize(
    "global_",
    [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("subprocess", "call")],
)
@pytest.mark.parametrize("nested", [False, True])
def test_a_pickle_asking_for_a_global_is_refused_and_nothing_runs(
    tmp_path: Path, global_: tuple[str, str], nested: bool
) -> None:
    marker = tmp_path / "ran"
    command = f"open({str(marker)!r}, 'w')" if global_[1] == "eval" else f"touch {marker}"
    pkl = call(*global_, command)
    path = forged(tmp_path, in_a_module(pkl[2:-1]) if nested else pkl)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"'{global_[0]}.{global_[1]}'")):
        open_checkpoint(path)
    line = error_line(run("inspect", path))
    assert line == (
        f"error: {path}: refused: its data.pkl asks for '{global_[0]}.{global_[1]}', and wcond "
        "never runs code from a checkpoint. If you trust the file, re-save just the weights: "
        "torch.save(torch.jit.load(path).state_dict(), 'weights.pt')"
    )
    assert not marker.exists()


def test_a_global_name_is_escaped(tmp_path: Path) -> None:
    path = forged(tmp_path, call("os", "system\x1b[2J", "x"))
    line = error_line(run("inspect", path))
    assert "'os.system\\x1b[2J'" in line and "\x1b" not in line


@pytest.mark.parametrize(
    "global_, words",
    [
        (("torch._utils", "_rebuild_qtensor"), "stores a quantized tensor"),
        (
            ("torch._utils", "_rebuild_tensor"),
            "refused",
        ),  # torch.save's old form: not TorchScript's
        (("torch", "load"), "refused"),
        (("torch", "FloatTensor"), "refused"),
    ],
)
def test_torch_globals_outside_the_list(
    tmp_path: Path, global_: tuple[str, str], words: str
) -> None:
    line = error_line(run("inspect", forged(tmp_path, call(*global_, "x"))))
    assert words in line and f"'{global_[0]}.{global_[1]}'" in line


def test_build_on_an_allowed_function_is_refused(tmp_path: Path) -> None:
    """BUILD with a slot state on build_intlist would setattr its __defaults__ for the whole process."""
    defaults = b"X\x0c\x00\x00\x00__defaults__K\x01\x85"  # '__defaults__', (1,)
    pkl = b"\x80\x02ctorch.jit._pickle\nbuild_intlist\nN}" + defaults + b"s\x86b0}."
    line = error_line(run("inspect", forged(tmp_path, pkl)))
    assert "malformed pickle: BUILD applied to a storage, a tensor or a function" in line
    assert torchscript.ALLOWED_GLOBALS["torch.jit._pickle", "build_intlist"].__defaults__ is None


def test_a_module_that_contains_itself(tmp_path: Path) -> None:
    # the module's attribute x is the module (memo 0) itself
    pkl = b"\x80\x02c__torch__\nNet\n)\x81q\x00}(X\x01\x00\x00\x00xh\x00ub."
    assert "a module contains itself" in error_line(run("inspect", forged(tmp_path, pkl)))


def test_data_pkl_holding_no_module(tmp_path: Path) -> None:
    line = error_line(run("inspect", forged(tmp_path, b"\x80\x02}.")))
    assert line.endswith("corrupt TorchScript archive: data.pkl holds dict, not a module")


# --------------------------------------------------------------------------- mutated archives


def test_a_storage_claiming_more_than_its_record(files: dict[str, Path], tmp_path: Path) -> None:
    """stem.weight's record (8x3x3x3 floats) cut in half: the claim is checked before anything is mapped."""
    with zipfile.ZipFile(files["scripted"]) as z:
        (name,) = [i.filename for i in z.infolist() if i.file_size == 864]
    key = name.rsplit("/", 1)[1]
    path = repack(files["scripted"], tmp_path / "cut.jit", cut=f"/data/{key}")
    assert error_line(run("inspect", path)).endswith(
        f"corrupt or truncated TorchScript archive: storage '{key}' claims 864 bytes but its "
        "record holds 432"
    )


def test_a_missing_data_record(files: dict[str, Path], tmp_path: Path) -> None:
    path = repack(files["scripted"], tmp_path / "drop.jit", drop="/data/3")
    assert error_line(run("inspect", path)).endswith(
        "corrupt TorchScript archive: storage '3' has no data record"
    )


def test_a_compressed_data_record(files: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "deflated.jit"
    with zipfile.ZipFile(files["scripted"]) as zi, zipfile.ZipFile(path, "w") as zo:
        for info in zi.infolist():
            compress = (
                zipfile.ZIP_DEFLATED if info.filename.endswith("/data/0") else zipfile.ZIP_STORED
            )
            zo.writestr(info.filename, zi.read(info), compress_type=compress)
    assert "is compressed; torch stores tensor data uncompressed" in error_line(
        run("inspect", path)
    )


@pytest.mark.parametrize("delta", [-1, +1000])
def test_a_storage_numel_that_disagrees_with_its_tensor(
    files: dict[str, Path], tmp_path: Path, delta: int
) -> None:
    """The first storage reference's numel (BININT1 before TUPLE, BINPERSID) made smaller or larger."""
    pkl = data_pkl(files["scripted"])
    m = re.search(rb"K(.)tQ", pkl, re.S)
    assert m is not None
    numel = m.group(1)[0]
    new = b"M" + (numel + delta).to_bytes(2, "little")  # BININT2 keeps it a plain int
    path = repack(
        files["scripted"], tmp_path / "numel.jit", pkl=pkl[: m.start()] + new + pkl[m.start() + 2 :]
    )
    line = error_line(run("inspect", path))
    if delta < 0:
        assert f"reaches element {numel - 1} of storage '0', which holds {numel - 1}" in line
    else:
        assert (
            f"storage '0' claims {(numel + delta) * 4} bytes but its record holds {numel * 4}"
            in line
        )


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_a_truncated_archive(files: dict[str, Path], tmp_path: Path, keep: float) -> None:
    data = files["scripted"].read_bytes()
    path = tmp_path / "cut.jit"
    path.write_bytes(data[: int(len(data) * keep)])
    assert "corrupt" in error_line(run("inspect", path))


def test_mutated_pickles_end_in_a_report_or_one_line(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """Seeded byte flips, insertions and cuts of data.pkl, repacked so that the zip's CRC holds."""
    pkl = data_pkl(files["scripted"])
    rng = random.Random(21)
    codes = []
    for i in range(60):
        b = bytearray(pkl)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(b))
            op = rng.random()
            if op < 0.6:
                b[at] = rng.randrange(256)
            elif op < 0.8:
                b.insert(at, rng.randrange(256))
            else:
                del b[at:]
        path = repack(files["scripted"], tmp_path / f"m{i}.jit", pkl=bytes(b))
        before = path.read_bytes()
        r = run("inspect", path)
        if r.exit_code != 0:
            error_line(r)
        assert path.read_bytes() == before
        codes.append(r.exit_code)
    assert 2 in codes  # the mutations reach the checks


def test_raw_byte_flips_in_the_file(files: dict[str, Path], tmp_path: Path) -> None:
    data = files["scripted"].read_bytes()
    rng = random.Random(6)
    for i in range(30):
        b = bytearray(data)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"f{i}.jit"
        path.write_bytes(bytes(b))
        r = run("inspect", path)
        if r.exit_code != 0:
            error_line(r)


def test_an_oversized_data_pkl_is_not_read(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = len(data_pkl(files["scripted"]))
    monkeypatch.setattr(torchscript, "MAX_PICKLE_BYTES", size)
    assert open_checkpoint(files["scripted"]).keys()  # at the limit
    monkeypatch.setattr(torchscript, "MAX_PICKLE_BYTES", size - 1)
    with pytest.raises(
        CheckpointError, match=f"data.pkl is {size:,} bytes, more than the {size - 1:,}"
    ):
        open_checkpoint(files["scripted"])


@pytest.mark.parametrize("limit, ok", [(3, True), (2, False)])
def test_the_number_of_module_classes_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, ok: bool
) -> None:
    """Three distinct __torch__ classes (each NEWOBJ'd and dropped), then a module holding a tensor."""
    monkeypatch.setattr(torchscript, "MAX_CLASSES", limit)
    net = b"".join(b"c__torch__\nC%d\n)\x810" % i for i in range(2))
    pkl = data_pkl_of_linear(tmp_path)
    assert pkl.startswith(b"\x80\x02c__torch__")
    path = repack(tmp_path / "linear.jit", tmp_path / "classes.jit", pkl=pkl[:2] + net + pkl[2:])
    if ok:
        assert open_checkpoint(path).keys() == ["weight", "bias"]
    else:
        assert error_line(run("inspect", path)).endswith(
            f"corrupt TorchScript archive: it names more than {limit:,} module classes"
        )


def data_pkl_of_linear(tmp_path: Path) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(nn.Linear(3, 2)).save(str(tmp_path / "linear.jit"))
    return data_pkl(tmp_path / "linear.jit")


def test_a_directory_holding_one_archive_opens_it(files: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "exported"
    d.mkdir()
    (d / "model.jit").write_bytes(files["scripted"].read_bytes())
    ck = open_checkpoint(d)
    assert (
        isinstance(ck, TorchScriptCheckpoint)
        and ck.keys() == open_checkpoint(files["scripted"]).keys()
    )
    (d / "other.jit").write_bytes(files["traced"].read_bytes())
    assert [p.name for p in wcond.trend.expand_paths([d])] == ["model.jit", "other.jit"]  # a run
