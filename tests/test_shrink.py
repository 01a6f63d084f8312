"""wcond.shrink: RaRe merging of near-parallel vectors, factorized storage, expansion, folding."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import literal
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import wcond
from wcond import metrics
from wcond.errors import CheckpointError, UsageError
from wcond.metrics import blocks
from wcond.shrink import (
    COL_COEF,
    COL_FUSED,
    COL_INDEX,
    COL_SCALE,
    MANIFEST_KEY,
    ROW_COEF,
    ROW_FUSED,
    ROW_INDEX,
    ROW_SCALE,
    W_SUFFIX,
    Grouping,
    expand,
    factorize,
    fold,
    fuse_vectors,
    owner_scaled,
    shrink,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def literal_rebuild(parts: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """docs/FACTORIZED.md's rebuild of format 2, one original at a time, in float64.

    Along each fused axis, an original listed as [o, s] in ``fused`` is ``scale * W'[s]``; the
    i-th original not listed is ``W'[i]``.
    """
    w = parts[key + W_SUFFIX].double()
    for dim, (fused_key, scale_key) in enumerate(((ROW_FUSED, ROW_SCALE), (COL_FUSED, COL_SCALE))):
        if key + fused_key not in parts:
            continue
        listed = {
            int(o): (int(s), float(c))
            for (o, s), c in zip(parts[key + fused_key].tolist(), parts[key + scale_key].tolist())
        }
        kept = iter(range(w.shape[dim]))
        slices = []
        for o in range(w.shape[dim] + len(listed)):
            s, c = listed.get(o, (None, 1.0))
            slices.append(c * w.select(dim, next(kept) if s is None else s))
        w = torch.stack(slices, dim)
    return w


def _rebuild(f, key: str = "w") -> torch.Tensor:
    """The dense weight from a Factorization's stored entries, by the format's literal rule."""
    return literal_rebuild(f.tensors(key), key).to(f.w.dtype)


# --------------------------------------------------------------------------- the blocked pair search


@pytest.mark.parametrize("block_elements", [1 << 24, 7])
def test_near_parallel_pairs_match_the_literal_definition(
    monkeypatch: pytest.MonkeyPatch, block_elements: int
) -> None:
    monkeypatch.setattr(
        blocks, "_BLOCK_ELEMENTS", block_elements
    )  # 7: one row per block, many blocks
    v = torch.randn(30, 5, generator=_gen(1))
    v[7] = 2 * v[3]
    v[9] = -0.3 * v[3] + 1e-4 * torch.randn(5, generator=_gen(2))
    v[11] = 0  # dead: never paired
    v[21] = 1.001 * v[20]
    v[25] = 40 * v[24]  # parallel, but D_euc = |short| sqrt(2 - 2|cos|) is tiny too: still a pair
    got = [(p.i, p.j, p.cos) for p in metrics.near_parallel_pairs(v, tau_cos=1e-4, tau_euc=0.1)]
    want = literal.near_parallel_pairs(v.double().numpy(), 1e-4, 0.1)
    assert [(i, j) for i, j, _ in got] == [(i, j) for i, j, _ in want]
    assert [c for *_, c in got] == pytest.approx([c for *_, c in want], abs=1e-6)
    assert len(got) == metrics.pair_statistics(v, tau_cos=1e-4, tau_euc=0.1).near_parallel


def test_tau_euc_rejects_long_vectors_at_a_small_angle() -> None:
    v = torch.zeros(2, 3, dtype=torch.float64)
    v[0] = torch.tensor([100.0, 0, 0])
    v[1] = torch.tensor([100.0, 0.5, 0])  # 1 - cos ~ 1.2e-5 < tau_cos, but D_euc ~ 0.5
    assert list(metrics.near_parallel_pairs(v, tau_cos=1e-4, tau_euc=0.1)) == []
    assert len(list(metrics.near_parallel_pairs(v, tau_cos=1e-4, tau_euc=1.0))) == 1


# --------------------------------------------------------------------------- greedy fusing


def test_parallel_and_antiparallel_pairs_fuse_keeping_the_shorter() -> None:
    v = torch.randn(8, 6, generator=_gen(3), dtype=torch.float64)
    v[5] = 2.0 * v[1]  # parallel, 1 is shorter
    v[6] = -0.25 * v[3]  # anti-parallel, 6 is shorter
    g = fuse_vectors(v, tau_cos=1e-4, tau_euc=0.1)
    assert g.fused == 2 and g.kept == 6
    assert g.kept_indices == [0, 1, 2, 4, 6, 7] and g.removed == [3, 5]
    assert g.index[5] == g.index[1] and g.index[3] == g.index[6]
    # METRICS.md: r = <w_i, w_j> / |w_j|^2, s = sqrt(1 + r^2); j gets 1/s, i gets r/s.
    assert float(g.coef[1]) == pytest.approx(1 / math.sqrt(5)) and float(
        g.coef[5]
    ) == pytest.approx(2 / math.sqrt(5))
    assert float(g.coef[6]) == pytest.approx(1 / math.sqrt(17)) and float(
        g.coef[3]
    ) == pytest.approx(-4 / math.sqrt(17))
    assert g.max_angle == pytest.approx(0, abs=1e-5)


def test_a_fused_vector_is_retested_so_groups_grow() -> None:
    # After the first fusion every queued pair with 2, 7 or 9 is stale: the third joins only by re-testing.
    v = torch.randn(10, 6, generator=_gen(4), dtype=torch.float64)
    v[7], v[9] = -2.5 * v[2], 0.5 * v[2]
    g = fuse_vectors(v, tau_cos=1e-4, tau_euc=0.1)
    assert g.fused == 2 and g.removed == [2, 7]
    assert len({int(g.index[k]) for k in (2, 7, 9)}) == 1
    assert float((g.coef[[2, 7, 9]] ** 2).sum()) == pytest.approx(
        1
    )  # a group's coefficients are a unit vector


@pytest.mark.parametrize(
    ("d_euc", "joins"), [(0.02 * (1 - 1e-6), True), (0.02 * (1 + 1e-6), False)]
)
def test_a_fused_vector_is_retested_with_tau_euc_and_its_new_norm(
    d_euc: float, joins: bool
) -> None:
    """0 and 1 fuse first (exactly parallel) into a vector of norm sqrt(5); 2, of norm 3, lies
    within tau_cos of it and at D_euc = sqrt(5) * sqrt(2 - 2 cos) just inside or just outside
    tau_euc = 0.02. Its queued pairs with 0 and 1 (D_euc from norms 1 and 2) are stale after the
    fusion, so 2 joins only by re-testing against the fused vector, at the fused vector's norm."""
    chord = d_euc / math.sqrt(5)  # sqrt(2 - 2 cos) against the fused vector
    theta = 2 * math.asin(chord / 2)
    assert 1 - math.cos(theta) < 1e-4
    v = torch.tensor(
        [[1.0, 0.0], [2.0, 0.0], [3 * math.cos(theta), 3 * math.sin(theta)]], dtype=torch.float64
    )
    queued = {(p.i, p.j) for p in metrics.near_parallel_pairs(v, tau_cos=1e-4, tau_euc=0.02)}
    assert queued == {(0, 1), (0, 2), (1, 2)}
    g = fuse_vectors(v, tau_cos=1e-4, tau_euc=0.02)
    assert g.fused == (2 if joins else 1) and g.removed == ([1, 2] if joins else [1])


