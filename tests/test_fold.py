"""Folding: module names in chains, BatchNorm in chains, flatten into a Linear, whole models traced."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import wcond
from wcond.cli import app
from wcond.errors import UsageError
from wcond.shrink import fold

runner = CliRunner()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class CBNet(nn.Module):
    """Conv-BN-ReLU-Conv-BN-ReLU-MaxPool-Flatten-Linear on 8x8 inputs."""

    def __init__(self, c1: int = 8, c2: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = self.pool(self.act(self.bn2(self.conv2(h))))
        return self.fc(self.flatten(h))


def _plant_after_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, a: int, b: int, k: float) -> None:
    """Make unit b's effective map (BN folded in) k times unit a's, with different raw parameters."""
    eps = bn.eps
    s_a = bn.weight[a] / torch.sqrt(bn.running_var[a] + eps)
    b_a = ((conv.bias[a] if conv.bias is not None else 0.0) - bn.running_mean[a]) * s_a + bn.bias[a]
    c = 3.0  # the raw rows differ by 3, the BN makes up the rest
    conv.weight[b] = c * conv.weight[a]
    s_b = k * s_a / c
    bn.weight[b] = s_b * torch.sqrt(bn.running_var[b] + eps)
    own = conv.bias[b] if conv.bias is not None else 0.0
    bn.bias[b] = k * b_a - (own - bn.running_mean[b]) * s_b


def planted_cbnet() -> CBNet:
    torch.manual_seed(3)
    m = CBNet()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.copy_(torch.randn(8, generator=_gen(4)))
            bn.running_var.copy_(torch.rand(8, generator=_gen(5)) + 0.5)
            bn.weight.copy_(torch.randn(8, generator=_gen(6)))
            bn.bias.copy_(torch.randn(8, generator=_gen(7)))
        _plant_after_bn(m.conv1, m.bn1, 0, 5, 1.5)
        _plant_after_bn(m.conv1, m.bn1, 1, 6, 0.5)
        _plant_after_bn(m.conv2, m.bn2, 2, 7, 2.0)
        _plant_after_bn(m.conv2, m.bn2, 3, 4, -1.0)  # anti-parallel: through a ReLU, never
        m.conv2.weight[6] = 2 * m.conv2.weight[5]  # raw rows parallel, effective ones not
    return m.eval()


def test_a_conv_bn_net_folds_through_bn_and_flatten(tmp_path: Path) -> None:
    src, out = tmp_path / "cb.pt", tmp_path / "narrow.safetensors"
    model = planted_cbnet()
    torch.save(model.state_dict(), src)
    report = fold(src, out, chain=["conv1", "bn1", "conv2", "bn2", "fc"])
    assert report.widths == {"conv1.weight": [8, 6], "conv2.weight": [8, 7]}
    assert report.resolved["bn1"] == [
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
    ]
    assert report.resolved["conv2"] == ["conv2.weight", "conv2.bias"]
    assert report.resolved["conv1"] == ["conv1.weight"]  # no bias
    sd = wcond.load_state_dict(out)
    for key in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        assert sd[key].shape == (6,)
    assert sd["fc.weight"].shape == (5, 7 * 16)  # a column block of 16 per channel folded
    assert torch.equal(sd["bn1.num_batches_tracked"], model.bn1.num_batches_tracked)
    narrow = CBNet(6, 7).eval()
    narrow.load_state_dict(sd)
    x = torch.randn(16, 3, 8, 8, generator=_gen(8))
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), model(x), rtol=1e-5, atol=1e-5)
    params = sum(p.numel() for p in narrow.parameters())
    assert params < sum(p.numel() for p in model.parameters())


def test_a_chain_that_skips_a_batchnorm_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "cb.pt"
    torch.save(planted_cbnet().state_dict(), src)
    with pytest.raises(UsageError, match="'bn1' looks like a BatchNorm on the 8 units of"):
        fold(src, chain=["conv1", "conv2", "bn2", "fc"])
    with pytest.raises(UsageError, match="comes first"):
        fold(src, chain=["bn1", "conv2", "fc"])


class Net(nn.Module):
    def __init__(self, widths: tuple[int, int] = (16, 12)) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, widths[0]),
            nn.ReLU(),
            nn.Linear(widths[0], widths[1]),
            nn.ReLU(),
            nn.Linear(widths[1], 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def planted_net() -> Net:
    torch.manual_seed(9)
    m = Net()
    with torch.no_grad():
        for a, b, k in ((0, 4, 2.0), (1, 9, 0.5), (2, 3, 1.5)):
            m.net[0].weight[b], m.net[0].bias[b] = k * m.net[0].weight[a], k * m.net[0].bias[a]
        m.net[2].weight[5], m.net[2].bias[5] = 3 * m.net[2].weight[1], 3 * m.net[2].bias[1]
    return m


def test_module_names_resolve_and_the_cli_says_to_what(tmp_path: Path) -> None:
    src = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in planted_net().state_dict().items()}, str(src))
    by_module = fold(src, chain=["net.0", "net.2", "net.4"])
    by_key = fold(src, chain=["net.0.weight", "net.2.weight", "net.4.weight"])
    assert by_module.widths == by_key.widths == {"net.0.weight": [16, 13], "net.2.weight": [12, 11]}
    assert by_module.resolved == {
        "net.0": ["net.0.weight", "net.0.bias"],
        "net.2": ["net.2.weight", "net.2.bias"],
        "net.4": ["net.4.weight", "net.4.bias"],
    }
    out = tmp_path / "o.safetensors"
    result = runner.invoke(
        app, ["shrink", str(src), "--fold", "--chain", "net.0,net.2,net.4", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (
        "chain: net.0 = net.0.weight + net.0.bias; net.2 = net.2.weight + net.2.bias; "
        "net.4 = net.4.weight + net.4.bias" in result.stdout
    )


# --------------------------------------------------------------------------- wcond.fold (tracing)


def test_fold_a_traced_model() -> None:
    model = planted_net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 8, generator=_gen(10))
    small, report = wcond.fold(model, x)
    assert report.widths == {"net.0": [16, 13], "net.2": [12, 11]}
    assert type(small) is Net and small.net[0].out_features == 13 and small.net[2].in_features == 13
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    assert report.left_alone == {"net.4": "its units are the model's outputs"}
    # net.0: 3 rows and biases; net.2: 16x12 -> 13x11 and a bias; net.4: a column of 3
    assert report.params_removed == 3 * (8 + 1) + (16 * 12 - 13 * 11) + 1 + 3
    assert report.constructor == {
        "net.0": {"out_features": [16, 13]},
        "net.2": {"in_features": [16, 13], "out_features": [12, 11]},
        "net.4": {"in_features": [12, 11]},
    }
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    narrow = Net((13, 11))
    narrow.load_state_dict(small.state_dict())  # the same class, built with the new widths


def test_fold_a_traced_cnn_with_bn_pool_and_flatten() -> None:
    model = planted_cbnet()
    x = torch.randn(8, 3, 8, 8, generator=_gen(11))
    small, report = wcond.fold(model, x)
    assert report.widths == {"conv1": [8, 6], "conv2": [8, 7]}
    assert small.bn1.num_features == 6 and small.bn1.running_var.shape == (6,)
    assert small.fc.in_features == 7 * 16
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5


class Residual(nn.Module):
    """A stem, a residual block (conv-bn-relu-conv-bn + skip), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        h = torch.relu(self.bn1(self.conv1(s)))
        h = torch.relu(self.conv2(h) + s)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def test_fold_leaves_the_residual_path_alone_and_says_why() -> None:
    torch.manual_seed(12)
    model = Residual().eval()
    with torch.no_grad():  # parallel units everywhere: only the inner link may fold
        for conv in (model.stem, model.conv1, model.conv2):
            conv.weight[5], conv.bias[5] = 2 * conv.weight[1], 2 * conv.bias[1]
        model.bn1.weight[5], model.bn1.bias[5] = model.bn1.weight[1], 2 * model.bn1.bias[1]
        model.bn1.running_mean[5] = 2 * model.bn1.running_mean[1]
    x = torch.randn(4, 3, 8, 8, generator=_gen(13))
    small, report = wcond.fold(model, x)
    assert report.widths == {"conv1": [8, 7]}
    assert "a branch or residual" in report.left_alone["stem"]
    assert report.left_alone["conv2"] == "its output goes into an addition (a residual sum)"
    assert small.stem.out_channels == 8 and small.conv2.out_channels == 8
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5


