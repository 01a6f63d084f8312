"""wcond.rare.DynamicFusion: fusing while training keeps the function, the optimizer state and the file honest."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import wcond
from wcond import metrics
from wcond.cli import app
from wcond.errors import UsageError
from wcond.rare import DynamicFusion

# Most tests fuse without an optimizer; test_fusing_without_an_optimizer_warns_once checks the warning.
pytestmark = pytest.mark.filterwarnings("ignore:DynamicFusion has no optimizer")


def _mlp(seed: int = 0, widths: tuple[int, ...] = (8, 16, 16, 4)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _cnn(seed: int = 0, conv: type[nn.Module] = nn.Conv2d) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        conv(3, 12, 3, padding=1), nn.ReLU(), conv(12, 12, 3, padding=1), nn.ReLU(), conv(12, 5, 1)
    )


@torch.no_grad()
def _plant(w: torch.Tensor, dim: int, src: int, dst: int, ratio: float) -> None:
    """Make vector ``dst`` of ``w`` along ``dim`` exactly ``ratio`` times vector ``src``."""
    w.select(dim, dst).copy_(ratio * w.select(dim, src))


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("ratio", [0.5, -1.7])
@pytest.mark.parametrize("dim", [0, 1])
def test_a_linear_fusion_keeps_the_outputs(dim: int, ratio: float) -> None:
    model = _mlp()
    _plant(model[2].weight, dim, 3, 11, ratio)
    x = torch.randn(64, 8)
    before = model(x).detach()
    fusion = DynamicFusion(model, axis="rows" if dim == 0 else "cols")
    assert fusion.fuse() == 1
    hidden = fusion.layers[1]
    assert hidden.stored_shape == ((15, 16) if dim == 0 else (16, 15))
    assert (hidden.fused_rows, hidden.fused_cols) == ((1, 0) if dim == 0 else (0, 1))
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
@pytest.mark.parametrize("ratio", [0.8, -0.6])
def test_a_conv_fusion_keeps_the_outputs_rows_and_columns(conv: type, ratio: float) -> None:
    model = _cnn(conv=conv)
    w = model[2].weight
    _plant(w, 0, 1, 7, ratio)  # a filter
    _plant(w, 1, 4, 9, -ratio)  # an input channel
    x = torch.randn(4, 3, *([10] if conv is nn.Conv1d else [10, 10]))
    before = model(x).detach()
    fusion = DynamicFusion(model, axis="both")
    assert fusion.fuse() == 2
    assert fusion.layers[1].stored_shape[:2] == (11, 11)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_frobenius_normalisation_keeps_the_outputs_across_a_fusion() -> None:
    model = _mlp()
    x = torch.randn(64, 8)
    fusion = DynamicFusion(model, frobenius=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        _step(model, opt, x)  # g moves away from 1
    layer = fusion.layers[1]
    _plant(layer.param, 0, 2, 9, 1.3)
    before = model(x).detach()
    gain = float(layer.parametrization.gain.detach())
    assert gain != 1.0 and fusion.fuse() >= 1
    # an exactly parallel pair keeps |W'|_F (P has orthonormal columns), so g stays
    assert math.isclose(float(layer.parametrization.gain.detach()), gain, rel_tol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_frobenius_gain_is_rescaled_so_a_near_parallel_fusion_only_moves_the_pair() -> None:
    """k g P W' Q / |W'|: after fusing, the factor k g / |W'| must be what it was."""
    model = _mlp()
    fusion = DynamicFusion(model, frobenius=True, axis="rows", tau_cos=0.05, tau_euc=100.0)
    layer = fusion.layers[1]
    with torch.no_grad():
        w = layer.param
        w[9] = 0.7 * w[2] + 0.2 * w[2].norm() * torch.randn(16) / 4  # 1 - cos of a few 1e-2
    fn = layer.parametrization
    factor = float((fn.k * fn.gain / layer.param.norm()).detach())
    assert fusion.fuse() == 1
    unnormalised = layer.module.weight.detach() / float(fn.scale(layer.param).detach())
    assert float((fn.k * fn.gain / layer.param.norm()).detach()) == pytest.approx(factor, rel=1e-6)
    torch.testing.assert_close(layer.module.weight.detach(), factor * unnormalised)


