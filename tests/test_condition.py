"""wcond.condition.init_cs: CS minimization over conv layers, and the gradient it follows."""

from __future__ import annotations

import itertools
import math

import literal
import pytest
import torch
import torch.nn.functional as F

from wcond import metrics
from wcond.condition import init_cs
from wcond.errors import CheckpointError, UsageError

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def seeded(
    *shape: int, seed: int = 0, scale: float = 0.3, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def model_state_dict() -> dict[str, torch.Tensor]:
    """Conv1d, non-square Conv2d, Conv3d, a grouped conv, a 1x1 conv, and tensors that must not change."""
    return {
        "c1d.weight": seeded(6, 3, 5, seed=1),
        "c1d.bias": seeded(6, seed=2),
        "c2d.weight": seeded(8, 6, 3, 2, seed=3),
        "bn.weight": torch.ones(8),
        "bn.running_var": seeded(8, seed=4).abs(),
        "bn.num_batches_tracked": torch.tensor(11),
        "grouped.weight": seeded(8, 4, 3, 3, seed=5),
        "c3d.weight": seeded(4, 8, 2, 3, 2, seed=6),
        "pointwise.weight": seeded(6, 4, 1, 1, seed=7),
        "fc.weight": seeded(10, 6, seed=8),
        "fc.bias": seeded(10, seed=9),
    }


CONV_KEYS = ["c1d.weight", "c2d.weight", "grouped.weight", "c3d.weight", "pointwise.weight"]
GROUPS = {"grouped.weight": 2}


def filter_norms(w: torch.Tensor) -> torch.Tensor:
    return w.double().reshape(w.shape[0], -1).norm(dim=1)


def test_cs_falls_on_every_layer_and_is_what_metrics_reports() -> None:
    sd = model_state_dict()
    out, result = init_cs(sd, iterations=20, groups=GROUPS, device="cpu")
    assert [r.name for r in result.layers] == CONV_KEYS  # stored order, convs only
    for r in result.layers:
        g = GROUPS.get(r.name, 1)
        assert r.optimized and r.groups == g
        assert r.cs_before == pytest.approx(float(metrics.conv_similarity(sd[r.name], g)), rel=1e-6)
        assert r.cs_after == pytest.approx(float(metrics.conv_similarity(out[r.name], g)), rel=1e-6)
        assert r.cs_after < 0.9 * r.cs_before
        assert r.cs_drop == pytest.approx(r.drop_from_norms + r.drop_from_directions, abs=1e-9)
        assert r.norm_change < 0  # the default shrinks the filters: CS is homogeneous of degree 4
        assert r.max_abs_change == pytest.approx(float((out[r.name] - sd[r.name]).abs().max()))
        assert r.cs_norm_before == pytest.approx(
            float(metrics.conv_similarity_norm(sd[r.name], g)), rel=1e-5
        )
    assert result.cs_before == pytest.approx(sum(r.cs_before for r in result.layers))
    assert result.cs_after < result.cs_before


def test_drop_split_rescales_new_filters_to_old_norms() -> None:
    sd = model_state_dict()
    out, result = init_cs(sd, iterations=10, layers=["c2d.*"], device="cpu")
    (row,) = result.layers
    old, new = sd["c2d.weight"], out["c2d.weight"]
    rescaled = new * (filter_norms(old) / filter_norms(new)).float().view(-1, 1, 1, 1)
    assert row.cs_rescaled == pytest.approx(float(metrics.conv_similarity(rescaled)), rel=1e-5)
    assert row.drop_from_directions == pytest.approx(
        (row.cs_before - row.cs_rescaled) / row.cs_before, abs=1e-9
    )


def test_keep_norm_preserves_every_filter_norm_and_skips_1x1() -> None:
    sd = model_state_dict()
    out, result = init_cs(sd, iterations=20, keep_norm=True, groups=GROUPS, device="cpu")
    rows = {r.name: r for r in result.layers}
    for key in CONV_KEYS:
        rel = (filter_norms(out[key]) - filter_norms(sd[key])).abs() / filter_norms(sd[key])
        assert float(rel.max()) < 1e-5, key
    assert torch.equal(out["pointwise.weight"], sd["pointwise.weight"])
    assert (
        not rows["pointwise.weight"].optimized and "1x1 kernel" in rows["pointwise.weight"].notes[0]
    )
    for key in ("c1d.weight", "c2d.weight", "grouped.weight", "c3d.weight"):
        r = rows[key]
        assert r.optimized and r.cs_after < r.cs_before, key
        assert abs(r.drop_from_norms) < 1e-4 and r.drop_from_directions == pytest.approx(
            r.cs_drop, abs=1e-4
        )
        assert r.cs_after >= r.cs_floor * (1 - 1e-6)
        assert r.floor_gap_closed == pytest.approx(
            (r.cs_before - r.cs_after) / (r.cs_before - r.cs_floor)
        )


def test_everything_else_is_untouched_and_the_input_is_not_modified() -> None:
    sd = model_state_dict()
    copy = {k: v.clone() for k, v in sd.items()}
    out, _ = init_cs(sd, iterations=5, groups=GROUPS, device="cpu")
    assert list(out) == list(sd)
    for key, t in sd.items():
        assert torch.equal(
            t, copy[key]
        )  # the caller's tensors are never written to (1x1 kernels included)
        assert out[key].dtype == t.dtype and out[key].shape == t.shape
        if key not in CONV_KEYS:
            assert out[key] is t
        else:
            assert not torch.equal(out[key], t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_of_each_tensor_is_kept(dtype: torch.dtype) -> None:
    sd = {"conv.weight": seeded(8, 4, 3, 3, dtype=dtype), "conv.bias": seeded(8, dtype=dtype)}
    out, result = init_cs(sd, iterations=20, device="cpu")
    assert out["conv.weight"].dtype == dtype and out["conv.bias"] is sd["conv.bias"]
    assert result.layers[0].dtype == str(dtype).removeprefix("torch.")
    assert result.layers[0].cs_after < result.layers[0].cs_before


def test_deterministic_with_seed() -> None:
    a, ra = init_cs(
        model_state_dict(), iterations=15, seed=3, groups=GROUPS, device="cpu", history=True
    )
    b, rb = init_cs(
        model_state_dict(), iterations=15, seed=3, groups=GROUPS, device="cpu", history=True
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ra.history == rb.history


def test_history_is_the_cs_curve() -> None:
    out, result = init_cs(
        model_state_dict(), iterations=12, optimizer="sgd", lr=1e-3, device="cpu", history=True
    )
    h = result.history
    assert h["iteration"] == list(range(13)) and set(h["layers"]) == set(CONV_KEYS)
    for r in result.layers:
        curve = h["layers"][r.name]
        assert len(curve) == 13 and curve[0] == pytest.approx(r.cs_before, rel=1e-6)
        assert curve[-1] == pytest.approx(r.cs_after, rel=1e-5) and curve[-1] < curve[0]
    assert h["total"] == pytest.approx(
        [math.fsum(v[t] for v in h["layers"].values()) for t in range(13)]
    )
    assert "history" not in result.to_dict()
    _, plain = init_cs(model_state_dict(), iterations=2, device="cpu")
    assert plain.history is None


def test_progress_reports_current_total_cs() -> None:
    calls: list[tuple[int, int, str]] = []
    init_cs(model_state_dict(), iterations=3, device="cpu", progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert all(c[2].startswith("CS ") for c in calls)


def test_group_notes_and_nonfinite_layers() -> None:
    sd = {
        "a.weight": seeded(8, 4, 3, 3),
        "dw.weight": seeded(8, 1, 3, 3, seed=1),
        "bad.weight": seeded(4, 8, 3, 3, seed=2),
    }
    sd["bad.weight"][0, 0, 0, 0] = float("nan")
    out, result = init_cs(sd, iterations=3, device="cpu")
    rows = {r.name: r for r in result.layers}
    assert any("may be depthwise" in n for n in rows["dw.weight"].notes)
    assert not rows["bad.weight"].optimized and "NaN/Inf" in rows["bad.weight"].notes[0]
    assert out["bad.weight"] is sd["bad.weight"]
    _, named = init_cs(sd, iterations=3, device="cpu", groups={"dw.*": 8}, exclude=["bad.*"])
    assert {r.name: r.groups for r in named.layers} == {"a.weight": 1, "dw.weight": 8}
    assert not any(r.notes for r in named.layers)


def test_errors() -> None:
    with pytest.raises(CheckpointError, match="no conv weights to condition"):
        init_cs({"fc.weight": seeded(4, 3), "fc.bias": seeded(4)}, iterations=2)
    with pytest.raises(
        UsageError,
        match=r"no conv layer matches the patterns layers=\['fc\.\*'\], exclude=\[\] \(conv weights here: c1d.weight",
    ):
        init_cs(model_state_dict(), layers=["fc.*"], iterations=2)
    with pytest.raises(UsageError, match="iterations=0"):
        init_cs(model_state_dict(), iterations=0)
    with pytest.raises(UsageError, match="lr="):
        init_cs(model_state_dict(), lr=0.0)
    for seed in (-1, 2**64):
        with pytest.raises(UsageError, match=f"seed={seed}: torch seeds run from 0"):
            init_cs(model_state_dict(), seed=seed)
    with pytest.raises(UsageError, match="optimizer='rmsprop'"):
        init_cs(model_state_dict(), optimizer="rmsprop")
    with pytest.raises(UsageError, match="does not divide"):
        init_cs(model_state_dict(), groups={"c2d.weight": 3})
    with pytest.raises(UsageError, match="CS diverged .* lower lr="):
        init_cs(
            {"c.weight": seeded(8, 8, 3, 3, scale=3.0)},
            optimizer="sgd",
            lr=10.0,
            iterations=50,
            device="cpu",
        )


# --------------------------------------------------------------------------- the gradient init-cs follows


def literal_cs(w: torch.Tensor, groups: int) -> torch.Tensor:
    """CS by the definition, in torch: same-group pairs i < j, every channel pair, full cross-correlation."""
    out, cin, *kernel = w.shape
    conv = _CONV[len(kernel)]
    padding = [k - 1 for k in kernel]
    per = out // groups
    total = w.new_zeros(())
    for g in range(groups):
        for i, j in itertools.combinations(range(g * per, (g + 1) * per), 2):
            for c1, c2 in itertools.product(range(cin), repeat=2):
                xcorr = conv(w[j, c2][None, None], w[i, c1][None, None], padding=padding)
                total = total + xcorr.pow(2).sum()
    return total


@pytest.mark.parametrize(
    ("shape", "groups"),
    [
        ((4, 3, 5), 1),  # conv1d
        ((5, 2, 3, 3), 1),  # conv2d
        ((4, 3, 2, 4), 1),  # non-square
        ((6, 2, 3, 2), 2),  # grouped
        ((3, 2, 2, 3, 2), 1),  # conv3d, non-cubic
        ((4, 2, 1, 1), 1),  # 1x1
        ((3, 2, 9, 8), 1),  # 72 taps: the FFT path
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"g{v}",
)
def test_fast_cs_gradient_matches_autograd_through_the_definition(
    shape: tuple[int, ...], groups: int
) -> None:
    w = seeded(*shape, dtype=torch.float64).requires_grad_()
    slow = literal_cs(w, groups)
    assert float(slow.detach()) == pytest.approx(
        literal.conv_similarity(w.detach(), groups), rel=1e-12
    )
    (g_slow,) = torch.autograd.grad(slow, w)
    fast = metrics.conv_similarity(w, groups=groups)
    (g_fast,) = torch.autograd.grad(fast, w)
    assert float(fast.detach()) == pytest.approx(float(slow.detach()), rel=1e-10)
    assert torch.allclose(g_fast, g_slow, rtol=1e-9, atol=1e-12)
    # init-cs differentiates a channels-last copy: same value, same gradient
    q = w.detach().movedim(1, -1).contiguous().requires_grad_()
    (g_cl,) = torch.autograd.grad(metrics.conv_similarity(q.movedim(-1, 1), groups=groups), q)
    assert torch.allclose(g_cl.movedim(-1, 1), g_slow, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("keep_norm", [False, True])
def test_same_shaped_layers_batched_step_exactly_as_alone(keep_norm: bool) -> None:
    """Same-shaped layers share one batched parameter; each must still follow its own loss."""
    sd = {f"b{i}.weight": seeded(6, 4, 3, 3, seed=20 + i) for i in range(3)}
    sd["other.weight"] = seeded(5, 4, 3, 3, seed=30)
    together, res = init_cs(
        sd, iterations=20, device="cpu", seed=0, keep_norm=keep_norm, history=True
    )
    assert list(res.history["layers"]) == list(sd)
    for key in sd:
        alone, res1 = init_cs(
            {key: sd[key]}, iterations=20, device="cpu", seed=0, keep_norm=keep_norm
        )
        torch.testing.assert_close(together[key], alone[key], rtol=1e-6, atol=1e-7)
        assert res.history["layers"][key][-1] == pytest.approx(res1.cs_after, rel=1e-6)


def test_conv_similarity_batch_is_conv_similarity_per_layer() -> None:
    w = seeded(3, 8, 4, 3, 3, seed=40)
    got = metrics.conv_similarity_batch(w, groups=2)
    want = torch.stack([metrics.conv_similarity(x, groups=2) for x in w])
    torch.testing.assert_close(got, want)
    assert float(got[1]) == pytest.approx(literal.conv_similarity(w[1], groups=2), rel=1e-5)


def test_progress_shows_the_total_the_summary_prints() -> None:
    """A layer left unchanged (a 1x1 kernel under keep_norm) still counts in the progress total."""
    torch.manual_seed(0)
    sd = {"a.weight": torch.randn(6, 3, 3, 3), "b.weight": torch.randn(4, 6, 1, 1)}
    shown: list[str] = []
    _, result = init_cs(
        sd, iterations=5, keep_norm=True, seed=0, progress=lambda i, n, text: shown.append(text)
    )
    assert [r.optimized for r in result.layers] == [True, False]
    assert shown[-1] == f"CS {result.cs_after:.4g}"
    assert float(shown[0].removeprefix("CS ")) == pytest.approx(result.cs_before, rel=1e-4)