def test_fold_refuses_an_untraceable_model() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UsageError, match="cannot trace Dynamic with torch.fx"):
        wcond.fold(Dynamic())


# --------------------------------------------------------------------------- the CLI's --model


def test_cli_model_factory_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "usermodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def make(widths=(16, 12)):
                return nn.Sequential(
                    nn.Linear(8, widths[0]), nn.ReLU(),
                    nn.Linear(widths[0], widths[1]), nn.ReLU(),
                    nn.Linear(widths[1], 3),
                )
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the working directory
    src, out = tmp_path / "in.pt", tmp_path / "out.safetensors"
    torch.save(planted_net().net.state_dict(), src)
    args = ["shrink", str(src), "--fold", "--model", "usermodels.nets:make"]
    result = runner.invoke(app, [*args, "--input-shape", "2,8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (
        "constructor widths: 0 out_features 16 → 13; 2 in_features 16 → 13, out_features 12 → 11; "
        "4 in_features 12 → 11" in result.stdout
    )
    assert "left alone: 4 (its units are the model's outputs)" in result.stdout
    assert "max |Δ output|" in result.stdout and f"wrote {out}" in result.stdout
    sd = wcond.load_state_dict(out)
    from usermodels.nets import make  # type: ignore[import-not-found]

    narrow = make((13, 11))
    narrow.load_state_dict(sd)
    x = torch.randn(5, 8, generator=_gen(14))
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), planted_net().net(x), rtol=1e-5, atol=1e-5)
    for bad, message in (
        ("usermodels.nets", "--model 'usermodels.nets': wants PKG.MODULE:FACTORY"),
        ("usermodels.nope:make", "cannot import usermodels.nope"),
        ("usermodels.nets:nope", "has no factory 'nope'"),
    ):
        r = runner.invoke(app, ["shrink", str(src), "--fold", "--model", bad, "--dry-run"])
        assert r.exit_code == 2 and message in r.stderr, r.output
    r = runner.invoke(app, [*args, "--axis", "rows", "--dry-run"])
    assert r.exit_code == 2 and "--axis do not apply to it" in r.stderr
    r = runner.invoke(app, [*args, "--input-shape", "2,7", "--dry-run"])
    assert r.exit_code == 2 and "--input-shape [2, 7]: the model fails on such an input" in r.stderr
