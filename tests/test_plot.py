"""`wcond plot` and wcond.render.plot: valid PNG/SVG of the requested size, the right cosines and marks, clear errors."""

from __future__ import annotations

import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wcond.cli import app
from wcond.cosines import cos_matrix
from wcond.metrics import pair_statistics
from wcond.render.plot import heatmap_title

pytest.importorskip("matplotlib")
runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def plot(*args: object):
    return runner.invoke(app, ["plot", *map(str, args)])


@pytest.mark.parametrize(("size", "dpi"), [((640, 480), 100), ((333, 257), 72), ((900, 400), 150)])
def test_png_has_the_requested_pixel_size(
    tmp_path: Path, pt_file: Path, size: tuple[int, int], dpi: int
) -> None:
    out = tmp_path / "conv2.png"
    result = plot(
        pt_file,
        "--layer",
        "conv2.weight",
        "-o",
        out,
        "--width",
        size[0],
        "--height",
        size[1],
        "--dpi",
        dpi,
    )
    assert result.exit_code == 0, result.output
    assert png_size(out) == size


def test_default_sizes_and_dpi(tmp_path: Path, pt_file: Path) -> None:
    assert plot(pt_file, "--layer", "conv1.weight", "-o", tmp_path / "a.png").exit_code == 0
    assert png_size(tmp_path / "a.png") == (700, 600)
    assert (
        plot(
            pt_file, "--layer", "conv1.weight", "--vs", pt_file, "-o", tmp_path / "b.png"
        ).exit_code
        == 0
    )
    assert png_size(tmp_path / "b.png") == (1400, 600)  # side by side
    assert (
        plot(pt_file, "--layer", "conv1.weight", "--dpi", 200, "-o", tmp_path / "c.png").exit_code
        == 0
    )
    assert png_size(tmp_path / "c.png") == (1400, 1200)


def test_svg_is_valid_xml_of_the_requested_size(tmp_path: Path, pt_file: Path) -> None:
    out = tmp_path / "fc.svg"
    result = plot(
        pt_file,
        "--layer",
        "fc.weight",
        "--axis",
        "cols",
        "-o",
        out,
        "--width",
        640,
        "--height",
        480,
    )
    assert result.exit_code == 0, result.output
    root = ET.parse(out).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert (root.get("width"), root.get("height")) == ("640px", "480px")
    assert "cos between cols" in out.read_text()


def test_metric_bars_without_layer(tmp_path: Path, pt_file: Path, state_dict: dict) -> None:
    other = tmp_path / "other.pt"
    torch.save({k: v * 2 if k == "fc.weight" else v for k, v in state_dict.items()}, other)
    for name, extra in (("bars.png", []), ("bars_vs.svg", ["--vs", other])):
        result = plot(pt_file, *extra, "-o", tmp_path / name, "--width", 1200, "--height", 900)
        assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "bars.png") == (1200, 900)
    svg = (tmp_path / "bars_vs.svg").read_text()
    ET.fromstring(svg.encode())
    for text in ("acv_mean", "near_parallel_rows", "conv_similarity_norm", "model.pt", "other.pt"):
        assert text in svg


def test_cos_matrix_values_and_marks(state_dict: dict) -> None:
    w = state_dict["conv2.weight"].clone()
    w[9] = 0  # a dead row: undefined angle, drawn grey
    cm = cos_matrix("conv2.weight", w)
    rows = w.flatten(1).double()
    n = rows.norm(dim=1, keepdim=True)
    want = (rows / n) @ (rows / n).T
    live = [i for i in range(16) if i != 9]
    np.testing.assert_allclose(cm.cos[np.ix_(live, live)], want[live][:, live].numpy(), atol=1e-6)
    assert np.isnan(cm.cos[9]).all() and np.isnan(cm.cos[:, 9]).all()
    assert cm.cos.shape == (16, 16) and not cm.subsampled
    assert cm.near_parallel == [(1, 4)]  # the planted anti-parallel pair, as inspect counts it
    assert pair_statistics(w.flatten(1), tau_cos=1e-4, tau_euc=0.1).near_parallel == len(
        cm.near_parallel
    )


def test_large_layers_are_subsampled_and_say_so() -> None:
    w = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    w[250] = 3 * w[17]
    cm = cos_matrix("big", w, max_vectors=40, include=[17, 250])
    assert (
        len(cm.indices) == 40
        and cm.indices == sorted(set(cm.indices))
        and {17, 250} <= set(cm.indices)
    )
    assert cm.indices[0] == 0 and cm.indices[-1] == 299
    assert "40 of 300 shown" in heatmap_title(cm)
    pos = {j: i for i, j in enumerate(cm.indices)}
    assert cm.near_parallel == [(pos[17], pos[250])]


def test_missing_matplotlib_says_what_to_install(
    tmp_path: Path, pt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = plot(pt_file, "-o", tmp_path / "x.png")
    assert result.exit_code == 2
    assert (
        "plotting needs matplotlib, which is not installed: pip install 'wcond[plot]'"
        in result.stderr
    )
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--layer", "conv9.weight", "-o", "x.png"],
            "no tensor 'conv9.weight'; layers: conv1.weight, conv2.weight, fc.weight",
        ),
        (["--layer", "conv2", "-o", "x.png"], "did you mean conv2.weight"),
        (
            ["--layer", "fc.bias", "-o", "x.png"],
            "'fc.bias' ((10,), torch.float32) is not a layer weight",
        ),
        (
            ["--layer", "fc.weight", "-o", "x.pdf"],
            "x.pdf: unknown image format '.pdf'; use .png or .svg",
        ),
        (
            ["--layer", "fc.weight", "-o", "x.png", "--width", "300"],
            "--width and --height go together",
        ),
    ],
)
def test_bad_arguments_are_exit_2(
    tmp_path: Path, pt_file: Path, args: list[str], message: str
) -> None:
    args = [str(tmp_path / a) if a.startswith("x.") else a for a in args]
    result = plot(pt_file, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_vs_without_the_layer(tmp_path: Path, pt_file: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.randn(4, 4)}, other)
    result = plot(pt_file, "--layer", "conv1.weight", "--vs", other, "-o", tmp_path / "x.png")
    assert result.exit_code == 2 and "other.pt: no tensor 'conv1.weight'" in result.stderr
