"""Checks of the literal definitions themselves, on cases small enough to do by hand."""

from __future__ import annotations

import math

import literal as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

RNG_SEED = 1234


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


# --------------------------------------------------------------------------- vectors of a layer


def test_rows_and_cols_of_a_conv_accept_torch_of_any_dtype() -> None:
    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    r, c = L.rows(w.to(torch.bfloat16)), L.cols(w)
    assert len(r) == 2 and len(c) == 3
    assert r[1].dtype == np.float64
    np.testing.assert_array_equal(r[1], w[1].flatten().double().numpy())
    np.testing.assert_array_equal(c[2], w[:, 2].flatten().double().numpy())
    assert c[2].shape == (2 * 4,)


def test_dead_indices_means_norm_exactly_zero() -> None:
    vs = [
        np.zeros(3),
        np.array([0.0, 1e-300, 0.0]),
        np.array([-0.0, 0.0, 0.0]),
        np.array([5e-324, 5e-324, 0.0]),
    ]
    assert L.dead_indices(vs) == [0, 2]
    assert L.live_indices(vs) == [1, 3]
    assert L.cos(vs[1], vs[3]) == pytest.approx(1 / math.sqrt(2), rel=1e-15)  # no underflow


# --------------------------------------------------------------------------- ACV


def test_orthogonal_rows_have_acv_zero() -> None:
    w = np.array([[2.0, 0, 0, 0], [0, -3.0, 0, 0], [0, 0, 0, 0.5]])
    assert L.acv_sum(L.rows(w)) == 0.0
    assert L.acv_mean(L.rows(w)) == 0.0
    assert L.rare(L.rows(w)) == 1.0


def test_acv_by_hand_skips_dead_rows() -> None:
    w = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    assert L.dead_indices(L.rows(w)) == [1]
    assert L.acv_sum(L.rows(w)) == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert L.acv_mean(L.rows(w)) == pytest.approx(1 / math.sqrt(2), abs=1e-15)  # one live pair


def test_acv_with_fewer_than_two_live_vectors() -> None:
    vs = [np.zeros(2), np.array([1.0, 2.0])]
    assert L.acv_sum(vs) == 0.0
    assert L.acv_mean(vs) is None
    assert L.rare(vs) is None
    assert L.near_parallel_pairs(vs) == []


def test_acv_floor_by_hand_and_as_a_bound(rng: np.random.Generator) -> None:
    assert L.acv_floor(4, 2) == 2.0  # (16/2 - 4)/2
    assert L.acv_floor(2, 4) == 0.0
    assert L.acv_floor(3, 3) == 0.0
    for n, d in [(8, 3), (12, 2), (5, 5)]:
        vs = list(rng.standard_normal((n, d)))
        assert L.acv_sum(vs) >= L.acv_floor(n, d) - 1e-12


# --------------------------------------------------------------------------- full cross-correlation


def test_full_xcorr_by_hand_orientation() -> None:
    # out[m + 1] = sum_n a[n] b[n + m]: m = -1 -> a1 b0, m = 0 -> <a, b>, m = 1 -> a0 b1.
    np.testing.assert_array_equal(L.full_xcorr([1, 2], [3, 4]), [6.0, 11.0, 4.0])
    # A delta at a[0, 0] copies b into the non-negative lags.
    b = np.array([[1.0, 2.0], [3.0, 4.0]])
    expected = np.array([[0, 0, 0], [0, 1, 2], [0, 3, 4]], dtype=float)
    np.testing.assert_array_equal(L.full_xcorr([[1, 0], [0, 0]], b), expected)