def test_closest_pair_first() -> None:
    # 1 is near both 0 and 2; (1, 2) is closer, fuses first, and the fused vector is too far from 0.
    base = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    v = torch.stack(
        [base + torch.tensor([0, 0.0135, 0.0]), base, base + torch.tensor([0, -0.004, 0.0])]
    )
    g = fuse_vectors(v, tau_cos=1e-4, tau_euc=0.1)
    assert g.fused == 1 and g.index[1] == g.index[2] != g.index[0]


def test_positive_only_skips_antiparallel_pairs() -> None:
    v = torch.randn(6, 4, generator=_gen(5))
    v[4] = -3 * v[0]
    v[5] = 3 * v[1]
    assert fuse_vectors(v, tau_cos=1e-4, tau_euc=0.1).fused == 2
    g = fuse_vectors(v, tau_cos=1e-4, tau_euc=0.1, positive=True)
    assert g.fused == 1 and g.removed == [5]


def test_nothing_to_fuse_is_the_identity() -> None:
    v = torch.randn(20, 32, generator=_gen(6))
    g = fuse_vectors(v, tau_cos=1e-4, tau_euc=0.1)
    assert (
        g.fused == 0
        and g.index.tolist() == list(range(20))
        and g.coef.tolist() == [1.0] * 20
        and g.max_angle is None
    )


# --------------------------------------------------------------------------- one layer


def test_factorize_rows_and_cols_of_a_matrix_exactly() -> None:
    w = torch.randn(12, 9, generator=_gen(7))
    w[:, 6] = 0.5 * w[:, 2]  # columns first, so that planting rows keeps them parallel
    w[10] = -3 * w[4]
    w[11] = 0.2 * w[4]
    f = factorize(w, ["rows", "cols"])
    assert (f.fused_rows, f.fused_cols) == (2, 1) and f.w.shape == (10, 8) and f.w.dtype == w.dtype
    assert f.error is not None and f.error < 1e-6
    torch.testing.assert_close(_rebuild(f), w, rtol=1e-5, atol=1e-6)


