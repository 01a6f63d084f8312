"""`wcond shrink` and `wcond expand` through the CLI: reports, files written or not, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import wcond
from wcond.cli import app

runner = CliRunner()
LAYER_KEYS = {
    "name",
    "fused_rows",
    "fused_cols",
    "params_before",
    "params_after",
    "reconstruction_error",
    "shape_before",
    "shape_after",
    "max_angle_deg",
}


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    """fc1 (48 -> 64) -> fc2 (64 -> 64) -> fc3 (64 -> 4): positively parallel fc1 units, fc2 row pairs.

    Enough pairs that factorizing pays for its indices and the manifest in file bytes.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {
        "fc1.weight": torch.randn(64, 48, generator=g),
        "fc1.bias": torch.randn(64, generator=g),
        "fc2.weight": torch.randn(64, 64, generator=g),
        "fc2.bias": torch.randn(64, generator=g),
        "fc3.weight": torch.randn(4, 64, generator=g),
        "fc3.bias": torch.randn(4, generator=g),
    }
    for i in range(16):
        a, b, k = i, 32 + i, (2.0, 0.5, 3.0, 1.5)[i % 4]
        sd["fc1.weight"][b], sd["fc1.bias"][b] = k * sd["fc1.weight"][a], k * sd["fc1.bias"][a]
    for i in range(12):  # only the 8 with k > 0 fold
        a, b, k = i, 40 + i, (2.0, 0.5, -1.0)[i % 3]
        sd["fc2.weight"][b], sd["fc2.bias"][b] = k * sd["fc2.weight"][a], k * sd["fc2.bias"][a]
    return sd


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(_state(), path)
    return path


