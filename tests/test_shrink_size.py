"""Honest size: `wcond shrink` counts file bytes (data, index entries, manifest), and OUT is never larger than IN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import wcond
from wcond.cli import app
from wcond.shrink import MANIFEST_KEY, shrink
from wcond.shrink.factorized import factorize, paying_parts
from wcond.shrink.sizing import entry_bytes, manifest_bytes, safetensors_bytes


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(pairs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """fc1 24 -> 64 -> fc2 64 -> 64 -> fc3 64 -> 10, with ``pairs`` parallel row pairs in fc2."""
    g = _gen(seed)
    sd = {
        "fc1.weight": torch.randn(64, 24, generator=g),
        "fc1.bias": torch.randn(64, generator=g),
        "fc2.weight": torch.randn(64, 64, generator=g),
        "fc2.bias": torch.randn(64, generator=g),
        "fc3.weight": torch.randn(10, 64, generator=g),
        "fc3.bias": torch.randn(10, generator=g),
    }
    for i in range(pairs):
        sd["fc2.weight"][32 + i] = (2.0, -0.5)[i % 2] * sd["fc2.weight"][i]
    return sd


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


# IN and OUT names have the same length: a torch file stores its own name in every record.
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_shrink_that_pays_is_smaller_and_says_by_how_much(tmp_path: Path, suffix: str) -> None:
    src = _save(_mlp(pairs=20), tmp_path / f"in{suffix}")
    out = tmp_path / f"ou{suffix}"
    report = shrink(src, out)
    assert report.layers[1].changed and report.layers[1].fused_rows == 20
    assert report.file_bytes_before == src.stat().st_size
    assert report.file_bytes_after == out.stat().st_size < src.stat().st_size
    dry = shrink(src, None)  # the dry run's figure bounds the real file from above
    assert (
        dry.file_bytes_estimated
        and out.stat().st_size <= dry.file_bytes_after < dry.file_bytes_before
    )


@pytest.mark.parametrize(
    ("suffix", "pairs", "why"),
    [
        # the layer's fused pairs, scales and their entries cost more than its fused rows save
        # (a torch record costs more than a safetensors entry: up to 3 pairs here)
        (".pt", 3, "takes up to"),
        # pays alone (a row of 64 floats saves 256 bytes), not for the manifest as well
        (".safetensors", 1, "the manifest a factorized file carries"),
    ],
)
def test_out_is_never_larger_when_no_candidate_pays(
    tmp_path: Path, suffix: str, pairs: int, why: str
) -> None:
    src = _save(_mlp(pairs), tmp_path / f"in{suffix}")
    out = tmp_path / f"ou{suffix}"
    report = shrink(src, out)
    fc2 = report.layers[1]
    assert not fc2.changed and fc2.fused_rows == 0 and report.params_removed == 0
    assert any(why in n and "left dense" in n for n in fc2.notes), fc2.notes
    assert out.stat().st_size <= src.stat().st_size
    assert report.file_bytes_after == out.stat().st_size
    back = wcond.load_checkpoint(out)
    assert all(torch.equal(back[k], t) for k, t in _mlp(pairs).items())
    if suffix == ".safetensors":  # nothing factorized: no manifest either
        with safe_open(str(out), framework="pt") as f:
            assert MANIFEST_KEY not in (f.metadata() or {})


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_out_is_never_larger_across_the_break_even_point(tmp_path: Path, suffix: str) -> None:
    for pairs in range(1, 13):
        src = _save(_mlp(pairs), tmp_path / f"in{suffix}")
        out = tmp_path / f"ou{suffix}"
        report = shrink(src, out, force=True)
        assert out.stat().st_size <= src.stat().st_size, (pairs, report.layers[1].notes)
        assert report.layers[1].changed == (out.stat().st_size < src.stat().st_size)


def test_torch_entry_bounds_hold_for_real_files(tmp_path: Path) -> None:
    """Adding one tensor to a torch file grows it by at most the upper bound and at least the lower one.

    (Safetensors files are counted exactly: test_safetensors_bytes_is_exact.)
    """
    suffix, fmt = ".pt", "torch"
    base = {f"layer{i}.weight": torch.randn(7, 5, generator=_gen(i)) for i in range(30)}
    for key, t in [
        ("x", torch.zeros(3)),
        (
            "model.layers.17.mlp.down_proj.weight.__wcond_row_index",
            torch.zeros(4096, dtype=torch.int32),
        ),
        ("ü" * 40, torch.zeros(2, 3, 4, 5, dtype=torch.float16)),
        ("fc.weight.__wcond_row_coef", torch.zeros(513, dtype=torch.float64)),
        ("fc.weight.__wcond_row_fused", torch.zeros(2, 2, dtype=torch.int32)),
        (
            "model.layers.3.mlp.up_proj.weight.__wcond_col_fused",
            torch.zeros(700, 2, dtype=torch.int32),
        ),
        ("fc.weight.__wcond_col_scale", torch.zeros(1)),
    ]:
        a = _save(base, tmp_path / f"aa{suffix}")
        b = _save({**base, key: t}, tmp_path / f"ab{suffix}")
        grew = b.stat().st_size - a.stat().st_size
        kw = {"file_size": b.stat().st_size, "archive": "ab"}
        assert entry_bytes(fmt, key, t.shape, t.dtype, upper=False, **kw) <= grew
        assert grew <= entry_bytes(fmt, key, t.shape, t.dtype, upper=True, **kw)


def test_manifest_bound_holds_for_a_safetensors_file(tmp_path: Path) -> None:
    sd = {"w": torch.randn(4, 4)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(sd, str(a))
    text = '{"layers": {"fc\\"1": [1, 2]}, "note": "ü \\n"}'
    save_file(sd, str(b), metadata={MANIFEST_KEY: text})
    assert b.stat().st_size - a.stat().st_size <= manifest_bytes("safetensors", MANIFEST_KEY, text)


def test_the_cli_report_ends_with_file_bytes(tmp_path: Path) -> None:
    src = _save(_mlp(pairs=20), tmp_path / "in.safetensors")
    out = tmp_path / "ou.safetensors"
    result = CliRunner().invoke(app, ["shrink", str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    before, after = src.stat().st_size, out.stat().st_size
    assert last == f"file bytes: {before:,} → {after:,} ({100 * (after - before) / before:+.1f}%)"
    dry = CliRunner().invoke(app, ["shrink", str(src), "--dry-run"])
    assert dry.stdout.strip().splitlines()[-1].startswith(f"file bytes: {before:,} → at most ")


def test_safetensors_bytes_is_exact(tmp_path: Path) -> None:
    g = _gen(3)
    sd = {
        "b.weight": torch.randn(33, 17, generator=g),
        "a.weight.__wcond_row_index": torch.zeros(1000, dtype=torch.int32),
        "a.weight.__wcond_row_coef": torch.zeros(1000, dtype=torch.float64),
        "c.weight.__wcond_row_fused": torch.zeros(17, 2, dtype=torch.int32),
        "c.weight.__wcond_row_scale": torch.zeros(17),
        "ü.bias": torch.zeros(3, dtype=torch.bfloat16),
        'q"\n': torch.zeros(2, 2, dtype=torch.int64),
        "m": torch.zeros(5, dtype=torch.uint8),
        "h": torch.zeros(7, dtype=torch.float16),
    }
    for meta in (None, {"format": "pt", MANIFEST_KEY: '{"a": "ü\\"x"}'}):
        path = tmp_path / "x.safetensors"
        save_file(sd, str(path), metadata=meta)
        entries = [(k, t.shape, t.dtype) for k, t in sd.items()]
        assert safetensors_bytes(entries, meta) == path.stat().st_size


@pytest.mark.parametrize(("key", "pays_alone"), [("layer.w123", False), ("layer.w12", True)])
def test_a_layer_whose_factors_take_exactly_its_dense_bytes_is_left_dense(
    tmp_path: Path, key: str, pays_alone: bool
) -> None:
    """The size rule stores a layer factorized only when that makes its entries strictly smaller.
    A 16 x 16 float32 layer with 4 fused row pairs, named with 10 characters, takes 1,090 bytes
    of a safetensors file dense and up to 1,090 factorized (W', fused pairs and scales): the tie
    is left dense on its own count. A name one character shorter saves 2 bytes (three entries
    name the key instead of one), so it passes that count and is weighed with the manifest."""
    w = torch.randn(16, 16, generator=_gen(0))
    w[8:12] = 2.0 * w[:4]
    factorization = factorize(w, ("rows",), device="cpu")
    assert factorization.fused_rows == 4
    src = _save({key: w}, tmp_path / "in.safetensors")
    ck = wcond.open_checkpoint(src)
    notes: list[str] = []
    parts, size = paying_parts(
        "safetensors",
        {key: ck.info(key)},
        {key: factorization},
        {key: notes},
        metadata={},
        archive="in",
        size_before=10**6,  # data offsets of up to 7 digits
    )
    assert parts == {} and size == src.stat().st_size  # left as it is
    (note,) = notes
    if pays_alone:
        assert "the manifest a factorized file carries" in note and "left dense" in note
    else:
        assert note == (
            "4 row and 0 column pairs would fuse, but W' with its fused pairs and scales takes "
            "up to 1,090 bytes of the file, dense at least 1,090: left dense"
        )


def test_a_file_exactly_as_large_factorized_as_dense_is_left_dense(tmp_path: Path) -> None:
    """The same rule for the whole file: a 16 x 16 float32 layer with 6 fused row pairs under a
    36-character name pays on its own count, but the safetensors file it makes with the manifest
    takes exactly the dense file's 1,128 bytes, so the layer is left dense."""
    key = "k" * 36
    w = torch.randn(16, 16, generator=_gen(0))
    w[8:14] = 2.0 * w[:6]
    factorization = factorize(w, ("rows",), device="cpu")
    assert factorization.fused_rows == 6
    src = _save({key: w}, tmp_path / "in.safetensors")
    assert src.stat().st_size == 1128
    notes: list[str] = []
    parts, size = paying_parts(
        "safetensors",
        {key: wcond.open_checkpoint(src).info(key)},
        {key: factorization},
        {key: notes},
        metadata={},
        archive="in",
        size_before=src.stat().st_size,
    )
    assert parts == {} and size == 1128
    assert notes == [
        "6 row and 0 column pairs would fuse, but with the manifest a factorized file carries "
        "the file would take 1,128 bytes, dense 1,128: left dense"
    ]