def test_a_near_parallel_fusion_changes_the_function_by_its_residual_only() -> None:
    """Not exactly parallel: the change is the least-squares residual of the pair, nothing more."""
    model = _mlp()
    w = model[2].weight
    with torch.no_grad():
        noise = torch.randn(16)
        noise -= (noise @ w[3]) / (w[3] @ w[3]) * w[3]
        w[11] = 0.5 * w[3] + 1e-4 * w[3].norm() * noise / noise.norm()
    dense = w.detach().clone()
    fusion = DynamicFusion(model, axis="rows")
    assert fusion.fuse() == 1
    a, b = dense[3].double(), dense[11].double()
    residual = torch.linalg.matrix_norm(  # rank-1 least-squares fit of the pair [a; b]
        torch.stack([a, b])
        - torch.linalg.svd(torch.stack([a, b]))[0][:, :1]
        @ torch.linalg.svd(torch.stack([a, b]))[0][:, :1].T
        @ torch.stack([a, b])
    )
    assert (
        float((model[2].weight.detach().double() - dense.double()).norm())
        <= float(residual) * 1.01 + 1e-7
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    ],
)
def test_the_optimizer_state_after_a_fusion_is_the_sliced_state_before(make) -> None:
    model = _mlp()
    fusion = DynamicFusion(model, axis="both")
    opt = make(model.parameters())
    fusion.attach(opt)
    x = torch.randn(32, 8)
    for _ in range(2):
        _step(model, opt, x)
    w = fusion.layers[1].param
    _plant(w, 0, 3, 11, 0.5)
    _plant(w, 1, 2, 5, -2.0)
    state = {k: v.clone() for k, v in opt.state[w].items()}
    assert fusion.fuse() == 2
    assert not any(p is w for group in opt.param_groups for p in group["params"])
    w = fusion.layers[1].param
    # the paper keeps the shorter vector of a pair: row 11 (half of row 3) and column 2
    rows = [r for r in range(16) if r != 3]
    cols = [c for c in range(16) if c != 5]
    assert w.shape == (15, 15)
    for name, value in state.items():
        if value.shape == (16, 16):
            torch.testing.assert_close(opt.state[w][name], value[rows][:, cols], rtol=0, atol=0)
        else:
            assert torch.equal(opt.state[w][name], value), name  # Adam's step count
    _step(model, opt, x)  # and training goes on with the narrower W'
    assert w.shape == (15, 15) and w.grad is not None and w.grad.shape == (15, 15)
    assert opt.state[w]["exp_avg" if "exp_avg" in opt.state[w] else "momentum_buffer"].shape == (
        15,
        15,
    )


