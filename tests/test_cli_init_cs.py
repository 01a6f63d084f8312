"""`wcond init-cs` through the CLI: formats and wrappers round-trip, refusals, determinism, history, interrupts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import wcond.checkpoint.write
from wcond.analyze import inspect
from wcond.cli import app
from wcond.condition import init_cs
from wcond.render.init_cs import render_init_cs

runner = CliRunner()
CONVS = ["model.conv1.weight", "model.conv2.weight", "model.pw.weight"]


def run(*args: object):
    return runner.invoke(app, ["init-cs", *map(str, args)])


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.conv1.weight": torch.randn(8, 3, 3, 3, generator=g) * 0.3,
        "model.conv1.bias": torch.randn(8, generator=g),
        "model.bn1.weight": torch.rand(8, generator=g),
        "model.bn1.running_mean": torch.randn(8, generator=g),
        "model.bn1.num_batches_tracked": torch.tensor(42),
        "model.conv2.weight": (torch.randn(8, 8, 5, generator=g) * 0.2).half(),  # conv1d, fp16
        "model.pw.weight": torch.randn(6, 8, 1, 1, generator=g).double(),  # 1x1, fp64
        "model.head.weight": torch.randn(4, 6, generator=g),
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A Lightning-style checkpoint: the state dict under "state_dict" plus training state."""
    sd = state_dict()
    obj = {
        "epoch": 7,
        "global_step": 910,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(8, 3, 3, 3)}},
                "param_groups": [{"lr": 0.01, "params": [0]}],
            }
        ],
        "hyper_parameters": {"width": 8, "name": "tiny"},
    }
    path = tmp_path / "model.ckpt"
    torch.save(obj, path)
    return path


@pytest.fixture
def st_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(state_dict(), str(path), metadata={"format": "pt", "source": "unit test"})
    return path


