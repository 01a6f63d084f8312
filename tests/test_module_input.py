"""wcond.inspect / init_cs / diff on an nn.Module: groups and layer kinds come from the module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wcond
from wcond import metrics
from wcond.checkpoint.module import module_view
from wcond.diff import diff


def _mobile_block() -> nn.Module:
    """A stem conv, a grouped conv (4 groups) and a depthwise conv, then a Linear and an Embedding."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.stem = nn.Conv2d(3, 16, 3)
            self.grouped = nn.Conv2d(16, 16, 3, groups=4)
            self.depthwise = nn.Conv2d(16, 16, 3, groups=16)
            self.bn = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 5)

    return Net()


def test_module_view_reads_groups_and_kinds() -> None:
    view = module_view(_mobile_block())
    assert view.groups == {"stem.weight": 1, "grouped.weight": 4, "depthwise.weight": 16}
    assert view.kinds == {
        "emb.weight": "embedding",
        "stem.weight": "conv2d",
        "grouped.weight": "conv2d",
        "depthwise.weight": "conv2d",
        "fc.weight": "linear",
    }
    assert view.name == "<module Net>"


def test_inspect_module_uses_its_groups_without_notes() -> None:
    model = _mobile_block()
    report = wcond.inspect(model)
    by_name = {r.name: r for r in report.layers}
    assert report.checkpoint == "<module Net>" and report.format == "module"
    assert by_name["grouped.weight"].groups == 4
    assert by_name["depthwise.weight"].groups == 16
    assert all(not r.notes for r in report.layers), [r.notes for r in report.layers]
    assert [by_name[k].kind for k in ("emb.weight", "stem.weight", "fc.weight")] == [
        "embedding",
        "conv2d",
        "linear",
    ]
    for key, g in (("grouped.weight", 4), ("depthwise.weight", 16)):
        want = float(
            metrics.conv_similarity(model.get_submodule(key[:-7]).weight.detach(), groups=g)
        )
        assert by_name[key].conv_similarity == pytest.approx(want, rel=1e-6)
    # The same weights as a plain state dict: groups are guessed at (notes), CS taken over all pairs.
    plain = {r.name: r for r in wcond.inspect(model.state_dict()).layers}
    assert plain["depthwise.weight"].groups == 1 and plain["depthwise.weight"].notes
    assert plain["depthwise.weight"].conv_similarity != by_name["depthwise.weight"].conv_similarity
    assert plain["fc.weight"].kind == "matrix"


def test_explicit_groups_still_apply_to_a_state_dict_of_the_module() -> None:
    model = _mobile_block()
    a = {r.name: r for r in wcond.inspect(model).layers}
    b = {
        r.name: r
        for r in wcond.inspect(
            model.state_dict(), groups={"grouped.weight": 4, "depthwise.weight": 16}
        ).layers
    }
    for key in a:
        assert a[key].conv_similarity == b[key].conv_similarity
        assert a[key].acv_mean == b[key].acv_mean


def test_init_cs_module_optimizes_within_groups_and_leaves_module_unchanged() -> None:
    model = _mobile_block()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors, result = wcond.init_cs(model, iterations=3, seed=0, device="cpu")
    rows = {r.name: r for r in result.layers}
    assert rows["depthwise.weight"].groups == 16 and rows["grouped.weight"].groups == 4
    assert result.checkpoint == "<module Net>" and result.format == "module"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert rows["stem.weight"].cs_after < rows["stem.weight"].cs_before
    model.load_state_dict(tensors)
    assert not torch.equal(model.stem.weight.detach(), before["stem.weight"])


def test_diff_of_two_modules() -> None:
    a, b = _mobile_block(), _mobile_block()
    with torch.no_grad():
        b.fc.weight[1] = b.fc.weight[0] * 2
    d = diff(a, b, device="cpu")
    fc = next(layer for layer in d.layers if layer.name == "fc.weight")
    assert fc.kind == "linear"
    assert fc.metrics["near_parallel_rows"].delta == 1
    grouped = next(layer for layer in d.layers if layer.name == "grouped.weight")
    assert grouped.metrics["conv_similarity"].delta == 0


def test_transposed_conv_kind() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(4, 8, 3, groups=2), nn.Conv1d(2, 4, 3))
    view = module_view(model)
    assert view.kinds == {"0.weight": "conv_transpose2d", "1.weight": "conv1d"}
    assert view.groups == {"0.weight": 2, "1.weight": 1}


@pytest.mark.filterwarnings("ignore:DynamicFusion has no optimizer")
def test_a_parametrized_weight_is_reported_as_the_module_computes_it() -> None:
    """Weight norm and DynamicFusion's P W' Q: the layer is `X.weight`, the tensor forward uses."""
    from wcond.rare import DynamicFusion

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 16)
    )
    fusion = DynamicFusion(model, layers="2", axis="cols")  # its rows are the model's outputs
    with torch.no_grad():
        fusion.layers[0].param[:, 5] = 0.5 * fusion.layers[0].param[:, 2]
    assert fusion.fuse() == 1
    report = wcond.inspect(model)
    assert [(r.name, r.kind, r.shape) for r in report.layers] == [
        ("0.weight", "linear", [16, 8]),
        ("2.weight", "linear", [16, 16]),
    ]
    dense = {"0.weight": model[0].weight.detach(), "2.weight": model[2].weight.detach()}
    want = wcond.inspect(dense)
    for got, ref in zip(report.layers, want.layers):
        assert got.acv_sum == pytest.approx(ref.acv_sum) and got.rare_rows == ref.rare_rows
    assert report.layers[1].near_parallel_cols == 1  # the fused pair, rebuilt from P W' Q