def test_only_w_prime_and_biases_train_and_the_model_still_learns() -> None:
    model = _mlp()
    fusion = DynamicFusion(model, frobenius=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {
        f"{i}.{part}"
        for i in (0, 2, 4)
        for part in ("bias", "parametrizations.weight.original", "parametrizations.weight.0.gain")
    }
    assert not any(b.requires_grad for b in model.buffers())  # P and Q are fixed
    torch.manual_seed(1)
    x = torch.randn(128, 8)
    y = (x @ torch.randn(8, 4)).argmax(1)  # learnable labels
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fusion.attach(opt)
    assert len(opt.param_groups) == 1  # the gains were in model.parameters() already
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        (loss + fusion.regularizer()).backward()
        opt.step()
        fusion.step()
    assert losses[-1] < 0.6 * losses[0]
    assert (
        fusion.fusions > 0
    )  # the paper's loss (lambda1 = 20) drove pairs together, and they fused


@pytest.mark.parametrize("gap", [0.999, 1.001])
def test_the_threshold_is_the_near_parallel_test_of_metrics(gap: float) -> None:
    """A pair just inside tau_cos is fused, just outside is not (the float32 screen never hides one)."""
    tau_cos = 1e-3
    model = _mlp()
    w = model[2].weight
    with torch.no_grad():
        base = w[3].double()
        noise = torch.randn(16, dtype=torch.float64)
        noise -= (noise @ base) / (base @ base) * base
        angle = math.acos(1 - gap * tau_cos)
        new = 0.9 * (math.cos(angle) * base + math.sin(angle) * base.norm() * noise / noise.norm())
        w[11] = new.float()
    pairs = list(metrics.near_parallel_pairs(w.detach(), tau_cos=tau_cos, tau_euc=10.0))
    fusion = DynamicFusion(model, axis="rows", tau_cos=tau_cos, tau_euc=10.0)
    assert fusion.fuse() == len(pairs) == (1 if gap < 1 else 0)


def test_the_ends_are_protected_and_protect_ends_false_lifts_it() -> None:
    model = _mlp()
    _plant(model[0].weight, 1, 0, 1, 2.0)  # the network's inputs
    _plant(model[4].weight, 0, 0, 1, 2.0)  # its outputs
    fusion = DynamicFusion(model, axis="both")
    assert fusion.fuse() == 0
    assert "columns protected" in fusion.layers[0].notes[0]
    assert "rows protected" in fusion.layers[-1].notes[0]
    model = _mlp()
    _plant(model[0].weight, 1, 0, 1, 2.0)
    _plant(model[4].weight, 0, 0, 1, 2.0)
    assert DynamicFusion(model, axis="both", protect_ends=False).fuse() == 2


def test_auto_fuses_the_longer_axis_and_both_while_square() -> None:
    model = _mlp(widths=(8, 16, 12, 4))  # the middle layer is 12 x 16: columns are the longer axis
    _plant(model[2].weight, 0, 0, 1, 2.0)
    _plant(model[2].weight, 1, 0, 1, 2.0)
    fusion = DynamicFusion(model)
    assert fusion.fuse() == 1 and fusion.layers[1].stored_shape == (12, 15)


def test_every_n_steps_checks_only_at_due_steps() -> None:
    model = _mlp()
    fusion = DynamicFusion(model, axis="rows", every_n_steps=3)
    _plant(fusion.layers[1].param, 0, 3, 11, 0.5)
    assert fusion.step() == 1  # the first call checks
    _plant(fusion.layers[1].param, 0, 2, 10, 0.5)
    assert fusion.step() == 0 and fusion.step() == 0
    assert fusion.step() == 1
    report = fusion.report()
    assert (report.steps, report.checks, report.fusions) == (4, 2, 2)
    assert report.params_stored == report.params_dense - 2 * 16


def test_rare_loss_is_the_papers_weighted_sum_of_metrics_rare() -> None:
    model = _mlp()
    fusion = DynamicFusion(model)
    ws = [layer.param for layer in fusion.layers]
    c = sum(w.numel() for w in ws)
    want = sum(
        w.numel() * (metrics.rare(w.detach(), "rows") + metrics.rare(w.detach(), "cols"))
        for w in ws
    ) / (2 * c)
    loss = fusion.rare_loss()
    torch.testing.assert_close(loss.detach(), torch.as_tensor(want, dtype=loss.dtype))
    loss.backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in ws)
    l2 = torch.stack([w.detach().pow(2).sum() for w in ws]).mean()
    torch.testing.assert_close(fusion.l2_loss().detach(), l2)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_the_exported_file_loads_into_the_original_class(tmp_path: Path, suffix: str) -> None:
    model = _mlp(widths=(8, 64, 64, 4))  # wide enough that four fused rows pay for their entries
    plain = copy.deepcopy(model)
    fusion = DynamicFusion(model, axis="both", frobenius=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fusion.attach(opt)
    x = torch.randn(32, 8)
    _step(model, opt, x)
    for k, ratio in enumerate((0.5, -0.25, 2.0, -1.5)):  # a torch file's entries cost more
        _plant(fusion.layers[1].param, 0, 3 + k, 11 + k, ratio)
    assert fusion.fuse() == 4
    out = fusion.export(tmp_path / f"small{suffix}")
    plain.load_state_dict(wcond.load_state_dict(out))
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-5)
    assert set(wcond.load_state_dict(out)) == set(plain.state_dict())
    # inspect reads it, sees the factorized layer, and reports the dense shape
    result = CliRunner().invoke(app, ["inspect", str(out), "-f", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    layer = next(layer for layer in doc["layers"] if layer["name"] == "2.weight")
    assert layer["shape"] == [64, 64] and layer["factorized"]["params_stored"] == 60 * 64


def test_the_exported_file_pays_per_fused_pair(tmp_path: Path) -> None:
    """8 fused columns of a 64 x 256 layer save 8 x 64 x 4 bytes; the file keeps nearly all of it.

    Its overhead (the pairs, their two entries and the manifest) is under 1 KiB, where one index
    and one coefficient per column would alone take 256 x 8 bytes.
    """
    model = _mlp(widths=(8, 256, 64, 4))
    fusion = DynamicFusion(model, axis="cols")
    for k in range(8):
        _plant(fusion.layers[1].param, 1, k, 128 + k, 0.5 + k / 10)
    assert fusion.fuse() == 8
    small = fusion.export(tmp_path / "small.safetensors")
    dense = tmp_path / "dense.safetensors"
    wcond.checkpoint.write.save_checkpoint(dense, fusion.dense_state_dict())
    saved = 8 * 64 * 4
    assert dense.stat().st_size - saved < small.stat().st_size < dense.stat().st_size - saved + 1024
    meta = json.loads(wcond.open_checkpoint(small).metadata[wcond.shrink.MANIFEST_KEY])
    assert meta == {"format": 2, "wcond_version": wcond.__version__}
    stored = wcond.load_checkpoint(small)
    assert stored["2.weight.__wcond_col_fused"].shape == (8, 2)
    assert stored["2.weight.__wcond_w"].shape == (64, 248)
    for key, want in fusion.dense_state_dict().items():
        torch.testing.assert_close(wcond.load_state_dict(small)[key], want, rtol=0, atol=1e-6)


def test_a_layer_whose_pairs_do_not_pay_is_exported_dense_with_a_note(tmp_path: Path) -> None:
    model = _mlp()  # 16 x 16: one fused row saves 64 bytes, less than its two extra entries
    fusion = DynamicFusion(model, axis="rows")
    _plant(fusion.layers[1].param, 0, 3, 11, 0.5)
    assert fusion.fuse() == 1
    out = fusion.export(tmp_path / "small.safetensors")
    assert not wcond.open_checkpoint(out).metadata  # a plain checkpoint
    assert "left dense" in fusion.layers[1].notes[-1]
    for key, want in fusion.dense_state_dict().items():
        torch.testing.assert_close(wcond.load_state_dict(out)[key], want, rtol=0, atol=0)


def test_a_model_without_fusions_exports_a_plain_checkpoint(tmp_path: Path) -> None:
    model = _mlp()
    fusion = DynamicFusion(model)
    out = fusion.export(tmp_path / "plain.safetensors")
    assert not wcond.open_checkpoint(out).metadata
    sd = wcond.load_state_dict(out)
    for k, v in _mlp().state_dict().items():
        assert torch.equal(sd[k], v)


def test_export_refuses_an_existing_file_without_force(tmp_path: Path) -> None:
    fusion = DynamicFusion(_mlp())
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists; pass force=True"):
        fusion.export(out)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(UsageError, match="unknown output format"):
        fusion.export(tmp_path / "x.onnx")
    fusion.export(out, force=True)
    assert out.read_bytes() != b"keep me"


def test_remove_gives_back_a_plain_model_with_the_same_function() -> None:
    model = _mlp()
    _plant(model[2].weight, 0, 3, 11, 0.5)
    x = torch.randn(16, 8)
    fusion = DynamicFusion(model)
    fusion.fuse()
    want = model(x).detach()
    plain = fusion.remove()
    assert set(plain.state_dict()) == set(_mlp().state_dict())
    torch.testing.assert_close(plain(x), want, rtol=0, atol=1e-6)


def test_selection_and_refusals() -> None:
    model = _mlp()
    fusion = DynamicFusion(model, layers="2")
    assert [layer.key for layer in fusion.layers] == ["2.weight"]
    with pytest.raises(UsageError, match="already parametrized"):
        DynamicFusion(model)
    with pytest.raises(UsageError, match="no nn.Linear"):
        DynamicFusion(_mlp(), layers=["nope*"])
    with pytest.raises(UsageError, match="axis='diagonal'"):
        DynamicFusion(_mlp(), axis="diagonal")
    with pytest.raises(UsageError, match="tau_cos=nan"):
        DynamicFusion(_mlp(), tau_cos=float("nan"))
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1))
    assert [layer.key for layer in DynamicFusion(grouped).layers] == ["1.weight"]