@pytest.mark.parametrize("shape", [(4,), (2, 3), (3, 2), (2, 3, 2)])
def test_full_xcorr_matches_torch_conv_and_flips_when_swapped(
    rng: np.random.Generator, shape: tuple[int, ...]
) -> None:
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(shape)]
    ref = conv(
        torch.tensor(b)[None, None], torch.tensor(a)[None, None], padding=[k - 1 for k in shape]
    )
    c = L.full_xcorr(a, b)
    assert c.shape == tuple(2 * k - 1 for k in shape)
    np.testing.assert_allclose(c, ref[0, 0].numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(L.full_xcorr(b, a), np.flip(c), rtol=1e-12, atol=1e-12)
    assert float(np.sum(c**2)) == pytest.approx(float(np.sum(L.full_xcorr(b, a) ** 2)), rel=1e-13)
    centre = tuple(k - 1 for k in shape)
    assert c[centre] == pytest.approx(float(np.sum(a * b)), rel=1e-12)  # lag 0 is <a, b>


def test_full_xcorr_matches_numpy_correlate_for_unequal_lengths(rng: np.random.Generator) -> None:
    a, b = rng.standard_normal(3), rng.standard_normal(7)
    np.testing.assert_allclose(
        L.full_xcorr(a, b), np.correlate(b, a, "full"), rtol=1e-12, atol=1e-12
    )


# --------------------------------------------------------------------------- Convolutional Similarity


def test_conv_similarity_1d_by_hand() -> None:
    w = np.array([[[1.0, 2.0]], [[3.0, 4.0]]])  # (2, 1, 2)
    assert L.conv_similarity(w) == 6**2 + 11**2 + 4**2  # 173
    assert L.conv_similarity_norm(w) == pytest.approx(173 / (5 * 25), rel=1e-15)
    # L = 3 bins: ((5 + 25)^2 - 3 (25 + 625)) / 2 = -525, clamped to 0 by default.
    assert L.cs_floor(w) == 0.0
    assert L.cs_floor(w, clamp=False) == -525.0


def test_conv_similarity_two_channels_by_hand() -> None:
    # K0 = [[1, 0], [0, 1]], K1 = [[1, 1], [0, 0]]; channel pairs (c1, c2):
    # (0,0): xcorr([1,0],[1,1]) = [0,1,1] -> 2; (1,0): xcorr([0,1],[1,1]) = [1,1,0] -> 2; (*,1): 0.
    w = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])
    assert L.cs_pair(w[0], w[1]) == 4.0
    assert L.conv_similarity(w) == 4.0
    assert L.conv_similarity_norm(w) == 1.0  # n0 = n1 = 2


def test_conv_similarity_1x1_is_products_of_norms() -> None:
    # k_i,c scalars: sum_{c1,c2} (k_i,c1 k_j,c2)^2 = n_i n_j. Rows [1,2], [3,0], [0,1]: n = 5, 9, 1.
    w = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]]).reshape(3, 2, 1, 1)
    pair01 = (1 * 3) ** 2 + (1 * 0) ** 2 + (2 * 3) ** 2 + (2 * 0) ** 2
    assert pair01 == 45 == 5 * 9
    assert L.conv_similarity(w) == 5 * 9 + 5 * 1 + 9 * 1  # 59
    assert L.conv_similarity_norm(w) == 1.0
    # L = 1 bin: the floor is exact, ((15)^2 - (25 + 81 + 1)) / 2 = 59.
    assert L.cs_floor(w) == 59.0


def test_conv_similarity_groups_only_pair_within_groups(rng: np.random.Generator) -> None:
    w = rng.standard_normal((4, 1, 2))
    p = {(i, j): L.cs_pair(w[i], w[j]) for i in range(4) for j in range(i + 1, 4)}
    assert L.conv_similarity(w, groups=2) == pytest.approx(p[0, 1] + p[2, 3], rel=1e-14)
    assert L.conv_similarity(w, groups=4) == 0.0
    assert L.conv_similarity(w) == pytest.approx(sum(p.values()), rel=1e-14)
    den = sum(np.sum(w[i] ** 2) * np.sum(w[j] ** 2) for i, j in [(0, 1), (2, 3)])
    assert L.conv_similarity_norm(w, groups=2) == pytest.approx(
        (p[0, 1] + p[2, 3]) / den, rel=1e-13
    )
    n = [float(np.sum(w[i] ** 2)) for i in range(4)]
    raw = sum(((n[a] + n[b]) ** 2 - 3 * (n[a] ** 2 + n[b] ** 2)) / 2 for a, b in [(0, 1), (2, 3)])
    assert L.cs_floor(w, groups=2, clamp=False) == pytest.approx(raw, rel=1e-13)
    with pytest.raises(ValueError):
        L.conv_similarity(w, groups=3)


def test_conv_similarity_is_none_for_matrices() -> None:
    w = np.ones((3, 4))
    assert L.conv_similarity(w) is None
    assert L.conv_similarity_norm(w) is None
    assert L.cs_floor(w) is None
    assert L.conv_similarity_norm(np.zeros((2, 1, 3))) is None  # 0 / 0


