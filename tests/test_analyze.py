"""wcond.analyze.analyze_tensor at the extremes of float32, against the literal float64 definitions."""

from __future__ import annotations

import literal
import pytest
import torch

from wcond import metrics
from wcond.analyze import analyze_tensor


def conv(scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    return (w * scale).to(dtype)


@pytest.mark.parametrize("scale", [1e37, 1e-25, 1e-41], ids=["1e37", "1e-25", "subnormal"])
def test_every_metric_at_extreme_magnitudes(scale: float) -> None:
    w = conv(scale)
    rep = analyze_tensor("w", w)
    rows, cols = literal.rows(w), literal.cols(w)
    assert rep.notes == [] and rep.dead_rows == 0 and rep.dead_cols == 0
    assert rep.acv_sum == pytest.approx(literal.acv_sum(rows), rel=1e-4)
    assert rep.rare_rows == pytest.approx(literal.rare(rows), rel=1e-4)
    assert rep.rare_cols == pytest.approx(literal.rare(cols), rel=1e-4)
    assert rep.conv_similarity == pytest.approx(literal.conv_similarity(w), rel=1e-4)
    assert rep.conv_similarity_norm == pytest.approx(literal.conv_similarity_norm(w), rel=1e-4)
    assert rep.norm_loss == pytest.approx(literal.norm_loss(w), rel=1e-5)
    assert rep.norm_dev_max == pytest.approx(literal.norm_dev_max(w), rel=1e-5)


def test_a_true_overflow_is_a_note_not_a_bare_null() -> None:
    w = conv(1e300, torch.float64)
    rep = analyze_tensor("w", w)  # CS ~ 1e1200: beyond float64
    assert rep.conv_similarity is None and rep.norm_loss is None
    assert any(n.startswith("conv_similarity overflows float64") for n in rep.notes)
    assert any(n.startswith("norm_loss overflows float64") for n in rep.notes)
    base = conv(1.0, torch.float64)  # scale-free: the literal of w itself would overflow
    assert rep.conv_similarity_norm == pytest.approx(literal.conv_similarity_norm(base), rel=1e-9)
    assert rep.acv_sum == pytest.approx(literal.acv_sum(literal.rows(w)), rel=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("shape", [(6, 5), (4, 2, 3, 3)], ids=["matrix", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_nonfinite_entry_is_found_and_nothing_computed(
    bad: float, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """The finite test rides on the row norms; one bad entry anywhere must still be caught."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    w.view(-1)[7] = bad
    rep = analyze_tensor("w", w)
    assert rep.nonfinite == 1 and rep.acv_sum is None and rep.rare_cols is None
    assert rep.notes == ["1 NaN/Inf values: metrics not computed"]


def test_finite_weights_whose_squares_overflow_are_computed() -> None:
    """Entries of 1e30 give float32 row norms of Inf: that alone must not count as Inf weights."""
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1e30
    rep = analyze_tensor("w", w.float())
    rows = literal.rows(w.float())
    assert rep.nonfinite == 0 and rep.acv_sum == pytest.approx(literal.acv_sum(rows), rel=1e-4)


def test_ordinary_weights_are_not_rescaled() -> None:
    """The power-of-two rescaling is exact, and skipped for ordinary magnitudes: same bits."""
    w = conv(1.0)
    rep = analyze_tensor("w", w)
    assert rep.conv_similarity == float(metrics.conv_similarity(w))
    assert rep.norm_loss == float(metrics.norm_loss(w))


def test_prefetcher_yields_every_tensor_in_order_and_raises_where_taken() -> None:
    from wcond.analyze import _Prefetcher

    sd = {k: torch.full((3, 2), float(i)) for i, k in enumerate("abcd")}
    with _Prefetcher(sd.__getitem__, list(sd)) as it:
        assert [float(t[0, 0]) for t in it] == [0.0, 1.0, 2.0, 3.0]

    def get(key: str) -> torch.Tensor:
        if key == "c":
            raise KeyError(key)
        return sd[key]

    with _Prefetcher(get, list(sd)) as it:
        assert float(next(it)[0, 0]) == 0.0 and float(next(it)[0, 0]) == 1.0
        with pytest.raises(KeyError):
            next(it)


def test_reused_buffers_give_the_same_numbers_and_are_freed() -> None:
    w = torch.randn(70, 40, generator=torch.Generator().manual_seed(3)).half()
    plain = [analyze_tensor("w", w), analyze_tensor("v", w[:50])]
    with torch.no_grad(), metrics.reuse_buffers():
        reused = [analyze_tensor("w", w), analyze_tensor("v", w[:50])]
        assert metrics._workspace.buffers  # the large temporaries were kept
    assert not metrics._workspace.buffers
    for a, b in zip(plain, reused):
        assert a.acv_sum == b.acv_sum and a.rare_cols == b.rare_cols and a.norm_loss == b.norm_loss
