"""The fast metrics in wcond.metrics against the literal float64 definitions in tests/literal.py."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import literal
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from wcond import metrics
from wcond.defaults import TAU_COS, TAU_EUC
from wcond.metrics import blocks, convolutional_similarity, near_parallel

REL = 2e-5  # float32 fast code vs float64 literal


def close(fast: float, slow: float, rel: float = REL, abs_: float = 1e-6) -> bool:
    return math.isclose(float(fast), slow, rel_tol=rel, abs_tol=abs_)


def seeded(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


CONV_SHAPES = [
    (5, 3, 4),  # conv1d
    (6, 2, 3, 3),  # conv2d
    (4, 3, 2, 5),  # non-square kernel
    (5, 2, 3, 2, 2),  # conv3d, non-cubic
    (7, 1, 1, 1),  # 1x1 kernel
]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_similarity_matches_literal(shape: tuple[int, ...]) -> None:
    w = seeded(*shape)
    assert close(metrics.conv_similarity(w), literal.conv_similarity(w), rel=1e-4)
    assert close(metrics.conv_similarity_norm(w), literal.conv_similarity_norm(w), rel=1e-4)
    assert close(metrics.conv_similarity_floor(w), literal.cs_floor(w), rel=1e-4, abs_=1e-3)


@pytest.mark.parametrize("groups", [2, 3])
def test_conv_similarity_grouped_pairs_within_groups(groups: int) -> None:
    w = seeded(6, 2, 3, seed=groups)
    assert close(
        metrics.conv_similarity(w, groups=groups),
        literal.conv_similarity(w, groups=groups),
        rel=1e-4,
    )
    assert close(
        metrics.conv_similarity_norm(w, groups), literal.conv_similarity_norm(w, groups), rel=1e-4
    )
    assert metrics.conv_similarity(w, groups=groups) < metrics.conv_similarity(w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype: torch.dtype) -> None:
    w = seeded(5, 3, 3, 3).to(dtype)
    ref = literal.conv_similarity(w.double())  # the literal sees the same rounded values
    assert close(metrics.conv_similarity(w), ref, rel=1e-4)
    rows = metrics.pair_statistics(metrics.as_rows(w))
    assert close(rows.acv_sum, literal.acv_sum(literal.rows(w.double())), rel=1e-4)


def test_one_by_one_cs_is_a_function_of_norms() -> None:
    w = seeded(6, 4, 1, 1)
    n = w.reshape(6, -1).pow(2).sum(1).double()
    pair_products = ((n.sum() ** 2 - (n**2).sum()) / 2).item()
    assert close(metrics.conv_similarity(w), pair_products, rel=1e-5)
    assert close(metrics.conv_similarity_norm(w), 1.0, rel=1e-5)


@pytest.mark.parametrize("shape", [(9, 7), (6, 3, 3), (5, 4, 2, 3)])
def test_pairwise_metrics_match_literal_rows_and_cols(shape: tuple[int, ...]) -> None:
    w = seeded(*shape, seed=3)
    for pick, lit in ((metrics.as_rows, literal.rows), (metrics.as_cols, literal.cols)):
        vecs = lit(w)
        s = metrics.pair_statistics(pick(w), tau_cos=1e-4, tau_euc=0.1)
        assert close(s.acv_sum, literal.acv_sum(vecs))
        assert close(s.acv_mean, literal.acv_mean(vecs))
        assert close(s.rare, literal.rare(vecs), abs_=1e-6)
        assert s.near_parallel == len(literal.near_parallel_pairs(vecs)) == 0


def test_norm_metrics_match_literal() -> None:
    w = seeded(8, 3, 3, 3) * 0.3
    assert close(metrics.norm_loss(w), literal.norm_loss(w))
    assert close(metrics.norm_dev_max(w), literal.norm_dev_max(w))


def test_planted_parallel_and_antiparallel_pairs() -> None:
    w = seeded(10, 16, seed=4) * 0.02  # short vectors, so D_euc stays under tau_euc
    w[3] = 2.0 * w[7]  # parallel, different lengths
    w[5] = -0.7 * w[1]  # anti-parallel
    w[9] = 0.0  # dead
    vecs = literal.rows(w)
    expected = literal.near_parallel_pairs(vecs, 1e-4, 0.1)
    assert sorted((i, j) for i, j, _ in expected) == [(1, 5), (3, 7)]
    s = metrics.pair_statistics(metrics.as_rows(w), tau_cos=1e-4, tau_euc=0.1, top_k=2)
    assert s.near_parallel == 2
    assert s.dead == [9] and s.live == 9
    assert sorted((p.i, p.j) for p in s.closest) == [(1, 5), (3, 7)]
    signs = {(p.i, p.j): p.cos for p in s.closest}
    assert signs[(1, 5)] == pytest.approx(-1, abs=1e-6) and signs[(3, 7)] == pytest.approx(
        1, abs=1e-6
    )
    assert float(s.rare) == pytest.approx(0, abs=1e-6)
    assert close(s.acv_sum, literal.acv_sum(vecs), rel=1e-5)


def test_tau_euc_rejects_long_parallel_vectors() -> None:
    w = seeded(4, 16, seed=5)  # norms ~ 4: a parallel pair with a 2x ratio is far apart in D_euc
    w[2] = 2.0 * w[0] + 1e-3 * seeded(16, seed=6)
    vecs = literal.rows(w)
    s = metrics.pair_statistics(metrics.as_rows(w), tau_cos=1e-4, tau_euc=0.1)
    assert s.near_parallel == len(literal.near_parallel_pairs(vecs, 1e-4, 0.1))
    loose = metrics.pair_statistics(metrics.as_rows(w), tau_cos=1e-4, tau_euc=100.0)
    assert loose.near_parallel == len(literal.near_parallel_pairs(vecs, 1e-4, 100.0)) == 1


@pytest.mark.parametrize("tau_cos, tau_euc", [(0.9, 0.3), (1.0, 5.0), (0.05, 0.6)])
def test_loose_thresholds_count_the_literal_pairs_in_chunks(
    monkeypatch: pytest.MonkeyPatch, tau_cos: float, tau_euc: float
) -> None:
    """A loose tau_cos makes most pairs candidates: they are screened on D_euc and refined in
    chunks (here of 3 pairs), and the count is still the literal one."""
    w = seeded(40, 6, seed=12) * torch.linspace(0.05, 2.0, 40)[:, None]  # norms 0.1 to 5
    vecs = literal.rows(w)
    expected = literal.near_parallel_pairs(vecs, tau_cos, tau_euc)
    assert 0 < len(expected) < 40 * 39 // 2  # D_euc decides for some pairs, not all
    monkeypatch.setattr(near_parallel, "_REFINE_ELEMENTS", 3 * 6)
    s = metrics.pair_statistics(w, tau_cos=tau_cos, tau_euc=tau_euc)
    found = list(metrics.near_parallel_pairs(w, tau_cos=tau_cos, tau_euc=tau_euc))
    assert s.near_parallel == len(found) == len(expected)
    assert sorted((p.i, p.j) for p in found) == sorted((i, j) for i, j, _ in expected)


def test_blocks_give_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    w = seeded(300, 20, seed=7)
    w[17] = 3 * w[250]
    whole = metrics.pair_statistics(w, tau_cos=1e-4, tau_euc=100.0, top_k=5)
    monkeypatch.setattr(blocks, "_BLOCK_ELEMENTS", 300 * 7)  # blocks of 7 rows
    blocked = metrics.pair_statistics(w, tau_cos=1e-4, tau_euc=100.0, top_k=5)
    assert float(blocked.acv_sum) == pytest.approx(float(whole.acv_sum), rel=1e-5)
    assert float(blocked.max_abs_cos) == pytest.approx(float(whole.max_abs_cos))
    assert blocked.near_parallel == whole.near_parallel == 1
    assert [(p.i, p.j) for p in blocked.closest] == [(p.i, p.j) for p in whole.closest]


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_split_diagonal_squares_give_the_literal_answer(
    monkeypatch: pytest.MonkeyPatch, axis: str
) -> None:
    """Blocks whose leading square is computed in halves, over a buffer left full of NaN."""
    w = seeded(150, 90, seed=11)
    w[40] = -2 * w[113]
    if axis == "cols":
        w[:, 7] = 0.5 * w[:, 66]
    vectors = metrics.as_rows(w) if axis == "rows" else metrics.as_cols(w)
    vecs = literal.rows(w) if axis == "rows" else literal.rows(w.T.contiguous())
    whole = metrics.pair_statistics(vectors, tau_cos=1e-4, tau_euc=100.0, top_k=3)
    monkeypatch.setattr(blocks, "_PANEL_ROWS", 64)  # blocks of 64, 64 and 22 rows
    monkeypatch.setattr(blocks, "_SQUARE_TILE", 4)  # squares halved down to 4 to 7 rows
    monkeypatch.setattr(blocks, "_SQUARE_SPLIT_WORK", 1)
    with torch.no_grad(), metrics.reuse_buffers():
        metrics._buffer("cosines", (64, 150), w.dtype, w.device).fill_(math.nan)
        split = metrics.pair_statistics(vectors, tau_cos=1e-4, tau_euc=100.0, top_k=3)
    assert close(split.acv_sum, literal.acv_sum(vecs), rel=1e-5)
    assert float(split.acv_sum) == pytest.approx(float(whole.acv_sum), rel=1e-6)
    assert float(split.max_abs_cos) == pytest.approx(float(whole.max_abs_cos))
    assert split.near_parallel == whole.near_parallel == 1
    assert [(p.i, p.j) for p in split.closest] == [(p.i, p.j) for p in whole.closest]
    assert float(split.rare) == float(whole.rare)


def test_fewer_than_two_live_vectors() -> None:
    w = torch.zeros(3, 4)
    w[0, 0] = 1.0
    s = metrics.pair_statistics(w)
    assert s.live == 1 and s.dead == [1, 2] and s.acv_mean is None and s.rare is None
    assert float(metrics.rare(w)) == 0.0


def test_acv_floor_is_welch_bound() -> None:
    assert metrics.acv_floor(10, 3) == literal.acv_floor(10, 3) == pytest.approx((100 / 3 - 10) / 2)
    assert metrics.acv_floor(3, 10) == 0.0
    # n unit vectors spread evenly on a circle reach the floor's order: check acv >= floor
    angles = torch.arange(12) * math.pi / 12
    w = torch.stack([angles.cos(), angles.sin()], 1)
    assert float(metrics.acv(w)) >= metrics.acv_floor(12, 2)


def test_cs_floor_bounds_cs() -> None:
    w = seeded(64, 1, 2, seed=8)  # 64 filters, 3 DFT bins: floor is positive
    floor = metrics.conv_similarity_floor(w)
    assert floor > 0
    assert float(metrics.conv_similarity(w)) >= floor * (1 - 1e-6)


def test_regularizers_accept_module_list_and_tensor() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.Conv2d(8, 8, 3, groups=2),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )
    convs = [model[0].weight, model[1].weight]
    cs_module = metrics.conv_similarity(model)
    expected = metrics.conv_similarity(convs[0]) + metrics.conv_similarity(convs[1], groups=2)
    assert float(cs_module.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    weights = convs + [model[3].weight]
    for fn in (metrics.acv, metrics.norm_loss, metrics.rare):
        assert float(fn(model).detach()) == pytest.approx(float(fn(weights).detach()), rel=1e-6)
        model.zero_grad()
        fn(model).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in weights)
    assert float(metrics.acv(model[3].weight).detach()) == pytest.approx(
        literal.acv_sum(literal.rows(model[3].weight.detach())), rel=1e-5
    )


def test_cs_gradient_matches_autograd_through_literal_definition() -> None:
    """Autograd through the FFT identity equals autograd through an explicit pairwise conv1d definition."""
    w = seeded(4, 3, 5, dtype=torch.float64).requires_grad_()
    fast = metrics.conv_similarity(w)
    (g_fast,) = torch.autograd.grad(fast, w)
    w2 = w.detach().clone().requires_grad_()
    total = w2.new_zeros(())
    for i in range(4):
        for j in range(i + 1, 4):
            for c1 in range(3):
                for c2 in range(3):
                    xc = torch.nn.functional.conv1d(
                        w2[j, c2].view(1, 1, -1), w2[i, c1].view(1, 1, -1), padding=4
                    )
                    total = total + xc.pow(2).sum()
    (g_slow,) = torch.autograd.grad(total, w2)
    assert float(fast.detach()) == pytest.approx(float(total.detach()), rel=1e-10)
    assert torch.allclose(g_fast, g_slow, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(2, 6),
    cin=st.integers(1, 3),
    k=st.integers(1, 4),
    scale=st.floats(0.01, 100),
    seed=st.integers(0, 2**16),
)
def test_invariants(out: int, cin: int, k: int, scale: float, seed: int) -> None:
    # float64: CS = (|sum R|^2 - sum |R|^2) / 2 cancels, so in float32 its absolute error is
    # ~1e-7 of (sum |K|^2)^2; a pair of a tiny and a large filter then has no correct digit
    # (seed 1945, 2x1x1: 23% apart after scaling). The invariants are about the identity.
    w = seeded(out, cin, k, seed=seed, dtype=torch.float64)
    # cosines are scale invariant; CS is homogeneous of degree 4; pair terms are non-negative
    a = metrics.pair_statistics(metrics.as_rows(w))
    b = metrics.pair_statistics(metrics.as_rows(w * scale))
    assert float(b.acv_sum) == pytest.approx(float(a.acv_sum), rel=1e-4, abs=1e-5)
    cs = float(metrics.conv_similarity(w))
    assert cs >= 0
    assert float(metrics.conv_similarity(w * scale)) == pytest.approx(cs * scale**4, rel=1e-3)
    # reversing the filter order changes nothing (symmetry of the pair sum)
    assert float(metrics.conv_similarity(w.flip(0))) == pytest.approx(cs, rel=1e-4)
    assert float(metrics.conv_similarity_norm(w * scale)) == pytest.approx(
        float(metrics.conv_similarity_norm(w)), rel=1e-3
    )


def test_cs_predicts_feature_map_orthogonality() -> None:
    """CS paper eq. 3: with full padding, <F1, F2> is the kernels' cross-correlation against the input's autocorrelation."""
    rng = np.random.default_rng(0)
    k1, k2, x = rng.uniform(-1, 1, 4), rng.uniform(-1, 1, 4), rng.uniform(0, 1, 32)
    inner = literal.feature_map_inner(k1, k2, x)
    w = torch.tensor(np.stack([k1, k2])[:, None, :])
    assert float(metrics.conv_similarity(w)) == pytest.approx(
        float((literal.full_xcorr(k1, k2) ** 2).sum()), rel=1e-10
    )
    assert inner == pytest.approx(
        float(np.dot(literal.full_xcorr(k1, k2), literal.clip_lags(literal.full_xcorr(x, x), [4]))),
        rel=1e-9,
    )


@pytest.mark.parametrize("seed", range(5))
def test_closest_pairs_are_the_exact_top_k(seed: int) -> None:
    """Several of the closest pairs share a row: the row-maxima shortcut must still find them all."""
    w = seeded(60, 6, seed=seed)
    w[10:14] = w[3] + 0.05 * seeded(4, 6, seed=seed + 100)  # rows 3, 10..13 all close to each other
    u = torch.nn.functional.normalize(w.double(), dim=1)
    full = (u @ u.T).abs().triu(1)
    expected = {(int(p) // 60, int(p) % 60) for p in full.flatten().topk(6).indices}
    s = metrics.pair_statistics(w, top_k=6)
    assert {(p.i, p.j) for p in s.closest} == expected
    assert [round(abs(p.cos), 5) for p in s.closest] == sorted(
        (round(abs(p.cos), 5) for p in s.closest), reverse=True
    )


def test_rare_of_a_nearly_parallel_pair_has_no_cancellation() -> None:
    """1 - cos^2 = 1e-8 is below float32 resolution of cos^2; RaRe must still get it to 1e-5."""
    w = seeded(5, 64, seed=11)
    base, noise = w[0].double(), w[1].double()
    noise -= (noise @ base) / (base @ base) * base
    w[2] = (base + 1e-4 * base.norm() / noise.norm() * noise).float()  # sin^2 ~ 1e-8
    want = literal.rare(literal.rows(w))
    assert want < 2e-8
    got = metrics.pair_statistics(metrics.as_rows(w)).rare
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(metrics.rare(w)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("scale", [1e37, 1e-25, 1e-41], ids=["1e37", "1e-25", "subnormal"])
def test_cosine_metrics_at_extreme_magnitudes(scale: float) -> None:
    """Huge rows do not overflow their squares, tiny and subnormal rows are live, not dead."""
    w = seeded(6, 12, seed=12)
    w[4] = -0.5 * w[1]  # one exactly anti-parallel pair
    w = (w.double() * scale).float()
    assert bool((w != 0).all())
    vecs = literal.rows(w)
    s = metrics.pair_statistics(metrics.as_rows(w), tau_cos=1e-4, tau_euc=0.1, top_k=2)
    assert s.dead == [] and s.live == 6
    assert close(s.acv_sum, literal.acv_sum(vecs), rel=1e-4)
    assert float(s.rare) == pytest.approx(literal.rare(vecs), abs=1e-5)
    assert (s.closest[0].i, s.closest[0].j) == (1, 4)
    assert s.closest[0].cos == pytest.approx(-1, abs=1e-5)
    # Exactly anti-parallel: D_euc is 0 at any scale, though float32 cannot resolve 1e37 * 3e-4.
    assert s.near_parallel == len(literal.near_parallel_pairs(vecs, 1e-4, 0.1)) == 1


def test_dead_means_exactly_zero() -> None:
    w = torch.zeros(3, 4)
    w[0] = 1e-45  # the smallest float32 subnormal: its square is 0, it is not
    w[1, 2] = 3.0
    s = metrics.pair_statistics(w)
    assert s.dead == [2] and s.live == 2
    assert literal.dead_indices(literal.rows(w)) == [2]


def test_float32_pairs_just_inside_tau_cos_are_found_as_in_float64() -> None:
    """Pairs within 0.3% of tau_cos in 512 dims: float32 cosines alone would drop about a quarter
    of them (the float32 |cos| is off by up to d units in the last place); the float64 test decides."""
    g = torch.Generator().manual_seed(7)
    found = 0
    for trial in range(60):
        w = torch.randn(24, 512, generator=g, dtype=torch.float64)
        base, noise = w[3], torch.randn(512, generator=g, dtype=torch.float64)
        noise -= (noise @ base) / (base @ base) * base
        angle = math.acos(1 - 1e-4 * (1 - 1e-4 * (trial + 1)))
        w[7] = -0.8 * (
            math.cos(angle) * base + math.sin(angle) * base.norm() * noise / noise.norm()
        )
        w32 = w.float()
        want = literal.near_parallel_pairs(w32.double(), 1e-4, 10.0)
        got = [(p.i, p.j) for p in metrics.near_parallel_pairs(w32, tau_cos=1e-4, tau_euc=10.0)]
        assert got == [(i, j) for i, j, *_ in want], trial
        stats = metrics.pair_statistics(w32, tau_cos=1e-4, tau_euc=10.0)
        assert stats.near_parallel == len(want), trial
        found += len(want)
    assert found > 30  # most of them are inside after float32 rounding of the vectors


# --------------------------------------------------------------------------- the edges of the near-parallel test


def _at_gap(base: torch.Tensor, gap: float, scale: float, seed: int) -> torch.Tensor:
    """A float64 vector at 1 - |cos| = ``gap`` from ``base``, ``scale`` times as long."""
    noise = torch.randn(
        base.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    noise -= (noise @ base) / (base @ base) * base
    angle = math.acos(1 - gap)
    return scale * (math.cos(angle) * base + math.sin(angle) * base.norm() * noise / noise.norm())


def _decisions(v: torch.Tensor, tau_cos: float, tau_euc: float) -> list[object]:
    """Whether rows 0 and 1 are near-parallel, by every entry point that decides it."""
    s = metrics.pair_statistics(v, tau_cos=tau_cos, tau_euc=tau_euc, top_k=1)
    listed = [(p.i, p.j) for p in metrics.near_parallel_pairs(v, tau_cos=tau_cos, tau_euc=tau_euc)]
    among = metrics.near_parallel_among(
        v, torch.tensor([0]), torch.tensor([1]), tau_cos=tau_cos, tau_euc=tau_euc
    )
    return [s.near_parallel, listed, [(p.i, p.j) for p in among], s.closest[0].near_parallel]


YES, NO = [1, [(0, 1)], [(0, 1)], True], [0, [], [], False]


def test_one_minus_abs_cos_equal_to_tau_cos_is_not_near_parallel() -> None:
    """METRICS.md: 1 - |cos| < tau_cos, strictly. [5, 0] and [3, 4] have cos = 0.6 in float64
    exactly as computed (unit rows [1, 0] and [0.6, 0.8]), so tau_cos = 1 - 0.6 is the tie."""
    v = torch.tensor([[5.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    gap = 1 - 0.6
    assert literal.near_parallel_pairs(v, gap, 10.0) == []
    assert _decisions(v, gap, 10.0) == NO
    assert _decisions(v, math.nextafter(gap, 1.0), 10.0) == YES
    assert literal.near_parallel_pairs(v, math.nextafter(gap, 1.0), 10.0)


def test_d_euc_equal_to_tau_euc_is_not_near_parallel() -> None:
    """METRICS.md: D_euc < tau_euc, strictly: at the pair's own D_euc it does not count, a hair above it does."""
    v = torch.tensor([[5.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    (pair,) = metrics.near_parallel_pairs(v, tau_cos=1.0, tau_euc=10.0)
    assert pair.d_euc == pytest.approx(literal.d_euc(v[0], v[1]), rel=1e-15)  # 5 sqrt(0.8)
    assert _decisions(v, 1.0, pair.d_euc) == NO
    assert _decisions(v, 1.0, math.nextafter(pair.d_euc, 0.0)) == NO
    assert _decisions(v, 1.0, math.nextafter(pair.d_euc, 10.0)) == YES


@pytest.mark.parametrize(
    ("cos_side", "euc_side", "want"),
    [
        (1 - 1e-6, 1 - 1e-9, YES),
        (1 - 1e-6, 1 + 1e-9, NO),  # D_euc just above tau_euc
        (1 + 1e-6, 1 - 1e-9, NO),  # 1 - |cos| just above tau_cos
        (1 + 1e-6, 1 + 1e-9, NO),
    ],
)
def test_both_thresholds_decide_at_the_default_taus(
    cos_side: float, euc_side: float, want: list[object]
) -> None:
    """An anti-parallel pair at 1 - |cos| = cos_side * tau_cos, scaled so that D_euc = euc_side *
    tau_euc: the count, the listed pairs and the closest pair's flag all follow both thresholds."""
    tau_cos, tau_euc = TAU_COS, TAU_EUC
    base = seeded(2, 64, seed=21, dtype=torch.float64)[0]
    v = torch.stack([base, _at_gap(base, cos_side * tau_cos, -1.5, seed=22)])
    assert 1 - abs(literal.cos(v[0], v[1])) == pytest.approx(cos_side * tau_cos, rel=1e-9)
    v *= euc_side * tau_euc / literal.d_euc(v[0], v[1])
    assert (literal.near_parallel_pairs(v, tau_cos, tau_euc) != []) == (want == YES)
    assert _decisions(v, tau_cos, tau_euc) == want


# --------------------------------------------------------------------------- CS on the FFT path

FFT_SHAPES = [
    (3, 2, 9, 9),  # conv2d, 81 taps
    (3, 2, 128),  # conv1d, 128 taps
    (3, 2, 5, 5, 3),  # conv3d, 75 taps, non-cubic
    (4, 1, 11, 7),  # non-square
]


@pytest.mark.parametrize("shape", FFT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_similarity_of_large_kernels_matches_literal(shape: tuple[int, ...]) -> None:
    """Kernels of more than 64 taps go through the power spectrum, not the Gram of positions."""
    assert math.prod(shape[2:]) > convolutional_similarity._GRAM_MAX_TAPS
    w = seeded(*shape, seed=31)
    want = literal.conv_similarity(w)
    assert want is not None
    assert close(metrics.conv_similarity(w), want, rel=1e-4)
    batch = metrics.conv_similarity_batch(torch.stack([w, 2 * w]))  # what init-cs steps
    assert close(batch[0], want, rel=1e-4) and close(batch[1], 16 * want, rel=1e-4)


@pytest.mark.parametrize("shape", [(3, 2, 9, 9), (3, 2, 70)], ids=lambda s: "x".join(map(str, s)))
def test_cs_gradient_on_the_fft_path_matches_autograd_through_the_definition(
    shape: tuple[int, ...],
) -> None:
    """The FFT path's gradient equals autograd through explicit pairwise full cross-correlations."""
    assert math.prod(shape[2:]) > convolutional_similarity._GRAM_MAX_TAPS
    w = seeded(*shape, seed=32, dtype=torch.float64).requires_grad_()
    (g_fast,) = torch.autograd.grad(metrics.conv_similarity(w), w)
    w2 = w.detach().clone().requires_grad_()
    conv = torch.nn.functional.conv2d if len(shape) == 4 else torch.nn.functional.conv1d
    pad = [k - 1 for k in shape[2:]]
    out, cin = shape[:2]
    total = w2.new_zeros(())
    for i in range(out):
        for j in range(i + 1, out):
            # every channel of filter j against every channel of filter i: (C, C, lags)
            xc = conv(w2[j][:, None], w2[i][:, None], padding=pad)
            total = total + xc.pow(2).sum()
    (g_slow,) = torch.autograd.grad(total, w2)
    total = total.detach()
    assert float(metrics.conv_similarity(w.detach())) == pytest.approx(float(total), rel=1e-10)
    assert float(total) == pytest.approx(literal.conv_similarity(w.detach()), rel=1e-10)
    assert torch.allclose(g_fast, g_slow, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- the float32 screens


def _float32_gap(w32: torch.Tensor) -> float:
    """1 - |cos| of rows 0 and 1 as the float32 blocks see it (the only pair there is)."""
    return 1 - float(metrics.pair_statistics(w32).max_abs_cos)


def test_a_pair_inside_tau_cos_that_float32_puts_outside_is_still_found() -> None:
    """512 dims, tau_cos = 1e-4: a pair whose float64 1 - |cos| lies just inside tau_cos while the
    float32 block's lies at or beyond it. Every float32 screen must still hand it to the float64 test."""
    from wcond.rare.screen import PairScreen

    tau_cos = 1e-4
    base = seeded(1, 512, seed=41, dtype=torch.float64)[0]
    for trial in range(400):
        w32 = torch.stack([base, _at_gap(base, tau_cos * (1 - 1e-5 * trial), -0.8, trial)]).float()
        inside = 1 - abs(literal.cos(w32[0], w32[1])) < tau_cos
        if inside and _float32_gap(w32) >= tau_cos:
            break
    else:
        pytest.fail("no pair inside tau_cos that float32 puts outside")
    assert literal.near_parallel_pairs(w32, tau_cos, 10.0) != []
    assert [
        (p.i, p.j) for p in metrics.near_parallel_pairs(w32, tau_cos=tau_cos, tau_euc=10.0)
    ] == [(0, 1)]
    assert metrics.pair_statistics(w32, tau_cos=tau_cos, tau_euc=10.0).near_parallel == 1
    i, j = PairScreen(tau_cos).candidates(w32)
    assert (i.tolist(), j.tolist()) == ([0], [1])


def test_a_tau_cos_below_the_float32_error_still_counts_what_float64_accepts() -> None:
    """Exactly anti-parallel rows, rounded to float32: in float64 1 - |cos| is about 1e-15, but
    the float32 block puts it a few units in the last place below 1. With tau_cos half that float32
    gap, the count's quick look at a block (is any |cos| near 1?) must still send the pair to the
    float64 test, as near_parallel_pairs does, and the rare screen must offer it."""
    from wcond.rare.screen import PairScreen

    for seed in range(100):
        w = seeded(2, 512, seed=seed, dtype=torch.float64)
        w[1] = -0.8 * w[0]
        w32 = w.float()
        if _float32_gap(w32) > 0:
            break
    else:
        pytest.fail("float32 cosines of 512-dim anti-parallel rows always came out as exactly 1")
    tau_cos = _float32_gap(w32) / 2
    assert 1 - abs(literal.cos(w32[0], w32[1])) < tau_cos
    assert len(literal.near_parallel_pairs(w32, tau_cos, 10.0)) == 1
    assert len(list(metrics.near_parallel_pairs(w32, tau_cos=tau_cos, tau_euc=10.0))) == 1
    assert metrics.pair_statistics(w32, tau_cos=tau_cos, tau_euc=10.0).near_parallel == 1
    i, j = PairScreen(tau_cos).candidates(w32)
    assert (i.tolist(), j.tolist()) == ([0], [1])