def test_the_lightning_callback_fuses_while_fitting(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from wcond.rare import DynamicFusionCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp(widths=(8, 16, 16, 4))
            _plant(self.net[2].weight, 0, 3, 11, 0.5)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 4, (64,)))
    callback = DynamicFusionCallback(frobenius=True, axis="rows", tau_cos=1e-3)
    trainer = pl.Trainer(
        max_steps=4,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    fusion = callback.fusion
    assert fusion is not None and fusion.steps == 4
    assert fusion.layers[1].fused_rows >= 1  # the planted pair, fused after the first update
    opt = trainer.optimizers[0]
    assert len(opt.param_groups) == 2  # the Frobenius gains joined the optimizer
    assert opt.state[fusion.layers[1].param]["exp_avg"].shape == fusion.layers[1].stored_shape
    out = fusion.export(tmp_path / "small.safetensors")
    plain = nn.Module()
    plain.net = _mlp(widths=(8, 16, 16, 4))  # the LightningModule's keys: net.0.weight, ...
    plain.load_state_dict(wcond.load_state_dict(out))
    x = torch.randn(8, 8)
    torch.testing.assert_close(plain.net(x), module.net(x), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("error")
def test_fusing_without_an_optimizer_warns_once() -> None:
    model = _mlp()
    fusion = DynamicFusion(model, axis="rows")
    _plant(fusion.layers[1].param, 0, 3, 11, 0.5)
    with pytest.warns(UserWarning, match="no optimizer: a fused W' is a new Parameter") as caught:
        fusion.fuse()
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller's line
    _plant(fusion.layers[1].param, 0, 4, 12, 0.5)
    assert fusion.fuse() == 1  # no second warning (filterwarnings("error") would raise it)


def _pair_at(base: torch.Tensor, gap: float, scale: float, g: torch.Generator) -> torch.Tensor:
    """A float64 vector at 1 - |cos| = ``gap`` from ``base`` (``scale`` times as long)."""
    noise = torch.randn(base.numel(), dtype=torch.float64, generator=g)
    noise -= (noise @ base) / (base @ base) * base
    angle = math.acos(1 - gap)
    return scale * (math.cos(angle) * base + math.sin(angle) * base.norm() * noise / noise.norm())


def test_the_float32_screen_never_hides_a_pair_just_inside_the_threshold() -> None:
    """Pairs a hair inside tau_cos, in 512 dims, where float32 cosines alone would miss some."""
    tau_cos = 1e-4
    g = torch.Generator().manual_seed(7)
    for trial in range(30):
        model = _mlp(seed=trial, widths=(8, 512, 24, 4))  # the middle layer: 24 rows of length 512
        w = model[2].weight
        with torch.no_grad():
            gap = tau_cos * (1 - 3e-3 * (trial + 1) / 30)
            w[7] = _pair_at(w[3].double(), gap, -0.8, g).float()
        exact = list(
            metrics.near_parallel_pairs(w.detach().double(), tau_cos=tau_cos, tau_euc=10.0)
        )
        fusion = DynamicFusion(model, axis="rows", layers="2", tau_cos=tau_cos, tau_euc=10.0)
        assert fusion.layers[0].axes == ("rows",)
        assert fusion.fuse() == len(exact), (trial, gap)


def test_between_full_looks_the_angle_bound_never_hides_a_pair() -> None:
    """Two rows turn towards each other step by step; the fusion comes at the first step the exact test passes."""
    g = torch.Generator().manual_seed(3)
    model = _mlp(widths=(8, 32, 64, 4))
    fusion = DynamicFusion(model, axis="rows", layers="2", tau_cos=1e-4, tau_euc=10.0)
    w = fusion.layers[0].param
    a, b = w[5].detach().double().clone(), w[9].detach().double().clone()
    mid = (a / a.norm() + b / b.norm()) / 2
    for step in range(200):
        t = 1 - 0.97**step  # both turn, ever more slowly, towards the bisector
        with torch.no_grad():
            w[5] = ((1 - t) * a / a.norm() + t * mid).float()
            w[9] = (-2 * ((1 - t) * b / b.norm() + t * mid)).float()
            w[20:] += 1e-3 * torch.randn(w[20:].shape, generator=g)  # the others drift a little
        exact = list(metrics.near_parallel_pairs(w.detach().double(), tau_cos=1e-4, tau_euc=10.0))
        assert fusion.step() == len(exact), step
        if exact:
            break
    else:
        pytest.fail("the rows never came within tau_cos")
    assert fusion.checks == step + 1 and 0 < step


@pytest.mark.parametrize("seed", range(4))
def test_the_screen_never_misses_a_pair_as_vectors_drift(seed: int) -> None:
    """Rows turning at different rates, pairs closing in and drifting apart, some rows shrinking
    to nearly nothing: at every step every near-parallel pair (float64, the test of metrics) is
    among the screen's candidates, whether it looked afresh, refreshed some rows or bounded."""
    from wcond.rare.screen import PairScreen

    g = torch.Generator().manual_seed(seed)
    n, d, tau_cos = 48, 24, 1e-3
    v = torch.randn(n, d, dtype=torch.float64, generator=g)
    target = v.clone()
    for k in range(0, 12, 2):  # six pairs that close in, each from its own side and at its own rate
        target[k + 1] = (-1.0) ** k * (1 + k / 10) * v[k]
    rates = torch.rand(n, 1, dtype=torch.float64, generator=g) * 0.08
    screen = PairScreen(tau_cos)
    hits = 0
    for step in range(150):
        noise = 0.02 * torch.randn(n, d, dtype=torch.float64, generator=g) * rates.sqrt()
        v = v + rates * (target - v) + noise
        if step % 37 == 36:
            v[40:44] *= 0.05  # rows that shrink turn fast
        i, j = screen.candidates(v.float())
        got = set(zip(i.tolist(), j.tolist()))
        exact = metrics.near_parallel_pairs(v.float().double(), tau_cos=tau_cos, tau_euc=1e9)
        want = {(p.i, p.j) for p in exact}
        assert want <= got, (step, want - got)
        hits += len(want)
    assert hits > 0  # pairs did come within tau_cos


@pytest.mark.parametrize("frobenius", [False, True])
def test_a_run_saved_mid_training_resumes_where_it_was(tmp_path: Path, frobenius: bool) -> None:
    """Save model and optimizer after fusions; a fresh wrapper loads both; the two runs then agree."""

    def run() -> tuple[nn.Sequential, torch.optim.Optimizer, DynamicFusion]:
        model = _mlp(widths=(8, 32, 32, 4))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt, DynamicFusion(model, opt, axis="both", frobenius=frobenius)

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))

    def train(model: nn.Module, opt: torch.optim.Optimizer, fusion: DynamicFusion) -> None:
        loss = nn.functional.cross_entropy(model(x), y) + fusion.regularizer(rare=5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        fusion.step()

    model, opt, fusion = run()
    train(model, opt, fusion)  # the optimizer has state
    _plant(fusion.layers[1].param, 0, 3, 11, 0.5)
    _plant(fusion.layers[1].param, 1, 2, 9, -2.0)
    assert fusion.fuse() == 2
    for _ in range(3):
        train(model, opt, fusion)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")

    model2, opt2, fusion2 = run()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fusion2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert [f.stored_shape for f in fusion2.layers] == [f.stored_shape for f in fusion.layers]
    assert fusion2.layers[1].fused_rows == fusion.layers[1].fused_rows
    for _ in range(5):
        train(model, opt, fusion)
        train(model2, opt2, fusion2)
        torch.testing.assert_close(model2(x), model(x), rtol=0, atol=1e-6)
    assert [f.stored_shape for f in fusion2.layers] == [f.stored_shape for f in fusion.layers]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    fusion.export(a)
    fusion2.export(b)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(UsageError, match="was not saved from a model wrapped by DynamicFusion"):
        run()[2].load_state_dict(_mlp(widths=(8, 32, 32, 4)).state_dict())