@pytest.mark.parametrize(
    "shape", [(9, 1, 2), (6, 2, 3), (5, 1, 2, 1), (3, 2, 2, 3), (3, 1, 1, 2, 2)]
)
def test_cs_floor_bounds_cs(rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    w = rng.standard_normal(shape)
    cs, floor, raw = L.conv_similarity(w), L.cs_floor(w), L.cs_floor(w, clamp=False)
    assert cs is not None and floor is not None and raw is not None
    assert cs >= floor - 1e-9 * cs
    assert floor >= 0.0
    assert floor == max(0.0, raw)


def test_cs_floor_is_positive_with_more_filters_than_bins() -> None:
    # 9 equal-norm 1-D filters of length 2 (L = 3 bins): ((9n)^2 - 3 * 9 n^2) / 2 = 27 n^2.
    w = np.tile(np.array([[[1.0, 1.0]]]), (9, 1, 1)) * np.array([1, -1] * 4 + [1.0])[:, None, None]
    assert L.cs_floor(w) == 27 * 2.0**2
    cs = L.conv_similarity(w)
    assert cs is not None and cs >= L.cs_floor(w)


# --------------------------------------------------------------------------- feature maps, eq. 3


def test_feature_map_is_full_xcorr_and_torch_full_padding(rng: np.random.Generator) -> None:
    k, x = rng.standard_normal(3), rng.standard_normal(8)
    f = L.feature_map(k, x)
    assert f.shape == (8 + 3 - 1,)
    np.testing.assert_allclose(f, L.full_xcorr(k, x), rtol=1e-12, atol=1e-12)
    ref = F.conv1d(torch.tensor(x)[None, None], torch.tensor(k)[None, None], padding=2)[
        0, 0
    ].numpy()
    np.testing.assert_allclose(f, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, m", [(1, 5), (2, 6), (3, 7), (4, 4)])
def test_eq3_feature_map_inner_is_kernel_xcorr_against_clipped_input_autocorr(
    rng: np.random.Generator, n: int, m: int
) -> None:
    k1, k2, x = rng.standard_normal(n), rng.standard_normal(n), rng.uniform(0, 1, m)
    lhs = L.feature_map_inner(k1, k2, x)
    rhs = float(np.sum(L.full_xcorr(k1, k2) * L.clip_lags(L.full_xcorr(x, x), [n])))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


def test_eq3_with_channels_needs_one_lag_orientation(rng: np.random.Generator) -> None:
    # <F_i, F_j> = sum_{c1,c2} <K_i[c1] (x) K_j[c2], (X[c1] (x) X[c2]) clipped>, same orientation on both sides.
    c, n, m = 3, 3, 6
    ki, kj, x = rng.standard_normal((c, n)), rng.standard_normal((c, n)), rng.uniform(0, 1, (c, m))
    lhs = L.feature_map_inner(ki, kj, x)
    same = sum(
        float(np.sum(L.full_xcorr(ki[c1], kj[c2]) * L.clip_lags(L.full_xcorr(x[c1], x[c2]), [n])))
        for c1 in range(c)
        for c2 in range(c)
    )
    flipped = sum(
        float(np.sum(L.full_xcorr(ki[c1], kj[c2]) * L.clip_lags(L.full_xcorr(x[c2], x[c1]), [n])))
        for c1 in range(c)
        for c2 in range(c)
    )
    assert lhs == pytest.approx(same, rel=1e-12)
    assert abs(lhs - flipped) > 1e-6 * abs(
        lhs
    )  # cross-channel input correlations are not symmetric


# --------------------------------------------------------------------------- Norm deviation


def test_norm_loss_by_hand_counts_dead_rows() -> None:
    w = np.array([[3.0, 4.0], [0.0, 0.0], [0.6, 0.8]])  # norms 5, 0, 1
    assert L.norm_loss(w) == pytest.approx(16.0 + 1.0 + 0.0, abs=1e-15)
    assert L.norm_dev_max(w) == 4.0


def test_norm_loss_of_conv_rows_on_the_oblique_manifold(rng: np.random.Generator) -> None:
    w = rng.standard_normal((4, 2, 3, 3))
    w /= np.sqrt(np.sum(w**2, axis=(1, 2, 3), keepdims=True))
    assert L.norm_loss(w) == pytest.approx(0.0, abs=1e-28)
    assert L.norm_dev_max(w) < 1e-14


# --------------------------------------------------------------------------- RaRe and near-parallel


def test_identical_rows_give_rare_zero_and_one_near_parallel_pair() -> None:
    w = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert L.rare(L.rows(w)) == pytest.approx(0.0, abs=1e-15)
    pairs = L.near_parallel_pairs(L.rows(w))
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert pairs[0][2] == pytest.approx(1.0, abs=1e-15)


def test_near_parallel_needs_both_thresholds(rng: np.random.Generator) -> None:
    base = rng.standard_normal(16)
    base /= np.linalg.norm(base)
    perp = rng.standard_normal(16)
    perp -= base * (perp @ base)
    perp /= np.linalg.norm(perp)
    near = -0.5 * (base + 1e-3 * perp)  # anti-parallel, 1 - |cos| ~ 5e-7, D_euc ~ 5e-4
    far = 2.0 * (base + 0.2 * perp)  # 1 - cos ~ 0.02: fails tau_cos
    big = 100.0 * base
    big2 = 100.0 * (base + 0.01 * perp)  # 1 - cos ~ 5e-5 with both
    pairs = L.near_parallel_pairs([base, near, far, np.zeros(16), big, big2])
    got = {(i, j): c for i, j, c in pairs}
    # D_euc scales with the shorter vector: (0, 5) and (1, 5) pass (D_euc ~ 0.01), while
    # (4, 5) has D_euc ~ 100 * 0.01 = 1 and fails tau_euc; the dead vector 3 is skipped.
    assert set(got) == {(0, 1), (0, 4), (1, 4), (0, 5), (1, 5)}
    assert got[0, 1] < 0 and got[0, 4] > 0
    assert L.near_parallel_pairs([big, big2]) == []
    assert L.near_parallel_pairs([big, big2], tau_euc=2.0)[0][:2] == (0, 1)


def test_d_euc_by_hand() -> None:
    assert L.d_euc([2.0, 0.0], [1.0, 0.0]) == 0.0
    assert L.d_euc([-2.0, 0.0], [1.0, 0.0]) == 0.0  # sign(cos) aligns anti-parallel vectors
    assert L.d_euc([0.0, 2.0], [1.0, 0.0]) == pytest.approx(math.sqrt(2), rel=1e-15)  # sign(0) = +1
    assert L.d_euc([3.0, 4.0], [0.0, 1.0]) == L.d_euc(
        [0.0, 1.0], [3.0, 4.0]
    )  # longer one is rescaled


def test_d_euc_identity_on_random_vectors(rng: np.random.Generator) -> None:
    for _ in range(20):
        a, b = (
            rng.standard_normal(7) * rng.uniform(0.1, 3),
            rng.standard_normal(7) * rng.uniform(0.1, 3),
        )
        shorter = min(np.linalg.norm(a), np.linalg.norm(b))
        c = L.cos(a, b)
        assert L.d_euc(a, b) == pytest.approx(shorter * math.sqrt(2 - 2 * abs(c)), rel=1e-12)


# --------------------------------------------------------------------------- invariants


small_rows = arrays(np.float64, (4, 3), elements=st.floats(-4, 4, allow_subnormal=False))


@settings(max_examples=30, deadline=None)
@given(small_rows, st.floats(0.125, 8.0))
def test_cosine_metrics_are_scale_invariant(w: np.ndarray, s: float) -> None:
    vs, scaled = L.rows(w), L.rows(-s * w)
    assert L.dead_indices(vs) == L.dead_indices(scaled)
    assert L.acv_sum(scaled) == pytest.approx(L.acv_sum(vs), rel=1e-12, abs=1e-12)
    r, rs = L.rare(vs), L.rare(scaled)
    assert (r is None) == (rs is None)
    if r is not None and rs is not None:
        assert rs == pytest.approx(r, rel=1e-9, abs=1e-9)


@settings(max_examples=20, deadline=None)
@given(arrays(np.float64, (2, 2, 3), elements=st.floats(-2, 2, allow_subnormal=False)))
def test_cs_pair_is_symmetric_and_homogeneous_of_degree_four(w: np.ndarray) -> None:
    assert L.cs_pair(w[0], w[1]) == pytest.approx(L.cs_pair(w[1], w[0]), rel=1e-12, abs=1e-300)
    assert L.conv_similarity(2 * w) == pytest.approx(
        16 * L.conv_similarity(w), rel=1e-12, abs=1e-300
    )
    assert L.cs_pair(w[0], w[1]) >= 0.0