def test_table_report_and_output(model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.safetensors"
    result = run("shrink", model_file, "-o", out)
    assert result.exit_code == 0, result.output
    assert (
        "fc2.weight" in result.stdout
        and "64x64 → 52x64" in result.stdout
        and "12/0" in result.stdout
    )
    assert "values of every tensor: 7,556 → 6,020 (1,536 removed, 20.33%)" in result.stdout
    assert f"wrote {out}" in result.stdout
    assert out.exists() and out.stat().st_size < model_file.stat().st_size


def test_json_report(model_file: Path) -> None:
    result = run("shrink", model_file, "--dry-run", "--format", "json", "--axis", "both")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (
        doc["output"] is None and doc["mode"] == "factorize" and doc["settings"]["axis"] == "both"
    )
    assert [layer["name"] for layer in doc["layers"]] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    for layer in doc["layers"]:
        assert LAYER_KEYS <= set(layer)
    fc1, fc2 = doc["layers"][0], doc["layers"][1]
    assert (
        fc1["fused_rows"] == 16
        and fc1["params_after"] == 48 * 48
        and fc1["reconstruction_error"] < 1e-6
    )
    assert fc2["fused_rows"] == 12 and fc2["shape_after"] == [52, 64] and fc2["max_angle_deg"] < 0.1
    assert doc["params_removed"] == 16 * 48 + 12 * 64 and doc["percent_removed"] == pytest.approx(
        100 * 1536 / 7556
    )


def test_dry_run_writes_nothing(model_file: Path, tmp_path: Path) -> None:
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "small.safetensors"
    for args in (
        ("--dry-run",),
        ("--dry-run", "-o", out),
        ("--dry-run", "--fold", "--chain", "fc1.weight,fc2.weight"),
    ):
        result = run("shrink", model_file, *args)
        assert result.exit_code == 0, result.output
        assert "dry run: nothing written" in result.stdout
    assert sorted(tmp_path.iterdir()) == before


def test_fold_prints_the_new_widths(model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "narrow.safetensors"
    result = run(
        "shrink", model_file, "--fold", "--chain", "fc1.weight, fc2.weight,fc3.weight", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert "new widths (output units): fc1.weight 64 → 48, fc2.weight 64 → 56" in result.stdout
    sd = wcond.load_state_dict(out)
    assert (
        sd["fc1.weight"].shape == (48, 48)
        and sd["fc2.weight"].shape == (56, 48)
        and sd["fc3.weight"].shape == (4, 56)
    )


def test_expand_round_trip(model_file: Path, tmp_path: Path) -> None:
    small, dense = tmp_path / "small.pt", tmp_path / "dense.safetensors"
    assert run("shrink", model_file, "-o", small).exit_code == 0
    result = run("expand", small, "-o", dense)
    assert result.exit_code == 0, result.output
    assert (
        "expanded 2 factorized layers: fc1.weight, fc2.weight" in result.stdout
        and f"wrote {dense}" in result.stdout
    )
    back = wcond.load_checkpoint(dense)
    for key, t in _state().items():
        torch.testing.assert_close(back[key], t, rtol=1e-5, atol=1e-6)
    plain = run("expand", model_file, "-o", tmp_path / "copy.pt")
    assert plain.exit_code == 0 and "holds no factorized layers" in plain.stdout


def test_inspect_shows_the_factorization(model_file: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.safetensors"
    assert run("shrink", model_file, "-o", small).exit_code == 0
    table = run("inspect", small)
    assert table.exit_code == 0, table.output
    assert (
        "note fc2.weight: factorized (rows fused): stored as 52x64, 3,328 of 4,096 parameters (81.2%)"
        in table.stdout
    )
    doc = json.loads(run("inspect", small, "--format", "json").stdout)
    assert [layer["factorized"] for layer in doc["layers"]] == [
        {"params_stored": 48 * 48, "params_dense": 64 * 48},
        {"params_stored": 52 * 64, "params_dense": 64 * 64},
        None,
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "-o OUT is required (or pass --dry-run to report without writing)"),
        (("-o", "{src}"), "refusing to write over the input checkpoint; choose another -o path"),
        (("-o", "{existing}"), "already exists; pass --force to overwrite it"),
        (("-o", "{tmp}/out.txt"), "unknown output format '.txt'"),
        (("--dry-run", "--chain", "fc1.weight,fc2.weight"), "--chain goes with --fold"),
        (("--dry-run", "--fold"), "--fold needs --chain NAME1,NAME2,..."),
        (
            (
                "--dry-run",
                "--fold",
                "--chain",
                "fc1.weight,fc2.weight",
                "--axis",
                "rows",
                "--protect",
                "x",
            ),
            "--fold takes its layers from --chain or --model; --axis, --protect do not apply to it",
        ),
        (
            ("--dry-run", "--fold", "--chain", "fc,fc2.weight"),
            "has no layer or BatchNorm named 'fc'; it holds",
        ),
        (
            ("--dry-run", "--layers", "conv*"),
            "no layer matches --layers conv*",
        ),
        (("--dry-run", "--device", "cuda"), "CUDA is not available"),
    ],
)
def test_refusals_are_one_line_and_exit_2(
    model_file: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"")
    subst = {"{src}": str(model_file), "{existing}": str(existing), "{tmp}": str(tmp_path)}
    argv = [next((a.replace(k, v) for k, v in subst.items() if k in a), a) for a in args]
    if args[-2:] == ("--device", "cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run("shrink", model_file, *argv)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert existing.read_bytes() == b""


def test_force_overwrites(model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.safetensors"
    out.write_bytes(b"old")
    assert run("shrink", model_file, "-o", out, "--force").exit_code == 0
    assert set(wcond.load_state_dict(out)) == set(_state())


def test_bad_input(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    result = run("shrink", text, "--dry-run")
    assert result.exit_code == 2 and "looks like a text file" in result.stderr
    missing = run("expand", tmp_path / "missing.pt", "-o", tmp_path / "x.pt")
    assert missing.exit_code == 2 and "no such file or directory" in missing.stderr
    no_out = run("expand", text)
    assert no_out.exit_code == 2 and "--output" in no_out.output


def _two_pairs() -> dict[str, torch.Tensor]:
    """fc1 (256, 16) -> fc2 (300, 256) -> fc3 (10, 300); fc2 has two planted row pairs.

    Rows are fc2's longer axis, so `--axis auto` fuses them. Row 150 = 0.5 row 0 (150 is the
    shorter and keeps its row) and row 151 = -2 row 1 (1 keeps its row). Format 1 stored an index
    and a coefficient for each of the 300 rows (2,400 bytes) against 2,048 saved: left dense.
    """
    g = torch.Generator().manual_seed(5)
    sd = {
        "fc1.weight": torch.randn(256, 16, generator=g),
        "fc2.weight": torch.randn(300, 256, generator=g),
        "fc3.weight": torch.randn(10, 300, generator=g),
    }
    sd["fc2.weight"][150] = 0.5 * sd["fc2.weight"][0]
    sd["fc2.weight"][151] = -2.0 * sd["fc2.weight"][1]
    return sd


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_two_fused_pairs_pay_whatever_the_layer_height(tmp_path: Path, suffix: str) -> None:
    sd = _two_pairs()
    src, out = tmp_path / f"in{suffix}", tmp_path / f"ou{suffix}"  # names of equal length
    if suffix == ".pt":
        torch.save(sd, src)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(src))
    result = run("shrink", src, "-o", out)
    assert result.exit_code == 0, result.output
    assert "300x256 → 298x256" in result.stdout and "2/0" in result.stdout
    assert out.stat().st_size < src.stat().st_size
    stored = wcond.load_checkpoint(out)
    key = "fc2.weight.__wcond_row"
    # originals 0 and 151 have no row of their own: 0 = 2 x original 150 (stored row 149, after
    # original 0 is gone), 151 = -2 x original 1 (stored row 0)
    assert stored[key + "_fused"].tolist() == [[0, 149], [151, 0]]
    assert stored[key + "_scale"].tolist() == pytest.approx([2.0, -2.0], rel=1e-6)
    kept = [r for r in range(300) if r not in (0, 151)]
    torch.testing.assert_close(
        stored["fc2.weight.__wcond_w"], sd["fc2.weight"][kept], rtol=1e-6, atol=1e-7
    )
    back = wcond.load_state_dict(out)
    for k, t in sd.items():
        torch.testing.assert_close(back[k], t, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("shape", "axis"), [((40, 48), "rows"), ((48, 40), "auto")])
def test_two_pairs_in_a_40x48_layer_pay_in_a_safetensors_file(
    tmp_path: Path, shape: tuple[int, int], axis: str
) -> None:
    """The layer a user tried: two planted row pairs (384 bytes) in 40x48 fp32, once left dense."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    out_dim, in_dim = shape
    sd = {
        "fc1.weight": torch.randn(in_dim, 16, generator=g),
        "fc2.weight": torch.randn(out_dim, in_dim, generator=g),
        "fc3.weight": torch.randn(10, out_dim, generator=g),
    }
    sd["fc2.weight"][20] = 0.5 * sd["fc2.weight"][0]
    sd["fc2.weight"][21] = -2.0 * sd["fc2.weight"][1]
    src, out = tmp_path / "in.safetensors", tmp_path / "ou.safetensors"
    save_file(sd, str(src))
    result = run("shrink", src, "-o", out, "--axis", axis, "-f", "json")
    assert result.exit_code == 0, result.output
    fc2 = json.loads(result.stdout)["layers"][1]
    assert fc2["fused_rows"] == 2 and fc2["shape_after"] == [out_dim - 2, in_dim], fc2["notes"]
    assert out.stat().st_size < src.stat().st_size
    back = wcond.load_state_dict(out)
    for key, want in sd.items():
        torch.testing.assert_close(back[key], want, rtol=1e-6, atol=1e-6)