def test_lightning_checkpoint_round_trip(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.ckpt"
    result = run(ckpt, "-o", out, "--iterations", 15, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (
        f"wrote {out}" in result.stdout
        and "total CS" in result.stdout
        and "model.conv1." in result.stdout
    )
    src, new = torch.load(ckpt, weights_only=True), torch.load(out, weights_only=True)
    assert list(new) == list(src)
    for key in ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters"):
        assert new[key] == src[key]
    assert torch.equal(
        new["optimizer_states"][0]["state"][0]["exp_avg"],
        src["optimizer_states"][0]["state"][0]["exp_avg"],
    )
    assert list(new["state_dict"]) == list(src["state_dict"])
    for key, t in src["state_dict"].items():
        n = new["state_dict"][key]
        assert n.dtype == t.dtype and n.shape == t.shape
        assert torch.equal(n, t) == (key not in CONVS), key


def test_safetensors_metadata_and_tensors_preserved(st_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    result = run(st_file, "-o", out, "-n", 10, "--device", "cpu", "--exclude", "*.pw.*")
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "source": "unit test"}
    src, new = load_file(str(st_file)), load_file(str(out))
    assert list(new) == list(src)
    for key, t in src.items():
        assert new[key].dtype == t.dtype and torch.equal(new[key], t) == (key not in CONVS[:2]), key


def test_summary_numbers_are_what_inspect_reports(st_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    result = run(st_file, "-o", out, "-n", 10, "--device", "cpu", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (
        doc["output"] == str(out) and doc["settings"]["iterations"] == 10 and "history" not in doc
    )
    before = {r.name: r for r in inspect(st_file, layers=CONVS).layers}
    after = {r.name: r for r in inspect(out, layers=CONVS).layers}
    assert [r["name"] for r in doc["layers"]] == CONVS
    for row in doc["layers"]:
        name = row["name"]
        assert row["cs_before"] == pytest.approx(before[name].conv_similarity, rel=1e-6)
        assert row["cs_after"] == pytest.approx(after[name].conv_similarity, rel=1e-6)
        assert row["cs_norm_after"] == pytest.approx(after[name].conv_similarity_norm, rel=1e-6)
        assert row["cs_after"] < row["cs_before"]


def test_keep_norm_table_says_1x1_kernels_are_left_alone(ckpt: Path, tmp_path: Path) -> None:
    result = run(ckpt, "-o", tmp_path / "out.pt", "-n", 5, "--keep-norm", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (
        "floor: lowest CS at these filter norms" in result.stdout and "--keep-norm" in result.stdout
    )
    assert "model.pw.weight: 1x1 kernel: its CS depends on the filter norms alone" in " ".join(
        result.stdout.split()
    )
    new = torch.load(tmp_path / "out.pt", weights_only=True)["state_dict"]
    assert torch.equal(new["model.pw.weight"], state_dict()["model.pw.weight"])


def test_table_lists_every_layer(st_file: Path) -> None:
    _, result = init_cs(st_file, iterations=3, device="cpu")
    console = Console(width=160, file=io.StringIO(), color_system=None, record=True)
    render_init_cs(result, console)
    text = console.export_text()
    for name in CONVS:
        assert name in text
    assert "norms" in text and "dirs" in text and "|W|" in text and "max|Δw|" in text
    assert "most of the drop came from smaller filters" in text  # a few Adam steps mostly shrink


def test_refuses_to_write_over_the_input(ckpt: Path) -> None:
    before = ckpt.read_bytes()
    result = run(ckpt, "-o", ckpt, "--force")
    assert result.exit_code == 2
    assert "refusing to write over the input checkpoint" in result.stderr
    assert ckpt.read_bytes() == before


def test_existing_output_needs_force(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    result = run(ckpt, "-o", out, "-n", 2, "--device", "cpu")
    assert result.exit_code == 2
    assert f"error: {out}: already exists; pass --force to overwrite it" in " ".join(
        result.stderr.split()
    )
    assert out.read_bytes() == b"keep me"
    result = run(ckpt, "-o", out, "-n", 2, "--device", "cpu", "--force")
    assert result.exit_code == 0, result.output
    assert "model.conv1.weight" in torch.load(out, weights_only=True)["state_dict"]


def test_seed_gives_identical_output(st_file: Path, tmp_path: Path) -> None:
    # Compare tensors, not bytes: torch.save names its archive after the (random) temporary file
    # and adds a serialization id; safetensors writes its metadata map in random order.
    outs = [
        tmp_path / "a.pt",
        tmp_path / "b.pt",
        tmp_path / "a.safetensors",
        tmp_path / "b.safetensors",
    ]
    for out in outs:
        assert run(st_file, "-o", out, "-n", 10, "--seed", 5, "--device", "cpu").exit_code == 0
    loaded = [torch.load(outs[0], weights_only=True), torch.load(outs[1], weights_only=True)]
    loaded += [load_file(str(outs[2])), load_file(str(outs[3]))]
    for other in loaded[1:]:
        assert sorted(other) == sorted(loaded[0])
        assert all(
            torch.equal(other[k], t) and other[k].dtype == t.dtype for k, t in loaded[0].items()
        )
    assert not torch.equal(loaded[0]["model.conv1.weight"], state_dict()["model.conv1.weight"])


def test_history_file(ckpt: Path, tmp_path: Path) -> None:
    hist = tmp_path / "curve.json"
    result = run(
        ckpt,
        "-o",
        tmp_path / "out.ckpt",
        "-n",
        6,
        "--history",
        hist,
        "--device",
        "cpu",
        "--optimizer",
        "sgd",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(hist.read_text())
    assert doc["iteration"] == list(range(7)) and doc["settings"]["optimizer"] == "sgd"
    assert set(doc["layers"]) == set(CONVS) and len(doc["total"]) == 7
    assert doc["total"][-1] < doc["total"][0]
    assert not list(tmp_path.glob("*.wcond-tmp"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--layers", "nothing*"],
            "no conv layer matches the patterns --layers ['nothing*'], --exclude []",
        ),
        (["--groups", "model.conv1.weight"], "expected KEY=G with G a positive integer"),
        (["--groups", "model.conv1.weight=3"], "3 does not divide the layer's 8 output filters"),
        (["--lr", "0"], "--lr 0.0: the learning rate must be a positive number"),
        (["--history", "{out}"], "would overwrite the input or output checkpoint"),
    ],
)
def test_bad_arguments_exit_2(ckpt: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out.pt"
    result = run(ckpt, "-o", out, "-n", 2, "--device", "cpu", *[a.format(out=out) for a in args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not out.exists()


def test_no_conv_layers_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "mlp.safetensors"
    save_file({"fc.weight": torch.randn(4, 3), "fc.bias": torch.zeros(4)}, str(src))
    result = run(src, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 2
    assert "no conv weights to condition" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_ctrl_c_while_optimizing_writes_nothing(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.optim.Adam, "step", interrupted)
    result = run(ckpt, "-o", tmp_path / "out.pt", "-n", 5, "--device", "cpu")
    assert result.exit_code == 130
    assert "interrupted; nothing was written" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_ctrl_c_while_saving_leaves_no_partial_file(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_written(obj: object, path: Path) -> None:
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(wcond.checkpoint.write.torch, "save", half_written)
    result = run(ckpt, "-o", tmp_path / "out.pt", "-n", 2, "--device", "cpu")
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_fp8_conv_is_left_unchanged_with_a_note(tmp_path: Path) -> None:
    """FP8 kernels: a CS step would be rounded away when written back, so they are kept as is."""
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "fp8.pt"
    sd = {
        "c8.weight": torch.randn(8, 3, 3, 3, generator=g).to(torch.float8_e4m3fn),
        "c32.weight": torch.randn(8, 8, 3, 3, generator=g),
    }
    torch.save(sd, src)
    out = tmp_path / "out.pt"
    result = run(src, "-o", out, "-n", "5", "--device", "cpu", "-f", "json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["layers"]}
    assert rows["c8.weight"]["optimized"] is False
    assert any("FP8 weights: left unchanged" in n for n in rows["c8.weight"]["notes"])
    assert rows["c32.weight"]["optimized"] is True
    written = torch.load(out)
    assert written["c8.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(written["c8.weight"].view(torch.uint8), sd["c8.weight"].view(torch.uint8))