def test_factorize_conv_along_filters_and_input_channels() -> None:
    w = torch.randn(8, 6, 3, 3, generator=_gen(8))
    w[:, 4] = 0.5 * w[:, 2]  # input channel 4 reads like channel 2
    w[5] = -2 * w[1]  # filter 5 = -2 x filter 1
    rows = factorize(w, ["rows"])
    assert rows.fused_rows == 1 and rows.w.shape == (7, 6, 3, 3)
    cols = factorize(w, ["cols"])
    assert cols.fused_cols == 1 and cols.w.shape == (8, 5, 3, 3)
    both = factorize(w, ["rows", "cols"])
    assert both.w.shape == (7, 5, 3, 3) and both.error < 1e-6
    torch.testing.assert_close(_rebuild(both), w, rtol=1e-5, atol=1e-6)
    # the input-channel grouping acts on the conv's inputs: conv(x, W) = conv(x Q^T, W') for exact pairs
    x = torch.randn(2, 6, 7, 7, generator=_gen(9))
    q = torch.zeros(5, 6, dtype=torch.float64)
    q[cols.cols.index, torch.arange(6)] = cols.cols.coef
    x_small = torch.einsum("nchw,kc->nkhw", x.double(), q).float()
    torch.testing.assert_close(
        nn.functional.conv2d(x_small, cols.w), nn.functional.conv2d(x, w), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("seed", range(6))
def test_near_parallel_error_within_what_tau_cos_allows(seed: int) -> None:
    """One fused pair (keep w_j, |w_j| = a <= |w_i| = b, cosine c), with the refit W' = W Q^T:

    error^2 = a^2 b^2 (1 - c^2) / (a^2 + b^2 c^2)
            <= min(b^2, a^2 / c^2) (1 - c^2)       (drop a^2, resp. b^2 c^2 ... from the denominator)
            <  2 tau_cos a^2 / (1 - tau_cos)^2      (1 - |c| < tau_cos: 1 - c^2 < 2 tau_cos, c^2 > (1 - tau_cos)^2)
    """
    tau = 1e-4
    g = _gen(100 + seed)
    w = torch.randn(20, 7, generator=g, dtype=torch.float64)
    j, i = 1, 5
    k = [1.5, -2.0, 3.0, -1.1, 1.0, 4.0][seed]
    noise = torch.randn(20, generator=g, dtype=torch.float64)
    noise -= (noise @ w[:, j]) / (w[:, j] @ w[:, j]) * w[:, j]  # orthogonal to w_j
    w[:, i] = k * w[:, j] + 1e-3 * (seed + 1) * noise / noise.norm() * w[:, j].norm()
    c = float(w[:, i] @ w[:, j] / (w[:, i].norm() * w[:, j].norm()))
    assert 1 - abs(c) < tau
    f = factorize(w, ["cols"], tau_cos=tau, tau_euc=10.0)
    assert f.fused_cols == 1 and f.cols.removed == [i]
    a, b = float(w[:, j].norm()), float(w[:, i].norm())
    err2 = (f.error * float(w.norm())) ** 2
    assert err2 == pytest.approx(a * a * b * b * (1 - c * c) / (a * a + b * b * c * c), rel=1e-6)
    assert err2 <= min(b * b, a * a / (c * c)) * (1 - c * c) * (1 + 1e-9)
    assert err2 < 2 * tau * a * a / (1 - tau) ** 2


def _planted(case: str) -> tuple[torch.Tensor, list[str]]:
    """A weight with exactly (anti-)parallel vectors planted, and the axes to fuse."""
    dtype = torch.float64 if case == "float64" else torch.float32
    shape = (10, 7, 3, 3) if case == "conv" else (12, 9)
    w = torch.randn(*shape, generator=_gen(40), dtype=dtype)
    if case in ("cols", "both", "conv"):
        w[:, 6] = 0.5 * w[:, 2]  # columns first, so that planting rows keeps them parallel
    if case in ("rows", "both", "conv", "float64"):
        w[8] = 3.0 * w[1]
    if case in ("antiparallel", "both", "conv"):
        w[9] = -0.25 * w[4]
    if case == "three":
        w[7], w[9] = -2.5 * w[2], 0.5 * w[2]
    axes = {"cols": ["cols"], "both": ["rows", "cols"], "conv": ["rows", "cols"]}
    return w, axes.get(case, ["rows"])


@pytest.mark.parametrize(
    "case", ["rows", "cols", "both", "conv", "antiparallel", "three", "float64"]
)
def test_format_2_round_trips_through_a_file(case: str, tmp_path: Path) -> None:
    w, axes = _planted(case)
    f = factorize(w, axes)
    assert f.fused_rows + f.fused_cols > 0
    parts = f.tensors("fc.weight")
    path = tmp_path / "f.safetensors"
    save_file({**parts, "fc.bias": torch.zeros(w.shape[0])}, str(path))
    back = wcond.load_state_dict(path)
    assert back["fc.weight"].dtype == w.dtype and back["fc.weight"].shape == w.shape
    torch.testing.assert_close(back["fc.weight"], w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        literal_rebuild(parts, "fc.weight"), w.double(), rtol=1e-6, atol=1e-6
    )
    scale = parts.get("fc.weight" + ROW_SCALE, parts.get("fc.weight" + COL_SCALE))
    assert scale is not None and scale.dtype == (
        torch.float64 if w.dtype == torch.float64 else torch.float32
    )


def test_format_2_stores_the_kept_vectors_and_the_planted_ratios() -> None:
    """Exact pairs: W' holds the kept originals themselves, each removed one its ratio to its owner."""
    w, _ = _planted("three")  # 9 = 0.5 x 2 is the shortest of 2, 7, 9 and keeps its row
    w[11] = -4.0 * w[5]  # 5 is shorter and keeps its row
    parts = factorize(w, ["rows"]).tensors("k")
    kept = [r for r in range(12) if r not in (2, 7, 11)]
    # stored rows are the kept originals in order: 9 is stored row 7, 5 is stored row 4
    assert parts["k" + ROW_FUSED].tolist() == [[2, 7], [7, 7], [11, 4]]
    assert parts["k" + ROW_SCALE].tolist() == pytest.approx([2.0, -5.0, -4.0], rel=1e-6)
    torch.testing.assert_close(parts["k" + W_SUFFIX], w[kept], rtol=1e-6, atol=1e-7)
    assert set(parts) == {"k" + W_SUFFIX, "k" + ROW_FUSED, "k" + ROW_SCALE}


def test_stored_bytes_count_twelve_bytes_a_fused_pair() -> None:
    w, axes = _planted("both")  # 2 row pairs, 1 column pair: W' 10 x 8
    f = factorize(w, axes)
    assert f.stored_bytes == 10 * 8 * 4 + 3 * 12
    assert f.stored_bytes == sum(t.numel() * t.element_size() for t in f.tensors("k").values())


def test_owner_scaled_refuses_groupings_format_2_cannot_hold() -> None:
    w = torch.ones(2, 3)

    def grouping(index: list[int], coef: list[float], kept: list[int]) -> Grouping:
        return Grouping(torch.tensor(index), torch.tensor(coef, dtype=torch.float64), kept, 1)

    with pytest.raises(ValueError, match="original in slot p"):  # original 0 is not in slot 0
        owner_scaled(w, grouping([1, 0, 0], [1.0, 1.0, 0.5], [0, 1]), 0)
    with pytest.raises(ValueError, match="original in slot p"):  # slots out of original order
        owner_scaled(w, grouping([1, 0, 1], [1.0, 1.0, 0.5], [1, 0]), 0)
    with pytest.raises(ValueError, match="coefficient 0"):
        owner_scaled(w, grouping([0, 1, 1], [0.0, 1.0, 0.5], [0, 1]), 0)
    scaled, fused, scale = owner_scaled(w, grouping([0, 1, 1], [1.0, 0.25, 0.5], [0, 1]), 0)
    assert scaled.tolist() == [[1.0] * 3, [0.25] * 3] and fused.tolist() == [[2, 1]]
    assert scale.tolist() == [2.0]


def test_a_format_1_file_still_loads_inspects_and_expands(tmp_path: Path) -> None:
    """Written by hand with the old suffixes: an index and a coefficient per original row and column."""
    wp = torch.randn(3, 2, generator=_gen(41))
    sd = {
        "fc.weight" + W_SUFFIX: wp,
        "fc.weight" + ROW_INDEX: torch.tensor([0, 1, 2, 0], dtype=torch.int32),
        "fc.weight" + ROW_COEF: torch.tensor([1.0, 1.0, 1.0, -2.0]),
        "fc.weight" + COL_INDEX: torch.tensor([0, 1, 1], dtype=torch.int32),
        "fc.weight" + COL_COEF: torch.tensor([1.0, 0.5, 0.5]),
        "fc.bias": torch.arange(4.0),
        "head.weight": torch.randn(2, 4, generator=_gen(42)),
    }
    manifest = {"format": 1, "layers": {"fc.weight": {"shape": [4, 3], "stored_shape": [3, 2]}}}
    path = tmp_path / "old.safetensors"
    save_file(sd, str(path), metadata={MANIFEST_KEY: json.dumps(manifest)})
    want = torch.empty(4, 3)
    for o, (i, a) in enumerate([(0, 1.0), (1, 1.0), (2, 1.0), (0, -2.0)]):
        for c, (j, b) in enumerate([(0, 1.0), (1, 0.5), (1, 0.5)]):
            want[o, c] = a * b * wp[i, j]
    back = wcond.load_state_dict(path)
    assert set(back) == {"fc.weight", "fc.bias", "head.weight"}
    torch.testing.assert_close(back["fc.weight"], want)
    (fc,) = [r for r in wcond.inspect(path).layers if r.name == "fc.weight"]
    assert fc.shape == [4, 3] and fc.factorized == {"params_stored": 6, "params_dense": 12}
    assert any(n.startswith("factorized (rows and columns fused): stored as 3x2") for n in fc.notes)
    dense = tmp_path / "dense.pt"
    assert expand(path, dense).expanded == ["fc.weight"]
    torch.testing.assert_close(torch.load(dense, weights_only=True)["fc.weight"], want)


# --------------------------------------------------------------------------- checkpoints


class MLP(nn.Module):
    def __init__(
        self, widths: tuple[int, ...] = (64, 64, 64, 10), act: type[nn.Module] = nn.ReLU
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(widths[0], widths[1])
        self.fc2 = nn.Linear(widths[1], widths[2])
        self.fc3 = nn.Linear(widths[2], widths[3])
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def planted_mlp() -> MLP:
    """Exactly (anti-)parallel vectors in every layer, the protected ones included."""
    torch.manual_seed(0)
    m = MLP()
    with torch.no_grad():
        w1, w2, w3 = m.fc1.weight, m.fc2.weight, m.fc3.weight
        w1[:, 3] = 2 * w1[:, 0]  # the network's inputs: protected by default
        # Enough pairs that factorizing pays for its indices and the manifest (file bytes).
        ks = (1.5, -0.5, 2.0, -3.0)
        for i in range(16):
            w1[20 + i] = ks[i % 4] * w1[1 + i]
        for i in range(12):
            w2[:, 12 + i] = (0.5, -2.0, 3.0)[i % 3] * w2[:, i]
        for i in range(12):
            w2[42 + i] = (1.5, -0.7, 2.0)[i % 3] * w2[30 + i]
        w3[4] = 0.5 * w3[1]  # the classes: protected by default
    return m


@pytest.fixture
def mlp_file(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.pt"
    torch.save(planted_mlp().state_dict(), path)
    return path


def test_shrink_and_load_give_back_the_model(mlp_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.safetensors"
    report = shrink(mlp_file, out)
    by = {r.name: r for r in report.layers}
    assert (by["fc1.weight"].fused_rows, by["fc1.weight"].fused_cols) == (
        16,
        0,
    )  # square: both axes, columns protected
    assert (by["fc2.weight"].fused_rows, by["fc2.weight"].fused_cols) == (12, 12)
    assert (by["fc3.weight"].fused_rows, by["fc3.weight"].fused_cols) == (
        0,
        0,
    )  # rows protected; cols: none parallel
    assert by["fc2.weight"].shape_after == [52, 52] and by["fc2.weight"].params_after == 52 * 52
    assert all(r.reconstruction_error < 1e-6 for r in report.layers)
    assert any("columns protected" in n for n in by["fc1.weight"].notes)
    assert (
        by["fc3.weight"].axes == ["cols"] and by["fc3.weight"].notes == []
    )  # auto never looked at its rows
    assert report.params_removed == 64 * 64 - 48 * 64 + 64 * 64 - 52 * 52
    assert out.stat().st_size < mlp_file.stat().st_size

    original = torch.load(mlp_file, weights_only=True)
    dense = wcond.load_state_dict(out)
    assert set(dense) == set(original)
    for key, t in original.items():
        torch.testing.assert_close(dense[key], t, rtol=1e-5, atol=1e-6)
    model = MLP()
    model.load_state_dict(dense)
    x = torch.randn(32, 64, generator=_gen(10))
    torch.testing.assert_close(model(x), planted_mlp()(x), rtol=1e-4, atol=1e-5)


def test_stored_layout_manifest_and_untouched_tensors(mlp_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.safetensors"
    shrink(mlp_file, out)
    original = torch.load(mlp_file, weights_only=True)
    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()[MANIFEST_KEY])
        stored = {k: f.get_tensor(k) for k in keys}
    assert "fc1.weight" not in stored and "fc2.weight" not in stored
    assert (
        stored["fc1.weight" + W_SUFFIX].shape == (48, 64) and "fc1.weight" + COL_FUSED not in stored
    )
    # one [original, stored] pair and one scale per fused row: 16 in fc1, 12 columns in fc2
    assert stored["fc1.weight" + ROW_FUSED].dtype == torch.int32 and stored[
        "fc1.weight" + ROW_FUSED
    ].shape == (16, 2)
    assert stored["fc2.weight" + COL_SCALE].dtype == torch.float32 and stored[
        "fc2.weight" + COL_SCALE
    ].shape == (12,)
    for key in ("fc1.bias", "fc2.bias", "fc3.weight", "fc3.bias"):  # untouched: bit-identical
        assert stored[key].dtype == original[key].dtype and torch.equal(stored[key], original[key])
    assert stored["fc2.weight" + W_SUFFIX].shape == (52, 52)
    # the manifest says which format and which writer, no more: the keys say how to rebuild
    assert meta == {"format": 2, "wcond_version": wcond.__version__}


def test_no_protect_ends_and_protect(mlp_file: Path) -> None:
    by = {r.name: r for r in shrink(mlp_file, axis="both").layers}
    assert by["fc1.weight"].fused_cols == 0 and by["fc3.weight"].fused_rows == 0
    assert any("rows protected: the last layer" in n for n in by["fc3.weight"].notes)
    by = {r.name: r for r in shrink(mlp_file, axis="both", protect_ends=False).layers}
    assert by["fc1.weight"].fused_cols == 1  # pays with the layer's rows
    fc3 = by["fc3.weight"]  # searched now, but one row pair of ten does not pay for its indices
    assert fc3.axes == ["rows", "cols"] and fc3.fused_rows == 0 and "left dense" in fc3.notes[0]
    by = {r.name: r for r in shrink(mlp_file, protect=["fc2.*"]).layers}
    assert (
        by["fc2.weight"].fused_rows == by["fc2.weight"].fused_cols == 0
        and by["fc1.weight"].fused_rows == 16
    )
    assert by["fc2.weight"].notes == ["protected (--protect): not fused"]


def test_axis_choice(mlp_file: Path) -> None:
    by = {r.name: r for r in shrink(mlp_file, axis="cols").layers}
    assert (
        by["fc1.weight"].fused_rows,
        by["fc2.weight"].fused_rows,
        by["fc2.weight"].fused_cols,
    ) == (0, 0, 12)
    by = {r.name: r for r in shrink(mlp_file, axis="rows", layers=["fc2.*"]).layers}
    assert list(by) == ["fc2.weight"] and (
        by["fc2.weight"].fused_rows,
        by["fc2.weight"].fused_cols,
    ) == (12, 0)
    by = {r.name: r for r in shrink(mlp_file, axis="rows", layers=["fc2"]).layers}  # a module
    assert list(by) == ["fc2.weight"] and by["fc2.weight"].fused_rows == 12
    by = {r.name: r for r in shrink(mlp_file, protect=["fc2"]).layers}
    assert by["fc2.weight"].notes == ["protected (--protect): not fused"]
    with pytest.raises(UsageError, match="axis='diagonal'"):
        shrink(mlp_file, axis="diagonal")


def test_auto_axis_is_the_longer_one(tmp_path: Path) -> None:
    w = torch.randn(120, 40, generator=_gen(11))
    w[:, 5] = 2 * w[:, 1]  # a column pair: not looked at, rows are the longer axis
    w[90:] = 0.5 * w[:30]
    path = tmp_path / "tall.safetensors"
    # safetensors sorts its keys: wcond reads them in natural order, so "first" and "last" are l1 and l3
    save_file(
        {
            "l3.weight": torch.randn(3, 120, generator=_gen(13)),
            "l2.weight": w,
            "l1.weight": torch.randn(8, 8, generator=_gen(12)),
        },
        str(path),
    )
    by = {r.name: r for r in shrink(path).layers}
    assert (by["l2.weight"].fused_rows, by["l2.weight"].fused_cols) == (30, 0)
    assert (
        by["l2.weight"].axes == ["rows"]
        and by["l3.weight"].axes == ["cols"]
        and by["l1.weight"].axes == ["rows"]
    )


def test_a_factorization_that_would_not_save_bytes_is_left_dense(tmp_path: Path) -> None:
    w = torch.randn(16, 16, generator=_gen(14))
    w[9] = 2 * w[3]  # one row saves 64 bytes, the index and coefficient per row cost 128
    sd = {
        "a.weight": torch.randn(16, 16, generator=_gen(15)),
        "b.weight": w,
        "c.weight": torch.randn(4, 16, generator=_gen(16)),
    }
    src, out = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    save_file(sd, str(src))
    report = shrink(src, out)
    b = report.layers[1]
    assert b.fused_rows == 0 and not b.changed and "left dense" in b.notes[0]
    assert torch.equal(wcond.load_checkpoint(out)["b.weight"], w) and report.params_removed == 0


def test_dry_run_writes_nothing(mlp_file: Path, tmp_path: Path) -> None:
    before = set(tmp_path.iterdir())
    report = shrink(mlp_file, None)
    assert (
        report.output is None
        and report.params_removed > 0
        and report.bytes_after < report.bytes_before
    )
    assert set(tmp_path.iterdir()) == before


def test_refusals(mlp_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="refusing to write over the input"):
        shrink(mlp_file, mlp_file)
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"x")
    with pytest.raises(UsageError, match="already exists; pass force=True"):
        shrink(mlp_file, existing)
    shrink(mlp_file, existing, force=True)
    with pytest.raises(UsageError, match="is already shrunk"):
        shrink(existing, tmp_path / "again.safetensors")
    with pytest.raises(CheckpointError, match="no layer matches"):
        shrink(mlp_file, layers=["nothing*"])
    biases = tmp_path / "biases.safetensors"
    save_file({"b": torch.zeros(3)}, str(biases))
    with pytest.raises(CheckpointError, match="no weight matrices or conv kernels"):
        shrink(biases)


def test_torch_output_keeps_wrapper_entries_order_and_manifest(
    mlp_file: Path, tmp_path: Path
) -> None:
    sd = torch.load(mlp_file, weights_only=True)
    src = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "epoch": 3,
            "state_dict": OrderedDict((f"model.{k}", v) for k, v in sd.items()),
            "hyper_parameters": {"lr": 0.1},
        },
        src,
    )
    out = tmp_path / "small.ckpt"
    shrink(src, out)
    obj = torch.load(out, weights_only=True)
    assert obj["epoch"] == 3 and obj["hyper_parameters"] == {"lr": 0.1}
    assert json.loads(obj[MANIFEST_KEY])["format"] == 2
    assert obj["state_dict"]["model.fc1.weight" + W_SUFFIX].shape == (48, 64)
    assert list(obj["state_dict"])[:4] == [
        "model.fc1.weight" + W_SUFFIX,
        "model.fc1.weight" + ROW_FUSED,
        "model.fc1.weight" + ROW_SCALE,
        "model.fc1.bias",
    ]
    dense = tmp_path / "dense.ckpt"
    result = expand(out, dense)
    assert result.expanded == ["model.fc1.weight", "model.fc2.weight"]
    obj = torch.load(dense, weights_only=True)
    assert (
        MANIFEST_KEY not in obj
        and obj["epoch"] == 3
        and list(obj["state_dict"]) == [f"model.{k}" for k in sd]
    )
    for k, v in sd.items():
        torch.testing.assert_close(obj["state_dict"][f"model.{k}"], v, rtol=1e-5, atol=1e-6)


def test_expand_to_safetensors_drops_the_manifest(mlp_file: Path, tmp_path: Path) -> None:
    small, dense = tmp_path / "small.safetensors", tmp_path / "dense.safetensors"
    shrink(mlp_file, small)
    expand(small, dense)
    with safe_open(str(dense), framework="pt") as f:
        assert MANIFEST_KEY not in (f.metadata() or {})
        assert set(f.keys()) == set(torch.load(mlp_file, weights_only=True))
    with pytest.raises(UsageError, match="already exists"):
        expand(small, dense)


def test_inspect_reads_a_shrunk_checkpoint(mlp_file: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.pt"
    shrink(mlp_file, small)
    report = wcond.inspect(small)
    by = {r.name: r for r in report.layers}
    assert list(by) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert by["fc2.weight"].shape == [64, 64] and by["fc2.weight"].factorized == {
        "params_stored": 52 * 52,
        "params_dense": 64 * 64,
    }
    assert by["fc3.weight"].factorized is None
    assert any(
        n.startswith("factorized (rows and columns fused): stored as 52x52")
        for n in by["fc2.weight"].notes
    )
    assert (
        by["fc2.weight"].near_parallel_rows == 12
    )  # the metrics are those of the rebuilt dense weight


def test_damaged_shrunk_checkpoints_are_clear_errors(mlp_file: Path, tmp_path: Path) -> None:
    small = tmp_path / "small.safetensors"
    shrink(mlp_file, small)
    parts = wcond.load_checkpoint(small)

    def damaged(name: str, change) -> Path:
        sd = dict(parts)
        change(sd)
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, str(path))
        return path

    no_coef = damaged("no_coef", lambda sd: sd.pop("fc1.weight" + ROW_SCALE))
    with pytest.raises(
        CheckpointError,
        match=r"'fc1.weight.__wcond_row_fused' has no 'fc1.weight.__wcond_row_scale'",
    ):
        wcond.load_state_dict(no_coef)
    orphan = damaged("orphan", lambda sd: sd.pop("fc1.weight" + W_SUFFIX))
    with pytest.raises(CheckpointError, match="has no 'fc1.weight.__wcond_w' beside it"):
        wcond.load_state_dict(orphan)
    both = damaged("both", lambda sd: sd.update({"fc1.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match="stored both dense and factorized"):
        wcond.load_state_dict(both)
    bad_index = damaged(
        "bad_index", lambda sd: sd["fc1.weight" + ROW_FUSED].__setitem__((0, 1), 48)
    )
    with pytest.raises(
        CheckpointError, match=r"stored indices \d+ to 48; they must lie in 0 to 47"
    ):
        wcond.load_state_dict(bad_index)


def test_load_state_dict_of_a_plain_checkpoint(mlp_file: Path) -> None:
    plain = wcond.load_state_dict(mlp_file)
    original = torch.load(mlp_file, weights_only=True)
    assert list(plain) == list(original) and all(
        torch.equal(plain[k], original[k]) for k in original
    )


class ConvNet(nn.Module):
    def __init__(self, c1: int = 16, c2: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.head = nn.Linear(c2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


def planted_convnet() -> ConvNet:
    torch.manual_seed(1)
    m = ConvNet()
    with torch.no_grad():
        w2 = m.conv2.weight
        for a, b, k in ((1, 9, 0.5), (2, 10, -2.0)):
            w2[:, b] = k * w2[:, a]  # input channels
        for a, b, k in ((3, 12, 1.5), (4, 13, -0.5)):
            w2[b] = k * w2[a]  # filters
            m.conv2.bias[b] = k * m.conv2.bias[a]
        for a, b, k in (
            (0, 7, 2.0),
            (5, 11, 0.25),
        ):  # positively parallel conv1 units, bias included
            m.conv1.weight[b] = k * m.conv1.weight[a]
            m.conv1.bias[b] = k * m.conv1.bias[a]
    return m


def test_conv_model_rebuilt_from_the_shrunk_checkpoint(tmp_path: Path) -> None:
    src, out = tmp_path / "cnn.pt", tmp_path / "small.safetensors"
    torch.save(planted_convnet().state_dict(), src)
    by = {r.name: r for r in shrink(src, out, axis="both").layers}
    assert (by["conv2.weight"].fused_rows, by["conv2.weight"].fused_cols) == (2, 2)
    assert by["conv2.weight"].shape_after == [14, 14, 3, 3]
    model = ConvNet()
    model.load_state_dict(wcond.load_state_dict(out))
    x = torch.randn(4, 3, 8, 8, generator=_gen(17))
    torch.testing.assert_close(model(x), planted_convnet()(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- folding


def planted_fold_mlp(act: type[nn.Module]) -> MLP:
    torch.manual_seed(2)
    m = MLP((8, 16, 12, 4), act)
    with torch.no_grad():
        for layer, pairs in (
            (m.fc1, ((3, 5, 2.5), (1, 9, 0.7), (4, 11, -1.0))),
            (m.fc2, ((7, 2, 3.0),)),
        ):
            for a, b, k in pairs:
                layer.weight[b] = k * layer.weight[a]
                layer.bias[b] = k * layer.bias[a]
        m.fc1.weight[13] = 2 * m.fc1.weight[12]  # weights parallel, bias not: not foldable
    return m


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU])
def test_fold_gives_a_narrower_model_with_the_same_outputs(
    tmp_path: Path, act: type[nn.Module]
) -> None:
    src, out = tmp_path / "mlp.pt", tmp_path / "narrow.safetensors"
    torch.save(planted_fold_mlp(act).state_dict(), src)
    report = fold(src, out, chain=["fc1.weight", "fc2.weight", "fc3.weight"])
    assert report.widths == {
        "fc1.weight": [16, 14],
        "fc2.weight": [12, 11],
    }  # the anti-parallel pair stays
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["wcond.fold"])
    assert meta["layers"]["fc1.weight"]["removed"] == [1, 5] and meta["layers"]["fc2.weight"][
        "removed"
    ] == [2]
    sd = wcond.load_state_dict(out)
    assert (
        sd["fc1.bias"].shape == (14,)
        and sd["fc2.weight"].shape == (11, 14)
        and sd["fc3.weight"].shape == (4, 11)
    )
    narrow = MLP((8, 14, 11, 4), act)
    narrow.load_state_dict(sd)  # strict: same keys, new widths
    x = torch.randn(64, 8, generator=_gen(18))
    torch.testing.assert_close(narrow(x), planted_fold_mlp(act)(x), rtol=1e-4, atol=1e-5)
    assert torch.equal(sd["fc3.bias"], planted_fold_mlp(act).fc3.bias.detach())


def test_fold_through_convs_and_global_pooling(tmp_path: Path) -> None:
    src, out = tmp_path / "cnn.pt", tmp_path / "narrow.pt"
    torch.save(planted_convnet().state_dict(), src)
    report = fold(src, out, chain=["conv1.weight", "conv2.weight", "head.weight"])
    assert report.widths == {
        "conv1.weight": [16, 14],
        "conv2.weight": [16, 15],
    }  # conv2: only the k > 0 pair
    assert any("no place for the removed indices" in w for w in report.warnings)
    sd = torch.load(out, weights_only=True)
    assert set(sd) == set(
        planted_convnet().state_dict()
    )  # a bare state dict: nothing but the tensors
    narrow = ConvNet(14, 15)
    narrow.load_state_dict(sd)
    x = torch.randn(4, 3, 8, 8, generator=_gen(19))
    torch.testing.assert_close(narrow(x), planted_convnet()(x), rtol=1e-4, atol=1e-5)


def test_fold_refusals(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    sd = {k: v.detach().clone() for k, v in planted_fold_mlp(nn.ReLU).state_dict().items()}
    save_file(sd, str(src))
    with pytest.raises(UsageError, match="at least two layers"):
        fold(src, chain=["fc1.weight"])
    with pytest.raises(UsageError, match="has no layer or BatchNorm named 'fc'; it holds"):
        fold(src, chain=["fc", "fc2.weight"])
    with pytest.raises(UsageError, match="names a layer twice"):
        fold(src, chain=["fc1", "fc1"])
    with pytest.raises(
        UsageError, match="'fc3.weight' reads 12 inputs but 'fc1.weight' produces 16 units"
    ):
        fold(src, chain=["fc1.weight", "fc3.weight"])
    with pytest.raises(UsageError, match="is not a weight matrix or conv kernel"):
        fold(src, chain=["fc1.bias", "fc2.weight"])
    with_bn = tmp_path / "bn.safetensors"
    save_file(
        {**sd, "bn1.running_mean": torch.zeros(16), "bn1.running_var": torch.ones(16)}, str(with_bn)
    )
    with pytest.raises(
        UsageError,
        match="'bn1' looks like a BatchNorm on the 16 units of 'fc1.weight'; name it in the chain",
    ):
        fold(with_bn, chain=["fc1.weight", "fc2.weight"])
